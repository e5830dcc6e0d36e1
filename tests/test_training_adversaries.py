"""Training adversaries in the suite's schema: the same weights as the former hand-built PGD and word
attack, mixtures drawn from (seed, step), budget warm-ups, variants, the record of what ran, and bad
input refused with one line naming the key."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml

from mmcoa.attacks import create_attack, list_attacks
from mmcoa.config import DEFAULT_IMAGE_ATTACK, TrainAttackSpec, parse_params
from mmcoa.defenses import Adversary, DefenseContext, check_finetune, create_defense, resolve
from mmcoa.models import create_model
from mmcoa.train import TrainConfig, train

MICRO = "mmcoa-test-micro"


class FormerAdversary:
    """The construction training used before attack specs (Defense.image_attack / text_attack_from),
    kept here as the reference: PGD from ImageAttackParams' fields, the word attack from TextAttackParams'."""

    def __init__(self, attack):
        self.attack, self.seconds = attack, 0.0

    @classmethod
    def image(cls, norm="linf", eps_255=1.0, step_255=1.0, steps=10, random_start=True):
        return cls(create_attack("pgd", norm=norm, steps=steps, random_start=random_start, eps_255=eps_255, step_255=step_255))

    @classmethod
    def text(cls, word_budget=1, candidates="glove", k=10, cos_threshold=0.5, mlm_name="bert-base-uncased"):
        return cls(create_attack("word", word_budget=word_budget, candidates=candidates, k=k,
                                 cos_threshold=cos_threshold, mlm_name=mlm_name))

    def start_step(self, step, seed):
        return {}

    def perturb(self, inputs, objective, **options):
        return self.attack.perturb(inputs, objective, **options)


def trained_weights(train_set, method: str, ctx_kw: dict, former: dict | None = None) -> dict:
    torch.manual_seed(0)
    model = create_model(MICRO)
    ctx = DefenseContext(train_set.classnames, train_set.templates[0], **ctx_kw)
    defense = create_defense(method, model, ctx)
    for side, adversary in (former or {}).items():
        setattr(defense, f"{side}_adversary", adversary)
    train(model, defense, train_set, TrainConfig(steps=2, batch_size=16, lr=1e-3, optimizer="adam"))
    return {k: v.detach().clone() for k, v in model.clip.state_dict().items()}


@pytest.mark.parametrize("method", ["tecoa", "mmcoa"])
def test_default_specs_train_the_same_weights_as_the_former_construction(fmnist, method):
    """The defaults (PGD-10 at 1/255; one GloVe word, k 10) and the embedded default's PGD-3 at 4/255:
    bit-identical weights through the specs and through the former hand translation."""
    train_set, _ = fmnist
    text = "word" in list_attacks() and method == "mmcoa"
    image_cases = [({}, DEFAULT_IMAGE_ATTACK), ({"eps_255": 4, "step_255": 2, "steps": 3},
                   TrainAttackSpec(attack="pgd", params={"norm": "linf", "eps_255": 4, "step_255": 2, "steps": 3}))]
    for old_fields, spec in image_cases[1:] if method == "mmcoa" else image_cases:
        new_kw = {"image_attack": spec, "text_attack": TrainAttackSpec(attack="word", params={"k": 3}) if text else None}
        former = {"image": FormerAdversary.image(**old_fields)}
        if text:
            former["text"] = FormerAdversary.text(k=3)
        new = trained_weights(train_set, method, new_kw)
        old = trained_weights(train_set, method, {"text_attack": None}, former)
        assert new.keys() == old.keys()
        assert all(torch.equal(new[k], old[k]) for k in new), "the spec path changed the trained weights"
        torch.manual_seed(0)
        fresh = create_model(MICRO).clip.state_dict()
        assert any(not torch.equal(new[k], fresh[k]) for k in new)  # it did train


def test_mixture_draws_by_weight_from_seed_and_step_alone():
    specs = [TrainAttackSpec(attack="pgd", params={"steps": 2}, weight=3),
             TrainAttackSpec(attack="fgsm", params={"eps_255": 4}, weight=1)]
    a, b = Adversary("image", specs), Adversary("image", specs)
    draws = [a.draw(s, seed=7) for s in range(2000)]
    assert draws == [b.draw(s, seed=7) for s in range(2000)]  # a resumed run (a fresh object) draws the same
    assert draws != [a.draw(s, seed=8) for s in range(2000)]
    assert Counter(draws)[0] / 2000 == pytest.approx(0.75, abs=0.03)
    history = []
    for s in range(40):
        logs = a.start_step(s, seed=7)
        assert a.attack is a.components[draws[s]].attack
        history.append({"step": s + 1, **logs})
    record = a.record(history)
    assert record["attack"] == "mixture" and [c["attack"] for c in record["components"]] == ["pgd", "fgsm"]
    assert [c["steps_drawn"] for c in record["components"]] == [draws[:40].count(0), draws[:40].count(1)]
    assert [c["weight"] for c in record["components"]] == [3, 1]


def test_budget_warm_up_scales_radius_and_step_linearly():
    spec = TrainAttackSpec(attack="pgd", params={"eps_255": 8, "step_255": 2, "steps": 3},
                           schedule={"warmup_steps": 4, "eps_start_255": 2})
    adversary = Adversary("image", [spec])
    seen = []
    for step in range(6):
        adversary.start_step(step, seed=0)
        seen.append((adversary.attack.params.eps_255, adversary.attack.params.step_255))
    assert seen[0] == (2, 0.5) and seen[2] == pytest.approx((5, 1.25)) and seen[4] == seen[5] == (8, 2)
    assert adversary.record([])["schedule"]["warmup_steps"] == 4


def test_record_comes_from_the_attack_that_ran(fmnist):
    """A TeCoA variant with a single-step adversary records FGSM's threat model, not PGD's params."""
    train_set, _ = fmnist
    f = parse_params({"finetune": {"variants": {"tecoa_fgsm": {"defense": "tecoa", "image_attack": {
        "attack": "fgsm", "params": {"eps_255": 4}}}}}}).finetune
    resolved = resolve(f, "tecoa_fgsm")
    assert resolved.label == "TeCoA (tecoa_fgsm)" and resolved.recipe.defense == "tecoa"
    model = create_model(MICRO)
    ctx = DefenseContext(train_set.classnames, train_set.templates[0], resolved.recipe.params.image_attack)
    defense = create_defense("tecoa", model, ctx)
    record = defense.record([{"step": 1}])
    assert record["trained_against"] == ["image"] and record["text_attack"] is None
    assert record["image_attack"]["attack"] == "fgsm" and record["image_attack"]["step_size"] == pytest.approx(5 / 255)
    assert "steps" not in record["image_attack"]


def test_defense_options_are_typed():
    f = parse_params({"finetune": {"overrides": {"pmg_aft": {"options": {"alpha": 3}}}}}).finetune
    assert resolve(f, "pmg_aft").options.alpha == 3.0 and resolve(f, "pmg_aft").options.beta == 1.0
    with pytest.raises(ValueError, match=r"finetune\.options: defense 'tecoa' options: alpha: unknown option"):
        resolve(parse_params({"finetune": {"options": {"alpha": 1}}}).finetune, "tecoa")


BAD = {
    "wrong side": ({"image_attack": {"attack": "word"}}, "finetune.image_attack: attack 'word' is a text attack"),
    "unknown attack": ({"text_attack": {"attack": "nope"}}, "finetune.text_attack: unknown attack 'nope'"),
    "unknown variant": ({"methods": ["tecoa_fsgm"]}, "finetune.methods: unknown defense or variant 'tecoa_fsgm'"),
    "zero weights": ({"image_attack": [{"attack": "pgd", "weight": 0}]}, "finetune.image_attack: the mixture's weights"),
    "schedule range": ({"image_attack": {"attack": "pgd", "params": {"eps_255": 4}, "schedule": {
        "warmup_steps": 5, "eps_start_255": 6}}}, "finetune.image_attack: schedule.eps_start_255: 6.0 is outside"),
    "variant attack param": ({"variants": {"v": {"defense": "fare", "image_attack": {"params": {"stepz": 1}}}},
                              "methods": ["v"]}, "finetune.variants.v.image_attack: attack 'pgd': stepz"),
}


@pytest.mark.parametrize("label", list(BAD))
def test_bad_training_adversaries_name_the_key(label):
    tree, message = BAD[label]
    with pytest.raises(ValueError) as err:
        check_finetune(parse_params({"finetune": tree}).finetune)
    assert message in str(err.value), str(err.value)


def test_bad_training_adversaries_exit_2_with_one_line(tmp_path):
    """Through the command: exit 2, one line naming the key (three cases at once: start-up dominates)."""
    procs = []
    for i, label in enumerate(["wrong side", "unknown variant", "schedule range"]):
        tree, message = BAD[label]
        path = tmp_path / f"{i}.yaml"
        path.write_text(yaml.safe_dump({"finetune": tree}))
        cmd = [str(Path(sys.executable).parent / "mmcoa"), "finetune", "--method", "tecoa", "--params", str(path),
               "--out", str(tmp_path / "out")]
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}
        procs.append((label, message, subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                                      text=True, env=env)))
    for label, message, proc in procs:
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 2, (label, stderr)
        assert message in stderr and len(stderr.strip().splitlines()) == 1, (label, stderr)
    assert not (tmp_path / "out").exists()
