"""Each defense's loss on hand-made inputs, and what one training step of each may change.

Losses are checked against hand computations (explicit log-softmax sums, not the library's own
helpers); attacks are replaced by fixed adversarial inputs where a test needs to know them.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from mmcoa.attacks import list_attacks
from mmcoa.config import TrainAttackSpec
from mmcoa.defenses import DefenseContext, clip_loss, create_defense, defense_class, list_defenses
from mmcoa.defenses.pmg_aft import kl
from mmcoa.models import create_model, tower_of

MICRO = "mmcoa-test-micro"
CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]
TEMPLATE = "a photo of a {c}."
NO_TEXT = None


def pgd(**params) -> TrainAttackSpec:
    """A train-time PGD spec (L-inf, 1/255 radius and step, 10 steps, random start, unless given)."""
    base = {"norm": "linf", "eps_255": 1.0, "step_255": 1.0, "steps": 10, "random_start": True}
    return TrainAttackSpec(attack="pgd", params={**base, **params})


def word(**params) -> TrainAttackSpec:
    return TrainAttackSpec(attack="word", params=params)
needs_word = pytest.mark.skipif("word" not in list_attacks(), reason="the 'word' text attack is not registered yet")


def micro(seed: int = 0):
    torch.manual_seed(seed)
    return create_model(MICRO)


def batch(n: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 28, 28, generator=g), torch.arange(n) % len(CLASSES)


def ctx(**kw) -> DefenseContext:
    kw.setdefault("text_attack", NO_TEXT)
    kw.setdefault("image_attack", pgd(steps=2))
    return DefenseContext(CLASSES, TEMPLATE, **kw)


def unit(n: int, d: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


def hand_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -sum_j target_ij * log softmax(logits)_ij, written out."""
    logp = logits - torch.log(torch.exp(logits).sum(1, keepdim=True))
    return -(target * logp).sum(1).mean()


def hand_clip(img: torch.Tensor, txt: torch.Tensor, scale: float, labels=None) -> torch.Tensor:
    logits = scale * img @ txt.T
    if labels is None:
        target = torch.eye(len(img))
    else:
        target = torch.tensor([[float(a == b) for b in labels.tolist()] for a in labels.tolist()])
        target = target / target.sum(1, keepdim=True)
    return 0.5 * (hand_ce(logits, target) + hand_ce(logits.T, target))


class FixedAttack:
    """Stands in for PGD: returns the adversarial images it was given."""

    def __init__(self, adv: torch.Tensor):
        self.adv = adv

    def perturb(self, images, objective, early_exit=False):
        return self.adv


# --- registry ---------------------------------------------------------------------------------


def test_registry_lists_every_method_and_its_towers():
    assert {"mmcoa", "tecoa", "pmg_aft", "fare", "clean"} <= set(list_defenses())
    assert set(defense_class("mmcoa").trains) == {"image", "text", "scale"}
    for name in ("tecoa", "pmg_aft", "fare"):
        assert defense_class(name).trains == ("image",)
    assert defense_class("fare").needs_original and defense_class("pmg_aft").needs_original
    assert not defense_class("mmcoa").needs_original
    with pytest.raises(ValueError, match="unknown defense 'nope'.*mmcoa"):
        defense_class("nope")
    with pytest.raises(ValueError, match="needs the frozen original"):
        create_defense("fare", micro(), ctx())


# --- clip_loss --------------------------------------------------------------------------------


def test_clip_loss_matches_hand_computation():
    img, txt = unit(6, 16, 0), unit(6, 16, 1)
    scale = torch.tensor(14.3)
    assert torch.allclose(clip_loss(img, txt, scale), hand_clip(img, txt, 14.3), atol=1e-6)
    # perfectly aligned pairs at a high temperature: loss -> 0
    assert clip_loss(img, img, torch.tensor(1000.0)) < 1e-4


def test_clip_loss_same_class_targets():
    img, txt = unit(6, 16, 2), unit(6, 16, 3)
    labels = torch.tensor([0, 0, 1, 2, 2, 2])
    scale = torch.tensor(10.0)
    got = clip_loss(img, txt, scale, labels)
    assert torch.allclose(got, hand_clip(img, txt, 10.0, labels), atol=1e-6)
    assert not torch.allclose(got, clip_loss(img, txt, scale), atol=1e-3)  # same-class pairs now positives
    distinct = torch.arange(6)  # no two samples share a class: the diagonal targets again
    assert torch.allclose(clip_loss(img, txt, scale, distinct), clip_loss(img, txt, scale), atol=1e-6)


# --- FARE -------------------------------------------------------------------------------------


def test_fare_is_zero_when_model_equals_original_and_eps_is_zero():
    model = micro()
    c = ctx(image_attack=pgd(eps_255=0, steps=2), original=copy.deepcopy(model))
    x, y = batch()
    # (no_grad and grad forwards may take different attention kernels: equal up to rounding)
    assert create_defense("fare", model, c).loss(model, x, y).loss.item() < 1e-10


def test_fare_loss_is_the_squared_distance_to_the_original_embedding():
    model, original = micro(0), micro(1)
    x, y = batch()
    adv = (x + 0.01).clamp(0, 1)
    d = create_defense("fare", model, ctx(original=original))
    d.image_adversary = FixedAttack(adv)
    want = ((model.encode_image(adv, normalize=False) - original.encode_image(x, normalize=False)) ** 2).sum(-1).mean()
    assert torch.allclose(d.loss(model, x, y).loss, want, rtol=1e-5)


# --- TeCoA ------------------------------------------------------------------------------------


def test_tecoa_is_the_cross_entropy_of_the_clamped_logits():
    model = micro()
    with torch.no_grad():
        model.clip.logit_scale.fill_(math.log(500.0))  # above the clamp: the clamp must act
    x, y = batch()
    adv = (x - 0.02).clamp(0, 1)
    d = create_defense("tecoa", model, ctx(logit_scale_max=100.0))
    d.image_adversary = FixedAttack(adv)
    with torch.no_grad():
        w = F.normalize(model.encode_text(model.tokenize([TEMPLATE.format(c=c) for c in CLASSES])), dim=-1)
    logits = 100.0 * model.encode_image(adv) @ w.T
    want = hand_ce(logits, F.one_hot(y, len(CLASSES)).float())
    assert torch.allclose(d.loss(model, x, y).loss, want, atol=1e-5)


# --- PMG-AFT ----------------------------------------------------------------------------------


def test_kl_by_hand():
    p, q = torch.tensor([[1.0, 2.0, 0.5]]), torch.tensor([[0.0, 1.0, 3.0]])
    pp, qq = p.softmax(-1), q.softmax(-1)
    assert torch.allclose(kl(p, q), (pp * (pp / qq).log()).sum(), atol=1e-6)
    assert kl(p, p).abs() < 1e-7


def test_pmg_aft_kl_terms_vanish_when_the_three_distributions_agree():
    model = micro()
    c = ctx(image_attack=pgd(eps_255=0), original=copy.deepcopy(model))
    x, y = batch()
    out = create_defense("pmg_aft", model, c).loss(model, x, y)
    assert abs(out.logs["kl_orig"]) < 1e-6 and abs(out.logs["kl_clean"]) < 1e-6
    assert out.loss.item() == pytest.approx(out.logs["ce"], abs=1e-6)
    # with a perturbation and another original the terms are positive
    c2 = ctx(image_attack=pgd(eps_255=8, steps=1, step_255=8), original=micro(1))
    out2 = create_defense("pmg_aft", model, c2).loss(model, x, y)
    assert out2.logs["kl_orig"] > 1e-4 and out2.logs["kl_clean"] > 1e-6


# --- MMCoA ------------------------------------------------------------------------------------


def fixed_mmcoa(model, adv_images, adv_captions, **kw):
    """An MMCoA defense whose attack returns the given adversarial inputs."""
    d = create_defense("mmcoa", model, ctx(**kw))
    d.attack = lambda m, images, labels: (adv_images, adv_captions)
    return d


@pytest.mark.parametrize("same_class", [False, True])
def test_mmcoa_loss_matches_hand_computation(same_class):
    model = micro()
    x, _ = batch()
    y = torch.tensor([0, 1, 0, 1, 2, 2, 3, 3])  # repeated classes: the targets option matters
    adv = (x + 0.03).clamp(0, 1)
    captions = [TEMPLATE.format(c=CLASSES[i]) for i in y.tolist()]
    adv_captions = [c.replace("photo", "picture") if i % 2 else c for i, c in enumerate(captions)]
    out = fixed_mmcoa(model, adv, adv_captions, same_class_targets=same_class).loss(model, x, y)
    scale = model.logit_scale.item()
    targets = y if same_class else None
    with torch.no_grad():
        txt = model.encode_text(model.tokenize(captions))
        txt_adv = model.encode_text(model.tokenize(adv_captions))
        want = 0.5 * hand_clip(model.encode_image(adv), txt, scale, targets) + 0.5 * hand_clip(
            model.encode_image(x), txt_adv, scale, targets
        )
    assert out.loss.item() == pytest.approx(want.item(), abs=1e-5)
    assert out.logs["text_changed"] == 0.5


def test_mmcoa_attack_leaves_no_gradient_and_the_update_is_the_loss_gradient_only():
    """Real attacks (PGD, and the word attack when registered) leave every .grad None, and the
    weight gradient equals the one of the same loss with the adversarial inputs given as constants."""
    has_word = "word" in list_attacks()
    model = micro()
    x, y = batch()
    c = ctx(image_attack=pgd(steps=3), text_attack=word(word_budget=1) if has_word else None)
    d = create_defense("mmcoa", model, c)
    seen = {}
    real_attack = d.attack

    def instrumented(m, images, labels):
        adv_images, adv_captions = real_attack(m, images, labels)
        seen["grads"] = [p.grad for p in m.parameters()]
        seen["requires_grad"] = all(p.requires_grad for p in m.parameters())
        seen["adv"] = (adv_images, adv_captions)
        return adv_images, adv_captions

    d.attack = instrumented
    torch.manual_seed(0)
    d.loss(model, x, y).loss.backward()
    assert all(g is None for g in seen["grads"]), "an attack left gradients on the parameters"
    assert seen["requires_grad"], "the attack must restore requires_grad"
    assert (seen["adv"][0] - x).abs().max() > 0
    grads = {n: p.grad.clone() for n, p in model.clip.named_parameters()}
    model.zero_grad(set_to_none=True)
    fixed_mmcoa(model, *seen["adv"]).loss(model, x, y).loss.backward()
    for n, p in model.clip.named_parameters():
        assert torch.allclose(p.grad, grads[n], rtol=1e-5, atol=1e-8), n


@needs_word
def test_mmcoa_word_attack_changes_captions():
    model = micro()
    x, y = batch()
    c = ctx(image_attack=pgd(steps=1), text_attack=word(word_budget=1))
    d = create_defense("mmcoa", model, c)
    adv_images, adv_captions = d.attack(model, x, y)
    captions = c.captions(y)
    assert sum(a != b for a, b in zip(adv_captions, captions)) > 0
    for a, b in zip(adv_captions, captions):  # at most one word changed
        assert sum(u != v for u, v in zip(a.split(), b.split())) <= 1 and len(a.split()) == len(b.split())
    assert d.loss(model, x, y).logs["text_changed"] > 0


# --- one training step: which towers move -----------------------------------------------------


@pytest.mark.parametrize("method,moves", [
    ("mmcoa", {"image", "text", "scale"}),
    ("tecoa", {"image"}),
    ("pmg_aft", {"image"}),
    ("fare", {"image"}),
    ("clean", {"image", "text", "scale"}),
])
def test_one_step_changes_only_the_trained_towers(fmnist, method, moves):
    from mmcoa.train import TrainConfig, train

    train_set, _ = fmnist
    model = micro()
    with torch.no_grad():
        model.clip.logit_scale.fill_(math.log(200.0))  # above the clamp: frozen scales must not be clamped
    before = {n: p.detach().clone() for n, p in model.clip.named_parameters()}
    c = DefenseContext(train_set.classnames, train_set.templates[0], image_attack=pgd(steps=1),
                       text_attack=NO_TEXT, original=copy.deepcopy(model))
    cfg = TrainConfig(steps=1, batch_size=16, lr=1e-3, optimizer="adam")
    train(model, create_defense(method, model, c), train_set, cfg)
    changed = {tower: False for tower in ("image", "text", "scale")}
    for n, p in model.clip.named_parameters():
        if not torch.equal(p.detach(), before[n]):
            changed[tower_of(n)] = True
    assert {t for t, v in changed.items() if v} == moves
