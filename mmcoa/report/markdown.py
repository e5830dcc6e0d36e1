"""The report and README summary in markdown: tables per attack with intervals, retrieval, findings."""

from __future__ import annotations

import re

from mmcoa.stats import Z95, cluster_interval, wilson_score

from mmcoa.report.collection import Collection, HEADLINE, RETRIEVAL_COLUMNS, ReportError, label, worst_name
from mmcoa.report.compute import compute_markdown
from mmcoa.report.format import budget, cell, pct, runtime_text
from mmcoa.report.findings import (
    Comparison,
    compare,
    defense_verdicts,
    findings_markdown,
    holm_statement,
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
                "of its captions is in the top k; a text->image query when its own image is. The captions of "
                "one image are one cluster: text->image intervals are Wilson intervals at the design-effect "
                "sample size (at most the number of images where a result does not record which image "
                "owns each caption).", "",
                "| model | attack | " + " | ".join(c.replace("i2t_r", "I->T R@").replace("t2i_r", "T->I R@") for c in RETRIEVAL_COLUMNS) + " |",
                "|---|---|" + "---:|" * len(RETRIEVAL_COLUMNS)]
        for e in evs:
            for a in attacks:
                if any(e.acc(a, c) is not None for c in RETRIEVAL_COLUMNS):
                    out.append(f"| {label(e.model)} | {a} | " + " | ".join(recall_cell(e, a, c) for c in RETRIEVAL_COLUMNS) + " |")
        out += [""] + [f"- {a}: {budget(e0.threat(a))}" for a in attacks if a != "clean"] + [""]
    return (["## Retrieval", ""] + out) if out else []


def recall_cell(e, attack: str, column: str) -> str:
    """A recall with its 95% interval; caption queries clustered by the image they belong to."""
    v = e.acc(attack, column)
    if v is None or not column.startswith("t2i"):
        return cell(v, e.n_for(column))
    owners, key = e.clusters(column), f"{attack}.{column}"
    lo, hi = cluster_interval(e.correct[key], owners) if owners and key in e.correct else wilson_score(v, e.n, Z95)
    return f"{100 * v:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


TEXT_RULE = ("Class-name words are never edited: no word substitution and no character edit changes a word of "
             "the true class's name, and no class-name word is offered as a candidate, so an attacked prompt still "
             "names its class (an edit that does not is a label change, not an attack).")


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def text_rule_markdown(col: Collection) -> list[str]:
    """The text-attack rule in force, checked on every adversarial prompt the evaluations recorded."""
    checked, broken = 0, []
    for e in col.evals:
        names = e.result.get("classnames", [])
        for attack, ex in sorted(e.result.get("examples", {}).items()):
            for label_, prompt in zip(ex.get("label", []), ex.get("prompts", [])):
                if not 0 <= label_ < len(names):
                    continue
                checked += 1
                words = _words(prompt["adversarial"])
                if any(w not in words for w in _words(names[label_])):
                    broken.append(f"{label(e.model)}, {e.dataset}, {attack}: `{prompt['clean']}` -> `{prompt['adversarial']}`")
    out = ["## Text-attack rule", "", TEXT_RULE]
    if broken:
        out += ["", f"Broken in {len(broken)} of {checked} recorded adversarial prompts:", ""] + [f"- {b}" for b in broken]
    elif checked:
        out += ["", f"Checked on the {checked} adversarial prompts the evaluations recorded: each keeps its class name."]
    return out + [""]


# --- markdown --------------------------------------------------------------------------------


def render_markdown(col: Collection, figures: dict[str, str], notes: list[str] | None = None,
                    comparisons: list[Comparison] | None = None, timing: str | None = None) -> str:
    """The report: overview, per-attack tables, worst case, retrieval, training threat models and compute,
    checks, findings. ``timing``: the measured seconds' file as the report links it."""
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
    out += text_rule_markdown(col)
    out += training_markdown(col)
    out += compute_markdown(col, figures.get("compute"), timing)
    out += ["## Gradient-masking checks", ""]
    out += masking_markdown(col)
    if any(e.result.get("sweep") for e in col.evals) and "sweep" in figures:
        out += ["## Robust accuracy against eps", "", f"![eps sweep]({figures['sweep']})", ""]
    comparisons = compare(col) if comparisons is None else comparisons
    transfer = transfer_markdown(col, comparisons)
    if transfer:
        out += ["## Does robustness transfer?", "", *transfer]
    out += ["## Findings", ""]
    out += findings_markdown(comparisons) if comparisons else [
        "No paired per-sample outcomes were found, so no comparison is stated.", ""]
    skipped = unpaired(col)
    if skipped:
        out += [f"Not compared (never paired query by query): {'; '.join(skipped)}.", ""]
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


def render_summary(col: Collection, figure: str | None = None, report: str = "reports/report.md",
                   comparisons: list[Comparison] | None = None) -> str:
    """README's results: one headline table, the overview figure, one Holm-corrected findings paragraph
    (the same tests and correction as the report's) and a link to the report for everything else.

    ``figure`` and ``report``: their paths as the README links them.
    """
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
    ns = "; ".join(f"{d}: {e.n}" for d in col.datasets() for e in [next(x for x in col.evals if x.dataset == d)])
    threats = "; ".join(f"{a}: {budget(col.threat(a))}" for a in HEADLINE[1:] if col.threat(a))
    out.append(f"Accuracy (%); samples per dataset: {ns}. Held-out columns average {len(col.held_out)} held-out "
               f"zero-shot sets ({', '.join(col.held_out) or 'none'}); worst_<family> counts a sample as correct only "
               f"if it survives every attack of the family." + (f" Threat models: {threats}." if threats else ""))
    out.append("")
    if figure:
        out += [f"![overview]({figure})", ""]
    comparisons = compare(col) if comparisons is None else comparisons
    if comparisons:
        verdicts = defense_verdicts(comparisons)
        out += [holm_statement(comparisons) + (" Against the base: " + " ".join(verdicts) if verdicts else ""), ""]
    out.append(f"Every attack with 95% intervals, retrieval, the threat models each defense trained on, the "
               f"gradient-masking checks and every paired test: [{report}]({report}).")
    return "\n".join(out)


MARK_START, MARK_END = "<!-- results:start -->", "<!-- results:end -->"


def splice_summary(readme_text: str, summary: str) -> str:
    """README text with everything between the results markers replaced by ``summary``."""
    start, end = readme_text.find(MARK_START), readme_text.find(MARK_END)
    if start < 0 or end < 0 or end < start:
        raise ReportError(f"README has no '{MARK_START}' ... '{MARK_END}' block; add both markers, in that order, "
                          "where the results belong")
    return readme_text[: start + len(MARK_START)] + "\n" + summary.strip() + "\n" + readme_text[end:]
