"""The prepared format: a small, stratified, seeded subset of a dataset cached as safetensors.

``prepare`` writes ``{split}.safetensors`` (uint8 images [N, C, H, W], int64 labels) plus
``meta.json`` (with a hash of each split's tensors); it decodes only the chosen images, one at a time.
``load_prepared`` reads one split back as a :class:`PreparedDataset`, itself an :class:`ImageDataset`,
after checking its tensors against the recorded hash.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from mmcoa.data.base import DataError, ImageDataset
from mmcoa.data.manifest import check_tensors, tensors_sha256


class PreparedDataset(ImageDataset):
    """One prepared split in memory: uint8 images, labels, class names and templates."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classnames, templates, name: str, split: str = "", paper_template=None):
        self.images, self.labels = images, labels
        self.classnames, self.templates, self.name, self.split = list(classnames), list(templates), name, split
        self.paper_template = paper_template

    @property
    def targets(self) -> np.ndarray:
        return self.labels.numpy().astype(np.int64, copy=False)

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, i: int) -> torch.Tensor:
        return self.images[i]

    def float_images(self, idx: slice | torch.Tensor | None = None) -> torch.Tensor:
        """Images in [0, 1] (the convention everywhere outside the model)."""
        x = self.images if idx is None else self.images[idx]
        return x.float().div_(255.0)


def stratified_indices(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Indices of a class-balanced subset of size n, the same for the same seed."""
    idx = np.arange(len(labels))
    if n >= len(labels):
        return idx
    from sklearn.model_selection import train_test_split  # imported here: a second of start-up otherwise

    chosen, _ = train_test_split(idx, train_size=n, stratify=labels, random_state=seed)
    return np.sort(chosen)


def _stack(images: list[torch.Tensor], size: int | None, where: str) -> torch.Tensor:
    """Stack uint8 images; with ``size``, CLIP-style resize (shortest side, centre crop) first."""
    from mmcoa.data.transforms import resize_image

    if size is not None:
        images = [resize_image(img, size, "bilinear") for img in images]  # as prepare always has
    if len({tuple(i.shape) for i in images}) > 1:
        raise DataError(f"{where}: images differ in size; set an image_size to resize them")
    return torch.stack(images) if images else torch.zeros(0, 3, size or 1, size or 1, dtype=torch.uint8)


def prepare(
    name: str,
    out_dir: str | Path,
    n_train: int,
    n_test: int,
    seed: int,
    root: str | Path | None = None,
    download: bool = False,
    image_size: int | None = None,
) -> dict:
    """Write ``train``/``test`` subsets of a dataset into ``out_dir``; return meta. Nothing is left half-written."""
    from safetensors.torch import save_file

    from mmcoa.data.registry import open_dataset

    out_dir = Path(out_dir)
    staged, meta = [], {"dataset": name, "splits": {}}
    for split, n, salt in (("train", n_train, 0), ("test", n_test, 1)):
        ds = open_dataset(name, split, root, download, on_corrupt="fail")
        meta.update(dataset=ds.name, classnames=list(ds.classnames), templates=list(ds.templates))
        keep = stratified_indices(ds.targets, n, seed + salt)
        images = _stack([ds.image(int(i)) for i in keep], image_size, ds.name).contiguous()
        labels = torch.from_numpy(ds.targets[keep].astype(np.int64))
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = out_dir / f"{split}.safetensors.tmp"
        tensors = {"images": images, "labels": labels.contiguous()}
        save_file(tensors, str(tmp))
        staged.append((tmp, out_dir / f"{split}.safetensors"))
        meta["splits"][split] = {"n": len(labels), "shape": list(images.shape[1:]), "sha256": tensors_sha256(tensors)}
    for tmp, final in staged:
        os.replace(tmp, final)
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return meta


def load_prepared(directory: str | Path, split: str) -> PreparedDataset:
    """Read one split written by :func:`prepare`."""
    from safetensors.torch import load_file

    directory = Path(directory)
    meta_path, data_path = directory / "meta.json", directory / f"{split}.safetensors"
    if not meta_path.is_file() or not data_path.is_file():
        raise DataError(f"{directory}: no prepared '{split}' split; run `mmcoa fetch` first")
    meta = json.loads(meta_path.read_text())
    tensors = load_file(str(data_path))
    recorded = meta.get("splits", {}).get(split, {}).get("sha256")
    check_tensors(tensors, recorded, str(data_path), f"prepare {directory} again (mmcoa.data.prepare)")
    return PreparedDataset(tensors["images"], tensors["labels"], meta["classnames"], meta["templates"], meta["dataset"], split)
