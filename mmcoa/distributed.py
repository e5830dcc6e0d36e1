"""Data-parallel helpers for torchrun (gloo on CPU, nccl on CUDA); no-ops in a single process.

Training does not wrap the model in DistributedDataParallel: defenses call the encoders directly
(and run attacks on the plain module), which DDP's forward hooks would not see. Instead, each step
averages gradients across ranks explicitly (:func:`average_gradients`), and contrastive losses
gather features with autograd (:func:`gather_with_grad`) so every rank sees the global batch.
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


def gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` from all ranks along dim 0, keeping gradients to the local part."""
    if not is_distributed():
        return t
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(t.contiguous()), dim=0)


def gather(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` from all ranks (no gradients)."""
    if not is_distributed():
        return t
    parts = [torch.empty_like(t) for _ in range(world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim=0)


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """All-reduce the gradients of ``params`` to their mean across ranks (one flat buffer)."""
    if not is_distributed():
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(t)
    return t


def all_reduce_any(flag: bool, device: torch.device) -> bool:
    """True on every rank if any rank passed True (e.g. a non-finite loss)."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    return bool(all_reduce_sum(t).item() > 0)
