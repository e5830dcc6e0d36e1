"""Clean contrastive fine-tuning: the control row (and, from random weights, pre-training)."""

from __future__ import annotations

from mmcoa.defenses.base import Defense, DefenseOutput, clip_loss, register_defense


@register_defense("clean")
class CleanFinetune(Defense):
    """loss = CLIP_loss(f(x), g(t)); both towers train."""

    label = "Clean fine-tuning"

    def loss(self, model, images, labels):
        scale = self.scale(model)
        img = model.encode_image(images)
        txt = self.encode_captions(model, self.ctx.captions(labels))
        targets = labels if self.ctx.same_class_targets else None
        loss = clip_loss(img, txt, scale, targets)
        return DefenseOutput(loss, {"loss": loss.item(), "scale": scale.item()})
