"""PMG-AFT (Wang et al., CVPR 2024): pre-trained-model-guided adversarial fine-tuning.

loss = CE(p(x'), y) + alpha * KL(p(x') || p_orig(x')) + beta * KL(p(x') || p(x)), where p are the
zero-shot class distributions of the model being trained, p_orig those of the frozen original, and
x' TeCoA's PGD. The KL terms keep the robust model close to the original's generalisation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmcoa.defenses.base import DefenseOutput, register_defense
from mmcoa.defenses.tecoa import TeCoA
from mmcoa.attacks.objectives import ZeroShotImageObjective
from mmcoa.zeroshot import ZeroShotClassifier


def kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """Batch-mean KL(p || q) from logits."""
    logp, logq = F.log_softmax(p_logits, -1), F.log_softmax(q_logits, -1)
    return (logp.exp() * (logp - logq)).sum(-1).mean()


@register_defense("pmg_aft")
class PMGAFT(TeCoA):
    trains = ("image",)
    needs_original = True

    def loss(self, model, images, labels):
        alpha = float(self.ctx.options.get("alpha", 1.0))
        beta = float(self.ctx.options.get("beta", 1.0))
        scale = self.scale(model)
        head = ZeroShotClassifier(model, self.class_emb, scale=float(scale))
        adv = self.pgd.perturb(images, ZeroShotImageObjective(head, labels))
        adv_logits = self.logits(model, adv).float()
        clean_logits = self.logits(model, images).float()
        with torch.no_grad():
            orig = self.ctx.original
            orig_logits = (self.scale(orig) * orig.encode_image(adv) @ self.class_emb.T).float()
        ce = F.cross_entropy(adv_logits, labels)
        kl_orig, kl_clean = kl(adv_logits, orig_logits), kl(adv_logits, clean_logits)
        loss = ce + alpha * kl_orig + beta * kl_clean
        return DefenseOutput(loss, {"loss": loss.item(), "ce": ce.item(), "kl_orig": kl_orig.item(), "kl_clean": kl_clean.item()})
