"""LEAF (Abad Rocamora et al., NeurIPS 2025): a robust text tower by unsupervised adversarial fine-tuning.

loss = ||g(t') - g_orig(t)||^2 (unnormalised embeddings, summed over dimensions, batch mean), FARE's
loss on the text side: t' is the text adversary's edit of each caption t (the Charmer threat model of
character edits within a Levenshtein budget, the suite's ``char`` attack, in the paper), maximising the
same distance; g_orig is the frozen original text tower. No labels and no images are used, so the
robust text tower stays a drop-in replacement. Class-name words are not edited (the suite's protection
rule), so the threat model is the one the evaluation's ``char`` attack measures.

As in the authors' code (``train_AT_text_only.py``, ``utils_AT.py``: ``train_one_epoch_text_only``) the
image tower is frozen. ``image_tower: fare`` also trains it with FARE's loss on the image adversary's
images (``||f(x') - f_orig(x)||^2``), the two terms summed: both towers robust in one run, where the
authors start LEAF from a FARE checkpoint.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from mmcoa.attacks.objectives import EmbeddingDistanceObjective, ObjectiveOutput, _TextEncoder
from mmcoa.defenses.base import Defense, DefenseOutput, DefenseParams, inputs_only, register_defense, squared_distance
from mmcoa.models import ClipModel


class TextEmbeddingDistanceObjective:
    """LEAF's attack objective: ||g(t') - g_orig(t)||^2 of each candidate, unnormalised embeddings.
    A candidate longer than the text tower's context scores -inf (truncation is not an edit)."""

    def __init__(self, model: ClipModel, clean_emb: torch.Tensor):
        self.clean_emb = clean_emb.detach().float()
        self.encode = _TextEncoder(model, normalize=False)

    def __call__(self, texts: list[str], owners: torch.Tensor) -> ObjectiveOutput:
        emb, fits = self.encode(texts)
        owners = owners.to(emb.device)
        dist = ((emb.float() - self.clean_emb[owners]) ** 2).sum(-1)
        return ObjectiveOutput(torch.where(fits, dist, torch.full_like(dist, -torch.inf)))


class LEAFParams(DefenseParams):
    image_tower: Literal["frozen", "fare"] = Field(
        "frozen", description="frozen: train the text tower alone (the paper); fare: also train the image tower as FARE")


@register_defense("leaf")
class LEAF(Defense):
    label = "LEAF"
    trains = ("text",)
    attacks = ("text",)
    needs_original = True
    Params = LEAFParams

    def __init__(self, model, ctx):
        if self.validate_options(ctx.options).image_tower == "fare":
            self.trains, self.attacks = ("image", "text"), ("image", "text")
        super().__init__(model, ctx)

    def adversarial_captions(self, model: ClipModel, captions: list[str], target: torch.Tensor) -> list[str]:
        """t': the text adversary's edits maximising the distance to ``target`` (the captions when none)."""
        if self.text_adversary is None:
            return captions
        with inputs_only(model):
            return self.text_adversary.perturb(
                captions, TextEmbeddingDistanceObjective(model, target), protected=self.ctx.classnames)

    def image_loss(self, model: ClipModel, images: torch.Tensor) -> torch.Tensor:
        """FARE's term: ||f(x') - f_orig(x)||^2, x' the image adversary's images maximising it."""
        with torch.no_grad():
            target = self.ctx.original.encode_image(images, normalize=False).float()
        adv = images
        if self.image_adversary is not None:
            with inputs_only(model):
                adv = self.image_adversary.perturb(images, EmbeddingDistanceObjective(model, target))
        return squared_distance(model.encode_image(adv, normalize=False), target)

    def loss(self, model, images, labels):
        orig = self.ctx.original
        captions = self.ctx.captions(labels)
        with torch.no_grad():
            target = orig.encode_text(orig.tokenize(captions), normalize=False).float()
        adv_captions = self.adversarial_captions(model, captions, target)
        text = squared_distance(model.encode_text(model.tokenize(adv_captions), normalize=False), target)
        changed = sum(a != c for a, c in zip(adv_captions, captions)) / max(len(captions), 1)
        logs = {"loss_text": text.item(), "text_changed": changed}
        loss = text
        if "image" in self.trains:
            image = self.image_loss(model, images)
            loss = loss + image
            logs["loss_image"] = image.item()
        return DefenseOutput(loss, {"loss": loss.item(), **logs})
