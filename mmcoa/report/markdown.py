"""The report and README summary in markdown: tables per attack with intervals, retrieval, findings."""

from __future__ import annotations


from mmcoa.report.collection import Collection, HEADLINE, RETRIEVAL_COLUMNS, ReportError, label, worst_name
from mmcoa.report.format import budget, cell, p_text, pct, runtime_text
from mmcoa.report.findings import (
    Comparison,
    compare,
    findings_markdown,
    masking_markdown,
    training_markdown,
    transfer_markdown,
    unpaired,
)


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
            cells.append("n/a" if e is None else cell(e.acc(attack), e.n))
        if avg:
            mean = col.heldout_mean(model, attack)
            cells.append("n/a" if mean is None else f"{pct(mean[0])} [{pct(mean[1][0])}, {pct(mean[1][1])}]")
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
                    out.append(f"| {label(e.model)} | {a} | " + " | ".join(cell(e.acc(a, c), e.n_for(c)) for c in RETRIEVAL_COLUMNS) + " |")
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
    out += _runtime_lines(col)
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
    comparisons = compare(col)
    transfer = transfer_markdown(col, comparisons)
    if transfer:
        out += ["## Does robustness transfer?", "", *transfer]
    out += ["## Findings", ""]
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


def _runtime_lines(col: Collection) -> list[str]:
    runtimes = col.runtimes()
    if not runtimes:
        return []
    return [f"Computed with {'; '.join(runtime_text(r) for r in runtimes)}. The same runtime reproduces every number "
            "exactly; another CPU type, thread count or torch build changes the last bits of float results, which can "
            "flip a few borderline samples.", ""]


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
        cells = [pct(col.get(m, d).acc(a)) if col.get(m, d) else "n/a" for d, a in cols]
        cells += [pct((col.heldout_mean(m, a) or (None,))[0]) for a in held]
        out.append(f"| {label(m)} | " + " | ".join(cells) + " |")
    out.append("")
    ns = "; ".join(f"{d}: {e.n} samples" for d in col.datasets() for e in [next(x for x in col.evals if x.dataset == d)])
    out.append(f"Accuracy (%). Samples per dataset: {ns}. Held-out columns average {len(col.held_out)} held-out "
               f"zero-shot sets ({', '.join(col.held_out) or 'none'}); worst_<family> counts a sample as correct only "
               "if it survives every attack of the family.")
    out += ["", "Threat models: " + "; ".join(f"{a}: {budget(col.threat(a))}" for a in HEADLINE[1:] if col.threat(a)) + ".", ""]
    out += _runtime_lines(col)
    out += retrieval_summary(col)
    comparisons = compare(col)
    transfer = transfer_markdown(col, comparisons)
    if transfer:
        out += ["Does robustness transfer beyond the fine-tuning set, and at what clean cost? " + transfer[0], *transfer[1:]]
    out += reference_findings(comparisons, reference)
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
            cells = [f"{pct(e.acc(a, 'i2t_r1'))} / {pct(e.acc(a, 't2i_r1'))}" for a in attacks]
            out.append(f"| {label(e.model)} | " + " | ".join(cells) + " |")
        out.append("")
    return out


def reference_findings(comparisons: list[Comparison], reference: str) -> list[str]:
    """One line per (scope, attack): where ``reference`` is significantly above or below each other model."""
    groups: dict[tuple[str, str], list[Comparison]] = {}
    for c in comparisons:
        if reference in (c.a, c.b):
            groups.setdefault((c.scope, c.attack), []).append(c)
    if not groups:
        return []
    out = [f"Findings for {label(reference)} (exact McNemar test on the same samples, p < 0.05):", ""]
    for (scope, attack), cs in groups.items():
        parts = []
        for c in (c for c in cs if c.significant):
            other, d = (c.b, c.diff) if c.a == reference else (c.a, -c.diff)
            parts.append(f"{'>' if d > 0 else '<'} {label(other)} ({100 * d:+.1f} points, p = {p_text(c.p)})")
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
