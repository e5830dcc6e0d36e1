"""One training loop for every defense (and for pre-training from scratch).

Read top to bottom: pick the trainable towers, build the optimiser and schedule, resume from the
last checkpoint if there is one, then for each step draw the step's batch, let the defense build
its adversarial examples and loss, back-propagate, average gradients across ranks, clip, step,
clamp the logit scale, and checkpoint now and then.

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
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

from mmcoa import distributed as dist
from mmcoa.defenses import Defense
from mmcoa.models import ClipModel, tower_of

CHECKPOINT_NAME = "last.pt"
COMPILE_PREFIX = "_orig_mod."


class TrainingDiverged(RuntimeError):
    """The loss, a gradient or a weight became NaN or inf; the last good checkpoint is kept."""


class CheckpointMismatch(RuntimeError):
    """A checkpoint on disk was written with other params; refusing to resume from it."""


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


def build_optimizer(named: list[tuple[str, torch.nn.Parameter]], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer not in ("adam", "adamw", "sgd"):
        raise ValueError(f"unknown optimizer '{cfg.optimizer}'; use adam, adamw or sgd")
    groups = _decay_groups(named, cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9)
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    # Adam's weight_decay is L2 in the gradient (the authors' choice); AdamW decouples it.
    return cls(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    """Linear warm-up over ``warmup_steps``, then constant or cosine decay to zero at ``steps``."""
    if cfg.schedule not in ("constant", "cosine"):
        raise ValueError(f"unknown schedule '{cfg.schedule}'; use constant or cosine")

    def f(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "cosine":
            span = max(cfg.steps - cfg.warmup_steps, 1)
            return 0.5 * (1 + math.cos(math.pi * min(step - cfg.warmup_steps, span) / span))
        return 1.0

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


def _save_atomic(path: Path, state: dict) -> None:
    """Write to a temporary file, flush it to disk, then rename: a kill never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
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


def train(
    model: ClipModel,
    defense: Defense,
    data: Any,
    cfg: TrainConfig,
    checkpoint_dir: str | Path | None = None,
    run_hash: str = "",
    on_step: Callable[[int, dict], None] | None = None,
    batches: Batches | None = None,
) -> list[dict]:
    """Train ``model`` in place with ``defense``'s loss; return one log dict per step.

    ``data``: anything with ``len``; batches are drawn as positions ``0 .. len(data) - 1``.
    ``batches(position_lists)`` yields ``(images in [0, 1], labels, positions)`` for each list, in
    order (a streaming DataLoader that may prefetch); by default ``data`` is a decoded dataset
    (:func:`in_memory_batches`).

    ``checkpoint_dir``: where ``last.pt`` is written every ``cfg.checkpoint_every`` steps and at the
    end; if it exists with the same ``run_hash``, training resumes from it (another hash raises
    :class:`CheckpointMismatch`). A non-finite loss, gradient or weight raises
    :class:`TrainingDiverged` and leaves the last good checkpoint in place.
    """
    device = model.device
    world, rank = dist.world_size(), dist.rank()
    if cfg.batch_size % (world * cfg.accum_steps):
        raise ValueError(
            f"batch_size {cfg.batch_size} must divide by world size x accum_steps = {world * cfg.accum_steps}"
        )
    if len(data) < cfg.batch_size:
        raise ValueError(f"batch_size {cfg.batch_size} is larger than the training set ({len(data)} samples)")

    # Which towers train is the defense's choice; the rest is frozen (no grads, no optimiser state).
    trainable = []
    for name, p in model.clip.named_parameters():
        p.requires_grad_(tower_of(name.replace(COMPILE_PREFIX, "")) in defense.trains)
        if p.requires_grad:
            trainable.append((name, p))
    params = [p for _, p in trainable]
    optimizer = build_optimizer(trainable, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    model.eval()  # CLIP towers have no dropout or batch norm; the attack sees the trained function
    trains_scale = "scale" in defense.trains

    use_amp = cfg.amp and device.type == "cuda"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_amp else nullcontext

    # Resume: weights, optimiser, schedule, RNG and history of the last checkpoint of this run.
    start, history, saved_at = 0, [], None
    ckpt = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir else None
    if ckpt is not None and ckpt.is_file():
        state = torch.load(ckpt, map_location=device, weights_only=True)
        if state.get("run_hash") != run_hash:
            raise CheckpointMismatch(
                f"{ckpt} was written by a run with other params (hash {state.get('run_hash')} != {run_hash}); "
                "delete it to start over, or restore the params it was made with"
            )
        _plain(model.clip).load_state_dict(clean_state_dict(state["model"]))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        start, history, saved_at = int(state["step"]), json.loads(state["history"]), int(state["step"])
    dist.broadcast_module(model.clip)  # replicas start identical, whatever each rank loaded
    if cfg.compile and device.type == "cuda":
        compile_towers(model)

    def diverged(what: str, step: int) -> TrainingDiverged:
        kept = f"{ckpt} (step {saved_at})" if saved_at is not None else "none (no checkpoint written yet)"
        return TrainingDiverged(
            f"{what} at step {step}; stopped. Last good checkpoint kept: {kept}. "
            "Lower the learning rate, enable grad_clip, or check the data."
        )

    def checkpoint(step: int) -> None:
        nonlocal saved_at
        if ckpt is None:
            return
        if not all_finite(params):  # never overwrite a good checkpoint with broken weights
            raise diverged("a weight is NaN or inf", step)
        if dist.is_main():
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            _save_atomic(ckpt, {
                "model": clean_state_dict(model.clip.state_dict()), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "rng": _rng_state(), "step": step,
                "run_hash": run_hash, "world_size": world, "history": json.dumps(history),
            })
        saved_at = step

    micro = cfg.batch_size // (world * cfg.accum_steps)
    local_size = micro * cfg.accum_steps

    def local_batch(step: int) -> list[int]:
        idx = batch_indices(len(data), cfg.batch_size, step, cfg.seed)
        return idx[rank * local_size : (rank + 1) * local_size].tolist()

    stream = (batches or in_memory_batches(data))(local_batch(s) for s in range(start, cfg.steps))
    for step, (step_images, step_labels, _) in zip(range(start, cfg.steps), stream):
        n = step + 1  # steps are counted from 1 in logs, checkpoints and messages
        torch.manual_seed(step_seed(cfg.seed, step, rank))
        optimizer.zero_grad(set_to_none=True)
        logs: dict[str, float] = {}
        for k in range(cfg.accum_steps):
            images = step_images[k * micro : (k + 1) * micro].to(device)
            labels = step_labels[k * micro : (k + 1) * micro].to(device)
            with autocast():
                out = defense.loss(model, images, labels)  # attacks inside touch no parameter .grad
            loss = out.loss.float() / cfg.accum_steps
            bad = not bool(torch.isfinite(loss))
            if dist.all_reduce_any(bad, device):
                raise diverged(f"the loss is {out.loss.item()}" if bad else "the loss is NaN or inf on another rank", n)
            loss.backward()
            logs = {key: logs.get(key, 0.0) + v / cfg.accum_steps for key, v in out.logs.items()}
        dist.average_gradients(params)
        grads = [p.grad for p in params if p.grad is not None]
        if not all_finite(grads):  # identical on every rank after averaging
            raise diverged("a gradient is NaN or inf", n)
        if cfg.grad_clip:
            logs["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
        optimizer.step()
        scheduler.step()
        if trains_scale:
            with torch.no_grad():
                model.clip.logit_scale.clamp_(max=math.log(cfg.logit_scale_max))
        logs["lr"] = scheduler.get_last_lr()[0]
        history.append({"step": n, **logs})
        if on_step is not None:
            on_step(n, logs)
        if n % cfg.checkpoint_every == 0 or n == cfg.steps:
            checkpoint(n)
    return history
