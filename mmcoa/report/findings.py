"""What the report states: paired comparisons behind every finding (exact McNemar on samples, an exact
image-level sign-flip test on an image's captions), one Holm correction over all of them, the threat
models each defense trained on, and gradient-masking flags."""

from __future__ import annotations

from dataclasses import dataclass, replace
from itertools import combinations
from pathlib import PurePath

import numpy as np

from mmcoa.stats import cluster_paired_test, holm, paired_test
from mmcoa.report.collection import ALPHA, BLACK_BOX, Collection, HEADLINE, label
from mmcoa.report.format import p_text, pct, budget


MCNEMAR = "exact McNemar"
SIGN_FLIP = "exact image-level sign-flip"


@dataclass(frozen=True)
class Comparison:
    """Model ``a`` vs model ``b`` under one attack, paired on the same samples of one scope.

    ``significant``: rejected by Holm's correction over every comparison of the report (set by
    :func:`compare`), the one criterion every finding, star and sentence uses. ``clusters``: the
    images behind caption queries (tested at image level), None for independent samples.
    """

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
    test: str = MCNEMAR
    clusters: int | None = None
    significant: bool = False

    @property
    def samples(self) -> str:
        """``400 samples``, or ``200 captions of 40 images`` for an image-level test."""
        return f"{self.n} samples" if self.clusters is None else f"{self.n} captions of {self.clusters} images"


def _paired_vectors(col: Collection, a: str, b: str, key: str, datasets: list[str]):
    """Outcomes of two models concatenated over ``datasets`` with their cluster labels (None for
    independent samples); None unless every set is paired sample by sample (the same recorded indices)."""
    va, vb, clusters = [], [], []
    for i, d in enumerate(datasets):
        ea, eb = col.get(a, d), col.get(b, d)
        if ea is None or eb is None or key not in ea.correct or key not in eb.correct:
            return None
        if ea.pairing is None or ea.pairing != eb.pairing or len(ea.correct[key]) != len(eb.correct[key]):
            return None
        va.append(ea.correct[key])
        vb.append(eb.correct[key])
        owners = ea.clusters(key.rpartition(".")[2])
        clusters.append(None if owners is None else [(i, o) for o in owners])
    if any(c is None for c in clusters):
        return np.concatenate(va), np.concatenate(vb), None
    labels = {pair: j for j, pair in enumerate(dict.fromkeys(p for c in clusters for p in c))}
    return np.concatenate(va), np.concatenate(vb), np.array([labels[p] for c in clusters for p in c])


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
    """Paired tests for every pair of models, headline attack and scope, with Holm's correction over all.

    Classification: exact McNemar per scope (fine-tuning set, pooled held-out sets). Retrieval: per
    dataset, on the per-query R@1 outcomes in both directions; text->image queries are an image's
    captions, so they are tested by an exact sign-flip test of per-image differences. The family of
    Holm's correction is every comparison returned: the report and the README state the same findings.
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
            va, vb, clusters = vecs
            t = paired_test(va, vb) if clusters is None else cluster_paired_test(va, vb, clusters)
            threat = budget(col.get(a, datasets[0]).threat(attack))
            out.append(Comparison(a, b, name, scope, float(va.mean()), float(vb.mean()), t.diff, t.p, len(va),
                                  t.n01, t.n10, threat, MCNEMAR if clusters is None else SIGN_FLIP,
                                  None if clusters is None else len(set(clusters.tolist()))))
    rejected = holm([c.p for c in out], ALPHA)
    return [replace(c, significant=ok) for c, ok in zip(out, rejected)]


def unpaired(col: Collection) -> list[str]:
    """Pairs of evaluations on one dataset that are never compared: other samples, other galleries, or
    a retrieval result that records no gallery indices."""
    out = []
    for task in ("classification", "retrieval"):
        for d in col.datasets(task):
            evs = [e for e in col.evals if e.dataset == d and e.correct]
            for a, b in combinations(evs, 2):
                if a.pairing is None or b.pairing is None:
                    out.append(f"{label(a.model)} vs {label(b.model)} on {d} (no gallery indices recorded; rerun "
                               "`mmcoa evaluate`)")
                elif a.pairing != b.pairing:
                    what = "samples" if task == "classification" else "galleries"
                    out.append(f"{label(a.model)} vs {label(b.model)} on {d} (different {what})")
    return out


def holm_statement(comparisons: list[Comparison]) -> str:
    """The one sentence that says how findings are decided, wherever findings are stated."""
    k = sum(c.significant for c in comparisons)
    return (f"{len(comparisons)} paired comparisons on the same samples (exact McNemar; text->image retrieval by an "
            f"exact image-level sign-flip test, an image's captions being one cluster), two-sided; a difference is "
            f"a finding only where Holm's correction over all {len(comparisons)} rejects at family-wise 5%: "
            f"{k} do.")


def finding(c: Comparison) -> str:
    """One sentence with its evidence: direction, size, p, samples, threat model, Holm's verdict."""
    hi, lo = (c.a, c.b) if c.diff > 0 else (c.b, c.a)
    acc_hi, acc_lo = (c.acc_a, c.acc_b) if c.diff > 0 else (c.acc_b, c.acc_a)
    tail = "" if c.significant else " (not significant after Holm's correction)"
    return (f"{label(hi)} > {label(lo)} under {c.attack} on {c.scope}: {100 * abs(c.diff):+.1f} points "
            f"({pct(acc_hi)}% vs {pct(acc_lo)}%), p = {p_text(c.p)} ({c.test}), {c.samples} "
            f"({max(c.n01, c.n10)} vs {min(c.n01, c.n10)} discordant), threat model: {c.threat}{tail}")


def _short(c: Comparison) -> str:
    """A finding inside its (scope, attack) group, whose heading names samples and threat model."""
    hi, lo = (c.a, c.b) if c.diff > 0 else (c.b, c.a)
    acc_hi, acc_lo = (c.acc_a, c.acc_b) if c.diff > 0 else (c.acc_b, c.acc_a)
    return (f"{label(hi)} > {label(lo)}: {100 * abs(c.diff):+.1f} points ({pct(acc_hi)}% vs {pct(acc_lo)}%), "
            f"p = {p_text(c.p)} ({max(c.n01, c.n10)} vs {min(c.n01, c.n10)} discordant)")


def no_difference(c: Comparison) -> str:
    return f"{label(c.a)} vs {label(c.b)} ({100 * c.diff:+.1f} points, p = {p_text(c.p)})"


def findings_markdown(comparisons: list[Comparison]) -> list[str]:
    """Findings grouped by scope and attack; pairs Holm does not reject summarised in one sentence per group."""
    out = [holm_statement(comparisons) + " The held-out scope pools the samples of every held-out set "
           "(differences are of pooled accuracy).", ""]
    groups: dict[tuple[str, str], list[Comparison]] = {}
    for c in comparisons:
        groups.setdefault((c.scope, c.attack), []).append(c)
    for (scope, attack), items in groups.items():
        c0 = items[0]
        out += [f"**{attack} on {scope}** ({c0.samples}; {c0.test} test; threat model: {c0.threat}):", ""]
        out += [f"- {_short(c)}" for c in items if c.significant]
        same = [no_difference(c) for c in items if not c.significant]
        if same:
            out.append(f"- Not distinguishable after Holm's correction: {'; '.join(same)}.")
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


def self_transfer(e, attack: str) -> bool:
    """Whether a transfer attack of an evaluation crafted on the evaluated model itself (then it is
    white-box, not a check). The evaluation records it (``source_is_target``, by weights digest); an
    older result is judged by its source folder's name."""
    t = e.threat(attack) or {}
    if t.get("attack") != "transfer":
        return False
    if "source_is_target" in t:
        return bool(t["source_is_target"])
    return PurePath(str(t.get("source", ""))).name == e.model


def _black_box(e, attacks) -> list[str]:
    """The attacks of a list that are black-box checks of ``e``: Square, or transfer from another model."""
    return [a for a in attacks if (e.threat(a) or {}).get("attack") in BLACK_BOX and not self_transfer(e, a)]


def masking_flags(col: Collection) -> list[str]:
    """White-box robust accuracy above a black-box attack (Square, transfer from another model) of the
    same family, plus sweep flags."""
    out = []
    for e in col.evals:
        if e.task != "classification":
            continue
        for family, attacks in e.families.items():
            black = [a for a in _black_box(e, attacks) if e.acc(a) is not None]
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
    """The flags, or which checks ran and passed (a check that could not run is said so); a transfer
    attack from the evaluated model itself is named as no check and not counted."""
    flags = masking_flags(col)
    cls = [e for e in col.evals if e.task == "classification"]
    selfs = [f"{a} on {label(e.model)}, {e.dataset}" for e in cls for a in e.threat_models_names() if self_transfer(e, a)]
    note = ([f"Not a check: {'; '.join(selfs)} (the transfer source is the evaluated model itself, so its images "
             "are white-box adversarial examples; left out of the count)."] if selfs else [])
    if flags:
        return [f"- {f}" for f in flags] + [""] + ([note[0], ""] if note else [])
    black = sum(any(_black_box(e, attacks) for attacks in e.families.values()) for e in cls)
    sweeps = sum(bool(e.result.get("sweep")) for e in cls)
    out = [f"No flag. White-box vs black-box (Square, transfer from another model) in the same family: checked in "
           f"{black} of {len(cls)} evaluations{'' if black else ' (no black-box attack in the suite)'}. Eps sweep "
           f"(accuracy must not rise with eps and must reach chance): checked in {sweeps} of {len(cls)} evaluations.",
           ""]
    return out + ([note[0], ""] if note else [])


# --- does robustness transfer? ----------------------------------------------------------------


def _delta(c: Comparison | None) -> str:
    """A difference against the base in points, starred where Holm's correction rejects."""
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


def _against_base(comparisons: list[Comparison]) -> dict[tuple[str, str, str], Comparison]:
    """(defense, row, attack) -> its comparison against the base."""
    cells: dict[tuple[str, str, str], Comparison] = {}
    for c in comparisons:
        if c.b == "base":
            row, attack = _row_and_attack(c)
            cells[(c.a, row, attack)] = c
    return cells


def defense_verdicts(comparisons: list[Comparison]) -> list[str]:
    """One generated sentence per defense: where it is above or below the base (Holm-corrected)."""
    cells = _against_base(comparisons)
    rows = list(dict.fromkeys(r for _, r, _ in cells))
    out = []
    for m in dict.fromkeys(m for m, _, _ in cells):
        verdicts = [_verdict([c for (mm, rr, _), c in cells.items() if mm == m and rr == r], r) for r in rows
                    if any(mm == m and rr == r for mm, rr, _ in cells)]
        out.append(f"{label(m)}: " + "; ".join(verdicts) + ".")
    return out


def transfer_markdown(col: Collection, comparisons: list[Comparison] | None = None) -> list[str]:
    """The paper's question per defense: does the robustness gained on the fine-tuning set carry over to
    the held-out sets and to retrieval, and at what clean cost? Differences against the base (points,
    paired on the same samples; * where Holm's correction over the report's tests rejects), then one
    generated sentence each."""
    comparisons = compare(col) if comparisons is None else comparisons
    cells = _against_base(comparisons)
    if not cells:
        return []
    defenses = list(dict.fromkeys(m for m, _, _ in cells))
    rows = list(dict.fromkeys(r for _, r, _ in cells))
    attacks = [a for a in HEADLINE if any(a == k[2] for k in cells)]
    role = {d: " (fine-tuning)" for d in col.finetune}
    out = ["Difference against the base in points, on the same samples (* where significant after Holm's "
           "correction over all the report's paired tests); retrieval in R@1 per direction.", "",
           "| defense | set | " + " | ".join(attacks) + " |", "|---|---|" + "---:|" * len(attacks)]
    for m in defenses:
        for r in rows:
            out.append(f"| {label(m)} | {r}{role.get(r, '')} | "
                       + " | ".join(_delta(cells.get((m, r, a))) for a in attacks) + " |")
    return out + [""] + [f"- {v}" for v in defense_verdicts(comparisons)] + [""]
