"""The one dataset contract every source implements: a map-style torch Dataset of (uint8 image, label).

Images are decoded on access (one file at a time), never a whole split. Labels, class names and
templates are known without decoding, so subsets, manifests and classifiers need no image I/O.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from mmcoa.data.decode import DECODE_ERRORS, pil_to_uint8, read_image_file, to_rgb  # noqa: F401  (re-exported)
from mmcoa.data.errors import CorruptImageError, DataError  # noqa: F401  (re-exported)


class ImageDataset(Dataset):
    """One split of a classification dataset.

    Attributes: ``name``, ``split``, ``targets`` (np.int64 [N], known without decoding),
    ``classnames`` (list[str], index = label), ``templates`` (the field's prompt ensemble, ``{c}``
    for the class name), ``paper_template`` (the MMCoA authors' single template, or None).
    ``__getitem__(i)`` returns (uint8 tensor [C, H, W], int label) with C in {1, 3}.
    """

    name: str = ""
    split: str = ""
    classnames: list[str]
    templates: list[str]
    paper_template: str | None = None
    on_corrupt: str = "skip"  # what a loader does with an unreadable image: 'skip' (count it) or 'fail'
    targets: np.ndarray

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.image(i), int(self.targets[i])

    def image(self, i: int) -> torch.Tensor:
        """Decode image ``i``; raise :class:`CorruptImageError` naming it if it cannot be read."""
        raise NotImplementedError

    def path(self, i: int) -> str | None:
        """The file image ``i`` is read from, or None for array-backed sources."""
        return None

    def describe(self, i: int) -> str:
        """A file path or a stable id for image ``i`` (error messages, manifests)."""
        return self.path(i) or f"{self.name}/{self.split}[{i}]"

    def prompts(self, template: str | None = None) -> list[str]:
        t = template or self.templates[0]
        return [t.format(c=c) for c in self.classnames]


class FileDataset(ImageDataset):
    """Images in files, decoded one at a time; always RGB."""

    def __init__(self, name: str, split: str, paths: Sequence[str | Path], targets, classnames, templates, paper_template=None):
        self.name, self.split = name, split
        self.paths = [str(p) for p in paths]
        self.targets = np.asarray(targets, dtype=np.int64)
        self.classnames, self.templates, self.paper_template = list(classnames), list(templates), paper_template

    def image(self, i: int) -> torch.Tensor:
        return read_image_file(self.paths[i])

    def path(self, i: int) -> str:
        return self.paths[i]


class ArrayDataset(ImageDataset):
    """Images already in memory as uint8 [N, H, W] or [N, H, W, C] (small sets: digits, MNIST-like).

    The array is the source's own storage (torchvision keeps these sets in memory); nothing is copied.
    """

    def __init__(self, name: str, split: str, array: np.ndarray, targets, classnames, templates, paper_template=None):
        self.name, self.split, self.array = name, split, array
        self.targets = np.asarray(targets, dtype=np.int64)
        self.classnames, self.templates, self.paper_template = list(classnames), list(templates), paper_template

    def image(self, i: int) -> torch.Tensor:
        a = np.asarray(self.array[i])
        t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.uint8))
        return t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1).contiguous()


class Subset(ImageDataset):
    """Rows ``indices`` of another dataset (a seeded split of a source that ships none)."""

    def __init__(self, base: ImageDataset, indices: np.ndarray, split: str):
        self.base, self.indices = base, np.asarray(indices, dtype=np.int64)
        self.name, self.split = base.name, split
        self.targets = base.targets[self.indices]
        self.classnames, self.templates, self.paper_template = base.classnames, base.templates, base.paper_template

    def image(self, i: int) -> torch.Tensor:
        return self.base.image(int(self.indices[i]))

    def path(self, i: int) -> str | None:
        return self.base.path(int(self.indices[i]))

    def describe(self, i: int) -> str:
        return self.path(i) or f"{self.name}/{self.split}[{i}]"


def seeded_split(targets: np.ndarray, split: str, test_fraction: float = 0.3, seed: int = 0) -> np.ndarray:
    """Indices of ``split`` ('train' or 'test') in a deterministic stratified split of ``targets``."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(targets))
    counts = np.bincount(targets)
    stratify = targets if len(counts) and counts[counts > 0].min() >= 2 else None
    train, test = train_test_split(idx, test_size=test_fraction, stratify=stratify, random_state=seed)
    return np.sort(train if split == "train" else test)
