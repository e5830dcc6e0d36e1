"""What the report states: paired comparisons (exact McNemar, Holm) behind every finding, the threat
models each defense trained on, and gradient-masking flags."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

import numpy as np

from mmcoa.stats import holm, paired_test
from mmcoa.report.collection import ALPHA, BLACK_BOX, Collection, HEADLINE, label
from mmcoa.report.format import p_text, pct, budget


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
            f"({pct(acc_hi)}% vs {pct(acc_lo)}%), p = {p_text(c.p)}, {c.n} samples "
            f"({max(c.n01, c.n10)} vs {min(c.n01, c.n10)} discordant), threat model: {c.threat}{tail}")


def _short(c: Comparison, holm_ok: bool) -> str:
    """A finding inside its (scope, attack) group, whose heading names samples and threat model."""
    hi, lo = (c.a, c.b) if c.diff > 0 else (c.b, c.a)
    acc_hi, acc_lo = (c.acc_a, c.acc_b) if c.diff > 0 else (c.acc_b, c.acc_a)
    tail = "" if holm_ok else " (not significant after Holm's correction)"
    return (f"{label(hi)} > {label(lo)}: {100 * abs(c.diff):+.1f} points ({pct(acc_hi)}% vs {pct(acc_lo)}%), "
            f"p = {p_text(c.p)} ({max(c.n01, c.n10)} vs {min(c.n01, c.n10)} discordant){tail}")


def no_difference(c: Comparison) -> str:
    return f"{label(c.a)} vs {label(c.b)} ({100 * c.diff:+.1f} points, p = {p_text(c.p)})"


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
                        out.append(f"{label(e.model)} on {e.dataset}: white-box {w} {pct(e.acc(w))}% is above "
                                   f"black-box {b} ({e.threat(b)['attack']}) {pct(e.acc(b))}% in the {family} family; "
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


# --- does robustness transfer? ----------------------------------------------------------------


def _delta(c: Comparison | None) -> str:
    """A difference against the base in points, starred where McNemar holds at 5%."""
    if c is None:
        return "n/a"
    return f"{100 * c.diff:+.1f}{'*' if c.significant else ''}"


def _verdict(cs: list[Comparison], scope: str) -> str:
    """What the significant differences of one scope say, attack by attack."""
    up = [c.attack.split(" (")[0] for c in cs if c.significant and c.diff > 0]
    down = [c.attack.split(" (")[0] for c in cs if c.significant and c.diff < 0]
    parts = ([f"above the base under {', '.join(up)}"] if up else []) + ([f"below it under {', '.join(down)}"] if down else [])
    return f"on {scope} " + (" and ".join(parts) if parts else "not distinguishable from the base")


def _row_and_attack(c: Comparison) -> tuple[str, str]:
    """("fmnist_pairs I->T R@1", "image") for a retrieval comparison, ("digits", "image") otherwise."""
    attack, _, direction = c.attack.partition(" (")
    return (f"{c.scope} {direction.rstrip(')')}" if direction else c.scope), attack


def transfer_markdown(col: Collection, comparisons: list[Comparison] | None = None) -> list[str]:
    """The paper's question per defense: does the robustness gained on the fine-tuning set carry over to
    the held-out sets and to retrieval, and at what clean cost? Differences against the base (points,
    paired on the same samples; * where exact McNemar holds at 5%), then one generated sentence each."""
    comparisons = compare(col) if comparisons is None else comparisons
    cells: dict[tuple[str, str, str], Comparison] = {}
    for c in comparisons:
        if c.b == "base":
            row, attack = _row_and_attack(c)
            cells[(c.a, row, attack)] = c
    defenses = list(dict.fromkeys(m for m, _, _ in cells))
    rows = list(dict.fromkeys(r for _, r, _ in cells))
    attacks = [a for a in HEADLINE if any(a == k[2] for k in cells)]
    if not cells:
        return []
    role = {d: " (fine-tuning)" for d in col.finetune}
    out = ["Difference against the base in points, on the same samples (* where an exact McNemar test holds "
           "at 5%); retrieval in R@1 per direction.", "",
           "| defense | set | " + " | ".join(attacks) + " |", "|---|---|" + "---:|" * len(attacks)]
    for m in defenses:
        for r in rows:
            out.append(f"| {label(m)} | {r}{role.get(r, '')} | "
                       + " | ".join(_delta(cells.get((m, r, a))) for a in attacks) + " |")
    out.append("")
    for m in defenses:
        verdicts = [_verdict([c for (mm, rr, _), c in cells.items() if mm == m and rr == r], r) for r in rows]
        out.append(f"- {label(m)}: " + "; ".join(verdicts) + ".")
    return out + [""]
