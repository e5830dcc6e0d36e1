"""`mmcoa report`: reports/report.md, reports/metrics.json (DVC metrics) and figures from evals/*."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from safetensors.torch import load_file

from mmcoa.report import flat_metrics, render_markdown, save_accuracy_figure, save_examples_figure, save_sweep_figure
from stages.common import PARAMS_OPTION, SET_OPTION, StageError, atomic_dir, load, log, write_json

NOTES = [
    "Robust accuracy is measured on the same samples as clean accuracy; every attack is seeded, so a rerun "
    "reproduces every number.",
    "Deviations from the MMCoA authors' code: no attack gradients in the weight update, logit scale clamped, "
    "class-prompt embeddings computed once per step for the image attack, masked-LM candidates read at the "
    "right positions, stop words filtered case-insensitively.",
]


def report(
    folders: list[Path] = typer.Argument(None, help="Evaluation folders (default: EVALS/base and EVALS/METHOD for finetune.methods)."),
    evals: Path = typer.Option(Path("evals"), help="Parent folder of the evaluations."),
    out: Path = typer.Option(Path("reports"), help="Folder for report.md, metrics.json, sweep.json and figures."),
    params: Path = PARAMS_OPTION,
    set_: list[str] = SET_OPTION,
) -> None:
    """Collect evaluation results into one report with tables, plots and examples."""
    if not folders:
        p = load(params, set_)
        folders = [evals / "base"] + [evals / m for m in p.finetune.methods]
    results = []
    for folder in folders:
        path = folder / "result.json"
        if not path.is_file():
            raise StageError(f"{path}: missing; run `mmcoa evaluate` for that model first")
        results.append((folder, json.loads(path.read_text())))
    datasets = {r["dataset"] for _, r in results}
    if len(datasets) != 1:
        raise StageError(f"results come from different datasets {sorted(datasets)}; report one dataset at a time")
    with atomic_dir(out / "figures") as tmp:
        figures = {"accuracy": "figures/accuracy.png", "sweep": "figures/sweep.png"}
        save_accuracy_figure([r for _, r in results], tmp / "accuracy.png")
        save_sweep_figure([r for _, r in results], tmp / "sweep.png")
        for folder, r in results:
            if (folder / "examples.safetensors").is_file():
                images = load_file(str(folder / "examples.safetensors"))
                examples = {k: {**v, "images": images[k]} for k, v in r["examples"].items() if k in images}
                save_examples_figure(examples, r["classnames"], tmp / f"examples_{r['model']}.png", title=r["model"])
                figures[f"examples:{r['model']}"] = f"figures/examples_{r['model']}.png"
    text = render_markdown([r for _, r in results], figures, NOTES)
    tmp_md = out / ".report.md.tmp"
    tmp_md.write_text(text)
    tmp_md.replace(out / "report.md")
    write_json(out / "metrics.json", flat_metrics([r for _, r in results]))
    write_json(out / "sweep.json", [{"model": r["model"], **row} for _, r in results for row in r.get("sweep", [])])
    log(f"report: {len(results)} models -> {out / 'report.md'}, {out / 'metrics.json'}")
