"""Robustness against compute: what each model's training cost beside its worst-case image accuracy,
and what each attack of the evaluation cost.

Inputs are the evaluations alone: each result.json carries the training ledger of its model
(``training_ledger``, ``mmcoa.ledger.ComputeLedger.summary``; none for the base or a model not
fine-tuned by the pipeline) and the cost of each of its runs (``cost``, ``mmcoa.ledger.CostMeter``).
Counted quantities (passes, rows, steps, images seen) are as reproducible as the accuracies and go in
the report (:func:`compute_markdown`); measured ones (wall seconds, attack share of step time, peak
memory) change from run to run and go in a file of their own (:func:`timing_markdown`).
"""

from __future__ import annotations

from dataclasses import dataclass

from mmcoa.stats import accuracy_interval

from mmcoa.report.collection import Collection, ReportError, label, worst_name
from mmcoa.report.format import pct, runtime_text

TOWERS = ("image", "text")
NOT_RECORDED = "not recorded"

Estimate = tuple[float, tuple[float, float]]  # a value and its 95% interval


@dataclass(frozen=True)
class ComputeRow:
    """One model: its training ledger (None when not recorded) and its worst-case image accuracy on the
    fine-tuning set and averaged over the held-out sets, each with its 95% interval (None when absent)."""

    model: str
    ledger: dict | None
    finetune: Estimate | None
    held_out: Estimate | None

    def passes(self, tower: str, direction: str | None = None) -> float:
        """Training passes through ``tower``: forward (``fwd``), backward (``bwd``) or both; 0 without a ledger."""
        if self.ledger is None:
            return 0.0
        directions = (direction,) if direction else ("fwd", "bwd")
        return float(sum(self.ledger.get(f"{d}_{tower}", 0.0) for d in directions))

    @property
    def training_passes(self) -> float:
        """Forward and backward passes of both towers (0 for a model the pipeline did not fine-tune)."""
        return sum(self.passes(t) for t in TOWERS)


def robustness_attack(col: Collection) -> str | None:
    """The image accuracy the compute table and figure show: the image family's worst case, else the
    ``image`` attack alone; None when the evaluations have neither."""
    if "image" in col.families():
        return worst_name("image")
    return "image" if "image" in col.attacks() else None


def _bad(e, what: str) -> ReportError:
    return ReportError(f"result of {e.model} on {e.dataset}: {what}; rerun `mmcoa evaluate` for that model and dataset")


def training_ledger(col: Collection, model: str) -> dict | None:
    """The training ledger a model's evaluations carry (the first that records one)."""
    for e in col.evals:
        ledger = e.result.get("training_ledger") if e.model == model else None
        if ledger is not None and not isinstance(ledger, dict):
            raise _bad(e, "'training_ledger' must be an object or null")
        if ledger is not None:
            return ledger
    return None


def compute_rows(col: Collection) -> list[ComputeRow]:
    """One row per model of the collection, in its order."""
    attack, ft = robustness_attack(col), col.finetune
    rows = []
    for model in col.models:
        e = col.get(model, ft[0]) if ft else None
        v = e.acc(attack) if e is not None and attack else None
        finetune = (v, accuracy_interval(v, e.n)) if v is not None else None
        rows.append(ComputeRow(model, training_ledger(col, model), finetune, col.heldout_mean(model, attack) if attack else None))
    return rows


def _estimate(est: Estimate | None) -> str:
    return "n/a" if est is None else f"{pct(est[0])} [{pct(est[1][0])}, {pct(est[1][1])}]"


def _count(v: float) -> str:
    return f"{v:,.0f}"


def _passes_cell(row: ComputeRow, tower: str) -> str:
    if row.ledger is None:
        return NOT_RECORDED
    return f"{_count(row.passes(tower))} ({_count(row.passes(tower, 'fwd'))} / {_count(row.passes(tower, 'bwd'))})"


def evaluation_costs(col: Collection) -> dict[tuple[str, str], dict[str, float]]:
    """(task, attack) -> its cost summed over every evaluation that recorded one (passes, rows, samples, seconds)."""
    out: dict[tuple[str, str], dict[str, float]] = {}
    for e in col.evals:
        costs = e.result.get("cost") or {}
        if not isinstance(costs, dict) or not all(isinstance(c, dict) for c in costs.values()):
            raise _bad(e, "'cost' must map each attack to an object of its passes, samples and seconds")
        for attack, cost in costs.items():
            total = out.setdefault((e.task, attack), {})
            for key, value in cost.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    total[key] = total.get(key, 0) + value
    return out


def _per_sample(cost: dict[str, float], tower: str) -> str:
    samples = cost.get("samples", 0)
    if not samples:
        return "n/a"
    rows = sum(cost.get(f"{d}_{tower}_rows", 0) for d in ("fwd", "bwd"))
    return f"{rows / samples:.1f}"


def compute_markdown(col: Collection, figure: str | None = None, timing: str | None = None) -> list[str]:
    """The section "Robustness against training compute": one row per model, then the evaluation's cost
    per attack; ``figure`` and ``timing`` (the measured seconds' file) as the report links them."""
    rows = compute_rows(col)
    if not rows:
        return []
    attack = robustness_attack(col)
    what = "worst case of the image family" if attack and attack.startswith("worst_") else "image attack"
    ft = col.finetune[0] if col.finetune else None
    head = (f"| model | steps | images seen | image passes (fwd / bwd) | text passes (fwd / bwd) | {what}, "
            f"{ft or 'fine-tuning set'} | {what}, held-out average |")
    out = ["## Robustness against training compute", "", head, "|---|" + "---:|" * 6]
    for r in rows:
        steps = _count(r.ledger.get("steps", 0)) if r.ledger else NOT_RECORDED
        seen = _count(r.ledger.get("images_seen", 0)) if r.ledger else NOT_RECORDED
        out.append(f"| {label(r.model)} | {steps} | {seen} | {_passes_cell(r, 'image')} | {_passes_cell(r, 'text')} | "
                   f"{_estimate(r.finetune)} | {_estimate(r.held_out)} |")
    where = f" in [{timing}]({timing})" if timing else " in each model's finetune.json and each evaluation's result.json"
    out += ["", "Training passes through each tower are counted at the model during fine-tuning (an attack's "
            "input-gradient steps and the weight update alike, batches of the training batch size); accuracy (%) "
            "with 95% intervals. A model without a training ledger (the base, whose fine-tuning cost is none, or a "
            "model the pipeline did not fine-tune) shows not recorded and stands at 0 passes in the figure. Wall "
            "seconds, the attacks' share of step time and peak memory are measured, not counted: they change from "
            "run to run and machine to machine, so this report, which reproduces byte for byte, leaves them out; "
            f"they are{where}.", ""]
    if figure:
        out += [f"![robustness against training compute]({figure})", ""]
    costs = evaluation_costs(col)
    if costs:
        out += ["### Evaluation cost per attack", "",
                "| attack | task | samples | image passes (fwd / bwd) | text passes (fwd / bwd) | image rows per sample "
                "| text rows per sample |", "|---|---|" + "---:|" * 5]
        for (task, name), c in costs.items():
            passes = {t: f"{_count(c.get(f'fwd_{t}', 0))} / {_count(c.get(f'bwd_{t}', 0))}" for t in TOWERS}
            out.append(f"| {name} | {task} | {_count(c.get('samples', 0))} | {passes['image']} | {passes['text']} | "
                       f"{_per_sample(c, 'image')} | {_per_sample(c, 'text')} |")
        out += ["", "Summed over every model and dataset. Passes count tower calls (a batch each), rows per sample "
                "the samples those calls carried, forward and backward, per sample evaluated (a retrieval sample is "
                "a gallery image; its three runs, aimed at R@1, R@5 and R@10, are one attack). clean includes "
                "encoding the class prompts or captions once. A transfer attack's passes include its source model's.", ""]
    return out


def timing_markdown(col: Collection) -> str:
    """The measured cost, apart from the reproducible report: training wall seconds, each attack's share of
    step time and peak memory per model; evaluation seconds per 100 samples per attack."""
    out = ["# Measured compute", "",
           "Wall seconds and memory as measured; they change from run to run and machine to machine "
           "(the counted passes, which do not, are in report.md)."]
    runtimes = col.runtimes()
    if runtimes:
        out += ["", f"Evaluations computed with {'; '.join(runtime_text(r) for r in runtimes)}."]
    out += ["", "## Training", "", "| model | device | wall seconds | seconds per step | attack share of step time "
            "| peak memory (MiB) |", "|---|---|---:|---:|---|---:|"]
    for r in compute_rows(col):
        if r.ledger is None:
            out.append(f"| {label(r.model)} | {NOT_RECORDED} | {NOT_RECORDED} | {NOT_RECORDED} | {NOT_RECORDED} | "
                       f"{NOT_RECORDED} |")
            continue
        steps, wall = r.ledger.get("steps", 0), float(r.ledger.get("wall_s", 0.0))
        shares = ", ".join(f"{k.removeprefix('attack_').removesuffix('_share')} {100 * v:.0f}%"
                           for k, v in sorted(r.ledger.items()) if k.startswith("attack_") and k.endswith("_share"))
        per_step = f"{wall / steps:.3f}" if steps else "n/a"
        out.append(f"| {label(r.model)} | {r.ledger.get('device', '?')} | {wall:.1f} | {per_step} | {shares or 'none'} | "
                   f"{float(r.ledger.get('peak_memory_mb', 0.0)):.0f} |")
    costs = evaluation_costs(col)
    if costs:
        out += ["", "## Evaluation", "", "Summed over every model and dataset.", "",
                "| attack | task | samples | seconds | seconds per 100 samples |", "|---|---|---:|---:|---:|"]
        for (task, name), c in costs.items():
            samples, seconds = c.get("samples", 0), float(c.get("wall_s", 0.0))
            per_100 = f"{100 * seconds / samples:.2f}" if samples else "n/a"
            out.append(f"| {name} | {task} | {_count(samples)} | {seconds:.1f} | {per_100} |")
    return "\n".join(out) + "\n"
