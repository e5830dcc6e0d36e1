"""Run one small training in its own process (for the SIGKILL-resume and torchrun DDP tests).

Usage: ``python tests/train_worker.py '<json spec>'`` (or under ``torch.distributed.run``). The spec
names the prepared data folder, the defense and the training settings; rank 0 writes the final
weights to ``spec["out"]`` (safetensors). ``step_sleep`` pauses after each step so a test can kill
the run between checkpoints.
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from mmcoa import distributed as dist  # noqa: E402
from mmcoa.config import TrainAttackSpec  # noqa: E402
from mmcoa.data import load_prepared  # noqa: E402
from mmcoa.defenses import DefenseContext, create_defense  # noqa: E402
from mmcoa.models import create_model  # noqa: E402
from mmcoa.train import TrainConfig, train  # noqa: E402


def build(spec: dict):
    """The model, defense, data and config a spec describes (identical in every process)."""
    data = load_prepared(spec["data_dir"], "train")
    torch.manual_seed(spec.get("init_seed", 0))
    model = create_model(spec.get("arch", "mmcoa-test-micro"))
    ctx = DefenseContext(
        data.classnames,
        data.templates[0],
        image_attack=TrainAttackSpec(attack="pgd", params={"eps_255": 1, "step_255": 1, "steps": spec.get("pgd_steps", 2),
                                                           "random_start": spec.get("random_start", True)}),
        text_attack=TrainAttackSpec(attack="word", params={"word_budget": spec.get("word_budget", 0)}),
    )
    defense = create_defense(spec.get("method", "mmcoa"), model, ctx)
    cfg = TrainConfig(
        steps=spec["steps"], batch_size=spec["batch_size"], lr=spec.get("lr", 1e-4), optimizer=spec.get("optimizer", "adam"),
        weight_decay=spec.get("weight_decay", 0.2), checkpoint_every=spec.get("checkpoint_every", 1), seed=spec.get("seed", 0),
    )
    return model, defense, data, cfg


def main(spec: dict) -> None:
    torch.set_num_threads(spec.get("threads", 1))
    dist.init_from_env(torch.device("cpu"))
    model, defense, data, cfg = build(spec)
    sleep = spec.get("step_sleep", 0.0)
    train(model, defense, data, cfg, checkpoint_dir=spec.get("checkpoint_dir"), run_hash=spec.get("run_hash", "test"),
          on_step=(lambda step, logs: time.sleep(sleep)) if sleep else None)
    if dist.is_main() and spec.get("out"):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.clip.state_dict().items()}, spec["out"])
    if dist.is_distributed():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
