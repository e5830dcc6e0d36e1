"""What evaluation costs, counted at the model: per attack, passes of each tower as the attack's code
makes them (PGD-k: k input-gradient steps; a word substitution: one text-tower call per objective call),
outcomes unchanged by counting for every registered attack, both ledgers carried into result.json by
`mmcoa evaluate`, and the report's table and figure of robustness against training compute."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from mmcoa.attacks import create_attack
from mmcoa.config import TrainAttackSpec
from mmcoa.data.retrieval import open_retrieval
from mmcoa.defenses import DefenseContext, create_defense
from mmcoa.evaluate import evaluate_classification, sample_indices, suite_from_specs
from mmcoa.ledger import PASS_KEYS, ComputeLedger, is_measured, merge_measured, split_measured, tower_modules
from mmcoa.models import create_model, save_model
from mmcoa.retrieval import KS, evaluate_retrieval
from mmcoa.train import TrainConfig, in_memory_batches, train
from stages.cli import app
from test_invariants_eval import SPECS  # small budgets of every registered attack (tests/ is on sys.path)

MICRO = "mmcoa-test-micro"
K = 3
# No random start: the first iterate is the clean image, so a sample wrong clean is fooled at once.
PGD = {"attack": "pgd", "params": {"eps_255": 1, "step_255": 0.25, "steps": K, "random_start": False}}
WORD = {"attack": "word", "params": {"word_budget": 1, "k": 5}}
N = 16  # one batch, no larger than the early exit's smallest batch (MIN_BATCH): every step runs on all rows


def _evaluate(model, test, suite, n=N, count_cost=True, n_examples=0):
    idx = sample_indices(test.labels, n, 0)
    return evaluate_classification(model, in_memory_batches(test), idx, test.classnames, test.templates[:1],
                                   suite, "fashion_mnist", n, 0, n_examples=n_examples, count_cost=count_cost)


@pytest.fixture(scope="module")
def counted(_trained_micro, fmnist):
    _, test = fmnist
    suite = suite_from_specs([{"name": "pgd", **PGD}, {"name": "word", **WORD}])
    return suite, _evaluate(_trained_micro, test, suite, n_examples=N)


def test_pgd_passes_follow_its_steps(counted):
    _, res = counted
    clean, robust = res.outcomes["clean"], res.outcomes["pgd"]
    # Preconditions of the expectation: a sample wrong clean (fooled at the first iterate, so the final
    # iterate is checked once) and a robust one (never fooled, so no step ends the run early).
    assert not clean.all() and robust.any()
    c = res.cost["pgd"]
    assert c["samples"] == N
    assert c["bwd_image"] == K and c["bwd_image_rows"] == K * N
    # K steps, one check of the final iterate of the samples fooled before it, one scoring of the result.
    assert c["fwd_image"] == K + 2 and c["fwd_image_rows"] == (K + 2) * N
    assert c["fwd_text"] == c["bwd_text"] == 0  # class embeddings are computed once, under clean
    assert c["wall_s"] > 0


def test_word_passes_follow_its_objective_calls(counted, fmnist):
    suite, res = counted
    c, stats = res.cost["word"], suite[1].attack.stats
    changed = [p for p in res.examples["word"]["prompts"] if p["clean"] != p["adversarial"]]
    assert stats.calls >= 2 and changed  # round 0 and at least one round of candidates; some prompt edited
    # One text-tower call per objective call (each under 512 distinct texts) and one for the edited
    # prompts the result is scored with; images: their features once, the scoring once. No gradient.
    assert c["fwd_text"] == stats.calls + 1
    assert c["fwd_text_rows"] <= stats.texts + len(changed)
    assert c["fwd_image"] == 2 and c["fwd_image_rows"] == 2 * N
    assert c["bwd_text"] == c["bwd_image"] == 0 and c["samples"] == N


def test_clean_pass_encodes_prompts_once_and_images_once(counted, fmnist):
    _, test = fmnist
    _, res = counted
    c, classes = res.cost["clean"], len(test.classnames)
    # The classifier's class embeddings and the attack task's per-template embeddings: one call each.
    assert (c["fwd_text"], c["fwd_text_rows"]) == (2, 2 * classes)
    assert (c["fwd_image"], c["fwd_image_rows"], c["samples"]) == (1, N, N)
    assert c["bwd_image"] == c["bwd_text"] == 0
    assert list(res.cost) == ["clean", "pgd", "word"]


def test_counting_changes_no_outcome_of_any_attack(trained_model, fmnist):
    _, test = fmnist
    specs = [{"name": name, **spec} for name, spec in SPECS.items()]
    with_cost = _evaluate(trained_model, test, suite_from_specs(specs))
    without = _evaluate(trained_model, test, suite_from_specs(specs), count_cost=False)
    assert without.cost == {} and set(with_cost.cost) == {"clean", *SPECS}
    assert with_cost.metrics == without.metrics
    assert with_cost.outcomes.keys() == without.outcomes.keys()
    assert all(torch.equal(with_cost.outcomes[k], without.outcomes[k]) for k in with_cost.outcomes)
    # Every attack ran through the model it was counted at (a transfer attack: through its source).
    assert all(with_cost.cost[name]["fwd_image"] > 0 for name in SPECS)
    assert not any(m._forward_hooks for m in tower_modules(trained_model).values())  # hooks removed


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    torch.manual_seed(0)
    return create_model(MICRO), open_retrieval("fmnist_pairs", "test", root=tmp_path_factory.mktemp("fmnist_raw"))


def test_retrieval_cost_per_attack_by_side(gallery):
    model, data = gallery
    pgd = {"eps_255": 4, "step_255": 1, "steps": K}
    suite = [("pgd", create_attack("pgd", seed=0, **pgd)), ("word", create_attack("word", word_budget=1, k=3))]
    n = 8
    res = evaluate_retrieval(model, data, suite, n_images=n, batch_size=n, seed=0, n_examples=0)
    bare = evaluate_retrieval(model, data, suite, n_images=n, batch_size=n, seed=0, n_examples=0, count_cost=False)
    assert res.metrics == bare.metrics and bare.cost == {}
    clean, image, text = res.cost["clean"], res.cost["pgd"], res.cost["word"]
    assert (clean["fwd_image"], clean["fwd_image_rows"], clean["fwd_text"]) == (1, n, 1)
    assert clean["fwd_text_rows"] == res.n_captions and clean["samples"] == n
    # An image attack scores against the clean captions' embeddings: no text pass; at most K steps per run.
    assert image["fwd_text"] == image["bwd_text"] == 0 and 1 <= image["bwd_image"] <= K * len(KS)
    assert image["samples"] == n
    # A text attack scores against the clean images' embeddings: no image pass, and no gradient at all.
    assert text["fwd_image"] == text["bwd_image"] == text["bwd_text"] == 0 and text["fwd_text"] >= len(KS)


# --- through `mmcoa evaluate`, into `mmcoa report` -------------------------------------------------


def _fine_tune(fmnist, out: Path) -> dict:
    """A model fine-tuned for two TeCoA steps, saved with its ledger as the finetune stage records it."""
    train_set, _ = fmnist
    torch.manual_seed(0)
    model = create_model(MICRO)
    spec = TrainAttackSpec(attack="pgd", params={"eps_255": 4, "steps": 2})
    ctx = DefenseContext(train_set.classnames, train_set.templates[0], image_attack=spec, text_attack=None)
    ledger = ComputeLedger(model.device, model)
    history = train(model, create_defense("tecoa", model, ctx), train_set, TrainConfig(steps=2, batch_size=16, lr=1e-4),
                    monitors=[ledger])
    ledger.close()
    save_model(model, out)
    record = {"method": "tecoa", "defense": "tecoa", "dataset": "fashion_mnist", "trained_against": ["image"],
              "image_attack": {"attack": "pgd", "eps_255": 4, "steps": 2}, "ledger": ledger.summary(history, 16)}
    (out / "finetune.json").write_text(json.dumps(record))
    return record


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, fmnist, fmnist_dir):
    """base (no ledger) and tecoa (with one) evaluated by `mmcoa evaluate` on Fashion-MNIST (the fine-tuning
    set) and digits (held out), as the pipeline does."""
    from mmcoa.data import open_dataset
    from mmcoa.data.subset import write_subset

    root = tmp_path_factory.mktemp("compute")
    params = {"device": "cpu", "threads": torch.get_num_threads(), "data": {"dataset": "fashion_mnist"},
              "evaluate": {"n_samples": 20, "batch_size": 20, "n_examples": 0, "linear_probe": False,
                           "suite": [{"name": "image", **PGD}, {"name": "text", **WORD}]}}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    for name, dataset in (("fashion_mnist", open_dataset("fashion_mnist", "test", root=fmnist_dir.parent / "raw")),
                          ("digits", open_dataset("digits", "test"))):
        write_subset(dataset, 20, 0, root / "eval" / name, cache_max_images=1000)
    torch.manual_seed(0)
    save_model(create_model(MICRO), root / "models" / "base")
    record = _fine_tune(fmnist, root / "models" / "tecoa")
    for model in ("base", "tecoa"):
        for data in ("fashion_mnist", "digits"):
            res = CliRunner().invoke(app, ["evaluate", "--name", model, "--model", str(root / "models" / model),
                                           "--data", str(root / "eval" / data), "--out", str(root / "evals" / model / data),
                                           "--params", str(root / "params.yaml")])
            assert res.exit_code == 0, res.output
    return root, record


def test_result_json_carries_the_training_ledger_and_each_attacks_cost(evaluated):
    root, record = evaluated
    tecoa = json.loads((root / "evals" / "tecoa" / "fashion_mnist" / "result.json").read_text())
    base = json.loads((root / "evals" / "base" / "fashion_mnist" / "result.json").read_text())
    counted = {k: v for k, v in record["ledger"].items() if not is_measured(k)}
    assert tecoa["training_ledger"] == counted and tecoa["training_ledger"]["bwd_image"] == 2 * 3
    assert base["training_ledger"] is None  # pre-training is not fine-tuning: no ledger
    for model, result in (("tecoa", tecoa), ("base", base)):
        assert list(result["cost"]) == ["clean", "image", "text"]
        for cost in result["cost"].values():
            assert set(cost) == {*PASS_KEYS, "samples"} and cost["samples"] in (0, 20)
        assert result["cost"]["image"]["bwd_image"] == K and result["cost"]["text"]["bwd_text"] == 0
        # Measured seconds beside the result folder, never inside a DVC output (the hashes stay reproducible).
        timing = json.loads((root / "evals" / model / "fashion_mnist.timing.json").read_text())
        assert set(timing["cost"]) == {"clean", "image", "text"} and timing["cost"]["image"]["wall_s"] > 0
    timing = json.loads((root / "evals" / "tecoa" / "fashion_mnist.timing.json").read_text())
    assert timing["training_ledger"]["wall_s"] == record["ledger"]["wall_s"]


def test_report_table_and_figure_of_robustness_against_compute(evaluated):
    from PIL import Image

    root, record = evaluated
    res = CliRunner().invoke(app, ["report", "--evals", str(root / "evals"), "--out", str(root / "reports")])
    assert res.exit_code == 0, res.output
    md = (root / "reports" / "report.md").read_text()
    section = md.split("## Robustness against training compute", 1)[1].split("\n## ", 1)[0]
    rows = {line.split(" | ")[0].lstrip("| "): line for line in section.splitlines() if line.startswith("| ")}
    ledger = record["ledger"]
    image = f"{ledger['fwd_image'] + ledger['bwd_image']:,.0f} ({ledger['fwd_image']:,.0f} / {ledger['bwd_image']:,.0f})"
    assert f"| TeCoA | 2 | 32 | {image} | 0 (0 / 0) |" in rows["TeCoA"]
    assert rows["base (no defense)"].startswith("| base (no defense) | not recorded | not recorded | not recorded |")
    tecoa = json.loads((root / "evals" / "tecoa" / "fashion_mnist" / "result.json").read_text())
    assert f"{100 * tecoa['metrics']['fashion_mnist.worst_image.acc']:.1f} [" in rows["TeCoA"]
    # The evaluation's cost per attack: both models, both datasets, summed; seconds only in timing.md.
    assert "| image | classification | 80 | " in section and "![robustness against training compute]" in section
    assert "wall" not in "".join(rows.values()) and "[timing.md](timing.md)" in section
    timing = (root / "reports" / "timing.md").read_text()
    assert "| TeCoA | cpu | " in timing and "| base (no defense) | not recorded |" in timing
    assert "| image | classification | 80 | " in timing
    figure = root / "reports" / "figures" / "robustness_vs_compute.png"
    assert Image.open(figure).size[0] > 300
    metrics = json.loads((root / "reports" / "metrics.json").read_text())
    assert not any("wall" in k or "seconds" in k for k in metrics)


@pytest.mark.parametrize("extra,message", [
    ({"cost": {"image": 3}}, "'cost' must map each attack to an object"),
    ({"training_ledger": [1, 2]}, "'training_ledger' must be an object or null"),
])
def test_a_garbled_cost_record_is_a_one_line_error(tmp_path, extra, message):
    from stages.common import StageError
    from test_report import run_report, vec, write_eval

    write_eval(tmp_path / "evals", "tecoa", "fm", {"clean": vec(20, 10)}, role="finetune", **extra)
    res = run_report(tmp_path / "evals", tmp_path / "out")
    assert isinstance(res.exception, StageError) and res.exception.code == 2
    assert message in str(res.exception) and "\n" not in str(res.exception)
    assert not (tmp_path / "out").exists()


def test_counted_cost_reproduces_and_measured_cost_is_kept_apart(fmnist, tmp_path):
    """Two identical runs: the counted ledger (what outputs and metrics keep) is equal, the measured one
    (seconds, memory) is what differs; split and merge are inverse."""
    first, second = (_fine_tune(fmnist, tmp_path / name)["ledger"] for name in ("a", "b"))
    (c1, m1), (c2, m2) = split_measured(first), split_measured(second)
    assert c1 == c2 and set(m1) >= {"wall_s", "peak_memory_mb", "device"} and not any(is_measured(k) for k in c1)
    assert m1["wall_s"] != m2["wall_s"] and merge_measured(c1, m1) == first
    history = [{"step": 1, "loss": 0.5, "step_s": 0.2, "attack_image_s": 0.1}]
    counted, measured = split_measured(history)
    assert counted == [{"step": 1, "loss": 0.5}] and merge_measured(counted, measured) == history
