"""Evaluations of (model, dataset) pairs, loaded and checked, and the collection the report is built from."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mmcoa.stats import mean_interval


HEADLINE = ("clean", "image", "text", "multimodal")
FAMILY_ORDER = ("image", "text", "multimodal")
BLACK_BOX = ("square", "transfer")
MODEL_ORDER = ("base", "clean", "tecoa", "pmg_aft", "fare", "mmcoa")
LABELS = {"base": "base (no defense)", "clean": "clean fine-tune", "tecoa": "TeCoA", "pmg_aft": "PMG-AFT",
          "fare": "FARE", "mmcoa": "MMCoA"}
RETRIEVAL_COLUMNS = tuple(f"{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10))
ALPHA = 0.05


class ReportError(ValueError):
    """An evaluation result the report cannot use; the message names the file's problem and the fix."""


def label(model: str) -> str:
    return LABELS.get(model, model)


# --- one evaluation --------------------------------------------------------------------------


@dataclass
class Evaluation:
    """One (model, dataset) evaluation: its result dict, per-sample outcomes, and worst-case vectors."""

    result: dict
    correct: dict[str, np.ndarray] = field(default_factory=dict)
    indices: list[int] | None = None
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def model(self) -> str:
        return self.result["model"]

    @property
    def dataset(self) -> str:
        return self.result["dataset"]

    @property
    def task(self) -> str:
        return self.result.get("task", "classification")

    @property
    def role(self) -> str:
        return self.result.get("role", "finetune")

    @property
    def n(self) -> int:
        return int(self.result["n"])

    def n_for(self, column: str) -> int:
        """Queries behind a metric: captions for text->image retrieval, samples (images) otherwise."""
        return int(self.result.get("n_captions", self.n)) if column.startswith("t2i") else self.n

    def acc(self, attack: str, column: str = "acc") -> float | None:
        return self.metrics.get(f"{self.dataset}.{attack}.{column}")

    def threat(self, attack: str) -> dict | None:
        return self.result.get("threat_models", {}).get(attack)

    def threat_models_names(self) -> list[str]:
        return list(self.result.get("threat_models", {}))

    @property
    def families(self) -> dict[str, list[str]]:
        return self.result.get("families", {})

    def clusters(self, column: str) -> list[int] | None:
        """The cluster of each query behind a metric: a text->image query's gallery image (its captions
        share it); None for independent queries (images) or when the result does not record it."""
        return self.result.get("caption_image") if self.task == "retrieval" and column.startswith("t2i") else None

    @property
    def pairing(self) -> tuple | None:
        """What two evaluations must share to be compared query by query: the sample indices, or a
        retrieval gallery's image indices and caption owners; None when the result does not record them."""
        if self.task == "classification":
            return None if self.indices is None else tuple(self.indices)
        images, owners = self.result.get("image_indices"), self.result.get("caption_image")
        return None if images is None or owners is None else (tuple(images), tuple(owners))


def load_evaluation(result: Any, outcomes: Any | None, where: str) -> Evaluation:
    """Check a result (and its outcomes) and derive the worst case per family from the outcomes.

    ``where`` names the source in error messages. The worst case of a family is per sample: a
    sample counts as correct only if every attack of the family (and the evaluation's own
    ``worst_<family>`` column) leaves it correct, so it is never above any single attack.
    """
    _check_result(result, where)
    ev = Evaluation(result, metrics=dict(result["metrics"]))
    if outcomes is not None:
        _load_outcomes(ev, outcomes, where)
    if ev.task == "classification":
        _check_robust_implies_clean(ev, where)
        _derive_worst(ev, where)
    return ev


def _check_robust_implies_clean(ev: Evaluation, where: str) -> None:
    """A sample counts as robust only if it is correct clean too (AutoAttack's count); outcomes that say
    otherwise come from an evaluation that counted an attack fixing a misclassified sample."""
    clean = ev.correct.get("clean")
    if clean is None:
        return
    for key, vec in ev.correct.items():
        fixed = int(np.sum(vec & ~clean))
        if fixed:
            raise ReportError(f"{where.replace('result.json', 'outcomes.json')}: correct.{key} counts {fixed} sample(s) "
                              "wrong clean as robust; rerun `mmcoa evaluate` for that model and dataset")


def _check_result(r: Any, where: str) -> None:
    def bad(what: str) -> ReportError:
        return ReportError(f"{where}: {what}; rerun `mmcoa evaluate` for that model and dataset")

    if not isinstance(r, dict):
        raise bad("not a JSON object")
    for key, kind in (("model", str), ("dataset", str), ("n", int), ("metrics", dict)):
        if key not in r:
            raise bad(f"missing key '{key}'")
        if not isinstance(r[key], kind) or isinstance(r[key], bool):
            raise bad(f"'{key}' must be a {kind.__name__}, got {type(r[key]).__name__}")
    if r["n"] <= 0:
        raise bad(f"'n' must be positive, got {r['n']}")
    if r.get("task", "classification") not in ("classification", "retrieval"):
        raise bad(f"'task' must be classification or retrieval, got {r.get('task')!r}")
    if r.get("role", "finetune") not in ("finetune", "held_out"):
        raise bad(f"'role' must be finetune or held_out, got {r.get('role')!r}")
    if r.get("task") == "retrieval":
        if not isinstance(r.get("n_captions"), int):
            raise bad("a retrieval result needs an integer 'n_captions'")
        for key, n, top in (("image_indices", r["n"], None), ("caption_image", r["n_captions"], r["n"])):
            v = r.get(key)
            if v is not None and (not isinstance(v, list) or len(v) != n or not all(
                    isinstance(i, int) and i >= 0 and (top is None or i < top) for i in v)):
                raise bad(f"'{key}' must list {n} indices" + (f" in [0, {top})" if top else ""))
    for key, value in r["metrics"].items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 1:
            raise bad(f"metric '{key}' must be a number in [0, 1], got {value!r}")
        if not key.startswith(f"{r['dataset']}.") or key.count(".") < 2:
            raise bad(f"metric key '{key}' is not '<dataset>.<attack>.<metric>' for dataset '{r['dataset']}'")
    for key in ("threat_models", "families", "worst", "examples"):
        if not isinstance(r.get(key, {}), dict):
            raise bad(f"'{key}' must be an object")
    for family, attacks in r.get("families", {}).items():
        if not isinstance(attacks, list) or not all(isinstance(a, str) for a in attacks):
            raise bad(f"families.{family} must be a list of attack names")


def _load_outcomes(ev: Evaluation, o: Any, where: str) -> None:
    where = where.replace("result.json", "outcomes.json")

    def bad(what: str) -> ReportError:
        return ReportError(f"{where}: {what}; rerun `mmcoa evaluate` for that model and dataset")

    if not isinstance(o, dict) or not isinstance(o.get("correct"), dict):
        raise bad("missing object 'correct'")
    order = None
    if ev.task == "classification":
        idx = o.get("indices")
        if not isinstance(idx, list) or len(idx) != ev.n or not all(isinstance(i, int) for i in idx):
            raise bad(f"'indices' must list the {ev.n} evaluated samples")
        # Sorted by sample index, so two evaluations pair up whatever order their workers wrote.
        order = np.argsort(np.asarray(idx), kind="stable")
        ev.indices = [idx[i] for i in order]
    for key, values in o["correct"].items():
        if ev.task == "classification":
            attack, column, n = key, "acc", ev.n
        else:
            attack, _, column = key.rpartition(".")
            n = ev.n_for(column)
        if not isinstance(values, list) or len(values) != n or any(v not in (0, 1) for v in values):
            raise bad(f"correct.{key} must be {n} values of 0 or 1")
        vec = np.asarray(values, dtype=bool)
        stated = ev.acc(attack, column)
        if stated is not None and abs(stated - vec.mean()) > 0.5 / n:
            raise bad(f"correct.{key} gives {vec.mean():.4f} but result.json states {stated:.4f}")
        ev.correct[key] = vec if order is None else vec[order]


def _derive_worst(ev: Evaluation, where: str) -> None:
    for family, attacks in ev.families.items():
        name = ev.result.get("worst", {}).get(family, f"worst_{family}")
        single = [(a, ev.acc(a)) for a in attacks if ev.acc(a) is not None]
        stated = ev.acc(name)
        if stated is not None and single and stated > min(v for _, v in single) + 1e-9:
            a, v = min(single, key=lambda t: t[1])
            raise ReportError(f"{where}: {name} = {stated:.4f} is above {a} = {v:.4f} of the same family; "
                              "a worst case is at most every attack of its family; rerun `mmcoa evaluate`")
        vectors = [ev.correct[a] for a in [*attacks, name] if a in ev.correct]
        if vectors:
            worst = np.logical_and.reduce(vectors)
            ev.correct[name] = worst
            ev.metrics[f"{ev.dataset}.{name}.acc"] = float(worst.mean())


# --- the collection --------------------------------------------------------------------------


@dataclass
class Collection:
    """All evaluations, indexed by (model, dataset), with the dataset roles the report groups by."""

    evals: list[Evaluation]

    def __post_init__(self) -> None:
        rank = {m: i for i, m in enumerate(MODEL_ORDER)}
        self.evals = sorted(self.evals, key=lambda e: (rank.get(e.model, len(rank)), e.model, e.dataset))
        self.by: dict[tuple[str, str], Evaluation] = {}
        for e in self.evals:
            if (e.model, e.dataset) in self.by:
                raise ReportError(f"two results for model '{e.model}' on dataset '{e.dataset}'; keep one evaluation folder per pair")
            self.by[(e.model, e.dataset)] = e

    def get(self, model: str, dataset: str) -> Evaluation | None:
        return self.by.get((model, dataset))

    @property
    def models(self) -> list[str]:
        return list(dict.fromkeys(e.model for e in self.evals))

    def datasets(self, task: str = "classification", role: str | None = None) -> list[str]:
        names = {e.dataset for e in self.evals if e.task == task and (role is None or e.role == role)}
        ft = sorted(n for n in names if self.is_finetune(n))
        return ft + sorted(names - set(ft))

    def is_finetune(self, dataset: str) -> bool:
        return any(e.role == "finetune" for e in self.evals if e.dataset == dataset)

    @property
    def finetune(self) -> list[str]:
        return [d for d in self.datasets() if self.is_finetune(d)]

    @property
    def held_out(self) -> list[str]:
        return [d for d in self.datasets() if not self.is_finetune(d)]

    def attacks(self) -> list[str]:
        """Classification attacks: clean, the headline ones, the rest; worst-case and sweep columns apart."""
        seen = {k.split(".")[-2] for e in self.evals if e.task == "classification" for k in e.metrics}
        head = [a for a in HEADLINE if a in seen]
        rest = sorted(a for a in seen if a not in head and not a.startswith(("worst_", "sweep_")) and a != "linear_probe")
        return head + rest + (["linear_probe"] if "linear_probe" in seen else [])

    def families(self) -> list[str]:
        names = {f for e in self.evals for f in e.families}
        return [f for f in FAMILY_ORDER if f in names] + sorted(names - set(FAMILY_ORDER))

    def family_attacks(self, family: str) -> list[str]:
        return list(dict.fromkeys(a for e in self.evals for a in e.families.get(family, [])))

    def threat(self, attack: str) -> dict | None:
        return next((e.threat(attack) for e in self.evals if e.threat(attack)), None)

    def runtimes(self) -> list[dict]:
        """The distinct runtimes (torch build, kernels, threads or GPU) the evaluations were computed on."""
        seen: list[dict] = []
        for e in self.evals:
            r = e.result.get("runtime")
            if r and r not in seen:
                seen.append(r)
        return seen

    def heldout_mean(self, model: str, attack: str) -> tuple[float, tuple[float, float]] | None:
        """Mean accuracy over every held-out classification set, with its 95% interval (None if one is missing)."""
        evs = [self.get(model, d) for d in self.held_out]
        if not evs or any(e is None or e.acc(attack) is None for e in evs):
            return None
        accs = [e.acc(attack) for e in evs]
        return sum(accs) / len(accs), mean_interval(accs, [e.n for e in evs])


def worst_name(family: str) -> str:
    return f"worst_{family}"
