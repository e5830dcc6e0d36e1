"""`mmcoa seeds`: mean and spread across seeds of the headline metrics of DVC experiments.

Run experiments that differ only by ``seed``, then this command:
    for s in 1 2 3; do dvc exp run --queue -S seed=$s; done; dvc queue start -j 1
    mmcoa seeds
It reads `dvc exp show --json` (the baseline commit and its experiments) and writes reports/seeds.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import typer

from mmcoa.report import Run, seed_runs, seeds_markdown
from stages.common import StageError, log

RERUN = "run `for s in 1 2 3; do dvc exp run --queue -S seed=$s; done; dvc queue start -j 1` first"


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _run(entry: dict, params_file: str, metrics_file: str) -> Run | None:
    data = entry.get("data") or {}
    params = ((data.get("params") or {}).get(params_file) or {}).get("data")
    if params is None:
        return None
    metrics = ((data.get("metrics") or {}).get(metrics_file) or {}).get("data") or {}
    flat = {k: float(v) for k, v in _flatten(metrics).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return Run(entry.get("name") or str(entry.get("rev", ""))[:7], _flatten(params), flat)


def parse_exp_show(rows: list[dict], params_file: str, metrics_file: str) -> list[Run]:
    """Runs from `dvc exp show --json`: each baseline commit, then its experiments (the workspace is skipped)."""
    runs = []
    for commit in rows:
        if commit.get("rev") == "workspace":
            continue
        for entry in [commit] + [exp["revs"][0] for exp in commit.get("experiments") or [] if exp.get("revs")]:
            run = _run(entry, params_file, metrics_file)
            if run is not None:  # a failed experiment keeps its params and has no metrics: noted, not used
                runs.append(run if entry.get("error") is None else Run(run.name, run.params, {}))
    return runs


def _exp_show() -> list[dict]:
    proc = subprocess.run([sys.executable, "-m", "dvc", "exp", "show", "--json"], capture_output=True, text=True,
                          env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    if proc.returncode != 0:
        first = next((line for line in proc.stderr.splitlines() if line.strip()), "no output")
        raise StageError(f"`dvc exp show --json` failed ({first.strip()}); run `mmcoa seeds` inside the project's DVC repository")
    return json.loads(proc.stdout)


def seeds(
    input_: Path = typer.Option(None, "--input", help="Saved `dvc exp show --json` output (default: run it here)."),
    metrics: str = typer.Option("reports/headline.json", help="The metrics file whose keys are summarised."),
    params_file: str = typer.Option("params.yaml", "--params-file", help="The params file holding `seed`."),
    out: Path = typer.Option(Path("reports/seeds.md"), help="Where to write the table."),
) -> None:
    """Mean and spread (std, min, max) across seeds of each headline metric, from DVC experiments."""
    if input_ is not None:
        try:
            rows = json.loads(input_.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise StageError(f"{input_}: not readable `dvc exp show --json` output ({err}); save it with `dvc exp show --json > FILE`") from None
    else:
        rows = _exp_show()
    if not isinstance(rows, list):
        raise StageError(f"{input_ or 'dvc exp show --json'}: expected a JSON list of commits; save it with `dvc exp show --json > FILE`")
    kept, notes = seed_runs(parse_exp_show(rows, params_file, metrics))
    if len(kept) < 2:
        raise StageError(f"{len(kept)} run(s) with {metrics} that differ only by seed; need at least 2; {RERUN}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(seeds_markdown(kept, notes))
    os.replace(tmp, out)
    log(f"seeds: {len(kept)} runs ({len(notes)} left out) -> {out}")
