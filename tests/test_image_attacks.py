"""Image attacks (PGD, APGD-CE, APGD-T, the aa suite) on a real, briefly trained micro CLIP.

torchattacks serves only as an oracle here. Every attack runs on the first 200 (or 100) test images.
"""

from __future__ import annotations

import pytest
import torch
from helpers import AsLogits, accuracy, first_test_images

from mmcoa.attacks import AttackError, create_attack, list_attacks
from mmcoa.attacks.apgd import apgd_run, checkpoints
from mmcoa.attacks.objectives import (
    EmbeddingDistanceObjective,
    RetrievalImageObjective,
    ZeroShotImageObjective,
)
from mmcoa.zeroshot import ZeroShotClassifier, predict

N = 200


@pytest.fixture
def batch(fmnist):
    return first_test_images(fmnist, N)


def correct(classifier, images, labels) -> torch.Tensor:
    return predict(classifier, images) == labels


class Counting:
    """Wraps a zero-shot objective and counts the samples it evaluates (to see early exit at work)."""

    def __init__(self, objective, counter=None):
        self.objective, self.counter = objective, counter if counter is not None else [0]

    @property
    def samples(self) -> int:
        return self.counter[0]

    @property
    def num_classes(self) -> int:
        return self.objective.num_classes

    def __call__(self, images, index):
        self.counter[0] += len(index)
        return self.objective(images, index)

    def logits(self, images, index):
        return self.objective.logits(images, index)

    def with_loss(self, loss, targets=None):
        return Counting(self.objective.with_loss(loss, targets), self.counter)


# --- params and registry ---------------------------------------------------------------------


def test_registry_params_and_schedule():
    assert {"pgd", "apgd_ce", "apgd_t", "aa"} <= set(list_attacks("image"))
    aa = create_attack("aa", eps_255=4)
    assert aa.threat_model() == {
        "attack": "aa", "side": "image", "norm": "linf", "eps_255": 4.0, "eps": None, "seed": None,
        "steps": 100, "n_targets": 9,
    }
    assert create_attack("apgd_ce").params.steps == 100
    with pytest.raises(AttackError, match="unknown parameter"):
        create_attack("apgd_ce", epsilon=3)
    with pytest.raises(AttackError, match="L2 radius"):
        create_attack("pgd", norm="linf", eps=0.5)  # the L2 radius under L-inf is a typo
    with pytest.raises(AttackError, match="eps_255"):
        create_attack("apgd_t", norm="l2", eps_255=2)
    with pytest.raises(AttackError, match="n_targets"):
        create_attack("apgd_t", n_targets=0)
    # Croce & Hein's checkpoints: p = 0, .22, .41, .57, .70, .80, .87, .93, .99; at few iterations the
    # reference code's integer windows (3, then one shorter each time, at least 1) halve far earlier
    assert checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert checkpoints(15) == [3, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]


# --- budget, accuracy, gradients --------------------------------------------------------------

BUDGETS = [
    ("pgd", dict(norm="linf", eps_255=4, step_255=1, steps=5), False),
    ("pgd", dict(norm="l2", eps=0.5, step=0.1, steps=5), True),
    ("pgd", dict(norm="linf", eps_255=4, steps=3, restarts=2), True),
    ("apgd_ce", dict(norm="linf", eps_255=4, steps=5), False),
    ("apgd_ce", dict(norm="l2", eps=0.5, steps=5, restarts=2), True),
    ("apgd_t", dict(norm="linf", eps_255=4, steps=5, n_targets=2), True),
    ("apgd_t", dict(norm="l2", eps=0.5, steps=5, n_targets=2), False),
    ("aa", dict(norm="linf", eps_255=4, steps=5, n_targets=2), True),
]


@pytest.mark.parametrize("name,params,early_exit", BUDGETS, ids=lambda v: str(v))
def test_budget_accuracy_and_no_parameter_grads(name, params, early_exit, classifier, trained_model, batch):
    x, y = batch
    attack = create_attack(name, seed=0, **params)
    adv = attack.perturb(x, ZeroShotImageObjective(classifier, y), early_exit=early_exit)

    assert adv.shape == x.shape and adv.dtype == x.dtype and not adv.requires_grad
    assert adv.min() >= 0 and adv.max() <= 1
    delta = (adv - x).flatten(1)
    if params["norm"] == "linf":
        assert delta.abs().max() <= params["eps_255"] / 255 + 1e-6
    else:
        assert torch.linalg.vector_norm(delta, dim=1).max() <= params["eps"] + 1e-6
    assert accuracy(classifier, adv, y) <= accuracy(classifier, x, y) - 5
    assert all(p.grad is None for p in trained_model.parameters())


def test_large_eps_drives_accuracy_to_chance(classifier, batch):
    x, y = batch
    adv = create_attack("pgd", eps_255=64, step_255=16, steps=10, seed=0).perturb(
        x, ZeroShotImageObjective(classifier, y), early_exit=True
    )
    assert accuracy(classifier, x, y) >= 60
    assert accuracy(classifier, adv, y) <= 100 / classifier.num_classes + 3


# --- against the oracle and each other --------------------------------------------------------


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_at_least_as_strong_as_torchattacks(norm, classifier, batch):
    import torchattacks

    x, y = batch
    if norm == "linf":
        ours = create_attack("pgd", eps_255=2, step_255=0.5, steps=10)
        ref = torchattacks.PGD(AsLogits(classifier), eps=2 / 255, alpha=0.5 / 255, steps=10, random_start=True)
    else:
        ours = create_attack("pgd", norm="l2", eps=0.25, step=0.0625, steps=10)
        ref = torchattacks.PGDL2(AsLogits(classifier), eps=0.25, alpha=0.0625, steps=10, random_start=True)
    torch.manual_seed(0)  # both draw their random start from the global RNG
    acc_ours = accuracy(classifier, ours.perturb(x, ZeroShotImageObjective(classifier, y)), y)
    torch.manual_seed(0)
    acc_ref = accuracy(classifier, ref(x, y), y)
    assert acc_ours < accuracy(classifier, x, y)
    assert acc_ours <= acc_ref + 0.5


def test_apgd_ce_beats_pgd_and_aa_beats_apgd_ce(classifier, batch):
    x, y = batch
    objective = ZeroShotImageObjective(classifier, y)
    pgd = create_attack("pgd", eps_255=3, step_255=0.75, steps=10, seed=0).perturb(x, objective, early_exit=True)
    apgd = create_attack("apgd_ce", eps_255=3, seed=0).perturb(x, objective, early_exit=True)  # 100 iterations
    aa = create_attack("aa", eps_255=3, n_targets=2, seed=0).perturb(x, objective, early_exit=True)
    acc_pgd, acc_apgd, acc_aa = (accuracy(classifier, a, y) for a in (pgd, apgd, aa))
    assert acc_apgd <= acc_pgd < accuracy(classifier, x, y)
    assert acc_aa <= acc_apgd
    # Same seed: aa's APGD-CE part is this APGD-CE run, so whatever it fools aa fools too.
    assert not (correct(classifier, aa, y) & ~correct(classifier, apgd, y)).any()


def test_apgd_ce_matches_torchattacks_apgd(classifier, batch):
    import torchattacks

    x, y = batch
    objective = ZeroShotImageObjective(classifier, y)
    ours = create_attack("apgd_ce", eps_255=3, seed=0).perturb(x, objective, early_exit=True)
    ref = torchattacks.APGD(AsLogits(classifier), eps=3 / 255, steps=100, loss="ce", n_restarts=1, seed=0)(x, y)
    # Different random starts: allow one sample either way (200 samples).
    assert accuracy(classifier, ours, y) <= accuracy(classifier, ref, y) + 0.5


@pytest.mark.parametrize("steps", [10, 15])
def test_apgd_run_matches_torchattacks_apgd_from_the_same_start(steps, classifier, batch):
    """Few iterations, where the paper's checkpoints and the reference code's differ: from the start
    torchattacks draws, APGD fools the same samples as torchattacks' port of the reference code."""
    import torchattacks

    x, y = batch
    keep = correct(classifier, x, y)  # the reference attacks only these, in this order
    x, y = x[keep], y[keep]
    eps = 3 / 255
    torch.manual_seed(0)  # the reference's start, drawn as it draws it: uniform, scaled to the L-inf sphere
    t = 2 * torch.rand(x.shape) - 1
    start = (x + eps * t / t.flatten(1).abs().amax(1).view(-1, 1, 1, 1)).clamp(0, 1)
    _, fooled, _ = apgd_run(ZeroShotImageObjective(classifier, y), x, torch.arange(len(x)), start, "linf", eps, steps)
    ref = torchattacks.APGD(AsLogits(classifier), eps=eps, steps=steps, loss="ce", n_restarts=1, seed=0)(x, y)
    ref_fooled = ~correct(classifier, ref, y)
    assert 5 <= int(ref_fooled.sum()) < len(y)  # the comparison has something to compare
    assert int((fooled != ref_fooled).sum()) <= 1  # float rounding may flip a borderline sample


@pytest.mark.parametrize(
    "name,params",
    [
        ("pgd", dict(eps_255=3, step_255=0.75, steps=10)),
        ("pgd", dict(norm="l2", eps=0.3, steps=5, restarts=2)),
        ("apgd_ce", dict(norm="l2", eps=0.3, steps=15)),
        ("aa", dict(eps_255=3, steps=10, n_targets=2)),
    ],
    ids=lambda v: str(v),
)
def test_early_exit_keeps_robust_accuracy_exactly(name, params, classifier, batch):
    x, y = batch
    objective = ZeroShotImageObjective(classifier, y)
    full, lean = Counting(objective), Counting(objective)
    adv_full = create_attack(name, seed=3, **params).perturb(x, full, early_exit=False)
    adv_lean = create_attack(name, seed=3, **params).perturb(x, lean, early_exit=True)
    assert torch.equal(correct(classifier, adv_full, y), correct(classifier, adv_lean, y))
    assert lean.samples < full.samples


def test_seed_reproduces_and_global_rng_is_left_alone(classifier, batch):
    x, y = batch[0][:32], batch[1][:32]
    objective = ZeroShotImageObjective(classifier, y)
    attack = create_attack("apgd_ce", eps_255=2, steps=3, seed=7)
    state = torch.get_rng_state()
    a, b = attack.perturb(x, objective), attack.perturb(x, objective)
    assert torch.equal(a, b)
    assert torch.equal(torch.get_rng_state(), state)


# --- objectives --------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", ["ce", "dlr", "margin", "dlr_targeted"])
def test_pgd_with_zero_shot_losses(loss, classifier, batch):
    x, y = batch[0][:100], batch[1][:100]
    targets = (y + 1) % classifier.num_classes
    objective = ZeroShotImageObjective(classifier, y, loss=loss, targets=targets if loss == "dlr_targeted" else None)
    eps_255 = 8 if loss == "dlr_targeted" else 4  # one fixed, arbitrary target per sample is harder
    adv = create_attack("pgd", eps_255=eps_255, step_255=eps_255 / 4, steps=8, seed=0).perturb(x, objective)
    assert accuracy(classifier, adv, y) <= accuracy(classifier, x, y) - 10
    if loss == "dlr_targeted":  # pulled towards the target, not just anywhere
        hits = lambda imgs: 100 * (predict(classifier, imgs) == targets).float().mean().item()
        assert hits(adv) >= hits(x) + 10


@pytest.mark.parametrize("name", ["pgd", "apgd_ce"])
def test_embedding_distance_objective(name, trained_model, batch):
    """FARE's attack: no labels, no fooled mask; the distance grows well past random noise."""
    x = batch[0][:100]
    with torch.no_grad():
        clean = trained_model.encode_image(x, normalize=False)
    objective = EmbeddingDistanceObjective(trained_model, clean)
    eps = 4 / 255
    adv = create_attack(name, eps_255=4, steps=8, seed=0).perturb(x, objective, early_exit=True)
    noise = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)
    with torch.no_grad():
        dist = lambda imgs: ((trained_model.encode_image(imgs, normalize=False) - clean) ** 2).sum(-1).mean()
        assert dist(adv) > 5 * dist(noise)
    assert (adv - x).abs().max() <= eps + 1e-6
    assert all(p.grad is None for p in trained_model.parameters())


def test_retrieval_objective(trained_model, classifier, batch):
    """Image -> text retrieval over the class prompts: the true caption falls out of the top 1."""
    x, y = batch[0][:100], batch[1][:100]
    objective = RetrievalImageObjective(trained_model, classifier.class_emb, y)
    adv = create_attack("pgd", eps_255=4, step_255=1, steps=8, seed=0).perturb(x, objective, early_exit=True)
    with torch.no_grad():
        r_at_1 = lambda imgs: (
            (trained_model.encode_image(imgs) @ classifier.class_emb.T).argmax(1) == y
        ).float().mean().item()
    assert r_at_1(adv) <= r_at_1(x) - 0.1


@pytest.mark.parametrize("name", ["apgd_t", "aa"])
def test_targeted_attacks_need_logits(name, trained_model, batch):
    x = batch[0][:8]
    with torch.no_grad():
        clean = trained_model.encode_image(x, normalize=False)
    with pytest.raises(AttackError, match="logits"):
        create_attack(name, steps=2).perturb(x, EmbeddingDistanceObjective(trained_model, clean))


# --- small label sets ----------------------------------------------------------------------------


def _subset(classifier, trained_model, batch, k):
    """The zero-shot task restricted to the first k classes."""
    x, y = batch
    keep = y < k
    head = ZeroShotClassifier(trained_model, classifier.class_emb[:k])
    return head, x[keep][:60], y[keep][:60]


def test_apgd_t_needs_four_classes_and_caps_targets(classifier, trained_model, batch):
    head, x, y = _subset(classifier, trained_model, batch, 3)
    with pytest.raises(AttackError, match=">= 4 classes"):
        create_attack("apgd_t", steps=2).perturb(x, ZeroShotImageObjective(head, y))

    head, x, y = _subset(classifier, trained_model, batch, 4)
    objective = ZeroShotImageObjective(head, y)
    targets_seen = []
    original = objective.with_loss

    def spy(loss, targets=None):
        targets_seen.append(targets)
        return original(loss, targets)

    objective.with_loss = spy
    create_attack("apgd_t", eps_255=8, steps=3, n_targets=9, seed=0).perturb(x, objective)
    assert 1 <= len(targets_seen) <= 3  # 9 asked, 3 other classes exist
    right = correct(head, x, y)  # only these are attacked; their targets are never the true class
    assert all(not (t[right] == y[right]).any() for t in targets_seen)


def test_aa_on_two_classes_is_apgd_ce(classifier, trained_model, batch):
    head, x, y = _subset(classifier, trained_model, batch, 2)
    objective = ZeroShotImageObjective(head, y)
    aa = create_attack("aa", eps_255=16, steps=5, seed=0).perturb(x, objective, early_exit=True)
    ce = create_attack("apgd_ce", eps_255=16, steps=5, seed=0).perturb(x, objective, early_exit=True)
    assert torch.equal(aa, ce)
    assert accuracy(head, aa, y) < accuracy(head, x, y)
