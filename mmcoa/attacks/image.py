"""Image attacks in pixel space: PGD under L-inf and L2.

Gradients are taken with ``torch.autograd.grad`` with respect to the input only, so running an
attack inside a training step never leaves gradients on the model's parameters.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from mmcoa.attacks.base import Attack, AttackParams, ImageObjective, register_attack


def _per_sample_norm(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (x.ndim - 1)))


def project(delta: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    """Project perturbations onto the eps-ball of ``norm`` (per sample)."""
    if norm == "linf":
        return delta.clamp(-eps, eps)
    return delta * (eps / _per_sample_norm(delta)).clamp(max=1.0)


class ImageAttack(Attack):
    kind = "image"

    def perturb(self, images: torch.Tensor, objective: ImageObjective, early_exit: bool = False) -> torch.Tensor:
        raise NotImplementedError


class PGDParams(AttackParams):
    norm: Literal["linf", "l2"] = "linf"
    eps_255: float = Field(1.0, ge=0, le=255, description="L-inf radius in 1/255 units")
    eps: float | None = Field(None, ge=0, description="L2 radius in pixel units (norm=l2)")
    step_255: float | None = Field(None, gt=0, description="L-inf step in 1/255 units; default eps/4")
    step: float | None = Field(None, gt=0, description="L2 step in pixel units; default eps/4")
    steps: int = Field(10, ge=0)
    restarts: int = Field(1, ge=1)
    random_start: bool = True


@register_attack("pgd")
class PGD(ImageAttack):
    """Projected gradient descent (Madry et al., ICLR 2018).

    Threat model: ||x' - x|| <= eps under L-inf (``eps_255``/255) or L2 (``eps``), x' in [0, 1].
    Random start inside the ball, then ``steps`` ascent steps (sign of the gradient for L-inf, the
    normalised gradient for L2), projected and clipped to [0, 1] after each. With several restarts
    (or ``early_exit``), the iterate that fools the objective is kept per sample.
    Shapes: images [B, C, H, W] in [0, 1] -> adversarial images of the same shape.
    """

    Params = PGDParams

    @property
    def eps(self) -> float:
        p = self.params
        return p.eps_255 / 255.0 if p.norm == "linf" else float(p.eps if p.eps is not None else 0.5)

    @property
    def step_size(self) -> float:
        p = self.params
        if p.norm == "linf":
            return (p.step_255 / 255.0) if p.step_255 is not None else self.eps / 4
        return p.step if p.step is not None else self.eps / 4

    def _random_start(self, x: torch.Tensor) -> torch.Tensor:
        if self.params.norm == "linf":
            return torch.empty_like(x).uniform_(-self.eps, self.eps)
        d = torch.randn_like(x)
        r = torch.rand(x.shape[0], *([1] * (x.ndim - 1)), device=x.device, dtype=x.dtype)
        return d / _per_sample_norm(d) * r * self.eps

    def perturb(self, images: torch.Tensor, objective: ImageObjective, early_exit: bool = False) -> torch.Tensor:
        p = self.params
        x0 = images.detach()
        best = x0.clone()
        if self.eps == 0 or p.steps == 0 and not p.random_start:
            return best
        all_idx = torch.arange(len(x0), device=x0.device)
        done = torch.zeros(len(x0), dtype=torch.bool, device=x0.device)
        for _ in range(p.restarts):
            active = all_idx[~done] if (early_exit or p.restarts > 1) else all_idx
            if len(active) == 0:
                break
            x_nat = x0[active]
            delta = self._random_start(x_nat) if p.random_start else torch.zeros_like(x_nat)
            x = (x_nat + delta).clamp(0, 1)
            for _ in range(p.steps):
                x.requires_grad_(True)
                out = objective(x, active)
                grad, = torch.autograd.grad(out.loss.sum(), x)
                x = x.detach()
                if out.fooled is not None and (early_exit or p.restarts > 1):
                    hit = out.fooled
                    if hit.any():
                        best[active[hit]] = x[hit]
                        done[active[hit]] = True
                        if early_exit:
                            keep = ~hit
                            active, x, x_nat, grad = active[keep], x[keep], x_nat[keep], grad[keep]
                            if len(active) == 0:
                                break
                if p.norm == "linf":
                    x = x + self.step_size * grad.sign()
                else:
                    x = x + self.step_size * grad / _per_sample_norm(grad)
                x = (x_nat + project(x - x_nat, p.norm, self.eps)).clamp(0, 1)
            if len(active) == 0:
                continue
            with torch.no_grad():
                out = objective(x, active)
            if out.fooled is None:
                best[active] = x
                if p.restarts == 1:
                    break
                continue
            # The final iterate is kept where it fools, and for samples no restart has fooled yet.
            take = out.fooled | ~done[active]
            best[active[take]] = x[take]
            done[active[out.fooled]] = True
        return best
