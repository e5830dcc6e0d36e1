"""One training loop for every defense (and for pre-training from scratch).

Read top to bottom: pick the trainable towers, build the optimiser and schedule, resume from the
last checkpoint if there is one, then for each step draw the step's batch, let the defense's
adversaries pick the step's attack, let the defense build its adversarial examples and loss,
back-propagate, average gradients across ranks, clip, step, clamp the logit scale, let the monitors
(a compute ledger, an overfitting guard) see the step, and checkpoint now and then.

Determinism: the batch of step s and the RNG used by step s's attacks are both derived from
(seed, s, rank), so a run killed at any point and resumed from its last checkpoint ends with the
same weights as a run that never stopped.

Data parallel (torchrun): every rank holds a replica (broadcast from rank 0 at the start), takes
its slice of the global batch, and gradients are averaged explicitly; contrastive losses gather
features with autograd (see ``distributed.py`` for why the result equals the single-process
gradient). With ``accum_steps > 1`` a contrastive loss sees micro-batches, not the global batch.

Precision: fp32 on CPU; on CUDA, bf16 autocast for the encoders (``amp``) with every loss in fp32
(see ``defenses/base.py``), and optionally ``torch.compile`` of the two towers in place, so
parameter names, and thus checkpoint keys, do not change.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import warnings
import zipfile
from contextlib import nullcontext
from functools import partial
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence

import torch

from mmcoa import distributed as dist
from mmcoa.defenses import Defense
from mmcoa.models import ClipModel, tower_of

CHECKPOINT_NAME = "last.pt"
PREVIOUS_NAME = "previous.pt"  # the checkpoint before last.pt, kept so that a damaged last.pt costs one interval
COMPILE_PREFIX = "_orig_mod."


class TrainingDiverged(RuntimeError):
    """The loss, a gradient or a weight became NaN or inf; the last good checkpoint is kept."""


class CheckpointMismatch(RuntimeError):
    """A checkpoint on disk was written with other params; refusing to resume from it."""


class CheckpointUnreadable(RuntimeError):
    """No checkpoint of the run can be read (truncated, or not a checkpoint); the message names the file."""


class Monitor(Protocol):
    """Watches every step from outside the loss (a compute ledger, an overfitting guard).

    ``begin`` and ``end`` bracket a step (monitors begin in order and end in reverse, so the first
    one's window holds the others'); ``end`` may add to the step's logs or raise to stop training.
    ``resume`` sees the history of a resumed run, from which a monitor restores its state.
    """

    def resume(self, history: list[dict]) -> None: ...

    def begin(self, step: int) -> None: ...

    def end(self, step: int, logs: dict[str, float]) -> None: ...


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    batch_size: int
    lr: float
    optimizer: str = "adamw"
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    weight_decay: float = 0.1
    schedule: str = "constant"
    warmup_steps: int = 0
    grad_clip: float | None = None
    accum_steps: int = 1
    logit_scale_max: float = 100.0
    checkpoint_every: int = 25
    amp: bool = True
    compile: bool = False
    seed: int = 0

    @classmethod
    def from_params(cls, params: Any, seed: int) -> TrainConfig:
        """The loop's settings from a params block that names them alike (``finetune``), and the run's seed."""
        return cls(seed=seed, **{f.name: getattr(params, f.name) for f in fields(cls) if f.name != "seed"})


def params_hash(*parts: Any) -> str:
    """A short, stable hash of the params that determine a run (guards resumption)."""
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """Indices of the global batch of ``step``: consecutive slices of per-epoch permutations."""
    per_epoch = max(n // batch_size, 1)
    epoch, pos = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(n, generator=g)
    return perm[pos * batch_size : (pos + 1) * batch_size]


Batches = Callable[[Iterable[list[int]]], Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]


def in_memory_batches(data: Any) -> Batches:
    """Batches of a decoded dataset (``float_images(idx)`` and ``labels``): no loader needed."""

    def batches(index_lists: Iterable[list[int]]):
        for idx in index_lists:
            t = torch.as_tensor(idx, dtype=torch.long)
            yield data.float_images(t), data.labels[t], t

    return batches


def step_seed(seed: int, step: int, rank: int) -> int:
    """The RNG seed of one rank at one step (attack start noise etc.)."""
    return seed * 1_000_003 + step * 1_009 + rank


def _decay_groups(named: list[tuple[str, torch.nn.Parameter]], weight_decay: float) -> list[dict]:
    """No weight decay on gains, biases, embeddings of position and the logit scale (as open_clip)."""
    def exclude(n: str, p: torch.nn.Parameter) -> bool:
        return p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n or "embedding" in n

    decay = [p for n, p in named if not exclude(n, p)]
    no_decay = [p for n, p in named if exclude(n, p)]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# Adam's weight_decay is L2 in the gradient (the authors' choice); AdamW decouples it.
_OPTIMIZERS: dict[str, Callable[[list[dict], TrainConfig], torch.optim.Optimizer]] = {
    "adam": lambda groups, cfg: torch.optim.Adam(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps),
    "adamw": lambda groups, cfg: torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps),
    "sgd": lambda groups, cfg: torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9),
}

# After warm-up: the factor of the learning rate at ``done`` of ``span`` steps.
_SCHEDULES: dict[str, Callable[[int, int], float]] = {
    "constant": lambda done, span: 1.0,
    "cosine": lambda done, span: 0.5 * (1 + math.cos(math.pi * done / span)),
}


def build_optimizer(named: list[tuple[str, torch.nn.Parameter]], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer not in _OPTIMIZERS:
        raise ValueError(f"unknown optimizer '{cfg.optimizer}'; use {', '.join(_OPTIMIZERS)}")
    return _OPTIMIZERS[cfg.optimizer](_decay_groups(named, cfg.weight_decay), cfg)


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    """Linear warm-up over ``warmup_steps``, then constant or cosine decay to zero at ``steps``."""
    if cfg.schedule not in _SCHEDULES:
        raise ValueError(f"unknown schedule '{cfg.schedule}'; use {', '.join(_SCHEDULES)}")
    decay = _SCHEDULES[cfg.schedule]

    def f(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        span = max(cfg.steps - cfg.warmup_steps, 1)
        return decay(min(step - cfg.warmup_steps, span), span)

    return f


def clean_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """State-dict keys without torch.compile's ``_orig_mod.`` (wherever a compiled module sat)."""
    return {k.replace(COMPILE_PREFIX, ""): v for k, v in state.items()}


def _plain(module: torch.nn.Module) -> torch.nn.Module:
    """The module itself, or the one a ``torch.compile`` wrapper holds."""
    return getattr(module, "_orig_mod", module)


def compile_towers(model: ClipModel) -> None:
    """``torch.compile`` the image and text towers in place (``Module.compile``): parameter names
    stay clean, and the encoders the defenses call directly are the ones compiled."""
    for name in ("visual", "transformer", "text"):
        tower = getattr(model.clip, name, None)
        if isinstance(tower, torch.nn.Module):
            tower.compile()


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """True if no element of ``tensors`` is NaN or inf (one host sync, not one per tensor)."""
    if not tensors:
        return True
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def _save_atomic(path: Path, previous: Path, state: dict) -> None:
    """Write to a temporary file, flush it to disk, keep the old ``path`` as ``previous``, then rename:
    a kill never leaves half a file, and a file damaged later leaves the one before it."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    if path.is_file():
        os.replace(path, previous)
    os.replace(tmp, path)


def _rng_state() -> dict[str, Any]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"].cpu())
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _check_batch_size(cfg: TrainConfig, world: int, n_data: int) -> None:
    if cfg.batch_size % (world * cfg.accum_steps):
        raise ValueError(
            f"batch_size {cfg.batch_size} must divide by world size x accum_steps = {world * cfg.accum_steps}"
        )
    if n_data < cfg.batch_size:
        raise ValueError(f"batch_size {cfg.batch_size} is larger than the training set ({n_data} samples)")


def _trainable(model: ClipModel, defense: Defense) -> list[tuple[str, torch.nn.Parameter]]:
    """Freeze every parameter outside the towers the defense trains (no grads, no optimiser state);
    return the trainable ones with their names."""
    trainable = []
    for name, p in model.clip.named_parameters():
        p.requires_grad_(tower_of(name.replace(COMPILE_PREFIX, "")) in defense.trains)
        if p.requires_grad:
            trainable.append((name, p))
    return trainable


# What torch.load raises on a file that is not a whole checkpoint (truncated, emptied, overwritten).
_UNREADABLE = (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, KeyError, ValueError)


class _Checkpoint:
    """The run's ``last.pt`` (and the one before it, ``previous.pt``): resume from the newest readable
    one, write them atomically, and say in a divergence message which good checkpoint is kept.
    ``path`` None: no checkpoints (nothing is written or read)."""

    def __init__(self, path: Path | None, run_hash: str, world: int):
        self.path, self.run_hash, self.world = path, run_hash, world
        self.previous = path.with_name(PREVIOUS_NAME) if path is not None else None
        self.saved_at: int | None = None

    def _load(self, device: torch.device) -> dict | None:
        """The newest readable checkpoint: ``last.pt``, else ``previous.pt`` (with a warning naming the
        unreadable file); None when there is none. Neither readable: :class:`CheckpointUnreadable`."""
        problems = []
        for path in (self.path, self.previous):
            if not path.is_file():
                continue
            try:
                state = torch.load(path, map_location=device, weights_only=True)
                if not isinstance(state, dict) or "step" not in state:
                    raise ValueError("not a training checkpoint")
            except _UNREADABLE as err:
                problems.append((path, str(err).splitlines()[0] if str(err) else type(err).__name__))
                continue
            if problems:
                warnings.warn(f"{problems[0][0]} is unreadable ({problems[0][1]}); resuming from {path} "
                              f"(step {state['step']})", stacklevel=3)
            return state
        if problems:
            path, why = problems[0]
            raise CheckpointUnreadable(
                f"{path} is unreadable ({why}) and no earlier checkpoint of the run can be read; "
                f"delete {path.parent} to train from the start"
            )
        return None

    def resume(self, model: ClipModel, optimizer, scheduler) -> tuple[int, list[dict]]:
        """Load weights, optimiser, schedule, RNG and history of this run's checkpoint, if any;
        return (steps done, history)."""
        if self.path is None:
            return 0, []
        state = self._load(model.device)
        if state is None:
            return 0, []
        if state.get("run_hash") != self.run_hash:
            raise CheckpointMismatch(
                f"{self.path} was written by a run with other params (hash {state.get('run_hash')} != "
                f"{self.run_hash}); delete it to start over, or restore the params it was made with"
            )
        _plain(model.clip).load_state_dict(clean_state_dict(state["model"]))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        self.saved_at = int(state["step"])
        return self.saved_at, json.loads(state["history"])

    def save(self, step: int, model: ClipModel, optimizer, scheduler, history: list[dict], params) -> None:
        """Write the state after ``step`` (rank 0 writes; every rank records it as saved), never
        over a good checkpoint with broken weights."""
        if self.path is None:
            return
        if not all_finite(params):
            raise self.diverged("a weight is NaN or inf", step)
        if dist.is_main():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _save_atomic(self.path, self.previous, {
                "model": clean_state_dict(model.clip.state_dict()), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "rng": _rng_state(), "step": step,
                "run_hash": self.run_hash, "world_size": self.world, "history": json.dumps(history),
            })
        self.saved_at = step

    def diverged(self, what: str, step: int) -> TrainingDiverged:
        kept = f"{self.path} (step {self.saved_at})" if self.saved_at is not None else "none (no checkpoint written yet)"
        return TrainingDiverged(
            f"{what} at step {step}; stopped. Last good checkpoint kept: {kept}. "
            "Lower the learning rate, enable grad_clip, or check the data."
        )


def _accumulate(
    model: ClipModel, defense: Defense, images: torch.Tensor, labels: torch.Tensor, micro: int,
    accum_steps: int, autocast: Callable[[], Any], diverged: Callable[[str], TrainingDiverged],
) -> dict[str, float]:
    """Back-propagate the defense's loss over ``accum_steps`` micro-batches of this rank's batch;
    return the loss logs averaged over them. A non-finite loss on any rank stops every rank."""
    logs: dict[str, float] = {}
    for k in range(accum_steps):
        x = images[k * micro : (k + 1) * micro].to(model.device)
        y = labels[k * micro : (k + 1) * micro].to(model.device)
        with autocast():
            out = defense.loss(model, x, y)  # attacks inside touch no parameter .grad
        loss = out.loss.float() / accum_steps
        bad = not bool(torch.isfinite(loss))
        if dist.all_reduce_any(bad, model.device):
            raise diverged(f"the loss is {out.loss.item()}" if bad else "the loss is NaN or inf on another rank")
        loss.backward()
        logs = {key: logs.get(key, 0.0) + v / accum_steps for key, v in out.logs.items()}
    return logs


def _apply_gradients(
    params: list[torch.nn.Parameter], optimizer, scheduler, cfg: TrainConfig,
    diverged: Callable[[str], TrainingDiverged],
) -> dict[str, float]:
    """Average gradients across ranks, refuse non-finite ones, clip, step optimiser and schedule;
    return the step's ``grad_norm`` (when clipping) and ``lr``."""
    dist.average_gradients(params)
    if not all_finite([p.grad for p in params if p.grad is not None]):  # identical on every rank now
        raise diverged("a gradient is NaN or inf")
    logs = {}
    if cfg.grad_clip:
        logs["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
    optimizer.step()
    scheduler.step()
    logs["lr"] = scheduler.get_last_lr()[0]
    return logs


def train(
    model: ClipModel,
    defense: Defense,
    data: Any,
    cfg: TrainConfig,
    checkpoint_dir: str | Path | None = None,
    run_hash: str = "",
    on_step: Callable[[int, dict], None] | None = None,
    batches: Batches | None = None,
    monitors: Sequence[Monitor] = (),
) -> list[dict]:
    """Train ``model`` in place with ``defense``'s loss; return one log dict per step.

    ``data``: anything with ``len``; batches are drawn as positions ``0 .. len(data) - 1``.
    ``batches(position_lists)`` yields ``(images in [0, 1], labels, positions)`` for each list, in
    order (a streaming DataLoader that may prefetch); by default ``data`` is a decoded dataset
    (:func:`in_memory_batches`).

    ``checkpoint_dir``: where ``last.pt`` is written every ``cfg.checkpoint_every`` steps and at the
    end; if it exists with the same ``run_hash``, training resumes from it (another hash raises
    :class:`CheckpointMismatch`; an unreadable ``last.pt`` falls back to ``previous.pt``, and none
    readable raises :class:`CheckpointUnreadable`). A non-finite loss, gradient or weight raises
    :class:`TrainingDiverged` and leaves the last good checkpoint in place.

    ``monitors``: see :class:`Monitor`; what they log joins each step's history.
    """
    world, rank = dist.world_size(), dist.rank()
    _check_batch_size(cfg, world, len(data))
    trainable = _trainable(model, defense)
    params = [p for _, p in trainable]
    optimizer = build_optimizer(trainable, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    model.eval()  # CLIP towers have no dropout or batch norm; the attack sees the trained function
    ckpt = _Checkpoint(Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir else None, run_hash, world)
    start, history = ckpt.resume(model, optimizer, scheduler)
    for monitor in monitors:
        monitor.resume(history)
    dist.broadcast_module(model.clip)  # replicas start identical, whatever each rank loaded
    if cfg.compile and model.device.type == "cuda":
        compile_towers(model)
    use_amp = cfg.amp and model.device.type == "cuda"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_amp else nullcontext

    micro = cfg.batch_size // (world * cfg.accum_steps)
    local_size = micro * cfg.accum_steps

    def local_batch(step: int) -> list[int]:
        idx = batch_indices(len(data), cfg.batch_size, step, cfg.seed)
        return idx[rank * local_size : (rank + 1) * local_size].tolist()

    stream = (batches or in_memory_batches(data))(local_batch(s) for s in range(start, cfg.steps))
    for step, (images, labels, _) in zip(range(start, cfg.steps), stream):
        n = step + 1  # steps are counted from 1 in logs, checkpoints and messages
        diverged = partial(ckpt.diverged, step=n)
        for monitor in monitors:
            monitor.begin(step)
        torch.manual_seed(step_seed(cfg.seed, step, rank))
        optimizer.zero_grad(set_to_none=True)
        drawn = defense.start_step(step, cfg.seed)  # same on every rank: (seed, step) alone
        logs = _accumulate(model, defense, images, labels, micro, cfg.accum_steps, autocast, diverged)
        logs.update(_apply_gradients(params, optimizer, scheduler, cfg, diverged))
        logs.update(drawn)
        logs.update(defense.attack_seconds())
        if "scale" in defense.trains:
            with torch.no_grad():
                model.clip.logit_scale.clamp_(max=math.log(cfg.logit_scale_max))
        for monitor in reversed(monitors):
            monitor.end(step, logs)
        history.append({"step": n, **logs})
        if on_step is not None:
            on_step(n, logs)
        if n % cfg.checkpoint_every == 0 or n == cfg.steps:
            ckpt.save(n, model, optimizer, scheduler, history, params)
    return history
