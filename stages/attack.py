"""`mmcoa attack`: one named attack on any model and any classification dataset, outside DVC."""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Callable

import torch
import typer
import yaml
from pydantic_core import PydanticUndefined
from rich.markup import escape
from rich.table import Table

from mmcoa.attacks import AttackError, attack_class, create_attack, list_attacks
from mmcoa.data import make_loader
from mmcoa.data.evalset import is_prepared
from mmcoa.data.subset import open_subset, read_manifest
from mmcoa.evaluate import SuiteEntry, evaluate_classification, sample_indices
from mmcoa.models import ModelLoadError
from mmcoa.zeroshot import select_templates
from stages.common import (
    PARAMS_OPTION, SET_OPTION, StageError, load, loader_options, progress, runtime_record, setup_runtime, table_console,
    write_json,
)
from stages.evaluate import eval_subset, open_model


def _choices(annotation) -> list | None:
    """The values a Literal field (or an optional one) takes, else None."""
    if typing.get_origin(annotation) is typing.Literal:
        return list(typing.get_args(annotation))
    for arg in typing.get_args(annotation):
        found = _choices(arg)
        if found:
            return found
    return None


def _registry_choices() -> dict[str, Callable[[], list[str]]]:
    """Parameters whose values a registry checks (not a Literal): the registry lists them."""
    from mmcoa.attacks.candidates import list_sources

    return {"candidates": list_sources}


def describe_field(key: str, info) -> str:
    """``key=default`` (or ``key=required``), with the values a choice takes: ``candidates=glove (glove|wordnet|mlm)``."""
    default = info.default_factory() if info.default_factory is not None else info.default
    if info.is_required() or default is PydanticUndefined:
        text = f"{key}=required"
    elif hasattr(default, "model_dump"):
        text = f"{key}={default.model_dump()}"
    else:
        text = f"{key}={default!r}"
    choices = _choices(info.annotation) or (_registry_choices()[key]() if key in _registry_choices() else None)
    return text + (f" ({'|'.join(str(c) for c in choices)})" if choices else "")


def _describe(name: str) -> str:
    return ", ".join(describe_field(key, info) for key, info in attack_class(name).Params.model_fields.items())


def list_all() -> None:
    table = Table(title="Registered attacks")
    for col in ("name", "side", "parameters (defaults; choices)"):
        table.add_column(col, overflow="fold")
    for name in list_attacks():
        table.add_row(name, attack_class(name).kind, escape(_describe(name)))
    table_console().print(table)


def attack(
    attack_name: str = typer.Option(None, "--attack", help="Registered attack name (see --list)."),
    arg: list[str] = typer.Option(None, "--arg", "-a", help="Attack parameter: -a eps_255=4 (repeatable; YAML value)."),
    model: str = typer.Option(None, help="A model: ARCH:TAG (ViT-B-32:openai), ARCH:FILE (a weights file), "
                              "hf-hub:ORG/NAME, or a folder saved by mmcoa."),
    data: str = typer.Option(None, help="A classification dataset: a registered name, folder:PATH, csv:PATH, a key of "
                             "evaluate.sources, a declaration (.yaml), or a folder from `mmcoa fetch-eval` "
                             "(default: data/eval/DATA.DATASET if prepared, else data.dataset)."),
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
        raise StageError(f"{str(err).splitlines()[0]}; `mmcoa attack --list` lists attacks and parameters") from None
    p = load(params, set_, defaults_outside_project=True)
    device = setup_runtime(p)
    # The model first: a wrong --model is reported as such even when --data is wrong too. Both errors
    # (ModelLoadError, DataError) print one line and exit 2 (stages.cli.main).
    try:
        clip = open_model(model, device)
    except ModelLoadError as err:
        raise StageError(str(err)) from None
    prepared = Path("data/eval") / p.data.dataset
    folder = eval_subset(data or (str(prepared) if is_prepared(prepared) else p.data.dataset), p)
    if read_manifest(folder).get("task") == "retrieval":
        raise StageError(f"{data}: a retrieval set; `mmcoa attack` measures classification: use "
                         f"`mmcoa evaluate --model {model} --data {data} --attack {attack_name}`")
    test_set, indices = open_subset(folder, p.data.root, p.data.download, p.data.on_corrupt)
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
    table_console().print(table)
    if out is not None:
        write_json(out, {"clean_acc": clean, "robust_acc": robust, "n": result.n, "threat_model": atk.threat_model(),
                         "dataset": test_set.name, "data_sha256": read_manifest(folder).get("sha256"),
                         "runtime": runtime_record(device)})
