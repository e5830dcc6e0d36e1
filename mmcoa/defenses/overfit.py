"""A guard against catastrophic overfitting of single-step adversarial training.

The signature (Wong et al. 2020; de Jorge et al. 2022): within a few steps, accuracy under a multi-step
PGD collapses while accuracy under the single-step training attack stays high (or rises), because the
model has learnt to defeat that one step. Every ``every`` steps the guard attacks a fixed probe batch
of the training set with the step's training attack and with PGD-k at the same radius, and compares
zero-shot accuracies on the class prompts; a gap above ``threshold`` is an event, logged with the
step. Then, as the params say, training stops (:class:`CatastrophicOverfitting`, naming the step) or
trains against that PGD-k from the next step on. The guard's random draws come from per-sample streams
seeded by the step's seed, so it leaves the training trajectory untouched until it acts.
"""

from __future__ import annotations

from typing import Any

import torch

from mmcoa.attacks import Attack, create_attack
from mmcoa.attacks.objectives import ZeroShotImageObjective
from mmcoa.config import OverfitGuardParams
from mmcoa.defenses.base import Defense, inputs_only
from mmcoa.models import ClipModel
from mmcoa.zeroshot import ZeroShotClassifier, class_embeddings, predict


class CatastrophicOverfitting(RuntimeError):
    """PGD accuracy collapsed against the training attack's, and the guard's action is ``stop``."""


def same_ball_pgd(attack: Attack, steps: int) -> Attack:
    """PGD-``steps`` (step eps/4, random start) in the ball of an eps-bounded image attack."""
    p = attack.params
    budget = {"eps_255": p.eps_255} if p.norm == "linf" else {"eps": p.radius}
    return create_attack("pgd", norm=p.norm, steps=steps, **budget)


class OverfitGuard:
    """A training monitor (``mmcoa.train.Monitor``) watching ``defense``'s image adversary."""

    def __init__(self, defense: Defense, model: ClipModel, probe: tuple[torch.Tensor, torch.Tensor],
                 params: OverfitGuardParams):
        if defense.image_adversary is None:
            raise ValueError(f"defense '{defense.name}' trains against no image attack: nothing to guard")
        self.defense, self.model, self.params = defense, model, params
        self.adversary = defense.image_adversary
        self.images, self.labels = probe[0].to(model.device), probe[1].to(model.device)
        self.events: list[dict[str, Any]] = []
        self.checks = 0

    @staticmethod
    def wanted(defense: Defense, params: OverfitGuardParams) -> bool:
        """On when the params say so; by default for a single-step image adversary."""
        if defense.image_adversary is None:
            return False
        return params.enabled if params.enabled is not None else defense.image_adversary.single_step

    def resume(self, history: list[dict]) -> None:
        """Restore the checks and events of the restored steps, and a switch made before the checkpoint."""
        self.checks = sum("overfit_gap" in h for h in history)
        self.events = [self._event(int(h["step"]), h) for h in history if h.get("overfit_event")]
        switched = [e for e in self.events if e["action"] == "switch"]
        if switched:
            self._switch(switched[0]["step"])

    def begin(self, step: int) -> None:
        pass

    def end(self, step: int, logs: dict[str, float]) -> None:
        n = step + 1
        if n % self.params.every or self.adversary.replaced is not None:
            return
        train_acc, pgd_acc = self.probe()
        self.checks += 1
        logs.update(overfit_train_acc=train_acc, overfit_pgd_acc=pgd_acc, overfit_gap=train_acc - pgd_acc)
        if train_acc - pgd_acc <= self.params.threshold:
            return
        logs["overfit_event"] = 1.0
        event = self._event(n, logs)
        self.events.append(event)
        if self.params.action == "stop":
            raise CatastrophicOverfitting(
                f"catastrophic overfitting at step {n}: probe accuracy {train_acc:.0%} under the training attack, "
                f"{pgd_acc:.0%} under PGD-{self.params.pgd_steps} (gap above {self.params.threshold:.0%}); "
                "train with a multi-step attack, a smaller eps, or finetune.overfit_guard.action: switch"
            )
        self._switch(n)

    def _event(self, n: int, logs: dict) -> dict[str, Any]:
        return {"step": n, "train_acc": logs["overfit_train_acc"], "pgd_acc": logs["overfit_pgd_acc"],
                "gap": logs["overfit_gap"], "action": self.params.action}

    def _switch(self, n: int) -> None:
        """Train against PGD-k in the current attack's ball from step ``n`` (from 0) on."""
        self.adversary.replace_from(n, same_ball_pgd(self.adversary.attack, self.params.pgd_steps))

    def probe(self) -> tuple[float, float]:
        """Zero-shot accuracy of the probe batch under the training attack and under PGD-k."""
        attack = self.adversary.attack
        model = self.model
        with torch.no_grad():
            emb = class_embeddings(model, self.defense.ctx.classnames, [self.defense.ctx.template])
        head = ZeroShotClassifier(model, emb, scale=self.defense.scale(model).item())
        accs = []
        for a in (attack, same_ball_pgd(attack, self.params.pgd_steps)):
            with inputs_only(model):
                adv = a.perturb(self.images, ZeroShotImageObjective(head, self.labels))
            with torch.no_grad():
                accs.append(float((predict(head, adv) == self.labels).float().mean()))
        return accs[0], accs[1]

    def record(self) -> dict[str, Any]:
        """What the guard did: its settings, the checks made, every event and the outcome."""
        outcome = "none" if not self.events else {"stop": "stopped", "switch": "switched"}[self.events[0]["action"]]
        return {"enabled": True, **self.params.model_dump(), "checks": self.checks, "events": self.events,
                "outcome": outcome}
