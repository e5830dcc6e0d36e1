"""What a run reads from a dataset, with content hashes, so a pipeline reruns exactly what changed and a
run never uses a subset that changed after it was written.

Two kinds of hash: :func:`manifest`'s ``sha256`` covers the *source* items (file bytes or decoded images:
what DVC compares to decide whether downstream stages rerun); :func:`tensors_sha256` and
:func:`record_sha256` cover what a *load* reads from the subset's folder (the cached tensors, the
manifest's own fields), so it can be checked at every load for the cost of one hash of data in memory,
without touching the source.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Mapping, Sequence

import numpy as np
import torch

from mmcoa.data.base import DataError, ImageDataset

RECORD_KEY = "record_sha256"


class ContentMismatchError(DataError):
    """A prepared file whose content is not what was recorded when it was written (edited, replaced or
    damaged since); the message names the file and how to write it again."""

CHUNK = 1 << 20


def _hash_file(h, path: str) -> None:
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)


def manifest(dataset: ImageDataset, indices: Sequence[int] | np.ndarray) -> dict:
    """A JSON-ready record of ``indices`` of ``dataset``: name, split, count, the indices (or file names
    relative to their common folder, for file-based sources), class names, and a SHA-256 over every used item's label and content.

    Content is the file's bytes where the image is a file (streamed in 1 MiB chunks, never decoded),
    else the decoded uint8 image; the order of ``indices`` is part of the hash.
    """
    idx = [int(i) for i in np.asarray(indices).reshape(-1)]
    h = hashlib.sha256()
    h.update("\n".join(dataset.classnames).encode("utf-8"))
    paths = [dataset.path(i) for i in idx]
    for i, path in zip(idx, paths):
        h.update(f"\n{int(dataset.targets[i])}:".encode())
        if path is not None:
            _hash_file(h, path)
        else:
            img = dataset.image(i)
            h.update(str(tuple(img.shape)).encode())
            h.update(img.contiguous().numpy().tobytes())
    record = {
        "dataset": dataset.name,
        "split": dataset.split,
        "n": len(idx),
        "classnames": list(dataset.classnames),
        "sha256": h.hexdigest(),
        "indices": idx,
    }
    if paths and all(p is not None for p in paths):
        # Relative to the files' common folder: the record does not depend on where the data lives.
        base = os.path.commonpath([os.path.dirname(p) for p in paths])
        record["files"] = [os.path.relpath(p, base) for p in paths]
    return record


def tensors_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over named tensors (in name order: name, dtype, shape, bytes), whatever file holds them."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
        h.update(t.numpy().data if t.numel() else b"")
    return h.hexdigest()


def record_sha256(record: Mapping) -> str:
    """SHA-256 of a manifest's fields (canonical JSON), all but :data:`RECORD_KEY` itself."""
    fields = {k: v for k, v in record.items() if k != RECORD_KEY}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()).hexdigest()


def seal(record: dict) -> dict:
    """``record`` with its :data:`RECORD_KEY` set (call it last: any later change breaks the seal)."""
    record[RECORD_KEY] = record_sha256(record)
    return record


def check_record(record: Mapping, where: str, fix: str) -> None:
    """Raise :class:`ContentMismatchError` unless ``record`` (read from ``where``) is as it was sealed."""
    recorded = record.get(RECORD_KEY)
    if recorded is None:
        raise ContentMismatchError(f"{where}: records no content hash (written by an older mmcoa); {fix}")
    if recorded != record_sha256(record):
        raise ContentMismatchError(f"{where}: changed since it was written (its content hash does not match); {fix}")


def check_tensors(tensors: Mapping[str, torch.Tensor], recorded: str | None, where: str, fix: str) -> None:
    """Raise :class:`ContentMismatchError` unless ``tensors`` (read from ``where``) hash to ``recorded``."""
    if recorded is None:
        raise ContentMismatchError(f"{where}: its manifest records no hash of it (written by an older mmcoa); {fix}")
    if tensors_sha256(tensors) != recorded:
        raise ContentMismatchError(f"{where}: changed since it was written (its content hash does not match the manifest's); {fix}")
