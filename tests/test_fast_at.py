"""FGSM with random start and N-FGSM against their definitions, on a linear objective whose gradient
sign is known: loss(x) = sum(w * x), so the ascent step moves every pixel by sign(w)."""

from __future__ import annotations

import pytest
import torch

from mmcoa.attacks import ObjectiveOutput, attack_class, create_attack, list_attacks

EPS = 8 / 255


class Linear:
    """loss = sum(w * x) per sample; never reports a sample fooled."""

    def __init__(self, w: torch.Tensor):
        self.w = w

    def __call__(self, images, index):
        return ObjectiveOutput((images * self.w[index]).flatten(1).sum(1))


def setup(n: int = 64, seed: int = 0):
    """Images inside [0.3, 0.7] (no [0, 1] clipping within 3 eps), weights of sign +, - and 0 by pixel."""
    g = torch.Generator().manual_seed(seed)
    x = 0.3 + 0.4 * torch.rand(n, 1, 16, 16, generator=g)
    w = torch.randint(-1, 2, (1, 1, 16, 16), generator=g).float().expand(n, -1, -1, -1)
    return x, w


def test_registered_as_single_step_image_attacks():
    assert {"fgsm", "nfgsm"} <= set(list_attacks("image"))
    assert attack_class("fgsm").single_step and attack_class("nfgsm").single_step


def test_fgsm_without_random_start_is_one_signed_step_projected_to_the_ball():
    x, w = setup()
    adv = create_attack("fgsm", eps_255=8, random_start=False).perturb(x, Linear(w))
    # a step of 1.25 eps along sign(w), projected back to the eps ball: exactly eps where w != 0
    assert torch.allclose(adv, x + EPS * w.sign(), atol=1e-6)


def test_fgsm_random_start_then_step_of_1_25_eps_then_projection():
    x, w = setup()
    adv = create_attack("fgsm", eps_255=8, seed=3).perturb(x, Linear(w))
    delta = adv - x
    assert delta.abs().max() <= EPS + 1e-6
    start = delta[w == 0]  # no gradient there: the point is the random start, uniform in [-eps, eps]
    assert start.min() < -0.8 * EPS and start.max() > 0.8 * EPS and abs(start.mean()) < 0.1 * EPS
    up, down = delta[w > 0], -delta[w < 0]
    # x0 = x + u, u ~ U(-eps, eps); x' - x = min(u + 1.25 eps, eps): in [0.25 eps, eps], at eps when u >= -0.25 eps
    for moved in (up, down):
        assert moved.min() >= 0.25 * EPS - 1e-6
        at_bound = (moved > EPS - 1e-6).float().mean().item()
        assert at_bound == pytest.approx(0.625, abs=0.05)


def test_nfgsm_noise_of_2_eps_step_of_eps_and_no_projection():
    x, w = setup()
    attack = create_attack("nfgsm", eps_255=8, seed=5)
    delta = attack.perturb(x, Linear(w)) - x
    noise = delta[w == 0]  # the start: uniform in [-2 eps, 2 eps], not clipped to the eps ball
    assert noise.abs().max() <= 2 * EPS + 1e-6
    assert (noise.abs() > EPS).float().mean().item() == pytest.approx(0.5, abs=0.05)
    up = delta[w > 0]  # u + eps with u ~ U(-2 eps, 2 eps): in [-eps, 3 eps], mean eps
    assert up.min() >= -EPS - 1e-6 and up.max() <= 3 * EPS + 1e-6 and up.max() > 2.5 * EPS
    assert up.mean().item() == pytest.approx(EPS, abs=0.1 * EPS)
    assert attack.threat_model()["max_radius_255"] == pytest.approx(24.0)
    clipped = create_attack("nfgsm", eps_255=8, clip_255=8, seed=5).perturb(x, Linear(w)) - x
    assert clipped.abs().max() <= EPS + 1e-6


@pytest.mark.parametrize("name", ["fgsm", "nfgsm"])
def test_a_sample_draws_the_same_start_in_any_batch_and_stays_in_the_image_box(name):
    x, w = setup(40)
    x[:5] = torch.rand(5, 1, 16, 16)  # some pixels near 0 and 1
    attack = create_attack(name, eps_255=8, seed=1)
    full = attack.perturb(x, Linear(w))
    assert torch.equal(full[:5], attack.perturb(x[:5], Linear(w[:5])))
    assert full.min() >= 0 and full.max() <= 1


def test_start_that_fools_is_kept_when_the_step_does_not():
    """The image-attack contract: per sample, the final point unless only an earlier one fooled."""
    x, w = setup(20)

    class FooledBelow(Linear):  # "fooled" when the loss is below the clean loss: the ascent step undoes it
        def __call__(self, images, index):
            loss = (images * self.w[index]).flatten(1).sum(1)
            return ObjectiveOutput(loss, loss < (x[index] * self.w[index]).flatten(1).sum(1))

    attack = create_attack("fgsm", eps_255=8, seed=2)
    adv = attack.perturb(x, FooledBelow(w))
    plain = attack.perturb(x, Linear(w))
    start = attack.perturb(x, Linear(torch.zeros_like(w)))  # zero gradient: the start itself
    start_loss = (start * w).flatten(1).sum(1)
    fooled_at_start = start_loss < (x * w).flatten(1).sum(1)
    assert fooled_at_start.any() and (~fooled_at_start).any()
    assert torch.equal(adv[fooled_at_start], start[fooled_at_start])
    assert torch.equal(adv[~fooled_at_start], plain[~fooled_at_start])


# --- the catastrophic-overfitting guard --------------------------------------------------------


def guarded(trained_model, fmnist, action: str):
    """TeCoA with a 'single step' that barely moves (as an overfitted FGSM looks to the model) at 16/255,
    so that PGD-10 in the same ball leaves far fewer probe samples correct: the guard's condition."""
    from mmcoa.config import OverfitGuardParams, TrainAttackSpec
    from mmcoa.defenses import DefenseContext, create_defense
    from mmcoa.defenses.overfit import OverfitGuard

    train_set, _ = fmnist
    spec = TrainAttackSpec(attack="fgsm", params={"eps_255": 16, "step_255": 0.01, "random_start": False})
    ctx = DefenseContext(train_set.classnames, train_set.templates[0], image_attack=spec, text_attack=None)
    defense = create_defense("tecoa", trained_model, ctx)
    params = OverfitGuardParams(every=1, probe_size=32, action=action)
    assert OverfitGuard.wanted(defense, params)  # on by default for a single-step adversary
    probe = (train_set.float_images(slice(0, 32)), train_set.labels[:32])
    return defense, OverfitGuard(defense, trained_model, probe, params), train_set


def test_guard_stops_with_the_step_named(trained_model, fmnist):
    from mmcoa.defenses.overfit import CatastrophicOverfitting
    from mmcoa.train import TrainConfig, train

    defense, guard, train_set = guarded(trained_model, fmnist, "stop")
    with pytest.raises(CatastrophicOverfitting, match=r"catastrophic overfitting at step 1: .*PGD-10"):
        train(trained_model, defense, train_set, TrainConfig(steps=3, batch_size=16, lr=1e-5), monitors=[guard])
    assert guard.record()["outcome"] == "stopped" and guard.events[0]["step"] == 1


def test_guard_switches_to_pgd_and_the_record_says_so(trained_model, fmnist):
    from mmcoa.train import TrainConfig, train

    defense, guard, train_set = guarded(trained_model, fmnist, "switch")
    history = train(trained_model, defense, train_set, TrainConfig(steps=3, batch_size=16, lr=1e-5), monitors=[guard])
    assert history[0]["overfit_event"] == 1 and history[0]["overfit_gap"] > 0.2
    assert [h.get("image_component", 0) for h in history] == [0, 1, 1]
    record = guard.record()
    assert record["outcome"] == "switched" and record["checks"] == 1
    image = defense.record(history)["image_attack"]
    assert [c["attack"] for c in image["components"]] == ["fgsm", "pgd"]
    assert image["components"][1]["added_by"] == "overfit_guard" and image["components"][1]["from_step"] == 2
    assert [c["steps_drawn"] for c in image["components"]] == [1, 2]
    # a resumed run restores the switch from its history
    _, again, _ = guarded(trained_model, fmnist, "switch")
    again.resume(history[:1])
    assert again.adversary.replaced is not None and again.adversary.replaced[0] == 1
