"""The training loop: checkpoints and resumption (also after SIGKILL), refusal of foreign
checkpoints, divergence handling, torchrun data parallelism, and the CUDA-only paths."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mmcoa.config import TrainAttackSpec
from mmcoa.defenses import DefenseContext, create_defense
from mmcoa.models import create_model
from mmcoa.train import (
    CHECKPOINT_NAME,
    PREVIOUS_NAME,
    CheckpointMismatch,
    CheckpointUnreadable,
    TrainConfig,
    TrainingDiverged,
    batch_indices,
    clean_state_dict,
    params_hash,
    train,
)

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("train_worker.py")
MICRO = "mmcoa-test-micro"

sys.path.insert(0, str(WORKER.parent))
from train_worker import build  # noqa: E402


def micro_mmcoa(train_set, **ctx_kw):
    torch.manual_seed(0)
    model = create_model(MICRO)
    ctx_kw.setdefault("image_attack", TrainAttackSpec(attack="pgd", params={"eps_255": 1, "step_255": 1, "steps": 1}))
    ctx_kw.setdefault("text_attack", None)
    ctx = DefenseContext(train_set.classnames, train_set.templates[0], **ctx_kw)
    return model, create_defense("mmcoa", model, ctx)


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.clip.state_dict().items()}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env() -> dict:
    # Idle OpenMP threads sleep: processes side by side on two cores (DDP ranks) do not starve each other.
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(ROOT), OMP_WAIT_POLICY="PASSIVE")
    env.pop("WORLD_SIZE", None)
    return env


def load_out(path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


# --- pieces -----------------------------------------------------------------------------------


def test_batch_indices_are_deterministic_and_walk_epochs():
    a = batch_indices(100, 32, 0, seed=0)
    assert torch.equal(a, batch_indices(100, 32, 0, seed=0)) and len(a) == 32
    epoch0 = torch.cat([batch_indices(100, 32, s, seed=0) for s in range(3)])
    assert len(set(epoch0.tolist())) == 96  # no repeats inside an epoch
    assert not torch.equal(batch_indices(100, 32, 3, seed=0), a)  # a new permutation next epoch
    assert not torch.equal(batch_indices(100, 32, 0, seed=1), a)


def test_params_hash_is_stable_and_sensitive():
    assert params_hash({"lr": 1e-5, "b": [1, 2]}) == params_hash({"b": [1, 2], "lr": 1e-5})
    assert params_hash({"lr": 1e-5}) != params_hash({"lr": 1e-4})


def test_clean_state_dict_strips_compile_prefix():
    sd = {"_orig_mod.visual.proj": torch.zeros(1), "visual._orig_mod.conv1.weight": torch.ones(1), "logit_scale": torch.ones(())}
    assert set(clean_state_dict(sd)) == {"visual.proj", "visual.conv1.weight", "logit_scale"}


def test_rejects_a_batch_larger_than_the_data(fmnist):
    train_set, _ = fmnist
    model, defense = micro_mmcoa(train_set)
    with pytest.raises(ValueError, match="larger than the training set"):
        train(model, defense, train_set, TrainConfig(steps=1, batch_size=len(train_set) + 2, lr=1e-4))


# --- checkpoints ------------------------------------------------------------------------------


def test_checkpoint_holds_the_whole_state_and_resume_is_a_no_op_when_done(fmnist, tmp_path):
    train_set, _ = fmnist
    model, defense = micro_mmcoa(train_set)
    cfg = TrainConfig(steps=2, batch_size=8, lr=1e-4, optimizer="adam", checkpoint_every=1)
    history = train(model, defense, train_set, cfg, checkpoint_dir=tmp_path, run_hash="h")
    assert [h["step"] for h in history] == [1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_NAME, PREVIOUS_NAME]  # no temporary file left
    state = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    assert {"model", "optimizer", "scheduler", "rng", "step", "run_hash", "history"} <= set(state)
    assert state["step"] == 2 and state["run_hash"] == "h" and len(state["optimizer"]["state"]) > 0
    assert not any("_orig_mod" in k for k in state["model"])
    assert max_diff(state["model"], weights(model)) == 0.0
    # a finished run resumes to the same weights and history without training
    model2, defense2 = micro_mmcoa(train_set)
    assert train(model2, defense2, train_set, cfg, checkpoint_dir=tmp_path, run_hash="h") == history
    assert max_diff(weights(model2), weights(model)) == 0.0


def test_checkpoint_of_other_params_is_refused(fmnist, tmp_path):
    train_set, _ = fmnist
    model, defense = micro_mmcoa(train_set)
    cfg = TrainConfig(steps=1, batch_size=8, lr=1e-4)
    train(model, defense, train_set, cfg, checkpoint_dir=tmp_path, run_hash=params_hash({"lr": 1e-4}))
    other = params_hash({"lr": 1e-3})
    with pytest.raises(CheckpointMismatch, match=rf"other params \(hash \w+ != {other}\).*delete it"):
        train(model, defense, train_set, cfg, checkpoint_dir=tmp_path, run_hash=other)


def test_sigkill_mid_training_then_rerun_equals_an_uninterrupted_run(fmnist_dir, tmp_path):
    """A run killed with SIGKILL after its first checkpoint and rerun ends with the weights of a run
    that never stopped (same seed): batches, attack noise, optimiser and schedule all resume."""
    spec = {"data_dir": str(fmnist_dir), "steps": 5, "batch_size": 8, "pgd_steps": 2, "random_start": True,
            "lr": 1e-3, "optimizer": "adamw", "checkpoint_every": 1, "run_hash": "kill", "threads": 2}
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(WORKER), json.dumps({**spec, "checkpoint_dir": str(killed), "step_sleep": 2.0})],
                            env=worker_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (killed / CHECKPOINT_NAME).exists():
        assert proc.poll() is None, f"worker exited early: {proc.stderr.read().decode()[-2000:]}"
        assert time.time() < deadline, "no checkpoint within 120 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    step = torch.load(killed / CHECKPOINT_NAME, weights_only=True)["step"]
    assert 1 <= step < spec["steps"], "the run was not killed mid-training"

    torch.set_num_threads(2)
    resumed, defense, data, cfg = build(spec)
    train(resumed, defense, data, cfg, checkpoint_dir=killed, run_hash="kill")
    straight, defense, data, cfg = build(spec)
    train(straight, defense, data, cfg, checkpoint_dir=tmp_path / "straight", run_hash="kill")
    assert max_diff(weights(resumed), weights(straight)) <= 1e-6
    torch.manual_seed(0)
    assert max_diff(weights(straight), weights(create_model(MICRO))) > 1e-4  # it did train


def test_truncated_last_checkpoint_resumes_from_the_previous_one(fmnist, tmp_path):
    """A last.pt cut short (a full disk, a broken copy) costs one checkpoint interval: the rerun resumes
    from previous.pt and ends with the weights of a run that never stopped; with both unreadable, one
    error names the file and the fix."""
    train_set, _ = fmnist
    cfg = TrainConfig(steps=3, batch_size=8, lr=1e-3, optimizer="adam", checkpoint_every=1)
    model, defense = micro_mmcoa(train_set)
    train(model, defense, train_set, dataclasses.replace(cfg, steps=2), checkpoint_dir=tmp_path, run_hash="h")
    last = tmp_path / CHECKPOINT_NAME
    last.write_bytes(last.read_bytes()[:1000])
    resumed, defense = micro_mmcoa(train_set)
    with pytest.warns(UserWarning, match=r"last\.pt is unreadable .*resuming from .*previous\.pt \(step 1\)"):
        history = train(resumed, defense, train_set, cfg, checkpoint_dir=tmp_path, run_hash="h")
    assert [h["step"] for h in history] == [1, 2, 3]
    straight, defense = micro_mmcoa(train_set)
    train(straight, defense, train_set, cfg, checkpoint_dir=tmp_path / "straight", run_hash="h")
    assert max_diff(weights(resumed), weights(straight)) <= 1e-6
    for path in (last, tmp_path / PREVIOUS_NAME):
        path.write_bytes(b"")
    model, defense = micro_mmcoa(train_set)
    with pytest.raises(CheckpointUnreadable, match=r"last\.pt is unreadable .*delete .* to train from the start"):
        train(model, defense, train_set, cfg, checkpoint_dir=tmp_path, run_hash="h")


# --- divergence -------------------------------------------------------------------------------


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(fmnist, tmp_path):
    """A logit scale blown up after step 3 (no clamp) makes the loss NaN at step 4; the checkpoint
    of step 2 stays on disk untouched."""
    train_set, _ = fmnist
    model, defense = micro_mmcoa(train_set, logit_scale_max=float("inf"))
    cfg = TrainConfig(steps=5, batch_size=8, lr=1e-4, checkpoint_every=2, logit_scale_max=float("inf"))
    good = {}

    def blow_up(step, logs):
        if step == 2:
            good.update(weights(model))
        if step == 3:
            with torch.no_grad():
                model.clip.logit_scale.fill_(1e4)  # exp(1e4) = inf

    with pytest.raises(TrainingDiverged, match=r"loss is nan.*at step 4.*last\.pt \(step 2\)"):
        train(model, defense, train_set, cfg, checkpoint_dir=tmp_path, run_hash="h", on_step=blow_up)
    state = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    assert state["step"] == 2
    assert max_diff(state["model"], good) == 0.0


def test_huge_learning_rate_diverges_without_writing_bad_weights(fmnist, tmp_path):
    train_set, _ = fmnist
    model, defense = micro_mmcoa(train_set)
    cfg = TrainConfig(steps=6, batch_size=8, lr=1e30, optimizer="sgd", checkpoint_every=1)
    with pytest.raises(TrainingDiverged, match="at step") as err:
        train(model, defense, train_set, cfg, checkpoint_dir=tmp_path, run_hash="h")
    assert "Last good checkpoint kept" in str(err.value)
    if (tmp_path / CHECKPOINT_NAME).exists():
        state = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
        assert all(torch.isfinite(v).all() for v in state["model"].values())


# --- data parallel ----------------------------------------------------------------------------


def test_torchrun_two_processes_equal_one_process(fmnist_dir, tmp_path):
    """2-process gloo MMCoA == 1 process on the same global batch. SGD, so a wrong gradient scale
    (e.g. a gather whose backward does not sum over ranks) would show; no PGD random start, so
    the attacks are deterministic."""
    from mmcoa.attacks import list_attacks

    spec = {"data_dir": str(fmnist_dir), "steps": 3, "batch_size": 16, "pgd_steps": 2, "random_start": False,
            "word_budget": 1 if "word" in list_attacks() else 0, "lr": 0.05, "optimizer": "sgd",
            "checkpoint_dir": None, "out": str(tmp_path / "ddp.safetensors")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(WORKER), json.dumps(spec)]
    ddp = subprocess.Popen(cmd, env=worker_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    single, defense, data, cfg = build(spec)  # meanwhile, the single-process run here
    train(single, defense, data, cfg)
    out, _ = ddp.communicate(timeout=300)
    assert ddp.returncode == 0, out.decode()[-3000:]
    two = load_out(spec["out"])
    assert max_diff(two, weights(single)) <= 1e-5
    torch.manual_seed(0)
    assert max_diff(two, weights(create_model(MICRO))) > 1e-2  # the weights moved far more than the tolerance


# --- CUDA-only paths --------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (bf16 autocast and torch.compile paths)")


@cuda
def test_cuda_bf16_autocast_keeps_losses_in_fp32(fmnist):
    train_set, _ = fmnist
    model, defense = micro_mmcoa(train_set)
    model.to("cuda")
    x = train_set.float_images(slice(0, 8)).cuda()
    y = train_set.labels[:8].cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = defense.loss(model, x, y)
    assert out.loss.dtype == torch.float32
    history = train(model, defense, train_set, TrainConfig(steps=2, batch_size=8, lr=1e-4, amp=True))
    assert all(math.isfinite(h["loss"]) for h in history)


@cuda
def test_cuda_compiled_training_saves_and_resumes_clean_keys(fmnist, tmp_path):
    train_set, _ = fmnist
    model, defense = micro_mmcoa(train_set)
    model.to("cuda")
    cfg = TrainConfig(steps=2, batch_size=8, lr=1e-4, compile=True, checkpoint_every=1)
    train(model, defense, train_set, cfg, checkpoint_dir=tmp_path, run_hash="c")
    state = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    assert not any("_orig_mod" in k for k in state["model"])
    fresh, defense2 = micro_mmcoa(train_set)
    fresh.to("cuda")
    train(fresh, defense2, train_set, TrainConfig(steps=3, batch_size=8, lr=1e-4, compile=True, checkpoint_every=1),
          checkpoint_dir=tmp_path, run_hash="c")
    assert torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)["step"] == 3
