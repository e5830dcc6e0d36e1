"""`mmcoa evaluate` / `mmcoa baseline`: one model on one dataset, clean and under the params' attacks.

Writes OUT/result.json (metrics, threat models, families, examples' text), OUT/outcomes.json (per-sample
outcomes of every attack, for worst cases, intervals and paired tests) and OUT/examples.safetensors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
import typer
from safetensors.torch import save_file

from mmcoa import distributed as dist
from mmcoa.attacks import AttackError
from mmcoa.data import DataError, make_loader
from mmcoa.data.subset import open_subset, read_manifest
from mmcoa.evaluate import (
    evaluate_classification,
    gradient_masking_flags,
    image_features,
    linear_probe_accuracy,
    suite_from_specs,
)
from mmcoa.zeroshot import select_templates
from mmcoa.models import ClipModel, ModelLoadError, create_model
from mmcoa.config import Params
from stages.common import PARAMS_OPTION, loader_options, SET_OPTION, StageError, atomic_dir, load, log, progress, runtime_record, setup_runtime, write_json


def _open_model(name: str, model: str | None, p: Params, device) -> ClipModel:
    """A model folder of the pipeline, any model reference, or a model named in evaluate.models."""
    try:
        if model is None and name in p.evaluate.models:
            spec = p.evaluate.models[name]
            return create_model(spec.arch, spec.pretrained, device=device)
        return create_model(model or str(Path("models") / name), None, device=device)  # a folder, or any reference
    except ModelLoadError as err:
        raise StageError(str(err)) from None


def _batches(dataset, model: ClipModel, p: Params) -> Callable:
    """A loader factory at the resolution the params name (native, or the model's input size)."""
    kwargs = loader_options(model, p)
    return lambda chunks: make_loader(dataset, chunks, **kwargs)


def _trained_on(model_dir: Path | None) -> dict | None:
    """The fine-tuning threat models of a model trained by the pipeline (None for others)."""
    info = model_dir / "finetune.json" if model_dir is not None else None
    if info is None or not info.is_file():
        return None
    f = json.loads(info.read_text())
    against = f.get("trained_against", [])
    return {"method": f.get("method"), "dataset": f.get("dataset"),
            "image": f.get("image_attack") if "image" in against else None,
            "text": f.get("text_attack") if "text" in against else None}


def run_evaluation(name: str, model_ref: str | None, data: Path, out: Path, params: Path, set_: list[str]) -> None:
    p = load(params, set_)
    try:
        meta = read_manifest(data)
    except DataError as err:
        raise StageError(str(err)) from None
    task = meta.get("task", "classification")
    if task not in TASKS:
        raise StageError(f"{data}: unknown task '{task}'; known: {', '.join(TASKS)}")
    device = setup_runtime(p)
    model = _open_model(name, model_ref, p, device)
    try:
        dataset, indices = open_subset(data, p.data.root, p.data.download, p.data.on_corrupt)
        payload, outcomes, images = TASKS[task](name, model, dataset, indices, p)
    except (AttackError, ValueError) as err:
        raise StageError(f"evaluate {name} on {meta.get('dataset')}: {err}") from None
    if not dist.is_main():
        return
    model_dir = Path(model_ref) if model_ref and Path(model_ref).is_dir() else Path("models") / name
    payload.update({
        "model": name, "dataset": dataset.name, "task": task,
        "role": "finetune" if p.data.dataset in (dataset.name, meta.get("source")) else "held_out",
        "trained_on": _trained_on(model_dir if model_dir.is_dir() else None),
        "runtime": runtime_record(device),
    })
    with atomic_dir(out) as tmp:
        write_json(tmp / "result.json", payload)
        write_json(tmp / "outcomes.json", outcomes)
        if images:
            save_file(images, str(tmp / "examples.safetensors"))
    summary = ", ".join(f"{k.split('.', 1)[1]} {v:.3f}" for k, v in payload["metrics"].items() if ".sweep_" not in k)
    log(f"evaluate: {name} on {meta['dataset']} ({payload['n']}): {summary}")
    for flag in payload.get("gradient_masking_flags", []):
        log(f"[yellow]warning[/]: {name}: possible gradient masking: {flag}")


def _classification(name: str, model: ClipModel, dataset, indices: list[int], p: Params):
    e = p.evaluate
    suite = suite_from_specs([s.model_dump() for s in e.suite if s.runs_on(dataset.name)])
    sweeps = e.sweep is not None and e.sweep_eps_255 and e.sweep.runs_on(dataset.name)
    sweep = (e.sweep.attack, e.sweep.params, list(e.sweep_eps_255)) if sweeps else None
    templates = select_templates(dataset, p.zeroshot.prompts, p.zeroshot.templates)
    batches = _batches(dataset, model, p)
    idx = torch.as_tensor(indices, dtype=torch.long)
    with progress() as bar:
        t = bar.add_task(f"{name} on {dataset.name}", total=None)
        result = evaluate_classification(
            model, batches, idx, list(dataset.classnames), templates, suite, dataset.name, e.batch_size, p.seed,
            sweep, e.n_examples, lambda done, total: bar.update(t, completed=done, total=total),
        )
    metrics = dict(result.metrics)
    threat = dict(result.threat_models)
    if e.linear_probe:
        feats, labels = image_features(model, batches([indices[i : i + e.batch_size] for i in range(0, len(indices), e.batch_size)]))
        metrics[f"{dataset.name}.linear_probe.acc"] = round(linear_probe_accuracy(feats, labels, seed=p.seed), 6)
        threat["linear_probe"] = {"attack": "none", "side": "none", "family": "probe",
                                  "probe": "logistic regression on frozen image features, 5-fold cross-validated"}
    flags = gradient_masking_flags(result.sweep, len(dataset.classnames), result.n) if result.sweep else []
    payload = {
        "n": result.n, "metrics": metrics, "threat_models": threat, "families": result.families,
        "worst": {f: f"worst_{f}" for f in result.families}, "sweep": result.sweep,
        "gradient_masking_flags": flags, "classnames": list(dataset.classnames), "template": templates[0],
        "examples": {k: {kk: vv for kk, vv in v.items() if kk != "images"} for k, v in result.examples.items()},
    }
    outcomes = {"indices": result.indices, "correct": {k: v.int().tolist() for k, v in result.outcomes.items()}}
    images = {k: v["images"].contiguous() for k, v in result.examples.items() if "images" in v}
    return payload, outcomes, images


def _retrieval(name: str, model: ClipModel, dataset, indices: list[int], p: Params):
    from mmcoa.retrieval import evaluate_retrieval

    e = p.evaluate
    specs = [s.model_dump() for s in e.retrieval_suite if s.runs_on(dataset.name)]
    suite = [(entry.name, entry.attack) for entry in suite_from_specs(specs)]
    opts = loader_options(model, p)
    with progress() as bar:
        bar.add_task(f"{name} on {dataset.name} (retrieval)", total=None)
        result = evaluate_retrieval(model, dataset, suite, len(dataset), e.batch_size, p.seed, size=opts["size"],
                                    interpolation=opts["interpolation"])
    queries = {"image_indices": result.image_indices.tolist(), "caption_image": result.caption_image.tolist(),
               "caption_indices": result.caption_indices.tolist()}
    payload = {
        "n": result.n_images, "n_captions": result.n_captions, "metrics": result.metrics,
        "threat_models": result.threat_models, **queries,
    }
    outcomes = {**queries,
                "correct": {f"{a}.{k}": v.int().tolist() for a, per in result.outcomes.items() for k, v in per.items()}}
    return payload, outcomes, {}


TASKS = {"classification": _classification, "retrieval": _retrieval}


def evaluate(
    name: str = typer.Option(..., help="Model name used in metric keys (e.g. mmcoa)."),
    model: str = typer.Option(None, help="Model folder or reference (default: evaluate.models[NAME] or models/NAME)."),
    data: Path = typer.Option(..., help="Evaluation subset folder (from `mmcoa fetch-eval`)."),
    out: Path = typer.Option(None, help="Output folder (default: evals/NAME/DATASET)."),
    params: Path = PARAMS_OPTION,
    set_: list[str] = SET_OPTION,
) -> None:
    """Evaluate one model on one dataset under the attack suite of evaluate.* params."""
    run_evaluation(name, model, data, out or Path("evals") / name / data.name, params, set_)


def baseline(
    model: str = typer.Option("models/base", help="The base model folder."),
    data: Path = typer.Option(..., help="Evaluation subset folder (from `mmcoa fetch-eval`)."),
    out: Path = typer.Option(None, help="Output folder (default: evals/base/DATASET)."),
    params: Path = PARAMS_OPTION,
    set_: list[str] = SET_OPTION,
) -> None:
    """Evaluate the base model (before any defense) on one dataset."""
    run_evaluation("base", model, data, out or Path("evals") / "base" / data.name, params, set_)
