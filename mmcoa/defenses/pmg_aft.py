"""PMG-AFT (Wang et al., CVPR 2024): pre-trained-model-guided adversarial fine-tuning.

loss = CE(p(x'), y) + alpha * KL(p(x') || p_orig(x')) + beta * KL(p(x') || p(x)), where p are the
zero-shot class distributions of the model being trained, p_orig those of the frozen original, and
x' TeCoA's PGD. The KL terms keep the robust model close to the original's generalisation.
Options (``PMGAFT.Params``): ``alpha`` and ``beta`` (default 1.0 each).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from mmcoa.defenses.base import DefenseOutput, DefenseParams, fp32, register_defense, zero_shot_logits
from mmcoa.defenses.tecoa import TeCoA


def kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """Batch-mean KL(p || q) from logits, in fp32."""
    with fp32(p_logits):
        logp, logq = F.log_softmax(p_logits.float(), -1), F.log_softmax(q_logits.float(), -1)
        return (logp.exp() * (logp - logq)).sum(-1).mean()


class PMGAFTParams(DefenseParams):
    alpha: float = Field(1.0, ge=0, description="Weight of KL(p(x') || p_orig(x')), closeness to the original")
    beta: float = Field(1.0, ge=0, description="Weight of KL(p(x') || p(x)), closeness to the clean prediction")


@register_defense("pmg_aft")
class PMGAFT(TeCoA):
    label = "PMG-AFT"
    trains = ("image",)
    attacks = ("image",)
    needs_original = True
    Params = PMGAFTParams

    def loss(self, model, images, labels):
        alpha, beta = self.options.alpha, self.options.beta
        adv = self.adversarial(model, images, labels)
        adv_logits, clean_logits = self.logits(model, torch.cat([adv, images])).split(len(images))
        with torch.no_grad():
            orig = self.ctx.original
            orig_logits = zero_shot_logits(self.scale(orig), orig.encode_image(adv), self.class_emb)
        ce = F.cross_entropy(adv_logits, labels)
        kl_orig, kl_clean = kl(adv_logits, orig_logits), kl(adv_logits, clean_logits)
        loss = ce + alpha * kl_orig + beta * kl_clean
        return DefenseOutput(loss, {"loss": loss.item(), "ce": ce.item(), "kl_orig": kl_orig.item(), "kl_clean": kl_clean.item()})
