"""Evaluate a CLIP model's zero-shot accuracy, clean and under a suite of attacks.

Robust accuracy is measured on the same samples as clean accuracy; class-prompt embeddings are
computed once; every attack is seeded from (seed, attack name), so a rerun reproduces every number
and the order of the suite does not matter. With torchrun, samples are sharded across ranks and
the counts summed.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from mmcoa import distributed as dist
from mmcoa.attacks import Attack, create_attack
from mmcoa.attacks.multimodal import ZeroShotTask, run_zeroshot_attack
from mmcoa.data import PreparedDataset
from mmcoa.data.registry import stratified_indices
from mmcoa.models import ClipModel
from mmcoa.zeroshot import ZeroShotClassifier, build_prompts, class_embeddings


@dataclass
class SuiteResult:
    """Accuracies keyed ``<dataset>.<attack>.acc``, threat models, an eps sweep and examples."""

    metrics: dict[str, float]
    threat_models: dict[str, dict]
    sweep: list[dict] = field(default_factory=list)
    examples: dict[str, Any] = field(default_factory=dict)
    n: int = 0


def _seed_for(seed: int, name: str) -> int:
    return seed * 7919 + zlib.crc32(name.encode())


def sample_indices(n_total: int, n: int, labels: torch.Tensor, seed: int) -> torch.Tensor:
    """A class-balanced, seeded subset of the evaluation split (all of it when n >= its size)."""
    return torch.from_numpy(stratified_indices(labels.numpy(), n, seed))


def evaluate_suite(
    model: ClipModel,
    data: PreparedDataset,
    suite: list[tuple[str, Attack]],
    template: str | None = None,
    n_samples: int = 500,
    batch_size: int = 250,
    seed: int = 0,
    sweep: tuple[str, dict, list[float]] | None = None,
    n_examples: int = 6,
    on_progress: Callable[[str, int, int], None] | None = None,
    probe_train: PreparedDataset | None = None,
) -> SuiteResult:
    """Clean accuracy plus one accuracy per ``(name, attack)`` of ``suite``.

    ``sweep``: (attack name, its params, eps list in 1/255) re-run at each eps, recorded as
    ``<dataset>.sweep_eps<eps>.acc`` and checked for the signs of gradient masking.
    ``probe_train``: when given, also ``<dataset>.linear_probe.acc`` (clean, frozen features).
    """
    device = model.device
    template = template or data.templates[0]
    prompts = build_prompts(data.classnames, template)
    classifier = ZeroShotClassifier(model, class_embeddings(model, data.classnames, [template]))
    task = ZeroShotTask(classifier, prompts, set(data.classnames))

    chosen = sample_indices(len(data), n_samples, data.labels, seed)
    mine = chosen[dist.rank() :: dist.world_size()]
    runs: list[tuple[str, Attack | None]] = [("clean", None), *suite]
    if sweep is not None:
        name, params, eps_list = sweep
        runs += [(f"sweep_eps{_fmt(e)}", create_attack(name, **{**params, "eps_255": e})) for e in eps_list]

    correct = {name: 0 for name, _ in runs}
    examples: dict[str, Any] = {}
    batches = [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
    for name, attack in runs:
        torch.manual_seed(_seed_for(seed, name))
        for b, idx in enumerate(batches):
            images = data.float_images(idx).to(device)
            labels = data.labels[idx].to(device)
            if attack is None:
                with torch.no_grad():
                    ok = classifier(images).argmax(1) == labels
                result = None
            else:
                result = run_zeroshot_attack(attack, task, images, labels)
                ok = result.correct(labels)
            correct[name] += int(ok.sum())
            if b == 0 and n_examples and dist.is_main():
                examples[name] = _examples(task, images, labels, result, n_examples)
            if on_progress is not None:
                on_progress(name, b + 1, len(batches))

    counts = dist.all_reduce_sum(torch.tensor([correct[n] for n, _ in runs], dtype=torch.float64, device=device))
    total = len(chosen)
    metrics = {f"{data.name}.{n}.acc": round(float(c) / total, 6) for (n, _), c in zip(runs, counts.tolist())}
    threat = {n: (a.threat_model() if a is not None else {"attack": "none"}) for n, a in runs}
    if probe_train is not None and dist.is_main():
        metrics[f"{data.name}.linear_probe.acc"] = round(linear_probe_accuracy(model, probe_train, data, chosen, seed=seed), 6)
        threat["linear_probe"] = {"attack": "none", "probe": "logistic regression on frozen image features"}
    sweep_rows = []
    if sweep is not None:
        sweep_rows = [{"eps_255": 0.0, "acc": metrics[f"{data.name}.clean.acc"]}] + [
            {"eps_255": e, "acc": metrics[f"{data.name}.sweep_eps{_fmt(e)}.acc"]} for e in sweep[2]
        ]
    return SuiteResult(metrics, threat, sweep_rows, examples, total)


def _fmt(eps: float) -> str:
    return f"{eps:g}".replace(".", "p")


@torch.no_grad()
def _examples(task: ZeroShotTask, images, labels, result, n: int) -> dict:
    """Up to n examples of a batch: predictions, and the adversarial prompt/image where there is one."""
    clean_pred = task.classifier(images[:n]).argmax(1)
    out = {"label": labels[:n].tolist(), "clean_pred": clean_pred.tolist()}
    if result is None:
        out["images"] = images[:n].cpu()
        return out
    out["adv_pred"] = result.logits[:n].argmax(1).tolist()
    if result.texts is not None:
        before = task.texts_for(labels[:n])
        out["prompts"] = [{"clean": b, "adversarial": a} for b, a in zip(before, result.texts[:n])]
    if result.images is not images:
        out["images"] = result.images[:n].cpu()
    return out


@torch.no_grad()
def linear_probe_accuracy(
    model: ClipModel, train: PreparedDataset, test: PreparedDataset, test_idx: torch.Tensor,
    n_train: int = 2000, seed: int = 0, batch_size: int = 256,
) -> float:
    """Accuracy of a logistic-regression probe on frozen image features (a standard CLIP evaluation).

    The probe is fitted on a class-balanced subset of the train split and scored on ``test_idx``,
    the same samples as the zero-shot columns.
    """
    from sklearn.linear_model import LogisticRegression

    def feats(data: PreparedDataset, idx: torch.Tensor):
        out = [model.encode_image(data.float_images(idx[i : i + batch_size]).to(model.device)).cpu()
               for i in range(0, len(idx), batch_size)]
        return torch.cat(out).numpy()

    train_idx = sample_indices(len(train), n_train, train.labels, seed)
    probe = LogisticRegression(max_iter=2000, C=1.0)
    probe.fit(feats(train, train_idx), train.labels[train_idx].numpy())
    return float(probe.score(feats(test, test_idx), test.labels[test_idx].numpy()))


def gradient_masking_flags(sweep: list[dict], num_classes: int, n: int, slack: float = 0.05) -> list[str]:
    """Warnings when an eps sweep looks like gradient masking rather than robustness.

    Accuracy must not rise with eps (beyond one sample of noise), and at the largest eps of the
    sweep it must fall to at most chance + ``slack``.
    """
    flags = []
    tol = max(1.0 / max(n, 1), 0.005)
    for prev, cur in zip(sweep, sweep[1:]):
        if cur["acc"] > prev["acc"] + tol:
            flags.append(
                f"accuracy rises from {prev['acc']:.3f} at eps {prev['eps_255']:g}/255 to {cur['acc']:.3f} at {cur['eps_255']:g}/255"
            )
    if sweep:
        last, chance = sweep[-1], 1.0 / num_classes
        if last["acc"] > chance + slack:
            flags.append(
                f"accuracy {last['acc']:.3f} at eps {last['eps_255']:g}/255 stays above chance {chance:.3f} + {slack:.2f}"
            )
    return flags


def suite_from_specs(specs: list[dict]) -> list[tuple[str, Attack]]:
    """``[{name, attack, params}]`` -> ``[(name, Attack)]`` (validated by each attack's Params)."""
    return [(s["name"], create_attack(s["attack"], **s.get("params", {}))) for s in specs]
