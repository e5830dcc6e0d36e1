"""Checks of the attack machinery on objectives whose answer is known by hand: restarts under early
exit, the shared guards of the template method, and the attack cascade."""

from __future__ import annotations

import pytest
import torch

from mmcoa.attacks import ObjectiveOutput, create_attack
from mmcoa.attacks.cascade import run_cascade
from mmcoa.attacks.streams import SampleStreams

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
    """Which samples some restart's start fools: each start is one uniform draw of the sample's own
    stream of that restart."""
    streams, rows = SampleStreams(seed, x_nat), torch.arange(len(x_nat))
    fooled = torch.zeros(len(x_nat), dtype=torch.bool)
    for r in range(restarts):
        noise = streams.draw(f"pgd/{r}", rows, lambda g: torch.empty(x_nat.shape[1:]).uniform_(-eps, eps, generator=g))
        start = (x_nat + noise).clamp(0, 1)
        fooled |= start[:, 0, 0, 0] - x_nat[:, 0, 0, 0] > THRESHOLD * eps
    return fooled


def distinct_images(n: int) -> torch.Tensor:
    """n grey 4x4 images, all different (the last pixel), with the first pixel at 0.5."""
    x = torch.full((n, 1, 4, 4), 0.5)
    x[:, 0, 3, 3] = torch.linspace(0.2, 0.8, n)
    return x


@pytest.mark.parametrize("early_exit", [False, True])
def test_pgd_restarts_keep_what_later_restarts_find(early_exit):
    x = distinct_images(200)
    eps = EPS_255 / 255
    objective = StartLottery(x, eps)
    attack = create_attack("pgd", eps_255=EPS_255, step_255=EPS_255, steps=1, restarts=3, seed=0)
    adv = attack.perturb(x, objective, early_exit=early_exit)
    found = objective(adv, torch.arange(len(x))).fooled

    expected = hand_count(x, eps, 3, seed=0)
    first = hand_count(x, eps, 1, seed=0)
    assert int(expected.sum()) > 1.5 * int(first.sum())  # later restarts find many more
    assert torch.equal(found, expected)


# --- the cascade ------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cascade_worst_case_equals_every_attack_on_every_sample(seed):
    """Outcomes fixed per (attack, sample): the cascade must reach the same worst case, per sample,
    while attacking only the survivors."""
    gen = torch.Generator().manual_seed(seed)
    n, n_attacks = 300, 5
    table = torch.rand(n_attacks, n, generator=gen) > torch.rand(n_attacks, 1, generator=gen) * 0.6
    asked: list[torch.Tensor] = []

    def run_one(a: int, idx: torch.Tensor) -> torch.Tensor:
        asked.append(idx)
        return table[a, idx]

    robust, worst = run_cascade(range(n_attacks), run_one, n)
    assert torch.equal(worst, table.all(0))
    for a in range(n_attacks):
        assert torch.equal(robust[a], table[: a + 1].all(0))  # survived attack a and every earlier one
    for a, idx in enumerate(asked):  # each attack saw exactly the samples still robust
        expected = table[:a].all(0) if a else torch.ones(n, dtype=torch.bool)
        assert torch.equal(idx, expected.nonzero().squeeze(1))
    assert sum(len(i) for i in asked) < n * n_attacks


def test_cascade_edge_cases():
    assert run_cascade([], lambda a, i: i > 0, 4)[1].tolist() == [True] * 4
    robust, worst = run_cascade(["all", "never"], lambda a, i: torch.zeros(len(i), dtype=torch.bool), 3)
    assert not worst.any() and len(robust) == 2  # the second attack is never called (nobody left)
    with pytest.raises(ValueError, match="flags"):
        run_cascade(["x"], lambda a, i: torch.ones(1, dtype=torch.bool), 3)


# --- the shared guards ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,params",
    [("pgd", dict(eps_255=0)), ("apgd_ce", dict(eps_255=0)), ("square", dict(eps_255=0)), ("pgd", dict(steps=0, random_start=False))],
)
def test_template_guards_return_a_copy_without_calling_the_objective(name, params):
    calls = []

    def objective(images, index):
        calls.append(len(index))
        raise AssertionError("a zero budget must not query the objective")

    x = torch.rand(5, 1, 4, 4)
    adv = create_attack(name, **params).perturb(x, objective)
    assert torch.equal(adv, x) and adv is not x and not calls
    empty = create_attack("pgd", eps_255=4).perturb(x[:0], objective)
    assert empty.shape == (0, 1, 4, 4) and not calls


def test_template_checks_run_before_the_guards():
    from mmcoa.attacks import AttackError

    x = torch.rand(5, 1, 4, 4)
    with pytest.raises(AttackError, match="logits"):  # apgd_t at eps 0 still says what it needs
        create_attack("apgd_t", eps_255=0).perturb(x, lambda images, index: None)
    assert create_attack("word", word_budget=0).perturb(["a photo of a cat."], None) == ["a photo of a cat."]


def test_pgd_restarts_when_no_step_fools():
    """Restarts whose steps never fool (only some final iterates do) must still merge cleanly."""
    x = torch.full((40, 1, 4, 4), 0.5)

    def objective(images, index):  # fooled only once the first pixel is pushed to the top of the ball
        return ObjectiveOutput(images[:, 0, 0, 0], (images[:, 0, 0, 0] >= 0.5 + 0.999 * 4 / 255).detach())

    attack = create_attack("pgd", eps_255=4, step_255=8, steps=1, restarts=3, seed=0)  # one step reaches the top
    adv = attack.perturb(x, objective, early_exit=True)
    assert objective(adv, torch.arange(40)).fooled.all()


# --- the transfer attack's budget on the source ------------------------------------------------


class FooledFromTheStart:
    """A source objective every point fools; it counts the gradient steps it is asked for."""

    def __init__(self):
        self.steps = 0

    def __call__(self, images, index):
        self.steps += int(images.requires_grad)
        return ObjectiveOutput(images.flatten(1).sum(1), torch.ones(len(index), dtype=torch.bool))


class SourceTask:
    """What the transfer attack needs of an objective: class prompts and the task on another model."""

    prompts = ["a photo of a cat.", "a photo of a dog."]

    def __init__(self):
        self.on_source = FooledFromTheStart()

    def on_model(self, model):
        return self.on_source


@pytest.mark.parametrize("early_exit", [False, True])
def test_transfer_runs_its_full_budget_on_the_source(early_exit):
    """Images that fool the source at the first step still get every step: a transfer attack that
    stops where the source is fooled hands the target barely adversarial images."""
    objective = SourceTask()
    attack = create_attack("transfer", source="mmcoa-test-micro", attack="pgd", params=dict(eps_255=4, steps=6, seed=0))
    attack.perturb(distinct_images(20), objective, early_exit=early_exit)
    assert objective.on_source.steps == 6
