"""Fast adversarial training study: which training adversary buys PGD-10's robustness for less compute?

    .venv/bin/python scripts/fast_at_study.py [--defenses tecoa fare mmcoa] [--adversaries pgd10 pgd2 fgsm nfgsm]
                                              [--seeds 0 1 2] [--out study/fast_at]

Run inside the project after `dvc repro` (it fine-tunes from models/base on data/prepared and evaluates
on data/eval/<dataset>). For every (defense, adversary, seed) it runs `mmcoa finetune` (the seed changes
the batches and the attacks' random starts; the base model is the same) and `mmcoa evaluate` with the
suite's image family only (PGD-10 and the transfer check; the worst case over both), then writes
OUT/fast_at.md: per defense and adversary, accuracy as the mean over seeds with a 95% t-interval across
seeds, the image tower's counted backward passes and the measured training seconds, each as a ratio to
PGD-10; and a paired test against the PGD-10-trained model of the same seed, pooled over seeds with the
sample as the cluster (exact sign-flip test), under one Holm correction. Runs already done are reused.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from scipy.stats import t as student_t

from mmcoa.stats import cluster_paired_test, holm, spread
from stages.common import read_timing

# The training adversaries: PGD-10 as an override of finetune.image_attack (the default spec is PGD-3 at
# step 2); the others as the named variants of params.yaml (<defense>_pgd2, _fgsm, _nfgsm).
PGD10 = {"attack": "pgd", "params": {"norm": "linf", "eps_255": 4, "step_255": 1, "steps": 10, "random_start": True}}
ADVERSARIES = ["pgd10", "pgd2", "fgsm", "nfgsm"]
# The image family of the embedded default's suite (white-box PGD-10 and the transfer check).
SUITE = [
    {"name": "image", "attack": "pgd", "params": {"norm": "linf", "eps_255": 4, "step_255": 1, "steps": 10}},
    {"name": "transfer", "attack": "transfer",
     "params": {"source": "models/base", "attack": "pgd", "params": {"norm": "linf", "eps_255": 4, "step_255": 1, "steps": 10}}},
]
DATASETS = ["fashion_mnist", "digits"]
COLUMNS = ["clean", "worst_image"]


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    if subprocess.run(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"}).returncode:
        raise SystemExit(f"error: {cmd[1]} failed (its message is above); finished runs are kept, rerun to go on")


def train_and_evaluate(exe: Path, out: Path, defense: str, adversary: str, seed: int) -> Path:
    """One cell of the study: its model folder (fine-tuned once) and its evaluations (run once)."""
    name = f"{defense}-{adversary}-s{seed}"
    model = out / "models" / name
    if not (model / "finetune.json").is_file():
        recipe = ["--method", defense, "-S", f"finetune.image_attack={json.dumps(PGD10)}"] if adversary == "pgd10" \
            else ["--method", f"{defense}_{adversary}"]
        run([str(exe), "finetune", *recipe, "--base", "models/base", "--data", "data/prepared", "--out", str(model),
             "--checkpoint-dir", str(out / "checkpoints" / name), "-S", f"seed={seed}"])
    for d in DATASETS:
        ev = out / "evals" / name / d
        if not (ev / "outcomes.json").is_file():
            run([str(exe), "evaluate", "--name", name, "--model", str(model), "--data", f"data/eval/{d}",
                 "--out", str(ev), "-S", f"evaluate.suite={json.dumps(SUITE)}", "-S", "evaluate.sweep=null",
                 "-S", "evaluate.linear_probe=false", "-S", "evaluate.n_examples=0"])
    return model


def outcomes(out: Path, name: str, dataset: str) -> tuple[list[int], dict[str, np.ndarray]]:
    o = json.loads((out / "evals" / name / dataset / "outcomes.json").read_text())
    return o["indices"], {c: np.asarray(o["correct"][c], dtype=int) for c in COLUMNS}


def seconds(model: Path) -> float | None:
    """Measured training seconds, from where the finetune command records them (None if it did not)."""
    return read_timing(model).get("ledger", {}).get("wall_s")


def t_interval(values: list[float]) -> tuple[float, float, float]:
    """Mean and 95% t-interval across seeds (the interval is the mean itself for one seed)."""
    s = spread(values)
    half = float(student_t.ppf(0.975, s.n - 1) * s.std / np.sqrt(s.n)) if s.n > 1 else 0.0
    return s.mean, s.mean - half, s.mean + half


def pooled_test(out: Path, defense: str, adversary: str, seeds: list[int], dataset: str, column: str):
    """Adversary vs PGD-10 for one defense, paired per seed on the same samples, pooled over seeds with
    the sample as the cluster (its outcomes across seeds share the sample)."""
    a, b, clusters = [], [], []
    for s in seeds:
        idx_a, oa = outcomes(out, f"{defense}-{adversary}-s{s}", dataset)
        idx_b, ob = outcomes(out, f"{defense}-pgd10-s{s}", dataset)
        if idx_a != idx_b:
            raise SystemExit(f"error: {defense}-{adversary}-s{s} and its PGD-10 run were evaluated on other samples")
        a += list(oa[column])
        b += list(ob[column])
        clusters += idx_a
    return cluster_paired_test(a, b, clusters)


def report(out: Path, defenses: list[str], adversaries: list[str], seeds: list[int]) -> str:
    rows, tests = [], []
    for defense in defenses:
        ref = [json.loads((out / "models" / f"{defense}-pgd10-s{s}" / "finetune.json").read_text())["ledger"] for s in seeds]
        ref_bwd = np.mean([r["bwd_image"] for r in ref])
        ref_s = [seconds(out / "models" / f"{defense}-pgd10-s{s}") for s in seeds]
        for adv in adversaries:
            names = [f"{defense}-{adv}-s{s}" for s in seeds]
            bwd = np.mean([json.loads((out / "models" / n / "finetune.json").read_text())["ledger"]["bwd_image"] for n in names])
            secs = [seconds(out / "models" / n) for n in names]
            cells = []
            for d in DATASETS:
                for c in COLUMNS:
                    accs = [outcomes(out, n, d)[1][c].mean() for n in names]
                    m, lo, hi = t_interval(accs)
                    cells.append(f"{100 * m:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]" if len(seeds) > 1 else f"{100 * m:.1f}")
                    if adv != "pgd10" and c == "worst_image":
                        tests.append((defense, adv, d, pooled_test(out, defense, adv, seeds, d, c)))
            timed = f"{np.mean(secs):.0f} ({np.mean(secs) / np.mean(ref_s):.2f}x)" if None not in secs + ref_s else "n/a"
            rows.append(f"| {defense} | {adv} | " + " | ".join(cells) + f" | {bwd:.0f} ({bwd / ref_bwd:.2f}x) | {timed} |")
    reject = holm([t.p for *_, t in tests])
    head = " | ".join(f"{d} {c}" for d in DATASETS for c in COLUMNS)
    lines = [f"# Fast adversarial training study (seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))})", "",
             *(["One seed: no interval across seeds; the paired tests below are the only evidence.", ""]
               if len(seeds) == 1 else []),
             "Accuracy (%) as the mean over seeds with a 95% t-interval across seeds; worst_image over PGD-10 "
             "(L-inf 4/255) and the transfer check from the base; the same samples for every model. Image "
             "backward passes are counted at the model over the whole run (mean over seeds); seconds are "
             "measured on this machine.", "",
             f"| defense | training adversary | {head} | image backward passes (vs PGD-10) | seconds (vs PGD-10) |",
             "|---|---|" + "---:|" * (len(DATASETS) * len(COLUMNS) + 2), *rows, "",
             f"Worst-case image accuracy against the PGD-10-trained model of the same defense and seed: exact "
             f"sign-flip test pooled over seeds (the sample is the cluster), Holm's correction over these "
             f"{len(tests)} tests.", "",
             "| defense | training adversary | dataset | difference (points) | p | Holm rejects |", "|---|---|---|---:|---:|---|"]
    lines += [f"| {d} | {a} | {ds} | {100 * t.diff:+.1f} | {t.p:.3g} | {'yes' if r else 'no'} |"
              for (d, a, ds, t), r in zip(tests, reject)]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--defenses", nargs="+", default=["tecoa", "fare", "mmcoa"])
    ap.add_argument("--adversaries", nargs="+", default=["pgd10", "pgd2", "fgsm", "nfgsm"], choices=ADVERSARIES)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=Path("study/fast_at"))
    args = ap.parse_args()
    if "pgd10" not in args.adversaries:
        ap.error("--adversaries must include pgd10, the reference every other adversary is compared with")
    if not Path("models/base").is_dir():
        ap.error("models/base is missing: run `dvc repro` first")
    exe = Path(sys.executable).parent / "mmcoa"
    for s in args.seeds:  # seed by seed, so a study cut short leaves whole seeds to report
        for defense in args.defenses:
            for adv in args.adversaries:
                train_and_evaluate(exe, args.out, defense, adv, s)
    text = report(args.out, args.defenses, args.adversaries, args.seeds)
    (args.out / "fast_at.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
