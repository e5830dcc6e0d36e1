"""The report as a pure function of evaluation folders: statistics against scipy and hand computations,
findings only with a significant paired test, worst-case and held-out arithmetic, masking flags,
stable outputs, one-line errors, and `mmcoa seeds` against a real DVC repository."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import binomtest, norm
from typer.testing import CliRunner

from mmcoa.report import (
    Collection,
    ReportError,
    Run,
    compare,
    finding,
    headline_metrics,
    load_evaluation,
    TEXT_RULE,
    masking_flags,
    masking_markdown,
    seed_runs,
    self_transfer,
    text_rule_markdown,
    seeds_markdown,
    splice_summary,
    trained_status,
    transfer_markdown,
)
from mmcoa.stats import (accuracy_interval, cluster_interval, cluster_paired_test, holm, mean_interval, paired_test, spread,
                         wilson_interval)
from stages.cli import app
from stages.common import StageError

PGD = {"attack": "pgd", "side": "image", "family": "image", "norm": "linf", "eps_255": 4, "steps": 10}
SQUARE = {"attack": "square", "side": "image", "family": "image", "norm": "linf", "eps_255": 4, "queries": 1000}
WORD = {"attack": "word", "side": "text", "family": "text", "word_budget": 1, "candidates": "glove", "k": 10}
CHAR = {"attack": "char", "side": "text", "family": "text", "char_budget": 1}
TRANSFER = {"attack": "transfer", "side": "image", "family": "image", "source": "models/base", "crafted_with": PGD}
MM = {"attack": "multimodal", "side": "both", "family": "multimodal", "mode": "co_attack", "image": PGD, "text": WORD}
THREATS = {"clean": {"attack": "none", "side": "image", "family": "clean"}, "image": PGD, "square": SQUARE,
           "text": WORD, "text_char": CHAR, "multimodal": MM, "transfer": TRANSFER}
FAMILIES = {"image": ["image", "square", "transfer"], "text": ["text", "text_char"], "multimodal": ["multimodal"]}


def vec(n: int, k: int, seed: int = 0, within: list[int] | None = None) -> list[int]:
    """n outcomes with exactly k correct, at positions drawn from ``seed`` (among the correct ones of
    ``within``: robust outcomes are a subset of the clean ones)."""
    v = np.zeros(n, dtype=int)
    pool = np.arange(n) if within is None else np.flatnonzero(within)
    v[np.random.default_rng(seed).choice(pool, k, replace=False)] = 1
    return v.tolist()


def write_eval(root: Path, model: str, dataset: str, correct: dict[str, list[int]], role: str = "held_out",
               trained_on: dict | None = None, **extra) -> Path:
    """An evaluation folder as the evaluate stage writes it; metrics and worst columns derived from ``correct``."""
    n = len(next(iter(correct.values())))
    correct = dict(correct)
    families = {f: [a for a in attacks if a in correct] for f, attacks in FAMILIES.items()}
    families = {f: a for f, a in families.items() if a}
    for f, attacks in families.items():
        correct[f"worst_{f}"] = np.logical_and.reduce([np.array(correct[a], bool) for a in attacks]).astype(int).tolist()
    result = {"model": model, "dataset": dataset, "task": "classification", "role": role, "n": n,
              "metrics": {f"{dataset}.{a}.acc": float(np.mean(v)) for a, v in correct.items()},
              "threat_models": {a: THREATS[a] for a in correct if a in THREATS}, "families": families,
              "worst": {f: f"worst_{f}" for f in families}, "gradient_masking_flags": [], "examples": {},
              "classnames": [f"c{i}" for i in range(10)], "template": "a photo of a {c}.",
              "trained_on": trained_on, **extra}
    folder = root / model / dataset
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "result.json").write_text(json.dumps(result))
    (folder / "outcomes.json").write_text(json.dumps({"indices": list(range(n)), "correct": correct}))
    return folder


def run_report(evals: Path, out: Path):
    return CliRunner().invoke(app, ["report", "--evals", str(evals), "--out", str(out)])


def load_all(evals: Path) -> Collection:
    evs = []
    for f in sorted(evals.glob("*/*/result.json")):
        o = f.parent / "outcomes.json"
        evs.append(load_evaluation(json.loads(f.read_text()), json.loads(o.read_text()) if o.exists() else None, str(f)))
    return Collection(evs)


# --- statistics ------------------------------------------------------------------------------


@pytest.mark.parametrize("k,n", [(0, 10), (3, 10), (10, 10), (137, 400), (399, 400)])
def test_wilson_matches_scipy(k, n):
    ci = binomtest(k, n).proportion_ci(0.95, method="wilson")
    assert wilson_interval(k, n) == pytest.approx((ci.low, ci.high), abs=1e-12)
    assert accuracy_interval(round(k / n, 6), n) == wilson_interval(k, n)


def test_paired_test_is_exact_mcnemar():
    a = [1] * 30 + [0] * 5 + [1] * 50 + [0] * 15   # 30 a-only, 5 b-only, 50 both, 15 neither
    b = [0] * 30 + [1] * 5 + [1] * 50 + [0] * 15
    diff, p, n01, n10 = paired_test(a, b)
    assert (n01, n10) == (5, 30)
    assert diff == pytest.approx((30 - 5) / 100)
    # Hand computation: two-sided exact binomial on 35 discordant pairs = 2 * P(X <= 5), X ~ Bin(35, 1/2).
    assert p == pytest.approx(2 * sum(math.comb(35, i) for i in range(6)) / 2**35, rel=1e-9)
    assert p == pytest.approx(binomtest(30, 35, 0.5).pvalue, rel=1e-12)
    assert paired_test([1, 0, 1], [1, 0, 1]).p == 1.0


def test_mean_interval_holm_and_spread_by_hand():
    lo, hi = mean_interval([0.5, 0.8], [100, 400])
    half = norm.ppf(0.975) * math.sqrt(0.25 / 100 + 0.16 / 400) / 2
    assert (lo, hi) == pytest.approx((0.65 - half, 0.65 + half))
    # Holm at 5% over 3 tests: thresholds 0.05/3, 0.05/2, 0.05 in order of p.
    assert holm([0.01, 0.04, 0.03]) == [True, False, False]
    assert holm([0.01, 0.02, 0.04]) == [True, True, True]
    s = spread([0.5, 0.7, 0.6])
    assert (s.mean, s.min, s.max, s.n) == pytest.approx((0.6, 0.5, 0.7, 3))
    assert s.std == pytest.approx(math.sqrt(((0.1) ** 2 + 0.1 ** 2) / 2))


def test_cluster_paired_test_exact_against_enumeration_and_mcnemar():
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 2, 60), rng.integers(0, 2, 60)
    # One sample per cluster: the exact McNemar test.
    assert cluster_paired_test(a, b, range(60)).p == pytest.approx(paired_test(a, b).p, rel=1e-9)
    # Clusters of 4 identical outcomes: McNemar on the clusters (the per-image test), not on 240 samples.
    owners = np.repeat(np.arange(60), 4)
    t = cluster_paired_test(np.repeat(a, 4), np.repeat(b, 4), owners)
    assert t.p == pytest.approx(paired_test(a, b).p, rel=1e-9) and (t.n01, t.n10) == (4 * paired_test(a, b).n01, 4 * paired_test(a, b).n10)
    assert paired_test(np.repeat(a, 4), np.repeat(b, 4)).p < t.p
    # Unequal clusters: the p-value is the share of all 2**m sign flips of per-cluster differences at least as extreme.
    owners = rng.integers(0, 10, 60)
    d = np.array([np.sum(a[owners == c]) - np.sum(b[owners == c]) for c in range(10)])
    flips = np.array(np.meshgrid(*[[-1, 1]] * 10)).reshape(10, -1).T
    expect = np.mean(np.abs(flips @ np.abs(d)) >= abs(d.sum()))
    assert cluster_paired_test(a, b, owners).p == pytest.approx(expect, rel=1e-12)
    # Cluster labels need not be 0..C-1 nor sorted.
    assert cluster_paired_test(a, b, owners * 7 + 3).p == pytest.approx(expect, rel=1e-12)
    assert cluster_paired_test([1, 0], [1, 0], [0, 1]).p == 1.0


def test_cluster_interval_by_hand():
    y = np.array([1] * 30 + [0] * 70)
    assert cluster_interval(y, range(100)) == pytest.approx(wilson_interval(30, 100), abs=1e-12)
    assert cluster_interval(np.repeat(y, 5), np.repeat(np.arange(100), 5)) == pytest.approx(wilson_interval(30, 100), abs=1e-12)
    assert cluster_interval(np.zeros(20), np.repeat(np.arange(4), 5)) == pytest.approx(wilson_interval(0, 4), abs=1e-12)
    # Partly clustered: between the two extremes.
    mixed = np.repeat(y, 5)
    mixed[::10] = 1 - mixed[::10]
    lo, hi = cluster_interval(mixed, np.repeat(np.arange(100), 5))
    naive = wilson_interval(int(mixed.sum()), 500)
    assert lo < naive[0] and hi > naive[1]


# --- the report's arithmetic -----------------------------------------------------------------


def _two_models(evals: Path, k_strong: int, k_weak: int, n: int = 400):
    """mmcoa and tecoa on one fine-tuning set; mmcoa right on k_strong samples under text, tecoa on k_weak (nested)."""
    text_strong = [1] * k_strong + [0] * (n - k_strong)
    text_weak = [1] * k_weak + [0] * (n - k_weak)
    clean = [1] * 320 + [0] * (n - 320)
    common = {"clean": clean, "image": vec(n, 200, 2, clean)}
    write_eval(evals, "mmcoa", "fm", {**common, "text": text_strong}, role="finetune")
    write_eval(evals, "tecoa", "fm", {**common, "text": text_weak}, role="finetune")


def test_finding_only_when_holm_rejects_in_report_and_readme_alike(tmp_path):
    """Three comparisons (clean, image, text; one pair): Holm's first threshold is 0.05 / 3 = 0.0167.
    7 discordant pairs all one way (p = 2/2**7 = 0.0156) is a finding; 6 (p = 0.031, below 0.05 uncorrected)
    is not, in report.md and in the README summary alike."""
    cases = {"sig": (300, 260, True), "holm7": (300, 293, True), "raw6": (300, 294, False), "same": (300, 295, False)}
    for case, (strong, weak, _) in cases.items():
        _two_models(tmp_path / case, strong, weak)
    for case, (strong, weak, expect) in cases.items():
        comparisons = compare(load_all(tmp_path / case))
        assert len(comparisons) == 3
        text = [c for c in comparisons if c.attack == "text"][0]
        assert text.p == pytest.approx(binomtest(strong - weak, strong - weak).pvalue)
        assert text.significant is expect and holm([c.p for c in comparisons]) == [c.significant for c in comparisons]
        assert run_report(tmp_path / case, tmp_path / f"out_{case}").exit_code == 0
        md = (tmp_path / f"out_{case}" / "report.md").read_text()
        summary = (tmp_path / f"out_{case}" / "summary.md").read_text()
        text_group = md.split("**text on fm**")[1].split("**")[0]
        diff = 100 * (strong - weak) / 400
        assert (f"- MMCoA > TeCoA: +{diff:.1f} points (" in text_group) is expect
        assert ("Not distinguishable after Holm's correction: TeCoA vs MMCoA" in text_group) is not expect
        assert "> " not in md.split("**clean on fm**")[1].split("**")[0]
        statement = f"a difference is a finding only where Holm's correction over all 3 rejects at family-wise 5%: {int(expect)} do."
        assert statement in md and statement in summary
    sentence = finding([c for c in compare(load_all(tmp_path / "sig")) if c.attack == "text"][0])
    assert sentence.startswith("MMCoA > TeCoA under text on fm: +10.0 points") and "400 samples" in sentence
    assert "threat model: word, word_budget 1, candidates glove, k 10" in sentence and "Holm" not in sentence
    raw = finding([c for c in compare(load_all(tmp_path / "raw6")) if c.attack == "text"][0])
    assert raw.endswith("(not significant after Holm's correction)")


def test_worst_case_heldout_average_and_headline(tmp_path):
    n = 200
    for i, model in enumerate(("base", "tecoa")):
        for d, role in (("fm", "finetune"), ("digits", "held_out"), ("mnist", "held_out")):
            clean = vec(n, 150 + i, 1)
            write_eval(tmp_path, model, d, {"clean": clean, "image": vec(n, 90 + 10 * i, 2, clean),
                                            "square": vec(n, 100, 3, clean), "text": vec(n, 120, 4, clean),
                                            "text_char": vec(n, 60, 5, clean), "multimodal": vec(n, 50, 6, clean)},
                       role=role)
    # A retrieval set and a held-out retrieval role must stay out of the held-out classification average.
    folder = tmp_path / "base" / "coco"
    folder.mkdir()
    (folder / "result.json").write_text(json.dumps({
        "model": "base", "dataset": "coco", "task": "retrieval", "role": "held_out", "n": 10, "n_captions": 50,
        "metrics": {"coco.clean.i2t_r1": 0.0, "coco.clean.t2i_r1": 0.0}, "threat_models": {}}))
    col = load_all(tmp_path)
    for e in col.evals:
        for family, attacks in e.families.items():
            worst = e.acc(f"worst_{family}")
            assert all(worst <= e.acc(a) for a in attacks)
            assert worst == pytest.approx(np.mean(np.logical_and.reduce([e.correct[a] for a in attacks])))
    head = headline_metrics(col)
    for model in ("base", "tecoa"):
        expect = np.mean([col.get(model, d).acc("worst_image") for d in ("digits", "mnist")])
        assert head[f"{model}.heldout.worst_image"] == pytest.approx(expect)
        assert head[f"{model}.heldout.clean"] == pytest.approx(np.mean([col.get(model, d).acc("clean") for d in ("digits", "mnist")]))
    assert set(head) == {f"{m}.{k}" for m in ("base", "tecoa") for k in
                         ("heldout.clean", "heldout.worst_image", "heldout.worst_text", "heldout.worst_multimodal",
                          "fm.clean", "fm.image", "fm.text", "fm.multimodal")}
    res = run_report(tmp_path, tmp_path / "out")
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "out" / "headline.json").read_text()) == pytest.approx(head)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["tecoa.digits.text_char.acc"] == col.get("tecoa", "digits").acc("text_char")
    assert "base.coco.clean.i2t_r1" in metrics


def test_transfer_section_answers_per_defense_with_paired_tests(tmp_path):
    """A defense robust on the fine-tuning set (text +40 points) that loses clean accuracy on the held-out
    set (-30 points, all discordant one way) and is indistinguishable there under text (5 discordant)."""
    n = 200
    nested = lambda k: [1] * k + [0] * (n - k)  # noqa: E731  (nested outcomes: every discordant pair one way)
    write_eval(tmp_path, "base", "fm", {"clean": nested(150), "text": nested(60)}, role="finetune")
    write_eval(tmp_path, "mmcoa", "fm", {"clean": nested(150), "text": nested(140)}, role="finetune")
    write_eval(tmp_path, "base", "digits", {"clean": nested(180), "text": nested(100)})
    write_eval(tmp_path, "mmcoa", "digits", {"clean": nested(120), "text": nested(95)})
    lines = transfer_markdown(load_all(tmp_path))
    table = [line for line in lines if line.startswith("| MMCoA")]
    assert table == ["| MMCoA | fm (fine-tuning) | +0.0 | +40.0* |", "| MMCoA | digits | -30.0* | -2.5 |"]
    assert ("- MMCoA: on fm above the base under text; on digits below it under clean." in lines)
    assert run_report(tmp_path, tmp_path / "out").exit_code == 0
    assert "## Does robustness transfer?" in (tmp_path / "out" / "report.md").read_text()
    assert "Against the base: MMCoA: on fm above the base under text; on digits below it under clean." in (
        tmp_path / "out" / "summary.md").read_text()


def test_report_names_each_runtime_the_numbers_were_computed_with(tmp_path):
    cpu = {"torch": "2.14.1", "device": "cpu", "cpu_kernels": "AVX2", "threads": 2}
    gpu = {"torch": "2.14.1", "device": "cuda", "gpu": "NVIDIA A100"}
    write_eval(tmp_path, "base", "fm", {"clean": vec(50, 40)}, role="finetune", runtime=cpu)
    write_eval(tmp_path, "mmcoa", "fm", {"clean": vec(50, 41)}, role="finetune", runtime=cpu)
    write_eval(tmp_path, "base", "digits", {"clean": vec(50, 45)}, runtime=gpu)
    assert run_report(tmp_path, tmp_path / "out").exit_code == 0
    line = "Computed with torch 2.14.1 on cuda (NVIDIA A100); torch 2.14.1 on cpu (AVX2 kernels, 2 threads)."  # base/digits first
    assert line in (tmp_path / "out" / "report.md").read_text()


def write_retrieval(root: Path, model: str, i2t: list[int], t2i: list[int], gallery: list[int] | None = None,
                    per_image: int = 5) -> None:
    """A retrieval evaluation under the text attack: per-image and per-caption R@1 outcomes, the gallery's
    dataset indices and the gallery image of each caption (``per_image`` consecutive captions per image);
    ``gallery=[]`` leaves both out, as a result that does not record them."""
    folder = root / model / "coco"
    folder.mkdir(parents=True)
    correct = {"text.i2t_r1": i2t, "text.t2i_r1": t2i}
    extra = {} if gallery == [] else {"image_indices": gallery or list(range(len(i2t))),
                                      "caption_image": [j // per_image for j in range(len(t2i))]}
    (folder / "result.json").write_text(json.dumps({
        "model": model, "dataset": "coco", "task": "retrieval", "role": "held_out", "n": len(i2t),
        "n_captions": len(t2i), "metrics": {f"coco.{k}": float(np.mean(v)) for k, v in correct.items()},
        "threat_models": {"text": WORD}, **extra}))
    (folder / "outcomes.json").write_text(json.dumps({"correct": correct}))


def test_retrieval_caption_queries_are_tested_and_bounded_per_image(tmp_path):
    """40 images of 5 captions; mmcoa is right on 40 more captions than the base, all the captions of 8
    images: an image-level test sees 8 discordant images (p = 2/2**8), not 40 independent captions."""
    write_retrieval(tmp_path, "base", [1] * 10 + [0] * 30, [1] * 50 + [0] * 150)
    write_retrieval(tmp_path, "mmcoa", [1] * 12 + [0] * 28, [1] * 90 + [0] * 110)
    t2i = [c for c in compare(load_all(tmp_path)) if c.attack == "text (T->I R@1)"][0]
    assert (t2i.a, t2i.b, t2i.n, t2i.n10, t2i.n01, t2i.clusters) == ("mmcoa", "base", 200, 40, 0, 40)
    assert t2i.p == pytest.approx(binomtest(8, 8).pvalue) and t2i.test == "exact image-level sign-flip"
    i2t = [c for c in compare(load_all(tmp_path)) if c.attack == "text (I->T R@1)"][0]
    assert i2t.p == pytest.approx(binomtest(2, 2).pvalue) and i2t.test == "exact McNemar" and i2t.clusters is None
    assert run_report(tmp_path, tmp_path / "out").exit_code == 0
    md = (tmp_path / "out" / "report.md").read_text()
    lo, hi = wilson_interval(18, 40)   # 90 captions right = 18 whole images: the interval of 40 images
    assert "| MMCoA | text | 30.0 " in md and f"45.0 [{100 * lo:.1f}, {100 * hi:.1f}]" in md
    group = md.split("**text (T->I R@1) on coco**")[1].split("**")[0]
    assert group.startswith(" (200 captions of 40 images; exact image-level sign-flip test;")
    assert "- MMCoA > base (no defense): +20.0 points (45.0% vs 25.0%), p = 0.0078" in group


@pytest.mark.parametrize("gallery,why", [([i + 1 for i in range(40)], "different galleries"),
                                         ([], "no gallery indices recorded")])
def test_retrieval_results_pair_only_on_equal_galleries(tmp_path, gallery, why):
    write_retrieval(tmp_path, "base", [1] * 10 + [0] * 30, [1] * 50 + [0] * 150)
    write_retrieval(tmp_path, "mmcoa", [1] * 12 + [0] * 28, [1] * 90 + [0] * 110, gallery=gallery)
    assert compare(load_all(tmp_path)) == []
    assert run_report(tmp_path, tmp_path / "out").exit_code == 0
    md = (tmp_path / "out" / "report.md").read_text()
    assert f"Not compared (never paired query by query): base (no defense) vs MMCoA on coco ({why}" in md


def test_masking_flag_when_white_box_beats_square(tmp_path):
    n = 100
    clean = vec(n, 80)
    write_eval(tmp_path / "a", "base", "fm", {"clean": clean, "image": vec(n, 50, 1, clean), "square": vec(n, 40, 2, clean)}, role="finetune")
    write_eval(tmp_path / "b", "base", "fm", {"clean": clean, "image": vec(n, 40, 1, clean), "square": vec(n, 50, 2, clean)}, role="finetune")
    flags = masking_flags(load_all(tmp_path / "a"))
    assert len(flags) == 1 and "white-box image 50.0% is above black-box square (square) 40.0%" in flags[0]
    assert masking_flags(load_all(tmp_path / "b")) == []
    assert "checked in 1 of 1 evaluations." in masking_markdown(load_all(tmp_path / "b"))[0]


@pytest.mark.parametrize("recorded", [True, None])  # recorded by the evaluation, or judged by the source's folder
def test_transfer_from_the_model_itself_is_no_masking_check(tmp_path, recorded):
    n = 100
    clean = vec(n, 80)
    image = vec(n, 50, 1, clean)
    for model in ("base", "tecoa"):
        same = model == "base" if recorded is None else {"base": True, "tecoa": False}[model]
        threat = {**TRANSFER, **({} if recorded is None else {"source_is_target": same})}
        # A white-box attack above the transfer one: a masking flag, unless the transfer source is the model.
        folder = write_eval(tmp_path, model, "fm", {"clean": clean, "image": image, "transfer": vec(n, 40, 2, clean)},
                            role="finetune")
        result = json.loads((folder / "result.json").read_text())
        result["threat_models"]["transfer"] = threat
        (folder / "result.json").write_text(json.dumps(result))
    col = load_all(tmp_path)
    assert [self_transfer(col.get(m, "fm"), "transfer") for m in ("base", "tecoa")] == [True, False]
    flags = masking_flags(col)
    assert len(flags) == 1 and flags[0].startswith("TeCoA on fm: white-box image 50.0% is above black-box transfer")
    md = "\n".join(masking_markdown(col))
    assert "Not a check: transfer on base (no defense), fm (the transfer source is the evaluated model itself" in md
    # Without the flagged defense: the base alone has no check left, and the count says so.
    shutil.rmtree(tmp_path / "tecoa")
    md = "\n".join(masking_markdown(load_all(tmp_path)))
    assert "checked in 0 of 1 evaluations (no black-box attack in the suite)" in md and "Not a check: transfer" in md


def test_robust_but_wrong_clean_is_rejected(tmp_path):
    folder = write_eval(tmp_path, "base", "fm", {"clean": [1, 1, 0, 0], "image": [1, 0, 1, 0]}, role="finetune")
    with pytest.raises(ReportError, match=r"outcomes.json: correct.image counts 1 sample\(s\) wrong clean as robust"):
        load_all(tmp_path)
    res = run_report(tmp_path, tmp_path / "out")
    assert isinstance(res.exception, StageError) and res.exception.code == 2 and not (tmp_path / "out").exists()
    assert folder.is_dir()


def test_text_rule_is_stated_and_checked_on_recorded_prompts(tmp_path):
    folder = write_eval(tmp_path, "base", "fm", {"clean": vec(20, 10)}, role="finetune")
    result = json.loads((folder / "result.json").read_text())
    result["classnames"] = ["5", "ankle boot"]
    result["examples"] = {"text_char": {"label": [0, 1], "clean_pred": [0, 1], "prompts": [
        {"clean": 'a photo of the number: "5".', "adversarial": 'a photo of the numbr: "5".'},
        {"clean": "a photo of an ankle boot.", "adversarial": "a phto of an ankle boot."}]}}
    (folder / "result.json").write_text(json.dumps(result))
    md = "\n".join(text_rule_markdown(load_all(tmp_path)))
    assert TEXT_RULE in md and "Checked on the 2 adversarial prompts the evaluations recorded" in md
    result["examples"]["text_char"]["prompts"][0]["adversarial"] = 'a photo of the number: "k".'
    (folder / "result.json").write_text(json.dumps(result))
    md = "\n".join(text_rule_markdown(load_all(tmp_path)))
    assert 'Broken in 1 of 2 recorded adversarial prompts' in md and '`a photo of the number: "k".`' in md


def test_readme_block_is_table_figure_findings_and_link(tmp_path):
    n = 200
    nested = lambda k: [1] * k + [0] * (n - k)  # noqa: E731
    trained = {"method": "mmcoa", "dataset": "fm", "image": {"norm": "linf", "eps_255": 4}, "text": None}
    write_eval(tmp_path / "evals", "base", "fm", {"clean": nested(150), "text": nested(60)}, role="finetune")
    write_eval(tmp_path / "evals", "mmcoa", "fm", {"clean": nested(150), "text": nested(140)}, role="finetune",
               trained_on=trained)
    write_eval(tmp_path / "evals", "base", "digits", {"clean": nested(180), "text": nested(100)})
    write_eval(tmp_path / "evals", "mmcoa", "digits", {"clean": nested(120), "text": nested(95)}, trained_on=trained)
    readme = tmp_path / "README.md"
    readme.write_text("# T\n<!-- results:start -->\nold\n<!-- results:end -->\n")
    res = CliRunner().invoke(app, ["report", "--evals", str(tmp_path / "evals"), "--out", str(tmp_path / "reports"),
                                   "--readme", str(readme)])
    assert res.exit_code == 0, res.output
    block = readme.read_text().split("<!-- results:start -->")[1].split("<!-- results:end -->")[0]
    tables = [line for line in block.splitlines() if line.startswith("|---")]
    assert len(tables) == 1 and "![overview](reports/figures/overview.png)" in block
    assert (tmp_path / "reports" / "figures" / "overview.png").is_file()
    assert block.rstrip().endswith("[reports/report.md](reports/report.md).")
    md = (tmp_path / "reports" / "report.md").read_text()
    statement = [line for line in md.splitlines() if "paired comparisons on the same samples" in line][0].split(" The held-out")[0]
    assert statement in block and "Against the base: MMCoA: on fm above the base under text" in block
    assert TEXT_RULE in md and "| MMCoA | fm | image [L-inf eps 4/255] |" in md
    summary = (tmp_path / "reports" / "summary.md").read_text()
    assert "![overview](figures/overview.png)" in summary and "[report.md](report.md)" in summary


def test_trained_on_versus_held_out():
    # As the fine-tuning params record them: budgets without attack or side names.
    trained = {"method": "mmcoa", "dataset": "fm",
               "image": {"norm": "linf", "eps_255": 4, "step_255": 2, "steps": 3, "random_start": True},
               "text": {"word_budget": 1, "candidates": "glove", "k": 10, "cos_threshold": 0.5, "mlm_name": "bert"}}
    assert trained_status(PGD, trained) == "trained-on"
    assert trained_status({**PGD, "eps_255": 8}, trained) == "held out"
    assert trained_status(WORD, trained) == "trained-on"
    assert trained_status({**WORD, "k": 20}, trained) == "held out"
    assert trained_status(CHAR, trained) == "held out"
    assert trained_status(MM, trained) == "trained-on"
    assert trained_status(MM, {**trained, "text": None}) == "image side"
    assert trained_status({**PGD, "norm": "l2", "eps_255": None, "eps": 0.5}, trained) == "held out"
    assert trained_status(PGD, None) == "held out"


# --- outputs, errors, README -----------------------------------------------------------------


def test_outputs_byte_identical_on_rerun(tmp_path):
    _two_models(tmp_path / "evals", 300, 260)
    write_eval(tmp_path / "evals", "base", "digits", {"clean": vec(50, 30), "image": vec(50, 10, 1, vec(50, 30))},
               sweep=[{"eps_255": 0, "acc": 0.6}, {"eps_255": 4, "acc": 0.2}])
    # Example images as the evaluation stores them: texts in result.json, tensors in examples.safetensors.
    import torch
    from safetensors.torch import save_file

    folder = tmp_path / "evals" / "mmcoa" / "fm"
    result = json.loads((folder / "result.json").read_text())
    result["examples"] = {"clean": {"label": [1, 2], "clean_pred": [1, 0]},
                          "image": {"label": [1, 2], "clean_pred": [1, 0], "adv_pred": [3, 2]}}
    (folder / "result.json").write_text(json.dumps(result))
    save_file({"clean": torch.rand(2, 1, 8, 8), "image": torch.rand(2, 1, 8, 8)}, str(folder / "examples.safetensors"))
    outs = []
    for name in ("one", "two"):
        assert run_report(tmp_path / "evals", tmp_path / name).exit_code == 0
        outs.append({p.relative_to(tmp_path / name): p.read_bytes() for p in sorted((tmp_path / name).rglob("*")) if p.is_file()})
    assert outs[0] == outs[1]
    assert {"report.md", "summary.md", "metrics.json", "headline.json", "sweep.json", "figures/overview.png",
            "figures/accuracy.png", "figures/sweep.png", "figures/examples_mmcoa_fm.png"} <= {str(p) for p in outs[0]}


@pytest.mark.parametrize("damage,message", [
    (lambda f: (f / "result.json").write_text("{\"model\": "), "not valid JSON"),
    (lambda f: (f / "result.json").write_text(json.dumps({"model": "m", "dataset": "fm", "n": 4})), "missing key 'metrics'"),
    (lambda f: (f / "outcomes.json").write_text(json.dumps({"indices": [0, 1], "correct": {"clean": [1, 0]}})), "'indices' must list"),
    (lambda f: (f / "result.json").unlink(), "no <model>/<dataset>/result.json found"),
])
def test_garbled_or_missing_results_are_one_line_errors(tmp_path, damage, message):
    folder = write_eval(tmp_path / "evals", "base", "fm", {"clean": vec(20, 10)}, role="finetune")
    damage(folder)
    res = run_report(tmp_path / "evals", tmp_path / "out")
    assert isinstance(res.exception, StageError) and res.exception.code == 2
    assert message in str(res.exception) and "\n" not in str(res.exception)
    assert not (tmp_path / "out").exists()


def test_cli_exits_2_with_one_line(tmp_path, monkeypatch, capsys):
    from stages.cli import main

    folder = write_eval(tmp_path / "evals", "base", "fm", {"clean": vec(20, 10)}, role="finetune")
    (folder / "result.json").write_text("[1, 2")
    monkeypatch.setattr(sys, "argv", ["mmcoa", "report", "--evals", str(tmp_path / "evals"), "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as exit_:
        main()
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exit_.value.code == 2 and len(lines) == 1 and "result.json: not valid JSON" in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_outcomes_on_different_samples_are_not_compared(tmp_path):
    _two_models(tmp_path, 300, 260)
    path = tmp_path / "tecoa" / "fm" / "outcomes.json"
    outcomes = json.loads(path.read_text())
    outcomes["indices"] = [i + 1000 for i in outcomes["indices"]]
    path.write_text(json.dumps(outcomes))
    assert compare(load_all(tmp_path)) == []
    assert run_report(tmp_path, tmp_path / "out").exit_code == 0
    md = (tmp_path / "out" / "report.md").read_text()
    assert "Not compared (never paired query by query): TeCoA vs MMCoA on fm (different samples)." in md and " > " not in md


def test_worst_above_its_family_is_an_error(tmp_path):
    folder = write_eval(tmp_path, "base", "fm", {"clean": vec(20, 10), "image": vec(20, 5, 1, vec(20, 10))}, role="finetune")
    result = json.loads((folder / "result.json").read_text())
    result["metrics"]["fm.worst_image.acc"] = 0.5
    with pytest.raises(ReportError, match="worst_image = 0.5000 is above image = 0.2500"):
        load_evaluation(result, None, "r.json")


def test_splice_summary():
    readme = "# T\n\nintro\n<!-- results:start -->\nold\n<!-- results:end -->\nrest\n"
    assert splice_summary(readme, "| a |\n") == "# T\n\nintro\n<!-- results:start -->\n| a |\n<!-- results:end -->\nrest\n"
    with pytest.raises(ReportError, match="results:start"):
        splice_summary("# T\n", "x")


# --- seeds -----------------------------------------------------------------------------------


def test_seed_runs_keep_only_seed_differences():
    runs = [Run("main", {"seed": 0, "lr": 1}, {"m.a": 0.5}), Run("e1", {"seed": 1, "lr": 1}, {"m.a": 0.7}),
            Run("e2", {"seed": 2, "lr": 2}, {"m.a": 0.9}), Run("e3", {"seed": 1, "lr": 1}, {"m.a": 0.1}),
            Run("e4", {"seed": 4, "lr": 1}, {})]
    kept, notes = seed_runs(runs)
    assert [r.name for r in kept] == ["main", "e1"]
    assert len(notes) == 3 and "lr" in notes[0]
    md = seeds_markdown(kept, notes)
    s = spread([0.5, 0.7])
    assert f"| m.a | {100 * s.mean:.1f} | {100 * s.std:.2f} | 50.0 | 70.0 | 2 |" in md


def test_seeds_needs_two_runs(tmp_path):
    one = [{"rev": "abc", "name": "main", "error": None, "experiments": None, "data": {
        "params": {"params.yaml": {"data": {"seed": 0}}}, "metrics": {"reports/headline.json": {"data": {"m.a": 0.5}}}}}]
    (tmp_path / "exp.json").write_text(json.dumps(one))
    res = CliRunner().invoke(app, ["seeds", "--input", str(tmp_path / "exp.json"), "--out", str(tmp_path / "s.md")])
    assert isinstance(res.exception, StageError) and "1 run(s)" in str(res.exception) and "seed=$s" in str(res.exception)
    assert not (tmp_path / "s.md").exists()


STAGE_CMD = ("python3 -c \"import json,yaml;s=yaml.safe_load(open('params.yaml'))['seed'];"
             "json.dump({'m.heldout.clean':0.5+s/100},open('headline.json','w'))\"")


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_seeds_command_on_a_real_dvc_repo(tmp_path, monkeypatch):
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    dvc = [sys.executable, "-m", "dvc"]

    def sh(*cmd):
        subprocess.run(cmd, cwd=tmp_path, env=env, check=True, capture_output=True)

    (tmp_path / "params.yaml").write_text("seed: 0\nother: 1\n")
    (tmp_path / "dvc.yaml").write_text(
        f"stages:\n  run:\n    cmd: {json.dumps(STAGE_CMD)}\n    params: [seed]\n"
        "    metrics:\n      - headline.json:\n          cache: false\n")
    sh("git", "init", "-q")
    sh(*dvc, "init", "-q")
    sh(*dvc, "repro", "-q")
    sh("git", "add", "-A")
    sh("git", "commit", "-qm", "init")
    for s in (1, 3):
        sh(*dvc, "exp", "run", "-q", "-S", f"seed={s}")
    monkeypatch.chdir(tmp_path)  # the command reads `dvc exp show --json` of the current repository
    res = CliRunner().invoke(app, ["seeds", "--metrics", "headline.json", "--out", "seeds.md"])
    assert res.exit_code == 0, res.output
    md = (tmp_path / "seeds.md").read_text()
    s = spread([0.50, 0.51, 0.53])
    assert "3 runs that differ only by `seed` (0, " in md
    assert f"| m.heldout.clean | {100 * s.mean:.1f} | {100 * s.std:.2f} | 50.0 | 53.0 | 3 |" in md
