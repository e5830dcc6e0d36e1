"""Checks of the attack machinery on objectives whose answer is known by hand: restarts under early
exit, the shared guards of the template method, and the attack cascade."""

from __future__ import annotations

import pytest
import torch

from mmcoa.attacks import ObjectiveOutput, create_attack
from mmcoa.attacks.cascade import run_cascade

EPS_255 = 8
THRESHOLD = 0.6  # fooled where the first pixel sits above x + 0.6 eps


class StartLottery:
    """Fooled exactly where a random start lands high on the first pixel; the loss pulls it back
    down, so a step never fools and only the starts of the restarts do (probability 0.2 each)."""

    def __init__(self, x_nat: torch.Tensor, eps: float):
        self.x_nat, self.eps = x_nat, eps

    def __call__(self, images, index):
        first = images[:, 0, 0, 0] - self.x_nat[index, 0, 0, 0]
        return ObjectiveOutput(-images[:, 0, 0, 0], (first > THRESHOLD * self.eps).detach())


def hand_count(x_nat: torch.Tensor, eps: float, restarts: int, seed: int) -> torch.Tensor:
    """Which samples some restart's start fools: the starts are one uniform draw per restart."""
    gen = torch.Generator().manual_seed(seed)
    fooled = torch.zeros(len(x_nat), dtype=torch.bool)
    for _ in range(restarts):
        start = (x_nat + torch.empty_like(x_nat).uniform_(-eps, eps, generator=gen)).clamp(0, 1)
        fooled |= start[:, 0, 0, 0] - x_nat[:, 0, 0, 0] > THRESHOLD * eps
    return fooled


@pytest.mark.parametrize("early_exit", [False, True])
def test_pgd_restarts_keep_what_later_restarts_find(early_exit):
    x = torch.full((200, 1, 4, 4), 0.5)
    eps = EPS_255 / 255
    objective = StartLottery(x, eps)
    attack = create_attack("pgd", eps_255=EPS_255, step_255=EPS_255, steps=1, restarts=3, seed=0)
    adv = attack.perturb(x, objective, early_exit=early_exit)
    found = objective(adv, torch.arange(len(x))).fooled

    expected = hand_count(x, eps, 3, seed=0)
    first = hand_count(x, eps, 1, seed=0)
    assert int(expected.sum()) - int(first.sum()) > int(first.sum())  # later restarts find most
    assert torch.equal(found, expected)
