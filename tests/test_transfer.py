"""Transfer attack: crafted on a source model, evaluated on the target (the real micro CLIP)."""

from __future__ import annotations

import pytest
import torch

from mmcoa.attacks import AttackError, create_attack
from mmcoa.attacks.multimodal import ZeroShotTask, run_zeroshot_attack
from mmcoa.attacks.objectives import ZeroShotImageObjective
from mmcoa.attacks.transfer import load_source
from mmcoa.models import create_model, save_model
from mmcoa.zeroshot import ZeroShotClassifier, build_prompts, class_embeddings

N = 120
PGD = dict(eps_255=4, step_255=1, steps=5, seed=0)


@pytest.fixture
def task(trained_model, fmnist):
    _, test = fmnist
    prompts = build_prompts(test.classnames, test.templates[0])
    classifier = ZeroShotClassifier(trained_model, class_embeddings(trained_model, test.classnames, test.templates[:1]))
    x, y = test.float_images(slice(0, N)), test.labels[:N]
    return ZeroShotTask(classifier, prompts, set(test.classnames), list(test.classnames)), x, y


def test_same_model_equals_white_box_and_source_is_cached(task, trained_model, tmp_path):
    t, x, y = task
    save_model(trained_model, tmp_path / "copy")
    white = run_zeroshot_attack(create_attack("pgd", **PGD), t, x, y).correct(y)
    load_source.cache_clear()
    transfer = create_attack("transfer", source=str(tmp_path / "copy"), attack="pgd", params=PGD)
    assert torch.equal(run_zeroshot_attack(transfer, t, x, y).correct(y), white)
    run_zeroshot_attack(transfer, t, x[:20], y[:20])
    assert load_source.cache_info().misses == 1 and load_source.cache_info().hits == 1
    assert white.float().mean() < (t.classifier(x).argmax(1) == y).float().mean()  # the attack did bite


def test_other_source_is_weaker_than_white_box(task, tmp_path):
    t, x, y = task
    torch.manual_seed(1)
    save_model(create_model("mmcoa-test-micro"), tmp_path / "other")  # an untrained source
    white = run_zeroshot_attack(create_attack("pgd", **PGD), t, x, y).correct(y)
    transfer = create_attack("transfer", source=str(tmp_path / "other"), attack="pgd", params=PGD)
    adv = run_zeroshot_attack(transfer, t, x, y)
    assert adv.correct(y).float().mean() >= white.float().mean()
    assert (adv.images - x).abs().max() <= 4 / 255 + 1e-6
    assert transfer.threat_model()["crafted_with"]["eps_255"] == 4


def test_transfer_errors(task, tmp_path):
    t, x, y = task
    with pytest.raises(AttackError, match="image attack"):
        create_attack("transfer", source="x", attack="word")
    with pytest.raises(AttackError, match="prompts"):
        create_attack("transfer", source="x").perturb(x[:4], ZeroShotImageObjective(t.classifier, y[:4]))
    with pytest.raises(AttackError, match="source model"):
        run_zeroshot_attack(create_attack("transfer", source=str(tmp_path / "missing")), t, x[:4], y[:4])
