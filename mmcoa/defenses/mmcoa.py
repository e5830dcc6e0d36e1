"""MMCoA (arXiv 2404.19287): multimodal contrastive adversarial training of both towers.

loss = 0.5 * CLIP_loss(f(x'), g(t)) + 0.5 * CLIP_loss(f(x), g(t')), where x' is the image
adversary's attack (PGD in the paper) against the zero-shot cross-entropy over all class prompts of
the training set, and t' the text adversary's (a word substitution in the paper) on the caption,
maximising KL(softmax(g(t)) || softmax(g(t'))).

Deviations from the authors' code, all deliberate (see README): attack gradients never reach the
weight update (attacks differentiate w.r.t. their inputs only, with parameters not requiring grad);
the logit scale is clamped; class-prompt embeddings for the image attack are computed once per step
without gradients instead of at every PGD step (the same values: the weights do not change during
the attack); masked-LM candidates are read at the right positions and stop words are filtered
case-insensitively (see ``attacks/text.py``); class-name words of the captions are never substituted
(the authors' attack could swap them, which trains on captions of another class). Each tower then runs once with gradients, on clean
and adversarial inputs together.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmcoa.attacks.objectives import EmbeddingKLObjective, ZeroShotImageObjective
from mmcoa.defenses.base import Defense, DefenseOutput, clip_loss, inputs_only, register_defense
from mmcoa.zeroshot import ZeroShotClassifier


@register_defense("mmcoa")
class MMCoA(Defense):
    label = "MMCoA"
    trains = ("image", "text", "scale")
    attacks = ("image", "text")

    def __init__(self, model, ctx):
        super().__init__(model, ctx)
        self.prompts = [ctx.template.format(c=c) for c in ctx.classnames]

    def attack(self, model, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
        """(x', t'): both attacks on the current weights, each from the clean inputs."""
        captions = [self.prompts[i] for i in labels.tolist()]
        with inputs_only(model):
            with torch.no_grad():
                prompt_raw = model.encode_text(model.tokenize(self.prompts), normalize=False)
            head = ZeroShotClassifier(model, F.normalize(prompt_raw, dim=-1), scale=self.scale(model).item())
            adv_images = images
            if self.image_adversary is not None:
                adv_images = self.image_adversary.perturb(images, ZeroShotImageObjective(head, labels))
            if self.text_adversary is None:
                return adv_images, captions
            # captions[i] is prompts[labels[i]]: their clean embeddings are already computed
            # Class-name words stay fixed: a substitution into another class name would be label noise.
            adv_captions = self.text_adversary.perturb(
                captions, EmbeddingKLObjective(model, prompt_raw[labels]), protected=self.ctx.classnames
            )
        return adv_images, adv_captions

    def loss(self, model, images, labels):
        adv_images, adv_captions = self.attack(model, images, labels)
        captions = [self.prompts[i] for i in labels.tolist()]
        n = len(images)
        scale = self.scale(model)
        img_adv, img_clean = model.encode_image(torch.cat([adv_images, images])).split(n)
        txt_clean, txt_adv = self.encode_captions(model, captions + adv_captions).split(n)
        targets = labels if self.ctx.same_class_targets else None
        loss_img = clip_loss(img_adv, txt_clean, scale, targets)
        loss_txt = clip_loss(img_clean, txt_adv, scale, targets)
        loss = 0.5 * loss_img + 0.5 * loss_txt
        changed = sum(a != c for a, c in zip(adv_captions, captions)) / max(n, 1)
        return DefenseOutput(
            loss, {"loss": loss.item(), "loss_adv_image": loss_img.item(), "loss_adv_text": loss_txt.item(),
                   "text_changed": changed, "scale": scale.item()}
        )
