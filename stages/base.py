"""`mmcoa base`: the model under test. Load ``base.model`` as it is, or pre-train it when asked."""

from __future__ import annotations

from pathlib import Path

import typer

from mmcoa.config import Params
from mmcoa.data import load_prepared
from mmcoa.defenses import DefenseContext, create_defense
from mmcoa.models import ClipModel, create_model, parse_model_ref, save_model
from mmcoa.train import TrainConfig, train
from stages.common import PARAMS_OPTION, SET_OPTION, StageError, atomic_dir, load, log, progress, setup_runtime, write_json


def base(
    data: Path = typer.Option(Path("data/prepared"), help="Prepared dataset folder (from `mmcoa fetch`), for pre-training."),
    out: Path = typer.Option(Path("models/base"), help="Folder for the model (open_clip local-dir format)."),
    params: Path = PARAMS_OPTION,
    set_: list[str] = SET_OPTION,
) -> None:
    """Build the base model: base.model is loaded as it is and saved; base.pretrain set -> pre-train it first.

    Pre-training needs an architecture without weights: a reference that carries trained weights
    (pretrained tag, weights file, hf-hub name, saved folder) is never trained here.
    """
    p = load(params, set_)
    device = setup_runtime(p)
    ref = parse_model_ref(p.base.model.arch, p.base.model.pretrained)  # ModelLoadError: one line, exit 2
    if p.base.pretrain is not None and ref.has_weights:
        raise StageError(
            f"base.pretrain is set, but base.model ({ref}) carries trained weights, which the base stage loads "
            "as they are: remove base.pretrain, or give base.model an architecture without weights to pre-train"
        )
    model = create_model(ref, device=device)
    history = pretrain(model, p, data) if p.base.pretrain is not None else []
    with atomic_dir(out) as tmp:
        save_model(model, tmp)
        write_json(tmp / "history.json", [{k: round(v, 6) for k, v in h.items()} for h in history])
    if p.base.pretrain is not None:
        how = f"pre-trained {len(history)} steps"
    elif ref.has_weights:
        how = "loaded as it is"
    else:
        how = "randomly initialised: no weights and no base.pretrain"
    log(f"base: {ref} ({how}) -> {out}")


def pretrain(model: ClipModel, p: Params, data_dir: Path) -> list[dict]:
    """Contrastive pre-training from scratch with ``base.pretrain`` (the clean defense's loss), in place.

    Returns one log dict per step.
    """
    pre = p.base.pretrain
    train_set = load_prepared(data_dir, "train")
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
    return history
