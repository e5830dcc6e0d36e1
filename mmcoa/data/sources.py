"""The registered datasets: the paper's zero-shot classification sets, Fashion-MNIST and digits.

Each reads its files with torchvision's own loader where one exists (download only when asked) and
streams images from them. Class names and templates are clip-benchmark's shipped lists where it has
them (the field's own), else the loader's class list cleaned; ``paper_template`` is the authors'.
Sets that ship no split (Caltech-101/256, EuroSAT, SUN397) get a seeded stratified 70/30 split.
"""

from __future__ import annotations

import gzip
import shutil
import socket
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from mmcoa.data.base import ArrayDataset, FileDataset, ImageDataset, Subset, seeded_split
from mmcoa.data.classnames import caltech256_name, clean_name, field_classnames, field_templates, imagenet_names, paper_template
from mmcoa.data.decode import DECODE_ERRORS, pil_to_uint8
from mmcoa.data.errors import CorruptImageError, DataError
from mmcoa.data.local import class_folders, scan_image_folder
from mmcoa.data.registry import DatasetSpec, register_dataset

# --- Fashion-MNIST (the offline default) --------------------------------------------------------

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = [
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
]
FASHION_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
# 28 px grayscale product photos; the template says so, which also gives a text attack more than one
# content word to work on ("photo" alone otherwise).
FASHION_TEMPLATE = "a low resolution grayscale photo of a {c}."


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

        with download_errors("fashion_mnist", raw, f"the files {', '.join(FASHION_MNIST_FILES)}"):
            FashionMNIST(str(root), train=True, download=True)
            FashionMNIST(str(root), train=False, download=True)
        return raw
    raise DataError(FASHION_OBTAIN.format(raw=raw))


FASHION_OBTAIN = (
    "Fashion-MNIST not found in {raw} nor " + str(DEBIAN_FASHION_MNIST) + ". Install it with "
    "`apt-get install dataset-fashion-mnist`, or set data.download: true to let torchvision fetch it."
)


@register_dataset("fashion_mnist")
def fashion_mnist() -> DatasetSpec:
    def open_split(root: Path, split: str, download: bool) -> ImageDataset:
        from torchvision.datasets import FashionMNIST

        ensure_fashion_mnist(root, download)
        ds = FashionMNIST(str(root), train=split == "train", download=False)
        return ArrayDataset("fashion_mnist", split, ds.data.numpy(), ds.targets.numpy(), FASHION_CLASSES, [FASHION_TEMPLATE], paper_template("fashion_mnist"))

    debian = all((DEBIAN_FASHION_MNIST / f"{f}.gz").is_file() for f in FASHION_MNIST_FILES)
    return DatasetSpec(
        "fashion_mnist",
        open_split,
        folder=lambda root: root / "FashionMNIST" / "raw",
        obtain=f"`apt-get install dataset-fashion-mnist` (files in {DEBIAN_FASHION_MNIST}), or download: true (needs network)",
        num_classes=10,
        downloadable=True,
        classnames=FASHION_CLASSES,
        offline=debian,
    )


# --- digits: scikit-learn's 1,797 handwritten 8x8 digits, shipped offline -------------------------


@register_dataset("digits")
def digits() -> DatasetSpec:
    def open_split(root: Path, split: str, download: bool) -> ImageDataset:
        from sklearn.datasets import load_digits

        d = load_digits()
        images = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)  # 0..16 ink levels -> 0..255
        keep = seeded_split(d.target.astype(np.int64), split)
        names = field_classnames("mnist") or [str(i) for i in range(10)]
        return ArrayDataset("digits", split, images[keep], d.target[keep], names, field_templates("mnist", paper_template("digits")), paper_template("digits"))

    return DatasetSpec(
        "digits",
        open_split,
        folder=lambda root: Path("sklearn.datasets.load_digits"),
        obtain="ships with scikit-learn",
        num_classes=10,
        classnames=tuple(field_classnames("mnist") or [str(i) for i in range(10)]),
        offline=True,
    )


# --- torchvision's classification sets ----------------------------------------------------------


def _labels_attr(attr: str) -> Callable:
    return lambda ds: np.asarray(getattr(ds, attr), dtype=np.int64)


def _files_attr(attr: str) -> Callable:
    return lambda ds: [str(p) for p in getattr(ds, attr)]


def _samples_files(ds) -> list[str]:
    return [str(s[0]) for s in ds._samples] if hasattr(ds, "_samples") else [str(s[0]) for s in ds.samples]


def _samples_labels(ds) -> np.ndarray:
    return np.asarray([s[1] for s in (ds._samples if hasattr(ds, "_samples") else ds.samples)], dtype=np.int64)


def _caltech_files(folder: str, ext: str, width: int) -> Callable:
    """Caltech keeps (class, image number) pairs; the file is <root>/<folder>/<class>/<prefix><n><ext>."""

    def files(ds) -> list[str]:
        base = Path(ds.root) / folder
        if folder.startswith("101"):
            return [str(base / ds.categories[y] / f"image_{n:0{width}d}{ext}") for y, n in zip(ds.y, ds.index)]
        return [str(base / ds.categories[y] / f"{y + 1:03d}_{n:0{width}d}{ext}") for y, n in zip(ds.y, ds.index)]

    return files


def _pcam_labels(ds) -> np.ndarray:
    with ds.h5py.File(ds._base_folder / ds._FILES[ds._split]["targets"][0]) as f:
        return np.asarray(f["y"][:, 0, 0, 0], dtype=np.int64)


@dataclass(frozen=True)
class Torchvision:
    """How to read one torchvision dataset class without decoding its images.

    ``labels(ds)`` gives every label from the loader's attributes; ``files(ds)`` every image path (None:
    the images live in ``array(ds)``, an in-memory array, or else are read through ``ds[i]``).
    """

    cls: str
    folder: str
    num_classes: int
    split_kw: dict = field(default_factory=lambda: {"train": {"split": "train"}, "test": {"split": "test"}})
    labels: Callable = _labels_attr("_labels")
    files: Callable | None = _files_attr("_image_files")
    array: Callable | None = None
    names_key: str | None = None  # clip-benchmark's key for clean class names
    names_from: Callable = lambda ds: ds.classes
    drop_names: int = 0  # leading clip-benchmark names the loader does not have (Caltech-101's background)
    needs: str | None = None  # extra package the loader imports
    obtain: str = ""


class TorchvisionItems(ImageDataset):
    """A torchvision dataset read through ``ds[i]`` (images kept in files it opens itself, e.g. HDF5)."""

    def __init__(self, name, split, ds, targets, classnames, templates, paper):
        self.name, self.split, self.ds, self.targets = name, split, ds, targets
        self.classnames, self.templates, self.paper_template = classnames, templates, paper

    def image(self, i: int):
        try:
            return pil_to_uint8(self.ds[i][0])
        except DECODE_ERRORS as err:
            raise CorruptImageError(self.describe(i), f"{type(err).__name__}: {err}") from None


# A download that cannot reach its server gives up after this many seconds without an answer (a compute
# node without network may otherwise wait for the system's TCP timeout, minutes).
DOWNLOAD_TIMEOUT_S = 20.0


@contextmanager
def download_errors(name: str, folder: Path, files: str) -> Iterator[None]:
    """A failed download (no network, a server gone) as a :class:`DataError` that names the dataset, the
    folder it was looked for in, and how to place the files there by hand."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        yield
    except OSError as err:  # URLError, timeouts, refused connections, DNS failures
        reason = getattr(err, "reason", None) or err
        raise DataError(
            f"{name}: not found in {folder} and the download failed ({reason}); without network, fetch {files} on a "
            f"machine that has it (e.g. `mmcoa fetch-eval {name}` with data.download: true) and copy them into "
            f"{folder}, then run again with data.download: false"
        ) from None
    finally:
        socket.setdefaulttimeout(previous)


def _build(name: str, tv: Torchvision, root: Path, split: str, download: bool) -> ImageDataset:
    import torchvision.datasets as tvd

    own_split = split in tv.split_kw
    try:
        with download_errors(name, root / tv.folder, f"torchvision's {tv.cls} files"):
            ds = getattr(tvd, tv.cls)(str(root), download=download, **tv.split_kw.get(split, {}))
    except ImportError as err:
        raise DataError(f"{name}: torchvision's {tv.cls} needs the package {tv.needs or err.name}; pip install it") from None
    except RuntimeError as err:
        raise DataError(f"{name}: not found in {root / tv.folder} ({err}); {tv.obtain}") from None
    targets = tv.labels(ds)
    names = field_classnames(tv.names_key)
    names = names[tv.drop_names :] if names else [clean_name(str(c)) for c in tv.names_from(ds)]
    templates = field_templates(name, paper_template(name))  # clip-benchmark keys its templates by these names
    if tv.files is not None:
        out: ImageDataset = FileDataset(name, split, tv.files(ds), targets, names, templates, paper_template(name))
    elif tv.array is not None:
        out = ArrayDataset(name, split, tv.array(ds), targets, names, templates, paper_template(name))
    else:
        out = TorchvisionItems(name, split, ds, targets, names, templates, paper_template(name))
    return out if own_split else Subset(out, seeded_split(targets, split), split)


def _obtain(tv: Torchvision, downloadable: bool) -> str:
    files = f"torchvision's {tv.cls} files there"
    needs = f" (reading them needs `pip install {tv.needs}`)" if tv.needs else ""
    how = f"set download: true (needs network), or put {files}" if downloadable else f"put {files}; its download is no longer served"
    return tv.obtain or how + needs


def register_torchvision(name: str, tv: Torchvision, downloadable: bool = True) -> None:
    tv = Torchvision(**{**tv.__dict__, "obtain": _obtain(tv, downloadable)})

    @register_dataset(name)
    def factory() -> DatasetSpec:
        names = field_classnames(tv.names_key)
        return DatasetSpec(
            name,
            lambda root, split, download: _build(name, tv, root, split, download),
            folder=lambda root: root / tv.folder,
            obtain=tv.obtain,
            num_classes=tv.num_classes,
            downloadable=downloadable,
            classnames=tuple(names[tv.drop_names :]) if names else None,
        )


TRAIN_TEST = {"train": {"train": True}, "test": {"train": False}}
NO_SPLIT: dict = {}
IMAGE_FOLDER = dict(labels=_samples_labels, files=_samples_files)

register_torchvision("cifar10", Torchvision("CIFAR10", "cifar-10-batches-py", 10, TRAIN_TEST, _labels_attr("targets"), None, lambda ds: ds.data))
register_torchvision("cifar100", Torchvision("CIFAR100", "cifar-100-python", 100, TRAIN_TEST, _labels_attr("targets"), None, lambda ds: ds.data))
register_torchvision(
    "stl10",
    Torchvision("STL10", "stl10_binary", 10, labels=_labels_attr("labels"), files=None, array=lambda ds: ds.data.transpose(0, 2, 3, 1)),
)
register_torchvision(
    "pets",
    Torchvision("OxfordIIITPet", "oxford-iiit-pet", 37, {"train": {"split": "trainval"}, "test": {"split": "test"}}, files=_files_attr("_images"), names_key="pets"),
)
register_torchvision("flowers", Torchvision("Flowers102", "flowers-102", 102, names_key="flowers"))
register_torchvision("fgvc_aircraft", Torchvision("FGVCAircraft", "fgvc-aircraft-2013b", 100, {"train": {"split": "trainval"}, "test": {"split": "test"}}))
register_torchvision(
    "cars",
    Torchvision("StanfordCars", "stanford_cars", 196, labels=_samples_labels, files=_samples_files, needs="scipy"),
    downloadable=False,  # torchvision's StanfordCars download source is gone
)
register_torchvision("sun397", Torchvision("SUN397", "SUN397", 397, NO_SPLIT))
register_torchvision("food101", Torchvision("Food101", "food-101", 101))
register_torchvision("eurosat", Torchvision("EuroSAT", "eurosat", 10, NO_SPLIT, names_key="eurosat", **IMAGE_FOLDER))
register_torchvision("dtd", Torchvision("DTD", "dtd", 47))
register_torchvision("country211", Torchvision("Country211", "country211", 211, {"train": {"split": "train"}, "test": {"split": "test"}}, names_key="country211", **IMAGE_FOLDER))
register_torchvision(
    "pcam",
    Torchvision("PCAM", "pcam", 2, labels=_pcam_labels, files=None, names_key="pcam", names_from=lambda ds: ["0", "1"], needs="h5py"),
)
register_torchvision(
    "caltech101",
    Torchvision(
        "Caltech101", "caltech101", 101, NO_SPLIT, _labels_attr("y"), _caltech_files("101_ObjectCategories", ".jpg", 4),
        names_key="caltech101", names_from=lambda ds: ds.categories, drop_names=1,
    ),
)
register_torchvision(
    "caltech256",
    Torchvision("Caltech256", "caltech256", 257, NO_SPLIT, _labels_attr("y"), _caltech_files("256_ObjectCategories", ".jpg", 4),
                names_from=lambda ds: [caltech256_name(c) for c in ds.categories]),
)


# --- ImageNet from a folder ---------------------------------------------------------------------

IMAGENET_SPLITS = {"train": "train", "test": "val"}


@register_dataset("imagenet")
def imagenet() -> DatasetSpec:
    """ImageNet as ``<root>/imagenet/{train,val}/<wnid>/<image>``; any subset of the 1000 classes maps correctly.

    Labels index the class folders present (sorted WordNet ids, the order of the 1000-class index);
    class names are clip-benchmark's ``imagenet1k`` names for those ids.
    """

    def open_split(root: Path, split: str, download: bool) -> ImageDataset:
        base = root / "imagenet"
        split_dirs = [base / s for s in IMAGENET_SPLITS.values()]
        wnids = class_folders(*split_dirs)
        if not (base / IMAGENET_SPLITS[split]).is_dir() or not wnids:
            raise DataError(f"imagenet: no {base / IMAGENET_SPLITS[split]}/<wnid>/ folders; {IMAGENET_OBTAIN}")
        paths, labels = scan_image_folder(base / IMAGENET_SPLITS[split], wnids)
        templates = field_templates("imagenet1k", paper_template("imagenet"))
        ds = FileDataset("imagenet", split, paths, labels, imagenet_names(wnids), templates, paper_template("imagenet"))
        ds.wnids = wnids
        return ds

    names = field_classnames("imagenet1k")
    return DatasetSpec(
        "imagenet",
        open_split,
        folder=lambda root: root / "imagenet",
        obtain=IMAGENET_OBTAIN,
        num_classes=None,  # a folder may hold any subset of the 1000 classes
        classnames=tuple(names) if names else None,
    )


IMAGENET_OBTAIN = (
    "put ImageNet's train/ and val/ trees there, one folder per class named by WordNet id (n01440764/...); "
    "ImageNet is not downloadable automatically"
)
