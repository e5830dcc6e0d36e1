"""Train-time adversaries: the attack a defense trains against on one side (image or text), built by the
attack registry from the params' specs, the suite's form (``{attack: NAME, params: {...}}``).

A slot holds one attack or a mixture: each step draws one component by weight, from a generator seeded
by (seed, step) alone, so a resumed run (or another rank) draws the same. A component may warm its
budget up over the first steps (:class:`~mmcoa.config.BudgetSchedule`). What the model trained against
is recorded from ``threat_model()`` of the attack objects that ran, with how many steps drew each.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from mmcoa.attacks import Attack, attack_class, create_attack, list_attacks
from mmcoa.config import TrainAttackSpec, train_attack_specs

# Budget-like params of the image attacks: scaled together by a warm-up, so the attack keeps its shape.
_SCALED = {"linf": ("eps_255", "step_255", "clip_255"), "l2": ("eps", "step", "clip")}


class AdversaryError(ValueError):
    """A train-time attack spec that cannot serve its slot; the message names the problem."""


def build_attack(spec: TrainAttackSpec, kind: str) -> Attack:
    """The registered ``kind`` attack a spec names, its params and schedule checked."""
    cls = attack_class(spec.attack)  # AttackError (a ValueError) names an unknown attack
    if cls.kind != kind:
        raise AdversaryError(f"attack '{spec.attack}' is a {cls.kind} attack; this slot takes a {kind} attack: "
                             f"{', '.join(list_attacks(kind))}")
    attack = create_attack(spec.attack, **spec.params)
    if spec.schedule is not None:
        _start_radius(spec, attack)
    return attack


def _start_radius(spec: TrainAttackSpec, attack: Attack) -> float:
    """The schedule's start radius in the attack's units (1/255 for L-inf), checked against its budget."""
    params = attack.params
    norm = getattr(params, "norm", None)
    if norm not in _SCALED or not hasattr(params, "radius"):
        raise AdversaryError(f"schedule: attack '{spec.attack}' has no eps radius to warm up")
    key, other = ("eps_start_255", "eps_start") if norm == "linf" else ("eps_start", "eps_start_255")
    if getattr(spec.schedule, other) is not None:
        raise AdversaryError(f"schedule.{other}: the attack's norm is {norm}; give the start radius as {key}")
    start = getattr(spec.schedule, key) or 0.0
    full = params.eps_255 if norm == "linf" else params.radius
    if start > full:
        raise AdversaryError(f"schedule.{key}: {start} is outside the budget's range [0, {full}] of '{spec.attack}'")
    return start


def check_slot(value: Any, kind: str) -> None:
    """Raise :class:`ValueError` naming the entry (``[i].``) unless every spec of a slot builds."""
    specs = train_attack_specs(value)
    for i, spec in enumerate(specs):
        try:
            build_attack(spec, kind)
        except ValueError as err:
            raise AdversaryError(f"{f'[{i}].' if isinstance(value, list) else ''}{err}") from None


class Component:
    """One spec of a slot: its full-budget attack, and the attack at each step of its warm-up."""

    def __init__(self, spec: TrainAttackSpec, kind: str):
        self.spec, self.attack = spec, build_attack(spec, kind)
        self.start = _start_radius(spec, self.attack) if spec.schedule is not None else None
        self._cached: tuple[float, Attack] | None = None

    def fraction(self, step: int) -> float:
        """Share of the full radius at ``step`` (from 0): linear from the start over the warm-up."""
        if self.start is None:
            return 1.0
        p = self.attack.params
        full = p.eps_255 if p.norm == "linf" else p.radius
        ramp = min(1.0, step / self.spec.schedule.warmup_steps)
        return (self.start + (full - self.start) * ramp) / full if full > 0 else 1.0

    def at(self, step: int) -> Attack:
        """The attack of ``step``: the full-budget one after the warm-up, else one with every budget
        param (radius, step size, clip) scaled by :meth:`fraction`."""
        f = self.fraction(step)
        if f == 1.0:
            return self.attack
        if self._cached is None or self._cached[0] != f:
            params = self.attack.params.model_dump(exclude_unset=False)
            defaults = {"l2": {"eps": self.attack.params.radius}}.get(params["norm"], {})
            scaled = {k: (params.get(k) if params.get(k) is not None else defaults.get(k)) for k in _SCALED[params["norm"]]}
            given = {k: v * f for k, v in scaled.items() if v is not None and k in type(self.attack.params).model_fields}
            self._cached = (f, create_attack(self.spec.attack, **{**self.spec.params, **given}))
        return self._cached[1]


class Adversary:
    """The train-time attack of one side: one component, or a mixture drawn anew at every step.

    ``start_step(step, seed)`` picks the step's attack (``attack``); ``perturb`` runs it and adds its
    wall time to ``seconds`` (read and reset by the training loop each step).
    """

    def __init__(self, kind: str, specs: list[TrainAttackSpec]):
        if not specs:
            raise AdversaryError(f"no {kind} attack given")
        self.kind = kind
        self.components = [Component(s, kind) for s in specs]
        self.weights = torch.tensor([s.weight for s in specs], dtype=torch.float64)
        self.index, self.attack = 0, self.components[0].attack
        self.seconds = 0.0
        self.replaced: tuple[int, Attack] | None = None  # (from step, attack): set by the overfitting guard

    @classmethod
    def from_slot(cls, kind: str, value: Any) -> Adversary | None:
        """The adversary a params slot describes; None for no attack or one that never changes an input."""
        specs = train_attack_specs(value)
        if not specs:
            return None
        adversary = cls(kind, specs)
        return None if all(c.attack.is_identity() for c in adversary.components) else adversary

    @property
    def is_mixture(self) -> bool:
        return len(self.components) > 1

    def draw(self, step: int, seed: int) -> int:
        """The component of ``step``: by weight, from a generator of (seed, step) alone."""
        if not self.is_mixture:
            return 0
        g = torch.Generator().manual_seed(seed * 1_000_003 + step * 7_919 + 17)
        return int(torch.multinomial(self.weights, 1, generator=g))

    def start_step(self, step: int, seed: int) -> dict[str, float]:
        """Pick the attack of ``step`` (from 0); return what to log about it."""
        self.seconds = 0.0
        if self.replaced is not None and step >= self.replaced[0]:
            self.index, self.attack = len(self.components), self.replaced[1]
            return {f"{self.kind}_component": float(self.index)}
        self.index = self.draw(step, seed)
        component = self.components[self.index]
        self.attack = component.at(step)
        logs = {f"{self.kind}_component": float(self.index)} if self.is_mixture else {}
        if component.start is not None:
            logs[f"{self.kind}_budget_fraction"] = component.fraction(step)
        return logs

    def replace_from(self, step: int, attack: Attack) -> None:
        """Train with ``attack`` from ``step`` (from 0) on, whatever the specs say."""
        self.replaced = (step, attack)

    def perturb(self, inputs: Any, objective: Any, **options: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return self.attack.perturb(inputs, objective, **options)
        finally:
            if isinstance(inputs, torch.Tensor) and inputs.is_cuda:
                torch.cuda.synchronize(inputs.device)
            self.seconds += time.perf_counter() - t0

    @property
    def single_step(self) -> bool:
        """Whether some component takes one gradient step (the adversaries prone to catastrophic overfitting)."""
        return any(getattr(c.attack, "single_step", False) or getattr(c.attack.params, "steps", None) == 1
                   for c in self.components)

    def record(self, history: list[dict]) -> dict[str, Any]:
        """What ran, from the attack objects: ``threat_model()`` of each component with its weight,
        schedule and the steps that drew it (counted in ``history``), and the replacement, if any."""
        key = f"{self.kind}_component"
        drawn = [int(h.get(key, 0)) for h in history]
        entries = []
        for i, c in enumerate(self.components):
            entry = {**c.attack.threat_model(), "weight": c.spec.weight, "steps_drawn": drawn.count(i)}
            if c.spec.schedule is not None:
                entry["schedule"] = c.spec.schedule.model_dump()
            entries.append(entry)
        if self.replaced is not None:
            entries.append({**self.replaced[1].threat_model(), "weight": 0.0, "from_step": self.replaced[0] + 1,
                            "steps_drawn": drawn.count(len(self.components)), "added_by": "overfit_guard"})
        if len(entries) == 1:
            return entries[0]
        return {"attack": "mixture", "side": self.kind, "components": entries}
