"""How numbers, intervals, p-values and threat models are written in the report."""

from __future__ import annotations


from mmcoa.stats import accuracy_interval


def pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}"


def cell(v: float | None, n: int) -> str:
    if v is None:
        return "n/a"
    lo, hi = accuracy_interval(v, n)
    return f"{100 * v:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def p_text(p: float) -> str:
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


def runtime_text(runtime: dict) -> str:
    """``torch 2.14.1 on cpu (AVX512 kernels, 2 threads)``, or ``... on cuda (NVIDIA A100)``."""
    where = runtime.get("gpu") or f"{runtime.get('cpu_kernels', '?')} kernels, {runtime.get('threads', '?')} threads"
    return f"torch {runtime.get('torch', '?')} on {runtime.get('device', '?')} ({where})"
