"""The attack contract and registry.

Every attack is a class registered under a name with a pydantic ``Params`` model, so
``create_attack("pgd", eps_255=4, steps=10)`` validates its arguments and ``list_attacks()`` can
print them. Three kinds share one registry:

* ``ImageAttack.perturb(images, objective) -> adversarial images`` (pixel space, [0, 1]);
* ``TextAttack.perturb(texts, objective) -> adversarial texts``;
* multimodal attacks, which compose the two (see ``multimodal.py``).

An attack maximises an *objective*: a per-sample loss that also says which samples are already
fooled (used for early exit and for keeping the best iterate). Objectives carry per-sample state
(labels, clean embeddings) and are evaluated on a subset of the batch through ``index``, so an
attack can drop samples that are done without the objective knowing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from mmcoa.registry import Registry


class AttackParams(BaseModel):
    """Base of each attack's params: immutable, unknown keys rejected."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class AttackError(ValueError):
    """Unknown attack or invalid attack params; the message names the key."""


@dataclass
class ObjectiveOutput:
    """``loss`` [B'] to maximise (differentiable for image objectives); ``fooled`` [B'] or None."""

    loss: torch.Tensor
    fooled: torch.Tensor | None = None


class ImageObjective(Protocol):
    def __call__(self, images: torch.Tensor, index: torch.Tensor) -> ObjectiveOutput: ...


class TextObjective(Protocol):
    """Scores candidate texts: ``texts[j]`` is a candidate for sample ``owners[j]`` of the batch."""

    def __call__(self, texts: list[str], owners: torch.Tensor) -> ObjectiveOutput: ...


class Attack:
    """Base class: ``kind`` is "image", "text" or "multimodal"; ``Params`` validates the arguments."""

    kind: ClassVar[str] = ""
    name: ClassVar[str] = ""
    Params: ClassVar[type[AttackParams]] = AttackParams

    def __init__(self, **params: Any):
        try:
            self.params = self.Params(**params)
        except ValidationError as err:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc']))}: "
                + ("unknown parameter" if e["type"] == "extra_forbidden" else e["msg"])
                for e in err.errors()
            )
            raise AttackError(f"attack '{self.name}': {problems}") from None

    def perturb(self, inputs: Any, objective: Any, **options: Any) -> Any:
        """Template method: the guards every attack shares, then :meth:`forward`.

        Order: :meth:`check` (may raise :class:`AttackError` whatever the budget), then an empty
        batch or a budget that admits no change (:meth:`is_identity`) returns the inputs unchanged
        (:meth:`unchanged`), else ``forward(inputs, objective, **options)``.
        """
        self.check(objective)
        if len(inputs) == 0 or self.is_identity():
            return self.unchanged(inputs)
        return self.forward(inputs, objective, **options)

    def forward(self, inputs: Any, objective: Any, **options: Any) -> Any:
        raise NotImplementedError

    def check(self, objective: Any) -> None:
        """Raise :class:`AttackError` when ``objective`` cannot serve this attack."""

    def is_identity(self) -> bool:
        """True when the budget admits no change (a zero radius, a zero word budget, ...)."""
        return False

    def unchanged(self, inputs: Any) -> Any:
        return inputs

    def threat_model(self) -> dict[str, Any]:
        """A flat description of the budget, recorded beside every metric."""
        return {"attack": self.name, "side": self.kind, **self.params.model_dump()}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.model_dump().items())
        return f"{type(self).__name__}({args})"


_REGISTRY: Registry[type[Attack]] = Registry("attack", AttackError)


def register_attack(name: str):
    """Class decorator: register an :class:`Attack` subclass under ``name``."""
    return _REGISTRY.register_named(name)


def create_attack(name: str, **params: Any) -> Attack:
    return _REGISTRY[name](**params)


def list_attacks(kind: str | None = None) -> list[str]:
    return [n for n, c in _REGISTRY.items() if kind is None or c.kind == kind]


def attack_class(name: str) -> type[Attack]:
    return _REGISTRY[name]
