"""TGA-ZSR (Yu et al., NeurIPS 2024): text-guided attention for zero-shot robustness, on the image tower.

loss = CE(p(x'), y) + alpha * mean_b d(A(x'), A_orig(x)) + beta * mean_b d(A(x), A_orig(x))

with TeCoA's cross-entropy on the adversarial images x' (the image adversary), A the text-guided
attention of the model being trained and A_orig that of the frozen original. The first attention term
(attention refinement) pulls the adversarial image's attention back to the clean one's under the
original model; the second (attention-based model constraint) keeps the clean attention where the
original model put it. As in the authors' code (``TGA-ZSR.py``: ``criterion``, ``--Alpha 0.08``,
``--Beta 0.05``, ``--Distance_metric l2``), d is the L2 distance between the flattened maps by default.

The attention map (``attention_map.py`` of the authors' code) of an image for the text embedding w
of its class prompt: the ViT's output tokens [T, D] (class token first, through ``ln_post`` and
``proj``) are divided by their norm over the token axis (the reference normalises ``dim=1`` of
[B, T, D]), the patch tokens are scored against w, the scores min-max scaled to [0, 1] per image,
laid out on the patch grid and resized bilinearly to the tower's input size.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from mmcoa.defenses.base import DefenseOutput, DefenseParams, fp32, register_defense, zero_shot_logits
from mmcoa.defenses.tecoa import TeCoA
from mmcoa.models import ClipModel


def text_guided_attention(tokens: torch.Tensor, text_emb: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[B, H * W] maps in [0, 1] from output tokens [B, 1 + N, D] and unit-norm text embeddings [B, D]."""
    with fp32(tokens):
        tokens = tokens.float() / tokens.float().norm(dim=1, keepdim=True)
        scores = tokens[:, 1:] @ text_emb.float().unsqueeze(-1)  # [B, N, 1]
        low, high = scores.min(1, keepdim=True).values, scores.max(1, keepdim=True).values
        scores = (scores - low) / (high - low)
        side = int(round(scores.shape[1] ** 0.5))
        grid = scores.reshape(len(scores), side, side, 1).permute(0, 3, 1, 2)
        return F.interpolate(grid, size=size, mode="bilinear").flatten(1)


def _l2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).norm(p=2, dim=1).mean()


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (1 - F.cosine_similarity(a, b, dim=1, eps=1e-8)).mean()


def _l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).abs().mean()


# Distances between batches of flattened maps [B, P] -> scalar (the reference's ``--Distance_metric``).
DISTANCES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {"l2": _l2, "cos": _cos, "l1": _l1}


class TGAZSRParams(DefenseParams):
    alpha: float = Field(0.08, ge=0, description="Weight of d(A(x'), A_orig(x)), the attention refinement")
    beta: float = Field(0.05, ge=0, description="Weight of d(A(x), A_orig(x)), the attention-based model constraint")
    distance: Literal["l2", "cos", "l1"] = Field("l2", description="Distance between attention maps")


@register_defense("tga_zsr")
class TGAZSR(TeCoA):
    label = "TGA-ZSR"
    trains = ("image",)
    attacks = ("image",)
    needs_original = True
    Params = TGAZSRParams

    def attention(self, model: ClipModel, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Text-guided attention of images (their output ``tokens``) towards their class prompts."""
        return text_guided_attention(tokens, self.class_emb[labels], model.image_size)

    def loss(self, model, images, labels):
        o = self.options
        n = len(images)
        adv = self.adversarial(model, images, labels)
        feats, tokens = model.encode_image_tokens(torch.cat([adv, images]))
        logits = zero_shot_logits(self.scale(model), feats[:n], self.class_emb)
        att_adv, att_clean = self.attention(model, tokens, labels.repeat(2)).split(n)
        with torch.no_grad():
            orig = self.ctx.original
            att_orig = self.attention(orig, orig.encode_image_tokens(images)[1], labels)
        distance = DISTANCES[o.distance]
        ce = F.cross_entropy(logits, labels)
        refine, constrain = distance(att_adv, att_orig), distance(att_clean, att_orig)
        loss = ce + o.alpha * refine + o.beta * constrain
        acc = (logits.argmax(1) == labels).float().mean().item()
        return DefenseOutput(loss, {"loss": loss.item(), "ce": ce.item(), "attention_refine": refine.item(),
                                    "attention_constrain": constrain.item(), "adv_acc": acc})
