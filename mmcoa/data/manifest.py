"""What a run reads from a dataset, with a content hash, so a pipeline reruns exactly what changed."""

from __future__ import annotations

import hashlib
import os
from typing import Sequence

import numpy as np

from mmcoa.data.base import ImageDataset

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
