"""The defense contract and registry, and the CLIP contrastive loss they share.

A defense is a training loss: ``loss(model, images, labels) -> DefenseOutput``. It builds its own
adversarial examples with its train-time adversaries (``image_adversary``, ``text_adversary``: any
registered attack of that side, or a mixture, see ``adversary.py``) on the plain module, gradients
with respect to inputs only, so no attack gradient ever reaches a parameter's ``.grad``. It declares
which towers train (``trains``), which sides it attacks (``attacks``), whether it needs a frozen copy
of the original model, its display ``label`` and its typed options (``Params``, validated).

Precision: under CUDA bf16 autocast the encoders run in bf16, but every loss (logits, softmax,
cross-entropy, KL, squared distance) is computed in fp32 outside autocast (:func:`fp32`).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, ValidationError

from mmcoa import distributed as dist
from mmcoa.config import DEFAULT_IMAGE_ATTACK, DEFAULT_TEXT_ATTACK, TrainAttack
from mmcoa.defenses.adversary import Adversary
from mmcoa.models import ClipModel, distinct
from mmcoa.registry import Registry


class DefenseParams(BaseModel):
    """Base of each defense's options: immutable, unknown keys rejected."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class DefenseError(ValueError):
    """Unknown defense or invalid defense options; the message names the key."""


@dataclass
class DefenseContext:
    """What a defense needs besides the batch: class prompts, train-time attack specs (one, a mixture
    or None per side, in the params' form), options (checked by the defense's ``Params``)."""

    classnames: list[str]
    template: str = "This is a photo of a {c}"
    image_attack: TrainAttack = DEFAULT_IMAGE_ATTACK
    text_attack: TrainAttack = DEFAULT_TEXT_ATTACK
    logit_scale_max: float = 100.0
    same_class_targets: bool = False
    original: ClipModel | None = None
    options: dict[str, Any] = field(default_factory=dict)
    caption_groups: list[list[str]] | None = None

    def captions(self, labels: torch.Tensor) -> list[str]:
        """The caption of each label: its class prompt, or a random one of its caption group.

        With ``caption_groups`` (pre-training on a captioned mixture) the choice uses torch's global
        RNG, which the training loop seeds per step, so a resumed run draws the same captions.
        """
        if self.caption_groups is None:
            return [self.template.format(c=self.classnames[i]) for i in labels.tolist()]
        out = []
        for g in labels.tolist():
            group = self.caption_groups[g]
            out.append(group[int(torch.randint(len(group), (1,)))])
        return out


@dataclass
class DefenseOutput:
    loss: torch.Tensor
    logs: dict[str, float] = field(default_factory=dict)


class Defense:
    """Base class. ``trains`` lists the towers whose parameters the optimiser updates; ``attacks`` the
    sides it builds adversarial inputs for (each gets an adversary from the context's spec)."""

    name: ClassVar[str] = ""
    label: ClassVar[str] = ""  # display name in reports
    trains: ClassVar[tuple[str, ...]] = ("image", "text", "scale")
    needs_original: ClassVar[bool] = False
    attacks: ClassVar[tuple[str, ...]] = ()  # "image", "text"
    Params: ClassVar[type[DefenseParams]] = DefenseParams

    def __init__(self, model: ClipModel, ctx: DefenseContext):
        self.ctx = ctx
        self.options = self.validate_options(ctx.options)
        if self.needs_original and ctx.original is None:
            raise ValueError(f"defense '{self.name}' needs the frozen original model (ctx.original)")
        self.image_adversary = Adversary.from_slot("image", ctx.image_attack) if "image" in self.attacks else None
        self.text_adversary = Adversary.from_slot("text", ctx.text_attack) if "text" in self.attacks else None

    @classmethod
    def validate_options(cls, options: dict[str, Any]) -> DefenseParams:
        """The defense's typed options; :class:`DefenseError` names an unknown or invalid key."""
        try:
            return cls.Params(**options)
        except ValidationError as err:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc']))}: "
                + ("unknown option" if e["type"] == "extra_forbidden" else e["msg"])
                for e in err.errors()
            )
            raise DefenseError(f"defense '{cls.name}' options: {problems}") from None

    def loss(self, model: ClipModel, images: torch.Tensor, labels: torch.Tensor) -> DefenseOutput:
        raise NotImplementedError

    # the train-time adversaries ----------------------------------------------------------

    def adversaries(self) -> dict[str, Adversary]:
        """The adversaries that run, by side (a side whose attack never changes an input has none)."""
        return {side: a for side, a in (("image", self.image_adversary), ("text", self.text_adversary)) if a is not None}

    def start_step(self, step: int, seed: int) -> dict[str, float]:
        """Let each adversary pick the attack of ``step`` (from 0); return what to log about them."""
        logs: dict[str, float] = {}
        for adversary in self.adversaries().values():
            logs.update(adversary.start_step(step, seed))
        return logs

    def attack_seconds(self) -> dict[str, float]:
        """Wall seconds each adversary spent since the step started."""
        return {f"attack_{side}_s": a.seconds for side, a in self.adversaries().items()}

    def record(self, history: list[dict]) -> dict[str, Any]:
        """What the model trained against, from the attack objects that ran over ``history``: the
        sides attacked (``trained_against``) and per side the adversary's record (see
        :meth:`Adversary.record`), None for a side not attacked."""
        adversaries = self.adversaries()
        return {"trained_against": list(adversaries),
                **{f"{side}_attack": a.record(history) if (a := adversaries.get(side)) else None
                   for side in ("image", "text")}}

    # helpers shared by the defenses -------------------------------------------------------

    def scale(self, model: ClipModel) -> torch.Tensor:
        """exp(logit_scale), clamped as TeCoA does (the clamp also stops its gradient above max)."""
        return model.logit_scale.clamp(max=self.ctx.logit_scale_max)

    def encode_captions(self, model: ClipModel, texts: list[str], normalize: bool = True) -> torch.Tensor:
        """Embeddings of per-sample captions (unit-norm unless ``normalize=False``), each distinct
        caption encoded once."""
        unique, rows = distinct(texts)
        emb = model.encode_text(model.tokenize(unique), normalize=normalize)
        return emb[rows.to(emb.device)]


_REGISTRY: Registry[type[Defense]] = Registry("defense", DefenseError)


def register_defense(name: str):
    """Class decorator: register a :class:`Defense` subclass under ``name``."""
    return _REGISTRY.register_named(name)


def list_defenses() -> list[str]:
    return _REGISTRY.names()


def create_defense(name: str, model: ClipModel, ctx: DefenseContext) -> Defense:
    return _REGISTRY[name](model, ctx)


def defense_class(name: str) -> type[Defense]:
    return _REGISTRY[name]


def fp32(t: torch.Tensor):
    """A context in which autocast is off on ``t``'s device: losses are computed in full precision."""
    return torch.autocast(t.device.type, enabled=False)


def squared_distance(feats: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """FARE's distance: batch mean of ||feats - target||^2 over the embedding dimension, in fp32."""
    with fp32(feats):
        return ((feats.float() - target.float()) ** 2).sum(-1).mean()


def zero_shot_logits(scale: torch.Tensor, image_feats: torch.Tensor, class_emb: torch.Tensor) -> torch.Tensor:
    """scale * cos(image, class prompt) in fp32 (features are unit-norm): [B, D] x [C, D] -> [B, C]."""
    with fp32(image_feats):
        return scale.float() * image_feats.float() @ class_emb.float().T


def clip_loss(
    image_feats: torch.Tensor,
    text_feats: torch.Tensor,
    scale: torch.Tensor,
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE over the global batch (features gathered across ranks), in fp32.

    ``image_feats``, ``text_feats``: [B, D] unit-norm features of the local batch; ``scale``: the
    (clamped) exp(logit_scale). Targets are the diagonal, as in CLIP and MMCoA (a same-class pair
    in the batch is a negative); with ``labels``, every same-class pair counts as a positive (rows
    normalised), which a batch of templated class captions needs when training from scratch.
    """
    img = dist.gather_with_grad(image_feats)
    txt = dist.gather_with_grad(text_feats)
    with fp32(img):
        logits = scale.float() * img.float() @ txt.float().T
        if labels is None:
            target = torch.arange(len(img), device=img.device)
        else:
            y = dist.gather(labels)
            same = (y.view(-1, 1) == y.view(1, -1)).float()
            target = same / same.sum(1, keepdim=True)  # symmetric, so it serves both directions
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


@contextmanager
def inputs_only(model: torch.nn.Module) -> Iterator[None]:
    """Parameters stop requiring gradients while an attack runs (restored afterwards).

    The attacks already differentiate with respect to their inputs only; this makes it structural
    (the autograd graph of an attack holds no parameter) and spares the forward passes the buffers
    that weight gradients would need.
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
