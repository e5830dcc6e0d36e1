"""`mmcoa fetch` / `mmcoa fetch-eval`: record (and, when small, cache) the subsets a run uses.

`fetch` draws the fine-tuning subset of data.dataset's train split; `fetch-eval DATASET` draws the
evaluation subset of one dataset of evaluate.datasets (its test split, or a retrieval gallery). Each
writes a manifest (indices and a content hash), so DVC reruns exactly what changed downstream.
"""

from __future__ import annotations

from pathlib import Path

import typer

from mmcoa.data import DataError, open_dataset
from mmcoa.data.evalset import EvalDraw, write_eval_subset
from mmcoa.data.local import source_reference
from mmcoa.data.subset import write_subset
from stages.common import PARAMS_OPTION, SET_OPTION, StageError, atomic_dir, load, log


def fetch(
    out: Path = typer.Option(Path("data/prepared"), help="Folder for the fine-tuning subset (manifest + cache)."),
    params: Path = PARAMS_OPTION,
    set_: list[str] = SET_OPTION,
) -> None:
    """Draw the fine-tuning subset of data.dataset (train split)."""
    p = load(params, set_)
    d = p.data
    try:
        dataset = open_dataset(d.dataset, "train", root=d.root, download=d.download, on_corrupt=d.on_corrupt)
        with atomic_dir(out) as tmp:
            meta = write_subset(dataset, d.n_train, p.seed, tmp, d.cache_max_images, source=d.dataset)
    except DataError as err:
        raise StageError(str(err)) from None
    log(f"fetch: {d.dataset} train, {len(meta['indices'])} samples ({'cached' if meta.get('cached') else 'streamed'}) -> {out}")


def fetch_eval(
    dataset: str = typer.Argument(..., help="A dataset of evaluate.datasets (a registered name or a key of evaluate.sources)."),
    out: Path = typer.Option(None, help="Output folder (default: data/eval/DATASET)."),
    params: Path = PARAMS_OPTION,
    set_: list[str] = SET_OPTION,
) -> None:
    """Draw the evaluation subset of DATASET: test samples, or a retrieval gallery with its captions."""
    p = load(params, set_)
    out = out or Path("data/eval") / dataset
    try:
        reference = source_reference(p.evaluate.sources.get(dataset, dataset))
        with atomic_dir(out) as tmp:
            meta = write_eval_subset(reference, dataset, tmp, EvalDraw.from_params(p))
    except DataError as err:
        raise StageError(str(err)) from None
    log(f"fetch-eval: {dataset}, {len(meta['indices'])} {'images' if meta.get('task') == 'retrieval' else 'samples'} -> {out}")
