"""`mmcoa base`: the model under test. Load ``base.model`` as it is, or pre-train it when asked."""

from __future__ import annotations

from pathlib import Path

import typer

from mmcoa.config import Params
from mmcoa.data import DataError
from mmcoa.data.mixture import pretraining_mixture
from mmcoa.data.subset import subset_batches
from mmcoa.defenses import DefenseContext, create_defense
from mmcoa.models import ClipModel, create_model, parse_model_ref, save_model
from mmcoa.train import TrainConfig, train
from stages.common import loader_options, PARAMS_OPTION, SET_OPTION, StageError, atomic_dir, load, log, progress, setup_runtime, write_json


def base(
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
    history = pretrain(model, p) if p.base.pretrain is not None else []
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


def pretrain(model: ClipModel, p: Params) -> list[dict]:
    """Contrastive pre-training from scratch on the ``base.pretrain`` mixture, in place.

    Each dataset of the mixture gives its captions (class prompts, or a retrieval set's own captions);
    images are brought to the model's input size so that the datasets stack. Returns one log dict per step.
    """
    pre = p.base.pretrain
    try:
        mixture = pretraining_mixture(pre.datasets, p.seed, p.data.root, p.data.download)
    except DataError as err:
        raise StageError(str(err)) from None
    ctx = DefenseContext([], same_class_targets=pre.same_class_targets, caption_groups=mixture.groups)
    cfg = TrainConfig(
        steps=pre.steps, batch_size=pre.batch_size, lr=pre.lr, optimizer="adamw", weight_decay=pre.weight_decay,
        schedule="cosine", warmup_steps=pre.warmup_steps, seed=p.seed, checkpoint_every=10**9,
    )
    options = {**loader_options(model, p), "size": model.image_size[0]}
    with progress() as bar:
        task = bar.add_task("pre-train", total=cfg.steps)
        history = train(model, create_defense("clean", model, ctx), mixture, cfg,
                        on_step=lambda s, logs: bar.update(task, completed=s),
                        batches=subset_batches(mixture, list(range(len(mixture))), **options))
    for prm in model.parameters():
        prm.requires_grad_(True)
    return history
