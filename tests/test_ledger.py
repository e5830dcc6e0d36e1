"""The compute ledger counts passes at the model: PGD-k costs k + 1 image forward-backward passes per
update (k input-gradient steps and the weight update's), FGSM two; and it sums what a run cost."""

from __future__ import annotations

import pytest
import torch

from mmcoa.config import TrainAttackSpec
from mmcoa.defenses import DefenseContext, create_defense
from mmcoa.ledger import PASS_KEYS, ComputeLedger, flat_metrics
from mmcoa.models import create_model
from mmcoa.train import TrainConfig, train

MICRO = "mmcoa-test-micro"


def run(train_set, spec: TrainAttackSpec, steps: int = 2, batch_size: int = 16):
    torch.manual_seed(0)
    model = create_model(MICRO)
    ctx = DefenseContext(train_set.classnames, train_set.templates[0], image_attack=spec, text_attack=None)
    defense = create_defense("tecoa", model, ctx)
    ledger = ComputeLedger(model.device, model)
    history = train(model, defense, train_set, TrainConfig(steps=steps, batch_size=batch_size, lr=1e-4),
                    monitors=[ledger])
    ledger.close()
    return history, ledger.summary(history, batch_size)


@pytest.mark.parametrize("spec,backward", [
    (TrainAttackSpec(attack="pgd", params={"eps_255": 4, "steps": 3}), 4),
    (TrainAttackSpec(attack="pgd", params={"eps_255": 4, "steps": 1}), 2),
    (TrainAttackSpec(attack="fgsm", params={"eps_255": 4}), 2),
    (TrainAttackSpec(attack="nfgsm", params={"eps_255": 4}), 2),
])
def test_image_backward_passes_per_update(fmnist, spec, backward):
    train_set, _ = fmnist
    history, cost = run(train_set, spec)
    for h in history:
        assert h["bwd_image"] == backward and h["bwd_image_rows"] == backward * 16
        assert h["fwd_image"] >= backward  # plus a check of samples fooled early, when there are any
        assert h["fwd_text"] == h["bwd_text"] == 0  # TeCoA's class prompts are encoded once, before training
    assert cost["bwd_image"] == backward * len(history) and cost["images_seen"] == 32 and cost["steps"] == 2


def test_summary_holds_seconds_shares_device_and_memory(fmnist):
    train_set, _ = fmnist
    history, cost = run(train_set, TrainAttackSpec(attack="pgd", params={"eps_255": 4, "steps": 3}))
    assert set(PASS_KEYS) <= set(cost)
    assert cost["wall_s"] == pytest.approx(sum(h["step_s"] for h in history)) and cost["wall_s"] > 0
    assert 0 < cost["attack_image_share"] < 1
    assert cost["device"] == "cpu" and cost["peak_memory_mb"] > 50  # a process with torch loaded
    flat = flat_metrics("finetune.tecoa", cost)
    assert flat["finetune.tecoa.bwd_image"] == 8 and "finetune.tecoa.device" not in flat


def test_mmcoa_counts_both_towers(fmnist):
    train_set, _ = fmnist
    torch.manual_seed(0)
    model = create_model(MICRO)
    ctx = DefenseContext(train_set.classnames, train_set.templates[0],
                         image_attack=TrainAttackSpec(attack="pgd", params={"steps": 2}), text_attack=None)
    ledger = ComputeLedger(model.device, model)
    history = train(model, create_defense("mmcoa", model, ctx), train_set, TrainConfig(steps=1, batch_size=16, lr=1e-4),
                    monitors=[ledger])
    h = history[0]
    # the image attack: 2 input-gradient steps; the update: one pass over clean and adversarial images together
    assert h["bwd_image"] == 3 and h["bwd_image_rows"] == 2 * 16 + 32
    assert h["bwd_text"] == 1 and h["fwd_text"] >= 2  # class prompts (no grad) and the captions (with grad)
