"""`mmcoa fetch`: a seeded, stratified train/test subset of the dataset in params, in the prepared format."""

from __future__ import annotations

from pathlib import Path

import typer

from mmcoa.data import DataError, prepare
from stages.common import PARAMS_OPTION, SET_OPTION, StageError, atomic_dir, load, log


def fetch(
    out: Path = typer.Option(Path("data/prepared"), help="Folder for train/test .safetensors and meta.json."),
    params: Path = PARAMS_OPTION,
    set_: list[str] = SET_OPTION,
) -> None:
    """Prepare the dataset named by data.dataset (Fashion-MNIST offline by default)."""
    p = load(params, set_)
    d = p.data
    try:
        with atomic_dir(out) as tmp:
            meta = prepare(d.dataset, tmp, d.n_train, d.n_test, p.seed, d.root, d.download, d.image_size)
    except DataError as err:
        raise StageError(str(err)) from None
    sizes = ", ".join(f"{k} {v['n']}" for k, v in meta["splits"].items())
    log(f"fetch: {d.dataset} ({len(meta['classnames'])} classes; {sizes}) -> {out}")
