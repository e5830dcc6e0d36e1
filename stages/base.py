"""`mmcoa base`: the model under test. Train a small CLIP from scratch, or load a pretrained one."""

from __future__ import annotations

from pathlib import Path

import torch
import typer

from mmcoa.data import load_prepared
from mmcoa.defenses import DefenseContext, create_defense
from mmcoa.models import ModelLoadError, create_model, save_model
from mmcoa.train import TrainConfig, train
from stages.common import PARAMS_OPTION, SET_OPTION, StageError, atomic_dir, load, log, progress, setup_runtime, write_json


def base(
    data: Path = typer.Option(Path("data/prepared"), help="Prepared dataset folder (from `mmcoa fetch`)."),
    out: Path = typer.Option(Path("models/base"), help="Folder for the model (open_clip local-dir format)."),
    params: Path = PARAMS_OPTION,
    set_: list[str] = SET_OPTION,
) -> None:
    """Build the base model: base.model.pretrained set -> load it; unset -> contrastive pre-training."""
    p = load(params, set_)
    device = setup_runtime(p)
    spec = p.base.model
    try:
        model = create_model(spec.arch, spec.pretrained, device=device)
    except ModelLoadError as err:
        raise StageError(str(err)) from None
    history = []
    if spec.pretrained is None:
        train_set = load_prepared(data, "train")
        pre = p.base.pretrain
        template = p.base.template or train_set.templates[0]
        ctx = DefenseContext(train_set.classnames, template, same_class_targets=pre.same_class_targets)
        cfg = TrainConfig(
            steps=pre.steps, batch_size=pre.batch_size, lr=pre.lr, optimizer="adamw", weight_decay=pre.weight_decay,
            schedule="cosine", warmup_steps=pre.warmup_steps, seed=p.seed, checkpoint_every=10**9,
        )
        with progress() as bar:
            task = bar.add_task("pre-train", total=cfg.steps)
            history = train(model, create_defense("clean", model, ctx), train_set, cfg,
                            on_step=lambda s, logs: bar.update(task, completed=s))
        for prm in model.parameters():
            prm.requires_grad_(True)
    with atomic_dir(out) as tmp:
        save_model(model, tmp)
        write_json(tmp / "history.json", [{k: round(v, 6) for k, v in h.items()} for h in history])
    log(f"base: {spec.arch} ({'pretrained ' + spec.pretrained if spec.pretrained else f'trained {len(history)} steps'}) -> {out}")
