"""APGD-CE, APGD-T and the AutoAttack suite "aa" (Croce & Hein, "Reliable evaluation of adversarial
robustness with an ensemble of diverse parameter-free attacks", ICML 2020).

Written from the paper's Algorithm 1 and Section 3: projected gradient ascent whose step size
starts at 2 * eps and is halved at checkpoints w_j = ceil(p_j * N) (p_0 = 0, p_1 = 0.22,
p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)) when

* condition 1: the loss increased in fewer than rho = 0.75 of the steps since the last checkpoint, or
* condition 2: the step was not halved at the last checkpoint and the best loss has not improved since;

after a halving the iterate restarts from the best point found so far. Each step mixes the projected
gradient step z with the previous step (momentum alpha = 0.75):
x_{k+1} = P(x_k + alpha (z_{k+1} - x_k) + (1 - alpha) (x_k - x_{k-1})).

Every attack here first evaluates the clean images (a sample the objective already counts as fooled
is left clean, as AutoAttack does) and returns, per sample, the first iterate that fooled it, or else
the point of highest loss. With ``early_exit=True`` a fooled sample leaves the batch at once; since
every update is per sample and random starts are drawn for the whole batch, robust accuracy is the
same as without. Gradients come from ``torch.autograd.grad`` with respect to the input only.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

from mmcoa.attacks.base import AttackError, ImageObjective, register_attack
from mmcoa.attacks.image import Ball, BudgetParams, ImageAttack, FoolTracker, survivors

RHO = 0.75  # condition 1: share of steps in a checkpoint window that must increase the loss
ALPHA = 0.75  # weight of the new gradient step against the previous step (momentum)


def checkpoints(n_iter: int) -> list[int]:
    """The iterations w_1 < w_2 < ... <= n_iter at which the step size may be halved."""
    p = [0.0, 0.22]
    while True:
        nxt = round(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06), 10)
        if nxt > 1.0:
            break
        p.append(nxt)
    return sorted({math.ceil(round(q * n_iter, 6)) for q in p[1:]} - {0})


def apgd_run(
    objective: ImageObjective,
    x_nat: torch.Tensor,
    rows: torch.Tensor,
    start: torch.Tensor,
    norm: str,
    eps: float,
    steps: int,
    early_exit: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """One APGD run maximising ``objective(x, rows).loss`` from ``start``.

    Args:
        x_nat: [m, C, H, W] clean images; rows: [m] their rows in the objective's batch;
        start: [m, C, H, W] a feasible starting point (owned: modified in place).
    Returns:
        images [m, C, H, W] (first fooling iterate, else the best-loss one), fooled [m] (None when
        the objective has no fooled mask), best loss [m] (+inf for samples that left early).
    """
    m = len(rows)
    pos = torch.arange(m, device=x_nat.device)  # position of each active sample in the output
    ball = Ball(x_nat, norm, eps)
    fools = FoolTracker(x_nat)

    def evaluate(x: torch.Tensor, idx: torch.Tensor, need_grad: bool):
        if not need_grad:
            with torch.no_grad():
                out = objective(x, idx)
            return out.loss.detach(), None, out.fooled
        x.requires_grad_(True)
        out = objective(x, idx)
        (grad,) = torch.autograd.grad(out.loss.sum(), x)
        x.requires_grad_(False)
        return out.loss.detach(), grad, out.fooled

    x = start
    loss, grad, fooled = evaluate(x, rows, steps > 0)
    has_mask = fooled is not None
    with torch.no_grad():
        x_prev = x
        x_best, g_best = x.clone(), (grad.clone() if grad is not None else None)
        f_best, f_prev = loss.clone(), loss
        eta = torch.full((m,) + (1,) * (x.ndim - 1), 2.0 * eps, dtype=x.dtype, device=x.device)
        increases = torch.zeros(m, dtype=torch.int32, device=x.device)
        f_best_at_ckpt = f_best.clone()
        halved_at_ckpt = torch.zeros(m, dtype=torch.bool, device=x.device)
        last_ckpt, ckpts = 0, set(checkpoints(steps))

        def leave(keep: torch.Tensor):
            nonlocal rows, pos, ball, x, x_prev, grad, x_best, g_best, f_best, f_prev, eta
            nonlocal increases, f_best_at_ckpt, halved_at_ckpt
            rows, pos, ball = rows[keep], pos[keep], ball.select(keep)
            x, x_prev, grad = x[keep], x_prev[keep], grad[keep]
            x_best, g_best, f_best, f_prev, eta = x_best[keep], g_best[keep], f_best[keep], f_prev[keep], eta[keep]
            increases, f_best_at_ckpt, halved_at_ckpt = increases[keep], f_best_at_ckpt[keep], halved_at_ckpt[keep]

        def exit_fooled() -> bool:
            """Drop fooled samples (keeping a few passengers, see ``survivors``); False if none is left."""
            live = ~fools.ever[pos]
            if not live.any():
                return False
            keep = survivors(live)
            if keep is not None:
                leave(keep)
            return True

        if has_mask:
            new = fools.record(pos, fooled, x)
            if early_exit and steps > 0 and new.any() and not exit_fooled():
                steps = 0

    for k in range(steps):
        with torch.no_grad():
            z = ball.project_(ball.ascent_(x.clone(), grad, eta))
            if k > 0:  # momentum; the first step is the plain projected gradient step
                z.sub_(x).mul_(ALPHA).add_(x - x_prev, alpha=1.0 - ALPHA).add_(x)
                ball.project_(z)
            x_prev, x = x, z
        final = k == steps - 1
        loss, grad, fooled = evaluate(x, rows, not final)  # the last iterate needs no gradient
        with torch.no_grad():
            increases += loss > f_prev
            better = loss > f_best
            x_best[better] = x[better]
            if grad is not None:
                g_best[better] = grad[better]
            f_best = torch.where(better, loss, f_best)
            f_prev = loss
            if has_mask:
                new = fools.record(pos, fooled, x)
                if early_exit and not final and new.any() and not exit_fooled():
                    break
            if k + 1 in ckpts and not final:
                halve = (increases < RHO * (k + 1 - last_ckpt)) | (~halved_at_ckpt & (f_best <= f_best_at_ckpt))
                if halve.any():
                    at = halve.view(-1, *([1] * (x.ndim - 1)))
                    eta = torch.where(at, eta / 2, eta)
                    x = torch.where(at, x_best, x)  # restart from the best point, with its gradient
                    grad = torch.where(at, g_best, grad)
                    f_prev = torch.where(halve, f_best, f_prev)
                halved_at_ckpt, f_best_at_ckpt = halve, f_best.clone()
                increases.zero_()
                last_ckpt = k + 1

    with torch.no_grad():
        best_loss = torch.full((m,), float("inf"), dtype=f_best.dtype, device=f_best.device)
        best_loss[pos] = f_best
        if fools.x is None:  # nothing fooled, so nothing left: x_best is in output order
            return x_best, (fools.ever if has_mask else None), best_loss
        out = fools.x
        keep_best = ~fools.ever[pos]
        out[pos[keep_best]] = x_best[keep_best]
        return out, fools.ever, best_loss


# --- the attacks ------------------------------------------------------------------------------


class APGDParams(BudgetParams):
    steps: int = Field(100, ge=0, description="iterations per run")
    restarts: int = Field(1, ge=1, description="runs from fresh random starts on the samples still robust")


class APGDTParams(BudgetParams):
    steps: int = Field(100, ge=0, description="iterations per target class")
    n_targets: int = Field(9, ge=1, description="target classes (capped at the number of classes - 1)")


class AutoAttackParams(BudgetParams):
    steps: int = Field(100, ge=0, description="iterations of each APGD run")
    n_targets: int = Field(9, ge=1, description="target classes of APGD-T")


class _APGDAttack(ImageAttack):
    """Shared plumbing: clean check, random starts for the whole batch, runs on the robust rows."""

    @property
    def eps(self) -> float:
        return self.params.radius

    def _setup(self, images: torch.Tensor, objective: ImageObjective):
        x_nat = images.detach()
        rows = torch.arange(len(x_nat), device=x_nat.device)
        with torch.no_grad():
            fooled = objective(x_nat, rows).fooled
        done = fooled.clone() if fooled is not None else torch.zeros_like(rows, dtype=torch.bool)
        return x_nat, rows, done, x_nat.clone(), Ball(x_nat, self.params.norm, self.eps)

    def _run(self, objective, x_nat, rows, done, result, ball, gen, early_exit, best_loss=None):
        """One APGD run on the rows not done yet; updates ``result``, ``done`` and ``best_loss`` in place."""
        todo = rows[~done]
        if len(todo) == 0:
            return
        start = ball.random_start(gen)[todo]  # drawn for the whole batch: the same stream in every mode
        adv, fooled, loss = apgd_run(
            objective, x_nat[todo], todo, start, self.params.norm, self.eps, self.params.steps, early_exit
        )
        if fooled is None and best_loss is not None:  # no mask: keep the higher-loss restart
            better = loss > best_loss[todo]
            result[todo[better]] = adv[better]
            best_loss[todo] = torch.maximum(loss, best_loss[todo])
            return
        result[todo] = adv
        if fooled is not None:
            done[todo[fooled]] = True

    def _targeted(self, objective, x_nat, rows, done, result, ball, gen, early_exit, n_targets: int):
        """APGD-T: one targeted-DLR run per target class, the t-th most likely class other than the top one."""
        with torch.no_grad():
            logits = objective.logits(x_nat, rows)
        order = logits.argsort(dim=1, descending=True)
        for t in range(min(n_targets, logits.shape[1] - 1)):
            targeted = objective.with_loss("dlr_targeted", order[:, t + 1])
            self._run(targeted, x_nat, rows, done, result, ball, gen, early_exit)

    def _check_targeted(self, objective: ImageObjective) -> None:
        if not (callable(getattr(objective, "logits", None)) and callable(getattr(objective, "with_loss", None))):
            raise AttackError(
                f"attack '{self.name}' needs a classification objective with logits(images, index) and "
                f"with_loss(loss, targets) (e.g. ZeroShotImageObjective); {type(objective).__name__} lacks "
                "them. Use apgd_ce (or pgd), which maximise any objective's loss."
            )


@register_attack("apgd_ce")
class APGDCE(_APGDAttack):
    """APGD-CE (Croce & Hein, ICML 2020): Auto-PGD maximising the objective's loss.

    Threat model: ||x' - x|| <= eps under L-inf (``eps_255``/255) or L2 (``eps``), x' in [0, 1].
    With a ZeroShotImageObjective the loss is its own (cross-entropy by default); any objective
    works (e.g. FARE's embedding distance), since only ``objective(x, index).loss`` is maximised.

    Args:
        norm: ``linf`` | ``l2``; eps_255 / eps: the radius; steps: iterations (100);
        restarts: runs from new random starts on the samples still robust; seed: random starts.

    ``perturb(images [B, C, H, W] in [0, 1], objective, early_exit=False) -> [B, C, H, W]``.
    Cost per run: ``steps`` forward+backward passes and one forward, plus one clean forward.
    """

    Params = APGDParams

    def forward(self, images: torch.Tensor, objective: ImageObjective, early_exit: bool = False) -> torch.Tensor:
        x_nat, rows, done, result, ball = self._setup(images, objective)
        gen = self.generator(x_nat.device)
        best_loss = torch.full((len(rows),), -float("inf"), device=x_nat.device) if self.params.restarts > 1 else None
        for _ in range(self.params.restarts):
            self._run(objective, x_nat, rows, done, result, ball, gen, early_exit, best_loss)
        return result


@register_attack("apgd_t")
class APGDT(_APGDAttack):
    """APGD-T (Croce & Hein, ICML 2020): Auto-PGD on the targeted DLR loss
    -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2), one run per target class t, the 2nd, 3rd, ...
    most likely classes of the clean image, each run on the samples still robust.

    Threat model: as APGD-CE. Needs an objective with ``logits(images, index)`` and
    ``with_loss("dlr_targeted", targets)`` (ZeroShotImageObjective) and >= 4 classes.

    Args:
        norm, eps_255 / eps, seed: as APGD-CE; steps: iterations per target (100);
        n_targets: target classes (9, capped at the number of classes - 1).

    ``perturb(images [B, C, H, W] in [0, 1], objective, early_exit=False) -> [B, C, H, W]``.
    """

    Params = APGDTParams

    def check(self, objective: ImageObjective) -> None:
        self._check_targeted(objective)
        n_classes = getattr(objective, "num_classes", None)
        if n_classes is not None and n_classes < 4:
            raise AttackError(f"attack 'apgd_t': the targeted DLR loss needs >= 4 classes, got {n_classes}")

    def forward(self, images: torch.Tensor, objective: ImageObjective, early_exit: bool = False) -> torch.Tensor:
        x_nat, rows, done, result, ball = self._setup(images, objective)
        gen = self.generator(x_nat.device)
        self._targeted(objective, x_nat, rows, done, result, ball, gen, early_exit, self.params.n_targets)
        return result


@register_attack("aa")
class AutoAttackSuite(_APGDAttack):
    """AutoAttack's APGD part (Croce & Hein, ICML 2020), the protocol robust-CLIP papers report:
    APGD-CE (cross-entropy), then APGD-T (targeted DLR, ``n_targets`` classes) on the samples
    APGD-CE left robust. With fewer than 4 classes (the targeted DLR loss needs 4) it is APGD-CE alone.

    Threat model: ||x' - x|| <= eps under L-inf (``eps_255``/255) or L2 (``eps``), x' in [0, 1].
    Needs a classification objective (``logits`` and ``with_loss``, i.e. ZeroShotImageObjective);
    its loss is replaced by cross-entropy for the APGD-CE part.

    Args:
        norm, eps_255 / eps, seed: the threat model and random starts; steps: iterations of each
        run (100); n_targets: target classes of APGD-T (9).

    ``perturb(images [B, C, H, W] in [0, 1], objective, early_exit=False) -> [B, C, H, W]``.
    """

    Params = AutoAttackParams

    def check(self, objective: ImageObjective) -> None:
        self._check_targeted(objective)

    def forward(self, images: torch.Tensor, objective: ImageObjective, early_exit: bool = False) -> torch.Tensor:
        ce = objective.with_loss("ce")
        x_nat, rows, done, result, ball = self._setup(images, ce)
        gen = self.generator(x_nat.device)
        self._run(ce, x_nat, rows, done, result, ball, gen, early_exit)
        n_classes = getattr(objective, "num_classes", None)
        if n_classes is None or n_classes >= 4:
            self._targeted(objective, x_nat, rows, done, result, ball, gen, early_exit, self.params.n_targets)
        return result
