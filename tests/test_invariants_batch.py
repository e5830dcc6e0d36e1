"""Invariants of the evaluation over every registered image attack, through the real evaluation
(``evaluate_classification``) on the trained micro CLIP and Fashion-MNIST test images:

* per-sample outcomes are the same at batch sizes 1, 7 and the whole set, random starts included;
* the same on one process and on two gloo ranks;
* a cascade (every attack ``worst_only``) reaches, per sample, the worst case of running every
  attack on every sample;
* a zero budget is the identity: outcomes equal clean outcomes, per sample.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmcoa.attacks import list_attacks
from mmcoa.evaluate import evaluate_classification, sample_indices, suite_from_specs
from mmcoa.models import save_model
from mmcoa.train import in_memory_batches

N = 21  # samples: three batches of 7
SEED = 5
WORKER = Path(__file__).with_name("evaluate_worker.py")
ROOT = Path(__file__).resolve().parents[1]


def small_budgets(source: str) -> dict[str, dict]:
    """Params of a small budget for every registered image attack (seed None: the evaluation seeds)."""
    pgd = dict(eps_255=4, step_255=1, steps=3)
    return {
        "pgd": dict(**pgd, restarts=2),
        "apgd_ce": dict(eps_255=4, steps=4),
        "apgd_t": dict(eps_255=4, steps=3, n_targets=2),
        "aa": dict(eps_255=4, steps=3, n_targets=2),
        "square": dict(eps_255=8, n_queries=15),
        "transfer": dict(source=source, attack="pgd", params=pgd),
        "typographic": dict(font_frac=0.3),
        "fgsm": dict(eps_255=4),
        "nfgsm": dict(eps_255=4),
    }


def zero_budgets(source: str) -> dict[str, dict]:
    """Params of a budget that admits no change, for every registered image attack."""
    return {
        "pgd": dict(eps_255=0, steps=3),
        "apgd_ce": dict(eps_255=0, steps=3),
        "apgd_t": dict(eps_255=0, steps=3, n_targets=2),
        "aa": dict(eps_255=0, steps=3, n_targets=2),
        "square": dict(eps_255=0, n_queries=5),
        "transfer": dict(source=source, attack="pgd", params=dict(eps_255=0, steps=3)),
        "typographic": dict(opacity=0),
        "fgsm": dict(eps_255=0),
        "nfgsm": dict(eps_255=0),
    }


def specs(budgets: dict[str, dict], worst_only: bool = False) -> list[dict]:
    assert set(budgets) == set(list_attacks("image")), "give every registered image attack a budget here"
    return [{"name": n, "attack": n, "params": p, "worst_only": worst_only} for n, p in budgets.items()]


@pytest.fixture
def saved(trained_model, tmp_path):
    """The trained micro CLIP saved to disk (the transfer attack's source, the workers' model)."""
    path = tmp_path / "model"
    save_model(trained_model, path)
    return str(path)


def evaluate(model, test, suite_specs, batch_size):
    idx = sample_indices(test.labels, N, SEED)
    return evaluate_classification(model, in_memory_batches(test), idx, test.classnames, test.templates[:1],
                                   suite_from_specs(suite_specs), "fashion_mnist", batch_size, SEED, n_examples=0)


def test_outcomes_do_not_depend_on_the_batch_size_or_the_cascade(trained_model, fmnist, saved):
    _, test = fmnist
    columns = specs(small_budgets(saved))
    full = evaluate(trained_model, test, columns, N)
    attacked = [n for n in small_budgets(saved) if not torch.equal(full.outcomes[n], full.outcomes["clean"])]
    assert len(attacked) >= 5, attacked  # most attacks change some outcome: the comparison is not vacuous
    for batch_size in (1, 7):
        other = evaluate(trained_model, test, columns, batch_size)
        assert other.indices == full.indices
        for name, outcome in full.outcomes.items():
            assert torch.equal(other.outcomes[name], outcome), (name, batch_size)

    cascade = evaluate(trained_model, test, specs(small_budgets(saved), worst_only=True), 7)
    every = torch.stack([full.outcomes[n] for n in small_budgets(saved)]).all(0) & full.outcomes["clean"]
    assert torch.equal(cascade.outcomes["worst_image"], every)


def test_zero_budget_is_the_identity_per_sample(trained_model, fmnist, saved):
    _, test = fmnist
    result = evaluate(trained_model, test, specs(zero_budgets(saved)), 7)
    for name in zero_budgets(saved):
        assert torch.equal(result.outcomes[name], result.outcomes["clean"]), name


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_worker(spec: dict, ranks: int) -> dict:
    # Idle OpenMP threads sleep: two ranks side by side on two cores do not starve each other.
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(ROOT), OMP_WAIT_POLICY="PASSIVE")
    env.pop("WORLD_SIZE", None)
    if ranks == 1:
        cmd = [sys.executable, str(WORKER), json.dumps(spec)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_addr",
               "127.0.0.1", "--master_port", str(free_port()), str(WORKER), json.dumps(spec)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(spec["out"], weights_only=True)


def test_outcomes_are_the_same_on_one_and_two_gloo_ranks(fmnist_dir, saved, tmp_path):
    budgets = small_budgets(saved)
    spec = {"model": saved, "data_dir": str(fmnist_dir), "n": N, "seed": SEED, "batch_size": 7, "suite": specs(budgets)}
    one = run_worker({**spec, "out": str(tmp_path / "one.pt")}, ranks=1)
    two = run_worker({**spec, "out": str(tmp_path / "two.pt")}, ranks=2)
    assert list(two["indices"]) == list(one["indices"]) and len(one["indices"]) == N
    assert any(not torch.equal(one["outcomes"][n], one["outcomes"]["clean"]) for n in budgets)
    for name, outcome in one["outcomes"].items():
        assert torch.equal(two["outcomes"][name], outcome), name
