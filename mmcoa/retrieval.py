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
* multimodal ``co_attack``: captions first, then images pushed away from the ADVERSARIAL captions;
  ``independent``: both sides from clean inputs; ``joint``: ``rounds`` alternations (the captions
  against the current adversarial images, then the images, from clean, against those captions).
  Scored adversarial images against adversarial captions.

Attack objectives count a query as fooled once it has left the top ``max(KS)`` (so an early exit
never stops short of what R@10 measures). The gallery is a seeded subset of ``n_images`` images
(all of them when ``n_images`` >= the dataset's size) with all their captions, the same for clean
and every attack; every attack is seeded from (seed, attack name). Images stream from the dataset
batch by batch; only embeddings are kept.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader

from mmcoa.attacks import Attack
from mmcoa.attacks.objectives import RetrievalImageObjective, RetrievalTextObjective
from mmcoa.data.registry import DataError
from mmcoa.data.retrieval import RetrievalDataset
from mmcoa.data.transforms import check_resize, resize_batch
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
    otherwise a batch must share one size.
    """

    def __init__(
        self,
        model: ClipModel,
        data: RetrievalDataset,
        batch_size: int,
        size: int | None = None,
        interpolation: str = "bicubic",
        resize_mode: str = "shortest",
        k: int = max(KS),
    ):
        check_resize(interpolation, resize_mode)
        self.interpolation, self.resize_mode = interpolation, resize_mode
        self.model, self.data, self.batch_size, self.size, self.k = model, data, batch_size, size, k
        self.caption_image = data.caption_image.to(model.device)
        self.on_batch: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None

    # images ------------------------------------------------------------------------------------

    def _collate(self, batch: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        images, idx = [img for img, _ in batch], torch.tensor([i for _, i in batch], dtype=torch.long)
        if self.size is not None:
            return resize_batch(images, self.size, self.interpolation, self.resize_mode), idx
        shapes = sorted({tuple(img.shape) for img in images})
        if len(shapes) > 1:
            raise DataError(
                f"{self.data.name}: images differ in size ({shapes[0]} vs {shapes[-1]}); pass a size to resize them at load time"
            )
        return torch.stack(images), idx

    def batches(self):
        """(float images [B, C, H, W] in [0, 1], gallery indices [B]) in gallery order."""
        loader = DataLoader(self.data, batch_size=self.batch_size, shuffle=False, collate_fn=self._collate)
        for images, idx in loader:
            yield images.to(self.model.device).float().div_(255.0), idx.to(self.model.device)

    @torch.no_grad()
    def image_emb(self) -> torch.Tensor:
        return torch.cat([self.model.encode_image(x) for x, _ in self.batches()])

    @torch.no_grad()
    def text_emb(self, captions: list[str]) -> torch.Tensor:
        return self.model.encode_texts(captions)

    def attack_images(self, attack: Attack, text_emb: torch.Tensor) -> torch.Tensor:
        """Adversarial image embeddings [I, D]: each image pushed away from its captions in ``text_emb``."""
        pos = positive_mask(self.caption_image, len(self.data))
        out = []
        for x, idx in self.batches():
            objective = RetrievalImageObjective(self.model, text_emb, pos[idx], k=self.k)
            adv = attack.perturb(x, objective, early_exit=True)
            if self.on_batch is not None:
                self.on_batch(idx, x, adv)
            with torch.no_grad():
                out.append(self.model.encode_image(adv))
        return torch.cat(out)

    def attack_texts(self, attack: Attack, image_emb: torch.Tensor) -> list[str]:
        """Adversarial captions: each pushed away from its own image in ``image_emb``; protected words kept."""
        captions, out = self.data.captions, []
        for start in range(0, len(captions), self.batch_size):
            chunk = captions[start : start + self.batch_size]
            owners = self.caption_image[start : start + len(chunk)]
            objective = RetrievalTextObjective(self.model, image_emb, owners, k=self.k)
            out.extend(attack.perturb(chunk, objective, protected=self.data.protected))
        return out


@dataclass
class AttackOutcome:
    """Embeddings scored for one run, and the adversarial captions when the text side was attacked."""

    image_emb: torch.Tensor
    text_emb: torch.Tensor
    captions: list[str] | None = None


def _run_image(attack: Attack, task: RetrievalTask, clean: AttackOutcome) -> AttackOutcome:
    return AttackOutcome(task.attack_images(attack, clean.text_emb), clean.text_emb)


def _run_text(attack: Attack, task: RetrievalTask, clean: AttackOutcome) -> AttackOutcome:
    captions = task.attack_texts(attack, clean.image_emb)
    return AttackOutcome(clean.image_emb, task.text_emb(captions), captions)


def _independent(attack, task: RetrievalTask, clean: AttackOutcome) -> AttackOutcome:
    captions = task.attack_texts(attack.text_attack, clean.image_emb)
    return AttackOutcome(task.attack_images(attack.image_attack, clean.text_emb), task.text_emb(captions), captions)


def _co_attack(attack, task: RetrievalTask, clean: AttackOutcome) -> AttackOutcome:
    captions = task.attack_texts(attack.text_attack, clean.image_emb)
    adv_text = task.text_emb(captions)
    return AttackOutcome(task.attack_images(attack.image_attack, adv_text), adv_text, captions)


def _joint(attack, task: RetrievalTask, clean: AttackOutcome) -> AttackOutcome:
    # Each round: captions (from clean) against the current images, then images (from clean)
    # against those captions; both budgets hold since both sides restart from clean inputs.
    image_emb, captions, adv_text = clean.image_emb, None, clean.text_emb
    for _ in range(attack.params.rounds):
        captions = task.attack_texts(attack.text_attack, image_emb)
        adv_text = task.text_emb(captions)
        image_emb = task.attack_images(attack.image_attack, adv_text)
    return AttackOutcome(image_emb, adv_text, captions)


_MULTIMODAL = {"independent": _independent, "co_attack": _co_attack, "joint": _joint}


def _run_multimodal(attack: Attack, task: RetrievalTask, clean: AttackOutcome) -> AttackOutcome:
    return _MULTIMODAL[attack.params.mode](attack, task, clean)


_RUNNERS = {"image": _run_image, "text": _run_text, "multimodal": _run_multimodal}


def run_retrieval_attack(attack: Attack, task: RetrievalTask, clean: AttackOutcome) -> AttackOutcome:
    """Any registered attack (image, text or multimodal) on a whole gallery."""
    return _RUNNERS[attack.kind](attack, task, clean)


# --- evaluation ----------------------------------------------------------------------------------


@dataclass
class RetrievalResult:
    """``metrics`` keyed ``<dataset>.<attack>.{i2t,t2i}_r{1,5,10}``; per-query ``outcomes[attack]``;
    ``captions[attack]`` the adversarial captions of text-side attacks; ``examples[attack]`` the
    first gallery images (clean and adversarial) and their first captions."""

    metrics: dict[str, float]
    outcomes: dict[str, dict[str, torch.Tensor]]
    threat_models: dict[str, dict]
    n_images: int
    n_captions: int
    image_indices: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    captions: dict[str, list[str]] = field(default_factory=dict)
    examples: dict[str, Any] = field(default_factory=dict)


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
) -> RetrievalResult:
    """R@1/5/10 in both directions, clean and under each ``(name, attack)`` of ``suite``.

    ``size``, ``interpolation``, ``resize_mode``: load-time resizing (see :class:`RetrievalTask`).
    ``n_examples`` first gallery images (and each one's first caption) are kept per run in
    ``examples``. ``on_progress(run name, runs done, runs total)`` after each run.
    """
    chosen = gallery_indices(len(dataset), n_images, seed)
    gallery = dataset.subset(chosen)
    task = RetrievalTask(model, gallery, batch_size, size, interpolation, resize_mode)
    runs: list[tuple[str, Attack | None]] = [("clean", None), *suite]
    first_caption = [int(j) for j in _first_captions(gallery.caption_image, min(n_examples, len(gallery)))]

    outcomes, captions, examples = {}, {}, {}
    clean: AttackOutcome | None = None
    for r, (name, attack) in enumerate(runs):
        torch.manual_seed(attack_seed(seed, name))
        shown: dict[str, torch.Tensor] = {}

        def keep_examples(idx: torch.Tensor, x: torch.Tensor, adv: torch.Tensor, shown=shown) -> None:
            if int(idx[0]) == 0:  # a new pass over the gallery (joint mode makes several): keep the last
                shown.clear()
            want = idx < n_examples
            if want.any():
                shown.setdefault("images", []).append(x[want].cpu())
                shown.setdefault("adversarial", []).append(adv[want].detach().cpu())

        task.on_batch = keep_examples if n_examples else None
        if attack is None:
            clean = AttackOutcome(task.image_emb(), task.text_emb(gallery.captions))
            result = clean
        else:
            result = run_retrieval_attack(attack, task, clean)
        outcomes[name] = retrieval_outcomes(result.image_emb, result.text_emb, gallery.caption_image)
        if result.captions is not None:
            captions[name] = result.captions
        if n_examples:
            examples[name] = _examples(gallery, shown, first_caption, result.captions)
        if on_progress is not None:
            on_progress(name, r + 1, len(runs))

    metrics = {
        f"{dataset.name}.{name}.{key}": round(float(v.float().mean()), 6) for name, out in outcomes.items() for key, v in out.items()
    }
    threat = {name: (a.threat_model() if a is not None else {"attack": "none"}) for name, a in runs}
    return RetrievalResult(metrics, outcomes, threat, len(gallery), gallery.n_captions, chosen, captions, examples)


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
