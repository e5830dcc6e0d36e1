"""``fmnist_pairs``: a SYNTHETIC image-text retrieval set built from real Fashion-MNIST images.

No captioned photographs exist offline, so this set composes them: each image is a 56 x 56
grayscale canvas holding one or two real Fashion-MNIST items (28 px each), and its captions name the
items, their positions and their count:

* two different items side by side ("a bag left of a sneaker", "a sneaker pictured right of a bag") or
  one above the other ("a bag above a sneaker");
* two items of the same class side by side or stacked ("two bags side by side");
* one item alone, scaled to fill the canvas ("photo of a single bag").

That is 90 + 90 + 10 + 10 + 10 = 210 compositions, each with 4 paraphrased captions; every caption
describes exactly one composition, and a gallery holds each composition once, so each caption has
exactly one matching gallery image. A model of 28 px input sees the canvas at half size (an item of a
pair is ~14 px, two 7-px patches wide).

What it can show: whether a model binds class names to positions and counts, how recall of both
directions (R@1/5/10) falls under image, text and multimodal attacks, and whether a text attack keeps
the label-carrying words (``protected``: class names and their plurals, position and count words)
unedited. What it cannot show: anything about natural photographs or free-form captions (Flickr30k,
MSCOCO); its vocabulary is tiny and its captions are templated, so absolute recall numbers are not
comparable to the field's.

The ``train`` split composes Fashion-MNIST train images, ``test`` the test images. Registered, ``test``
is the 210-image gallery and ``train`` shows each composition 20 times with other items (4,200
images; images of one composition share their captions, so a contrastive loss should count them as
positives, keyed by ``Scene.composition``). :func:`synthetic_pairs` draws any number of images
(compositions cycle in a seeded order, items are drawn at random from their class).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from mmcoa.data.registry import DataError
from mmcoa.data.retrieval import RetrievalDataset, default_root, register_retrieval
from mmcoa.data.sources import FASHION_CLASSES, ensure_fashion_mnist

ITEM = 28
CANVAS = 2 * ITEM

PLURALS = {"dress": "dresses", "ankle boot": "ankle boots"}

# Caption templates per layout: {a}/{b} are "a bag"-style phrases (article included), {na} a bare
# class name, {pl} its plural. First item = left (horizontal) or top (vertical).
TEMPLATES: dict[str, tuple[str, ...]] = {
    "horizontal": (
        "photo of {a} left of {b}",
        "{B} pictured right of {a}",
        "image: {na} left, {nb} right",
        "{A} and {b} shown left to right",
    ),
    "vertical": (
        "photo of {a} above {b}",
        "{B} pictured below {a}",
        "image: {na} top, {nb} bottom",
        "{A} and {b} shown top to bottom",
    ),
    "pair_horizontal": (
        "photo of two {pl} side by side",
        "two {pl} pictured left and right",
        "image: {a} beside another {na}",
        "two {pl}, shown left to right",
    ),
    "pair_vertical": (
        "photo of two {pl} one above the other",
        "two {pl} pictured top and bottom",
        "image: {a} stacked on another {na}",
        "two {pl}, shown top to bottom",
    ),
    "single": (
        "photo of a single {na}",
        "one {na} pictured alone",
        "image: just one {na}",
        "{A} shown on its own",
    ),
}

# Words that carry the label of a caption (which gallery image it describes): a text attack must not
# edit them, nor substitute one for another.
LAYOUT_WORDS = frozenset(
    "left right top bottom above below beside side stacked two one single alone another own pair".split()
)


@dataclass(frozen=True)
class Composition:
    """Which classes sit where: ``first`` is left/top, ``second`` right/bottom (None when single)."""

    layout: str
    first: int
    second: int | None = None


def _compositions() -> tuple[Composition, ...]:
    n = len(FASHION_CLASSES)
    out = [Composition(lay, a, b) for lay in ("horizontal", "vertical") for a in range(n) for b in range(n) if a != b]
    out += [Composition(lay, a, a) for lay in ("pair_horizontal", "pair_vertical") for a in range(n)]
    out += [Composition("single", a) for a in range(n)]
    return tuple(out)


COMPOSITIONS = _compositions()


def _article(name: str) -> str:
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def captions_for(comp: Composition) -> list[str]:
    """The paraphrased captions of one composition."""
    na = FASHION_CLASSES[comp.first]
    nb = FASHION_CLASSES[comp.second] if comp.second is not None else na
    words = {"a": _article(na), "b": _article(nb), "na": na, "nb": nb, "pl": PLURALS.get(na, na + "s")}
    words["A"], words["B"] = words["a"].capitalize(), words["b"].capitalize()
    return [t.format(**words) for t in TEMPLATES[comp.layout]]


def protected_words() -> set[str]:
    """Class names, their words and plurals, and the position / count words."""
    out = set(LAYOUT_WORDS)
    for name in FASHION_CLASSES:
        for form in (name, PLURALS.get(name, name + "s")):
            out.add(form)
            out.update(form.split())
            out.update(p for w in form.split() for p in w.split("-") if len(p) >= 3)
    return out


@dataclass(frozen=True, eq=False)
class Scene:
    """One gallery image: its composition and the Fashion-MNIST items (uint8 [28, 28]) it shows."""

    composition: Composition
    items: tuple[torch.Tensor, ...]

    def __repr__(self) -> str:
        return f"Scene({self.composition})"


def render(scene: Scene) -> torch.Tensor:
    """A scene -> uint8 [1, 56, 56]: items as large as the layout allows, on a black canvas."""
    from torchvision.transforms.functional import InterpolationMode, resize

    canvas = torch.zeros(1, CANVAS, CANVAS, dtype=torch.uint8)
    layout, items = scene.composition.layout, scene.items
    if layout == "single":
        big = resize(items[0][None], [CANVAS, CANVAS], interpolation=InterpolationMode.BICUBIC, antialias=True)
        return big.to(torch.uint8)
    mid = (CANVAS - ITEM) // 2
    if layout in ("horizontal", "pair_horizontal"):
        canvas[0, mid : mid + ITEM, :ITEM] = items[0]
        canvas[0, mid : mid + ITEM, ITEM:] = items[1]
    else:
        canvas[0, :ITEM, mid : mid + ITEM] = items[0]
        canvas[0, ITEM:, mid : mid + ITEM] = items[1]
    return canvas


@lru_cache(maxsize=2)
def _fashion_mnist(root: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    from torchvision.datasets import FashionMNIST

    ensure_fashion_mnist(Path(root), download=False)
    ds = FashionMNIST(root, train=split == "train", download=False)
    return ds.data, ds.targets


def synthetic_pairs(split: str, n_images: int = len(COMPOSITIONS), seed: int = 0, root: str | Path | None = None) -> RetrievalDataset:
    """``n_images`` composed images of ``split`` (``train`` | ``test``) with their captions.

    Compositions come in a seeded random order, each once per cycle of 210; with ``n_images <= 210``
    every composition appears at most once (each caption matches exactly one image). Items are drawn
    at random from the split's images of their class.
    """
    if split not in ("train", "test"):
        raise DataError(f"fmnist_pairs: unknown split '{split}'; use train or test")
    if n_images < 1:
        raise DataError(f"fmnist_pairs: n_images must be >= 1, got {n_images}")
    root = Path(root).expanduser() if root else default_root()
    images, labels = _fashion_mnist(str(root), split)
    by_class = [torch.nonzero(labels == c).flatten().numpy() for c in range(len(FASHION_CLASSES))]
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    n = len(COMPOSITIONS)
    order = np.concatenate([rng.permutation(n) for _ in range(-(-n_images // n))])[:n_images]
    scenes, captions, owner = [], [], []
    for i, c in enumerate(order.tolist()):
        comp = COMPOSITIONS[c]
        classes = [comp.first] if comp.second is None else [comp.first, comp.second]
        picks = [int(rng.choice(by_class[k])) for k in classes]
        scenes.append(Scene(comp, tuple(images[p] for p in picks)))
        caps = captions_for(comp)
        captions.extend(caps)
        owner.extend([i] * len(caps))
    return RetrievalDataset("fmnist_pairs", scenes, captions, owner, protected_words(), read=render, split=split)


# The registered train split shows each composition this many times (different items each time), for
# pre-training variety; the test split shows each once, so every caption has one matching image.
TRAIN_CYCLES = 20


@register_retrieval("fmnist_pairs")
def _open_fmnist_pairs(split: str, root: Path | None) -> RetrievalDataset:
    cycles = TRAIN_CYCLES if split == "train" else 1
    return synthetic_pairs(split, cycles * len(COMPOSITIONS), seed=0, root=root)
