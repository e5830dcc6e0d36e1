"""Built-in dataset sources: Fashion-MNIST (offline default) and the paper's torchvision sets.

Class names and prompt templates come from clip-benchmark's shipped lists where it has them (the
field's own), and from the authors' single templates otherwise.
"""

from __future__ import annotations

import gzip
import json
import shutil
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from mmcoa.data.registry import DataError, DatasetSource, register_dataset

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = [
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
]


@lru_cache(maxsize=None)
def _clip_benchmark(kind: str) -> dict:
    """clip-benchmark's shipped ``en_classnames`` / ``en_zeroshot_classification_templates``."""
    try:
        ref = resources.files("clip_benchmark") / "datasets" / f"en_{kind}.json"
        return json.loads(ref.read_text())
    except (ModuleNotFoundError, FileNotFoundError):
        return {}


def _templates(key: str, fallback: tuple[str, ...]) -> tuple[str, ...]:
    found = _clip_benchmark("zeroshot_classification_templates").get(key)
    return tuple(found) if found else fallback


def _to_uint8_nchw(array: np.ndarray) -> torch.Tensor:
    t = torch.as_tensor(np.ascontiguousarray(array))
    if t.ndim == 3:  # [N, H, W] grayscale
        t = t.unsqueeze(1)
    elif t.ndim == 4 and t.shape[-1] in (1, 3):  # [N, H, W, C]
        t = t.permute(0, 3, 1, 2)
    return t.contiguous().to(torch.uint8)


# --- Fashion-MNIST ---------------------------------------------------------------------------

FASHION_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")


def ensure_fashion_mnist(root: Path, download: bool) -> Path:
    """Make torchvision's ``<root>/FashionMNIST/raw`` exist: from Debian's package, or a download."""
    raw = root / "FashionMNIST" / "raw"
    if all((raw / f).is_file() for f in FASHION_MNIST_FILES):
        return raw
    if all((DEBIAN_FASHION_MNIST / f"{f}.gz").is_file() for f in FASHION_MNIST_FILES):
        raw.mkdir(parents=True, exist_ok=True)
        for f in FASHION_MNIST_FILES:
            tmp = raw / f"{f}.tmp"
            with gzip.open(DEBIAN_FASHION_MNIST / f"{f}.gz", "rb") as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
            tmp.replace(raw / f)
        return raw
    if download:
        from torchvision.datasets import FashionMNIST

        FashionMNIST(str(root), train=True, download=True)
        FashionMNIST(str(root), train=False, download=True)
        return raw
    raise DataError(
        f"Fashion-MNIST not found in {raw} nor {DEBIAN_FASHION_MNIST}. Install it with "
        "`apt-get install dataset-fashion-mnist`, or set data.download: true to let torchvision fetch it."
    )


def _load_fashion_mnist(root: Path, split: str, download: bool):
    from torchvision.datasets import FashionMNIST

    ensure_fashion_mnist(root, download)
    ds = FashionMNIST(str(root), train=split == "train", download=False)
    return _to_uint8_nchw(ds.data.numpy()), ds.targets.to(torch.int64), FASHION_CLASSES


@register_dataset("fashion_mnist")
def fashion_mnist() -> DatasetSource:
    # Fashion-MNIST images are 28 px grayscale product photos; the template says so, which also gives
    # a text attack more than one content word to work on ("photo" alone otherwise).
    return DatasetSource("fashion_mnist", FASHION_CLASSES, ("a low resolution grayscale photo of a {c}.",), _load_fashion_mnist)


# --- torchvision classification sets (paper profile) ------------------------------------------


def _torchvision_loader(cls_name: str, split_kw: dict[str, dict]):
    """A loader for a torchvision dataset class whose items are (PIL image, int label)."""

    def load(root: Path, split: str, download: bool):
        import torchvision.datasets as tvd
        from torchvision.transforms.functional import pil_to_tensor

        cls = getattr(tvd, cls_name)
        try:
            ds = cls(str(root), download=download, **split_kw[split])
        except RuntimeError as err:
            raise DataError(
                f"{cls_name} not found under {root} ({err}); set data.download: true (needs network) "
                "or data.root to a folder holding torchvision's layout"
            ) from None
        data = getattr(ds, "data", None)
        targets = getattr(ds, "targets", None) if hasattr(ds, "targets") else getattr(ds, "labels", None)
        names = tuple(c.replace("_", " ") for c in getattr(ds, "classes", ()) or ())
        if isinstance(data, np.ndarray) and targets is not None:
            return _to_uint8_nchw(data), torch.as_tensor(np.asarray(targets), dtype=torch.int64), names
        images, labels = [], []
        for img, label in ds:  # variable-size images: kept as a list, resized by `prepare`
            images.append(pil_to_tensor(img.convert("RGB")))
            labels.append(int(label))
        sizes = {tuple(i.shape) for i in images}
        stacked = torch.stack(images) if len(sizes) == 1 else images  # `prepare` resizes a list
        return stacked, torch.tensor(labels, dtype=torch.int64), names

    return load


def _tv_classnames(cls_name: str, root_hint: str | None = None) -> tuple[str, ...]:
    names = _clip_benchmark("classnames").get(root_hint or cls_name.lower())
    return tuple(names) if names else ()


def _register_torchvision(name: str, cls_name: str, split_kw: dict, classnames: tuple[str, ...], fallback_template: str):
    @register_dataset(name)
    def factory() -> DatasetSource:
        names = _tv_classnames(cls_name, name) or classnames
        return DatasetSource(name, names, _templates(name, (fallback_template,)), _torchvision_loader(cls_name, split_kw))

    return factory


CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
STL10_CLASSES = ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck")

_register_torchvision("cifar10", "CIFAR10", {"train": {"train": True}, "test": {"train": False}}, CIFAR10_CLASSES, "This is a photo of a {c}")
_register_torchvision("stl10", "STL10", {"train": {"split": "train"}, "test": {"split": "test"}}, STL10_CLASSES, "This is a photo of a {c}")


_register_torchvision("cifar100", "CIFAR100", {"train": {"train": True}, "test": {"train": False}}, (), "This is a photo of a {c}")


# --- any ImageFolder tree ------------------------------------------------------------------------


def image_folder(path: str) -> DatasetSource:
    """``PATH/{train,test}/<class>/<image>``: torchvision's ImageFolder layout (ImageNet-style)."""
    base = Path(path).expanduser()

    def load(root: Path, split: str, download: bool):
        from PIL import Image
        from torchvision.datasets import ImageFolder
        from torchvision.transforms.functional import pil_to_tensor

        folder = base / split
        if not folder.is_dir():
            raise DataError(f"{folder}: missing; an image folder dataset needs {base}/train and {base}/test")
        ds = ImageFolder(str(folder))
        images = []
        for file, _ in ds.samples:
            with Image.open(file) as img:
                images.append(pil_to_tensor(img.convert("RGB")))
        labels = torch.tensor(ds.targets, dtype=torch.int64)
        names = tuple(c.replace("_", " ") for c in ds.classes)
        same = len({tuple(i.shape) for i in images}) == 1
        return (torch.stack(images) if same else images), labels, names

    return DatasetSource(f"folder_{base.name}", (), ("a photo of a {c}.",), load)
