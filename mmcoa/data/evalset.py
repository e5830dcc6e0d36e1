"""Evaluation subsets from any dataset reference: drawn once, kept in a cache folder, reused afterwards.

``write_eval_subset`` draws what ``mmcoa fetch-eval`` writes (test samples of a classification set, or
a retrieval gallery with its captions). ``resolve_reference`` reads what a user typed (a registered name,
``folder:``/``csv:``/``retrieval-*:`` references, a name of ``evaluate.sources``, a dataset declaration
as inline YAML or a ``.yaml`` file) as a dataset reference. ``cached_eval_subset`` prepares a reference's
subset under ``cache_root/<key>`` on first use, the key hashing the reference, the folder it is relative to
and the draw, and reuses that folder (its manifest and content hash) on every later call.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml

from mmcoa.data.errors import DataError
from mmcoa.data.local import source_reference
from mmcoa.data.registry import is_dataset, list_datasets, list_schemes, open_dataset
from mmcoa.data.subset import MANIFEST, read_manifest, task_of, write_retrieval_subset, write_subset

EVAL_SALT = 1  # the evaluation draw differs from the training draw of the same seed
DECLARATION_SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True)
class EvalDraw:
    """How an evaluation subset is drawn and read (the params it depends on)."""

    seed: int
    n_samples: int
    n_images: int
    root: str | None = None
    download: bool = False
    on_corrupt: str = "skip"
    cache_max_images: int = 50000

    @classmethod
    def from_params(cls, p: Any) -> EvalDraw:
        """The draw of the params tree (``seed``, ``data.*``, ``evaluate.n_samples`` / ``n_images``)."""
        d, e = p.data, p.evaluate
        return cls(p.seed, e.n_samples, e.n_images, d.root, d.download, d.on_corrupt, d.cache_max_images)


def write_eval_subset(reference: str, name: str | None, out_dir: Path, draw: EvalDraw) -> dict:
    """Draw the evaluation subset of ``reference`` into ``out_dir``; the manifest, as written."""
    if task_of(reference) == "retrieval":
        from mmcoa.data.retrieval import open_retrieval

        full = open_retrieval(reference, "test", root=draw.root)
        return write_retrieval_subset(full, draw.n_images, draw.seed + EVAL_SALT, out_dir, name=name, source=reference)
    source = open_dataset(reference, "test", root=draw.root, download=draw.download, on_corrupt=draw.on_corrupt)
    return write_subset(source, draw.n_samples, draw.seed + EVAL_SALT, out_dir, draw.cache_max_images, name=name,
                        source=reference)


def is_prepared(path: str | Path) -> bool:
    """Whether ``path`` is a folder holding a prepared subset (a manifest)."""
    return (Path(path).expanduser() / MANIFEST).is_file()


def _declaration(text: str) -> Mapping[str, Any] | None:
    """A dataset declaration typed as inline YAML (``{csv: x.csv, ...}``) or given as a ``.yaml`` file."""
    if text.lstrip().startswith("{"):
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise DataError(f"dataset declaration {text}: not valid YAML ({str(err).splitlines()[0]})") from None
    elif text.lower().endswith(DECLARATION_SUFFIXES) and Path(text).expanduser().is_file():
        value = yaml.safe_load(Path(text).expanduser().read_text(encoding="utf-8"))
    else:
        return None
    if not isinstance(value, Mapping):
        raise DataError(f"dataset declaration {text}: must be a mapping (csv: PATH, classnames: [...], templates: [...])")
    return value


def resolve_reference(text: str, sources: Mapping[str, Any] | None = None) -> tuple[str, str | None]:
    """(dataset reference, name in metric keys or None for the dataset's own) of what a user typed."""
    from mmcoa.data.retrieval import is_retrieval_dataset, list_retrieval_datasets

    sources = sources or {}
    if text in sources:
        return source_reference(sources[text]), text
    declared = _declaration(text)
    if declared is not None:
        return source_reference(declared), None
    if is_dataset(text) or is_retrieval_dataset(text):
        return text, None
    if Path(text).expanduser().is_dir():
        raise DataError(
            f"{text}: a folder but not a prepared subset (no {MANIFEST}); for an image tree ({text}/train/<class>/...) "
            f"pass folder:{text}, or prepare it with `mmcoa fetch-eval NAME --out {text}`"
        )
    if "/" in text or os.sep in text:
        raise DataError(f"{text}: no such folder; prepare it with `mmcoa fetch-eval {Path(text).name} --out {text}`, "
                        "or give a dataset reference (`mmcoa datasets` lists the forms)")
    schemes = ", ".join(f"{s}:PATH" for s in (*list_schemes(), "retrieval-json", "retrieval-csv") if s != "declared")
    raise DataError(
        f"unknown dataset '{text}': give a registered name ({', '.join(list_datasets() + list_retrieval_datasets())}; "
        f"`mmcoa datasets` lists them), {schemes}, a dataset declaration (.yaml), or a folder prepared by "
        "`mmcoa fetch-eval NAME`"
    )


def cache_key(reference: str, name: str | None, draw: EvalDraw, base: Path) -> str:
    """What a cached subset depends on: the reference, the folder relative paths are read from, the draw."""
    record = {"reference": reference, "name": name, "cwd": str(base.resolve()), "draw": asdict(draw)}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def cached_eval_subset(reference: str, name: str | None, cache_root: Path, draw: EvalDraw) -> tuple[Path, bool]:
    """(folder, reused) of ``reference``'s evaluation subset under ``cache_root``: prepared on first use
    (written whole or not at all), reused afterwards."""
    folder = Path(cache_root) / cache_key(reference, name, draw, Path.cwd())
    if is_prepared(folder):
        read_manifest(folder)  # a damaged manifest says so rather than being drawn over
        return folder, True
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        write_eval_subset(reference, name, tmp, draw)
        if folder.exists():  # an incomplete folder of an interrupted run
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder, False
