"""Square attack (Andriushchenko, Croce, Flammarion & Hein, "Square Attack: a query-efficient black-box
adversarial attack via random search", ECCV 2020): AutoAttack's gradient-free member.

Random search on the margin loss: each query changes one square window of the current best point and
keeps the change when the loss rises (or the sample is fooled). The window's side shrinks on a fixed
schedule: the fraction p of pixels it covers starts at ``p_init`` and halves after 10, 50, 200, 500,
1000, 2000, 4000, 6000 and 8000 iterations, counted on a 10,000-query scale (rescaled to
``n_queries``). Under L-inf a window is set to x +- eps with one random sign per channel, from a start
of vertical stripes; under L2 a window receives a centred two-lobe pattern and takes over the mass of a
second window, so every query lies on the sphere of radius eps. No gradients: a check that a
defense's robustness does not come from masked gradients.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

from mmcoa.attacks.base import AttackError, ImageObjective, register_attack
from mmcoa.attacks.image import BudgetParams, ImageAttack, _per_sample_norm

# Iterations (on a 10,000-query scale) after which p halves again.
P_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def p_schedule(it: int, n_queries: int, p_init: float) -> float:
    """Fraction of the image a square covers at iteration ``it`` of ``n_queries``."""
    scaled = int(it / n_queries * 10000)
    return p_init / 2 ** sum(scaled > t for t in P_HALVINGS)


def square_side(p: float, c: int, h: int, w: int, norm: str) -> int:
    """Side of a square covering a fraction p of the pixels (L2: odd and >= 3), at most min(h, w)."""
    s = round(math.sqrt(p * h * w))
    if norm == "l2":
        s = max(s, 3)
        s += 1 - s % 2
    return min(max(s, 1), h, w)


def _rings(a: int, b: int) -> torch.Tensor:
    """[a, b] centred pattern: pixel at Chebyshev distance d from the centre gets sum_{r>=d} 1/(r+1)^2."""
    ca, cb = a // 2, b // 2
    i = torch.arange(a).view(-1, 1)
    j = torch.arange(b).view(1, -1)
    d = torch.maximum((i - ca).abs(), (j - cb).abs())
    radii = max(ca, cb) + 1
    weights = 1.0 / torch.arange(1, radii + 1, dtype=torch.float32) ** 2
    tail = weights.flip(0).cumsum(0).flip(0)  # tail[d] = sum_{r >= d} weights[r]
    out = tail[d.clamp(max=radii - 1)]
    return out / out.norm()


def l2_pattern(s: int, transpose: bool) -> torch.Tensor:
    """[s, s] unit-norm update of the L2 attack: a positive lobe above a negative one."""
    top, bottom = _rings(s // 2, s) if s // 2 else torch.zeros(0, s), -_rings(s - s // 2, s)
    out = torch.cat([top, bottom])
    out = out / out.norm()
    return out.T if transpose else out


class SquareParams(BudgetParams):
    n_queries: int = Field(5000, ge=1, description="random-search queries per sample and restart, after the start")
    p_init: float = Field(0.8, gt=0, le=1, description="fraction of the image the first squares cover")
    restarts: int = Field(1, ge=1, description="runs from fresh starts on the samples still robust")


@register_attack("square")
class Square(ImageAttack):
    """Square attack (Andriushchenko et al., ECCV 2020), score-based and gradient-free.

    Threat model: ||x' - x|| <= eps under L-inf (``eps_255``/255) or L2 (``eps``), x' in [0, 1].
    Maximises the margin max_{j != y} z_j - z_y of a classification objective (one with
    ``with_loss``, e.g. ZeroShotImageObjective); any other objective is used with its own loss, and
    must report ``fooled``. A sample stops as soon as it is fooled (``early_exit`` is always on).

    Args:
        norm: ``linf`` | ``l2``; eps_255 / eps: the radius.
        n_queries: random-search iterations per sample and restart, one query each, after the query
            of the start (5000, AutoAttack's standard version and its counting).
        p_init: initial fraction of pixels a square covers (0.8); halved on the paper's schedule.
        restarts: runs on the samples still robust; seed: the random search (None: torch's RNG).

    ``perturb(images [B, C, H, W] in [0, 1], objective, early_exit=False) -> [B, C, H, W]``.
    Cost: one clean forward plus at most ``n_queries + 1`` forwards per sample and restart, no backward.
    Samples the objective already counts as fooled are returned clean.
    """

    Params = SquareParams

    @property
    def eps(self) -> float:
        return self.params.radius

    @torch.no_grad()
    def forward(self, x_nat: torch.Tensor, objective: ImageObjective, early_exit: bool = False) -> torch.Tensor:
        if callable(getattr(objective, "with_loss", None)):
            objective = objective.with_loss("margin")
        rows = torch.arange(len(x_nat), device=x_nat.device)
        fooled = objective(x_nat, rows).fooled
        if fooled is None:
            raise AttackError(
                f"attack 'square' needs an objective that reports which samples are fooled; "
                f"{type(objective).__name__} does not (use pgd or apgd_ce for a pure loss)"
            )
        gen = self.generator(x_nat.device)
        result, done = x_nat.clone(), fooled.clone()
        best = torch.full((len(x_nat),), -math.inf, device=x_nat.device)
        for _ in range(self.params.restarts):
            todo = rows[~done]
            if len(todo) == 0:
                break
            adv, run_fooled, loss = self.run(x_nat[todo], todo, objective, gen)
            keep = run_fooled | (loss > best[todo])
            result[todo[keep]] = adv[keep]
            best[todo] = torch.maximum(best[todo], loss)
            done[todo] = run_fooled
        return result

    def run(self, x: torch.Tensor, rows: torch.Tensor, objective: ImageObjective, gen):
        """One random search from a fresh start on the objective's ``rows``.

        Returns the best point [m, C, H, W], whether it fools [m] and its loss [m].
        """
        p = self.params
        _, c, h, w = x.shape
        x_best = self._start(x, gen)
        out = objective(x_best, rows)
        loss, fooled = out.loss.detach().float().clone(), out.fooled.clone()
        for it in range(p.n_queries):
            act = (~fooled).nonzero().squeeze(1)
            if len(act) == 0:
                break
            s = square_side(p_schedule(it, p.n_queries, p.p_init), c, h, w, p.norm)
            step = self._linf_step if p.norm == "linf" else self._l2_step
            x_new = step(x[act], x_best[act], s, gen)
            out = objective(x_new, rows[act])
            better = out.fooled | (out.loss.float() > loss[act])
            idx = act[better]
            x_best[idx], loss[idx], fooled[idx] = x_new[better], out.loss.float()[better], out.fooled[better]
        return x_best, fooled, loss

    # --- L-inf -----------------------------------------------------------------------------

    def _start(self, x: torch.Tensor, gen) -> torch.Tensor:
        if self.params.norm == "linf":  # vertical stripes: one sign per sample, channel and column
            signs = self._signs((len(x), x.shape[1], 1, x.shape[3]), x, gen)
            return (x + self.eps * signs).clamp_(0.0, 1.0)
        return self._l2_start(x, gen)

    def _linf_step(self, x: torch.Tensor, x_best: torch.Tensor, s: int, gen) -> torch.Tensor:
        vh, vw = self._corner(x, s, gen), self._corner(x, s, gen, dim=3)
        signs = self._signs((len(x), x.shape[1], 1, 1), x, gen)
        x_new = x_best.clone()
        window = (slice(None), slice(None), slice(vh, vh + s), slice(vw, vw + s))
        x_new[window] = (x[window] + self.eps * signs).clamp_(0.0, 1.0)
        return x_new

    # --- L2 --------------------------------------------------------------------------------

    def _l2_start(self, x: torch.Tensor, gen) -> torch.Tensor:
        """A grid of h//5-sized tiles, each a two-lobe pattern with a random sign per channel."""
        m, c, h, w = x.shape
        s = max(h // 5, 1)
        delta = torch.zeros_like(x)
        top, left = (h - 5 * s) // 2, (w - 5 * s) // 2
        for vh in range(max(top, 0), h - s + 1, s):
            for vw in range(max(left, 0), w - s + 1, s):
                pattern = self._pattern(s, x, gen)
                delta[:, :, vh : vh + s, vw : vw + s] += pattern * self._signs((m, c, 1, 1), x, gen)
        return (x + self.eps * delta / _per_sample_norm(delta)).clamp_(0.0, 1.0)

    def _l2_step(self, x: torch.Tensor, x_best: torch.Tensor, s: int, gen) -> torch.Tensor:
        """Window 1 gets a fresh pattern plus its old content; window 2 gives up its mass; the
        rescaling keeps ||delta|| at eps (before clipping to [0, 1])."""
        m, c = x.shape[:2]
        delta = x_best - x
        vh, vw = self._corner(x, s, gen), self._corner(x, s, gen, dim=3)
        vh2, vw2 = self._corner(x, s, gen), self._corner(x, s, gen, dim=3)
        w1 = (slice(None), slice(None), slice(vh, vh + s), slice(vw, vw + s))
        w2 = (slice(None), slice(None), slice(vh2, vh2 + s), slice(vw2, vw2 + s))
        union = torch.zeros_like(x[:1, :1])
        union[(slice(None), slice(None)) + w1[2:]] = 1.0
        union[(slice(None), slice(None)) + w2[2:]] = 1.0

        def channel_norm(t: torch.Tensor) -> torch.Tensor:
            return t.pow(2).sum(dim=(-2, -1), keepdim=True).sqrt()

        norm_w1 = channel_norm(delta[w1])
        norm_union = channel_norm(delta * union)
        norm_image = _per_sample_norm(delta)
        new = self._pattern(s, x, gen) * self._signs((m, c, 1, 1), x, gen) + delta[w1] / (norm_w1 + 1e-12)
        budget = ((self.eps**2 - norm_image**2).clamp_min(0.0) / c + norm_union**2).sqrt()
        new = new / (channel_norm(new) + 1e-12) * budget
        delta[w2] = 0.0
        delta[w1] = new
        return (x + self.eps * delta / _per_sample_norm(delta)).clamp_(0.0, 1.0)

    # --- random draws ----------------------------------------------------------------------

    @staticmethod
    def _signs(shape, like: torch.Tensor, gen) -> torch.Tensor:
        return torch.randint(0, 2, shape, generator=gen, device=like.device).to(like.dtype).mul_(2).sub_(1)

    @staticmethod
    def _corner(like: torch.Tensor, s: int, gen, dim: int = 2) -> int:
        return int(torch.randint(0, like.shape[dim] - s + 1, (1,), generator=gen, device=like.device))

    @staticmethod
    def _pattern(s: int, like: torch.Tensor, gen) -> torch.Tensor:
        transpose = bool(torch.randint(0, 2, (1,), generator=gen, device=like.device))
        return l2_pattern(s, transpose).to(like.device, like.dtype)
