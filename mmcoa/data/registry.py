"""The dataset registry: names -> specs, and the name checks that go with them.

A dataset name is either a registered name (``cifar10``, ``imagenet``, ...) or a scheme with an
argument (``folder:PATH``, ``csv:PATH``). The registry parses a name once (:func:`parse_dataset_name`)
and owns every check (:func:`is_dataset`), so a scheme name is valid wherever a dataset name is.
Registering a name twice is an error, for names and schemes alike.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from mmcoa.data.base import DataError, ImageDataset
from mmcoa.registry import Registry
from mmcoa.data.prepared import PreparedDataset, load_prepared, prepare, stratified_indices  # noqa: F401  (re-exported)

ON_CORRUPT = ("skip", "fail")


def default_root() -> Path:
    """Where raw datasets live unless a root is given: $MMCOA_DATA, else ~/.cache/mmcoa."""
    return Path(os.environ.get("MMCOA_DATA", "~/.cache/mmcoa")).expanduser()


@dataclass(frozen=True)
class DatasetSpec:
    """What the registry knows about a dataset without reading it.

    ``open(root, split, download)`` returns an :class:`ImageDataset`; ``folder(root)`` is where the
    files are looked for; ``obtain`` says how to get them; ``num_classes`` is None when only the
    files know (folders, CSVs).
    """

    name: str
    open: Callable[[Path, str, bool], ImageDataset]
    folder: Callable[[Path], Path]
    obtain: str
    num_classes: int | None = None
    splits: tuple[str, ...] = ("train", "test")
    downloadable: bool = False
    classnames: tuple[str, ...] | None = None  # known statically (None: from the files)
    offline: bool = False  # ships with an installed package: always present

    def present(self, root: Path) -> bool:
        return self.offline or self.folder(root).exists()


# name -> zero-argument factory of a DatasetSpec; scheme -> factory mapping ARG of ``scheme:ARG`` to one
_REGISTRY: Registry[Callable[[], DatasetSpec]] = Registry("dataset", DataError)
_SCHEMES: Registry[Callable[[str], DatasetSpec]] = Registry("dataset scheme", DataError)
register_dataset = _REGISTRY.register
register_scheme = _SCHEMES.register


def list_datasets() -> list[str]:
    """Registered dataset names (schemes such as ``folder:PATH`` are listed by :func:`list_schemes`)."""
    return _REGISTRY.names()


def list_schemes() -> list[str]:
    return _SCHEMES.names()


def scheme_entries() -> list[tuple[str, Callable[[str], DatasetSpec]]]:
    """(scheme, factory) pairs: what ``mmcoa datasets`` describes from each factory's docstring."""
    return _SCHEMES.items()


def parse_dataset_name(name: str) -> tuple[str | None, str]:
    """(scheme, argument) for ``scheme:ARG`` names, (None, name) for registered names."""
    return _SCHEMES.split_scheme(name)


def is_dataset(name: str) -> bool:
    """True for a registered name or a ``scheme:ARG`` name with a registered scheme and a non-empty ARG."""
    scheme, arg = parse_dataset_name(name)
    return bool(arg) if scheme else name in _REGISTRY


def unknown_dataset_message(name: str) -> str:
    schemes = ", ".join(f"{s}:PATH" for s in list_schemes())
    return f"unknown dataset '{name}'; registered: {', '.join(list_datasets())}; or {schemes}"


def dataset_spec(name: str) -> DatasetSpec:
    """The spec of a dataset name; :class:`DataError` listing the valid names otherwise."""
    if not is_dataset(name):
        raise DataError(unknown_dataset_message(name))
    scheme, arg = parse_dataset_name(name)
    return _SCHEMES[scheme](arg) if scheme else _REGISTRY[name]()


def open_dataset(
    name: str,
    split: str,
    root: str | Path | None = None,
    download: bool = False,
    on_corrupt: str = "skip",
) -> ImageDataset:
    """One split of a dataset as a streaming :class:`ImageDataset` (images decoded on access).

    ``root`` is the folder holding raw datasets (default :func:`default_root`); ``download`` lets
    torchvision fetch what is missing; ``on_corrupt`` ('skip' or 'fail') is what a loader does with an
    unreadable image. A dataset neither on disk nor downloadable raises :class:`DataError` saying
    where it looked and how to obtain it.
    """
    if on_corrupt not in ON_CORRUPT:
        raise DataError(f"on_corrupt: '{on_corrupt}' is not one of {', '.join(ON_CORRUPT)}")
    spec = dataset_spec(name)
    if split not in spec.splits:
        raise DataError(f"{name}: no split '{split}'; splits: {', '.join(spec.splits)}")
    root = Path(root).expanduser() if root else default_root()
    if not spec.present(root) and not (download and spec.downloadable):
        raise DataError(f"{name}: not found in {spec.folder(root)}; {spec.obtain}")
    ds = spec.open(root, split, download)
    ds.on_corrupt = on_corrupt
    if spec.num_classes is not None and len(ds.classnames) != spec.num_classes:
        raise DataError(
            f"{name}: {len(ds.classnames)} class names for {spec.num_classes} classes in {spec.folder(root)}; "
            "the files are incomplete or of another version"
        )
    return ds
