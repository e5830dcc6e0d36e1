"""The report's figures (matplotlib, Agg backend): overview, per-dataset accuracy, eps sweep, examples,
robustness against training compute."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

from mmcoa.stats import accuracy_interval
from mmcoa.report.collection import Collection, HEADLINE, label, worst_name
from mmcoa.report.compute import compute_rows, robustness_attack

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _save(fig, path: str | Path) -> None:
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)


def overview_columns(col: Collection) -> list[tuple[str, str, list[str]]]:
    """(column label, attack, datasets) for the overview: clean and each family's worst case, per scope."""
    attacks = ["clean"] + [worst_name(f) for f in col.families()]
    if not col.families():
        attacks = [a for a in HEADLINE if a in col.attacks()]
    name = lambda a: a.replace("worst_", "worst ")  # noqa: E731
    cols = [(f"{d}\n{name(a)}", a, [d]) for d in col.finetune for a in attacks]
    if col.held_out:
        cols += [(f"held-out avg\n{name(a)}", a, col.held_out) for a in attacks]
    return cols


def save_overview_figure(col: Collection, path: str | Path) -> None:
    """Models x (scope, clean / worst case per family) heatmap of accuracy, numbers in the cells."""
    cols = overview_columns(col)
    models = col.models
    grid = np.full((len(models), len(cols)), np.nan)
    for i, m in enumerate(models):
        for j, (_, attack, ds) in enumerate(cols):
            if len(ds) == 1 and col.is_finetune(ds[0]):
                e = col.get(m, ds[0])
                v = e.acc(attack) if e else None
            else:
                v = (col.heldout_mean(m, attack) or (None,))[0]
            if v is not None:
                grid[i, j] = 100 * v
    fig, ax = plt.subplots(figsize=(1.1 * len(cols) + 2.5, 0.5 * len(models) + 1.8))
    im = ax.imshow(grid, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    for i in range(len(models)):
        for j in range(len(cols)):
            v = grid[i, j]
            ax.text(j, i, "n/a" if math.isnan(v) else f"{v:.1f}", ha="center", va="center", fontsize=8,
                    color="white" if not math.isnan(v) and v < 55 else "black")
    ax.set_xticks(range(len(cols)), [c[0] for c in cols], fontsize=7)
    ax.set_yticks(range(len(models)), [label(m) for m in models], fontsize=8)
    ft = len([c for c in cols if c[2] != col.held_out or not col.held_out])
    if col.held_out and 0 < ft < len(cols):
        ax.axvline(ft - 0.5, color="white", linewidth=3)
    fig.colorbar(im, ax=ax, label="accuracy (%)", fraction=0.03)
    ax.set_title("Accuracy (%): clean and worst case per attack family; fine-tuning set | held-out average", fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def save_accuracy_figure(col: Collection, dataset: str, path: str | Path) -> None:
    """Grouped bars with 95% Wilson error bars: each model clean and under the headline attacks."""
    evs = [col.get(m, dataset) for m in col.models if col.get(m, dataset)]
    attacks = [a for a in HEADLINE if any(e.acc(a) is not None for e in evs)]
    attacks += [worst_name(f) for f in col.families() if any(e.acc(worst_name(f)) is not None for e in evs)]
    width = 0.8 / max(len(evs), 1)
    fig, ax = plt.subplots(figsize=(max(7, 1.2 * len(attacks) + 2), 4))
    for i, e in enumerate(evs):
        xs = [j + i * width for j in range(len(attacks))]
        vals = [e.acc(a) or 0.0 for a in attacks]
        ci = [accuracy_interval(v, e.n) for v in vals]
        err = [[100 * max(v - lo, 0.0) for v, (lo, _) in zip(vals, ci)], [100 * max(hi - v, 0.0) for v, (_, hi) in zip(vals, ci)]]
        ax.bar(xs, [100 * v for v in vals], width, yerr=err, capsize=2, label=label(e.model))
    ax.set_xticks([j + width * (len(evs) - 1) / 2 for j in range(len(attacks))], attacks, fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"Zero-shot accuracy on {dataset} with 95% intervals, clean and under attack", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    _save(fig, path)


def save_sweep_figure(col: Collection, path: str | Path) -> None:
    """Robust accuracy against eps, one panel per dataset with a sweep, one line per model, chance level."""
    datasets = [d for d in col.datasets() if any(e.result.get("sweep") for e in col.evals if e.dataset == d)]
    fig, axes = plt.subplots(1, max(len(datasets), 1), figsize=(5.5 * max(len(datasets), 1), 4), squeeze=False)
    for ax, d in zip(axes[0], datasets):
        chance = None
        for e in (x for x in col.evals if x.dataset == d and x.result.get("sweep")):
            ax.plot([r["eps_255"] for r in e.result["sweep"]], [100 * r["acc"] for r in e.result["sweep"]],
                    marker="o", label=label(e.model))
            if e.result.get("classnames"):
                chance = 100 / len(e.result["classnames"])
        if chance is not None:
            ax.axhline(chance, color="gray", linestyle="--", linewidth=1, label="chance")
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xlim(left=0)
        ax.set_xlabel("L-inf eps (x/255)")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"Robust accuracy against eps: {d}", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)


def save_examples_figure(examples: dict[str, Any], classnames: list[str], path: str | Path, title: str = "") -> bool:
    """A grid: one row per attack that perturbs images (clean first), labels and predictions below.

    Returns False (and writes nothing) when no example carries images.
    """
    def eps_of(name: str) -> float:
        return float(name.removeprefix("sweep_eps").replace("p", "."))

    # The eps sweep would add a row per eps; its largest eps is enough to show what it does.
    sweep = sorted((n for n in examples if n.startswith("sweep_")), key=eps_of)
    order = [a for a in HEADLINE if a in examples]
    order += sorted(n for n in examples if n not in order and not n.startswith("sweep_")) + sweep[-1:]
    rows = [(n, examples[n]) for n in order if "images" in examples[n]]
    if not rows:
        return False
    n = max(len(ex["images"]) for _, ex in rows)
    fig, axes = plt.subplots(len(rows), n, figsize=(1.6 * n, 1.9 * len(rows)), squeeze=False)
    for r, (name, ex) in enumerate(rows):
        preds = ex.get("adv_pred", ex["clean_pred"])
        for c in range(n):
            ax = axes[r][c]
            ax.axis("off")
            if c >= len(ex["images"]):
                continue
            img = ex["images"][c].clamp(0, 1)
            pixels = (img[0] if img.shape[0] == 1 else img.permute(1, 2, 0)).float().numpy()
            ax.imshow(pixels, cmap="gray", vmin=0, vmax=1)
            ok = preds[c] == ex["label"][c]
            caption = classnames[preds[c]][:12] if ok else f"{classnames[preds[c]][:10]}\n(is {classnames[ex['label'][c]][:10]})"
            ax.set_title(caption, fontsize=7, color="green" if ok else "red")
        axes[r][0].text(-0.15, 0.5, name, transform=axes[r][0].transAxes, ha="right", va="center", fontsize=8)
    fig.suptitle(f"{title}: predicted class per attack (green = correct, red = wrong, true class in brackets)", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    _save(fig, path)
    return True


def save_compute_figure(col: Collection, path: str | Path) -> bool:
    """Worst-case image accuracy (fine-tuning set, held-out average; 95% intervals) against training passes,
    one labelled point per model (a model without a training ledger at 0). False (nothing written)
    when the evaluations hold no image attack."""
    attack = robustness_attack(col)
    rows = [r for r in compute_rows(col) if r.finetune or r.held_out]
    if attack is None or not rows:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.2))
    series = (("finetune", f"{col.finetune[0]} (fine-tuning set)" if col.finetune else "fine-tuning set", "o"),
              ("held_out", "held-out average", "s"))
    named: set[str] = set()
    for key, name, marker in series:
        points = [(r, getattr(r, key)) for r in rows if getattr(r, key) is not None]
        if not points:
            continue
        xs = [r.training_passes for r, _ in points]
        ys = [100 * est[0] for _, est in points]
        err = [[100 * max(est[0] - est[1][0], 0.0) for _, est in points],
               [100 * max(est[1][1] - est[0], 0.0) for _, est in points]]
        ax.errorbar(xs, ys, yerr=err, fmt=marker, capsize=3, label=name)
        for (r, _), x, y in zip(points, xs, ys):
            if r.model not in named:  # one label per model, at its first point
                named.add(r.model)
                ax.annotate(label(r.model), (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7)
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlim(left=-0.5)
    ax.set_xlabel("training passes (forward + backward, both towers; base at 0)")
    ax.set_ylabel(f"{attack.replace('worst_', 'worst-case ')} accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Robust accuracy against training compute", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)
    return True
