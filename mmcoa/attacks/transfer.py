"""Transfer attack: adversarial images crafted on a source model, evaluated on the target.

The black-box check of the robust-CLIP literature: if a model resists white-box PGD better than it
resists images crafted on another model, its white-box gradients are masked. The source model
classifies with the same class prompts as the target (its own class embeddings of them).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch
from pydantic import Field

from mmcoa.attacks.base import AttackError, AttackParams, ImageObjective, attack_class, create_attack, register_attack
from mmcoa.attacks.image import ImageAttack
from mmcoa.models import ClipModel, ModelLoadError, create_model


@lru_cache(maxsize=4)
def load_source(source: str, pretrained: str | None, device: str) -> ClipModel:
    """The source model, loaded once per (reference, weights, device), frozen, in eval mode."""
    model = create_model(source, pretrained=pretrained, device=device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


class TransferParams(AttackParams):
    source: str = Field(description="source model: a directory saved by mmcoa, an open_clip name or hf-hub:org/name")
    pretrained: str | None = Field(None, description="weights of the source (open_clip tag or file); None: as saved")
    attack: str = Field("pgd", description="the image attack run on the source model")
    params: dict[str, Any] = Field(default_factory=dict, description="its params (the threat model)")


@register_attack("transfer")
class Transfer(ImageAttack):
    """Transfer attack: ``attack`` with ``params`` run white-box on the ``source`` model, its
    adversarial images then classified by the target model (Papernot et al. 2016; the black-box
    check of Carlini et al., "On Evaluating Adversarial Robustness", 2019).

    Threat model: that of the nested image attack (norm, radius, steps); the target model is never
    queried. Needs a ZeroShotImageObjective that knows its class prompts (``prompts=``; the
    evaluation's ZeroShotTask passes them): the source classifies with the same prompts.

    Args:
        source: a model reference ``mmcoa.models.create_model`` loads (a saved directory, an
            open_clip architecture, ``hf-hub:org/name``); loaded once per process and reference.
        pretrained: the source's weights when ``source`` is an architecture.
        attack, params: the nested image attack (e.g. ``pgd`` with ``eps_255``, ``steps``).

    ``perturb(images [B, C, H, W] in [0, 1], objective, early_exit=False) -> [B, C, H, W]``.
    The nested attack always runs its full budget on the source: stopping where the source is first
    fooled would hand the target a barely adversarial image and understate what transfers. So
    ``early_exit`` (which the target, never queried, cannot inform) changes nothing.
    """

    Params = TransferParams

    def __init__(self, **params: Any):
        super().__init__(**params)
        p = self.params
        kind = attack_class(p.attack).kind
        if kind != "image" or p.attack == self.name:
            raise AttackError(f"attack 'transfer': 'attack' must name an image attack other than transfer, got '{p.attack}'")
        self.inner = create_attack(p.attack, **p.params)

    def threat_model(self) -> dict[str, Any]:
        p = self.params
        return {"attack": self.name, "side": "image", "source": p.source, "pretrained": p.pretrained,
                "crafted_with": self.inner.threat_model()}

    def is_identity(self) -> bool:
        return self.inner.is_identity()

    def check(self, objective: ImageObjective) -> None:
        if getattr(objective, "prompts", None) is None or not callable(getattr(objective, "on_model", None)):
            raise AttackError(
                "attack 'transfer' needs a zero-shot objective that knows its class prompts "
                "(ZeroShotImageObjective(..., prompts=...)); the source model classifies with them"
            )

    def forward(self, x_nat: torch.Tensor, objective: ImageObjective, early_exit: bool = False) -> torch.Tensor:
        p = self.params
        try:
            source = load_source(p.source, p.pretrained, str(x_nat.device))
        except ModelLoadError as err:
            raise AttackError(f"attack 'transfer': source model: {err}") from None
        try:
            on_source = objective.on_model(source)
        except ValueError as err:
            raise AttackError(f"attack 'transfer': {err}") from None
        return self.inner.perturb(x_nat, on_source, early_exit=False)  # the full budget (see the class docstring)
