"""Zero-shot classification with class prompts.

Class-prompt embeddings are computed once per model and dataset (:func:`class_embeddings`); attacks
that leave the text side alone reuse them, so an image attack step costs one image-tower pass.
"""

from __future__ import annotations

import torch
from torch import nn

from mmcoa.models import ClipModel

EVAL_SCALE = 100.0  # softmax(100 * cos): CLIP's and the authors' evaluation temperature


PROMPT_SETS = {
    "first": lambda ds: list(ds.templates)[:1],
    "ensemble": lambda ds: list(ds.templates),
    "paper": lambda ds: [getattr(ds, "paper_template", None) or ds.templates[0]],
}


def select_templates(dataset, prompts: str = "first", templates: list[str] | None = None) -> list[str]:
    """The templates a dataset is classified with: explicit ones, or a named set of its own.

    The classifier uses their mean embedding (:func:`ensemble`); a text attack edits every template's
    prompt of the true class, and that class is scored with the mean of the edited prompts.
    """
    if templates:
        return list(templates)
    if prompts not in PROMPT_SETS:
        raise ValueError(f"unknown prompt set '{prompts}'; choose one of {', '.join(PROMPT_SETS)}")
    return PROMPT_SETS[prompts](dataset)


def build_prompts(classnames: list[str], template: str) -> list[str]:
    return [template.format(c=c) for c in classnames]


def template_embeddings(
    model: ClipModel, classnames: list[str], templates: list[str], batch_size: int = 256
) -> torch.Tensor:
    """[T, C, D] unit-norm embeddings of every template's prompt of every class."""
    with torch.no_grad():
        return torch.stack([model.encode_texts(build_prompts(classnames, t), batch_size) for t in templates])


def ensemble(per_template: torch.Tensor) -> torch.Tensor:
    """[T, ..., D] prompt embeddings -> [..., D]: their mean over templates, unit-normalised.

    The one rule that turns a class's template prompts into its class embedding, used for the clean
    classifier and for a class whose prompts an attack edited alike."""
    return torch.nn.functional.normalize(per_template.mean(0), dim=-1)


def class_embeddings(
    model: ClipModel, classnames: list[str], templates: list[str], batch_size: int = 256
) -> torch.Tensor:
    """[C, D] unit-norm class embeddings: the mean over templates of the prompts' embeddings."""
    return ensemble(template_embeddings(model, classnames, templates, batch_size))


class ZeroShotClassifier(nn.Module):
    """logits = scale * cos(image, class prompt).

    Args:
        model: the CLIP model (images in [0, 1]).
        class_emb: [C, D] unit-norm class embeddings.
        scale: the temperature; ``EVAL_SCALE`` by default.

    ``forward(images, true_emb=None, labels=None)``: with ``true_emb`` [B, D] and ``labels`` [B],
    row ``labels[i]`` of sample i is scored against ``true_emb[i]`` instead: the per-sample threat
    model in which the adversary edits the prompt of the true class.
    """

    def __init__(self, model: ClipModel, class_emb: torch.Tensor, scale: float = EVAL_SCALE):
        super().__init__()
        self.model = model
        self.register_buffer("class_emb", class_emb.detach(), persistent=False)
        self.scale = scale

    @property
    def num_classes(self) -> int:
        return self.class_emb.shape[0]

    def forward(
        self, images: torch.Tensor, true_emb: torch.Tensor | None = None, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        feats = self.model.encode_image(images)
        return self.logits_from_features(feats, true_emb, labels)

    def logits_from_features(
        self, feats: torch.Tensor, true_emb: torch.Tensor | None = None, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        logits = self.scale * feats @ self.class_emb.to(feats.dtype).T
        if true_emb is not None:
            if labels is None:
                raise ValueError("true_emb needs labels: which row of each sample it replaces")
            true_emb = true_emb.to(feats.dtype)
            own = self.scale * (feats * true_emb).sum(-1)
            # A true-class embedding equal to the clean one keeps the clean logit bit for bit (the
            # matmul and the row-wise product may differ in the last bits): zero budget is the identity.
            clean = (true_emb == self.class_emb.to(feats.dtype)[labels]).all(-1)
            own = torch.where(clean, logits.gather(1, labels.view(-1, 1)).squeeze(1), own)
            logits = logits.scatter(1, labels.view(-1, 1), own.view(-1, 1))
        return logits

    @classmethod
    def from_prompts(
        cls, model: ClipModel, classnames: list[str], templates: list[str], scale: float = EVAL_SCALE
    ) -> ZeroShotClassifier:
        return cls(model, class_embeddings(model, classnames, templates), scale)


@torch.no_grad()
def predict(classifier: ZeroShotClassifier, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Predicted labels for images in [0, 1], in batches."""
    out = [classifier(images[i : i + batch_size].to(classifier.class_emb.device)).argmax(-1) for i in range(0, len(images), batch_size)]
    return torch.cat(out).cpu()
