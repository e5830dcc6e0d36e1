"""What the study scripts share: running `mmcoa finetune` / `mmcoa evaluate` once per cell, reading
per-sample outcomes, intervals across seeds and paired tests pooled over seeds.

A cell is (method, seed): its model under OUT/models/<cell> and its evaluations under
OUT/evals/<cell>/<dataset>; a cell already done is reused, so a study cut short goes on where it stopped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from scipy.stats import t as student_t

from mmcoa.stats import PairedTest, cluster_paired_test, spread
from stages.common import read_timing

EXE = Path(sys.executable).parent / "mmcoa"
# An evaluation of a study reads per-sample outcomes only: no sweep, probe or examples.
EVAL_OPTIONS = ["-S", "evaluate.sweep=null", "-S", "evaluate.linear_probe=false", "-S", "evaluate.n_examples=0"]


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    if subprocess.run(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"}).returncode:
        raise SystemExit(f"error: {cmd[1]} failed (its message is above); finished runs are kept, rerun to go on")


def finetune(out: Path, cell: str, recipe: list[str], seed: int) -> Path:
    """The model folder of ``cell``, fine-tuned from models/base with ``recipe`` (CLI arguments) once."""
    model = out / "models" / cell
    if not (model / "finetune.json").is_file():
        run([str(EXE), "finetune", *recipe, "--base", "models/base", "--data", "data/prepared", "--out", str(model),
             "--checkpoint-dir", str(out / "checkpoints" / cell), "-S", f"seed={seed}"])
    return model


def evaluate(out: Path, cell: str, model: Path, dataset: str, options: list[str]) -> Path:
    """The evaluation folder of ``cell`` on data/eval/<dataset>, run once with ``options`` (CLI -S ...)."""
    ev = out / "evals" / cell / dataset
    if not (ev / "outcomes.json").is_file():
        run([str(EXE), "evaluate", "--name", cell, "--model", str(model), "--data", f"data/eval/{dataset}",
             "--out", str(ev), *options, *EVAL_OPTIONS])
    return ev


def outcomes(ev: Path, columns: list[str]) -> tuple[list[int], dict[str, np.ndarray]]:
    """Sample indices and per-sample correctness (0/1) of each column of an evaluation folder."""
    o = json.loads((ev / "outcomes.json").read_text())
    return o["indices"], {c: np.asarray(o["correct"][c], dtype=int) for c in columns}


def ledger(model: Path) -> dict:
    """The training run's counted passes (finetune.json) and measured seconds (timing, None if absent)."""
    counted = json.loads((model / "finetune.json").read_text())["ledger"]
    return {**counted, "wall_s": read_timing(model).get("ledger", {}).get("wall_s")}


def t_interval(values: list[float]) -> tuple[float, float, float]:
    """Mean and 95% t-interval across seeds (the interval is the mean itself for one seed)."""
    s = spread(values)
    half = float(student_t.ppf(0.975, s.n - 1) * s.std / np.sqrt(s.n)) if s.n > 1 else 0.0
    return s.mean, s.mean - half, s.mean + half


def cell_text(values: list[float]) -> str:
    """An accuracy (fractions) across seeds in percent, with its interval when there are several."""
    m, lo, hi = t_interval(values)
    return f"{100 * m:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]" if len(values) > 1 else f"{100 * m:.1f}"


def pooled_test(pairs: list[tuple[Path, Path]], column: str) -> PairedTest:
    """``a`` minus ``b`` on ``column`` over (a, b) evaluation folders, one pair per seed on the same
    samples, pooled over seeds with the sample as the cluster (its outcomes across seeds share it):
    an exact sign-flip test."""
    a, b, clusters = [], [], []
    for ev_a, ev_b in pairs:
        idx_a, oa = outcomes(ev_a, [column])
        idx_b, ob = outcomes(ev_b, [column])
        if idx_a != idx_b:
            raise SystemExit(f"error: {ev_a} and {ev_b} were evaluated on other samples")
        a += list(oa[column])
        b += list(ob[column])
        clusters += idx_a
    return cluster_paired_test(a, b, clusters)
