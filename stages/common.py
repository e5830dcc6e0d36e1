"""What every stage shares: params loading, device and seeding, atomic outputs, console, progress (a bar on a
terminal, bounded-rate lines off one), where prepared evaluation subsets are cached."""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from mmcoa.config import Params, ParamsError, load_params, parse_override, parse_params

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


PROJECT_PARAMS = Path("params.yaml")


def in_project() -> bool:
    """Whether the current folder is a project (holds params.yaml), as opposed to a tool run anywhere."""
    return PROJECT_PARAMS.is_file()


def load(params_path: str | Path, overrides: list[str] | None = None, defaults_outside_project: bool = False) -> Params:
    """Validated params, or a :class:`StageError` (exit 2) that names the key.

    ``defaults_outside_project``: for the tools (attack, evaluate) run outside a project, the default
    params file being absent means the built-in defaults, as an installed tool runs."""
    try:
        pairs = dict(parse_override(o) for o in overrides or [])
        if defaults_outside_project and Path(params_path) == PROJECT_PARAMS and not in_project():
            params = parse_params({}, pairs)
        else:
            params = load_params(params_path, pairs)
    except ParamsError as err:
        raise StageError(f"invalid params: {err}") from None
    _check_registered(params)
    return params


def _check_registered(p: Params) -> None:
    """Names and nested params that only the registries can check (defenses, attacks, datasets)."""
    from mmcoa.attacks import AttackError, create_attack
    from mmcoa.data import DataError, is_dataset, list_datasets
    from mmcoa.data.local import source_reference
    from mmcoa.data.retrieval import is_retrieval_dataset, list_retrieval_datasets
    from mmcoa.defenses import check_finetune

    def known(where: str, name: str, retrieval_ok: bool) -> None:
        if is_dataset(name) or (retrieval_ok and is_retrieval_dataset(name)):
            return
        names = list_datasets() + (list_retrieval_datasets() if retrieval_ok else [])
        schemes = "folder:PATH, csv:PATH" + (", retrieval-json:PATH, retrieval-csv:PATH" if retrieval_ok else "")
        schemes += ", or a declaration in evaluate.sources; `mmcoa datasets` lists them"
        raise StageError(f"invalid params: {where}: unknown dataset '{name}'; registered: {', '.join(names)} (or {schemes})")

    known("data.dataset", p.data.dataset, False)
    for name, source in p.evaluate.sources.items():
        try:
            source_reference(source)
        except DataError as err:
            raise StageError(f"invalid params: evaluate.sources.{name}: {err}") from None
    for i, name in enumerate(p.evaluate.datasets):
        known(f"evaluate.datasets[{i}]", source_reference(p.evaluate.sources.get(name, name)), True)
    for name in p.base.pretrain.datasets if p.base.pretrain else []:
        known(f"base.pretrain.datasets.{name}", name, True)
    try:  # defenses and variants, their attacks (side, params, schedule) and options
        check_finetune(p.finetune)
    except ValueError as err:
        raise StageError(f"invalid params: {err}") from None
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
    """How a model's images are loaded: resolution (native, or its input size), the model's interpolation
    and resize mode (so the loader resizes as the model's own resize does), workers."""
    pre = getattr(model, "preprocess", {}) or {}
    return {
        "size": model.image_size[0] if params.data.resolution == "model" else None,
        "interpolation": pre.get("interpolation", "bicubic"),
        "resize_mode": pre.get("resize_mode", "shortest"),
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


TIMING = Path("timing")


def timing_file(out: Path) -> Path:
    """Where the measured cost (seconds, memory) of the output ``out`` goes: ``timing/<out>.json`` for a
    relative output (outside every DVC output and dependency, so the pipeline's recorded hashes stay
    reproducible while the seconds differ run to run), else ``<out>.timing.json`` beside it."""
    out = Path(out)
    return TIMING / f"{out.as_posix()}.json" if not out.is_absolute() else out.with_name(f"{out.name}.timing.json")


def read_timing(out: Path) -> dict:
    """The measured cost recorded for ``out`` (empty when none was, or it cannot be read: it is informative only)."""
    try:
        data = json.loads(timing_file(out).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


# Off a terminal (a `dvc repro` log, a batch job) a loop prints a line at most every PROGRESS_SECONDS
# and at every PROGRESS_FRACTION of its total, whichever comes first; both can be set in the environment.
PROGRESS_SECONDS = float(os.environ.get("MMCOA_PROGRESS_SECONDS", 30))
PROGRESS_FRACTION = float(os.environ.get("MMCOA_PROGRESS_FRACTION", 0.1))


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class ProgressLines:
    """Progress as plain lines at a bounded rate, with the rate and the time left.

    The interface is the part of rich's :class:`Progress` the stages use (a context manager,
    ``add_task(description, total)``, ``update(task, completed=, total=)``), so a loop reports the same
    way on a terminal (a live bar) and off one (these lines). ``clock`` and ``emit`` are injectable.
    """

    def __init__(self, every_seconds: float = PROGRESS_SECONDS, every_fraction: float = PROGRESS_FRACTION,
                 clock: Callable[[], float] = time.monotonic, emit: Callable[[str], None] | None = None):
        self.every_seconds, self.every_fraction, self.clock = every_seconds, every_fraction, clock
        self.emit = emit or (lambda line: console.print(line, highlight=False, markup=False))
        self.tasks: list[dict] = []

    def __enter__(self) -> ProgressLines:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def add_task(self, description: str, total: float | None = None, **_: Any) -> int:
        now = self.clock()
        self.tasks.append({"description": description, "total": total, "done": 0, "start": now, "last": now,
                           "last_fraction": 0.0})
        return len(self.tasks) - 1

    def update(self, task_id: int, completed: float | None = None, total: float | None = None, **_: Any) -> None:
        task = self.tasks[task_id]
        if total is not None:
            task["total"] = total
        if completed is None or completed <= task["done"]:
            return
        task["done"] = completed
        now, total = self.clock(), task["total"]
        fraction = completed / total if total else 0.0
        finished = bool(total) and completed >= total
        due = now - task["last"] >= self.every_seconds or fraction - task["last_fraction"] >= self.every_fraction - 1e-9
        if finished or due:
            task["last"], task["last_fraction"] = now, fraction
            self.emit(self.line(task, now))

    @staticmethod
    def line(task: dict, now: float) -> str:
        """``description: done/total (pct) rate, elapsed, time left``."""
        done, total, elapsed = task["done"], task["total"], now - task["start"]
        rate = done / elapsed if elapsed > 0 else 0.0
        count = f"{done:g}/{total:g} ({100 * done / total:.0f}%)" if total else f"{done:g}"
        speed = f"{rate:.2f}/s" if rate >= 0.1 else (f"{elapsed / done:.0f}s each" if done else "-")
        left = f", {_duration((total - done) / rate)} left" if total and rate > 0 and done < total else ""
        return f"{task['description']}: {count}, {speed}, {_duration(elapsed)} elapsed{left}"


def progress() -> Progress | ProgressLines:
    """Progress of a long loop on stderr: a live rich bar on a terminal, bounded-rate lines off one."""
    if not sys.stderr.isatty():
        return ProgressLines()
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )


def eval_cache_root() -> Path:
    """Where evaluation subsets prepared from a dataset reference are kept: the project's data/eval-cache,
    else the user's cache ($MMCOA_EVAL_CACHE, or $XDG_CACHE_HOME/mmcoa/eval-cache)."""
    if in_project():
        return Path("data/eval-cache")
    if os.environ.get("MMCOA_EVAL_CACHE"):
        return Path(os.environ["MMCOA_EVAL_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "mmcoa" / "eval-cache"


def table_console() -> Console:
    """A console for tables on stdout: the terminal's width, or off one (a log, a pipe) wide enough that
    a row stays on one line unless $COLUMNS says otherwise."""
    wide = sys.stdout.isatty() or "COLUMNS" in os.environ
    return Console(width=None if wide else 200)


def log(message: str) -> None:
    """One line on stderr (not wrapped: a log keeps it whole)."""
    console.print(message, highlight=False, soft_wrap=True)
