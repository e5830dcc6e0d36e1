"""TeCoA (Mao et al., ICLR 2023): text-guided contrastive adversarial training of the image tower.

loss = CE(min(exp(s), max) * cos(f(x'), W), y) with W the frozen class-prompt embeddings and x'
the image adversary's attack on the same loss (PGD in the paper; any registered image attack here).
"""

from __future__ import annotations

import torch.nn.functional as F

from mmcoa.attacks.objectives import ZeroShotImageObjective
from mmcoa.defenses.base import Defense, DefenseOutput, inputs_only, register_defense, zero_shot_logits
from mmcoa.zeroshot import ZeroShotClassifier, class_embeddings


@register_defense("tecoa")
class TeCoA(Defense):
    label = "TeCoA"
    trains = ("image",)
    attacks = ("image",)

    def __init__(self, model, ctx):
        super().__init__(model, ctx)
        # The text tower is frozen: class-prompt embeddings are computed once for the whole run.
        self.class_emb = class_embeddings(model, ctx.classnames, [ctx.template])

    def logits(self, model, images):
        """fp32 zero-shot logits of ``images`` against the frozen class prompts (with gradients)."""
        return zero_shot_logits(self.scale(model), model.encode_image(images), self.class_emb)

    def adversarial(self, model, images, labels):
        """x': the image adversary maximising the zero-shot cross-entropy at the training scale
        (the clean images when the adversary never changes an input)."""
        if self.image_adversary is None:
            return images
        head = ZeroShotClassifier(model, self.class_emb, scale=self.scale(model).item())
        with inputs_only(model):
            return self.image_adversary.perturb(images, ZeroShotImageObjective(head, labels))

    def loss(self, model, images, labels):
        adv = self.adversarial(model, images, labels)
        logits = self.logits(model, adv)
        loss = F.cross_entropy(logits, labels)
        acc = (logits.argmax(1) == labels).float().mean().item()
        return DefenseOutput(loss, {"loss": loss.item(), "adv_acc": acc})
