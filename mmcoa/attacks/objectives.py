"""What an attack maximises, per task: zero-shot classification, embedding distance, retrieval.

Image objectives return a differentiable per-sample loss; text objectives score candidate strings
(encoded in deduplicated batches, no gradients). All follow the contract in ``base.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmcoa.attacks.base import ObjectiveOutput
from mmcoa.models import ClipModel, distinct
from mmcoa.zeroshot import ZeroShotClassifier, class_embeddings, ensemble

# --- losses on logits ------------------------------------------------------------------------


def margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """max_{j != y} z_j - z_y: positive exactly when the sample is misclassified."""
    true = logits.gather(1, labels.view(-1, 1)).squeeze(1)
    other = logits.scatter(1, labels.view(-1, 1), float("-inf")).amax(1)
    return other - true


def dlr_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Difference of logits ratio (Croce & Hein 2020), untargeted; needs >= 3 classes."""
    srt, _ = logits.sort(dim=1)
    denom = srt[:, -1] - srt[:, -3] + 1e-12
    return margin(logits, labels) / denom


def dlr_targeted_loss(logits: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Targeted DLR: -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2); needs >= 4 classes."""
    srt, _ = logits.sort(dim=1)
    true = logits.gather(1, labels.view(-1, 1)).squeeze(1)
    tgt = logits.gather(1, targets.view(-1, 1)).squeeze(1)
    denom = srt[:, -1] - 0.5 * (srt[:, -3] + srt[:, -4]) + 1e-12
    return -(true - tgt) / denom


# --- image objectives ------------------------------------------------------------------------


class ZeroShotImageObjective:
    """Misclassify images against class prompts.

    Args:
        classifier: the zero-shot head (class embeddings precomputed).
        labels: [B] true labels.
        loss: ``ce`` | ``dlr`` | ``dlr_targeted`` | ``margin``.
        targets: [B] target classes for ``dlr_targeted``.
        true_emb: [B, D] optional adversarial embedding of each sample's true-class prompt
            (Co-Attack: the image attack then moves away from the adversarial text).
        prompts: [C] optional class prompts behind ``classifier`` (one template), so that the same
            task can be rebuilt on another model (:meth:`on_model`, the transfer attack).
        classnames: [C] optional class names (the typographic attack writes them into images).
    """

    def __init__(
        self,
        classifier: ZeroShotClassifier,
        labels: torch.Tensor,
        loss: str = "ce",
        targets: torch.Tensor | None = None,
        true_emb: torch.Tensor | None = None,
        prompts: list[str] | None = None,
        classnames: list[str] | None = None,
    ):
        if loss not in ("ce", "dlr", "dlr_targeted", "margin"):
            raise ValueError(f"unknown zero-shot loss '{loss}'")
        if loss == "dlr_targeted" and targets is None:
            raise ValueError("dlr_targeted needs targets")
        for name, names in (("prompts", prompts), ("classnames", classnames)):
            if names is not None and len(names) != classifier.num_classes:
                raise ValueError(f"{len(names)} {name} for {classifier.num_classes} classes")
        self.classifier, self.labels, self.loss, self.targets, self.true_emb = classifier, labels, loss, targets, true_emb
        self.prompts, self.classnames = prompts, classnames

    @property
    def num_classes(self) -> int:
        return self.classifier.num_classes

    def logits(self, images: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        true_emb = None if self.true_emb is None else self.true_emb[index]
        return self.classifier(images, true_emb, self.labels[index])

    def with_loss(self, loss: str, targets: torch.Tensor | None = None) -> ZeroShotImageObjective:
        return ZeroShotImageObjective(
            self.classifier, self.labels, loss, targets, self.true_emb, self.prompts, self.classnames
        )

    def on_model(self, model: ClipModel) -> ZeroShotImageObjective:
        """The same task (labels, loss, class prompts) on another model: its own class embeddings."""
        if self.prompts is None:
            raise ValueError("this objective does not know its class prompts (pass prompts=...)")
        if self.true_emb is not None:
            raise ValueError("the true-class text embeddings belong to this objective's model; "
                             "a transfer attack cannot reuse them (use mode='independent')")
        class_emb = class_embeddings(model, self.prompts, ["{c}"])  # each prompt as it is
        head = ZeroShotClassifier(model, class_emb, self.classifier.scale)
        return ZeroShotImageObjective(head, self.labels, self.loss, self.targets, None, self.prompts, self.classnames)

    def __call__(self, images: torch.Tensor, index: torch.Tensor) -> ObjectiveOutput:
        logits = self.logits(images, index).float()
        y = self.labels[index]
        if self.loss == "ce":
            value = F.cross_entropy(logits, y, reduction="none")
        elif self.loss == "dlr":
            value = dlr_loss(logits, y)
        elif self.loss == "margin":
            value = margin(logits, y)
        else:
            value = dlr_targeted_loss(logits, y, self.targets[index])
        return ObjectiveOutput(value, (logits.argmax(1) != y).detach())


class EmbeddingDistanceObjective:
    """FARE's attack: maximise ||f(x') - f(x)||^2 in the (unnormalised) image embedding space."""

    def __init__(self, model: ClipModel, clean_feats: torch.Tensor):
        self.model, self.clean_feats = model, clean_feats.detach()

    def __call__(self, images: torch.Tensor, index: torch.Tensor) -> ObjectiveOutput:
        feats = self.model.encode_image(images, normalize=False)
        return ObjectiveOutput(((feats - self.clean_feats[index]) ** 2).sum(-1))


def softmax_kl(target_logp: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row, from log-probabilities: p = exp(target_logp), q = exp(logp)."""
    return (target_logp.exp() * (target_logp - logp)).sum(-1)


class ZeroShotCoAttackObjective:
    """Co-Attack's image step (Zhang et al., ACM MM 2022, ``run_before_fusion``) on zero-shot
    classification: push each image away from its clean embedding and from the ADVERSARIAL embedding
    of its true class's prompt.

    Args:
        classifier: the zero-shot head the result is judged with.
        labels: [B] true labels.
        clean_emb: [B, D] unnormalised clean image embeddings.
        true_emb: [B, D] unit-norm adversarial true-class embeddings (the text attacked first).
        alpha: weight of the adversarial-text term (the reference's default, 3).

    Loss, as the reference: KL(softmax(clean) || softmax(adv)) over the unnormalised image embedding
    plus ``alpha`` x KL(softmax(true_emb) || softmax(adv / ||adv||)). No label enters the loss; fooled
    (for early exit and the returned iterate) is a misclassification by ``classifier`` with
    ``true_emb`` in place of the true class: the outcome that is reported.
    """

    def __init__(self, classifier: ZeroShotClassifier, labels: torch.Tensor, clean_emb: torch.Tensor,
                 true_emb: torch.Tensor, alpha: float = 3.0):
        self.classifier, self.labels, self.alpha = classifier, labels, alpha
        self.clean_logp = F.log_softmax(clean_emb.detach().float(), dim=-1)
        self.true_emb = true_emb.detach()
        self.text_logp = F.log_softmax(self.true_emb.float(), dim=-1)

    def __call__(self, images: torch.Tensor, index: torch.Tensor) -> ObjectiveOutput:
        raw = self.classifier.model.encode_image(images, normalize=False)
        unit = F.normalize(raw, dim=-1)
        from_clean = softmax_kl(self.clean_logp[index], F.log_softmax(raw.float(), dim=-1))
        from_text = softmax_kl(self.text_logp[index], F.log_softmax(unit.float(), dim=-1))
        with torch.no_grad():
            y = self.labels[index]
            logits = self.classifier.logits_from_features(unit.detach(), self.true_emb[index], y)
        return ObjectiveOutput(from_clean + self.alpha * from_text, logits.argmax(1) != y)


class RetrievalImageObjective:
    """Image -> text retrieval: push each image's own captions down the ranking.

    Args:
        text_emb: [T, D] unit-norm embeddings of every gallery caption (clean, or adversarial for
            Co-Attack: the image then moves away from the adversarial captions).
        positives: [B, T] bool, the captions of each image (several per image), or [B] the index of
            one caption per image.
        scale: logit scale of the softmax over captions.
        k: fooled = none of the image's captions is in the top ``k`` (strict ranking: a negative with
            an equal score ranks above a positive; see ``mmcoa.retrieval.recall_at_k``).

    Loss: -log of the softmax mass on the image's captions (cross-entropy with one caption).
    """

    def __init__(self, model: ClipModel, text_emb: torch.Tensor, positives: torch.Tensor, scale: float = 100.0, k: int = 1):
        self.model, self.text_emb, self.scale, self.k = model, text_emb.detach(), scale, k
        if positives.dtype != torch.bool:
            positives = F.one_hot(positives.long(), len(text_emb)).bool()
        self.positives = positives

    def __call__(self, images: torch.Tensor, index: torch.Tensor) -> ObjectiveOutput:
        sims = self.scale * self.model.encode_image(images) @ self.text_emb.T
        pos = self.positives[index]
        loss = sims.logsumexp(1) - sims.masked_fill(~pos, float("-inf")).logsumexp(1)
        with torch.no_grad():
            best = sims.masked_fill(~pos, float("-inf")).amax(1, keepdim=True)
            above = ((sims >= best) & ~pos).sum(1)
        return ObjectiveOutput(loss, above >= self.k)


class RetrievalCoAttackImageObjective:
    """Co-Attack's image step for retrieval (Zhang et al., ACM MM 2022, ``run_before_fusion``): push
    each image away from its own clean embedding and from its ADVERSARIAL captions.

    Args:
        clean_emb: [B, D] unnormalised clean embeddings of the batch's images.
        adv_text_emb: [T, D] unit-norm embeddings of every adversarial gallery caption.
        positives: [B, T] bool, the captions of each image.
        alpha: weight of the adversarial-text term (the reference's default, 3).
        k: fooled = none of the image's adversarial captions is in the top ``k`` (strict ranking).

    Loss, as the reference: KL(softmax(clean) || softmax(adv)) over the unnormalised embedding plus
    ``alpha`` x KL(softmax(text) || softmax(adv)) over unit-norm embeddings. The reference attacks one
    (image, caption) pair at a time; here an image is attacked once, the text term averaged over all
    of its captions.
    """

    def __init__(self, model: ClipModel, clean_emb: torch.Tensor, adv_text_emb: torch.Tensor, positives: torch.Tensor,
                 alpha: float = 3.0, k: int = 1):
        self.model, self.alpha, self.k = model, alpha, k
        self.clean_logp = F.log_softmax(clean_emb.detach().float(), dim=-1)
        self.text_emb, self.positives = adv_text_emb.detach(), positives
        self.text_logp = F.log_softmax(adv_text_emb.detach().float(), dim=-1)

    def __call__(self, images: torch.Tensor, index: torch.Tensor) -> ObjectiveOutput:
        raw = self.model.encode_image(images, normalize=False).float()
        adv_logp, unit_logp = F.log_softmax(raw, dim=-1), F.log_softmax(F.normalize(raw, dim=-1), dim=-1)
        clean = self.clean_logp[index]
        away_from_clean = (clean.exp() * (clean - adv_logp)).sum(-1)
        pos = self.positives[index].float()
        # KL(text_j || image_i) for every caption j, averaged over the image's own captions.
        kl_text = (self.text_logp.exp() * self.text_logp).sum(-1).view(1, -1) - unit_logp @ self.text_logp.exp().T
        away_from_text = (kl_text * pos).sum(1) / pos.sum(1).clamp_min(1)
        with torch.no_grad():
            sims = F.normalize(raw, dim=-1) @ self.text_emb.T.float()
            best = sims.masked_fill(~self.positives[index], float("-inf")).amax(1, keepdim=True)
            above = ((sims >= best) & ~self.positives[index]).sum(1)
        return ObjectiveOutput(away_from_clean + self.alpha * away_from_text, above >= self.k)


# --- text objectives -------------------------------------------------------------------------


class _TextEncoder:
    """Encodes candidate strings once each (a batch has many duplicates), without gradients.

    Returns the embeddings [N, D] and a bool [N], True where a text fits the text tower's context
    (one tokenizer pass gives both)."""

    def __init__(self, model: ClipModel, normalize: bool = True, batch_size: int = 512):
        self.model, self.normalize, self.batch_size = model, normalize, batch_size

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        unique, rows = distinct(texts)
        embs, fits = [], []
        for i in range(0, len(unique), self.batch_size):
            tokens, fit = self.model.tokenize_fitting(unique[i : i + self.batch_size])
            embs.append(self.model.encode_text(tokens, normalize=self.normalize))
            fits.append(fit)
        emb, fit = torch.cat(embs), torch.cat(fits)
        rows = rows.to(emb.device)
        return emb[rows], fit[rows]


class ZeroShotTextObjective:
    """Per-sample threat model: the adversary edits the prompt of each sample's true class.

    ``image_feats`` [B, D] are the (clean or adversarial) unit-norm image embeddings; the score of a
    candidate prompt is the margin max_{j != y} z_j - z_y with z_y computed against the candidate.

    With a prompt ensemble, ``templates`` [T, B, D] holds the unit-norm embeddings of each sample's
    true-class prompts, one per template (clean, or already attacked), and the candidates are prompts
    of template ``slot``: z_y is computed against :func:`~mmcoa.zeroshot.ensemble` of the templates with
    row ``slot`` replaced by the candidate, the way the class embedding itself is built.
    """

    def __init__(self, classifier: ZeroShotClassifier, image_feats: torch.Tensor, labels: torch.Tensor,
                 templates: torch.Tensor | None = None, slot: int = 0):
        self.classifier, self.image_feats, self.labels = classifier, image_feats.detach(), labels
        self.templates, self.slot = templates, slot
        self.encode = _TextEncoder(classifier.model)

    def true_emb(self, emb: torch.Tensor, owners: torch.Tensor) -> torch.Tensor:
        """The true-class embedding a candidate (its embedding ``emb``) gives each owner."""
        if self.templates is None:
            return emb
        rows = self.templates[:, owners].clone()
        rows[self.slot] = emb.to(rows.dtype)
        return ensemble(rows)

    def __call__(self, texts: list[str], owners: torch.Tensor) -> ObjectiveOutput:
        emb, fits = self.encode(texts)
        owners = owners.to(emb.device)
        feats, y = self.image_feats[owners], self.labels[owners]
        with torch.no_grad():
            logits = self.classifier.logits_from_features(feats, self.true_emb(emb, owners), y)
        m = margin(logits.float(), y)
        # A candidate longer than the text tower's context would be truncated, which can cut the class
        # name off the prompt: that changes the label, it does not attack the model. Never accept one.
        m = torch.where(fits, m, torch.full_like(m, -torch.inf))
        return ObjectiveOutput(m, (m > 0) & fits)


class EmbeddingKLObjective:
    """MMCoA's text attack objective: KL(softmax(clean text emb) || softmax(adversarial text emb)).

    Uses no image and no label. ``clean_emb`` [B, D] are the unnormalised clean text embeddings.
    """

    def __init__(self, model: ClipModel, clean_emb: torch.Tensor):
        self.clean_logp = F.log_softmax(clean_emb.detach().float(), dim=-1)
        self.encode = _TextEncoder(model, normalize=False)

    def __call__(self, texts: list[str], owners: torch.Tensor) -> ObjectiveOutput:
        adv_logp = F.log_softmax(self.encode(texts)[0].float(), dim=-1)
        return ObjectiveOutput(softmax_kl(self.clean_logp[owners], adv_logp))


class RetrievalTextObjective:
    """Text -> image retrieval: push each caption's own image down the ranking.

    ``image_feats`` [I, D] unit-norm embeddings of every gallery image (clean, or adversarial);
    ``positives`` [B] the image index of each caption. Loss: s_k - s_own, where s_k is the ``k``-th
    highest score among the other images; fooled when it is >= 0 (the own image is out of the top
    ``k`` under strict ranking: a tie with another image is a miss).
    """

    def __init__(self, model: ClipModel, image_feats: torch.Tensor, positives: torch.Tensor, k: int = 1):
        self.model, self.image_feats, self.positives, self.k = model, image_feats.detach(), positives, k
        self.encode = _TextEncoder(model)

    def __call__(self, texts: list[str], owners: torch.Tensor) -> ObjectiveOutput:
        emb, fits = self.encode(texts)  # a truncated caption may lose label-carrying words
        sims = (emb @ self.image_feats.T).float()
        own_idx = self.positives[owners].view(-1, 1)
        own = sims.gather(1, own_idx).squeeze(1)
        k = min(self.k, sims.shape[1] - 1)
        if k < 1:  # a gallery of one image: nothing to rank above it
            return ObjectiveOutput(-own, torch.zeros_like(own, dtype=torch.bool))
        others = sims.scatter(1, own_idx, float("-inf"))
        m = others.topk(k, dim=1).values[:, -1] - own
        m = torch.where(fits, m, torch.full_like(m, -torch.inf))
        return ObjectiveOutput(m, (m >= 0) & fits)
