"""TeCoA (Mao et al., ICLR 2023): text-guided contrastive adversarial training of the image tower.

loss = CE(min(exp(s), max) * cos(f(x'), W), y) with W the frozen class-prompt embeddings and x'
PGD on the same loss.
"""

from __future__ import annotations

import torch.nn.functional as F

from mmcoa.attacks.objectives import ZeroShotImageObjective
from mmcoa.defenses.base import Defense, DefenseOutput, register_defense
from mmcoa.zeroshot import ZeroShotClassifier, class_embeddings


@register_defense("tecoa")
class TeCoA(Defense):
    trains = ("image",)

    def __init__(self, model, ctx):
        super().__init__(model, ctx)
        # The text tower is frozen: class-prompt embeddings are computed once for the whole run.
        self.class_emb = class_embeddings(model, ctx.classnames, [ctx.template])
        self.pgd = self.image_attack()

    def logits(self, model, images):
        return self.scale(model) * model.encode_image(images) @ self.class_emb.T

    def loss(self, model, images, labels):
        scale = self.scale(model)
        head = ZeroShotClassifier(model, self.class_emb, scale=float(scale))
        adv = self.pgd.perturb(images, ZeroShotImageObjective(head, labels))
        logits = self.logits(model, adv).float()
        loss = F.cross_entropy(logits, labels)
        acc = (logits.argmax(1) == labels).float().mean().item()
        return DefenseOutput(loss, {"loss": loss.item(), "adv_acc": acc})
