"""Invariants of the evaluation over every registered attack, on a real trained open_clip model:
robust implies clean-correct per sample, a family holds one kind of budget, and a transfer attack
crafted on the evaluated model itself is recorded as such (and is no masking check in the report)."""

from __future__ import annotations

from itertools import combinations
from pathlib import Path

import pytest
import torch
import yaml

from mmcoa.attacks import create_attack, list_attacks
from mmcoa.attacks.multimodal import ZeroShotTask, run_zeroshot_attack
from mmcoa.evaluate import (
    SuiteError,
    budget_kind,
    evaluate_classification,
    families,
    sample_indices,
    source_is_target,
    suite_from_specs,
)
from mmcoa.models import create_model, save_model
from mmcoa.report import Collection, load_evaluation, masking_markdown
from mmcoa.train import in_memory_batches
from mmcoa.zeroshot import ZeroShotClassifier, build_prompts, predict

ROOT = Path(__file__).resolve().parents[1]
MICRO = "mmcoa-test-micro"   # an untrained micro CLIP: a source model other than the evaluated one
PGD = {"attack": "pgd", "params": {"eps_255": 4, "step_255": 1, "steps": 3}}
WORD = {"attack": "word", "params": {"word_budget": 1, "k": 5}}
# Small budgets of every registered attack (a new attack must be added here, or the test fails).
SPECS = {
    "pgd": PGD,
    "fgsm": {"attack": "fgsm", "params": {"eps_255": 4}},
    "nfgsm": {"attack": "nfgsm", "params": {"eps_255": 4}},
    "apgd_ce": {"attack": "apgd_ce", "params": {"eps_255": 4, "steps": 4}},
    "apgd_t": {"attack": "apgd_t", "params": {"eps_255": 4, "steps": 4, "n_targets": 2}},
    "aa": {"attack": "aa", "params": {"eps_255": 4, "steps": 3, "n_targets": 2}, "worst_only": True},
    "square": {"attack": "square", "params": {"eps_255": 4, "n_queries": 20}},
    # Large eps from another model: noise to the target, which turns some wrong samples right.
    "transfer": {"attack": "transfer", "params": {"source": MICRO, "attack": "pgd",
                                                  "params": {"eps_255": 64, "step_255": 16, "steps": 3}}},
    "typographic": {"attack": "typographic", "params": {}},
    "word": WORD,
    "char": {"attack": "char", "params": {"char_budget": 1, "max_candidates": 10}},
    "multimodal": {"attack": "multimodal", "params": {"mode": "co_attack", "image": PGD, "text": WORD}},
}


def _evaluate(model, test, suite, n=60, sweep=None, idx=None):
    idx = sample_indices(test.labels, n, 0) if idx is None else idx
    return evaluate_classification(model, in_memory_batches(test), idx, test.classnames, test.templates[:1],
                                   suite, "fashion_mnist", 30, 0, sweep, n_examples=0)


def test_every_attack_has_a_spec():
    assert set(SPECS) == set(list_attacks())


def _seeded_source(folder: Path) -> str:
    """An untrained micro CLIP with fixed weights, saved: a source model independent of test order.
    Seed 1, not 0: the evaluated model was trained from seed 0's initialisation, whose gradients still
    align with it (its transfer attack drives accuracy to ~2% and turns no wrong sample right)."""
    torch.manual_seed(1)
    return str(save_model(create_model(MICRO), folder))


def test_robust_implies_clean_correct_for_every_attack(trained_model, fmnist, tmp_path):
    _, test = fmnist
    specs = {**SPECS, "transfer": {**SPECS["transfer"],
                                   "params": {**SPECS["transfer"]["params"], "source": _seeded_source(tmp_path / "src")}}}
    suite = suite_from_specs([{"name": name, **spec} for name, spec in specs.items()])
    # The rule is not vacuous here: the transfer attack's own predictions (large eps from another model,
    # noise to the target) turn some misclassified samples right. Find them over the whole split, and
    # evaluate a stratified subset together with them.
    classifier = ZeroShotClassifier.from_prompts(trained_model, test.classnames, test.templates[:1])
    task = ZeroShotTask(classifier, build_prompts(test.classnames, test.templates[0]), set(test.classnames),
                        classnames=list(test.classnames))
    images, labels = test.float_images(), test.labels
    clean_all = predict(classifier, images) == labels
    raw = run_zeroshot_attack(suite[[e.name for e in suite].index("transfer")].attack, task, images, labels).correct(labels)
    fixed = torch.nonzero(raw & ~clean_all).flatten()
    assert len(fixed) > 0, "no misclassified sample turned right: the rule is not exercised"
    idx = torch.unique(torch.cat([sample_indices(test.labels, 50, 0), fixed[:10]]))
    res = _evaluate(trained_model, test, suite, sweep=("pgd", {"steps": 2}, [2, 64]), idx=idx)
    clean = res.outcomes["clean"]
    assert 0 < clean.float().mean() < 1
    columns = [n for n in res.outcomes if n != "clean"]
    assert {f"worst_{f}" for f in res.families} | {"sweep_eps2", "sweep_eps64"} <= set(columns)
    assert {e.name for e in suite if not e.worst_only} <= set(columns)
    for name in columns:  # every attack column, every worst case, every sweep point
        assert not (res.outcomes[name] & ~clean).any(), name


def _one(name: str):
    spec = SPECS[name]
    return create_attack(spec["attack"], **spec["params"])


def test_families_never_mix_budget_kinds():
    """Default families hold one budget kind each; an explicit family mixing two kinds is refused;
    typographic (no norm bound) is never in the image family."""
    kinds = {name: budget_kind(_one(name).threat_model()) for name in SPECS}
    assert kinds["typographic"].startswith("unbounded") and kinds["transfer"] == kinds["pgd"] == "norm-bounded"
    suite = suite_from_specs([{"name": name, **spec} for name, spec in SPECS.items()])
    for family, names in families(suite).items():
        assert len({kinds[n] for n in names}) == 1, (family, names)
    assert "typographic" not in families(suite)["image"]
    for a, b in combinations(SPECS, 2):
        specs = [{"name": n, **SPECS[n], "family": "one"} for n in (a, b)]
        if kinds[a] != kinds[b]:
            with pytest.raises(SuiteError, match="family 'one' mixes budget kinds"):
                suite_from_specs(specs)
        else:
            suite_from_specs(specs)


@pytest.mark.parametrize("profile", ["params.yaml", "params/paper.yaml"])
def test_the_profiles_keep_typographic_out_of_the_image_family(profile):
    specs = yaml.safe_load((ROOT / profile).read_text())["evaluate"]["suite"]
    entries = suite_from_specs([{k: v for k, v in s.items() if k != "datasets"} for s in specs])
    fams = families(entries)
    assert all(e.family != "image" for e in entries if e.attack.name == "typographic")
    assert all(len({budget_kind(e.attack.threat_model()) for e in entries if e.family == f}) == 1 for f in fams)


def test_transfer_from_the_model_itself_is_recorded_and_no_masking_check(trained_model, fmnist, tmp_path):
    _, test = fmnist
    folder = save_model(trained_model, tmp_path / "base")
    params = {"attack": "pgd", "params": {"eps_255": 4, "step_255": 1, "steps": 2}}
    suite = suite_from_specs([{"name": "image", **PGD},
                              {"name": "transfer", "attack": "transfer", "params": {"source": str(folder), **params}},
                              {"name": "transfer_micro", "attack": "transfer", "params": {"source": MICRO, **params}}])
    res = _evaluate(trained_model, test, suite, n=20)
    assert res.threat_models["transfer"]["source_is_target"] is True
    assert res.threat_models["transfer_micro"]["source_is_target"] is False
    assert source_is_target(suite[1].attack, create_model(str(folder))) is True
    # The self-transfer equals white-box PGD on the same model and seed-free steps: it checks nothing.
    result = {"model": "tecoa", "dataset": "fashion_mnist", "n": res.n, "metrics": res.metrics,
              "threat_models": res.threat_models, "families": res.families}
    outcomes = {"indices": res.indices, "correct": {k: v.int().tolist() for k, v in res.outcomes.items()}}
    md = "\n".join(masking_markdown(Collection([load_evaluation(result, outcomes, "result.json")])))
    assert "Not a check: transfer on TeCoA, fashion_mnist" in md and "transfer_micro on" not in md


def test_zero_budget_text_attacks_equal_clean_with_a_prompt_ensemble(trained_model, fmnist):
    """With several templates the evaluation's classifier is their ensemble and a text attack sees
    that same classifier: a zero budget reproduces clean outcomes per sample; a real budget lowers them."""
    _, test = fmnist
    from mmcoa.data.classnames import field_templates

    templates = field_templates("cifar10", test.templates[0])[:4]
    assert len(set(templates)) == 4
    zero_word = {"attack": "word", "params": {"word_budget": 0, "k": 5}}
    zero_char = {"attack": "char", "params": {"char_budget": 0}}
    zero_pgd = {"attack": "pgd", "params": {"eps_255": 0, "step_255": 1, "steps": 2}}
    suite = suite_from_specs([
        {"name": "word0", **zero_word}, {"name": "char0", **zero_char},
        {"name": "co0", "attack": "multimodal", "params": {"mode": "co_attack", "image": zero_pgd, "text": zero_word}},
        {"name": "word1", **WORD},
    ])
    idx = sample_indices(test.labels, 60, 0)
    res = evaluate_classification(trained_model, in_memory_batches(test), idx, test.classnames, templates,
                                  suite, "fashion_mnist", 30, 0, None, n_examples=0)
    clean = res.outcomes["clean"]
    for name in ("word0", "char0", "co0"):
        assert torch.equal(res.outcomes[name], clean), name
    assert res.outcomes["word1"].sum() < clean.sum()
