"""`mmcoa attack`: attack a saved model on a prepared dataset with one named attack, outside DVC."""

from __future__ import annotations

from pathlib import Path

import torch
import typer
import yaml
from rich.console import Console
from rich.table import Table

from mmcoa.attacks import AttackError, attack_class, create_attack, list_attacks
from mmcoa.data import make_loader
from mmcoa.data.subset import open_subset
from mmcoa.evaluate import SuiteEntry, evaluate_classification, sample_indices
from mmcoa.models import load_model
from mmcoa.zeroshot import select_templates
from stages.common import loader_options, PARAMS_OPTION, SET_OPTION, StageError, load, progress, runtime_record, setup_runtime, write_json


def _describe(name: str) -> str:
    cls = attack_class(name)
    fields = []
    for key, info in cls.Params.model_fields.items():
        default = info.default if info.default is not None or not info.is_required() else "required"
        fields.append(f"{key}={default!r}" if not hasattr(default, "model_dump") else f"{key}={default.model_dump()}")
    return ", ".join(fields)


def list_all() -> None:
    table = Table(title="Registered attacks")
    for col in ("name", "side", "parameters (defaults)"):
        table.add_column(col, overflow="fold")
    for name in list_attacks():
        table.add_row(name, attack_class(name).kind, _describe(name))
    Console().print(table)


def attack(
    attack_name: str = typer.Option(None, "--attack", help="Registered attack name (see --list)."),
    arg: list[str] = typer.Option(None, "--arg", "-a", help="Attack parameter: -a eps_255=4 (repeatable; YAML value)."),
    model: Path = typer.Option(None, help="Model folder (open_clip local-dir format)."),
    data: Path = typer.Option(None, help="Evaluation subset folder from `mmcoa fetch-eval` (default: data/eval/DATA.DATASET)."),
    n_samples: int = typer.Option(None, help="Samples (default: all of the subset, i.e. evaluate.n_samples)."),
    out: Path = typer.Option(None, help="Write the accuracies and threat model to this JSON file."),
    list_: bool = typer.Option(False, "--list", help="List registered attacks with their parameters and exit."),
    params: Path = PARAMS_OPTION,
    set_: list[str] = SET_OPTION,
) -> None:
    """Measure clean and robust zero-shot accuracy of MODEL under one attack."""
    if list_:
        list_all()
        return
    if attack_name is None or model is None:
        raise StageError("--attack and --model are required (or use --list)")
    kwargs = {}
    for item in arg or []:
        if "=" not in item:
            raise StageError(f"--arg '{item}' must look like key=value")
        key, value = item.split("=", 1)
        kwargs[key.strip()] = yaml.safe_load(value)
    try:
        atk = create_attack(attack_name, **kwargs)
    except (AttackError, ValueError) as err:
        raise StageError(str(err)) from None
    p = load(params, set_)
    device = setup_runtime(p)
    # The model first: a wrong --model is reported as such even when --data is wrong too. Both errors
    # (ModelLoadError, DataError) print one line and exit 2 (stages.cli.main).
    clip = load_model(model, device)
    data = data or Path("data/eval") / p.data.dataset
    test_set, indices = open_subset(data, p.data.root, p.data.download, p.data.on_corrupt)
    templates = select_templates(test_set, p.zeroshot.prompts, p.zeroshot.templates)
    idx = torch.as_tensor(indices, dtype=torch.long)
    if n_samples and n_samples < len(idx):  # a stratified subset of the subset
        keep = sample_indices(torch.as_tensor(test_set.targets)[idx], n_samples, p.seed)
        idx = idx[keep]
    entry = SuiteEntry(attack_name, atk, "attack")
    options = loader_options(clip, p)
    with progress() as bar:
        task = bar.add_task(attack_name, total=None)
        result = evaluate_classification(
            clip, lambda chunks: make_loader(test_set, chunks, **options), idx, list(test_set.classnames), templates,
            [entry], test_set.name, p.evaluate.batch_size, p.seed, None, 0,
            lambda d, t: bar.update(task, completed=d, total=t),
        )
    clean = result.metrics[f"{test_set.name}.clean.acc"]
    robust = result.metrics[f"{test_set.name}.{attack_name}.acc"]
    table = Table(title=f"{model} on {test_set.name} ({result.n} samples)")
    table.add_column("attack")
    table.add_column("accuracy", justify="right")
    table.add_column("threat model", overflow="fold")
    table.add_row("clean", f"{100 * clean:.2f}%", "-")
    table.add_row(attack_name, f"{100 * robust:.2f}%", repr(atk))
    Console().print(table)
    if out is not None:
        write_json(out, {"clean_acc": clean, "robust_acc": robust, "n": result.n, "threat_model": atk.threat_model(),
                         "runtime": runtime_record(device)})
