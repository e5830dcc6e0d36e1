"""Streaming batches from an :class:`ImageDataset`: decode, resize and convert in the loader's workers.

The caller decides what is read and in which order by passing the batches (lists of indices): fixed
evaluation batches, a per-step seeded training sampler, or one rank's shard. Nothing else is read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from mmcoa.data.base import ImageDataset
from mmcoa.data.errors import CorruptImageError, DataError
from mmcoa.data.registry import ON_CORRUPT
from mmcoa.data.transforms import check_resize, resize_floats, to_float


@dataclass
class LoaderStats:
    """What a pass skipped: unreadable images, by file (or id)."""

    skipped: int = 0
    skipped_files: list[str] = field(default_factory=list)
    yielded: int = 0


class _Reader(Dataset):
    """Reads one sample in a worker: (uint8 image or None, label, index, where, error)."""

    def __init__(self, dataset: ImageDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        i = int(i)
        try:
            img, label = self.dataset[i]
        except CorruptImageError as err:
            return None, -1, i, err.where, str(err)
        return img, int(label), i, None, None


@dataclass
class _Batch:
    images: torch.Tensor | None
    labels: torch.Tensor
    indices: torch.Tensor
    bad: list[tuple[str, str]]
    error: tuple | None = None  # (position, first shape, other shape) when sizes differ

    def pin_memory(self):  # called by DataLoader's pinning thread
        if self.images is not None:
            self.images = self.images.pin_memory()
        return self


class _Collate:
    """In the worker: resize the readable samples of one batch, stack them as float [0, 1], list the rest."""

    def __init__(self, size: int | None, interpolation: str, resize_mode: str):
        self.size, self.interpolation, self.resize_mode = size, interpolation, resize_mode

    def __call__(self, samples: list[tuple]) -> _Batch:
        ok = [s for s in samples if s[0] is not None]
        bad = [(s[3], s[4]) for s in samples if s[0] is None]
        labels = torch.tensor([s[1] for s in ok], dtype=torch.int64)
        indices = torch.tensor([s[2] for s in ok], dtype=torch.int64)
        if not ok:
            return _Batch(None, labels, indices, bad)
        shapes = [tuple(s[0].shape) if self.size is None else tuple(s[0].shape[:1]) for s in ok]
        if len(set(shapes)) > 1:
            odd = next(k for k, sh in enumerate(shapes) if sh != shapes[0])
            return _Batch(None, labels, indices, bad, error=(odd, tuple(ok[0][0].shape), tuple(ok[odd][0].shape)))
        images = [s[0] for s in ok]
        if self.size is None:
            return _Batch(to_float(torch.stack(images)), labels, indices, bad)
        # resized in float, not rounded to 8 bits: the pixels the model's own resize makes of these images
        return _Batch(resize_floats(images, self.size, self.interpolation, self.resize_mode), labels, indices, bad)


class StreamLoader:
    """Iterates (images float [B, C, S, S] in [0, 1], labels int64 [B], indices int64 [B]) batches.

    Unreadable images are dropped from their batch and counted in ``stats`` (``on_corrupt='skip'``),
    or stop the pass with a :class:`DataError` naming the file (``'fail'``). A batch left empty by
    skipping is not yielded.
    """

    def __init__(self, dataset: ImageDataset, loader: DataLoader, on_corrupt: str):
        self.dataset, self._loader, self.on_corrupt = dataset, loader, on_corrupt
        self.stats = LoaderStats()

    @property
    def skipped(self) -> int:
        return self.stats.skipped

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for batch in self._loader:
            for where, message in batch.bad:
                if self.on_corrupt == "fail":
                    raise DataError(message)
                self.stats.skipped += 1
                self.stats.skipped_files.append(where)
            if batch.error is not None:
                odd, first, other = batch.error
                a, b = self.dataset.describe(int(batch.indices[odd])), self.dataset.describe(int(batch.indices[0]))
                if other[0] != first[0]:
                    raise DataError(f"{a}: {other[0]} channel(s), but {b} in the same batch has {first[0]}; a batch needs one colour mode")
                raise DataError(
                    f"{a}: image of size {other[-2]}x{other[-1]}, but {b} in the same batch is {first[-2]}x{first[-1]}; "
                    "set a size to resize them (make_loader size=..., or data.resolution: model)"
                )
            if batch.images is None:
                continue
            self.stats.yielded += len(batch.labels)
            yield batch.images, batch.labels, batch.indices


def make_loader(
    dataset: ImageDataset,
    batches: Iterable[Sequence[int]],
    *,
    size: int | None = None,
    interpolation: str = "bicubic",
    resize_mode: str = "shortest",
    num_workers: int = 0,
    pin_memory: bool = False,
    seed: int = 0,
) -> StreamLoader:
    """A loader over exactly ``batches`` (an iterable of index lists) of ``dataset``.

    ``size=None`` keeps native resolution (a batch's images must then share a size); an int resizes
    each image as CLIP does (``resize_mode='shortest'``: shortest side to ``size`` with
    ``interpolation``, antialiased, then a centre crop) in the workers, with the same function a
    :class:`~mmcoa.models.ClipModel` resizes with (:func:`mmcoa.data.transforms.resize`), in float, so a
    model sees the same pixels whether the loader or the model resizes. What happens to unreadable
    images follows ``dataset.on_corrupt`` (set by ``open_dataset``; 'skip' by default).
    """
    check_resize(interpolation, resize_mode)
    if size is not None and size < 1:
        raise DataError(f"size: {size}; use a positive image size or None for native resolution")
    on_corrupt = getattr(dataset, "on_corrupt", "skip")
    if on_corrupt not in ON_CORRUPT:
        raise DataError(f"on_corrupt: '{on_corrupt}' is not one of {', '.join(ON_CORRUPT)}")
    loader = DataLoader(
        _Reader(dataset),
        batch_sampler=batches,
        num_workers=num_workers,
        collate_fn=_Collate(size, interpolation, resize_mode),
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(seed),
    )
    return StreamLoader(dataset, loader, on_corrupt)
