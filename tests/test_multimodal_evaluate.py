"""Multimodal attacks and the evaluation harness on a real trained tiny model."""

import pytest
import torch

from mmcoa.attacks import create_attack
from mmcoa.attacks.multimodal import ZeroShotTask, run_zeroshot_attack
from mmcoa.attacks.text import Words
from mmcoa.evaluate import (
    evaluate_classification,
    gradient_masking_flags,
    image_features,
    linear_probe_accuracy,
    sample_indices,
    suite_from_specs,
)
from mmcoa.train import in_memory_batches
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
    assert mm_acc <= max(img_acc, txt_acc) + 1e-6
    if mode == "joint":  # best responses to each other: as strong as the stronger single side
        assert mm_acc <= min(img_acc, txt_acc) + 0.02


def test_co_attack_follows_the_reference(batch):
    """Co-Attack's run_before_fusion: the prompts are attacked on their own (from the labels alone),
    then the image attack raises the reference's loss (away from the clean image
    embedding and from the adversarial class embedding) and the pair is judged by the classifier."""
    from mmcoa.attacks.objectives import ZeroShotCoAttackObjective

    task, x, y = batch
    mm = create_attack("multimodal", mode="co_attack", image=PGD, text=WORD)
    torch.manual_seed(0)
    res = run_zeroshot_attack(mm, task, x, y)
    assert res.prompts == task.attack_text_alone(mm.text_attack, y)  # labels only: no image seen
    assert res.texts != task.texts_for(y)  # the text side edits
    objective = ZeroShotCoAttackObjective(task.classifier, y, task.image_feats(x, normalize=False),
                                          task.true_emb(res.prompts, y), mm.params.alpha)
    idx = torch.arange(len(y))
    with torch.no_grad():
        before, after = objective(x, idx), objective(res.images, idx)
    assert after.loss.mean() > before.loss.mean() and torch.equal(after.fooled, ~res.correct(y))
    clean_acc = (task.classifier(x).argmax(1) == y).float().mean()
    assert res.correct(y).float().mean() < clean_acc


def _evaluate(model, test, suite, n, batch_size=60, seed=3, **kw):
    idx = sample_indices(test.labels, n, seed)
    return evaluate_classification(model, in_memory_batches(test), idx, test.classnames, test.templates[:1],
                                   suite, "fashion_mnist", batch_size, seed, **kw)


def test_evaluation_is_reproducible_and_order_free(trained_model, fmnist):
    _, test = fmnist
    suite = suite_from_specs([{"name": "image", **PGD}, {"name": "text", "attack": "word", "params": {"word_budget": 1, "k": 5}}])
    a = _evaluate(trained_model, test, suite, 120, n_examples=2)
    b = _evaluate(trained_model, test, suite[::-1], 120, n_examples=2)
    for key in ("fashion_mnist.clean.acc", "fashion_mnist.image.acc", "fashion_mnist.text.acc"):
        assert a.metrics[key] == b.metrics[key]
    assert torch.equal(a.outcomes["image"], b.outcomes["image"]) and a.indices == b.indices
    assert a.metrics["fashion_mnist.image.acc"] < a.metrics["fashion_mnist.clean.acc"]
    assert a.threat_models["image"]["eps_255"] == 4 and a.threat_models["text"]["word_budget"] == 1
    assert a.examples["text"]["prompts"][0]["clean"].startswith("a low resolution")
    assert a.families == {"image": ["image"], "text": ["text"]}


def test_worst_case_cascade_equals_every_attack_on_every_sample(trained_model, fmnist):
    """The cascade's worst case is, per sample, the AND of every attack run on every sample.

    Deterministic attacks (no random start): an attack with random starts draws its noise for the
    samples it is given, so in a cascade its draws differ (as in AutoAttack), not its distribution.
    """
    _, test = fmnist
    specs = [
        {"name": "image", "attack": "pgd", "params": {"eps_255": 2, "step_255": 1, "steps": 3, "random_start": False}},
        {"name": "pgd_l2", "attack": "pgd", "params": {"norm": "l2", "eps": 0.5, "steps": 5, "random_start": False}},
        {"name": "apgd", "attack": "pgd", "params": {"eps_255": 4, "step_255": 1, "steps": 5, "random_start": False}},
    ]
    cascaded = [{**s, "worst_only": i > 0} for i, s in enumerate(specs)]
    full = _evaluate(trained_model, test, suite_from_specs(specs), 100)
    cas = _evaluate(trained_model, test, suite_from_specs(cascaded), 100)
    every = full.outcomes["clean"] & full.outcomes["image"] & full.outcomes["pgd_l2"] & full.outcomes["apgd"]
    assert torch.equal(cas.outcomes["worst_image"], every)
    assert torch.equal(full.outcomes["worst_image"], every)
    for name in ("clean", "image", "pgd_l2", "apgd"):  # never above any single column, per sample
        assert not (full.outcomes["worst_image"] & ~full.outcomes[name]).any()
    assert "pgd_l2" not in cas.outcomes and "fashion_mnist.apgd.acc" not in cas.metrics


def test_eps_sweep_and_masking_flags(trained_model, fmnist):
    _, test = fmnist
    res = _evaluate(trained_model, test, [], 100, batch_size=100, sweep=("pgd", {"steps": 5}, [2, 8, 64]))
    accs = [row["acc"] for row in res.sweep]
    assert accs == sorted(accs, reverse=True)
    assert gradient_masking_flags(res.sweep, 10, res.n) == []
    fake = [{"eps_255": 0, "acc": 0.8}, {"eps_255": 4, "acc": 0.5}, {"eps_255": 8, "acc": 0.6}, {"eps_255": 64, "acc": 0.4}]
    flags = gradient_masking_flags(fake, 10, 100)
    assert len(flags) == 2 and "rises" in flags[0] and "chance" in flags[1]


def test_linear_probe_is_cross_validated_on_the_subset(trained_model, fmnist):
    _, test = fmnist
    idx = sample_indices(test.labels, 200, 0)
    feats, labels = image_features(trained_model, in_memory_batches(test)([idx[i : i + 100].tolist() for i in (0, 100)]))
    acc = linear_probe_accuracy(feats, labels)
    shuffled = linear_probe_accuracy(feats, labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))])
    assert acc > 0.6 and shuffled < 0.35, (acc, shuffled)
