"""The subset of a dataset that a run uses, recorded on disk so that a pipeline reruns exactly what changed.

``write_subset`` draws a stratified, seeded subset of one split and writes ``manifest.json`` (dataset,
split, indices, content hash: see :func:`mmcoa.data.manifest`). A small subset is also cached decoded
(``images.safetensors``: uint8 images of the chosen indices, when they share one size), so the embedded
pipeline needs no raw files after ``fetch``; a large one streams from the source at every use.
``open_subset`` gives back ``(dataset, indices)`` either way, behind the same map-style interface.

Every load checks what it reads from the folder against hashes recorded at writing (see
:mod:`mmcoa.data.manifest`): the manifest's own fields (indices, class names, templates...) and the
cached tensors. A changed file raises :class:`~mmcoa.data.manifest.ContentMismatchError` naming it and
the command that writes it again. The check costs one SHA-256 pass over data already in memory (about
10 ms for the embedded default's 10,000 cached images). The source files a streamed subset reads are
not re-hashed at load (that is a full decoding pass); the manifest's ``sha256`` records them, for DVC.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from mmcoa.data import DataError, stratified_indices
from mmcoa.data.manifest import ContentMismatchError, check_record, check_tensors, seal, tensors_sha256

MANIFEST = "manifest.json"
CACHE = "images.safetensors"


class CachedSubset(torch.utils.data.Dataset):
    """Decoded images of chosen indices, addressed by their index in the source split."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, indices: list[int], meta: dict):
        self.images, self.labels = images, labels
        self.position = {i: p for p, i in enumerate(indices)}
        self.name, self.classnames, self.templates = meta["dataset"], meta["classnames"], meta["templates"]
        self.paper_template = meta.get("paper_template")
        self.targets = np.zeros(max(indices) + 1 if indices else 0, dtype=np.int64)
        self.targets[indices] = labels.numpy()

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        p = self.position[int(i)]
        return self.images[p], int(self.labels[p])

    def describe(self, i: int) -> str:
        return f"{self.name}[{int(i)}]"


def write_subset(dataset, n: int, seed: int, out_dir: str | Path, cache_max_images: int, name: str | None = None,
                 source: str | None = None) -> dict:
    """Choose ``n`` stratified samples of ``dataset`` (an ImageDataset), write manifest (+ cache).

    ``name``: what the subset is called in metric keys (default: the dataset's own name); ``source``:
    the reference it was opened by (``folder:PATH``...), to open it again (default: its name).
    """
    from safetensors.torch import save_file

    from mmcoa.data import manifest

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    indices = stratified_indices(np.asarray(dataset.targets), n, seed).tolist()
    meta = {**manifest(dataset, indices), "classnames": list(dataset.classnames), "templates": list(dataset.templates),
            "paper_template": getattr(dataset, "paper_template", None), "name": name or dataset.name,
            "source": source or dataset.name}
    if len(indices) <= cache_max_images:
        images, labels, kept = _decode(dataset, indices)
        if images is not None:
            cache = {"images": images, "labels": labels, "indices": torch.tensor(kept)}
            save_file(cache, str(out_dir / CACHE))
            meta.update(cached=True, cache_sha256=tensors_sha256(cache))
    _write_manifest(out_dir, meta)
    return meta


def _write_manifest(out_dir: Path, meta: dict) -> None:
    (out_dir / MANIFEST).write_text(json.dumps(seal(meta), indent=1, sort_keys=True, ensure_ascii=False) + "\n")


def refetch_hint(meta: dict, directory: str | Path) -> str:
    """The command that writes the subset in ``directory`` again (the fine-tuning or an evaluation one)."""
    if meta.get("split") == "train" and meta.get("task") != "retrieval":
        return f"re-run `mmcoa fetch --out {directory}` to write it again"
    name = meta.get("name") or Path(directory).name
    return f"re-run `mmcoa fetch-eval {name} --out {directory}` to write it again"


def _decode(dataset, indices: list[int]):
    """Every chosen image, or (None, None, None) when sizes differ (then the subset streams)."""
    images, labels, kept = [], [], []
    for i in indices:
        try:
            image, label = dataset[i]
        except DataError:
            continue  # counted by the loader when it streams; a cache simply leaves it out
        if images and image.shape != images[0].shape:
            return None, None, None
        images.append(image)
        labels.append(label)
        kept.append(i)
    if not images:
        return None, None, None
    return torch.stack(images).contiguous(), torch.tensor(labels, dtype=torch.int64), kept


def task_of(name: str) -> str:
    """``retrieval`` for a name the retrieval registry knows, else ``classification``."""
    from mmcoa.data.retrieval import is_retrieval_dataset

    return "retrieval" if is_retrieval_dataset(name) else "classification"


def write_retrieval_subset(dataset, n_images: int, seed: int, out_dir: str | Path, name: str | None = None,
                           source: str | None = None) -> dict:
    """Choose ``n_images`` images (with all their captions) of a retrieval set; write the manifest."""
    import hashlib

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    size = len(dataset)
    chosen = sorted(np.random.default_rng(seed).permutation(size)[: min(n_images, size)].tolist())
    h = hashlib.sha256()
    owner = dataset.caption_image.tolist()
    keep = set(chosen)
    for caption, image in zip(dataset.captions, owner):
        if image in keep:
            h.update(f"{image}\t{caption}\n".encode())
    for i in chosen:
        image, _ = dataset[i]
        h.update(image.numpy().tobytes())
    meta = {"dataset": dataset.name, "name": name or dataset.name, "source": source or dataset.name,
            "split": getattr(dataset, "split", "test"), "task": "retrieval", "indices": chosen, "n": len(chosen),
            "content_sha256": h.hexdigest()}
    _write_manifest(out_dir, meta)
    return meta


def read_manifest(directory: str | Path) -> dict:
    """The manifest of a subset folder, checked against its recorded hash (a changed one raises
    :class:`~mmcoa.data.manifest.ContentMismatchError`)."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise DataError(f"{directory}: no {MANIFEST}; run `mmcoa fetch` (or `dvc repro`) to prepare it")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not valid JSON ({err}); delete the folder and run `mmcoa fetch` again") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path}: not a manifest (a JSON object); delete the folder and run `mmcoa fetch` again")
    check_record(meta, str(path), refetch_hint(meta, directory))
    return meta


def open_subset(directory: str | Path, root: str | None = None, download: bool = False, on_corrupt: str = "skip"):
    """``(dataset, indices)`` of a subset written by :func:`write_subset`: from its cache, or streamed."""
    from safetensors.torch import load_file

    from mmcoa.data import open_dataset

    directory = Path(directory)
    meta = read_manifest(directory)
    source = meta.get("source", meta["dataset"])
    if meta.get("task") == "retrieval":
        from mmcoa.data.retrieval import open_retrieval

        dataset, kept = open_retrieval(source, meta["split"], root=root).subset(meta["indices"]), list(meta["indices"])
    elif meta.get("cached"):
        if not (directory / CACHE).is_file():
            raise ContentMismatchError(f"{directory / CACHE}: missing (the manifest records a cache); {refetch_hint(meta, directory)}")
        try:
            t = load_file(str(directory / CACHE))
        except Exception as err:  # safetensors raises its own error types for damaged files
            raise ContentMismatchError(f"{directory / CACHE}: unreadable ({err}); {refetch_hint(meta, directory)}") from None
        check_tensors(t, meta.get("cache_sha256"), str(directory / CACHE), refetch_hint(meta, directory))
        kept = t["indices"].tolist()
        dataset = CachedSubset(t["images"], t["labels"], kept, meta)
    else:
        dataset = open_dataset(source, meta["split"], root=root, download=download, on_corrupt=on_corrupt)
        kept = list(meta["indices"])
    dataset.name = meta.get("name", dataset.name)  # metric keys use the name the params gave it
    return dataset, kept


def subset_batches(dataset, indices: list[int], **loader_kw):
    """A ``batches`` function for training: lists of positions in ``indices`` -> a streaming loader."""
    from mmcoa.data import make_loader

    def batches(position_lists):
        chunks = ([indices[i] for i in positions] for positions in position_lists)
        return make_loader(dataset, chunks, **loader_kw)

    return batches
