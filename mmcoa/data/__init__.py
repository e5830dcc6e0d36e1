"""Datasets: a registry of sources streamed as torch Datasets, a loader, manifests, and the prepared cache.

``open_dataset(name, split)`` gives an :class:`ImageDataset` (images decoded on access; labels, class
names and templates known without decoding) for a registered name, ``folder:PATH`` or ``csv:PATH``.
``make_loader(dataset, batches, size=...)`` streams batches of float images in [0, 1], resized on the
fly. ``manifest(dataset, indices)`` records what a run uses, with a content hash. ``prepare`` and
``load_prepared`` keep the small cached format (``{split}.safetensors`` + ``meta.json``).
"""

from mmcoa.data.base import ArrayDataset, CorruptImageError, DataError, FileDataset, ImageDataset
from mmcoa.data.prepared import PreparedDataset, load_prepared, prepare, stratified_indices
from mmcoa.data.registry import (
    DatasetSpec,
    dataset_spec,
    default_root,
    is_dataset,
    list_datasets,
    list_schemes,
    open_dataset,
    parse_dataset_name,
    register_dataset,
    register_scheme,
)
from mmcoa.data import local as _local  # noqa: F401,E402  (registers folder: and csv:)
from mmcoa.data import sources as _sources  # noqa: F401,E402  (registers the built-in datasets)
from mmcoa.data.loader import LoaderStats, make_loader  # noqa: E402
from mmcoa.data.manifest import manifest  # noqa: E402

__all__ = [
    "ArrayDataset",
    "CorruptImageError",
    "DataError",
    "DatasetSpec",
    "FileDataset",
    "ImageDataset",
    "LoaderStats",
    "PreparedDataset",
    "dataset_spec",
    "default_root",
    "is_dataset",
    "list_datasets",
    "list_schemes",
    "load_prepared",
    "make_loader",
    "manifest",
    "open_dataset",
    "parse_dataset_name",
    "prepare",
    "register_dataset",
    "register_scheme",
    "stratified_indices",
]
