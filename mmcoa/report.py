"""Turn evaluation results into a markdown report, flat metrics and figures.

Input is a list of per-model result dicts (as written by the evaluate stage: ``model``, ``dataset``,
``metrics`` keyed ``<dataset>.<attack>.acc``, ``threat_models``, ``sweep``, ``examples``...).
Nothing here reads pipeline files or knows about the terminal.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HEADLINE = ("clean", "image", "text", "multimodal")
MODEL_ORDER = ("base", "clean", "tecoa", "pmg_aft", "fare", "mmcoa")
LABELS = {"base": "base (no defense)", "clean": "clean fine-tune", "tecoa": "TeCoA", "pmg_aft": "PMG-AFT",
          "fare": "FARE", "mmcoa": "MMCoA"}


def order_models(results: list[dict]) -> list[dict]:
    rank = {m: i for i, m in enumerate(MODEL_ORDER)}
    return sorted(results, key=lambda r: (rank.get(r["model"], len(rank)), r["model"]))


def flat_metrics(results: list[dict]) -> dict[str, float]:
    """``<model>.<dataset>.<attack>.acc`` -> value, sorted: the DVC metrics file."""
    out = {f"{r['model']}.{k}": v for r in results for k, v in r["metrics"].items()}
    return dict(sorted(out.items()))


def attack_names(results: list[dict]) -> list[str]:
    """Attack names in suite order (clean first, the headline four next, sweep entries last)."""
    seen: list[str] = []
    for r in results:
        for key in r["metrics"]:
            name = key.split(".")[-2]
            if name not in seen:
                seen.append(name)
    head = [a for a in HEADLINE if a in seen]
    rest = sorted(a for a in seen if a not in head and not a.startswith("sweep_") and a != "linear_probe")
    return head + rest + (["linear_probe"] if "linear_probe" in seen else [])


def acc(result: dict, attack: str) -> float | None:
    return result["metrics"].get(f"{result['dataset']}.{attack}.acc")


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}"


def budget(threat: dict) -> str:
    """A one-line threat model: side, norm, eps, steps, word budget, candidate source."""
    if threat.get("attack") == "none":
        return "no attack"
    if threat.get("side") == "both":
        return f"{threat.get('mode')}: image [{budget(threat['image'])}] + text [{budget(threat['text'])}]"
    parts = [threat["attack"]]
    if threat.get("side") == "image":
        if threat.get("norm", "linf") == "linf":
            parts.append(f"L-inf eps {threat.get('eps_255'):g}/255")
        else:
            parts.append(f"L2 eps {threat.get('eps')}")
        for key in ("steps", "iterations", "n_iter", "restarts", "n_targets", "step_255"):
            if threat.get(key) is not None:
                parts.append(f"{key} {threat[key]}")
    else:
        for key in ("word_budget", "char_budget", "candidates", "k", "cos_threshold"):
            if threat.get(key) is not None:
                parts.append(f"{key} {threat[key]}")
    return ", ".join(str(p) for p in parts)


# --- figures ---------------------------------------------------------------------------------


def save_examples_figure(examples: dict[str, Any], classnames: list[str], path: str | Path, title: str = "") -> None:
    """A grid: one row per attack that perturbs images (clean first), labels and predictions below."""
    # The eps sweep would add a row per eps; its largest eps is enough to show what it does.
    def eps_of(name: str) -> float:
        return float(name.removeprefix("sweep_eps").replace("p", "."))

    sweep = sorted((n for n in examples if n.startswith("sweep_")), key=eps_of)
    order = [a for a in HEADLINE if a in examples]
    order += sorted(n for n in examples if n not in order and not n.startswith("sweep_")) + sweep[-1:]
    rows = [(n, examples[n]) for n in order if "images" in examples[n]]
    if not rows:
        return
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
            ax.imshow(img[0] if img.shape[0] == 1 else img.permute(1, 2, 0), cmap="gray", vmin=0, vmax=1)
            ok = preds[c] == ex["label"][c]
            caption = classnames[preds[c]][:12] if ok else f"{classnames[preds[c]][:10]}\n(is {classnames[ex['label'][c]][:10]})"
            ax.set_title(caption, fontsize=7, color="green" if ok else "red")
        axes[r][0].text(-0.15, 0.5, name, transform=axes[r][0].transAxes, ha="right", va="center", fontsize=8)
    fig.suptitle(f"{title}: predicted class per attack (green = correct, red = wrong, true class in brackets)", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)


def save_sweep_figure(results: list[dict], path: str | Path) -> None:
    """Robust accuracy against eps, one line per model, with chance level."""
    fig, ax = plt.subplots(figsize=(6, 4))
    chance = None
    for r in order_models(results):
        if not r.get("sweep"):
            continue
        xs = [row["eps_255"] for row in r["sweep"]]
        ys = [100 * row["acc"] for row in r["sweep"]]
        ax.plot(xs, ys, marker="o", label=LABELS.get(r["model"], r["model"]))
        chance = 100 / len(r["classnames"])
    if chance is not None:
        ax.axhline(chance, color="gray", linestyle="--", linewidth=1, label="chance")
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlim(left=0)
    ax.set_xlabel("L-inf eps (x/255)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Robust accuracy against eps")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)


def save_accuracy_figure(results: list[dict], path: str | Path) -> None:
    """Grouped bars: each model's accuracy clean and under the three attack types."""
    models = order_models(results)
    attacks = [a for a in HEADLINE if any(acc(r, a) is not None for r in models)]
    width = 0.8 / max(len(models), 1)
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, r in enumerate(models):
        xs = [j + i * width for j in range(len(attacks))]
        ax.bar(xs, [100 * (acc(r, a) or 0) for a in attacks], width, label=LABELS.get(r["model"], r["model"]))
    ax.set_xticks([j + width * (len(models) - 1) / 2 for j in range(len(attacks))], attacks)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Zero-shot accuracy, clean and under attack")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)


# --- markdown --------------------------------------------------------------------------------


def findings(results: list[dict]) -> list[str]:
    """Plain statements read off the numbers (no claim is made that the numbers do not support)."""
    by = {r["model"]: r for r in results}
    base = by.get("base")
    lines: list[str] = []
    if base is None:
        return lines
    for attack in ("image", "text", "multimodal"):
        if acc(base, attack) is None:
            continue
        drop = acc(base, "clean") - acc(base, attack)
        lines.append(f"Base model under the {attack} attack: {_fmt(acc(base, attack))}% "
                     f"({-100 * drop:+.1f} points from clean {_fmt(acc(base, 'clean'))}%).")
    for name, r in by.items():
        if name == "base":
            continue
        gains = []
        for attack in ("image", "text", "multimodal"):
            a, b = acc(r, attack), acc(base, attack)
            if a is not None and b is not None:
                gains.append(f"{attack} {100 * (a - b):+.1f}")
        cost = 100 * ((acc(r, "clean") or 0) - (acc(base, "clean") or 0))
        lines.append(f"{LABELS.get(name, name)} vs base: {', '.join(gains)} points under attack; clean {cost:+.1f} points.")
    if "mmcoa" in by:
        m = by["mmcoa"]
        others = [r for n, r in by.items() if n not in ("base", "mmcoa")]
        for attack in ("image", "text", "multimodal"):
            if acc(m, attack) is None or not others:
                continue
            best = max(others, key=lambda r: acc(r, attack) or 0)
            verdict = "highest" if acc(m, attack) >= (acc(best, attack) or 0) else f"below {LABELS.get(best['model'], best['model'])}"
            lines.append(f"Under the {attack} attack MMCoA scores {_fmt(acc(m, attack))}%: {verdict} "
                         f"among the fine-tuned models (best other: {_fmt(acc(best, attack))}%).")
    return lines


def render_markdown(results: list[dict], figures: dict[str, str], notes: list[str] | None = None) -> str:
    """The report: main table, threat models, eps sweep and its checks, examples, findings."""
    results = order_models(results)
    attacks = attack_names(results)
    first = results[0]
    out = [f"# Robustness report: {first['dataset']}", ""]
    out += [f"Zero-shot top-1 accuracy (%) on the same {first['n']} test samples for every column; "
            f"class prompts from the template `{first['template']}`.", ""]
    out += ["| model | " + " | ".join(attacks) + " |", "|---|" + "---:|" * len(attacks)]
    for r in results:
        out.append(f"| {LABELS.get(r['model'], r['model'])} | " + " | ".join(_fmt(acc(r, a)) for a in attacks) + " |")
    out += ["", "## Threat models", "", "| attack | budget |", "|---|---|"]
    for a in attacks:
        tm = first["threat_models"].get(a)
        if tm is not None:
            out.append(f"| {a} | {budget(tm)} |")
    out += ["", "Text attacks use the per-sample threat model: the adversary edits the prompt of each "
            "sample's true class. Class-name words are never substituted by word attacks, nor offered as "
            "candidates, so a substitution cannot turn a prompt into another label.", ""]
    if "accuracy" in figures:
        out += [f"![accuracy]({figures['accuracy']})", ""]
    if any(r.get("sweep") for r in results):
        out += ["## Robust accuracy against eps", "", f"![eps sweep]({figures.get('sweep', '')})", ""]
        eps = [row["eps_255"] for row in next(r for r in results if r.get("sweep"))["sweep"]]
        out += ["| model | " + " | ".join(f"{e:g}/255" for e in eps) + " |", "|---|" + "---:|" * len(eps)]
        for r in results:
            if r.get("sweep"):
                out.append(f"| {LABELS.get(r['model'], r['model'])} | " + " | ".join(_fmt(row["acc"]) for row in r["sweep"]) + " |")
        out.append("")
        flagged = [(r["model"], f) for r in results for f in r.get("gradient_masking_flags", [])]
        if flagged:
            out += ["**Possible gradient masking** (accuracy must not rise with eps, and must reach chance at large eps):", ""]
            out += [f"- {LABELS.get(m, m)}: {f}" for m, f in flagged]
        else:
            out.append("Checks passed for every model: accuracy never rises with eps, and reaches chance at the largest eps.")
        out.append("")
    out += ["## Findings", ""] + [f"- {line}" for line in findings(results)] + [""]
    out += ["## Adversarial prompts", ""]
    for r in results:
        for name, ex in r.get("examples", {}).items():
            changed = [p for p in ex.get("prompts", []) if p["clean"] != p["adversarial"]]
            if changed:
                out.append(f"- {LABELS.get(r['model'], r['model'])}, {name}: " + "; ".join(
                    f"`{p['clean']}` -> `{p['adversarial']}`" for p in changed[:3]))
    out.append("")
    examples = [(m, path) for m, path in figures.items() if m.startswith("examples:")]
    if examples:
        out += ["## Adversarial images", ""]
        for key, path in examples:
            out += [f"![{key}]({path})", ""]
    if notes:
        out += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(out)
