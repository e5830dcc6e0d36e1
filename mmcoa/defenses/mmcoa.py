"""MMCoA (arXiv 2404.19287): multimodal contrastive adversarial training of both towers.

loss = 0.5 * CLIP_loss(f(x'), g(t)) + 0.5 * CLIP_loss(f(x), g(t')), where x' is PGD against the
zero-shot cross-entropy over all class prompts of the training set, and t' a word-substitution
attack on the caption that maximises KL(softmax(g(t)) || softmax(g(t'))).

Deviations from the authors' code, all deliberate (see README): attack gradients never reach the
weight update; the logit scale is clamped; class-prompt embeddings for the image attack are computed
once per step without gradients instead of at every PGD step; masked-LM candidates are read at the
right positions and stop words are filtered case-insensitively (see ``attacks/text.py``).
"""

from __future__ import annotations

import torch

from mmcoa.attacks import create_attack
from mmcoa.attacks.objectives import EmbeddingKLObjective, ZeroShotImageObjective
from mmcoa.defenses.base import Defense, DefenseOutput, clip_loss, register_defense
from mmcoa.zeroshot import ZeroShotClassifier


def text_attack_from(params):
    """The train-time word-substitution attack a :class:`TextAttackParams` describes."""
    return create_attack(
        "word",
        word_budget=params.word_budget,
        candidates=params.candidates,
        k=params.k,
        cos_threshold=params.cos_threshold,
        mlm_name=params.mlm_name,
    )


@register_defense("mmcoa")
class MMCoA(Defense):
    trains = ("image", "text", "scale")

    def __init__(self, model, ctx):
        super().__init__(model, ctx)
        self.pgd = self.image_attack()
        self.word = text_attack_from(ctx.text_attack) if ctx.text_attack.word_budget > 0 else None

    def loss(self, model, images, labels):
        scale = self.scale(model)
        captions = self.ctx.captions(labels)
        prompts = [self.ctx.template.format(c=c) for c in self.ctx.classnames]
        with torch.no_grad():
            class_emb = model.encode_text(model.tokenize(prompts))
            clean_txt_raw = model.encode_text(model.tokenize(captions), normalize=False)
        head = ZeroShotClassifier(model, class_emb, scale=float(scale))
        adv_images = self.pgd.perturb(images, ZeroShotImageObjective(head, labels))
        if self.word is not None:
            adv_captions = self.word.perturb(captions, EmbeddingKLObjective(model, clean_txt_raw))
        else:
            adv_captions = captions
        targets = labels if self.ctx.same_class_targets else None
        txt = self.encode_captions(model, captions)
        loss_img = clip_loss(model.encode_image(adv_images), txt, scale, targets)
        loss_txt = clip_loss(model.encode_image(images), self.encode_captions(model, adv_captions), scale, targets)
        loss = 0.5 * loss_img + 0.5 * loss_txt
        changed = sum(a != c for a, c in zip(adv_captions, captions)) / max(len(captions), 1)
        return DefenseOutput(
            loss, {"loss": loss.item(), "loss_adv_image": loss_img.item(), "loss_adv_text": loss_txt.item(),
                   "text_changed": changed, "scale": scale.item()}
        )
