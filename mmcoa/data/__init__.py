"""Datasets: a registry of sources, and the prepared on-disk format every stage reads.

A source (``fashion_mnist``, ``cifar10``, ...) knows where its raw files live, its class names and
its prompt templates. ``prepare`` turns it into a stratified, seeded subset stored as
``{split}.safetensors`` (uint8 images [N, C, H, W], int64 labels) plus ``meta.json``.
"""

from mmcoa.data.registry import (
    DataError,
    DatasetSource,
    PreparedDataset,
    create_source,
    list_datasets,
    load_prepared,
    prepare,
    register_dataset,
)
from mmcoa.data import sources as _sources  # noqa: F401  (registers the built-in sources)

__all__ = [
    "DataError",
    "DatasetSource",
    "PreparedDataset",
    "create_source",
    "list_datasets",
    "load_prepared",
    "prepare",
    "register_dataset",
]
