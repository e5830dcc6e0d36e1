"""Robust beyond the training threat model: which recipe keeps text robustness under held-out text attacks?

    .venv/bin/python scripts/heldout_study.py [--methods mmcoa fare tecoa mmcoa_mix anchor_word mmcoa_anchor anchor_light anchor_wide]
                                              [--seeds 0 1 2] [--seed0 tga_zsr leaf] [--out study/heldout]

Run inside the project after `dvc repro`. For every (method, seed) it runs `mmcoa finetune --method M`
(a defense or a variant of params.yaml; the seed changes the batches and the attacks' random starts) and
`mmcoa evaluate` with the embedded default's whole suite on the fine-tuning set and the held-out set.
Seed 0 of a method of the pipeline's `finetune.methods` is the pipeline's own model and evaluation
(the same params and seed give the same bytes), so it is read from models/ and evals/, not trained again.

OUT/heldout.md (``--name``) has, per method, what its text tower trained against (from its training record), accuracy
(%) as the mean over seeds with a 95% t-interval across seeds for clean and each family's worst case,
every text attack of the suite, and the issue's goal checked criterion by criterion, each with a paired
test pooled over seeds (the sample as the cluster, exact sign-flip) under one Holm correction; then the
report's "does robustness transfer?" table over the pipeline's models and seed 0 of every other method
(``--seed0`` adds methods trained at seed 0 only, for that table; seed 0 is also evaluated on the
retrieval set for it), with the report's paired tests and one Holm correction over that collection.
"""

from __future__ import annotations

import argparse
import json
from functools import cache
from pathlib import Path

import yaml

from mmcoa.report import Collection, compare, defense_verdicts, label, transfer_markdown
from mmcoa.report.format import budget
from mmcoa.stats import holm
from stages.report import find_folders, load_folder
from readme_block import write_block
from studylib import cell_text, evaluate, finetune, outcomes, pooled_test, t_interval

DATASETS = ["fashion_mnist", "digits"]
FAMILIES = ["clean", "worst_image", "worst_text", "worst_multimodal"]
TEXT = ["text", "text_wordnet", "text_glove3", "text_char"]
RETRIEVAL = "fmnist_pairs"  # seed 0 of a study method is evaluated here too, for the transfer table
REFERENCE = "mmcoa"      # the text defense the goal is measured against
IMAGE_DEFENSES = ["tecoa", "fare", "mmcoa", "tga_zsr", "leaf"]  # the best of these sets the image criterion
TRANSFER = "fare"        # the clean-accuracy reference on the held-out set


@cache
def pipeline_methods() -> list[str]:
    return yaml.safe_load(Path("params.yaml").read_text())["finetune"]["methods"]


def folders(out: Path, method: str, seed: int) -> tuple[Path, Path]:
    """(model folder, evaluations folder) of a cell: the pipeline's for seed 0 of its own methods."""
    if seed == 0 and method in pipeline_methods():
        return Path("models") / method, Path("evals") / method
    return out / "models" / f"{method}-s{seed}", out / "evals" / f"{method}-s{seed}"


def run_cell(out: Path, method: str, seed: int) -> None:
    model, _ = folders(out, method, seed)
    if model.parent == Path("models"):
        if not (model / "finetune.json").is_file():
            raise SystemExit(f"error: {model} is missing: run `dvc repro` first")
        return
    finetune(out, model.name, ["--method", method], seed)
    for d in DATASETS + ([RETRIEVAL] if seed == 0 else []):
        evaluate(out, model.name, model, d, [])


def transfer_collection(out: Path, methods: list[str]) -> Collection:
    """The pipeline's evaluations (the base and its defenses, every dataset) with seed 0 of the study's
    other methods under their method names: the report's collection with the new rows, the same samples."""
    loaded = [load_folder(f) for f in find_folders(Path("evals"))]
    for m in methods:
        if m not in pipeline_methods():
            for f in sorted(folders(out, m, 0)[1].glob("*/result.json")):
                ev = load_folder(f.parent)
                ev.result["model"] = m
                loaded.append(ev)
    return Collection(loaded)


def transfer_section(out: Path, methods: list[str]) -> tuple[list[str], list[str]]:
    """(the report's "does robustness transfer?" table over the pipeline's models and seed 0 of the study's
    others, with its paired tests and one Holm correction over every test of that collection; the generated
    sentence of each study method that is not in the pipeline)."""
    col = transfer_collection(out, methods)
    comparisons = compare(col)
    new = [m for m in methods if m not in pipeline_methods()]
    verdicts = [v for v in defense_verdicts(comparisons) if v.split(":")[0] in {label(m) for m in new}]
    about = (f"The report's table at seed 0 (the pipeline's seed), with the pipeline's models and the study's "
             f"{', '.join(new)} on every evaluation set of the default: the same paired tests, and Holm's correction "
             f"over all {len(comparisons)} tests of this collection (more than the default report's, so a difference "
             f"must be larger here to be starred).")
    return [about, "", *transfer_markdown(col, comparisons)], verdicts


def trained_text(model: Path) -> str:
    """What the text tower trained against, from the training record (none for an image-only defense)."""
    record = json.loads((model / "finetune.json").read_text()).get("text_attack")
    specs = record.get("components", [record]) if record else []
    return " + ".join(budget(r, "text") for r in specs) or "none"


def accuracy(out: Path, method: str, seeds: list[int], dataset: str, column: str) -> list[float]:
    return [outcomes(folders(out, method, s)[1] / dataset, [column])[1][column].mean() for s in seeds]


def pairs(out: Path, a: str, b: str, seeds: list[int], dataset: str) -> list[tuple[Path, Path]]:
    return [(folders(out, a, s)[1] / dataset, folders(out, b, s)[1] / dataset) for s in seeds]


def goal_rows(out: Path, method: str, seeds: list[int], present: list[str]) -> list[tuple[str, str, float, object, bool | None, bool]]:
    """(criterion, dataset, measured difference, paired test, met by the means, whether "met" also needs the
    test: an "above" criterion is met only where the paired test finds the difference) of the goal for ``method``."""
    rows = []
    mean = lambda m, d, c: t_interval(accuracy(out, m, seeds, d, c))
    for d in DATASETS:
        if REFERENCE in present:
            for column, need in (("worst_text", 0.15), ("worst_multimodal", 0.0)):
                diff = mean(method, d, column)[0] - mean(REFERENCE, d, column)[0]
                test = pooled_test(pairs(out, method, REFERENCE, seeds, d), column)
                rows.append((f"{column} - {REFERENCE}'s > {100 * need:.0f} points", d, diff, test, diff > need, True))
        image = [m for m in IMAGE_DEFENSES if m in present]
        if image:
            best = max(image, key=lambda m: mean(m, d, "worst_image")[0])
            _, lo, hi = mean(best, d, "worst_image")
            m = mean(method, d, "worst_image")[0]
            test = pooled_test(pairs(out, method, best, seeds, d), "worst_image")
            rows.append((f"worst_image inside {best}'s 95% interval", d, m - mean(best, d, "worst_image")[0], test,
                         lo <= m <= hi if len(seeds) > 1 else None, False))
    if TRANSFER in present:
        d = DATASETS[-1]
        diff = mean(method, d, "clean")[0] - mean(TRANSFER, d, "clean")[0]
        rows.append((f"clean within 3 points of {TRANSFER}'s", d, diff,
                     pooled_test(pairs(out, method, TRANSFER, seeds, d), "clean"), diff >= -0.03, False))
    return rows


def report(out: Path, methods: list[str], seeds: list[int], candidates: list[str], name: str = "heldout",
           seed0: tuple[str, ...] = ()) -> tuple[str, str]:
    """(the study's Markdown, README's summary of it)."""
    one = len(seeds) == 1
    head = " | ".join(f"{d} {c}" for d in DATASETS for c in FAMILIES)
    rows = [f"| {m} | {trained_text(folders(out, m, seeds[0])[0])} | "
            + " | ".join(cell_text(accuracy(out, m, seeds, d, c)) for d in DATASETS for c in FAMILIES) + " |"
            for m in methods]
    text_head = " | ".join(f"{d} {c}" for d in DATASETS for c in TEXT)
    text_rows = [f"| {m} | " + " | ".join(cell_text(accuracy(out, m, seeds, d, c)) for d in DATASETS for c in TEXT) + " |"
                 for m in methods]
    found = [(m, *g) for m in candidates for g in goal_rows(out, m, seeds, methods)]
    reject = holm([g[4].p for g in found])
    goals = [(m, crit, d, diff, test, ok and (r or not tested)) for (m, crit, d, diff, test, ok, tested), r in zip(found, reject)]
    met = lambda v: "n/a (one seed)" if v is None else "yes" if v else "no"
    about = ("Accuracy (%) as the mean over seeds with a 95% t-interval across seeds, the embedded default's "
             "whole suite, the same samples for every model. worst_text is over every text attack of the suite: "
             "`text` (word, GloVe, 1 word: the threat model MMCoA trains on), `text_wordnet`, `text_glove3`, "
             "`text_char`; an attack is held out for a model unless the model's text tower trained against it "
             "(column 2, from the training record).")
    table = [f"| method | text tower trained against | {head} |", "|---|---|" + "---:|" * (len(DATASETS) * len(FAMILIES)),
             *rows]
    verdicts = []
    for m in candidates:
        mine = [g for g in goals if g[0] == m]
        verdicts.append(f"{m} meets {sum(g[5] is True for g in mine)} of {len(mine)} criteria"
                        + (f" (not: {', '.join(f'{g[1]} on {g[2]}' for g in mine if g[5] is False)})"
                           if any(g[5] is False for g in mine) else ""))
    goal_text = ("The goal, criterion by criterion (worst_text 15 points above MMCoA's and worst_multimodal above "
                 "it on both sets, worst_image inside the best image defense's interval, held-out clean within 3 "
                 "points of FARE's): " + "; ".join(verdicts) + ".") if candidates else ""
    lines = [f"# Robust beyond the training threat model (seed{'s' if not one else ''} {', '.join(map(str, seeds))})", "",
             *(["One seed: no interval across seeds; the paired tests below are the only evidence.", ""] if one else []),
             about, "", *table, "", "Each text attack of the suite:", "",
             f"| method | {text_head} |", "|---|" + "---:|" * (len(DATASETS) * len(TEXT)), *text_rows, "",
             f"The goal, criterion by criterion, for each candidate: the difference of means over seeds, and a "
             f"paired test on the same samples pooled over seeds (the sample is the cluster), Holm's correction "
             f"over these {len(goals)} tests; an \"above\" criterion is met only where Holm's correction rejects.", "",
             "| method | criterion | dataset | difference (points) | p | Holm rejects | met |",
             "|---|---|---|---:|---:|---|---|"]
    lines += [f"| {m} | {crit} | {d} | {100 * diff:+.1f} | {test.p:.3g} | {'yes' if r else 'no'} | {met(ok)} |"
              for (m, crit, d, diff, test, ok), r in zip(goals, reject)]
    transfer, transfer_verdicts = transfer_section(out, [*methods, *seed0])
    lines += ["", "## Does robustness transfer?", "", *transfer]
    readme = [f"Generated by `python scripts/heldout_study.py --seeds {' '.join(map(str, seeds))} --methods "
              f"{' '.join(methods)}{' --seed0 ' + ' '.join(seed0) if seed0 else ''}`; each text attack and every paired test: [{out / f'{name}.md'}]({out / f'{name}.md'}). "
              f"{about}", "", *table, "", goal_text, "",
              "Against the base at seed 0, with the same paired tests as the report's \"does robustness transfer?\" "
              f"table (its rows for these methods in [{out / f'{name}.md'}]({out / f'{name}.md'})):", "",
              *[f"- {v}" for v in transfer_verdicts]]
    return "\n".join(lines) + "\n", "\n".join(readme)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+",
                    default=["mmcoa", "fare", "tecoa", "mmcoa_mix", "anchor_word", "mmcoa_anchor", "anchor_light", "anchor_wide"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--seed0", nargs="*", default=[], metavar="METHOD",
                    help="methods trained at seed 0 only, for the transfer table beside the pipeline's models")
    ap.add_argument("--out", type=Path, default=Path("study/heldout"))
    ap.add_argument("--name", default="heldout", help="the report's file name: OUT/NAME.md")
    ap.add_argument("--readme", action="store_true", help="also write the summary into README's heldout block")
    args = ap.parse_args()
    if not Path("models/base").is_dir():
        ap.error("models/base is missing: run `dvc repro` first")
    for s in args.seeds:  # seed by seed, so a study cut short leaves whole seeds to report
        for m in args.methods:
            run_cell(args.out, m, s)
    for m in args.seed0:
        run_cell(args.out, m, 0)
    candidates = [m for m in args.methods if m not in (*IMAGE_DEFENSES, REFERENCE, TRANSFER)]
    text, summary = report(args.out, args.methods, args.seeds, candidates, args.name, tuple(args.seed0))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.md").write_text(text)
    if args.readme:
        write_block(Path("README.md"), "heldout", summary)
    print(text)


if __name__ == "__main__":
    main()
