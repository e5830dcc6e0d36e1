"""APGD-CE, APGD-T and the AutoAttack suite "aa" (Croce & Hein, "Reliable evaluation of adversarial
robustness with an ensemble of diverse parameter-free attacks", ICML 2020).

Projected gradient ascent whose step size starts at 2 * eps and is halved at checkpoints, on the
schedule of AutoAttack's reference code (which agrees with the paper's p_0 = 0, p_1 = 0.22,
p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06) at 100 iterations and differs at few): the first
checkpoint comes after max(floor(0.22 N), 1) iterations, each later window is the previous one minus
max(floor(0.03 N), 1), never shorter than max(floor(0.06 N), 1). At a checkpoint the step is halved when

* condition 1: the loss increased in at most rho = 0.75 of the steps of the window (``<=``), an
  increase being a step whose loss beats the previous step's (the first step's is compared with 0:
  the reference's loss history starts at zero), or
* condition 2: the step was not halved at the last checkpoint and the best loss has not improved
  since (never at the first checkpoint: the reference counts the start as a halving);

after a halving the iterate restarts from the best point found so far. Each step mixes the projected
gradient step z with the previous step (momentum alpha = 0.75):
x_{k+1} = P(x_k + alpha (z_{k+1} - x_k) + (1 - alpha) (x_k - x_{k-1})).

Every attack here first evaluates the clean images (a sample the objective already counts as fooled
is left clean, as AutoAttack does) and returns, per sample, the first iterate that fooled it, or else
the point of highest loss. With ``early_exit=True`` a fooled sample leaves the batch at once; since
every update is per sample and random starts are drawn per sample (``mmcoa.attacks.streams``),
robust accuracy is the same as without, and a sample's outcome does not depend on its batch.
Gradients come from ``torch.autograd.grad`` with respect to the input only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pydantic import Field

from mmcoa.attacks.base import AttackError, ImageObjective, register_attack
from mmcoa.attacks.image import Ball, BudgetParams, ImageAttack, FoolTracker, survivors

RHO = 0.75  # condition 1: share of steps in a checkpoint window that must increase the loss
ALPHA = 0.75  # weight of the new gradient step against the previous step (momentum)


def checkpoints(n_iter: int) -> list[int]:
    """The iterations w_1 < w_2 < ... <= n_iter after which the step size may be halved.

    Windows as AutoAttack's reference code sizes them: the first max(floor(0.22 N), 1) iterations
    long, each next one shorter by max(floor(0.03 N), 1), down to at least max(floor(0.06 N), 1).
    """
    window = max(int(0.22 * n_iter), 1)
    shrink, shortest = max(int(0.03 * n_iter), 1), max(int(0.06 * n_iter), 1)
    out, at = [], window
    while at <= n_iter:
        out.append(at)
        window = max(window - shrink, shortest)
        at += window
    return out


def _evaluate(objective: ImageObjective, x: torch.Tensor, rows: torch.Tensor, need_grad: bool):
    """The objective's loss [m], its gradient with respect to ``x`` (None unless ``need_grad``) and fooled mask."""
    if not need_grad:
        with torch.no_grad():
            out = objective(x, rows)
        return out.loss.detach(), None, out.fooled
    x.requires_grad_(True)
    out = objective(x, rows)
    (grad,) = torch.autograd.grad(out.loss.sum(), x)
    x.requires_grad_(False)
    return out.loss.detach(), grad, out.fooled


@dataclass
class _APGDState:
    """Per-sample state of one APGD run, one row per sample still in the batch.

    ``rows``: the samples' rows in the objective's batch; ``pos``: their positions in the output.
    ``increases`` counts the steps that raised the loss since the last checkpoint (``f_prev``: the
    previous step's loss, 0 before the first step); ``f_best_at_ckpt`` and ``halved_at_ckpt`` are the
    best loss and the halving decision at the last checkpoint (True at the start).
    """

    rows: torch.Tensor
    pos: torch.Tensor
    ball: Ball
    x: torch.Tensor
    x_prev: torch.Tensor
    grad: torch.Tensor | None
    x_best: torch.Tensor
    g_best: torch.Tensor | None
    f_best: torch.Tensor
    f_prev: torch.Tensor
    eta: torch.Tensor
    increases: torch.Tensor
    f_best_at_ckpt: torch.Tensor
    halved_at_ckpt: torch.Tensor

    @classmethod
    def begin(
        cls, x: torch.Tensor, rows: torch.Tensor, ball: Ball, loss: torch.Tensor, grad: torch.Tensor | None, eps: float
    ) -> _APGDState:
        """The state at the starting point ``x``: it is the best and previous point, the step is 2 * eps."""
        m = len(rows)
        f_best = loss.clone()
        return cls(
            rows=rows,
            pos=torch.arange(m, device=x.device),
            ball=ball,
            x=x,
            x_prev=x,
            grad=grad,
            x_best=x.clone(),
            g_best=grad.clone() if grad is not None else None,
            f_best=f_best,
            f_prev=torch.zeros_like(loss),
            eta=torch.full((m,) + (1,) * (x.ndim - 1), 2.0 * eps, dtype=x.dtype, device=x.device),
            increases=torch.zeros(m, dtype=torch.int32, device=x.device),
            f_best_at_ckpt=f_best.clone(),
            halved_at_ckpt=torch.ones(m, dtype=torch.bool, device=x.device),
        )

    def select(self, keep: torch.Tensor) -> None:
        """Keep only the rows in ``keep`` (a mask), in place."""
        self.rows, self.pos, self.ball = self.rows[keep], self.pos[keep], self.ball.select(keep)
        self.x, self.x_prev, self.grad = self.x[keep], self.x_prev[keep], self.grad[keep]
        self.x_best, self.g_best, self.f_best = self.x_best[keep], self.g_best[keep], self.f_best[keep]
        self.f_prev, self.eta, self.increases = self.f_prev[keep], self.eta[keep], self.increases[keep]
        self.f_best_at_ckpt, self.halved_at_ckpt = self.f_best_at_ckpt[keep], self.halved_at_ckpt[keep]

    def step(self, momentum: bool) -> None:
        """Move to the next iterate: the projected gradient step, mixed with the previous step if ``momentum``."""
        z = self.ball.project_(self.ball.ascent_(self.x.clone(), self.grad, self.eta))
        if momentum:
            z.sub_(self.x).mul_(ALPHA).add_(self.x - self.x_prev, alpha=1.0 - ALPHA).add_(self.x)
            self.ball.project_(z)
        self.x_prev, self.x = self.x, z

    def record_best(self, loss: torch.Tensor, grad: torch.Tensor | None) -> None:
        """Take the loss (and gradient) at the current iterate: count increases, keep the best point."""
        self.grad = grad
        self.increases += loss > self.f_prev
        better = loss > self.f_best
        self.x_best[better] = self.x[better]
        if grad is not None:
            self.g_best[better] = grad[better]
        self.f_best = torch.where(better, loss, self.f_best)
        self.f_prev = loss

    def checkpoint(self, window: int) -> None:
        """At a checkpoint ``window`` steps after the last one: halve the step where condition 1 or 2
        holds, and restart those samples from their best point (with its gradient). The next step's
        increase is still judged against the loss of the last iterate, as the reference does."""
        halve = (self.increases <= RHO * window) | (~self.halved_at_ckpt & (self.f_best <= self.f_best_at_ckpt))
        if halve.any():
            at = halve.view(-1, *([1] * (self.x.ndim - 1)))
            self.eta = torch.where(at, self.eta / 2, self.eta)
            self.x = torch.where(at, self.x_best, self.x)
            self.grad = torch.where(at, self.g_best, self.grad)
        self.halved_at_ckpt, self.f_best_at_ckpt = halve, self.f_best.clone()
        self.increases.zero_()


def _record_fooled(state: _APGDState, fools: FoolTracker, fooled: torch.Tensor, may_exit: bool) -> bool:
    """Record the samples the current iterate fools; with ``may_exit`` newly fooled ones leave the
    batch (a few stay as passengers, see ``survivors``). False once no unfooled sample is left."""
    new = fools.record(state.pos, fooled, state.x)
    if not (may_exit and new.any()):
        return True
    live = ~fools.ever[state.pos]
    if not live.any():
        return False
    keep = survivors(live)
    if keep is not None:
        state.select(keep)
    return True


def _outcome(state: _APGDState, fools: FoolTracker, has_mask: bool):
    """``apgd_run``'s return values: per sample its first fooling iterate, else its best point."""
    best_loss = torch.full((fools.n,), float("inf"), dtype=state.f_best.dtype, device=state.f_best.device)
    best_loss[state.pos] = state.f_best
    if fools.x is None:  # nothing fooled, so nothing left: x_best is in output order
        return state.x_best, (fools.ever if has_mask else None), best_loss
    out = fools.x
    keep_best = ~fools.ever[state.pos]
    out[state.pos[keep_best]] = state.x_best[keep_best]
    return out, fools.ever, best_loss


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
    ball = Ball(x_nat, norm, eps)
    fools = FoolTracker(x_nat)
    ckpts = checkpoints(steps)
    windows = {w: w - prev for prev, w in zip([0] + ckpts, ckpts)}  # checkpoint -> steps since the last one

    loss, grad, fooled = _evaluate(objective, start, rows, steps > 0)
    has_mask = fooled is not None
    with torch.no_grad():
        state = _APGDState.begin(start, rows, ball, loss, grad, eps)
        running = not has_mask or _record_fooled(state, fools, fooled, early_exit and steps > 0)

    for k in range(steps if running else 0):
        final = k == steps - 1
        with torch.no_grad():
            state.step(momentum=k > 0)  # the first step is the plain projected gradient step
        loss, grad, fooled = _evaluate(objective, state.x, state.rows, not final)  # the last needs no gradient
        with torch.no_grad():
            state.record_best(loss, grad)
            if has_mask and not _record_fooled(state, fools, fooled, early_exit and not final):
                break
            if k + 1 in windows and not final:
                state.checkpoint(windows[k + 1])

    with torch.no_grad():
        return _outcome(state, fools, has_mask)


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
    """Shared plumbing: clean check, per-sample random starts, runs on the robust rows."""

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

    def _run(self, objective, x_nat, rows, done, result, ball, streams, stream, early_exit, best_loss=None):
        """One APGD run on the rows not done yet, each from its own start in ``stream``; updates
        ``result``, ``done`` and ``best_loss`` in place."""
        todo = rows[~done]
        if len(todo) == 0:
            return
        start = ball.random_start(streams, stream, todo)
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

    def _targeted(self, objective, x_nat, rows, done, result, ball, streams, early_exit, n_targets: int):
        """APGD-T: one targeted-DLR run per target class, the t-th most likely class other than the top one."""
        with torch.no_grad():
            logits = objective.logits(x_nat, rows)
        order = logits.argsort(dim=1, descending=True)
        for t in range(min(n_targets, logits.shape[1] - 1)):
            targeted = objective.with_loss("dlr_targeted", order[:, t + 1])
            self._run(targeted, x_nat, rows, done, result, ball, streams, f"apgd/target{t}", early_exit)

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
        streams = self.streams(x_nat)
        best_loss = torch.full((len(rows),), -float("inf"), device=x_nat.device) if self.params.restarts > 1 else None
        for r in range(self.params.restarts):
            self._run(objective, x_nat, rows, done, result, ball, streams, f"apgd/ce{r}", early_exit, best_loss)
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
        self._targeted(objective, x_nat, rows, done, result, ball, self.streams(x_nat), early_exit, self.params.n_targets)
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
        streams = self.streams(x_nat)  # the APGD-CE run is apgd_ce's first run (stream apgd/ce0)
        self._run(ce, x_nat, rows, done, result, ball, streams, "apgd/ce0", early_exit)
        n_classes = getattr(objective, "num_classes", None)
        if n_classes is None or n_classes >= 4:
            self._targeted(objective, x_nat, rows, done, result, ball, streams, early_exit, self.params.n_targets)
        return result
