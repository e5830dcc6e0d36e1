"""Data-parallel helpers for torchrun (gloo on CPU, nccl on CUDA); no-ops in a single process.

Training does not wrap the model in DistributedDataParallel: defenses call the encoders directly
(and run attacks on the plain module), which DDP's forward hooks would not see. Instead, each step
averages gradients across ranks explicitly (:func:`average_gradients`), and contrastive losses
gather features with autograd (:func:`gather_with_grad`) so every rank sees the global batch.

Why the two compose to the single-process gradient. Let L be a loss every rank computes
identically from the gathered features F = [F_0, ..., F_{W-1}] (F_r computed on rank r), and let
per-sample losses be means over the local batch. The backward of the gather is a sum over ranks
(a reduce-scatter), so rank r receives W * dL/dF_r for its own features: its parameter gradient is
W * (dL/dtheta through F_r) plus dL/dtheta through what it computes locally and identically on every
rank (the logit scale). Averaging over ranks gives sum_r (dL/dtheta through F_r) + dL/dtheta directly,
which is exactly dL/dtheta of the single-process loss on the global batch. For per-sample losses,
the mean of local means is the global mean (all ranks hold the same number of samples).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def init_from_env(device: torch.device) -> None:
    """Join the process group torchrun describes in the environment (WORLD_SIZE > 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not is_distributed():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def barrier() -> None:
    if is_distributed():
        dist.barrier()


class _GatherWithGrad(torch.autograd.Function):
    """all_gather forward; backward = the sum over ranks of the gradient of the local slice."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        ctx.n, ctx.rank = t.shape[0], rank()
        parts = [torch.empty_like(t) for _ in range(world_size())]
        dist.all_gather(parts, t)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)  # every rank's loss depends on this rank's features
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n]


def gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` from all ranks along dim 0, keeping gradients to the local part.

    The backward sums the incoming gradients of every rank into the local part (see the module
    docstring for why averaging parameter gradients afterwards is then exact). All ranks must
    pass the same shape.
    """
    if not is_distributed():
        return t
    return _GatherWithGrad.apply(t.contiguous())


def gather(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` from all ranks (no gradients)."""
    if not is_distributed():
        return t
    parts = [torch.empty_like(t) for _ in range(world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim=0)


def _flat_apply(tensors: list[torch.Tensor], op) -> None:
    """Run ``op`` on one flat buffer holding ``tensors`` (one collective instead of hundreds)."""
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    op(flat)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """All-reduce the gradients of ``params`` to their mean across ranks (one flat buffer).

    Parameters without a gradient are skipped, as a single process's optimiser skips them; every
    rank runs the same loss on the same number of samples, so the set is the same on every rank.
    """
    if not is_distributed():
        return
    world = world_size()

    def mean(flat: torch.Tensor) -> None:
        dist.all_reduce(flat)
        flat /= world

    _flat_apply([p.grad for p in params if p.grad is not None], mean)


@torch.no_grad()
def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Copy parameters and buffers from rank ``src`` to every rank (replicas start identical)."""
    if not is_distributed():
        return
    tensors = [t for t in list(module.parameters()) + list(module.buffers()) if t.is_floating_point()]
    _flat_apply(tensors, lambda flat: dist.broadcast(flat, src))


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(t)
    return t


def all_reduce_any(flag: bool, device: torch.device) -> bool:
    """True on every rank if any rank passed True (e.g. a non-finite loss)."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    return bool(all_reduce_sum(t).item() > 0)
