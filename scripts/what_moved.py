"""Which committed numbers moved between two runs, and why: the metrics of a git revision against the
working tree's ``reports/metrics.json``, key by key, written as Markdown into README between
``<!-- moved:start -->`` and ``<!-- moved:end -->`` (or to stdout with ``--print``).

Only columns whose change reaches ``--min-points`` for some model are listed; each row names the
change of the evaluation that moves it (the first rule of ``REASONS`` that matches).

    python scripts/what_moved.py --old-rev 3e3e27b
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import yaml

from readme_block import write_block

RETRIEVAL = ("i2t_r1", "t2i_r1")

# (predicate on (dataset, column, metric), why). First match wins; the last rule always matches.
REASONS = [
    (lambda d, c, m: c in ("text_char", "worst_text"),
     "the character attack no longer edits class names (it deleted the label: `\"5\"` -> `\"k\"`)"),
    (lambda d, c, m: c == "transfer",
     "the transfer attack runs its full budget on its source (it stopped once the source was fooled)"),
    (lambda d, c, m: m in RETRIEVAL and c == "clean",
     "one antialiased resize for training, clean evaluation and attacks (the model's own resize differed)"),
    (lambda d, c, m: m in RETRIEVAL and c == "multimodal",
     "Co-Attack follows the reference's run_before_fusion; each R@k the lowest of runs aimed at R@1, R@5, R@10"),
    (lambda d, c, m: m in RETRIEVAL,
     "each R@k the lowest of runs aimed at R@1, R@5 and R@10 (the attack aimed at R@10 only), and the resize"),
    (lambda d, c, m: c in ("multimodal", "worst_multimodal"),
     "Co-Attack follows the reference's run_before_fusion (the text attacked alone, the image pushed from "
     "its clean embedding and the adversarial text)"),
    (lambda d, c, m: True,
     "the models themselves: pre-training sees the one resize on the 56 px retrieval canvas and every random "
     "start is drawn per sample, so base and defenses are retrained; robust now also requires clean-correct"),
]
# Sizes of the run that, changed, move every number a little besides its own reason.
SIZES = {("evaluate", "n_samples"): "classification samples per set", ("evaluate", "n_images"): "retrieval images",
         ("base", "pretrain", "steps"): "pre-training steps"}


def size_changes(rev: str) -> str:
    """The sizes of the run that differ between ``rev`` and the work tree's params.yaml, as a sentence."""
    def get(params: dict, keys: tuple) -> object:
        for k in keys:
            params = params.get(k, {}) if isinstance(params, dict) else {}
        return params
    old = yaml.safe_load(subprocess.run(["git", "show", f"{rev}:params.yaml"], check=True, capture_output=True,
                                        text=True).stdout)
    new = yaml.safe_load(Path("params.yaml").read_text())
    moved = [f"{get(new, k)} {what} instead of {get(old, k)}" for k, what in SIZES.items() if get(old, k) != get(new, k)]
    return (" The run's size changed too (" + ", ".join(moved) + "), so every number also carries other samples "
            "and a retrained base; a move of a few points alone is within the intervals.") if moved else ""


def old_metrics(rev: str, path: str) -> dict[str, float]:
    try:
        out = subprocess.run(["git", "show", f"{rev}:{path}"], check=True, capture_output=True, text=True).stdout
    except subprocess.CalledProcessError as err:
        sys.exit(f"what_moved: cannot read {path} at {rev}: {err.stderr.strip()}")
    return json.loads(out)


def columns(old: dict[str, float], new: dict[str, float]) -> dict[tuple[str, str, str], dict[str, tuple]]:
    """(dataset, column, metric) -> {model: (old, new)} over the keys both runs hold."""
    out: dict[tuple[str, str, str], dict[str, tuple]] = defaultdict(dict)
    for key in sorted(set(old) & set(new)):
        parts = key.split(".")
        if len(parts) != 4 or parts[3] not in ("acc", *RETRIEVAL) or parts[1] == "heldout":
            continue
        model, dataset, column, metric = parts
        out[(dataset, column, metric)][model] = (old[key], new[key])
    return out


def reason(dataset: str, column: str, metric: str) -> str:
    return next(why for rule, why in REASONS if rule(dataset, column, metric))


def table(old: dict[str, float], new: dict[str, float], min_points: float, rev: str) -> str:
    cols = columns(old, new)
    models = sorted({m for per in cols.values() for m in per}, key=lambda m: (m != "base", m))
    moved = {k: per for k, per in cols.items() if max(abs(n - o) for o, n in per.values()) * 100 >= min_points}
    rows = sorted(moved, key=lambda k: -max(abs(n - o) for o, n in moved[k].values()))
    head = ["| set | column | " + " | ".join(models) + " | why |", "|---|---|" + "---:|" * len(models) + "---|"]
    body = []
    for dataset, column, metric in rows:
        per = moved[(dataset, column, metric)]
        cells = [f"{100 * per[m][0]:.1f} -> {100 * per[m][1]:.1f}" if m in per else "" for m in models]
        name = column if metric == "acc" else f"{column} {metric.replace('_r1', ' R@1')}"
        body.append(f"| {dataset} | {name} | " + " | ".join(cells) + f" | {reason(dataset, column, metric)} |")
    n_keys = sum(len(per) for per in cols.values())
    n_moved = sum(len(per) for per in moved.values())
    intro = (f"Numbers of the run committed at {rev} (old -> new, %) whose column moved by {min_points:g} points or "
             f"more for some model: {len(rows)} of {len(cols)} columns ({n_moved} of {n_keys} numbers). Generated by "
             f"`python scripts/what_moved.py --old-rev {rev}` from both runs' `reports/metrics.json`." + size_changes(rev))
    return "\n".join([intro, "", *head, *body])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old-rev", required=True, help="git revision of the earlier run")
    ap.add_argument("--metrics", default="reports/metrics.json")
    ap.add_argument("--readme", default="README.md")
    ap.add_argument("--min-points", type=float, default=3.0)
    ap.add_argument("--print", action="store_true", help="print the block instead of splicing it into README")
    args = ap.parse_args()
    new = json.loads(Path(args.metrics).read_text())
    block = table(old_metrics(args.old_rev, args.metrics), new, args.min_points, args.old_rev)
    if args.print:
        print(block)
        return
    write_block(Path(args.readme), "moved", block)


if __name__ == "__main__":
    main()
