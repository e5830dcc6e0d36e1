"""One training loop for every defense (and for pre-training from scratch).

Read top to bottom: pick the trainable towers, build the optimiser and schedule, resume from the
last checkpoint if there is one, then for each step draw the step's batch, let the defense build
its adversarial examples and loss, back-propagate, average gradients across ranks, clip, step,
clamp the logit scale, and checkpoint now and then.

Determinism: the batch of step s and the RNG used by step s's attacks are both derived from
(seed, s, rank), so a run killed at any point and resumed from its last checkpoint ends with the
same weights as a run that never stopped.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from mmcoa import distributed as dist
from mmcoa.data import PreparedDataset
from mmcoa.defenses import Defense
from mmcoa.models import ClipModel, tower_of

CHECKPOINT_NAME = "last.pt"


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf; the last good checkpoint is kept."""


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


def _decay_groups(named: list[tuple[str, torch.nn.Parameter]], weight_decay: float) -> list[dict]:
    """No weight decay on gains, biases, embeddings of position and the logit scale (as open_clip)."""
    def exclude(n: str, p: torch.nn.Parameter) -> bool:
        return p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n or "embedding" in n

    decay = [p for n, p in named if not exclude(n, p)]
    no_decay = [p for n, p in named if exclude(n, p)]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(named: list[tuple[str, torch.nn.Parameter]], cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = _decay_groups(named, cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9)
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    # Adam's weight_decay is L2 in the gradient (the authors' choice); AdamW decouples it.
    return cls(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    def f(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "cosine":
            span = max(cfg.steps - cfg.warmup_steps, 1)
            return 0.5 * (1 + math.cos(math.pi * min(step - cfg.warmup_steps, span) / span))
        return 1.0

    return f


def _save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def train(
    model: ClipModel,
    defense: Defense,
    data: PreparedDataset,
    cfg: TrainConfig,
    checkpoint_dir: str | Path | None = None,
    run_hash: str = "",
    on_step: Callable[[int, dict], None] | None = None,
) -> list[dict]:
    """Train ``model`` in place with ``defense``'s loss; return one log dict per step.

    ``checkpoint_dir``: where ``last.pt`` is written every ``cfg.checkpoint_every`` steps and at the
    end; if it exists with the same ``run_hash``, training resumes from it.
    """
    device = model.device
    world, rank = dist.world_size(), dist.rank()
    if cfg.batch_size % (world * cfg.accum_steps):
        raise ValueError(
            f"batch_size {cfg.batch_size} must divide by world size x accum_steps = {world * cfg.accum_steps}"
        )

    # Which towers train is the defense's choice; the rest is frozen (no grads, no optimiser state).
    trainable = []
    for name, p in model.clip.named_parameters():
        p.requires_grad_(tower_of(name) in defense.trains)
        if p.requires_grad:
            trainable.append((name, p))
    params = [p for _, p in trainable]
    optimizer = build_optimizer(trainable, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    model.eval()  # CLIP towers have no dropout or batch norm; the attack sees the trained function

    use_amp = cfg.amp and device.type == "cuda"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_amp else nullcontext
    if cfg.compile and device.type == "cuda":
        model.clip = torch.compile(model.clip)

    start, history = 0, []
    ckpt = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir else None
    if ckpt is not None and ckpt.is_file():
        state = torch.load(ckpt, map_location=device, weights_only=True)
        if state["run_hash"] != run_hash:
            raise CheckpointMismatch(
                f"{ckpt} was written by a run with other params (hash {state['run_hash']} != {run_hash}); "
                "delete it to start over, or restore the params it was made with"
            )
        model.clip.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng_cpu"])
        start, history = int(state["step"]), json.loads(state["history"])

    def checkpoint(step: int) -> None:
        if ckpt is None or not dist.is_main():
            return
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        _save_checkpoint(ckpt, {
            "model": model.clip.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "rng_cpu": torch.get_rng_state(),
            "step": step, "run_hash": run_hash, "history": json.dumps(history),
        })

    micro = cfg.batch_size // (world * cfg.accum_steps)
    for step in range(start, cfg.steps):
        torch.manual_seed(cfg.seed * 1_000_003 + step * 1_009 + rank)
        idx = batch_indices(len(data), cfg.batch_size, step, cfg.seed)
        local = idx[rank * micro * cfg.accum_steps : (rank + 1) * micro * cfg.accum_steps]
        optimizer.zero_grad(set_to_none=True)
        logs: dict[str, float] = {}
        for k in range(cfg.accum_steps):
            part = local[k * micro : (k + 1) * micro]
            images = data.float_images(part).to(device)
            labels = data.labels[part].to(device)
            with autocast():
                out = defense.loss(model, images, labels)
            loss = out.loss.float() / cfg.accum_steps
            if dist.all_reduce_any(not torch.isfinite(loss).item(), device):
                raise TrainingDiverged(
                    f"loss is {out.loss.item()} at step {step}; the last good checkpoint"
                    f" ({ckpt or 'none: checkpoint_dir not set'}) is kept. Lower the learning rate,"
                    " enable grad_clip, or check the data."
                )
            loss.backward()
            logs = {k2: logs.get(k2, 0.0) + v / cfg.accum_steps for k2, v in out.logs.items()}
        dist.average_gradients(params)
        if cfg.grad_clip:
            logs["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            model.clip.logit_scale.clamp_(max=math.log(cfg.logit_scale_max))
        logs["lr"] = scheduler.get_last_lr()[0]
        history.append({"step": step + 1, **logs})
        if on_step is not None:
            on_step(step + 1, logs)
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            checkpoint(step + 1)
    return history


def config_dict(cfg: TrainConfig) -> dict:
    return asdict(cfg)
