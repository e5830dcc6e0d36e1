"""Image attacks in pixel space: PGD under L-inf and L2, and the helpers APGD shares.

Gradients are taken with ``torch.autograd.grad`` with respect to the input only, so running an
attack inside a training step never leaves gradients on the model's parameters.

Which point an attack returns, per sample: the first iterate at which the objective reported the
sample fooled, unless the final iterate fools it too (then the final one). Samples never fooled get
the final iterate. So ``early_exit=True`` (a fooled sample leaves the batch at once) returns a
fooling point for exactly the samples the full run would, and robust accuracy does not change.
Random starts are drawn per sample (``mmcoa.attacks.streams``): a sample's start depends on the
seed, the restart and the sample alone, never on its batch, on which samples are still active or on
the mode. With restarts, one run (``PGD.run``) returns a point and a fooled flag for
every sample it attacked, whether the sample stayed to the end or left early; the restart loop
(``PGD.forward``) only merges runs, so a sample fooled in any restart keeps that restart's point.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from mmcoa.attacks.base import Attack, AttackParams, ImageObjective, register_attack
from mmcoa.attacks.streams import SampleStreams


def _per_sample_norm(x: torch.Tensor) -> torch.Tensor:
    """[B, ...] -> [B, 1, ..., 1] L2 norms (clamped away from 0, so dividing by it is safe)."""
    return torch.linalg.vector_norm(x.flatten(1), dim=1).clamp_min(1e-12).view(-1, *([1] * (x.ndim - 1)))


def project(delta: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    """Project perturbations onto the eps-ball of ``norm`` (per sample)."""
    if norm == "linf":
        return delta.clamp(-eps, eps)
    return delta * (eps / _per_sample_norm(delta)).clamp(max=1.0)


class Ball:
    """The feasible set {x : ||x - x_nat|| <= eps, 0 <= x <= 1} of a batch, with in-place steps.

    Per-sample state (the clean images, and the box bounds for L-inf) is indexed with
    :meth:`select` when samples leave the batch.
    """

    def __init__(self, x_nat: torch.Tensor, norm: str, eps: float):
        self.x_nat, self.norm, self.eps = x_nat, norm, eps
        if norm == "linf":
            # L-inf ball intersected with the [0, 1] box is a box: two clamps per projection.
            self.lo = (x_nat - eps).clamp_(min=0.0)
            self.hi = (x_nat + eps).clamp_(max=1.0)

    def select(self, keep: torch.Tensor) -> Ball:
        sub = Ball.__new__(Ball)
        sub.x_nat, sub.norm, sub.eps = self.x_nat[keep], self.norm, self.eps
        if self.norm == "linf":
            sub.lo, sub.hi = self.lo[keep], self.hi[keep]
        return sub

    def project_(self, x: torch.Tensor) -> torch.Tensor:
        """Project ``x`` in place (L2: onto the ball, then clip to [0, 1], which only shrinks it)."""
        if self.norm == "linf":
            return x.clamp_(self.lo, self.hi)
        x.sub_(self.x_nat)
        x.mul_((self.eps / _per_sample_norm(x)).clamp_(max=1.0))
        return x.add_(self.x_nat).clamp_(0.0, 1.0)

    def ascent_(self, x: torch.Tensor, grad: torch.Tensor, step: float | torch.Tensor) -> torch.Tensor:
        """x += step * direction(grad), in place. ``step`` a float or a [B, 1, ..., 1] tensor."""
        # Out of place on grad: autograd may hand back a broadcast view that cannot be written.
        direction = grad.sign() if self.norm == "linf" else grad / _per_sample_norm(grad)
        if isinstance(step, torch.Tensor):
            return x.addcmul_(direction, step)
        return x.add_(direction, alpha=step)

    def random_start(self, streams: SampleStreams, stream: str, rows: torch.Tensor) -> torch.Tensor:
        """A random point of the set for each of ``rows`` [m]: uniform in the L-inf box, uniform
        radius and direction for L2. Each sample's draw comes from its own stream (``streams``), so
        it is the same whatever batch the sample is in."""
        x = self.x_nat[rows]
        shape = tuple(x.shape[1:])
        if self.norm == "linf":
            eps = self.eps
            noise = streams.draw(stream, rows, lambda g: torch.empty(shape).uniform_(-eps, eps, generator=g))
        else:
            def direction_and_radius(g: torch.Generator) -> torch.Tensor:
                d = torch.randn(shape, generator=g)
                return d.div_(d.norm().clamp_min(1e-12)).mul_(float(torch.rand((), generator=g)) * self.eps)

            noise = streams.draw(stream, rows, direction_and_radius)
        return noise.add_(x).clamp_(0.0, 1.0)


class ImageAttack(Attack):
    """Image attacks: ``perturb(images [B, C, H, W] in [0, 1], objective, early_exit=False)``.

    Subclasses implement ``forward(x_nat, objective, early_exit)`` on detached images; the template
    method ``perturb`` (``Attack.perturb``) returns a copy of the images for an empty batch or a zero
    radius without calling it.
    """

    kind = "image"

    def perturb(self, images: torch.Tensor, objective: ImageObjective, early_exit: bool = False) -> torch.Tensor:
        return super().perturb(images.detach(), objective, early_exit=early_exit)

    def forward(self, x_nat: torch.Tensor, objective: ImageObjective, early_exit: bool = False) -> torch.Tensor:
        raise NotImplementedError

    def is_identity(self) -> bool:
        return getattr(self.params, "radius", None) == 0

    def unchanged(self, images: torch.Tensor) -> torch.Tensor:
        return images.detach().clone()

    def streams(self, x_nat: torch.Tensor) -> SampleStreams:
        """The per-sample random streams of one call on ``x_nat``: seeded with ``params.seed``, or
        else with torch's current global seed (see :mod:`mmcoa.attacks.streams`)."""
        seed = getattr(self.params, "seed", None)
        return SampleStreams(torch.initial_seed() if seed is None else seed, x_nat)


class BudgetParams(AttackParams):
    """The threat model shared by the image attacks: norm and radius, in pixel space [0, 1]."""

    norm: Literal["linf", "l2"] = "linf"
    eps_255: float = Field(1.0, ge=0, le=255, description="L-inf radius in 1/255 units")
    eps: float | None = Field(None, ge=0, description="L2 radius in pixel units (norm=l2); default 0.5")
    seed: int | None = Field(None, description="seed of the random draws; None: torch's global seed (torch.initial_seed())")

    @model_validator(mode="after")
    def _budget_matches_norm(self):
        # A radius given in the other norm's units is a typo that would silently attack at the default.
        if self.norm == "l2" and "eps_255" in self.model_fields_set:
            raise ValueError("eps_255 is the L-inf radius; give the L2 radius as eps")
        if self.norm == "linf" and self.eps is not None:
            raise ValueError("eps is the L2 radius; give the L-inf radius as eps_255")
        return self

    @property
    def radius(self) -> float:
        """eps in pixel units: eps_255 / 255 for L-inf, eps (default 0.5) for L2."""
        if self.norm == "linf":
            return self.eps_255 / 255.0
        return float(self.eps if self.eps is not None else 0.5)


class PGDParams(BudgetParams):
    step_255: float | None = Field(None, gt=0, description="L-inf step in 1/255 units; default eps/4")
    step: float | None = Field(None, gt=0, description="L2 step in pixel units; default eps/4")
    steps: int = Field(10, ge=0)
    restarts: int = Field(1, ge=1)
    random_start: bool = True

    @model_validator(mode="after")
    def _step_matches_norm(self):
        if self.norm == "l2" and self.step_255 is not None:
            raise ValueError("step_255 is the L-inf step; give the L2 step as step")
        if self.norm == "linf" and self.step is not None:
            raise ValueError("step is the L2 step; give the L-inf step as step_255")
        return self


# Early exit never shrinks a batch below this many samples: CPU matrix kernels round differently on
# very small batches, and a sample's trajectory must not depend on how many others are still active.
MIN_BATCH = 16


def survivors(live: torch.Tensor) -> torch.Tensor | None:
    """Which rows stay in the batch once the fooled ones may leave (``live``: not fooled yet).

    None: keep every row. Otherwise a mask holding every live row, topped up with fooled ones
    ("passengers", whose results are ignored) up to ``MIN_BATCH`` rows. Call only with a live row.
    """
    n_live, n = int(live.sum()), len(live)
    n_keep = max(n_live, min(MIN_BATCH, n))
    if n_keep == n:
        return None
    keep = live.clone()
    if n_keep > n_live:
        keep[(~live).nonzero().squeeze(1)[: n_keep - n_live]] = True
    return keep


class FoolTracker:
    """Per-sample record of the first iterate at which the objective reported a sample fooled."""

    def __init__(self, x_nat: torch.Tensor):
        self.n = len(x_nat)
        self.ever = torch.zeros(self.n, dtype=torch.bool, device=x_nat.device)
        self.x: torch.Tensor | None = None  # allocated on the first success
        self._like = x_nat

    def record(self, rows: torch.Tensor, fooled: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Store x[j] for fooled samples not fooled before (``rows[j]`` their batch row); returns that mask."""
        new = fooled & ~self.ever[rows]
        if new.any():
            if self.x is None:
                self.x = torch.empty_like(self._like)
            picked = rows[new]
            self.x[picked] = x[new]
            self.ever[picked] = True
        return new


@register_attack("pgd")
class PGD(ImageAttack):
    """Projected gradient descent (Madry et al., "Towards Deep Learning Models Resistant to
    Adversarial Attacks", ICLR 2018).

    Threat model: ||x' - x|| <= eps under L-inf (``eps_255``/255) or L2 (``eps``), x' in [0, 1],
    projected in pixel space (before CLIP's normalisation).

    Args:
        norm: ``linf`` | ``l2``.
        eps_255 / eps: the radius (L-inf in 1/255 units / L2 in pixels, default 0.5).
        step_255 / step: the step (default eps/4): sign of the gradient for L-inf, the gradient
            normalised to unit L2 norm for L2.
        steps: ascent steps per restart; restarts: runs from fresh random starts, each on the
            samples no earlier run fooled; random_start: start uniformly inside the ball (else at x).
        seed: seed of the random starts (None: torch's global RNG).

    ``perturb(images [B, C, H, W] in [0, 1], objective, early_exit=False) -> [B, C, H, W]``.
    Returned per sample: the final iterate, except where it does not fool the objective but an
    earlier iterate did (that one is returned). With ``early_exit`` a sample leaves the batch at its
    first fooling iterate; robust accuracy is the same either way, with any number of restarts.
    Cost per run: ``steps`` forward+backward passes, plus one forward over the samples fooled before
    the end (none with ``early_exit``), and before the last restart one over the samples left.
    """

    Params = PGDParams

    @property
    def eps(self) -> float:
        return self.params.radius

    @property
    def step_size(self) -> float:
        p = self.params
        if p.norm == "linf":
            return (p.step_255 / 255.0) if p.step_255 is not None else self.eps / 4
        return p.step if p.step is not None else self.eps / 4

    def is_identity(self) -> bool:
        p = self.params
        return self.eps == 0 or (p.steps == 0 and not p.random_start)

    def forward(self, x_nat: torch.Tensor, objective: ImageObjective, early_exit: bool = False) -> torch.Tensor:
        """Restarts: each run attacks the samples no earlier run fooled; results merged per sample."""
        p = self.params
        streams = self.streams(x_nat) if p.random_start else None
        ball = Ball(x_nat, p.norm, self.eps)
        all_rows = torch.arange(len(x_nat), device=x_nat.device)
        result, fooled, best_loss = x_nat.clone(), None, None
        for restart in range(p.restarts):
            rows = all_rows if fooled is None else all_rows[~fooled]
            if len(rows) == 0:
                break
            # Each sample's start of each restart is its own draw, whoever else is left.
            start = ball.random_start(streams, f"pgd/{restart}", rows) if p.random_start else x_nat[rows]
            sub = ball if len(rows) == len(x_nat) else ball.select(rows)
            last = restart == p.restarts - 1
            adv, run_fooled = self.run(sub, start, rows, objective, early_exit, flag_all=not last)
            if run_fooled is None:  # no fooled mask: keep, per sample, the restart of higher loss
                if p.restarts == 1:
                    return adv
                with torch.no_grad():
                    loss = objective(adv, rows).loss.detach()
                better = loss > best_loss if best_loss is not None else torch.ones_like(loss, dtype=torch.bool)
                result[rows[better]] = adv[better]
                best_loss = loss if best_loss is None else torch.maximum(loss, best_loss)
                continue
            result[rows] = adv
            if fooled is None:
                fooled = torch.zeros(len(x_nat), dtype=torch.bool, device=x_nat.device)
            fooled[rows] = run_fooled
        return result

    def run(
        self, ball: Ball, x: torch.Tensor, rows: torch.Tensor, objective: ImageObjective, early_exit: bool, flag_all: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One PGD run from the start ``x`` [m, ...] (owned) on the objective's rows ``rows`` [m].

        Returns the point per sample (the final iterate if it fools, else the first fooling iterate,
        else the final one) and which samples it fools ([m] bool; None when the objective has no
        fooled mask). ``flag_all=False`` skips checking the final iterate of samples never fooled
        (their flag then only covers the iterates the gradient steps evaluated).
        """
        pos = torch.arange(len(rows), device=x.device)  # active samples' positions in the output
        fools = FoolTracker(x)
        has_mask, step = True, self.step_size
        for _ in range(self.params.steps):
            x.requires_grad_(True)
            out = objective(x, rows[pos])
            (grad,) = torch.autograd.grad(out.loss.sum(), x)
            x.requires_grad_(False)
            with torch.no_grad():
                if out.fooled is None:
                    has_mask = False
                elif fools.record(pos, out.fooled, x).any() and early_exit:
                    keep = leave_fooled(fools, pos)
                    if keep is not None and not keep.any():  # everyone fooled: iterates in fools.x
                        pos = pos[:0]
                        break
                    if keep is not None:
                        pos, ball, x, grad = pos[keep], ball.select(keep), x[keep], grad[keep]
                ball.project_(ball.ascent_(x, grad, step))
        if not has_mask:
            return x, None
        with torch.no_grad():
            return self._settle(fools, pos, x, rows, objective, flag_all)

    @staticmethod
    def _settle(fools, pos, x, rows, objective, flag_all):
        """Per sample: the final iterate where it fools, else the first fooling one (``fools.x``)."""
        result = fools.x.clone() if fools.x is not None else torch.empty_like(fools._like)
        if len(pos) == 0:
            return result, fools.ever
        result[pos] = x
        check = torch.ones_like(pos, dtype=torch.bool) if flag_all else fools.ever[pos]
        if not check.any():
            return result, fools.ever
        padded = survivors(check)  # never a tiny batch (the rows added are ignored)
        check = padded if padded is not None else torch.ones_like(check)
        checked = pos[check]
        fin = objective(x[check], rows[checked]).fooled
        if fin is None:  # steps=0: the objective was never asked before
            return result, None
        stale = checked[fools.ever[checked] & ~fin]
        if len(stale):  # (fools.x exists exactly when some sample was fooled before the end)
            result[stale] = fools.x[stale]
        fools.ever[checked[fin]] = True
        return result, fools.ever


def leave_fooled(fools: FoolTracker, pos: torch.Tensor) -> torch.Tensor | None:
    """Early exit: which active rows stay once the fooled ones leave (see :func:`survivors`).

    None: every row stays; an all-False mask: none is left.
    """
    live = ~fools.ever[pos]
    if not live.any():
        return torch.zeros_like(live)
    return survivors(live)
