"""`mmcoa report`: reports/report.md, summary.md, metrics.json, headline.json, sweep.json and figures from
every evals/<model>/<dataset>/ folder (result.json, outcomes.json, examples.safetensors), and
timing.md from the measured seconds kept under timing/ (no rerun reproduces them, so timing.md is
neither a DVC output nor versioned)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer
from safetensors.torch import load_file

from mmcoa.report import (
    Collection,
    ReportError,
    compare,
    flat_metrics,
    headline_metrics,
    load_evaluation,
    overview_columns,
    render_markdown,
    render_summary,
    save_accuracy_figure,
    save_compute_figure,
    save_examples_figure,
    save_overview_figure,
    save_sweep_figure,
    splice_summary,
    sweep_rows,
    timing_markdown,
)
from mmcoa.ledger import merge_measured
from stages.common import StageError, atomic_dir, log, read_timing, write_json

NOTES = [
    "Robust accuracy is measured on the same samples as clean accuracy; every attack is seeded, so a rerun "
    "reproduces every number.",
    "Text attacks use the per-sample threat model: the adversary edits the prompt of each sample's true class "
    "(the rule on class names is stated above, under Text-attack rule).",
    "Deviations from the MMCoA authors' code: no attack gradients in the weight update, logit scale clamped, "
    "class-prompt embeddings computed once per step for the image attack, masked-LM candidates read at the "
    "right positions, stop words filtered case-insensitively.",
]


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise StageError(f"{path}: not valid JSON ({err.msg} at line {err.lineno}); rerun `mmcoa evaluate` for it") from None
    except OSError as err:
        raise StageError(f"{path}: cannot read ({err.strerror})") from None


def _link(target: Path, readme: Path) -> str:
    """``target`` as a link from ``readme``'s folder (README links the report and figure from there)."""
    return Path(os.path.relpath(target, readme.parent)).as_posix()


def find_folders(evals: Path) -> list[Path]:
    """Evaluation folders under ``evals``: <model>/<dataset>/ (and one-dataset <model>/ folders)."""
    if not evals.is_dir():
        raise StageError(f"{evals}: no such folder; run the evaluation stages first (`dvc repro`)")
    folders = sorted({p.parent for p in [*evals.glob("*/*/result.json"), *evals.glob("*/result.json")]})
    if not folders:
        raise StageError(f"{evals}: no <model>/<dataset>/result.json found; run the evaluation stages first (`dvc repro`)")
    return folders


def load_folder(folder: Path):
    path = folder / "result.json"
    if not path.is_file():
        raise StageError(f"{path}: missing; run `mmcoa evaluate` for that model and dataset first")
    outcomes = folder / "outcomes.json"
    result = _read_json(path)
    if isinstance(result, dict):  # the measured seconds kept beside the result, for timing.md only
        timing = read_timing(folder)
        for key in ("cost", "training_ledger"):
            if timing.get(key) and result.get(key) is not None:
                result[key] = merge_measured(result[key], timing[key])
    try:
        return load_evaluation(result, _read_json(outcomes) if outcomes.is_file() else None, str(path))
    except ReportError as err:
        raise StageError(str(err)) from None


def report(
    folders: list[Path] = typer.Argument(None, help="Evaluation folders (default: every EVALS/<model>/<dataset>/)."),
    evals: Path = typer.Option(Path("evals"), help="Parent folder of the evaluations."),
    out: Path = typer.Option(Path("reports"), help="Folder for the report, metrics files and figures."),
    readme: Path = typer.Option(None, help="Also write the summary into this README, between its results markers."),
) -> None:
    """Collect every evaluation into one report: tables with 95% intervals, paired tests, figures."""
    loaded = [(f, load_folder(f)) for f in (folders or find_folders(evals))]
    try:
        col = Collection([e for _, e in loaded])
    except ReportError as err:
        raise StageError(str(err)) from None
    # Everything that can fail on the inputs is computed before the first file is written.
    comparisons = compare(col)
    figure = "figures/overview.png" if overview_columns(col) else None
    metrics, headline, sweeps = flat_metrics(col), headline_metrics(col), sweep_rows(col)
    try:
        timing = timing_markdown(col)  # reads every ledger and cost record the evaluations carry
    except ReportError as err:
        raise StageError(str(err)) from None
    summary = render_summary(col, figure, "report.md", comparisons)
    readme_text = None
    if readme is not None:
        if not readme.is_file():
            raise StageError(f"{readme}: not found; pass the README that holds the results markers, or drop --readme")
        try:
            linked = render_summary(col, figure and _link(out / figure, readme), _link(out / "report.md", readme), comparisons)
            readme_text = splice_summary(readme.read_text(), linked)
        except ValueError as err:
            raise StageError(f"{readme}: {err}") from None
    figures = {}
    with atomic_dir(out / "figures") as tmp:
        if overview_columns(col):
            save_overview_figure(col, tmp / "overview.png")
            figures["overview"] = "figures/overview.png"
        if col.finetune:
            save_accuracy_figure(col, col.finetune[0], tmp / "accuracy.png")
            figures["accuracy"] = "figures/accuracy.png"
        if sweeps:
            save_sweep_figure(col, tmp / "sweep.png")
            figures["sweep"] = "figures/sweep.png"
        if save_compute_figure(col, tmp / "robustness_vs_compute.png"):
            figures["compute"] = "figures/robustness_vs_compute.png"
        for folder, e in loaded:
            if (folder / "examples.safetensors").is_file() and col.is_finetune(e.dataset):
                images = load_file(str(folder / "examples.safetensors"))
                # Text-only attacks leave the image as it is: their rows would repeat the clean one.
                examples = {k: {**v, "images": images[k]} for k, v in e.result.get("examples", {}).items()
                            if k in images and (e.threat(k) or {}).get("side") != "text"}
                name = f"examples_{e.model}_{e.dataset}.png"
                if save_examples_figure(examples, e.result.get("classnames", []), tmp / name, title=f"{e.model} on {e.dataset}"):
                    figures[f"examples:{e.model}"] = f"figures/{name}"
    pages = (("report.md", render_markdown(col, figures, NOTES, comparisons, timing="timing.md")),
             ("summary.md", summary), ("timing.md", timing))
    for name, text in pages:
        tmp_md = out / f".{name}.tmp"
        tmp_md.write_text(text if text.endswith("\n") else text + "\n")
        os.replace(tmp_md, out / name)
    write_json(out / "metrics.json", metrics)
    write_json(out / "headline.json", headline)
    write_json(out / "sweep.json", sweeps)
    if readme_text is not None:
        tmp_readme = readme.with_name(f".{readme.name}.tmp")
        tmp_readme.write_text(readme_text)
        os.replace(tmp_readme, readme)
    log(f"report: {len(col.evals)} evaluations of {len(col.models)} models -> {out / 'report.md'}, "
        f"{out / 'metrics.json'}, {out / 'headline.json'}, {out / 'timing.md'}")
