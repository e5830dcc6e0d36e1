"""FARE (Schlarmann et al., ICML 2024): unsupervised robust fine-tuning of the image tower.

loss = ||f(x') - f_orig(x)||^2 (unnormalised embeddings, summed over dimensions, batch mean) with
x' maximising the same distance. No labels or text are used, so the robust encoder stays a drop-in
replacement for the original one.
"""

from __future__ import annotations

import torch

from mmcoa.attacks.objectives import EmbeddingDistanceObjective
from mmcoa.defenses.base import Defense, DefenseOutput, inputs_only, register_defense, squared_distance


@register_defense("fare")
class FARE(Defense):
    label = "FARE"
    trains = ("image",)
    attacks = ("image",)
    needs_original = True

    def loss(self, model, images, labels):
        with torch.no_grad():
            target = self.ctx.original.encode_image(images, normalize=False).float()
        adv = images
        if self.image_adversary is not None:
            with inputs_only(model):
                adv = self.image_adversary.perturb(images, EmbeddingDistanceObjective(model, target))
        loss = squared_distance(model.encode_image(adv, normalize=False), target)
        return DefenseOutput(loss, {"loss": loss.item()})
