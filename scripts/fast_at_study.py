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
from pathlib import Path

import numpy as np

from mmcoa.stats import holm
from readme_block import write_block
from studylib import cell_text, evaluate, finetune, ledger, outcomes, pooled_test, t_interval

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


def cell(defense: str, adversary: str, seed: int) -> str:
    return f"{defense}-{adversary}-s{seed}"


def train_and_evaluate(out: Path, defense: str, adversary: str, seed: int) -> None:
    """One cell of the study: fine-tuned once, evaluated once per dataset."""
    recipe = ["--method", defense, "-S", f"finetune.image_attack={json.dumps(PGD10)}"] if adversary == "pgd10" \
        else ["--method", f"{defense}_{adversary}"]
    model = finetune(out, cell(defense, adversary, seed), recipe, seed)
    for d in DATASETS:
        evaluate(out, cell(defense, adversary, seed), model, d, ["-S", f"evaluate.suite={json.dumps(SUITE)}"])


def report(out: Path, defenses: list[str], adversaries: list[str], seeds: list[int]) -> tuple[str, str]:
    """(the study's Markdown, README's summary of it)."""
    rows, tests, goal = [], [], []
    for defense in defenses:
        ref = [ledger(out / "models" / cell(defense, "pgd10", s)) for s in seeds]
        ref_bwd = np.mean([r["bwd_image"] for r in ref])
        ref_s = [r["wall_s"] for r in ref]
        ref_worst = {d: t_interval(worst_image(out, defense, "pgd10", seeds, d)) for d in DATASETS}
        for adv in adversaries:
            runs = [ledger(out / "models" / cell(defense, adv, s)) for s in seeds]
            bwd = np.mean([r["bwd_image"] for r in runs])
            secs = [r["wall_s"] for r in runs]
            cells = []
            for d in DATASETS:
                evs = [out / "evals" / cell(defense, adv, s) / d for s in seeds]
                for c in COLUMNS:
                    cells.append(cell_text([outcomes(ev, COLUMNS)[1][c].mean() for ev in evs]))
                    if adv != "pgd10" and c == "worst_image":
                        pairs = [(ev, out / "evals" / cell(defense, "pgd10", s) / d) for ev, s in zip(evs, seeds)]
                        tests.append((defense, adv, d, pooled_test(pairs, c)))
            if adv != "pgd10" and bwd <= ref_bwd / 3:
                inside = [ref_worst[d][1] <= t_interval(worst_image(out, defense, adv, seeds, d))[0] <= ref_worst[d][2]
                          for d in DATASETS]
                goal.append((defense, adv, bwd / ref_bwd, inside))
            timed = f"{np.mean(secs):.0f} ({np.mean(secs) / np.mean(ref_s):.2f}x)" if None not in secs + ref_s else "n/a"
            rows.append(f"| {defense} | {adv} | " + " | ".join(cells) + f" | {bwd:.0f} ({bwd / ref_bwd:.2f}x) | {timed} |")
    reject = holm([t.p for *_, t in tests])
    head = " | ".join(f"{d} {c}" for d in DATASETS for c in COLUMNS)
    plural = "s" if len(seeds) > 1 else ""
    table = [f"| defense | training adversary | {head} | image backward passes (vs PGD-10) | seconds (vs PGD-10) |",
             "|---|---|" + "---:|" * (len(DATASETS) * len(COLUMNS) + 2), *rows]
    about = ("Accuracy (%) as the mean over seeds with a 95% t-interval across seeds; worst_image over PGD-10 "
             "(L-inf 4/255) and the transfer check from the base; the same samples for every model. Image "
             "backward passes are counted at the model over the whole run (mean over seeds); seconds are "
             "measured on this machine.")
    met = [f"{d}: {', '.join(a for dd, a, _, inside in goal if dd == d and all(inside)) or 'none'}" for d in defenses]
    goal_text = ("The goal (at most a third of PGD-10 training's image backward passes, worst-case image accuracy "
                 "inside PGD-10 training's 95% interval across seeds on " + " and ".join(DATASETS) + "): met by "
                 + "; ".join(met) + "." if len(seeds) > 1 else "The goal needs intervals across seeds: not assessed on one seed.")
    rejected = [f"{d} {a} on {ds} ({100 * t.diff:+.1f} points)" for (d, a, ds, t), r in zip(tests, reject) if r]
    holm_text = (f"Against the PGD-10-trained model of the same defense, {len(rejected)} of {len(tests)} paired "
                 f"tests of worst-case image accuracy reject under Holm's correction"
                 + (f": {'; '.join(rejected)}." if rejected else "."))
    lines = [f"# Fast adversarial training study (seed{plural} {', '.join(map(str, seeds))})", "",
             *(["One seed: no interval across seeds; the paired tests below are the only evidence.", ""]
               if len(seeds) == 1 else []),
             about, "", *table, "", goal_text, "",
             f"Worst-case image accuracy against the PGD-10-trained model of the same defense and seed: exact "
             f"sign-flip test pooled over seeds (the sample is the cluster), Holm's correction over these "
             f"{len(tests)} tests.", "",
             "| defense | training adversary | dataset | difference (points) | p | Holm rejects |", "|---|---|---|---:|---:|---|"]
    lines += [f"| {d} | {a} | {ds} | {100 * t.diff:+.1f} | {t.p:.3g} | {'yes' if r else 'no'} |"
              for (d, a, ds, t), r in zip(tests, reject)]
    readme = [f"Generated by `python scripts/fast_at_study.py --seeds {' '.join(map(str, seeds))} --defenses "
              f"{' '.join(defenses)}` (seed{plural} {', '.join(map(str, seeds))}); every paired test: "
              f"[{out / 'fast_at.md'}]({out / 'fast_at.md'}). {about}", "", *table, "", f"{goal_text} {holm_text}"]
    return "\n".join(lines) + "\n", "\n".join(readme)


def worst_image(out: Path, defense: str, adversary: str, seeds: list[int], dataset: str) -> list[float]:
    return [outcomes(out / "evals" / cell(defense, adversary, s) / dataset, ["worst_image"])[1]["worst_image"].mean()
            for s in seeds]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--defenses", nargs="+", default=["tecoa", "fare", "mmcoa"])
    ap.add_argument("--adversaries", nargs="+", default=["pgd10", "pgd2", "fgsm", "nfgsm"], choices=ADVERSARIES)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=Path("study/fast_at"))
    ap.add_argument("--readme", action="store_true", help="also write the summary into README's fast-at block")
    args = ap.parse_args()
    if "pgd10" not in args.adversaries:
        ap.error("--adversaries must include pgd10, the reference every other adversary is compared with")
    if not Path("models/base").is_dir():
        ap.error("models/base is missing: run `dvc repro` first")
    for s in args.seeds:  # seed by seed, so a study cut short leaves whole seeds to report
        for defense in args.defenses:
            for adv in args.adversaries:
                train_and_evaluate(args.out, defense, adv, s)
    text, summary = report(args.out, args.defenses, args.adversaries, args.seeds)
    (args.out / "fast_at.md").write_text(text)
    if args.readme:
        write_block(Path("README.md"), "fast-at", summary)
    print(text)


if __name__ == "__main__":
    main()
