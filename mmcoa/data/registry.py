"""Dataset registry and the prepared format (see package docstring)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from sklearn.model_selection import train_test_split


class DataError(ValueError):
    """Missing or malformed data; the message says how to get it."""


@dataclass(frozen=True)
class DatasetSource:
    """A registered dataset.

    ``load(root, split, download)`` returns (uint8 images [N, C, H, W], int64 labels [N], class
    names as the files name them). ``classnames``, when given, override the files' names (cleaner
    prompt names, e.g. clip-benchmark's).
    ``templates`` use ``{c}`` for the class name, as clip-benchmark's lists do.
    """

    name: str
    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    load: Callable[[Path, str, bool], tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]]
    default_root: Path = field(default_factory=lambda: Path(os.environ.get("MMCOA_DATA", "~/.cache/mmcoa")).expanduser())


_REGISTRY: dict[str, Callable[[], DatasetSource]] = {}


def register_dataset(name: str):
    """Decorator: register a zero-argument factory returning a :class:`DatasetSource`."""

    def deco(factory: Callable[[], DatasetSource]):
        _REGISTRY[name] = factory
        return factory

    return deco


def list_datasets() -> list[str]:
    return sorted(_REGISTRY)


def create_source(name: str) -> DatasetSource:
    """A registered source by name; ``folder:PATH`` is an ImageFolder tree (PATH/train, PATH/test)."""
    if name.startswith("folder:"):
        from mmcoa.data.sources import image_folder

        return image_folder(name.removeprefix("folder:"))
    if name not in _REGISTRY:
        raise DataError(f"unknown dataset '{name}'; registered: {', '.join(list_datasets())}")
    return _REGISTRY[name]()


@dataclass
class PreparedDataset:
    """One split in memory: uint8 images, labels, class names and templates."""

    images: torch.Tensor
    labels: torch.Tensor
    classnames: list[str]
    templates: list[str]
    name: str

    def __len__(self) -> int:
        return len(self.labels)

    def float_images(self, idx: slice | torch.Tensor | None = None) -> torch.Tensor:
        """Images in [0, 1] (the convention everywhere outside the model)."""
        x = self.images if idx is None else self.images[idx]
        return x.float().div_(255.0)

    def prompts(self, template: str | None = None) -> list[str]:
        t = template or self.templates[0]
        return [t.format(c=c) for c in self.classnames]


def stratified_indices(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Indices of a class-balanced subset of size n, the same for the same seed."""
    idx = np.arange(len(labels))
    if n >= len(labels):
        return idx
    chosen, _ = train_test_split(idx, train_size=n, stratify=labels, random_state=seed)
    return np.sort(chosen)


def _resize(images: torch.Tensor | list[torch.Tensor], size: int | None) -> torch.Tensor:
    """CLIP-style resize: shortest side to ``size``, then a centre crop (uint8 in, uint8 out)."""
    from torchvision.transforms.functional import center_crop, resize

    if isinstance(images, torch.Tensor) and (size is None or tuple(images.shape[-2:]) == (size, size)):
        return images
    if size is None:
        raise DataError("images differ in size; set data.image_size to resize them")
    out = [center_crop(resize(img, size, antialias=True), [size, size]) for img in images]
    return torch.stack(out)


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
    """Write ``train``/``test`` subsets of a registered dataset into ``out_dir``; return meta."""
    from safetensors.torch import save_file

    source = create_source(name)
    root = Path(root).expanduser() if root else source.default_root
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"dataset": name, "classnames": list(source.classnames), "templates": list(source.templates), "splits": {}}
    staged = []
    for split, n, salt in (("train", n_train, 0), ("test", n_test, 1)):
        images, labels, file_names = source.load(root, split, download)
        if not meta["classnames"]:
            meta["classnames"] = list(file_names)
        keep = torch.from_numpy(stratified_indices(labels.numpy(), n, seed + salt))
        picked = images[keep] if isinstance(images, torch.Tensor) else [images[i] for i in keep.tolist()]
        images, labels = _resize(picked, image_size).contiguous(), labels[keep].contiguous()
        tmp = out_dir / f"{split}.safetensors.tmp"
        save_file({"images": images, "labels": labels.to(torch.int64)}, str(tmp))
        staged.append((tmp, out_dir / f"{split}.safetensors"))
        meta["splits"][split] = {"n": len(labels), "shape": list(images.shape[1:])}
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
    return PreparedDataset(tensors["images"], tensors["labels"], meta["classnames"], meta["templates"], meta["dataset"])
