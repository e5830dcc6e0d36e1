"""Turn evaluation results into the report a reviewer can check: tables with 95% intervals, the
worst case per attack family, paired tests behind every finding, flat metrics and figures.

Input: one :class:`Evaluation` per (model, dataset), built by :func:`load_evaluation` from the dicts
of an evaluation's ``result.json`` and ``outcomes.json`` (per-sample 0/1 outcomes per attack).
Every number the report states is read or derived from them; a comparison is stated as a finding
only when an exact McNemar test on the same samples rejects equality at 5%.
Nothing here reads pipeline files or knows about the terminal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

from mmcoa.stats import accuracy_interval, holm, mean_interval, paired_test, spread

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

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
        _derive_worst(ev, where)
    return ev


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
    if r.get("task") == "retrieval" and not isinstance(r.get("n_captions"), int):
        raise bad("a retrieval result needs an integer 'n_captions'")
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

    def heldout_mean(self, model: str, attack: str) -> tuple[float, tuple[float, float]] | None:
        """Mean accuracy over every held-out classification set, with its 95% interval (None if one is missing)."""
        evs = [self.get(model, d) for d in self.held_out]
        if not evs or any(e is None or e.acc(attack) is None for e in evs):
            return None
        accs = [e.acc(attack) for e in evs]
        return sum(accs) / len(accs), mean_interval(accs, [e.n for e in evs])


def worst_name(family: str) -> str:
    return f"worst_{family}"


# --- formatting ------------------------------------------------------------------------------


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}"


def _cell(v: float | None, n: int) -> str:
    if v is None:
        return "n/a"
    lo, hi = accuracy_interval(v, n)
    return f"{100 * v:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def _p(p: float) -> str:
    return f"{p:.2g}"


def budget(threat: dict | None, side: str | None = None) -> str:
    """A one-line threat model: attack, norm, eps, steps, word budget, candidate source.

    ``side`` stands in for a description without one (the fine-tuning attacks of a model).
    """
    if not threat:
        return "threat model not recorded"
    if threat.get("attack") == "none":
        return f"no attack ({threat['probe']})" if threat.get("probe") else "no attack"
    if threat.get("side") == "both" and isinstance(threat.get("image"), dict) and isinstance(threat.get("text"), dict):
        return f"{threat.get('mode', threat.get('attack'))}: image [{budget(threat['image'])}] + text [{budget(threat['text'])}]"
    parts = [str(threat["attack"])] if threat.get("attack") else []
    if threat.get("side", side) == "image":
        norm = threat.get("norm", "linf")
        if threat.get("eps_255") is not None:
            parts.append(f"{'L-inf' if norm == 'linf' else norm} eps {threat['eps_255']:g}/255")
        elif threat.get("eps") is not None:
            parts.append(f"{'L2' if norm == 'l2' else norm} eps {threat['eps']:g}")
        keys = ("steps", "iterations", "n_queries", "restarts", "n_targets", "step_255", "source")
    else:
        keys = ("word_budget", "char_budget", "candidates", "k", "cos_threshold")
    parts += [f"{key} {threat[key]}" for key in keys if threat.get(key) is not None]
    return ", ".join(parts)


# --- metrics files ---------------------------------------------------------------------------


def flat_metrics(col: Collection) -> dict[str, float]:
    """Every metric, ``<model>.<dataset>.<attack>.<metric>``, sorted: the full DVC metrics file."""
    out = {f"{e.model}.{k}": v for e in col.evals for k, v in e.metrics.items()}
    return dict(sorted(out.items()))


def headline_metrics(col: Collection) -> dict[str, float]:
    """The small file for `dvc exp show`: per model, held-out averages and the fine-tuning set's headline.

    ``<model>.heldout.clean`` and ``<model>.heldout.worst_<family>`` average over the held-out
    zero-shot classification sets; ``<model>.<ftdataset>.{clean,image,text,multimodal}``.
    """
    out: dict[str, float] = {}
    for model in col.models:
        for attack in ["clean"] + [worst_name(f) for f in col.families()]:
            mean = col.heldout_mean(model, attack)
            if mean is not None:
                out[f"{model}.heldout.{attack}"] = round(mean[0], 6)
        for d in col.finetune:
            e = col.get(model, d)
            for attack in HEADLINE:
                if e is not None and e.acc(attack) is not None:
                    out[f"{model}.{d}.{attack}"] = e.acc(attack)
    return dict(sorted(out.items()))


def sweep_rows(col: Collection) -> list[dict]:
    """The eps sweeps as one list of rows (``dvc plots``)."""
    return [{"model": e.model, "dataset": e.dataset, **row} for e in col.evals for row in e.result.get("sweep", [])]


# --- paired comparisons ----------------------------------------------------------------------


@dataclass(frozen=True)
class Comparison:
    """Model ``a`` vs model ``b`` under one attack, paired on the same samples of one scope."""

    a: str
    b: str
    attack: str
    scope: str
    acc_a: float
    acc_b: float
    diff: float
    p: float
    n: int
    n01: int
    n10: int
    threat: str

    @property
    def significant(self) -> bool:
        return self.p < ALPHA


def _paired_vectors(col: Collection, a: str, b: str, key: str, datasets: list[str]):
    """Outcomes of two models concatenated over ``datasets``; None unless every set is paired sample by sample."""
    va, vb = [], []
    for d in datasets:
        ea, eb = col.get(a, d), col.get(b, d)
        if ea is None or eb is None or key not in ea.correct or key not in eb.correct:
            return None
        if ea.indices != eb.indices or len(ea.correct[key]) != len(eb.correct[key]):
            return None
        va.append(ea.correct[key])
        vb.append(eb.correct[key])
    return np.concatenate(va), np.concatenate(vb)


def scopes(col: Collection) -> list[tuple[str, list[str]]]:
    """Where models are compared: each fine-tuning set, and the held-out sets pooled sample by sample."""
    out = [(d, [d]) for d in col.finetune]
    if len(col.held_out) == 1:
        out.append((col.held_out[0], col.held_out))
    elif col.held_out:
        out.append(("held-out (pooled)", col.held_out))
    return out


def pairs(col: Collection) -> list[tuple[str, str]]:
    """Each defense against the base, then each pair of defenses (in model order)."""
    models = col.models
    out = [(m, "base") for m in models if m != "base" and "base" in models]
    out += list(combinations([m for m in models if m != "base"], 2))
    return out


def _column_label(column: str) -> str:
    return column.replace("i2t_r", "I->T R@").replace("t2i_r", "T->I R@")


def compare(col: Collection, attacks: tuple[str, ...] = HEADLINE) -> list[Comparison]:
    """Exact McNemar tests for every pair of models, headline attack and scope with paired outcomes.

    Classification: per scope (fine-tuning set, pooled held-out sets). Retrieval: per dataset, on the
    per-query R@1 outcomes in both directions.
    """
    tests = [(scope, ds, attack, attack, attack) for scope, ds in scopes(col) for attack in attacks]
    tests += [(d, [d], f"{attack}.{c}", f"{attack} ({_column_label(c)})", attack)
              for d in col.datasets("retrieval") for attack in attacks for c in ("i2t_r1", "t2i_r1")]
    out = []
    for scope, datasets, key, name, attack in tests:
        for a, b in pairs(col):
            vecs = _paired_vectors(col, a, b, key, datasets)
            if vecs is None:
                continue
            va, vb = vecs
            t = paired_test(va, vb)
            threat = budget(col.get(a, datasets[0]).threat(attack))
            out.append(Comparison(a, b, name, scope, float(va.mean()), float(vb.mean()), t.diff, t.p, len(va),
                                  t.n01, t.n10, threat))
    return out


def unpaired(col: Collection) -> list[str]:
    """Pairs of evaluations on one dataset whose outcomes are not on the same samples (never compared)."""
    out = []
    for d in col.datasets():
        evs = [e for e in col.evals if e.dataset == d and e.indices is not None]
        out += [f"{label(a.model)} vs {label(b.model)} on {d}" for a, b in combinations(evs, 2) if a.indices != b.indices]
    return out


def finding(c: Comparison, holm_ok: bool | None = None) -> str:
    """One sentence with its evidence: direction, size, p, samples, threat model."""
    hi, lo = (c.a, c.b) if c.diff > 0 else (c.b, c.a)
    acc_hi, acc_lo = (c.acc_a, c.acc_b) if c.diff > 0 else (c.acc_b, c.acc_a)
    tail = "" if holm_ok is None or holm_ok else " (not significant after Holm's correction)"
    return (f"{label(hi)} > {label(lo)} under {c.attack} on {c.scope}: {100 * abs(c.diff):+.1f} points "
            f"({_pct(acc_hi)}% vs {_pct(acc_lo)}%), p = {_p(c.p)}, {c.n} samples "
            f"({max(c.n01, c.n10)} vs {min(c.n01, c.n10)} discordant), threat model: {c.threat}{tail}")


def _short(c: Comparison, holm_ok: bool) -> str:
    """A finding inside its (scope, attack) group, whose heading names samples and threat model."""
    hi, lo = (c.a, c.b) if c.diff > 0 else (c.b, c.a)
    acc_hi, acc_lo = (c.acc_a, c.acc_b) if c.diff > 0 else (c.acc_b, c.acc_a)
    tail = "" if holm_ok else " (not significant after Holm's correction)"
    return (f"{label(hi)} > {label(lo)}: {100 * abs(c.diff):+.1f} points ({_pct(acc_hi)}% vs {_pct(acc_lo)}%), "
            f"p = {_p(c.p)} ({max(c.n01, c.n10)} vs {min(c.n01, c.n10)} discordant){tail}")


def no_difference(c: Comparison) -> str:
    return f"{label(c.a)} vs {label(c.b)} ({100 * c.diff:+.1f} points, p = {_p(c.p)})"


def findings_markdown(comparisons: list[Comparison]) -> list[str]:
    """Findings grouped by scope and attack; non-significant pairs summarised in one sentence per group."""
    rejected = holm([c.p for c in comparisons])
    out = [f"Exact McNemar tests on the same samples, two-sided, at 5%; {len(comparisons)} comparisons, "
           f"{sum(c.significant for c in comparisons)} significant, {sum(rejected)} of them still significant "
           "after Holm's correction for all comparisons. The held-out scope pools the samples of every "
           "held-out set (differences are of pooled accuracy).", ""]
    groups: dict[tuple[str, str], list[tuple[Comparison, bool]]] = {}
    for c, ok in zip(comparisons, rejected):
        groups.setdefault((c.scope, c.attack), []).append((c, ok))
    for (scope, attack), items in groups.items():
        out += [f"**{attack} on {scope}** ({items[0][0].n} samples; threat model: {items[0][0].threat}):", ""]
        out += [f"- {_short(c, ok)}" for c, ok in items if c.significant]
        same = [no_difference(c) for c, _ in items if not c.significant]
        if same:
            out.append(f"- Not distinguishable at this sample size (p >= 0.05): {'; '.join(same)}.")
        out.append("")
    return out


# --- threat models trained on ----------------------------------------------------------------


def _same_image_budget(t: dict, trained: dict | None) -> bool:
    if not trained or t.get("side") != "image" or t.get("norm", "linf") != trained.get("norm", "linf"):
        return False
    for key in ("eps_255", "eps"):
        if t.get(key) is not None and trained.get(key) is not None:
            return t[key] == trained[key]
    return False


def _same_text_budget(t: dict, trained: dict | None) -> bool:
    if not trained or t.get("side") != "text":
        return False
    keys = ("candidates", "k", "word_budget", "char_budget") + (("attack",) if "attack" in trained else ())
    return all(t.get(k) == trained.get(k) for k in keys)


def trained_status(threat: dict | None, trained_on: dict | None) -> str:
    """"trained-on" when the attack's budget is one the model was fine-tuned against, else "held out".

    Image: same norm and eps. Text: same candidate source, k and word/char budget (``trained_on`` holds
    the fine-tuning attacks' params: ``image`` and ``text`` dicts, None for a side not trained against).
    Both sides: "trained-on" when both sides match, "image side"/"text side" when one does.
    """
    if not threat or not trained_on:
        return "held out"
    if threat.get("side") == "both" and isinstance(threat.get("image"), dict) and isinstance(threat.get("text"), dict):
        img = _same_image_budget(threat["image"], trained_on.get("image"))
        txt = _same_text_budget(threat["text"], trained_on.get("text"))
        return "trained-on" if img and txt else "image side" if img else "text side" if txt else "held out"
    if _same_image_budget(threat, trained_on.get("image")) or _same_text_budget(threat, trained_on.get("text")):
        return "trained-on"
    return "held out"


def training_markdown(col: Collection) -> list[str]:
    """Per defense: which evaluation threat models it was fine-tuned against and which are held out."""
    rows = []
    attacks = [a for a in col.attacks() if a not in ("clean", "linear_probe")]
    for model in col.models:
        trained = next((e.result.get("trained_on") for e in col.evals if e.model == model and e.result.get("trained_on")), None)
        if not trained:
            continue
        what = "; ".join(f"{side} [{budget(trained[side], side)}]" for side in ("image", "text") if trained.get(side)) or "no attack"
        cells = [trained_status(col.threat(a), trained) for a in attacks]
        rows.append(f"| {label(model)} | {trained.get('dataset', 'n/a')} | {what} | " + " | ".join(cells) + " |")
    if not rows:
        return []
    return ["## Threat models trained on vs held out", "",
            "An image attack is trained-on when its norm and eps equal the training attack's; a text attack "
            "when its candidate source, k and word budget do; a multimodal attack when both sides do (or one "
            "side, as marked). Everything else is held out.", "",
            "| defense | fine-tuned on | trained against | " + " | ".join(attacks) + " |",
            "|---|---|---|" + "---|" * len(attacks), *rows, ""]


# --- gradient masking ------------------------------------------------------------------------


def masking_flags(col: Collection) -> list[str]:
    """White-box robust accuracy above a black-box attack (Square, transfer) of the same family, plus sweep flags."""
    out = []
    for e in col.evals:
        if e.task != "classification":
            continue
        for family, attacks in e.families.items():
            black = [a for a in attacks if (e.threat(a) or {}).get("attack") in BLACK_BOX and e.acc(a) is not None]
            white = [a for a in attacks if a not in black and e.acc(a) is not None]
            for w in white:
                for b in black:
                    if e.acc(w) > e.acc(b):
                        out.append(f"{label(e.model)} on {e.dataset}: white-box {w} {_pct(e.acc(w))}% is above "
                                   f"black-box {b} ({e.threat(b)['attack']}) {_pct(e.acc(b))}% in the {family} family; "
                                   f"the gradient attack is weaker than a gradient-free one (possible gradient masking)")
        out += [f"{label(e.model)} on {e.dataset}: {flag}" for flag in e.result.get("gradient_masking_flags", [])]
    return out


def masking_markdown(col: Collection) -> list[str]:
    """The flags, or which checks ran and passed (a check that could not run is said so)."""
    flags = masking_flags(col)
    if flags:
        return [f"- {f}" for f in flags] + [""]
    cls = [e for e in col.evals if e.task == "classification"]
    black = sum(any((e.threat(a) or {}).get("attack") in BLACK_BOX for a in e.threat_models_names()) for e in cls)
    sweeps = sum(bool(e.result.get("sweep")) for e in cls)
    out = [f"No flag. White-box vs black-box (Square, transfer) in the same family: checked in {black} of {len(cls)} "
           f"evaluations{'' if black else ' (no black-box attack in the suite)'}. Eps sweep (accuracy must not rise "
           f"with eps and must reach chance): checked in {sweeps} of {len(cls)} evaluations.", ""]
    return out


# --- tables ----------------------------------------------------------------------------------


def _dataset_header(col: Collection, d: str) -> str:
    ns = sorted({e.n for e in col.evals if e.dataset == d})
    n = str(ns[0]) if len(ns) == 1 else "varies"
    return f"**{d}** (fine-tuning, n={n})" if col.is_finetune(d) else f"{d} (n={n})"


def accuracy_table(col: Collection, attack: str) -> list[str]:
    """Models x datasets for one attack, with 95% Wilson intervals and the held-out average."""
    datasets = col.datasets()
    avg = len(col.held_out) > 1
    head = "| model | " + " | ".join(_dataset_header(col, d) for d in datasets) + (" | held-out average |" if avg else " |")
    lines = [head, "|---|" + "---:|" * (len(datasets) + avg)]
    for model in col.models:
        cells = []
        for d in datasets:
            e = col.get(model, d)
            cells.append("n/a" if e is None else _cell(e.acc(attack), e.n))
        if avg:
            mean = col.heldout_mean(model, attack)
            cells.append("n/a" if mean is None else f"{_pct(mean[0])} [{_pct(mean[1][0])}, {_pct(mean[1][1])}]")
        lines.append(f"| {label(model)} | " + " | ".join(cells) + " |")
    return lines


def _threat_lines(col: Collection, attack: str) -> list[str]:
    by_budget: dict[str, list[str]] = {}
    for d in col.datasets():
        for e in col.evals:
            if e.dataset == d and e.threat(attack):
                by_budget.setdefault(budget(e.threat(attack)), [])
                if d not in by_budget[budget(e.threat(attack))]:
                    by_budget[budget(e.threat(attack))].append(d)
    if len(by_budget) <= 1:
        return [f"Threat model: {next(iter(by_budget), 'not recorded')}."]
    return [f"Threat model on {', '.join(ds)}: {b}." for b, ds in by_budget.items()]


def retrieval_markdown(col: Collection) -> list[str]:
    """R@1/5/10 in both directions, clean and per attack, with 95% intervals, one table per dataset."""
    out = []
    for d in col.datasets("retrieval"):
        evs = [e for e in col.evals if e.dataset == d]
        attacks = list(dict.fromkeys(k.split(".")[-2] for e in evs for k in e.metrics))
        attacks = [a for a in HEADLINE if a in attacks] + sorted(a for a in attacks if a not in HEADLINE)
        e0 = evs[0]
        out += [f"### {d}", "", f"{e0.n} images (image->text queries), {e0.n_for('t2i')} captions "
                "(text->image queries); recall (%) with 95% intervals. An image->text query is correct when any "
                "of its captions is in the top k; a text->image query when its own image is.", "",
                "| model | attack | " + " | ".join(c.replace("i2t_r", "I->T R@").replace("t2i_r", "T->I R@") for c in RETRIEVAL_COLUMNS) + " |",
                "|---|---|" + "---:|" * len(RETRIEVAL_COLUMNS)]
        for e in evs:
            for a in attacks:
                if any(e.acc(a, c) is not None for c in RETRIEVAL_COLUMNS):
                    out.append(f"| {label(e.model)} | {a} | " + " | ".join(_cell(e.acc(a, c), e.n_for(c)) for c in RETRIEVAL_COLUMNS) + " |")
        out += [""] + [f"- {a}: {budget(e0.threat(a))}" for a in attacks if a != "clean"] + [""]
    return (["## Retrieval", ""] + out) if out else []


# --- markdown --------------------------------------------------------------------------------


def render_markdown(col: Collection, figures: dict[str, str], notes: list[str] | None = None) -> str:
    """The report: overview, per-attack tables, worst case, retrieval, training threat models, checks, findings."""
    out = ["# Robustness report", ""]
    ft, held = col.finetune, col.held_out
    out += [f"Models: {', '.join(label(m) for m in col.models)}. Fine-tuning set: {', '.join(ft) or 'none'}; "
            f"held-out zero-shot classification sets: {', '.join(held) or 'none'}; retrieval sets: "
            f"{', '.join(col.datasets('retrieval')) or 'none'}. Zero-shot top-1 accuracy (%) with 95% Wilson "
            "intervals; every column of a dataset uses the same samples. The held-out average is the mean over "
            "the held-out sets, with a 95% normal interval of that mean.", ""]
    if "overview" in figures:
        out += [f"![overview]({figures['overview']})", ""]
    if "accuracy" in figures:
        out += [f"![accuracy]({figures['accuracy']})", ""]
    attacks = col.attacks()
    if attacks:
        out += ["## Accuracy per attack", ""]
        for attack in attacks:
            out += [f"### {attack}", "", *_threat_lines(col, attack), "", *accuracy_table(col, attack), ""]
    if col.families():
        out += ["## Worst case per attack family", "",
                "A sample counts as correct only if it survives every attack of the family, so the worst case "
                "is never above any single attack. An attack marked (cascade) runs only on the samples that every "
                "earlier attack of its family left correct, so it has no column of its own.", ""]
        for family in col.families():
            members = ", ".join(f"{a} (cascade)" if (col.threat(a) or {}).get("worst_only") else a for a in col.family_attacks(family))
            out += [f"### {family} (worst over {members})", "", *accuracy_table(col, worst_name(family)), ""]
    out += retrieval_markdown(col)
    out += training_markdown(col)
    out += ["## Gradient-masking checks", ""]
    out += masking_markdown(col)
    if any(e.result.get("sweep") for e in col.evals) and "sweep" in figures:
        out += ["## Robust accuracy against eps", "", f"![eps sweep]({figures['sweep']})", ""]
    out += ["## Findings", ""]
    comparisons = compare(col)
    out += findings_markdown(comparisons) if comparisons else [
        "No paired per-sample outcomes were found, so no comparison is stated.", ""]
    skipped = unpaired(col)
    if skipped:
        out += [f"Not compared (outcomes on different samples): {'; '.join(skipped)}.", ""]
    out += _prompts_markdown(col)
    examples = [(k, p) for k, p in figures.items() if k.startswith("examples:")]
    if examples:
        out += ["## Adversarial images", ""] + [line for k, p in examples for line in (f"![{k}]({p})", "")]
    if notes:
        out += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(out)


def _prompts_markdown(col: Collection) -> list[str]:
    out = []
    for e in col.evals:
        if not col.is_finetune(e.dataset):
            continue
        for name, ex in sorted(e.result.get("examples", {}).items()):
            changed = [p for p in ex.get("prompts", []) if p["clean"] != p["adversarial"]]
            if changed:
                out.append(f"- {label(e.model)}, {name}: " + "; ".join(f"`{p['clean']}` -> `{p['adversarial']}`" for p in changed[:3]))
    return (["## Adversarial prompts (fine-tuning set)", ""] + out + [""]) if out else []


def render_summary(col: Collection, reference: str = "mmcoa") -> str:
    """Compact results for README: the headline table and the reference model's significant findings."""
    ft = col.finetune
    fams = col.families()
    cols = [(d, a) for d in ft for a in HEADLINE if any(col.get(m, d) and col.get(m, d).acc(a) is not None for m in col.models)]
    held = [a for a in ["clean"] + [worst_name(f) for f in fams] if any(col.heldout_mean(m, a) for m in col.models)]
    out = ["| model | " + " | ".join(f"{d} {a}" for d, a in cols) + "".join(f" | held-out {a}" for a in held) + " |",
           "|---|" + "---:|" * (len(cols) + len(held))]
    for m in col.models:
        cells = [_pct(col.get(m, d).acc(a)) if col.get(m, d) else "n/a" for d, a in cols]
        cells += [_pct((col.heldout_mean(m, a) or (None,))[0]) for a in held]
        out.append(f"| {label(m)} | " + " | ".join(cells) + " |")
    out.append("")
    ns = "; ".join(f"{d}: {e.n} samples" for d in col.datasets() for e in [next(x for x in col.evals if x.dataset == d)])
    out.append(f"Accuracy (%). Samples per dataset: {ns}. Held-out columns average {len(col.held_out)} held-out "
               f"zero-shot sets ({', '.join(col.held_out) or 'none'}); worst_<family> counts a sample as correct only "
               "if it survives every attack of the family.")
    out += ["", "Threat models: " + "; ".join(f"{a}: {budget(col.threat(a))}" for a in HEADLINE[1:] if col.threat(a)) + ".", ""]
    out += retrieval_summary(col)
    out += reference_findings(col, reference)
    return "\n".join(out)


def retrieval_summary(col: Collection) -> list[str]:
    """R@1 of both directions per model and headline attack, one compact table per retrieval set."""
    out = []
    for d in col.datasets("retrieval"):
        evs = [e for e in col.evals if e.dataset == d]
        attacks = [a for a in HEADLINE if any(e.acc(a, "i2t_r1") is not None for e in evs)]
        out += [f"Retrieval on {d} ({evs[0].n} images, {evs[0].n_for('t2i')} captions), R@1 (%) image->text / "
                "text->image:", "", "| model | " + " | ".join(attacks) + " |", "|---|" + "---:|" * len(attacks)]
        for e in evs:
            cells = [f"{_pct(e.acc(a, 'i2t_r1'))} / {_pct(e.acc(a, 't2i_r1'))}" for a in attacks]
            out.append(f"| {label(e.model)} | " + " | ".join(cells) + " |")
        out.append("")
    return out


def reference_findings(col: Collection, reference: str) -> list[str]:
    """One line per (scope, attack): where ``reference`` is significantly above or below each other model."""
    groups: dict[tuple[str, str], list[Comparison]] = {}
    for c in compare(col):
        if reference in (c.a, c.b):
            groups.setdefault((c.scope, c.attack), []).append(c)
    if not groups:
        return []
    out = [f"Findings for {label(reference)} (exact McNemar test on the same samples, p < 0.05):", ""]
    for (scope, attack), cs in groups.items():
        parts = []
        for c in (c for c in cs if c.significant):
            other, d = (c.b, c.diff) if c.a == reference else (c.a, -c.diff)
            parts.append(f"{'>' if d > 0 else '<'} {label(other)} ({100 * d:+.1f} points, p = {_p(c.p)})")
        same = [label(c.b if c.a == reference else c.a) for c in cs if not c.significant]
        if same:
            parts.append(f"not distinguishable from {', '.join(same)} at this sample size")
        out.append(f"- {attack} on {scope} ({cs[0].n} samples): {label(reference)} {'; '.join(parts)}.")
    return out + [""]


MARK_START, MARK_END = "<!-- results:start -->", "<!-- results:end -->"


def splice_summary(readme_text: str, summary: str) -> str:
    """README text with everything between the results markers replaced by ``summary``."""
    start, end = readme_text.find(MARK_START), readme_text.find(MARK_END)
    if start < 0 or end < 0 or end < start:
        raise ReportError(f"README has no '{MARK_START}' ... '{MARK_END}' block; add both markers, in that order, "
                          "where the results belong")
    return readme_text[: start + len(MARK_START)] + "\n" + summary.strip() + "\n" + readme_text[end:]


# --- seeds -----------------------------------------------------------------------------------


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
        out.append(f"| {k} | {_pct(s.mean)} | {100 * s.std:.2f} | {_pct(s.min)} | {_pct(s.max)} | {s.n} |")
    if notes:
        out += ["", "Left out:", ""] + [f"- {n}" for n in notes]
    return "\n".join(out) + "\n"


# --- figures ---------------------------------------------------------------------------------


def _save(fig, path: str | Path) -> None:
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)


def overview_columns(col: Collection) -> list[tuple[str, str, list[str]]]:
    """(column label, attack, datasets) for the overview: clean and each family's worst case, per scope."""
    attacks = ["clean"] + [worst_name(f) for f in col.families()]
    if not col.families():
        attacks = [a for a in HEADLINE if a in col.attacks()]
    name = lambda a: a.replace("worst_", "worst ")  # noqa: E731
    cols = [(f"{d}\n{name(a)}", a, [d]) for d in col.finetune for a in attacks]
    if col.held_out:
        cols += [(f"held-out avg\n{name(a)}", a, col.held_out) for a in attacks]
    return cols


def save_overview_figure(col: Collection, path: str | Path) -> None:
    """Models x (scope, clean / worst case per family) heatmap of accuracy, numbers in the cells."""
    cols = overview_columns(col)
    models = col.models
    grid = np.full((len(models), len(cols)), np.nan)
    for i, m in enumerate(models):
        for j, (_, attack, ds) in enumerate(cols):
            if len(ds) == 1 and col.is_finetune(ds[0]):
                e = col.get(m, ds[0])
                v = e.acc(attack) if e else None
            else:
                v = (col.heldout_mean(m, attack) or (None,))[0]
            if v is not None:
                grid[i, j] = 100 * v
    fig, ax = plt.subplots(figsize=(1.1 * len(cols) + 2.5, 0.5 * len(models) + 1.8))
    im = ax.imshow(grid, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    for i in range(len(models)):
        for j in range(len(cols)):
            v = grid[i, j]
            ax.text(j, i, "n/a" if math.isnan(v) else f"{v:.1f}", ha="center", va="center", fontsize=8,
                    color="white" if not math.isnan(v) and v < 55 else "black")
    ax.set_xticks(range(len(cols)), [c[0] for c in cols], fontsize=7)
    ax.set_yticks(range(len(models)), [label(m) for m in models], fontsize=8)
    ft = len([c for c in cols if c[2] != col.held_out or not col.held_out])
    if col.held_out and 0 < ft < len(cols):
        ax.axvline(ft - 0.5, color="white", linewidth=3)
    fig.colorbar(im, ax=ax, label="accuracy (%)", fraction=0.03)
    ax.set_title("Accuracy (%): clean and worst case per attack family; fine-tuning set | held-out average", fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def save_accuracy_figure(col: Collection, dataset: str, path: str | Path) -> None:
    """Grouped bars with 95% Wilson error bars: each model clean and under the headline attacks."""
    evs = [col.get(m, dataset) for m in col.models if col.get(m, dataset)]
    attacks = [a for a in HEADLINE if any(e.acc(a) is not None for e in evs)]
    attacks += [worst_name(f) for f in col.families() if any(e.acc(worst_name(f)) is not None for e in evs)]
    width = 0.8 / max(len(evs), 1)
    fig, ax = plt.subplots(figsize=(max(7, 1.2 * len(attacks) + 2), 4))
    for i, e in enumerate(evs):
        xs = [j + i * width for j in range(len(attacks))]
        vals = [e.acc(a) or 0.0 for a in attacks]
        ci = [accuracy_interval(v, e.n) for v in vals]
        err = [[100 * max(v - lo, 0.0) for v, (lo, _) in zip(vals, ci)], [100 * max(hi - v, 0.0) for v, (_, hi) in zip(vals, ci)]]
        ax.bar(xs, [100 * v for v in vals], width, yerr=err, capsize=2, label=label(e.model))
    ax.set_xticks([j + width * (len(evs) - 1) / 2 for j in range(len(attacks))], attacks, fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"Zero-shot accuracy on {dataset} with 95% intervals, clean and under attack", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    _save(fig, path)


def save_sweep_figure(col: Collection, path: str | Path) -> None:
    """Robust accuracy against eps, one panel per dataset with a sweep, one line per model, chance level."""
    datasets = [d for d in col.datasets() if any(e.result.get("sweep") for e in col.evals if e.dataset == d)]
    fig, axes = plt.subplots(1, max(len(datasets), 1), figsize=(5.5 * max(len(datasets), 1), 4), squeeze=False)
    for ax, d in zip(axes[0], datasets):
        chance = None
        for e in (x for x in col.evals if x.dataset == d and x.result.get("sweep")):
            ax.plot([r["eps_255"] for r in e.result["sweep"]], [100 * r["acc"] for r in e.result["sweep"]],
                    marker="o", label=label(e.model))
            if e.result.get("classnames"):
                chance = 100 / len(e.result["classnames"])
        if chance is not None:
            ax.axhline(chance, color="gray", linestyle="--", linewidth=1, label="chance")
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xlim(left=0)
        ax.set_xlabel("L-inf eps (x/255)")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"Robust accuracy against eps: {d}", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)


def save_examples_figure(examples: dict[str, Any], classnames: list[str], path: str | Path, title: str = "") -> bool:
    """A grid: one row per attack that perturbs images (clean first), labels and predictions below.

    Returns False (and writes nothing) when no example carries images.
    """
    def eps_of(name: str) -> float:
        return float(name.removeprefix("sweep_eps").replace("p", "."))

    # The eps sweep would add a row per eps; its largest eps is enough to show what it does.
    sweep = sorted((n for n in examples if n.startswith("sweep_")), key=eps_of)
    order = [a for a in HEADLINE if a in examples]
    order += sorted(n for n in examples if n not in order and not n.startswith("sweep_")) + sweep[-1:]
    rows = [(n, examples[n]) for n in order if "images" in examples[n]]
    if not rows:
        return False
    n = max(len(ex["images"]) for _, ex in rows)
    fig, axes = plt.subplots(len(rows), n, figsize=(1.6 * n, 1.9 * len(rows)), squeeze=False)
    for r, (name, ex) in enumerate(rows):
        preds = ex.get("adv_pred", ex["clean_pred"])
        for c in range(n):
            ax = axes[r][c]
            ax.axis("off")
            if c >= len(ex["images"]):
                continue
            img = ex["images"][c].clamp(0, 1)
            pixels = (img[0] if img.shape[0] == 1 else img.permute(1, 2, 0)).float().numpy()
            ax.imshow(pixels, cmap="gray", vmin=0, vmax=1)
            ok = preds[c] == ex["label"][c]
            caption = classnames[preds[c]][:12] if ok else f"{classnames[preds[c]][:10]}\n(is {classnames[ex['label'][c]][:10]})"
            ax.set_title(caption, fontsize=7, color="green" if ok else "red")
        axes[r][0].text(-0.15, 0.5, name, transform=axes[r][0].transAxes, ha="right", va="center", fontsize=8)
    fig.suptitle(f"{title}: predicted class per attack (green = correct, red = wrong, true class in brackets)", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    _save(fig, path)
    return True
