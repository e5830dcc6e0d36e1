"""`mmcoa finetune`: adversarially fine-tune the base model with one defense (MMCoA, TeCoA, ...)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import typer

from mmcoa import distributed as dist
from mmcoa.data import DataError
from mmcoa.data.subset import open_subset, subset_batches
from mmcoa.defenses import DefenseContext, create_defense, resolve
from mmcoa.defenses.overfit import CatastrophicOverfitting, OverfitGuard
from mmcoa.ledger import ComputeLedger, flat_metrics, split_measured
from mmcoa.models import frozen_copy, load_model, save_model
from mmcoa.train import CheckpointMismatch, CheckpointUnreadable, TrainConfig, TrainingDiverged, params_hash, train
from stages.common import PARAMS_OPTION, loader_options, SET_OPTION, StageError, atomic_dir, load, log, progress, setup_runtime, timing_file, write_json


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def finetune(
    method: str = typer.Option(..., help="Defense or variant to train (see `mmcoa defenses`, finetune.variants)."),
    base: Path = typer.Option(Path("models/base"), help="Model to start from (from `mmcoa base`)."),
    data: Path = typer.Option(Path("data/prepared"), help="Prepared dataset folder."),
    out: Path = typer.Option(None, help="Output model folder (default: models/METHOD)."),
    metrics: Path = typer.Option(None, help="Also write the run's compute ledger here as flat metrics (JSON)."),
    checkpoint_dir: Path = typer.Option(
        None, help="Where periodic checkpoints go (default: checkpoints/METHOD-HASH); a rerun resumes from it."
    ),
    keep_checkpoint: bool = typer.Option(False, help="Keep the checkpoint folder after success."),
    params: Path = PARAMS_OPTION,
    set_: list[str] = SET_OPTION,
) -> None:
    """Fine-tune with METHOD (a defense, or a variant of finetune.variants) using finetune.* params."""
    p = load(params, set_)
    try:
        resolved = resolve(p.finetune, method)
    except ValueError as err:
        raise StageError(f"invalid params: {err}") from None
    f = resolved.recipe.params
    device = setup_runtime(p)
    out = out or Path("models") / method
    try:
        train_set, indices = open_subset(data, p.data.root, p.data.download, p.data.on_corrupt)
    except DataError as err:
        raise StageError(str(err)) from None
    model = load_model(base, device)
    ctx = DefenseContext(
        train_set.classnames, f.template or train_set.templates[0], f.image_attack, f.text_attack,
        f.logit_scale_max, f.same_class_targets, frozen_copy(model) if resolved.cls.needs_original else None,
        dict(f.options),
    )
    cfg = TrainConfig.from_params(f, p.seed)
    run_hash = params_hash(resolved.recipe.defense, f.model_dump(mode="json"), p.seed,
                           _file_hash(base / "open_clip_model.safetensors"))
    ckpt_dir = checkpoint_dir or Path("checkpoints") / f"{method}-{run_hash}"
    defense = create_defense(resolved.recipe.defense, model, ctx)
    batches = subset_batches(train_set, indices, **loader_options(model, p))
    ledger = ComputeLedger(device, model, ctx.original)
    monitors = [ledger]
    guard = None
    if OverfitGuard.wanted(defense, f.overfit_guard):
        probe = list(range(min(f.overfit_guard.probe_size, len(indices))))
        images, labels, _ = next(iter(batches([probe])))
        guard = OverfitGuard(defense, model, (images, labels), f.overfit_guard)
        monitors.append(guard)
    try:
        with progress() as bar:
            task = bar.add_task(f"finetune {method}", total=cfg.steps)
            history = train(model, defense, indices, cfg, ckpt_dir, run_hash,
                            on_step=lambda s, logs: bar.update(task, completed=s), batches=batches, monitors=monitors)
    except (CheckpointMismatch, CheckpointUnreadable, CatastrophicOverfitting) as err:
        raise StageError(str(err)) from None
    except TrainingDiverged as err:
        raise StageError(f"training diverged: {err}", code=1) from None
    finally:
        ledger.close()
    if dist.is_main():
        cost = ledger.summary(history, cfg.batch_size)
        # Counted cost goes with the model and into metrics; measured seconds and memory beside them, so
        # the model folder and metrics reproduce byte for byte.
        counted, measured = split_measured(cost)
        steps, step_times = split_measured(history)
        record = {
            "method": method, "defense": resolved.recipe.defense, "label": resolved.label, "dataset": p.data.dataset,
            "trains": list(resolved.cls.trains), "options": resolved.options.model_dump(),
            **defense.record(history), "overfit_guard": guard.record() if guard else {"enabled": False},
            "ledger": counted, "params": f.model_dump(mode="json", exclude={"methods", "variants", "overrides"}),
        }
        with atomic_dir(out) as tmp:
            save_model(model, tmp)
            write_json(tmp / "history.json", [{k: round(v, 6) for k, v in h.items()} for h in steps])
            write_json(tmp / "finetune.json", record)
        if metrics is not None:
            metrics.parent.mkdir(parents=True, exist_ok=True)
            write_json(metrics, flat_metrics(f"finetune.{method}", counted))
        write_json(timing_file(out), {"ledger": measured, "history": step_times})
        if not keep_checkpoint:
            shutil.rmtree(ckpt_dir, ignore_errors=True)
        last = history[-1] if history else {}
        log(f"finetune: {method} {cfg.steps} steps (loss {last.get('loss', float('nan')):.4f}, "
            f"{cost['wall_s']:.0f} s, {cost['bwd_image']:.0f} image backward passes) -> {out}")
