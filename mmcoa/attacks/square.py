"""Square attack (Andriushchenko, Croce, Flammarion & Hein, "Square Attack: a query-efficient black-box
adversarial attack via random search", ECCV 2020): AutoAttack's gradient-free member.

Random search on the margin loss: each query changes one square window of the current best point and
keeps the change when the loss rises (or the sample is fooled). The window's side shrinks on a fixed
schedule: the fraction p of pixels it covers starts at ``p_init`` and halves after 10, 50, 200, 500,
1000, 2000, 4000, 6000 and 8000 iterations, counted on a 10,000-query scale (rescaled to
``n_queries``). Under L-inf a window is set to x +- eps with one random sign per channel, from a start
of vertical stripes; under L2 a window receives a centred two-lobe pattern and takes over the mass of a
second window, so every query lies on the sphere of radius eps. Each sample draws its own windows,
signs and patterns from its own stream (``mmcoa.attacks.streams``), as the reference draws a window
per image, so its search never depends on the other samples of the batch. No gradients: a check
that a defense's robustness does not come from masked gradients.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

from mmcoa.attacks.base import AttackError, ImageObjective, register_attack
from mmcoa.attacks.image import BudgetParams, ImageAttack, _per_sample_norm
from mmcoa.attacks.streams import SampleStreams

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
        restarts: runs on the samples still robust; seed: the random search (None: torch's global seed).

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
        streams = self.streams(x_nat)
        result, done = x_nat.clone(), fooled.clone()
        best = torch.full((len(x_nat),), -math.inf, device=x_nat.device)
        for restart in range(self.params.restarts):
            todo = rows[~done]
            if len(todo) == 0:
                break
            adv, run_fooled, loss = self.run(x_nat[todo], todo, objective, streams.generators(f"square/{restart}", todo))
            keep = run_fooled | (loss > best[todo])
            result[todo[keep]] = adv[keep]
            best[todo] = torch.maximum(best[todo], loss)
            done[todo] = run_fooled
        return result

    def run(self, x: torch.Tensor, rows: torch.Tensor, objective: ImageObjective, gens: list[torch.Generator]):
        """One random search from a fresh start on the objective's ``rows``; ``gens[j]`` is sample
        j's own generator, so its windows and signs do not depend on the other samples.

        Returns the best point [m, C, H, W], whether it fools [m] and its loss [m].
        """
        p = self.params
        _, c, h, w = x.shape
        x_best = self._start(x, gens)
        out = objective(x_best, rows)
        loss, fooled = out.loss.detach().float().clone(), out.fooled.clone()
        for it in range(p.n_queries):
            act = (~fooled).nonzero().squeeze(1)
            if len(act) == 0:
                break
            s = square_side(p_schedule(it, p.n_queries, p.p_init), c, h, w, p.norm)
            step = self._linf_step if p.norm == "linf" else self._l2_step
            x_new = step(x[act], x_best[act], s, [gens[j] for j in act.tolist()])
            out = objective(x_new, rows[act])
            better = out.fooled | (out.loss.float() > loss[act])
            idx = act[better]
            x_best[idx], loss[idx], fooled[idx] = x_new[better], out.loss.float()[better], out.fooled[better]
        return x_best, fooled, loss

    # --- L-inf -----------------------------------------------------------------------------

    def _start(self, x: torch.Tensor, gens) -> torch.Tensor:
        if self.params.norm == "linf":  # vertical stripes: one sign per sample, channel and column
            signs = _signs(SampleStreams.uniform(gens, x.shape[1] * x.shape[3], x.device)).view(len(x), x.shape[1], 1, x.shape[3])
            return (x + self.eps * signs.to(x.dtype)).clamp_(0.0, 1.0)
        return self._l2_start(x, gens)

    def _linf_step(self, x: torch.Tensor, x_best: torch.Tensor, s: int, gens) -> torch.Tensor:
        """Each sample's own window set to x +- eps, one sign per channel."""
        m, c, h, w = x.shape
        u = SampleStreams.uniform(gens, 2 + c, x.device)
        window = _window(_corner(u[:, 0], h, s), _corner(u[:, 1], w, s), s, h, w)
        signs = _signs(u[:, 2:]).view(m, c, 1, 1).to(x.dtype)
        return torch.where(window, (x + self.eps * signs).clamp_(0.0, 1.0), x_best)

    # --- L2 --------------------------------------------------------------------------------

    def _l2_start(self, x: torch.Tensor, gens) -> torch.Tensor:
        """A grid of h//5-sized tiles, each a two-lobe pattern (random orientation) with a random
        sign per channel, drawn per sample."""
        m, c, h, w = x.shape
        s = max(h // 5, 1)
        delta = torch.zeros_like(x)
        top, left = (h - 5 * s) // 2, (w - 5 * s) // 2
        for vh in range(max(top, 0), h - s + 1, s):
            for vw in range(max(left, 0), w - s + 1, s):
                u = SampleStreams.uniform(gens, 1 + c, x.device)
                pattern = _patterns(s, u[:, 0], x)  # [m, s, s]
                signs = _signs(u[:, 1:]).view(m, c, 1, 1).to(x.dtype)
                delta[:, :, vh : vh + s, vw : vw + s] += pattern[:, None] * signs
        return (x + self.eps * delta / _per_sample_norm(delta)).clamp_(0.0, 1.0)

    def _l2_step(self, x: torch.Tensor, x_best: torch.Tensor, s: int, gens) -> torch.Tensor:
        """Per sample: window 1 gets a fresh pattern plus its old content; window 2 gives up its mass;
        the rescaling keeps ||delta|| at eps (before clipping to [0, 1])."""
        m, c, h, w = x.shape
        u = SampleStreams.uniform(gens, 5 + c, x.device)
        vh, vw = _corner(u[:, 0], h, s), _corner(u[:, 1], w, s)
        w1 = _window(vh, vw, s, h, w).to(x.dtype)
        w2 = _window(_corner(u[:, 2], h, s), _corner(u[:, 3], w, s), s, h, w).to(x.dtype)
        union = torch.maximum(w1, w2)
        delta = x_best - x

        def channel_norm(t: torch.Tensor) -> torch.Tensor:
            return t.pow(2).sum(dim=(-2, -1), keepdim=True).sqrt()

        in_w1 = delta * w1
        norm_image = _per_sample_norm(delta)
        signs = _signs(u[:, 5:]).view(m, c, 1, 1).to(x.dtype)
        fresh = _place(_patterns(s, u[:, 4], x), vh, vw, h, w)[:, None] * signs
        new = fresh + in_w1 / (channel_norm(in_w1) + 1e-12)
        budget = ((self.eps**2 - norm_image**2).clamp_min(0.0) / c + channel_norm(delta * union) ** 2).sqrt()
        new = new / (channel_norm(new) + 1e-12) * budget
        delta = delta * (1 - union) + new * w1
        return (x + self.eps * delta / _per_sample_norm(delta)).clamp_(0.0, 1.0)


# --- per-sample random draws, from uniforms u in [0, 1) ---------------------------------------


def _signs(u: torch.Tensor) -> torch.Tensor:
    """+-1 with probability 1/2 each."""
    return torch.where(u < 0.5, -1.0, 1.0)


def _corner(u: torch.Tensor, size: int, s: int) -> torch.Tensor:
    """[m] long: a uniform top (or left) coordinate of a window of side s in a side of ``size``."""
    return (u * (size - s + 1)).long().clamp_(max=size - s)


def _window(vh: torch.Tensor, vw: torch.Tensor, s: int, h: int, w: int) -> torch.Tensor:
    """[m, 1, h, w] bool: sample j's s x s window at (vh[j], vw[j])."""
    i = torch.arange(h, device=vh.device)
    j = torch.arange(w, device=vw.device)
    rows = (i >= vh[:, None]) & (i < vh[:, None] + s)
    cols = (j >= vw[:, None]) & (j < vw[:, None] + s)
    return (rows[:, :, None] & cols[:, None, :])[:, None]


def _patterns(s: int, u: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[m, s, s] two-lobe L2 patterns, transposed where u < 1/2."""
    pattern = l2_pattern(s, False).to(like.device, like.dtype)
    return torch.where((u < 0.5).view(-1, 1, 1), pattern.T, pattern)


def _place(patches: torch.Tensor, vh: torch.Tensor, vw: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """[m, h, w] zeros with sample j's [s, s] patch at (vh[j], vw[j])."""
    m, s = patches.shape[0], patches.shape[1]
    canvas = patches.new_zeros(m, h, w)
    offs = torch.arange(s, device=patches.device)
    canvas[torch.arange(m, device=patches.device)[:, None, None], (vh[:, None] + offs)[:, :, None], (vw[:, None] + offs)[:, None, :]] = patches
    return canvas
