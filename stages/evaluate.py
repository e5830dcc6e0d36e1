"""`mmcoa evaluate` / `mmcoa baseline`: models on datasets, clean and under the params' attacks.

With ``--name`` (as the pipeline calls it): one model on one dataset, writing OUT/result.json (metrics,
threat models, families, examples' text, each attack's cost, the model's training ledger), OUT/outcomes.json (per-sample outcomes of every attack, for
worst cases, intervals and paired tests) and OUT/examples.safetensors. Without: any model references
(repeatable ``--model``) on any datasets (repeatable ``--data``), one table of the suite (or of the
``--attack`` entries given) with 95% intervals, written as OUT/suite.json and OUT/suite.md.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
import typer
import yaml
from rich.markup import escape
from rich.table import Table
from safetensors.torch import save_file

from mmcoa import distributed as dist
from mmcoa.attacks import AttackError, create_attack
from mmcoa.config import AttackSpec, Params
from mmcoa.data import DataError, make_loader
from mmcoa.data.evalset import EvalDraw, cached_eval_subset, is_prepared, resolve_reference
from mmcoa.data.subset import open_subset, read_manifest
from mmcoa.evaluate import (
    evaluate_classification,
    gradient_masking_flags,
    image_features,
    linear_probe_accuracy,
    suite_from_specs,
)
from mmcoa.ledger import merge_measured, split_measured
from mmcoa.models import ClipModel, ModelLoadError, create_model, list_architectures, parse_model_ref
from mmcoa.stats import accuracy_interval
from mmcoa.zeroshot import select_templates
from stages.common import (
    PARAMS_OPTION, SET_OPTION, StageError, atomic_dir, eval_cache_root, load, loader_options, log, progress,
    read_timing, runtime_record, setup_runtime, table_console, timing_file, write_json,
)


# --- what a user names on the command line ------------------------------------------------------


def model_reference(text: str) -> tuple[str, str | None]:
    """(arch, pretrained) of a model typed on the command line: ``ARCH:TAG`` or ``ARCH:FILE`` (an open_clip
    architecture with a pretrained tag or a weights file), else the reference as it is (``hf-hub:ORG/NAME``,
    a folder saved by mmcoa, ``local-dir:PATH``)."""
    arch, sep, pretrained = text.partition(":")
    if sep and pretrained and arch in list_architectures():
        return arch, pretrained
    return text, None


def open_model(text: str, device) -> ClipModel:
    """The model a command-line reference names; an architecture without weights is refused (its
    accuracy would be chance's), as is a reference that cannot be loaded (:class:`ModelLoadError`)."""
    import open_clip

    arch, pretrained = model_reference(text)
    ref = parse_model_ref(arch, pretrained)
    if not ref.has_weights:
        tags = open_clip.list_pretrained_tags_by_model(ref.identifier)
        raise StageError(f"{text}: an architecture without weights; give a pretrained tag ({ref.identifier}:TAG; "
                         f"tags: {', '.join(tags) or 'none'}) or a weights file ({ref.identifier}:PATH)")
    return create_model(ref, device=device)


def eval_subset(text: str, p: Params) -> Path:
    """The prepared subset folder of ``text``: a folder prepared by `mmcoa fetch-eval` as it is; any other
    dataset reference prepared on first use into the evaluation cache and reused afterwards."""
    if is_prepared(text):
        return Path(text).expanduser()
    try:
        reference, name = resolve_reference(text, p.evaluate.sources)
        folder, reused = cached_eval_subset(reference, name, eval_cache_root(), EvalDraw.from_params(p))
        meta = read_manifest(folder)
        sha = meta.get("sha256") or meta.get("content_sha256", "")
    except DataError as err:
        raise StageError(str(err)) from None
    log(f"{'reusing' if reused else 'prepared'} {text} -> {folder} (content sha256 {sha[:12]})")
    return folder


def _open_model(name: str, model: str | None, p: Params, device) -> ClipModel:
    """A model folder of the pipeline, any model reference, or a model named in evaluate.models."""
    try:
        if model is None and name in p.evaluate.models:
            spec = p.evaluate.models[name]
            return create_model(spec.arch, spec.pretrained, device=device)
        if model is None:
            return create_model(str(Path("models") / name), None, device=device)
        return open_model(model, device)
    except ModelLoadError as err:
        raise StageError(str(err)) from None


def _batches(dataset, model: ClipModel, p: Params) -> Callable:
    """A loader factory at the resolution the params name (native, or the model's input size)."""
    kwargs = loader_options(model, p)
    return lambda chunks: make_loader(dataset, chunks, **kwargs)


def _finetune_record(model_dir: Path | None) -> dict | None:
    """The finetune.json of a model fine-tuned by the pipeline (None for others: the base, external models)."""
    info = model_dir / "finetune.json" if model_dir is not None else None
    return json.loads(info.read_text()) if info is not None and info.is_file() else None


def _trained_on(f: dict | None) -> dict | None:
    """The fine-tuning threat models of a model trained by the pipeline (None for others)."""
    if f is None:
        return None
    against = f.get("trained_against", [])
    return {"method": f.get("method"), "dataset": f.get("dataset"),
            "image": f.get("image_attack") if "image" in against else None,
            "text": f.get("text_attack") if "text" in against else None}


def evaluate_pair(name: str, model: ClipModel, data: Path, p: Params) -> tuple[dict, dict, dict, dict]:
    """(payload, outcomes, example images, manifest) of one model on one prepared subset."""
    try:
        meta = read_manifest(data)
    except DataError as err:
        raise StageError(str(err)) from None
    task = meta.get("task", "classification")
    if task not in TASKS:
        raise StageError(f"{data}: unknown task '{task}'; known: {', '.join(TASKS)}")
    try:
        dataset, indices = open_subset(data, p.data.root, p.data.download, p.data.on_corrupt)
        payload, outcomes, images = TASKS[task](name, model, dataset, indices, p)
    except (AttackError, ValueError) as err:
        raise StageError(f"evaluate {name} on {meta.get('dataset')}: {err}") from None
    payload.update({"model": name, "dataset": dataset.name, "task": task})
    return payload, outcomes, images, meta


def run_evaluation(name: str, model_ref: str | None, data: Path, out: Path, p: Params) -> None:
    """One model on one prepared subset, written as the pipeline's result folder."""
    try:
        read_manifest(data)
    except DataError as err:
        raise StageError(str(err)) from None
    device = setup_runtime(p)
    model = _open_model(name, model_ref, p, device)
    payload, outcomes, images, meta = evaluate_pair(name, model, data, p)
    if not dist.is_main():
        return
    model_dir = Path(model_ref) if model_ref and Path(model_ref).is_dir() else Path("models") / name
    record = _finetune_record(model_dir if model_dir.is_dir() else None)
    payload.update({
        "role": "finetune" if p.data.dataset in (payload["dataset"], meta.get("source")) else "held_out",
        "trained_on": _trained_on(record),
        # What training cost (mmcoa.ledger), so the report needs no input beyond the evaluations.
        "training_ledger": (record or {}).get("ledger"),
        "runtime": runtime_record(device),
    })
    # Counted cost in the result; measured seconds beside it (timing_file), with the training run's.
    payload["cost"], cost_seconds = split_measured(payload.get("cost") or {})
    payload["training_ledger"], training_seconds = split_measured(payload["training_ledger"])
    if record is not None:
        training_seconds = merge_measured(training_seconds or {}, read_timing(model_dir).get("ledger") or {})
    with atomic_dir(out) as tmp:
        write_json(tmp / "result.json", payload)
        write_json(tmp / "outcomes.json", outcomes)
        if images:
            save_file(images, str(tmp / "examples.safetensors"))
    write_json(timing_file(out), {"cost": cost_seconds, "training_ledger": training_seconds})
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
        "cost": result.cost,
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
        t = bar.add_task(f"{name} on {dataset.name} (retrieval)", total=None)
        result = evaluate_retrieval(model, dataset, suite, len(dataset), e.batch_size, p.seed, size=opts["size"],
                                    interpolation=opts["interpolation"], resize_mode=opts["resize_mode"],
                                    on_progress=lambda run, done, total: bar.update(t, completed=done, total=total))
    queries = {"image_indices": result.image_indices.tolist(), "caption_image": result.caption_image.tolist(),
               "caption_indices": result.caption_indices.tolist()}
    payload = {
        "n": result.n_images, "n_captions": result.n_captions, "metrics": result.metrics,
        "threat_models": result.threat_models, **queries, "cost": result.cost,
    }
    outcomes = {**queries,
                "correct": {f"{a}.{k}": v.int().tolist() for a, per in result.outcomes.items() for k, v in per.items()}}
    return payload, outcomes, {}


TASKS = {"classification": _classification, "retrieval": _retrieval}


# --- a suite of models on datasets, as one table --------------------------------------------------


def attack_specs(entries: list[str]) -> list[AttackSpec]:
    """Suite entries typed on the command line: ``ATTACK``, ``ATTACK:key=value,key=value`` or
    ``LABEL=ATTACK:...`` (values read as YAML), each checked by the attack registry."""
    specs = []
    for text in entries:
        label, sep, rest = text.partition("=")
        if not sep or ":" in label:
            label, rest = "", text
        attack, _, args = rest.partition(":")
        params = {}
        for item in filter(None, (a.strip() for a in args.split(","))):
            key, eq, value = item.partition("=")
            if not eq:
                raise StageError(f"--attack {text}: '{item}' must look like key=value (e.g. pgd:eps_255=4,steps=10)")
            params[key.strip()] = yaml.safe_load(value)
        try:
            create_attack(attack, **params)
            specs.append(AttackSpec(name=label or attack, attack=attack, params=params))
        except (AttackError, ValueError) as err:
            raise StageError(f"--attack {text}: {str(err).splitlines()[0]}; `mmcoa attack --list` lists attacks and parameters") from None
    names = [s.name for s in specs]
    if len(set(names)) < len(names):
        raise StageError(f"--attack: entries named twice {names}; label them: LABEL=ATTACK:key=value")
    return specs


def _with_attacks(p: Params, specs: list[AttackSpec]) -> Params:
    """The params with the command line's entries as both suites (classification and retrieval)."""
    evaluate = p.evaluate.model_copy(update={"suite": specs, "retrieval_suite": specs, "sweep": None})
    return p.model_copy(update={"evaluate": evaluate})


def suite_rows(model: str, payload: dict) -> list[dict]:
    """One row per (entry, metric) of an evaluation, with its 95% Wilson interval over the samples
    (images for image-to-text recall, captions for text-to-image recall)."""
    rows = []
    for key, value in payload["metrics"].items():
        _, entry, metric = key.split(".", 2)
        if entry.startswith("sweep_"):
            continue
        n = payload.get("n_captions", payload["n"]) if metric.startswith("t2i") else payload["n"]
        low, high = accuracy_interval(value, n)
        rows.append({"model": model, "dataset": payload["dataset"], "task": payload["task"], "entry": entry,
                     "metric": metric, "value": value, "low": round(low, 6), "high": round(high, 6), "n": n})
    return rows


def _pivot(rows: list[dict]) -> tuple[list[str], list[tuple[tuple[str, str, str, int], dict[str, str]]]]:
    """(entry columns, rows keyed by model, dataset, metric, n) with ``value [low, high]`` cells in %."""
    entries = list(dict.fromkeys(r["entry"] for r in rows))
    table: dict[tuple, dict[str, str]] = {}
    for r in rows:
        cell = f"{100 * r['value']:.1f} [{100 * r['low']:.1f}, {100 * r['high']:.1f}]"
        table.setdefault((r["model"], r["dataset"], r["metric"], r["n"]), {})[r["entry"]] = cell
    return entries, list(table.items())


def suite_markdown(rows: list[dict]) -> str:
    entries, table = _pivot(rows)
    head = ["model", "dataset", "metric", "n", *entries]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (model, dataset, metric, n), cells in table:
        lines.append("| " + " | ".join([model, dataset, metric, str(n), *(cells.get(e, "-") for e in entries)]) + " |")
    return "\n".join(lines) + "\n\nValues in %, with 95% Wilson intervals over the samples.\n"


def print_suite(rows: list[dict]) -> None:
    entries, table = _pivot(rows)
    out = Table(title="evaluation (%, 95% interval)")
    for column in ("model", "dataset", "metric", "n", *entries):
        out.add_column(column, overflow="fold", justify="right" if column in ("n", *entries) else "left")
    for (model, dataset, metric, n), cells in table:
        out.add_row(escape(model), escape(dataset), metric, str(n), *(cells.get(e, "-") for e in entries))
    table_console().print(out)


def run_suite(models: list[str], datasets: list[str], out: Path | None, p: Params) -> None:
    """Every model on every dataset; one table printed, and written to OUT/suite.{json,md}."""
    for text in datasets:  # every name checked before any model loads or any subset is prepared
        if not is_prepared(text):
            try:
                resolve_reference(text, p.evaluate.sources)
            except DataError as err:
                raise StageError(str(err)) from None
    device = setup_runtime(p)
    rows, data, folders = [], [], {}
    for ref in models:
        try:
            model = open_model(ref, device)
        except ModelLoadError as err:
            raise StageError(str(err)) from None
        for text in datasets:  # prepared (or found in the cache) once a model has loaded
            folder = folders[text] = folders.get(text) or eval_subset(text, p)
            payload, _, _, meta = evaluate_pair(ref, model, folder, p)
            rows += suite_rows(ref, payload)
            data.append({"dataset": payload["dataset"], "folder": str(folder), "source": meta.get("source"),
                         "sha256": meta.get("sha256") or meta.get("content_sha256")})
    if not dist.is_main():
        return
    print_suite(rows)
    if out is not None:
        datasets_used = list({d["folder"]: d for d in data}.values())
        with atomic_dir(out) as tmp:
            write_json(tmp / "suite.json", {"rows": rows, "models": models, "datasets": datasets_used,
                                            "runtime": runtime_record(device)})
            (tmp / "suite.md").write_text(suite_markdown(rows))
        log(f"evaluate: {len(models)} model(s) x {len(folders)} dataset(s) -> {out}/suite.json, suite.md")


def evaluate(
    name: str = typer.Option(None, help="Pipeline mode: the one model's name in metric keys (e.g. mmcoa); writes "
                             "OUT/result.json and outcomes.json (default OUT: evals/NAME/DATASET)."),
    model: list[str] = typer.Option(None, "--model", help="A model (repeatable): ARCH:TAG (ViT-B-32:openai), ARCH:FILE "
                                    "(a weights file), hf-hub:ORG/NAME, or a folder saved by mmcoa. Pipeline mode "
                                    "default: evaluate.models[NAME] or models/NAME."),
    data: list[str] = typer.Option(None, "--data", help="A dataset (repeatable): a registered name, folder:PATH, csv:PATH, "
                                   "retrieval-json:PATH, retrieval-csv:PATH, a key of evaluate.sources, a declaration "
                                   "(.yaml), or a folder from `mmcoa fetch-eval` (default: evaluate.datasets)."),
    attack: list[str] = typer.Option(None, "--attack", help="An entry instead of evaluate.suite (repeatable): ATTACK, "
                                     "ATTACK:key=value,... or LABEL=ATTACK:...; see `mmcoa attack --list`."),
    n_samples: int = typer.Option(None, help="Classification samples per dataset (default: evaluate.n_samples)."),
    out: Path = typer.Option(None, help="Output folder (pipeline mode: the result folder; else suite.json, suite.md)."),
    params: Path = PARAMS_OPTION,
    set_: list[str] = SET_OPTION,
) -> None:
    """Evaluate models on datasets under the attack suite of evaluate.* params (or --attack entries)."""
    overrides = [*(set_ or []), *([f"evaluate.n_samples={n_samples}"] if n_samples else [])]
    p = load(params, overrides, defaults_outside_project=True)
    if attack:
        p = _with_attacks(p, attack_specs(attack))
    if name is not None:
        if len(model or []) > 1 or len(data or []) != 1:
            raise StageError("--name evaluates one model on one dataset: give at most one --model and exactly one --data")
        folder = eval_subset(data[0], p)
        run_evaluation(name, model[0] if model else None, folder, out or Path("evals") / name / Path(data[0]).name, p)
        return
    if not model:
        raise StageError("--model is required (e.g. --model hf-hub:ORG/NAME, or --name NAME for a model of the pipeline)")
    run_suite(list(model), list(data or p.evaluate.datasets), out, p)


def baseline(
    model: str = typer.Option("models/base", help="The base model folder."),
    data: Path = typer.Option(..., help="Evaluation subset folder (from `mmcoa fetch-eval`)."),
    out: Path = typer.Option(None, help="Output folder (default: evals/base/DATASET)."),
    params: Path = PARAMS_OPTION,
    set_: list[str] = SET_OPTION,
) -> None:
    """Evaluate the base model (before any defense) on one dataset."""
    p = load(params, set_)
    run_evaluation("base", model, eval_subset(str(data), p), out or Path("evals") / "base" / data.name, p)
