"""Mean and spread across seeds of the headline metrics, from runs of the pipeline with different seeds."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mmcoa.stats import spread
from mmcoa.report.format import pct


@dataclass(frozen=True)
class Run:
    """One experiment: its name, flat params and flat headline metrics."""

    name: str
    params: dict[str, Any]
    metrics: dict[str, float]


def seed_runs(runs: list[Run], seed_key: str = "seed") -> tuple[list[Run], list[str]]:
    """The runs that differ from the first one only by ``seed_key``, one per seed (first listed wins).

    Returns the runs kept and one note per run left out (other params differ, no metrics, repeated seed).
    """
    if not runs:
        return [], []
    ref = {k: v for k, v in runs[0].params.items() if k != seed_key}
    kept, notes, seeds = [], [], set()
    for r in runs:
        other = {k: v for k, v in r.params.items() if k != seed_key}
        if seed_key not in r.params:
            notes.append(f"{r.name}: no '{seed_key}' param")
        elif other != ref:
            diff = sorted(k for k in set(other) | set(ref) if other.get(k) != ref.get(k))
            notes.append(f"{r.name}: other params differ ({', '.join(diff[:5])})")
        elif not r.metrics:
            notes.append(f"{r.name}: no metrics (failed or not run)")
        elif r.params[seed_key] in seeds:
            notes.append(f"{r.name}: seed {r.params[seed_key]} already counted")
        else:
            seeds.add(r.params[seed_key])
            kept.append(r)
    return kept, notes


def seeds_markdown(runs: list[Run], notes: list[str], seed_key: str = "seed") -> str:
    """Mean, sample std, min and max across seeds of every metric all kept runs report."""
    keys = sorted(set.intersection(*(set(r.metrics) for r in runs))) if runs else []
    seeds = ", ".join(sorted((str(r.params[seed_key]) for r in runs), key=lambda v: (len(v), v)))
    out = ["# Spread across seeds", "",
           f"{len(runs)} runs that differ only by `{seed_key}` ({seeds or 'none'}). Accuracy (%); std is the sample "
           "standard deviation (n - 1).", "",
           "| metric | mean | std | min | max | runs |", "|---|---:|---:|---:|---:|---:|"]
    for k in keys:
        s = spread([r.metrics[k] for r in runs])
        out.append(f"| {k} | {pct(s.mean)} | {100 * s.std:.2f} | {pct(s.min)} | {pct(s.max)} | {s.n} |")
    if notes:
        out += ["", "Left out:", ""] + [f"- {n}" for n in notes]
    return "\n".join(out) + "\n"
