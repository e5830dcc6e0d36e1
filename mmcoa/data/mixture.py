"""A captioned mixture of datasets, for contrastive pre-training from scratch.

Every image gets a *caption group*: the prompts of its class for a classification set (one group per
class), its own captions for a retrieval set (one group per image). The label of an item is the index of
its group in the mixture, so same-group pairs of a batch can count as positives, and a training step
draws one caption of each group at random.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Part:
    """One dataset of the mixture: the items it contributes and the caption group of each."""

    dataset: torch.utils.data.Dataset
    indices: list[int]
    group_of: list[int]  # per item of ``indices``: its group, local to this part
    groups: list[list[str]]


def classification_part(dataset, n: int, seed: int, templates: list[str] | None = None) -> Part:
    """``n`` items (repeated when the set is smaller) of a classification set; a group per class."""
    targets = np.asarray(dataset.targets)
    indices = _draw(len(targets), n, seed)
    templates = templates or list(dataset.templates)
    groups = [[t.format(c=c) for t in templates] for c in dataset.classnames]
    return Part(dataset, indices, targets[indices].tolist(), groups)


def retrieval_part(dataset, n: int, seed: int) -> Part:
    """``n`` items of a retrieval set (a ``RetrievalDataset``); an image's captions are its group.

    Images with the very same captions share one group (they show the same thing), so a contrastive
    loss with same-group positives does not push them apart.
    """
    indices = _draw(len(dataset), n, seed)
    per_image: list[list[str]] = [[] for _ in range(len(dataset))]
    for caption, image in zip(dataset.captions, dataset.caption_image.tolist()):
        per_image[image].append(caption)
    group_ids: dict[tuple[str, ...], int] = {}
    group_of_image = [group_ids.setdefault(tuple(c), len(group_ids)) for c in per_image]
    groups = [list(c) for c in group_ids]
    return Part(dataset, indices, [group_of_image[i] for i in indices], groups)


def _draw(size: int, n: int, seed: int) -> list[int]:
    """A seeded permutation of ``range(size)``, tiled to length ``n``."""
    rng = np.random.default_rng(seed)
    reps = -(-n // size)
    return np.concatenate([rng.permutation(size) for _ in range(reps)])[:n].tolist()


class CaptionedMixture(torch.utils.data.Dataset):
    """Items of several parts; ``__getitem__(i) -> (uint8 image [3, H, W], group id)``.

    ``groups[g]`` holds the captions of group ``g``; ``targets`` the group of every item.
    Single-channel images are repeated to three channels so that items of different sets stack.
    """

    def __init__(self, parts: list[Part]):
        self.items: list[tuple[int, int]] = []
        self.groups: list[list[str]] = []
        targets = []
        for p, part in enumerate(parts):
            offset = len(self.groups)
            self.groups.extend(part.groups)
            self.items.extend((p, i) for i in part.indices)
            targets.extend(offset + g for g in part.group_of)
        self.parts = parts
        self.targets = np.asarray(targets, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        p, j = self.items[int(i)]
        image, _ = self.parts[p].dataset[j]
        if image.shape[0] == 1:
            image = image.expand(3, -1, -1)
        return image.contiguous(), int(self.targets[int(i)])

    def describe(self, i: int) -> str:
        p, j = self.items[int(i)]
        ds = self.parts[p].dataset
        return ds.describe(j) if hasattr(ds, "describe") else f"{getattr(ds, 'name', p)}[{j}]"


def pretraining_mixture(sizes: dict[str, int], seed: int, root: str | None = None,
                        download: bool = False) -> CaptionedMixture:
    """The train splits of the datasets of ``sizes`` (classification or retrieval sets), n items each."""
    from mmcoa.data import open_dataset
    from mmcoa.data.retrieval import is_retrieval_dataset, open_retrieval

    parts = []
    for k, (name, n) in enumerate(sizes.items()):
        if is_retrieval_dataset(name):
            parts.append(retrieval_part(open_retrieval(name, "train", root=root), n, seed + k))
        else:
            parts.append(classification_part(open_dataset(name, "train", root=root, download=download), n, seed + k))
    return CaptionedMixture(parts)
