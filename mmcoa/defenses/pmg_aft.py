"""PMG-AFT (Wang et al., CVPR 2024): pre-trained-model-guided adversarial fine-tuning.

loss = CE(p(x'), y) + alpha * KL(p(x') || p_orig(x')) + beta * KL(p(x') || p(x)), where p are the
zero-shot class distributions of the model being trained, p_orig those of the frozen original, and
x' TeCoA's PGD. The KL terms keep the robust model close to the original's generalisation.
``ctx.options``: ``alpha`` and ``beta`` (default 1.0 each).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmcoa.defenses.base import DefenseOutput, fp32, register_defense, zero_shot_logits
from mmcoa.defenses.tecoa import TeCoA


def kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """Batch-mean KL(p || q) from logits, in fp32."""
    with fp32(p_logits):
        logp, logq = F.log_softmax(p_logits.float(), -1), F.log_softmax(q_logits.float(), -1)
        return (logp.exp() * (logp - logq)).sum(-1).mean()


@register_defense("pmg_aft")
class PMGAFT(TeCoA):
    trains = ("image",)
    trained_against = ("image",)
    needs_original = True

    def loss(self, model, images, labels):
        alpha = float(self.ctx.options.get("alpha", 1.0))
        beta = float(self.ctx.options.get("beta", 1.0))
        adv = self.adversarial(model, images, labels)
        adv_logits, clean_logits = self.logits(model, torch.cat([adv, images])).split(len(images))
        with torch.no_grad():
            orig = self.ctx.original
            orig_logits = zero_shot_logits(self.scale(orig), orig.encode_image(adv), self.class_emb)
        ce = F.cross_entropy(adv_logits, labels)
        kl_orig, kl_clean = kl(adv_logits, orig_logits), kl(adv_logits, clean_logits)
        loss = ce + alpha * kl_orig + beta * kl_clean
        return DefenseOutput(loss, {"loss": loss.item(), "ce": ce.item(), "kl_orig": kl_orig.item(), "kl_clean": kl_clean.item()})
