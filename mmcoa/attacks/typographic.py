"""Typographic attack (Goh et al., "Multimodal Neurons in Artificial Neural Networks", Distill 2021):
write the name of a wrong class into the image; CLIP models that read text follow the writing.

Not a norm-bounded perturbation: the budget is the text's size, place and opacity. Text is rendered
with Pillow's default font (``ImageFont.load_default(size=...)``) into a glyph mask, shrunk until it
fits the image width, and alpha-blended into the [0, 1] image; only pixels inside the text's box
change (with ``background``, the whole box becomes a label first, as a sticker would).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from mmcoa.attacks.base import AttackError, AttackParams, ImageObjective, register_attack
from mmcoa.attacks.image import ImageAttack


@lru_cache(maxsize=1024)
def render_text(text: str, height: int, width: int, font_frac: float, position: str) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Glyph coverage [H, W] in [0, 1] of ``text`` and its box (top, left, bottom, right), exclusive.

    The font is ``font_frac * height`` pixels, reduced until the text fits the width (at least 1 px).
    ``position``: ``top`` | ``center`` | ``bottom``; horizontally centred.
    """
    from PIL import Image, ImageDraw, ImageFont

    size = max(1, round(font_frac * height))
    while True:
        font = ImageFont.load_default(size=size)
        left, top, right, bottom = ImageDraw.Draw(Image.new("L", (1, 1))).textbbox((0, 0), text, font=font)
        if right - left <= width or size == 1:
            break
        size -= 1
    w, h = right - left, bottom - top
    x0 = (width - w) // 2 - left
    y0 = {"top": 0, "center": (height - h) // 2, "bottom": height - h}[position] - top
    canvas = Image.new("L", (width, height), 0)
    ImageDraw.Draw(canvas).text((x0, y0), text, fill=255, font=font)
    box = (max(y0 + top, 0), max(x0 + left, 0), min(y0 + bottom, height), min(x0 + right, width))
    return np.asarray(canvas, dtype=np.float32) / 255.0, box


class TypographicParams(AttackParams):
    text: Literal["confusing", "target"] = Field(
        "confusing", description="write the most confusing wrong class (model's own scores) or class `target`"
    )
    target: int | None = Field(None, ge=0, description="class index written when text=target")
    font_frac: float = Field(0.25, gt=0, le=1, description="font size as a fraction of the image height")
    position: Literal["top", "center", "bottom"] = "bottom"
    opacity: float = Field(1.0, ge=0, le=1, description="alpha of the text (0: no change)")
    color: Literal["auto", "white", "black"] = Field("auto", description="ink; auto: contrasting with the box")
    background: bool = Field(False, description="paint the text box in the opposite colour first (a label)")

    @model_validator(mode="after")
    def _target_given(self):
        if (self.text == "target") != (self.target is not None):
            raise ValueError("give target (a class index) exactly when text='target'")
        return self


@register_attack("typographic")
class Typographic(ImageAttack):
    """Typographic attack (Goh et al., Distill 2021): a wrong class name written into the image.

    Threat model: text of height ``font_frac`` * H (shrunk to fit the width) at ``position``,
    blended with ``opacity``; pixels outside the text's box never change. The written class is the
    highest-scoring wrong class of the clean image (``text="confusing"``) or ``target`` (samples of
    that class are left unchanged). Needs a ZeroShotImageObjective with ``classnames`` (and
    ``logits`` for ``confusing``); any image size, any number of channels.

    ``perturb(images [B, C, H, W] in [0, 1], objective, early_exit=False) -> [B, C, H, W]``.
    Cost: one forward (``confusing``), no gradients.
    """

    Params = TypographicParams

    def is_identity(self) -> bool:
        return self.params.opacity == 0

    def check(self, objective: ImageObjective) -> None:
        if getattr(objective, "classnames", None) is None:
            raise AttackError(
                "attack 'typographic' needs the class names: a ZeroShotImageObjective(..., classnames=...) "
                "(ZeroShotTask(..., classnames=...) passes them)"
            )
        if self.params.text == "confusing" and not callable(getattr(objective, "logits", None)):
            raise AttackError("attack 'typographic' with text='confusing' needs an objective with logits(images, index)")
        if self.params.target is not None and self.params.target >= len(objective.classnames):
            raise AttackError(f"attack 'typographic': target {self.params.target} >= {len(objective.classnames)} classes")

    @torch.no_grad()
    def forward(self, x_nat: torch.Tensor, objective: ImageObjective, early_exit: bool = False) -> torch.Tensor:
        rows = torch.arange(len(x_nat), device=x_nat.device)
        labels = objective.labels[rows]
        if self.params.text == "confusing":
            logits = objective.logits(x_nat, rows).float()
            written = logits.scatter(1, labels.view(-1, 1), float("-inf")).argmax(1)
        else:
            written = torch.full_like(labels, self.params.target)
        out = x_nat.clone()
        for i in (written != labels).nonzero().squeeze(1).tolist():
            out[i] = self.write(x_nat[i], objective.classnames[int(written[i])])
        return out

    def write(self, image: torch.Tensor, text: str) -> torch.Tensor:
        """``image`` [C, H, W] in [0, 1] with ``text`` blended in (this attack's size, place, opacity)."""
        p = self.params
        _, h, w = image.shape
        glyphs, (t, l, b, r) = render_text(text, h, w, p.font_frac, p.position)
        if b <= t or r <= l:
            return image.clone()
        cover = torch.from_numpy(glyphs).to(image.device, image.dtype)
        ink = {"white": 1.0, "black": 0.0}.get(p.color)
        if ink is None:
            ink = 1.0 if float(image[:, t:b, l:r].mean()) < 0.5 else 0.0
        out = image.clone()
        if p.background:
            box = torch.zeros_like(cover)
            box[t:b, l:r] = p.opacity
            out = out * (1 - box) + box * (1.0 - ink)
        alpha = p.opacity * cover
        return (out * (1 - alpha) + alpha * ink).clamp_(0.0, 1.0)
