"""What training and evaluation cost, counted at the model rather than estimated.

Forward and backward passes of each tower are counted by hooks registered on the towers from outside
(:class:`PassCounter`: a forward hook on the image tower and on the text transformer; a gradient hook
on each output that requires a gradient fires once per backward pass through it), with the rows each
pass carried, so an attack's input-gradient steps and the weight update's pass are counted alike.
The hooks return nothing, so counting changes no output and no gradient. One :class:`Window` (the
passes and wall seconds between two points of a run) serves both users:

* training, :class:`ComputeLedger`: per step, the passes, the step's wall seconds and each train-time
  attack's seconds go into the history (a resumed run's totals are the sums over its restored
  history); :meth:`ComputeLedger.summary` adds device and peak memory (resident set on CPU, the
  allocator's peak on CUDA);
* evaluation, :class:`CostMeter`: the passes, wall seconds and samples of each named piece of work
  (an attack of the suite, the clean pass), summed over the batches it ran on.

Counts are this process's (one rank under data parallelism).
"""

from __future__ import annotations

import resource
import sys
import time
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING, Any, ContextManager, Iterator

import torch

if TYPE_CHECKING:  # only for annotations: the report reads ledgers without loading models
    from mmcoa.models import ClipModel

TOWERS = ("image", "text")
PASS_KEYS = tuple(f"{d}_{t}{u}" for t in TOWERS for d in ("fwd", "bwd") for u in ("", "_rows"))


def tower_modules(model: ClipModel) -> dict[str, torch.nn.Module]:
    """The module each tower's encoder runs through once per encode call."""
    clip = model.clip
    text = getattr(clip, "text", None)
    return {"image": clip.visual, "text": text if isinstance(text, torch.nn.Module) else clip.transformer}


def _rows(module: torch.nn.Module, output: torch.Tensor) -> int:
    """Samples in a tower's output: dim 0, or dim 1 for a sequence-first transformer."""
    if output.ndim >= 3 and not getattr(module, "batch_first", True):
        return int(output.shape[1])
    return int(output.shape[0])


class PassCounter:
    """Counts forward and backward passes (and their rows) through the towers of some models."""

    def __init__(self, *models: ClipModel | None):
        self.counts = dict.fromkeys(PASS_KEYS, 0)
        self._handles = []
        for model in models:
            if model is not None:
                for tower, module in tower_modules(model).items():
                    self._handles.append(module.register_forward_hook(self._forward_hook(tower)))

    def _forward_hook(self, tower: str):
        def hook(module, inputs, output):
            out = output[0] if isinstance(output, (tuple, list)) else output
            if not isinstance(out, torch.Tensor):
                return
            rows = _rows(module, out)
            self.counts[f"fwd_{tower}"] += 1
            self.counts[f"fwd_{tower}_rows"] += rows
            if out.requires_grad:
                def on_backward(grad):
                    self.counts[f"bwd_{tower}"] += 1
                    self.counts[f"bwd_{tower}_rows"] += rows

                out.register_hook(on_backward)

        return hook

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so wall seconds measure it (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Window:
    """The passes and wall seconds between :meth:`open` and :meth:`close` of a counter's run."""

    def __init__(self, counter: PassCounter, device: torch.device):
        self.counter, self.device = counter, device
        self._t0 = 0.0
        self._before: dict[str, int] = {}

    def open(self) -> None:
        synchronize(self.device)
        self._before = dict(self.counter.counts)
        self._t0 = time.perf_counter()

    def close(self) -> tuple[dict[str, int], float]:
        """(passes and rows per key of PASS_KEYS, wall seconds) since :meth:`open`."""
        synchronize(self.device)
        seconds = time.perf_counter() - self._t0
        return {k: v - self._before[k] for k, v in self.counter.counts.items()}, seconds


def peak_memory_mb(device: torch.device) -> float:
    """The run's peak memory: the CUDA allocator's peak on a GPU, else the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


class ComputeLedger:
    """A training monitor (``mmcoa.train.Monitor``) that logs each step's passes and seconds.

    Put it first among the monitors: its window then holds every other monitor's work (an
    overfitting guard's probe attacks count as training compute).
    """

    def __init__(self, device: torch.device, *models: ClipModel | None):
        self.device = device
        self.counter = PassCounter(*models)
        self._window = Window(self.counter, device)

    def resume(self, history: list[dict]) -> None:
        """Nothing to restore: totals are sums over the history, which the checkpoint keeps."""

    def begin(self, step: int) -> None:
        self._window.open()

    def end(self, step: int, logs: dict[str, float]) -> None:
        passes, logs["step_s"] = self._window.close()
        logs.update({key: float(value) for key, value in passes.items()})

    def close(self) -> None:
        self.counter.close()

    def summary(self, history: list[dict], batch_size: int) -> dict[str, Any]:
        """The run's totals (steps of ``history``, restored ones included): passes and rows per tower,
        images seen, wall seconds, each attack's share of step time, device and peak memory."""
        total = lambda key: float(sum(h.get(key, 0.0) for h in history))  # noqa: E731
        seconds = total("step_s")
        attacks = sorted({k for h in history for k in h if k.startswith("attack_") and k.endswith("_s")})
        return {
            "steps": len(history),
            "images_seen": len(history) * batch_size,
            **{key: total(key) for key in PASS_KEYS},
            "wall_s": seconds,
            **{f"{key[:-2]}_share": (total(key) / seconds if seconds > 0 else 0.0) for key in attacks},
            "device": str(self.device),
            "peak_memory_mb": peak_memory_mb(self.device),
        }


class CostMeter:
    """The cost of each named piece of work of an evaluation: passes and rows per tower counted at
    ``models``, wall seconds and samples, summed over every :meth:`measure` of that name.

    ``record()`` -> ``{name: {fwd_image, fwd_image_rows, bwd_image, ..., samples, wall_s}}`` in the
    order the names were first measured. Measures must not nest (a pass would count twice).
    """

    def __init__(self, device: torch.device, *models: ClipModel | None):
        self.counter = PassCounter(*models)
        self._window = Window(self.counter, device)
        self._costs: dict[str, dict[str, float]] = {}

    @contextmanager
    def measure(self, name: str, samples: int) -> Iterator[None]:
        """Count the block's passes and seconds under ``name``, with ``samples`` more samples."""
        self._window.open()
        try:
            yield
        finally:
            passes, seconds = self._window.close()
            cost = self._costs.setdefault(name, {**dict.fromkeys(PASS_KEYS, 0), "samples": 0, "wall_s": 0.0})
            for key, value in passes.items():
                cost[key] += value
            cost["samples"] += int(samples)
            cost["wall_s"] += seconds

    def record(self) -> dict[str, dict[str, float]]:
        return {name: {**cost, "wall_s": round(cost["wall_s"], 6)} for name, cost in self._costs.items()}

    def close(self) -> None:
        self.counter.close()


def measured(meter: CostMeter | None, name: str, samples: int) -> ContextManager[None]:
    """``meter.measure(name, samples)``, or nothing at all without a meter."""
    return nullcontext() if meter is None else meter.measure(name, samples)


def flat_metrics(prefix: str, summary: dict[str, Any]) -> dict[str, float]:
    """The numeric entries of a summary as ``prefix.key`` (a metrics file DVC can show and compare)."""
    return {f"{prefix}.{k}": v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


MEASURED_KEYS = ("wall_s", "step_s", "peak_memory_mb", "device")


def is_measured(key: str) -> bool:
    """Whether a ledger key is measured (seconds, shares of time, memory, the device), not counted:
    measured values change from run to run and machine to machine, counted ones do not."""
    return key in MEASURED_KEYS or key.endswith("_share") or (key.startswith("attack_") and key.endswith("_s"))


def split_measured(record: Any) -> tuple[Any, Any]:
    """``record`` (a ledger, a cost record, a history: dicts and lists of them) as (counted, measured):
    the same shape twice, each keeping only its kind of keys; ``merge_measured`` puts them together."""
    if isinstance(record, dict):
        counted, measured = {}, {}
        for key, value in record.items():
            if isinstance(value, (dict, list)):
                counted[key], measured[key] = split_measured(value)
            elif is_measured(key):
                measured[key] = value
            else:
                counted[key] = value
        return counted, measured
    if isinstance(record, list):
        pairs = [split_measured(v) for v in record]
        return [c for c, _ in pairs], [m for _, m in pairs]
    return record, None


def merge_measured(counted: Any, measured: Any) -> Any:
    """The inverse of :func:`split_measured` (measured entries absent from ``counted`` are added)."""
    if isinstance(counted, dict) and isinstance(measured, dict):
        out = dict(counted)
        for key, value in measured.items():
            out[key] = merge_measured(counted[key], value) if key in counted else value
        return out
    if isinstance(counted, list) and isinstance(measured, list) and len(counted) == len(measured):
        return [merge_measured(c, m) for c, m in zip(counted, measured)]
    return counted
