"""Image-text retrieval metrics, and retrieval evaluated clean and under image, text and multimodal
attacks.

Metrics. ``recall_at_k(scores, positive_pairs, k)`` over a [Q, G] score matrix and a [Q, G] boolean
mask of the positives. TIES: ranking is strict; a query is a hit at k when fewer than k NEGATIVES
score greater than or equal to its best positive. A positive never gains from a tie with a
negative (an evaluator that sorts ties by index would rank a positive first half of the time, and a
constant model would score R@k = 1), and several positives never hurt each other. Image -> text
(i2t): a query image is a hit when ANY of its captions is in the top k; text -> image (t2i): a
caption is a hit when its own image is in the top k. R@1, R@5, R@10 per query are kept
(``outcomes``), so worst cases and paired tests need no rerun.

Threat models (each attack from ``mmcoa.attacks.create_attack``, dispatched on its kind as zero-shot
classification is in ``mmcoa.attacks.multimodal``):

* image: each gallery image is pushed away from its OWN captions (all of them, clean); both
  directions are then scored with the adversarial images against the clean captions;
* text: every caption is pushed away from its own (clean) image by word or character edits that
  leave the dataset's label-carrying words (``dataset.protected``) alone; scored with adversarial
  captions against clean images;
* multimodal ``co_attack`` (Zhang et al. 2022, ``run_before_fusion``): the captions are attacked on
  their own, away from their clean embeddings; then each image is pushed away from both its clean
  embedding and its adversarial captions. ``independent``: both sides from clean inputs, each
  against the other's clean embeddings; ``joint``: ``rounds`` alternations (the captions against
  the current adversarial images, then the images, from clean, against those captions). Scored
  adversarial images against adversarial captions.

Attack the reported metric. An objective aimed at R@k counts a query as fooled once it has left the
top k, and that choice moves the attack itself, not only its early exit: the text objective scores
an edit against the k-th best competitor, and an image attack returns the first iterate that fools
(else the last one). An attack aimed at R@10 is therefore weaker on R@1 than one aimed at R@1. So
each attack runs once per reported k (1, 5, 10), every run from the same seed, and R@k, in both
directions, is the lowest over those runs (:func:`strongest_runs`; at most the run aimed at R@k). This costs three runs per attack, less than three
times one run: a query already out of the top k leaves its run at once (early exit per k). The
adversarial captions and the example images kept are those of the run aimed at R@1.

Queries. The result names its queries: the dataset index of every image query and of every caption
query, and each caption's image (``RetrievalResult``), so that two evaluations are paired only on
the same queries (:meth:`RetrievalResult.paired`) and caption queries can be clustered by image.

The gallery is a seeded subset of ``n_images`` images (all of them when ``n_images`` >= the dataset's
size) with all their captions, the same for clean and every attack; every attack is seeded from
(seed, attack name). Images stream from the dataset batch by batch; only embeddings are kept.

Cost. Each attack's three runs, and the clean pass, are counted at the model (``mmcoa.ledger``:
passes of each tower, wall seconds, samples = gallery images); counting changes no outcome.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader

from mmcoa.attacks import Attack
from mmcoa.attacks.objectives import (
    EmbeddingKLObjective,
    RetrievalCoAttackImageObjective,
    RetrievalImageObjective,
    RetrievalTextObjective,
)
from mmcoa.data.registry import DataError
from mmcoa.data.retrieval import RetrievalDataset
from mmcoa.data.transforms import check_resize, resize_floats
from mmcoa.ledger import CostMeter, measured
from mmcoa.models import ClipModel

KS = (1, 5, 10)


# --- metrics -----------------------------------------------------------------------------------


def recall_at_k(scores: torch.Tensor, positive_pairs: torch.Tensor, k: int) -> torch.Tensor:
    """Per query: is a positive among the top ``k`` of the gallery? (strict on ties, see module doc)

    ``scores`` [Q, G], ``positive_pairs`` [Q, G] bool -> bool [Q]. A query without positives is a miss.
    """
    pos = positive_pairs.bool()
    best = scores.masked_fill(~pos, float("-inf")).amax(1, keepdim=True)
    beaten_by = ((scores >= best) & ~pos).sum(1)
    return (beaten_by < k) & pos.any(1)


def positive_mask(caption_image: torch.Tensor, n_images: int) -> torch.Tensor:
    """[n_images, n_captions] bool: caption j belongs to image i."""
    return caption_image.view(1, -1) == torch.arange(n_images, device=caption_image.device).view(-1, 1)


def retrieval_outcomes(image_emb: torch.Tensor, text_emb: torch.Tensor, caption_image: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{i2t_r1: bool[I], ..., t2i_r10: bool[T]}`` from unit-norm embeddings (cosine scores)."""
    scores = (image_emb @ text_emb.T).float().cpu()
    pos = positive_mask(caption_image.cpu(), len(image_emb))
    out = {f"i2t_r{k}": recall_at_k(scores, pos, k) for k in KS}
    out.update({f"t2i_r{k}": recall_at_k(scores.T, pos.T, k) for k in KS})
    return out


# --- a gallery under attack ----------------------------------------------------------------------


class RetrievalTask:
    """One gallery (images streamed, captions in memory) and the model it is scored with.

    ``size`` / ``interpolation`` / ``resize_mode``: images are resized at load time when ``size`` is
    given (``mmcoa.data.transforms``; default: shortest side, then a centre crop, as CLIP does);
    otherwise a batch must share one size. Every attack method takes the ``k`` of the recall it aims
    at: its objective counts a query as fooled once it has left the top ``k``.
    """

    def __init__(
        self,
        model: ClipModel,
        data: RetrievalDataset,
        batch_size: int,
        size: int | None = None,
        interpolation: str = "bicubic",
        resize_mode: str = "shortest",
    ):
        check_resize(interpolation, resize_mode)
        self.interpolation, self.resize_mode = interpolation, resize_mode
        self.model, self.data, self.batch_size, self.size = model, data, batch_size, size
        self.caption_image = data.caption_image.to(model.device)
        self.on_batch: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None
        self._alone: dict[Attack, list[str]] = {}

    # images ------------------------------------------------------------------------------------

    def _collate(self, batch: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        images, idx = [img for img, _ in batch], torch.tensor([i for _, i in batch], dtype=torch.long)
        if self.size is not None:
            return resize_floats(images, self.size, self.interpolation, self.resize_mode), idx
        shapes = sorted({tuple(img.shape) for img in images})
        if len(shapes) > 1:
            raise DataError(
                f"{self.data.name}: images differ in size ({shapes[0]} vs {shapes[-1]}); pass a size to resize them at load time"
            )
        return torch.stack(images).float().div_(255.0), idx

    def batches(self):
        """(float images [B, C, H, W] in [0, 1], gallery indices [B]) in gallery order."""
        loader = DataLoader(self.data, batch_size=self.batch_size, shuffle=False, collate_fn=self._collate)
        for images, idx in loader:
            yield images.to(self.model.device), idx.to(self.model.device)

    @torch.no_grad()
    def image_emb(self) -> torch.Tensor:
        return torch.cat([self.model.encode_image(x) for x, _ in self.batches()])

    @torch.no_grad()
    def text_emb(self, captions: list[str]) -> torch.Tensor:
        return self.model.encode_texts(captions)

    def _perturb_images(self, attack: Attack, objective_for: Callable) -> torch.Tensor:
        """Adversarial image embeddings [I, D]; ``objective_for(x, idx)`` builds each batch's objective."""
        out = []
        for x, idx in self.batches():
            adv = attack.perturb(x, objective_for(x, idx), early_exit=True)
            if self.on_batch is not None:
                self.on_batch(idx, x, adv)
            with torch.no_grad():
                out.append(self.model.encode_image(adv))
        return torch.cat(out)

    def attack_images(self, attack: Attack, text_emb: torch.Tensor, k: int) -> torch.Tensor:
        """Adversarial image embeddings [I, D]: each image pushed out of the top ``k`` of its captions in ``text_emb``."""
        pos = positive_mask(self.caption_image, len(self.data))
        return self._perturb_images(attack, lambda x, idx: RetrievalImageObjective(self.model, text_emb, pos[idx], k=k))

    def co_attack_images(self, attack: Attack, adv_text_emb: torch.Tensor, k: int, alpha: float) -> torch.Tensor:
        """Co-Attack's image step: each image pushed away from its clean embedding and (weight ``alpha``)
        its adversarial captions in ``adv_text_emb`` (:class:`RetrievalCoAttackImageObjective`); fooled
        out of the top ``k``."""
        pos = positive_mask(self.caption_image, len(self.data))

        def objective(x: torch.Tensor, idx: torch.Tensor) -> RetrievalCoAttackImageObjective:
            with torch.no_grad():
                clean = self.model.encode_image(x, normalize=False)
            return RetrievalCoAttackImageObjective(self.model, clean, adv_text_emb, pos[idx], alpha=alpha, k=k)

        return self._perturb_images(attack, objective)

    # captions ----------------------------------------------------------------------------------

    def _perturb_texts(self, attack: Attack, objective_for: Callable) -> list[str]:
        """Adversarial captions, batch by batch; ``objective_for(chunk, start)`` builds each objective."""
        captions, out = self.data.captions, []
        for start in range(0, len(captions), self.batch_size):
            chunk = captions[start : start + self.batch_size]
            out.extend(attack.perturb(chunk, objective_for(chunk, start), protected=self.data.protected))
        return out

    def attack_texts(self, attack: Attack, image_emb: torch.Tensor, k: int) -> list[str]:
        """Adversarial captions: each pushed out of the top ``k`` of its own image in ``image_emb``; protected words kept."""
        return self._perturb_texts(attack, lambda chunk, start: RetrievalTextObjective(
            self.model, image_emb, self.caption_image[start : start + len(chunk)], k=k))

    def attack_texts_alone(self, attack: Attack) -> list[str]:
        """Adversarial captions pushed away from their own clean embeddings (no image; Co-Attack's text
        step). They depend on no k, so the runs aimed at each k share one (kept per attack)."""
        def objective(chunk: list[str], start: int) -> EmbeddingKLObjective:
            with torch.no_grad():
                return EmbeddingKLObjective(self.model, self.model.encode_text(self.model.tokenize(chunk), normalize=False))

        if attack not in self._alone:
            self._alone[attack] = self._perturb_texts(attack, objective)
        return self._alone[attack]


@dataclass
class AttackOutcome:
    """Embeddings scored for one run, and the adversarial captions when the text side was attacked."""

    image_emb: torch.Tensor
    text_emb: torch.Tensor
    captions: list[str] | None = None


def _run_image(attack: Attack, task: RetrievalTask, clean: AttackOutcome, k: int) -> AttackOutcome:
    return AttackOutcome(task.attack_images(attack, clean.text_emb, k), clean.text_emb)


def _run_text(attack: Attack, task: RetrievalTask, clean: AttackOutcome, k: int) -> AttackOutcome:
    captions = task.attack_texts(attack, clean.image_emb, k)
    return AttackOutcome(clean.image_emb, task.text_emb(captions), captions)


def _independent(attack, task: RetrievalTask, clean: AttackOutcome, k: int) -> AttackOutcome:
    captions = task.attack_texts(attack.text_attack, clean.image_emb, k)
    return AttackOutcome(task.attack_images(attack.image_attack, clean.text_emb, k), task.text_emb(captions), captions)


def _co_attack(attack, task: RetrievalTask, clean: AttackOutcome, k: int) -> AttackOutcome:
    # The reference's run_before_fusion: the captions are attacked on their own (away from their clean
    # embeddings), then each image away from its clean embedding and its adversarial captions.
    captions = task.attack_texts_alone(attack.text_attack)
    adv_text = task.text_emb(captions)
    return AttackOutcome(task.co_attack_images(attack.image_attack, adv_text, k, attack.params.alpha), adv_text, captions)


def _joint(attack, task: RetrievalTask, clean: AttackOutcome, k: int) -> AttackOutcome:
    # Each round: captions (from clean) against the current images, then images (from clean)
    # against those captions; both budgets hold since both sides restart from clean inputs.
    image_emb, captions, adv_text = clean.image_emb, None, clean.text_emb
    for _ in range(attack.params.rounds):
        captions = task.attack_texts(attack.text_attack, image_emb, k)
        adv_text = task.text_emb(captions)
        image_emb = task.attack_images(attack.image_attack, adv_text, k)
    return AttackOutcome(image_emb, adv_text, captions)


_MULTIMODAL = {"independent": _independent, "co_attack": _co_attack, "joint": _joint}


def _run_multimodal(attack: Attack, task: RetrievalTask, clean: AttackOutcome, k: int) -> AttackOutcome:
    return _MULTIMODAL[attack.params.mode](attack, task, clean, k)


_RUNNERS = {"image": _run_image, "text": _run_text, "multimodal": _run_multimodal}


def run_retrieval_attack(attack: Attack, task: RetrievalTask, clean: AttackOutcome, k: int) -> AttackOutcome:
    """Any registered attack (image, text or multimodal) on a whole gallery, aimed at R@``k``."""
    return _RUNNERS[attack.kind](attack, task, clean, k)


# --- evaluation ----------------------------------------------------------------------------------


class GalleryMismatch(ValueError):
    """Two retrieval evaluations that do not hold the same queries cannot be paired query by query."""


@dataclass
class RetrievalResult:
    """``metrics`` keyed ``<dataset>.<attack>.{i2t,t2i}_r{1,5,10}``; per-query ``outcomes[attack]``
    (``i2t_r*`` one per gallery image, ``t2i_r*`` one per caption), each ``R@k`` of an attack from
    its run aimed at R@k; ``captions[attack]`` the adversarial captions of text-side attacks and
    ``examples[attack]`` the first gallery images (clean and adversarial) and their first captions,
    both of the run aimed at R@1. ``cost[attack]``: what its runs (all three) cost this process,
    ``cost["clean"]`` the clean embeddings' (:class:`mmcoa.ledger.CostMeter`); empty when not counted.

    Which queries: ``image_indices`` [n_images] the dataset index of each image query (the index in
    the dataset its reader opened, see ``RetrievalDataset.source_indices``), ``caption_indices``
    [n_captions] the dataset index of each caption query, ``caption_image`` [n_captions] the position
    among the image queries of each caption's image (caption queries cluster by image).
    """

    metrics: dict[str, float]
    outcomes: dict[str, dict[str, torch.Tensor]]
    threat_models: dict[str, dict]
    n_images: int
    n_captions: int
    image_indices: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    caption_image: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    caption_indices: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    captions: dict[str, list[str]] = field(default_factory=dict)
    examples: dict[str, Any] = field(default_factory=dict)
    cost: dict[str, dict[str, float]] = field(default_factory=dict)

    def paired(self, other: RetrievalResult, attack: str, other_attack: str, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-query outcomes ``key`` (e.g. ``t2i_r1``) of ``attack`` here and ``other_attack`` in
        ``other``, query by query; :class:`GalleryMismatch` unless both hold the same queries."""
        same = (torch.equal(self.image_indices, other.image_indices) and torch.equal(self.caption_indices, other.caption_indices)
                and torch.equal(self.caption_image, other.caption_image))
        if not same:
            raise GalleryMismatch(
                f"the two retrieval evaluations hold different queries ({self.n_images} images / {self.n_captions} captions "
                f"vs {other.n_images} / {other.n_captions}, image or caption indices differ); evaluate both on the same gallery"
            )
        return self.outcomes[attack][key], other.outcomes[other_attack][key]


def attack_seed(seed: int, name: str) -> int:
    """The seed of one attack's run: depends on the base seed and the name, not on suite order."""
    return seed * 7919 + zlib.crc32(name.encode())


def gallery_indices(n_total: int, n_images: int, seed: int) -> torch.Tensor:
    """A seeded subset of ``n_images`` image indices, sorted (all of them when n_images >= n_total)."""
    if n_images >= n_total:
        return torch.arange(n_total)
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(n_total, generator=gen)[:n_images].sort().values


def evaluate_retrieval(
    model: ClipModel,
    dataset: RetrievalDataset,
    suite: list[tuple[str, Attack]],
    n_images: int,
    batch_size: int,
    seed: int,
    size: int | None = None,
    interpolation: str = "bicubic",
    resize_mode: str = "shortest",
    n_examples: int = 4,
    on_progress: Callable[[str, int, int], None] | None = None,
    count_cost: bool = True,
) -> RetrievalResult:
    """R@1/5/10 in both directions, clean and under each ``(name, attack)`` of ``suite``.

    Each attack runs once per k of ``KS``, every run from the same seed; R@k (both directions) is
    the lowest over those runs, so at most the run aimed at R@k (see the module doc). ``size``, ``interpolation``,
    ``resize_mode``: load-time resizing (see :class:`RetrievalTask`). ``n_examples`` first gallery
    images (and each one's first caption) are kept per attack in ``examples``.
    ``on_progress(name, done, total)`` after each attack (all its runs). ``count_cost``: record the
    cost of each attack's runs and of the clean pass (``RetrievalResult.cost``).
    """
    meter = CostMeter(model.device, model) if count_cost else None
    try:
        result = _evaluate_gallery(model, dataset, suite, n_images, batch_size, seed, size, interpolation, resize_mode,
                                   n_examples, on_progress, meter)
    finally:
        if meter is not None:
            meter.close()
    if meter is not None:
        result.cost = meter.record()
    return result


def _evaluate_gallery(model: ClipModel, dataset: RetrievalDataset, suite: list[tuple[str, Attack]], n_images: int,
                      batch_size: int, seed: int, size: int | None, interpolation: str, resize_mode: str,
                      n_examples: int, on_progress: Callable[[str, int, int], None] | None,
                      meter: CostMeter | None) -> RetrievalResult:
    """:func:`evaluate_retrieval` with each run's cost into ``meter`` when given."""
    chosen = gallery_indices(len(dataset), n_images, seed)
    gallery = dataset.subset(chosen)
    task = RetrievalTask(model, gallery, batch_size, size, interpolation, resize_mode)
    first_caption = [int(j) for j in _first_captions(gallery.caption_image, min(n_examples, len(gallery)))]

    torch.manual_seed(attack_seed(seed, "clean"))
    with measured(meter, "clean", len(gallery)):
        clean = AttackOutcome(task.image_emb(), task.text_emb(gallery.captions))
    outcomes = {"clean": retrieval_outcomes(clean.image_emb, clean.text_emb, gallery.caption_image)}
    captions, examples = {}, {}
    if n_examples:
        examples["clean"] = _examples(gallery, {}, first_caption, None)
    for r, (name, attack) in enumerate(suite):
        runs: dict[int, dict[str, torch.Tensor]] = {}
        for k in KS:
            torch.manual_seed(attack_seed(seed, name))
            shown: dict[str, list[torch.Tensor]] = {}
            task.on_batch = _example_keeper(shown, n_examples) if n_examples and k == KS[0] else None
            with measured(meter, name, len(gallery) if k == KS[0] else 0):
                result = run_retrieval_attack(attack, task, clean, k)
            runs[k] = retrieval_outcomes(result.image_emb, result.text_emb, gallery.caption_image)
            if k == KS[0]:
                if result.captions is not None:
                    captions[name] = result.captions
                if n_examples:
                    examples[name] = _examples(gallery, shown, first_caption, result.captions)
        outcomes[name] = strongest_runs(runs)
        task.on_batch = None
        if on_progress is not None:
            on_progress(name, r + 1, len(suite))

    metrics = {
        f"{dataset.name}.{name}.{key}": round(float(v.float().mean()), 6) for name, out in outcomes.items() for key, v in out.items()
    }
    threat = {"clean": {"attack": "none"}, **{name: a.threat_model() for name, a in suite}}
    return RetrievalResult(metrics, outcomes, threat, len(gallery), gallery.n_captions, gallery.source_indices,
                           gallery.caption_image, gallery.caption_indices, captions, examples)


def strongest_runs(runs: dict[int, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per metric, the per-query outcomes of the run (one per aimed k) with the lowest recall.

    The run aimed at R@k is a candidate for every R@k, so each reported recall is at most the one
    aimed at it; another run can be stronger still for the other direction (an image attack aims at
    the image's own captions, i.e. image->text, and its run aimed at R@10 may push text->image R@1
    further). Whole runs are compared, never queries across runs: every reported number comes from
    one adversarial gallery. Ties go to the run aimed at the metric's own k.
    """
    chosen: dict[str, torch.Tensor] = {}
    for key in runs[KS[0]]:
        own = int(key.rsplit("_r", 1)[1])
        order = [own, *(k for k in KS if k != own)]
        best = min(order, key=lambda k: float(runs[k][key].float().mean()))
        chosen[key] = runs[best][key]
    return chosen


def _example_keeper(shown: dict[str, list[torch.Tensor]], n_examples: int) -> Callable:
    """An ``on_batch`` hook keeping the first ``n_examples`` gallery images, clean and adversarial, in ``shown``."""

    def keep(idx: torch.Tensor, x: torch.Tensor, adv: torch.Tensor) -> None:
        if int(idx[0]) == 0:  # a new pass over the gallery (joint mode makes several): keep the last
            shown.clear()
        want = idx < n_examples
        if want.any():
            shown.setdefault("images", []).append(x[want].cpu())
            shown.setdefault("adversarial", []).append(adv[want].detach().cpu())

    return keep


def _first_captions(caption_image: torch.Tensor, n: int) -> list[int]:
    """Index of the first caption of each of the first ``n`` images."""
    out = []
    for i in range(n):
        out.append(int((caption_image == i).nonzero()[0]))
    return out


def _examples(gallery: RetrievalDataset, shown: dict, first_caption: list[int], adv_captions: list[str] | None) -> dict:
    out: dict[str, Any] = {"captions": [gallery.captions[j] for j in first_caption]}
    if adv_captions is not None:
        out["adversarial_captions"] = [adv_captions[j] for j in first_caption]
    if shown:
        out["images"] = torch.cat(shown["images"])
        out["adversarial_images"] = torch.cat(shown["adversarial"])
    return out
