"""Single-step image attacks for fast adversarial training (also usable in evaluation).

* ``fgsm``: FGSM with a random start (Wong et al., "Fast is better than free: Revisiting adversarial
  training", ICLR 2020): a start uniform in the eps ball (inside [0, 1]), one ascent step of
  ``1.25 eps`` by default, then projection onto the ball and [0, 1].
* ``nfgsm``: N-FGSM (de Jorge et al., "Make Some Noise: Reliable and Efficient Single-Step
  Adversarial Training", NeurIPS 2022): a start uniform in a ball of ``k eps`` (k = 2), one ascent
  step of ``eps``, and no projection back to the eps ball (unless ``clip_255`` / ``clip`` is given):
  the perturbation may reach ``(k + 1) eps``, as the method intends; its threat model says so
  (``max_radius_255`` / ``max_radius``), so an evaluation never mistakes it for an eps-ball attack.

Both follow the image-attack contract of ``image.py``: gradients with respect to the input only; a
sample's random start drawn from its own stream (``mmcoa.attacks.streams``); per sample, the final
point unless only the start fooled the objective (then the start). Cost: one forward and backward
pass, plus one forward over the samples the start already fooled (none with ``early_exit``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import Field, model_validator

from mmcoa.attacks.base import ImageObjective, register_attack
from mmcoa.attacks.image import Ball, BudgetParams, ImageAttack, survivors


class SingleStepParams(BudgetParams):
    step_255: float | None = Field(None, gt=0, description="L-inf step in 1/255 units (default: see the attack)")
    step: float | None = Field(None, gt=0, description="L2 step in pixel units (default: see the attack)")

    @model_validator(mode="after")
    def _step_matches_norm(self):
        if self.norm == "l2" and self.step_255 is not None:
            raise ValueError("step_255 is the L-inf step; give the L2 step as step")
        if self.norm == "linf" and self.step is not None:
            raise ValueError("step is the L2 step; give the L-inf step as step_255")
        return self


class FGSMParams(SingleStepParams):
    random_start: bool = Field(True, description="Start uniformly in the eps ball (else at the clean image)")


class NFGSMParams(SingleStepParams):
    k: float = Field(2.0, ge=0, description="Noise radius in units of eps")
    clip_255: float | None = Field(None, gt=0, description="L-inf radius to project onto; None: no projection")
    clip: float | None = Field(None, gt=0, description="L2 radius to project onto; None: no projection")

    @model_validator(mode="after")
    def _clip_matches_norm(self):
        if self.norm == "l2" and self.clip_255 is not None:
            raise ValueError("clip_255 is the L-inf radius; give the L2 radius as clip")
        if self.norm == "linf" and self.clip is not None:
            raise ValueError("clip is the L2 radius; give the L-inf radius as clip_255")
        return self


class SingleStepAttack(ImageAttack):
    """One signed (L-inf) or normalised (L2) gradient step from a start, inside a feasible set."""

    single_step: ClassVar[bool] = True
    default_step: ClassVar[float] = 1.0  # the step, in units of eps, when none is given

    @property
    def eps(self) -> float:
        return self.params.radius

    @property
    def step_size(self) -> float:
        p = self.params
        given = (p.step_255 / 255.0 if p.step_255 is not None else None) if p.norm == "linf" else p.step
        return given if given is not None else self.default_step * self.eps

    def start(self, x_nat: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def feasible(self, x_nat: torch.Tensor) -> Ball:
        """The set the stepped point is projected onto (a ball intersected with [0, 1])."""
        raise NotImplementedError

    def forward(self, x_nat: torch.Tensor, objective: ImageObjective, early_exit: bool = False) -> torch.Tensor:
        rows = torch.arange(len(x_nat), device=x_nat.device)
        x = self.start(x_nat, rows).requires_grad_(True)
        out = objective(x, rows)
        (grad,) = torch.autograd.grad(out.loss.sum(), x)
        with torch.no_grad():
            start = x.detach()
            ball = self.feasible(x_nat)
            adv = ball.project_(ball.ascent_(start.clone(), grad, self.step_size))
            if out.fooled is None or not out.fooled.any():
                return adv
            if early_exit:  # a sample the start fooled leaves at the start
                adv[out.fooled] = start[out.fooled]
                return adv
            return self._keep_fooling_start(start, adv, out.fooled, rows, objective)

    @staticmethod
    def _keep_fooling_start(start, adv, fooled, rows, objective) -> torch.Tensor:
        """Where the start fooled and the stepped point does not, the start (checked on a batch of at
        least ``MIN_BATCH`` rows, as PGD does, so a sample's result does not depend on the others)."""
        padded = survivors(fooled)
        check = padded if padded is not None else torch.ones_like(fooled)
        fin = objective(adv[check], rows[check]).fooled
        stale = torch.zeros_like(fooled)
        stale[check] = fooled[check] & ~fin
        adv[stale] = start[stale]
        return adv

    def threat_model(self) -> dict[str, Any]:
        return {**super().threat_model(), "step_size": self.step_size}


@register_attack("fgsm")
class FGSM(SingleStepAttack):
    """FGSM with random start (Wong et al. 2020): x0 ~ U(ball(x, eps)) in [0, 1];
    x' = Proj_{ball(x, eps) in [0, 1]}(x0 + step * sign(grad)) with step = 1.25 eps by default
    (L2: the gradient normalised to unit norm). ``random_start=False``: x0 = x (plain FGSM)."""

    Params = FGSMParams
    default_step = 1.25

    def start(self, x_nat, rows):
        if not self.params.random_start:
            return x_nat.clone()
        return Ball(x_nat, self.params.norm, self.eps).random_start(self.streams(x_nat), "fgsm", rows)

    def feasible(self, x_nat):
        return Ball(x_nat, self.params.norm, self.eps)


@register_attack("nfgsm")
class NFGSM(SingleStepAttack):
    """N-FGSM (de Jorge et al. 2022): x0 ~ U(ball(x, k eps)) in [0, 1]; x' = clip_[0,1](x0 + step *
    sign(grad)) with step = eps by default; projected onto ball(x, clip) only when ``clip_255`` /
    ``clip`` is given. The perturbation then lies within ``max_radius`` = clip, or k eps + step."""

    Params = NFGSMParams
    default_step = 1.0

    @property
    def max_radius(self) -> float:
        p = self.params
        clip = (p.clip_255 / 255.0 if p.clip_255 is not None else None) if p.norm == "linf" else p.clip
        return clip if clip is not None else self.params.k * self.eps + self.step_size

    def start(self, x_nat, rows):
        noise = Ball(x_nat, self.params.norm, self.params.k * self.eps)
        return noise.random_start(self.streams(x_nat), "nfgsm", rows)

    def feasible(self, x_nat):
        return Ball(x_nat, self.params.norm, self.max_radius)

    def threat_model(self) -> dict[str, Any]:
        unit = {"max_radius_255": self.max_radius * 255.0} if self.params.norm == "linf" else {"max_radius": self.max_radius}
        return {**super().threat_model(), **unit}
