"""Multimodal attacks and the evaluation harness on a real trained tiny model."""

import pytest
import torch

from mmcoa.attacks import create_attack
from mmcoa.attacks.multimodal import ZeroShotTask, run_zeroshot_attack
from mmcoa.attacks.text import Words
from mmcoa.evaluate import evaluate_suite, gradient_masking_flags
from mmcoa.zeroshot import build_prompts

PGD = {"attack": "pgd", "params": {"eps_255": 4, "step_255": 1, "steps": 5}}
WORD = {"attack": "word", "params": {"word_budget": 1, "k": 10}}


@pytest.fixture
def batch(fmnist, classifier):
    _, test = fmnist
    idx = torch.arange(0, 400, 2)
    template = test.templates[0]
    task = ZeroShotTask(classifier, build_prompts(test.classnames, template), set(test.classnames))
    return task, test.float_images(idx), test.labels[idx]


@pytest.mark.parametrize("mode", ["independent", "co_attack", "joint"])
def test_multimodal_modes_keep_both_budgets_and_beat_each_side(batch, mode):
    task, x, y = batch
    torch.manual_seed(0)
    mm = create_attack("multimodal", mode=mode, image=PGD, text=WORD)
    res = run_zeroshot_attack(mm, task, x, y)
    assert (res.images - x).abs().max() <= 4 / 255 + 1e-6
    assert res.images.min() >= 0 and res.images.max() <= 1
    clean_texts = task.texts_for(y)
    for before, after in zip(clean_texts, res.texts):
        a, b = Words(before).cores, Words(after).cores
        assert len(a) == len(b) and sum(u != v for u, v in zip(a, b)) <= 1
    mm_acc = res.correct(y).float().mean()
    torch.manual_seed(0)
    img_acc = run_zeroshot_attack(mm.image_attack, task, x, y).correct(y).float().mean()
    txt_acc = run_zeroshot_attack(mm.text_attack, task, x, y).correct(y).float().mean()
    clean_acc = (task.classifier(x).argmax(1) == y).float().mean()
    assert mm_acc < clean_acc
    # Combining both sides is at least as strong as the weaker... and, for the collaborative modes,
    # as strong as the stronger single side.
    assert mm_acc <= max(img_acc, txt_acc) + 1e-6
    if mode != "independent":
        assert mm_acc <= min(img_acc, txt_acc) + 0.02


def test_co_attack_is_at_least_as_strong_as_independent(batch):
    task, x, y = batch
    accs = {}
    for mode in ("independent", "co_attack"):
        torch.manual_seed(0)
        res = run_zeroshot_attack(create_attack("multimodal", mode=mode, image=PGD, text=WORD), task, x, y)
        accs[mode] = res.correct(y).float().mean().item()
    assert accs["co_attack"] <= accs["independent"] + 0.02, accs


def test_evaluate_suite_is_reproducible_and_order_free(trained_model, fmnist):
    train, test = fmnist
    suite = [("image", create_attack("pgd", eps_255=4, steps=3)), ("text", create_attack("word", word_budget=1, k=5))]
    a = evaluate_suite(trained_model, test, suite, n_samples=120, batch_size=60, seed=3, n_examples=2, probe_train=train)
    b = evaluate_suite(trained_model, test, suite[::-1], n_samples=120, batch_size=60, seed=3, n_examples=2)
    for key in ("fashion_mnist.clean.acc", "fashion_mnist.image.acc", "fashion_mnist.text.acc"):
        assert a.metrics[key] == b.metrics[key]
    assert a.metrics["fashion_mnist.image.acc"] < a.metrics["fashion_mnist.clean.acc"]
    assert 0.5 < a.metrics["fashion_mnist.linear_probe.acc"] <= 1
    assert a.threat_models["image"]["eps_255"] == 4 and a.threat_models["text"]["word_budget"] == 1
    assert a.examples["text"]["prompts"][0]["clean"].startswith("a low resolution")


def test_eps_sweep_and_masking_flags(trained_model, fmnist):
    _, test = fmnist
    res = evaluate_suite(trained_model, test, [], n_samples=100, batch_size=100, sweep=("pgd", {"steps": 5}, [2, 8, 64]))
    accs = [row["acc"] for row in res.sweep]
    assert accs == sorted(accs, reverse=True)
    assert gradient_masking_flags(res.sweep, 10, res.n) == []
    fake = [{"eps_255": 0, "acc": 0.8}, {"eps_255": 4, "acc": 0.5}, {"eps_255": 8, "acc": 0.6}, {"eps_255": 64, "acc": 0.4}]
    flags = gradient_masking_flags(fake, 10, 100)
    assert len(flags) == 2 and "rises" in flags[0] and "chance" in flags[1]
