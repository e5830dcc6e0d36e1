"""What every stage shares: params loading, device and seeding, atomic outputs, console, progress."""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from mmcoa.config import Params, ParamsError, load_params, parse_override

console = Console(stderr=True)

PARAMS_OPTION = typer.Option("params.yaml", "--params", help="Params file (YAML) validated by the params model.")
SET_OPTION = typer.Option(
    None, "--set", "-S", help="Override a param: -S finetune.lr=1e-4 (repeatable; value read as YAML)."
)


class StageError(Exception):
    """A user-facing error: printed on one line, exit status ``code``, nothing written."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


def load(params_path: str | Path, overrides: list[str] | None = None) -> Params:
    """Validated params, or a :class:`StageError` (exit 2) that names the key."""
    try:
        pairs = dict(parse_override(o) for o in overrides or [])
        params = load_params(params_path, pairs)
    except ParamsError as err:
        raise StageError(f"invalid params: {err}") from None
    _check_registered(params)
    return params


def _check_registered(p: Params) -> None:
    """Names and nested params that only the registries can check (defenses, attacks, datasets)."""
    from mmcoa.attacks import AttackError, create_attack
    from mmcoa.data import is_dataset, list_datasets
    from mmcoa.data.retrieval import is_retrieval_dataset, list_retrieval_datasets
    from mmcoa.defenses import list_defenses

    def known(where: str, name: str, retrieval_ok: bool) -> None:
        if is_dataset(name) or (retrieval_ok and is_retrieval_dataset(name)):
            return
        names = list_datasets() + (list_retrieval_datasets() if retrieval_ok else [])
        schemes = "folder:PATH, csv:PATH" + (", retrieval-json:PATH, retrieval-csv:PATH" if retrieval_ok else "")
        raise StageError(f"invalid params: {where}: unknown dataset '{name}'; registered: {', '.join(names)} (or {schemes})")

    known("data.dataset", p.data.dataset, False)
    for i, name in enumerate(p.evaluate.datasets):
        known(f"evaluate.datasets[{i}]", p.evaluate.sources.get(name, name), True)
    for name in p.base.pretrain.datasets if p.base.pretrain else []:
        known(f"base.pretrain.datasets.{name}", name, True)
    for i, m in enumerate(p.finetune.methods):
        if m not in list_defenses():
            raise StageError(f"invalid params: finetune.methods[{i}]: unknown defense '{m}'; registered: {', '.join(list_defenses())}")
    for m in p.finetune.overrides:
        if m not in list_defenses():
            raise StageError(f"invalid params: finetune.overrides.{m}: unknown defense; registered: {', '.join(list_defenses())}")
        try:
            p.finetune.for_method(m)
        except Exception as err:  # pydantic error text names the key
            raise StageError(f"invalid params: finetune.overrides.{m}: {str(err).splitlines()[0]}") from None
    for key, suite in (("suite", p.evaluate.suite), ("retrieval_suite", p.evaluate.retrieval_suite)):
        for i, spec in enumerate(suite):
            stray = [d for d in spec.datasets or [] if d not in p.evaluate.datasets]
            if stray:
                raise StageError(f"invalid params: evaluate.{key}[{i}] ({spec.name}).datasets: {stray} not in "
                                 f"evaluate.datasets {p.evaluate.datasets}")
    specs = [(f"evaluate.suite[{i}]", s) for i, s in enumerate(p.evaluate.suite)]
    specs += [(f"evaluate.retrieval_suite[{i}]", s) for i, s in enumerate(p.evaluate.retrieval_suite)]
    if p.evaluate.sweep is not None:
        specs.append(("evaluate.sweep", p.evaluate.sweep))
    for where, spec in specs:
        try:
            create_attack(spec.attack, **spec.params)
        except (AttackError, ValueError) as err:
            raise StageError(f"invalid params: {where} ({spec.name}): {err}") from None


def setup_runtime(params: Params) -> torch.device:
    """Seed every generator from the one base seed, set threads, and pick the device."""
    random.seed(params.seed)
    np.random.seed(params.seed)
    torch.manual_seed(params.seed)
    if params.threads:
        torch.set_num_threads(params.threads)
    from mmcoa import distributed as dist

    if params.device == "auto":
        device = torch.device(f"cuda:{dist.local_rank()}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(params.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise StageError(f"device: '{params.device}' requested but CUDA is not available; use device: auto or cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_from_env(device)
    return device


def runtime_record(device: torch.device) -> dict:
    """What the numbers were computed with: the last bits of float results depend on the torch build,
    the CPU kernels it dispatched to (AVX2, AVX512, ...) and the thread count, or on the GPU."""
    record = {"torch": torch.__version__, "device": device.type}
    if device.type == "cuda":
        record["gpu"] = torch.cuda.get_device_name(device)
    else:
        record.update(cpu_kernels=torch.backends.cpu.get_cpu_capability(), threads=torch.get_num_threads())
    return record


def loader_options(model, params: Params) -> dict:
    """How a model's images are loaded: resolution (native, or its input size), interpolation, workers."""
    pre = getattr(model, "preprocess", {}) or {}
    return {
        "size": model.image_size[0] if params.data.resolution == "model" else None,
        "interpolation": pre.get("interpolation", "bicubic"),
        "num_workers": params.data.num_workers,
        "pin_memory": model.device.type == "cuda",
    }


@contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``target`` whole, on error it vanishes."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    os.replace(tmp, target)


def write_json(path: str | Path, obj: Any) -> None:
    """Stable JSON (sorted keys, no timestamps) written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def progress() -> Progress:
    """A rich progress bar on stderr; plain (no live redraw) when stderr is not a terminal."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not sys.stderr.isatty(),
    )


def log(message: str) -> None:
    console.print(message, highlight=False)
