"""TGA-ZSR, LEAF and anchored MMCoA: their losses on hand-built batches against the formulas written out here, the
patch tokens read without changing the model, short runs that lower each loss and leave the towers
they must not train bit-equal, and `mmcoa finetune` with each."""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from mmcoa.config import TrainAttackSpec
from mmcoa.defenses import DefenseContext, DefenseError, create_defense, defense_class, list_defenses
from mmcoa.defenses.leaf import TextEmbeddingDistanceObjective
from mmcoa.models import create_model, save_model, tower_of
from mmcoa.train import TrainConfig, train

MICRO = "mmcoa-test-micro"
CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]
TEMPLATE = "a photo of a {c}."
PGD = TrainAttackSpec(attack="pgd", params={"eps_255": 4.0, "step_255": 2.0, "steps": 2})
CHAR = TrainAttackSpec(attack="char", params={"char_budget": 1, "max_candidates": 20})


def micro(seed: int = 0):
    torch.manual_seed(seed)
    return create_model(MICRO)


def batch(n: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 28, 28, generator=g), torch.arange(n) % len(CLASSES)


def ctx(original, **kw) -> DefenseContext:
    kw.setdefault("image_attack", PGD)
    kw.setdefault("text_attack", CHAR)
    return DefenseContext(CLASSES, TEMPLATE, original=original, **kw)


class Fixed:
    """Stands in for an adversary: returns the adversarial inputs it was given."""

    def __init__(self, adv):
        self.adv = adv

    def perturb(self, inputs, objective, **options):
        return self.adv


def hand_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logp = logits - torch.log(torch.exp(logits).sum(1, keepdim=True))
    return -logp[torch.arange(len(labels)), labels].mean()


def vit_tokens(model, images: torch.Tensor) -> torch.Tensor:
    """[B, 1 + N, D] output tokens through open_clip's own ``output_tokens`` (a copy of the model):
    the projected class token, then the patches after ln_post, projected here."""
    clip = copy.deepcopy(model)
    clip.clip.visual.output_tokens = True
    x = (clip.resize(images.expand(-1, 3, -1, -1)) - clip.mean) / clip.std
    pooled, patches = clip.clip.visual(x)
    return torch.cat([pooled[:, None], patches @ clip.clip.visual.proj], 1)


def hand_attention(tokens: torch.Tensor, text: torch.Tensor, size) -> torch.Tensor:
    """The reference's map: tokens / norm over the token axis, patches . text, min-max, grid, bilinear."""
    t = tokens / torch.sqrt((tokens ** 2).sum(1, keepdim=True))
    s = torch.einsum("bnd,bd->bn", t[:, 1:], text)
    s = (s - s.min(1, keepdim=True).values) / (s.max(1, keepdim=True).values - s.min(1, keepdim=True).values)
    side = math.isqrt(s.shape[1])
    return F.interpolate(s.view(-1, 1, side, side), size=size, mode="bilinear").flatten(1)


def class_prompts(model) -> torch.Tensor:
    with torch.no_grad():
        return F.normalize(model.encode_text(model.tokenize([TEMPLATE.format(c=c) for c in CLASSES])), dim=-1)


# --- registry --------------------------------------------------------------------------------


def test_both_are_registered_with_their_towers_labels_and_options():
    assert {"tga_zsr", "leaf"} <= set(list_defenses())
    tga, leaf = defense_class("tga_zsr"), defense_class("leaf")
    assert (tga.label, tga.trains, tga.attacks, tga.needs_original) == ("TGA-ZSR", ("image",), ("image",), True)
    assert (leaf.label, leaf.trains, leaf.attacks, leaf.needs_original) == ("LEAF", ("text",), ("text",), True)
    assert tga.validate_options({}).model_dump() == {"alpha": 0.08, "beta": 0.05, "distance": "l2"}
    with pytest.raises(DefenseError, match="distance"):
        tga.validate_options({"distance": "l3"})
    with pytest.raises(DefenseError, match="image_tower"):
        leaf.validate_options({"image_tower": "tecoa"})
    model = micro()
    both = create_defense("leaf", model, ctx(copy.deepcopy(model), options={"image_tower": "fare"}))
    assert both.trains == ("image", "text") and set(both.adversaries()) == {"image", "text"}
    alone = create_defense("leaf", model, ctx(copy.deepcopy(model)))
    assert set(alone.adversaries()) == {"text"}


# --- patch tokens ----------------------------------------------------------------------------


def test_reading_tokens_leaves_the_outputs_bit_identical():
    model = micro()
    x, _ = batch()
    before = model.encode_image(x)
    feats, tokens = model.encode_image_tokens(x)
    assert torch.equal(feats, before) and torch.equal(model.encode_image(x), before)
    assert not model.clip.visual.transformer._forward_hooks  # the hook is gone
    assert torch.allclose(tokens, vit_tokens(model, x), atol=1e-6)
    assert torch.allclose(F.normalize(tokens[:, 0], dim=-1), before, atol=1e-6)  # the class token is the embedding


# --- TGA-ZSR ---------------------------------------------------------------------------------


def formula_case():
    """A model whose logit scale is above the clamp of 100, another original, a batch and its signed
    perturbation: what a loss-against-its-formula test feeds a defense."""
    model, original = micro(0), micro(1)
    with torch.no_grad():
        model.clip.logit_scale.fill_(math.log(300.0))
    x, y = batch()
    return model, original, x, y, (x + 0.03 * torch.sign(torch.randn_like(x))).clamp(0, 1)



@pytest.mark.parametrize("options", [{}, {"alpha": 0.5, "beta": 2.0, "distance": "cos"}, {"distance": "l1"}])
def test_tga_zsr_loss_is_its_formula(options):
    model, original, x, y, adv = formula_case()
    d = create_defense("tga_zsr", model, ctx(original, options=options))
    d.image_adversary = Fixed(adv)
    out = d.loss(model, x, y)

    alpha, beta, dist = options.get("alpha", 0.08), options.get("beta", 0.05), options.get("distance", "l2")
    w = class_prompts(model)[y]
    with torch.no_grad():
        ce = hand_ce(100.0 * model.encode_image(adv) @ class_prompts(model).T, y)
        a_adv = hand_attention(vit_tokens(model, adv), w, (28, 28))
        a_clean = hand_attention(vit_tokens(model, x), w, (28, 28))
        a_orig = hand_attention(vit_tokens(original, x), w, (28, 28))
    d_of = {
        "l2": lambda a, b: torch.sqrt(((a - b) ** 2).sum(1)).mean(),
        "cos": lambda a, b: (1 - (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))).mean(),
        "l1": lambda a, b: (a - b).abs().sum() / a.numel(),
    }[dist]
    want = ce + alpha * d_of(a_adv, a_orig) + beta * d_of(a_clean, a_orig)
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-4)
    assert out.logs["attention_refine"] == pytest.approx(d_of(a_adv, a_orig).item(), rel=1e-4)
    assert out.logs["attention_constrain"] > 0  # another original: the clean maps differ


def test_tga_zsr_attention_terms_vanish_for_the_original_on_clean_images():
    model = micro()
    x, y = batch()
    d = create_defense("tga_zsr", model, ctx(copy.deepcopy(model)))
    d.image_adversary = Fixed(x)
    out = d.loss(model, x, y)
    assert out.logs["attention_refine"] < 1e-4 and out.logs["attention_constrain"] < 1e-4
    assert out.loss.item() == pytest.approx(out.logs["ce"], abs=1e-5)


# --- LEAF ------------------------------------------------------------------------------------


def captions_of(y):
    return [TEMPLATE.format(c=CLASSES[i]) for i in y.tolist()]


@pytest.mark.parametrize("image_tower", ["frozen", "fare"])
def test_leaf_loss_is_its_formula(image_tower):
    model, original = micro(0), micro(1)
    x, y = batch()
    adv_x = (x - 0.02).clamp(0, 1)
    adv_t = [c.replace("photo", "phot") if i % 2 else c.replace("a ", "aa ", 1) for i, c in enumerate(captions_of(y))]
    d = create_defense("leaf", model, ctx(original, options={"image_tower": image_tower}))
    d.text_adversary = Fixed(adv_t)
    if image_tower == "fare":
        d.image_adversary = Fixed(adv_x)
    out = d.loss(model, x, y)
    with torch.no_grad():
        g_adv = model.clip.encode_text(model.tokenize(adv_t))
        g_orig = original.clip.encode_text(original.tokenize(captions_of(y)))
        want = ((g_adv - g_orig) ** 2).sum(1).mean()
        if image_tower == "fare":
            want = want + ((model.encode_image(adv_x, normalize=False)
                            - original.encode_image(x, normalize=False)) ** 2).sum(1).mean()
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert out.logs["text_changed"] == 1.0


def test_leaf_attack_maximises_the_distance_to_the_original_clean_embedding():
    model = micro()
    _, y = batch()
    captions = captions_of(y)
    with torch.no_grad():
        clean = model.encode_text(model.tokenize(captions), normalize=False)
    objective = TextEmbeddingDistanceObjective(model, clean)
    edited = ["a phooto of a dress.", "a photo of a dress."]
    scores = objective(edited, torch.tensor([3, 3])).loss
    assert scores[1].item() == pytest.approx(0.0, abs=1e-8)
    with torch.no_grad():
        hand = ((model.encode_text(model.tokenize(edited[:1]), normalize=False) - clean[3]) ** 2).sum()
    assert scores[0].item() == pytest.approx(hand.item(), rel=1e-5)
    d = create_defense("leaf", model, ctx(copy.deepcopy(model)))
    adv = d.adversarial_captions(model, captions, clean)
    for a, c in zip(adv, captions):
        assert a != c and any(name in a for name in CLASSES)  # one edit, never in the class name
    assert d.loss(model, *batch()).logs["loss_text"] > 0  # the original's own captions score 0


# --- anchored MMCoA ----------------------------------------------------------------------------


def hand_clip_loss(img: torch.Tensor, txt: torch.Tensor, scale: float) -> torch.Tensor:
    """Symmetric InfoNCE with diagonal targets, written out."""
    logits = scale * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T
    y = torch.arange(len(img))
    return 0.5 * (hand_ce(logits, y) + hand_ce(logits.T, y))


@pytest.mark.parametrize("options", [{}, {"anchor_image": 0.3, "anchor_text": 2.0}, {"anchor_image": 0, "anchor_text": 0}])
def test_anchored_mmcoa_loss_is_its_formula(options):
    model, original, x, y, adv_x = formula_case()
    t = captions_of(y)
    adv_t = [c.replace("photo", "phot") for c in t]
    d = create_defense("mmcoa_anchor", model, ctx(original, options=options))
    d.image_adversary, d.text_adversary = Fixed(adv_x), Fixed(adv_t)
    out = d.loss(model, x, y)
    wi, wt = options.get("anchor_image", 1.0), options.get("anchor_text", 1.0)
    with torch.no_grad():
        f_adv, f_clean = model.encode_image(adv_x, normalize=False), model.encode_image(x, normalize=False)
        g_clean, g_adv = model.clip.encode_text(model.tokenize(t)), model.clip.encode_text(model.tokenize(adv_t))
        f0, g0 = original.encode_image(x, normalize=False), original.clip.encode_text(original.tokenize(t))
        contrastive = 0.5 * hand_clip_loss(f_adv, g_clean, 100.0) + 0.5 * hand_clip_loss(f_clean, g_adv, 100.0)
        anchors = wi * ((f_adv - f0) ** 2).sum(1).mean() + wt * ((g_adv - g0) ** 2).sum(1).mean()
    assert out.loss.item() == pytest.approx((contrastive + anchors).item(), rel=1e-5)
    assert out.logs["anchor_image"] > 0 and out.logs["anchor_text"] > 0  # another original
    if wi == wt == 0:  # MMCoA's loss, term for term
        m = create_defense("mmcoa", model, ctx(original))
        m.image_adversary, m.text_adversary = Fixed(adv_x), Fixed(adv_t)
        assert out.loss.item() == pytest.approx(m.loss(model, x, y).loss.item(), rel=1e-6)


def test_anchored_mmcoa_is_registered_with_its_towers_label_and_options():
    cls = defense_class("mmcoa_anchor")
    assert (cls.label, cls.trains, cls.attacks, cls.needs_original) == ("MMCoA+anchor", ("image", "text", "scale"), ("image", "text"), True)
    assert cls.validate_options({}).model_dump() == {"anchor_image": 1.0, "anchor_text": 1.0}
    with pytest.raises(DefenseError, match="anchor_text"):
        cls.validate_options({"anchor_text": -1})
    with pytest.raises(DefenseError, match="anchor"):
        cls.validate_options({"anchor": 1})


# --- short runs: the loss goes down, the frozen towers stay bit-equal -------------------------


class Images:
    """A fixed set of images and labels, so every step trains on the same batch."""

    def __init__(self, n: int = 8):
        self.images, self.labels = batch(n, seed=3)

    def __len__(self):
        return len(self.labels)

    def float_images(self, idx):
        return self.images[idx]


@pytest.mark.parametrize("method,options,moves", [
    ("tga_zsr", {}, {"image"}),
    ("leaf", {}, {"text"}),
    ("leaf", {"image_tower": "fare"}, {"image", "text"}),
    ("mmcoa_anchor", {}, {"image", "text", "scale"}),
])
def test_a_short_run_lowers_the_loss_and_moves_only_its_towers(method, options, moves):
    model = micro()
    with torch.no_grad():
        model.clip.logit_scale.fill_(math.log(200.0))  # above the clamp: a frozen scale must not be clamped
    before = {n: p.detach().clone() for n, p in model.clip.named_parameters()}
    data = Images()
    original = copy.deepcopy(model)
    defense = create_defense(method, model, ctx(original, options=options))
    history = train(model, defense, data, TrainConfig(steps=4, batch_size=len(data), lr=3e-4, optimizer="adam"))
    losses = [h["loss"] for h in history]
    assert losses[-1] < losses[0], losses
    changed = {tower_of(n) for n, p in model.clip.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed == moves
    assert all(torch.equal(p, before[n]) for n, p in original.clip.named_parameters())  # the anchor stays


# --- through the command ---------------------------------------------------------------------


def test_finetune_command_trains_each(tmp_path, fmnist_dir):
    from mmcoa.data import open_dataset
    from mmcoa.data.subset import write_subset

    base, data = tmp_path / "base", tmp_path / "prepared"
    save_model(micro(), base)
    write_subset(open_dataset("fashion_mnist", "train", root=fmnist_dir.parent / "raw"), 32, 0, data, 10**6)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"finetune": {
        "steps": 2, "batch_size": 8, "checkpoint_every": 2,
        "image_attack": {"attack": "pgd", "params": {"steps": 1}},
        "text_attack": {"attack": "char", "params": {"char_budget": 1, "max_candidates": 5}},
    }}))
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1", "DVC_NO_ANALYTICS": "1"}
    exe = str(Path(sys.executable).parent / "mmcoa")
    procs = {m: subprocess.Popen([exe, "finetune", "--method", m, "--params", str(params), "--base", str(base),
                                  "--data", str(data), "--out", str(tmp_path / m),
                                  "--checkpoint-dir", str(tmp_path / f"ckpt-{m}")],
                                 cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for m in ("tga_zsr", "leaf")}
    for method, proc in procs.items():
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, (method, stderr)
        assert (tmp_path / method / "open_clip_model.safetensors").is_file(), method
