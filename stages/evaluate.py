"""`mmcoa evaluate` / `mmcoa baseline`: zero-shot accuracy, clean and under the params' attack suite."""

from __future__ import annotations

from pathlib import Path

import typer
from safetensors.torch import save_file

from mmcoa.attacks import AttackError
from mmcoa.data import load_prepared
from mmcoa.evaluate import evaluate_suite, gradient_masking_flags, suite_from_specs
from mmcoa.models import load_model
from stages.common import PARAMS_OPTION, SET_OPTION, StageError, atomic_dir, load, log, progress, setup_runtime, write_json


def run_evaluation(name: str, model_dir: Path, data: Path, out: Path, params: Path, set_: list[str]) -> None:
    p = load(params, set_)
    e = p.evaluate
    try:
        suite = suite_from_specs([s.model_dump() for s in e.suite])
        sweep = (e.sweep.attack, e.sweep.params, list(e.sweep_eps_255)) if e.sweep and e.sweep_eps_255 else None
    except (AttackError, ValueError) as err:
        raise StageError(f"invalid params: evaluate.suite: {err}") from None
    device = setup_runtime(p)
    test_set = load_prepared(data, "test")
    probe_train = load_prepared(data, "train") if e.linear_probe else None
    model = load_model(model_dir, device)
    template = (p.zeroshot.templates or [None])[0]
    with progress() as bar:
        tasks: dict[str, int] = {}

        def on_progress(attack: str, done: int, total: int) -> None:
            if attack not in tasks:
                tasks[attack] = bar.add_task(f"{name}: {attack}", total=total)
            bar.update(tasks[attack], completed=done)

        result = evaluate_suite(model, test_set, suite, template, e.n_samples, e.batch_size, p.seed, sweep,
                                e.n_examples, on_progress, probe_train)
    from mmcoa import distributed as dist

    if not dist.is_main():
        return
    flags = gradient_masking_flags(result.sweep, len(test_set.classnames), result.n) if result.sweep else []
    text_examples = {k: {kk: vv for kk, vv in v.items() if kk != "images"} for k, v in result.examples.items()}
    with atomic_dir(out) as tmp:
        write_json(tmp / "result.json", {
            "model": name, "dataset": test_set.name, "n": result.n, "metrics": result.metrics,
            "threat_models": result.threat_models, "sweep": result.sweep, "gradient_masking_flags": flags,
            "examples": text_examples, "classnames": test_set.classnames,
            "template": template or test_set.templates[0],
        })
        images = {k: v["images"].contiguous() for k, v in result.examples.items() if "images" in v}
        if images:
            save_file(images, str(tmp / "examples.safetensors"))
    summary = ", ".join(f"{k.split('.')[-2]} {v:.3f}" for k, v in result.metrics.items() if ".sweep_" not in k)
    log(f"evaluate: {name} on {result.n} samples: {summary}")
    for flag in flags:
        log(f"[yellow]warning[/]: {name}: possible gradient masking: {flag}")


def evaluate(
    name: str = typer.Option(..., help="Model name used in metric keys (e.g. mmcoa)."),
    model: Path = typer.Option(None, help="Model folder (default: models/NAME)."),
    data: Path = typer.Option(Path("data/prepared"), help="Prepared dataset folder."),
    out: Path = typer.Option(None, help="Output folder (default: evals/NAME)."),
    params: Path = PARAMS_OPTION,
    set_: list[str] = SET_OPTION,
) -> None:
    """Evaluate a saved model under the attack suite of evaluate.* params."""
    run_evaluation(name, model or Path("models") / name, data, out or Path("evals") / name, params, set_)


def baseline(
    model: Path = typer.Option(Path("models/base"), help="The base model folder."),
    data: Path = typer.Option(Path("data/prepared"), help="Prepared dataset folder."),
    out: Path = typer.Option(Path("evals/base"), help="Output folder."),
    params: Path = PARAMS_OPTION,
    set_: list[str] = SET_OPTION,
) -> None:
    """Evaluate the base model (before any defense) under the attack suite."""
    run_evaluation("base", model, data, out, params, set_)
