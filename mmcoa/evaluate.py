"""Evaluate a CLIP model's zero-shot accuracy on one dataset, clean and under a suite of attacks.

Robust accuracy is measured on the same samples as clean accuracy (a sample is robust when it is
correct clean and under the attack), and every outcome is kept per sample, so the report can take the worst case per sample over a family of attacks, intervals and
paired tests without rerunning an attack. Samples stream through a DataLoader batch by batch (no
split is ever held whole); within a batch every attack runs, each seeded from (seed, attack, batch),
so a rerun reproduces every number. The worst case of a family is a cascade: attacks marked
``worst_only`` run only on the samples that every earlier attack of the family left correct
(AutoAttack's protocol): for a deterministic attack the worst case is then identical per sample to
running every attack on every sample; an attack with random starts draws them for the samples it is
given, so its draws (not their distribution) differ. With torchrun, samples are sharded across ranks and the outcomes gathered.
Each run's cost (passes of each tower counted at the model, wall seconds, samples: ``mmcoa.ledger``) is
recorded per suite entry and for the clean pass; counting changes no outcome.
"""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch

from mmcoa import distributed as dist
from mmcoa.attacks import Attack, AttackError, create_attack
from mmcoa.attacks.cascade import run_cascade
from mmcoa.attacks.multimodal import ZeroShotTask, run_zeroshot_attack
from mmcoa.attacks.transfer import Transfer, load_source
from mmcoa.data import stratified_indices
from mmcoa.ledger import CostMeter, measured
from mmcoa.models import ClipModel, ModelLoadError
from mmcoa.zeroshot import ZeroShotClassifier, class_embeddings

FAMILY_OF_SIDE = {"image": "image", "text": "text", "multimodal": "multimodal"}


class SuiteError(ValueError):
    """A suite whose families cannot be evaluated as one threat model each; the message names the fix."""


def budget_kind(threat: dict) -> str:
    """The kind of budget an attack's threat model bounds: the key every member of a family shares.

    ``norm-bounded``: an image perturbation inside an Lp ball (a transfer attack: that of the attack it
    crafts with); ``unbounded:<attack>``: an image change no norm bounds (typographic: written text);
    ``text``: prompt edits within a word or character budget, class names kept; ``multimodal``: both.
    """
    side = threat.get("side")
    if side == "image":
        bound = threat.get("crafted_with", threat)
        return "norm-bounded" if bound.get("norm") is not None else f"unbounded:{threat.get('attack')}"
    return {"both": "multimodal"}.get(side, str(side))


def default_family(attack: Attack) -> str:
    """The family an attack joins unless its suite entry names one: its side, or its own name when no
    norm bounds its image change (typographic), so it never joins the Lp image family."""
    kind = budget_kind(attack.threat_model())
    return attack.name if kind.startswith("unbounded:") else FAMILY_OF_SIDE.get(attack.kind, attack.kind)


@dataclass(frozen=True)
class SuiteEntry:
    """One attack of a suite: its metric name, the attack, its family and whether it has a column."""

    name: str
    attack: Attack
    family: str
    worst_only: bool = False


def suite_from_specs(specs: list[dict]) -> list[SuiteEntry]:
    """``[{name, attack, params, family?, worst_only?}]`` -> entries (validated by each attack's Params)."""
    out = []
    for s in specs:
        attack = create_attack(s["attack"], **s.get("params", {}))
        family = s.get("family") or default_family(attack)
        out.append(SuiteEntry(s["name"], attack, family, bool(s.get("worst_only", False))))  # other keys: the stage's
    check_families(out)
    return out


def check_families(suite: list[SuiteEntry]) -> None:
    """Every family is one threat model: its worst case and masking check compare like with like.

    Raises SuiteError naming the family, its members' budgets and the fix (a ``family`` of their own).
    """
    for family, entries in _group(suite).items():
        kinds = {e.name: budget_kind(e.attack.threat_model()) for e in entries}
        if len(set(kinds.values())) > 1:
            listed = ", ".join(f"{n} ({k})" for n, k in kinds.items())
            raise SuiteError(f"suite: family '{family}' mixes budget kinds {listed}; give the entries of another "
                             "kind a `family:` of their own")


def families(suite: list[SuiteEntry]) -> dict[str, list[str]]:
    """Family -> attack names in suite order (the cascade order)."""
    out: dict[str, list[str]] = {}
    for e in suite:
        out.setdefault(e.family, []).append(e.name)
    return out


@dataclass
class ClassificationResult:
    """Accuracies keyed ``<dataset>.<attack>.acc``, per-sample outcomes and what produced them.

    ``outcomes[name]``: bool [n] in the order of ``indices``: True where the sample is classified
    correctly clean and still under the attack (``clean``, every attack with a column, and
    ``worst_<family>``): robust implies clean-correct, as AutoAttack counts it.

    ``cost[name]``: what each run cost this process (:class:`mmcoa.ledger.CostMeter`), for ``clean``
    (the class prompts' encoding, once, and the clean pass over every sample) and every suite and
    sweep entry (a cascade entry: on the samples it was given); empty when not counted.
    """

    metrics: dict[str, float]
    outcomes: dict[str, torch.Tensor]
    indices: list[int]
    threat_models: dict[str, dict]
    families: dict[str, list[str]]
    sweep: list[dict] = field(default_factory=list)
    examples: dict[str, Any] = field(default_factory=dict)
    cost: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.indices)


def _seed_for(seed: int, name: str) -> int:
    return seed * 7919 + zlib.crc32(name.encode())


def sample_indices(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """A class-balanced, seeded subset of an evaluation split (all of it when n >= its size)."""
    return torch.from_numpy(stratified_indices(labels.numpy(), n, seed))


Batches = Callable[[list[list[int]]], Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]


def evaluate_classification(
    model: ClipModel,
    batches: Batches,
    indices: torch.Tensor,
    classnames: list[str],
    templates: list[str],
    suite: list[SuiteEntry],
    dataset_name: str,
    batch_size: int = 250,
    seed: int = 0,
    sweep: tuple[str, dict, list[float]] | None = None,
    n_examples: int = 6,
    on_progress: Callable[[int, int], None] | None = None,
    count_cost: bool = True,
) -> ClassificationResult:
    """Clean accuracy, one accuracy per suite entry with a column, and the worst case per family.

    ``batches(index_lists)`` yields ``(images in [0, 1], labels, indices)`` for each list (a streaming
    loader over the dataset). Class prompts are ``templates`` (their mean embedding, computed once);
    a text attack edits the true class's prompt of every template (class names protected), and the
    true class is scored with the ensemble of those edited prompts, as clean accuracy scores it.
    ``sweep``: (attack name, its params, eps list in 1/255) re-run at each eps, as
    ``sweep_eps<eps>`` entries, for the gradient-masking check. ``count_cost``: record each run's
    cost (``ClassificationResult.cost``).
    """
    meter = CostMeter(model.device, model) if count_cost else None
    try:
        with measured(meter, "clean", 0):
            classifier = ZeroShotClassifier(model, class_embeddings(model, classnames, templates))
            task = ZeroShotTask(classifier, protected=set(classnames), classnames=list(classnames),
                                templates=list(templates))
        result = _evaluate_split(task, batches, indices, suite, dataset_name, batch_size, seed, sweep, n_examples,
                                 on_progress, meter)
    finally:
        if meter is not None:
            meter.close()
    if meter is not None:
        result.cost = meter.record()
    return result


def _evaluate_split(task: ZeroShotTask, batches: Batches, indices: torch.Tensor, suite: list[SuiteEntry],
                    dataset_name: str, batch_size: int, seed: int, sweep: tuple[str, dict, list[float]] | None,
                    n_examples: int, on_progress: Callable[[int, int], None] | None,
                    meter: CostMeter | None) -> ClassificationResult:
    """This rank's share of ``indices``, batch by batch through :func:`_evaluate_batch`, outcomes gathered."""
    model = task.classifier.model
    device = model.device
    runs = _with_sweep(suite, sweep)

    mine = indices[dist.rank() :: dist.world_size()].tolist()
    chunks = [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
    parts: list[dict[str, torch.Tensor]] = []
    order: list[torch.Tensor] = []
    examples: dict[str, Any] = {}
    for b, (images, labels, idx) in enumerate(batches(chunks)):
        images, labels = images.to(device), labels.to(device)
        outcome, results = _evaluate_batch(task, images, labels, runs, seed, b, meter)
        parts.append(outcome)
        order.append(idx.cpu())
        if b == 0 and n_examples and dist.is_main():
            examples = {name: _examples(task, images, labels, res, n_examples) for name, res in results.items()}
        if on_progress is not None:
            on_progress(b + 1, len(chunks))

    names = list(parts[0]) if parts else ["clean"]
    local = {n: torch.cat([p[n].cpu() for p in parts]) if parts else torch.zeros(0, dtype=torch.bool) for n in names}
    got_idx, outcomes = _gather_outcomes(torch.cat(order) if order else torch.zeros(0, dtype=torch.long), local, device)
    metrics = {f"{dataset_name}.{n}.acc": round(float(v.float().mean()), 6) if len(v) else 0.0 for n, v in outcomes.items()}
    threat = {"clean": {"attack": "none", "side": "none", "family": "clean"}}
    threat.update({e.name: {**e.attack.threat_model(), "family": e.family, "worst_only": e.worst_only} for e in runs})
    for e in runs:
        if isinstance(e.attack, Transfer):
            threat[e.name]["source_is_target"] = source_is_target(e.attack, model)
    sweep_rows = []
    if sweep is not None:
        sweep_rows = [{"eps_255": 0.0, "acc": metrics[f"{dataset_name}.clean.acc"]}] + [
            {"eps_255": e, "acc": metrics[f"{dataset_name}.sweep_eps{_fmt(e)}.acc"]} for e in sweep[2]
        ]
    fams = families([e for e in suite])
    return ClassificationResult(metrics, outcomes, got_idx.tolist(), threat, fams, sweep_rows, examples)


@torch.no_grad()
def weights_digest(model: torch.nn.Module) -> str:
    """A SHA-256 of a model's parameters and buffers (names, shapes, dtypes, values): equal weights, equal digest."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def source_is_target(attack: Transfer, model: ClipModel) -> bool:
    """Whether a transfer attack crafts on the evaluated model itself (same weights): then it is one more
    white-box attack, not the black-box check of gradient masking it is meant to be."""
    p = attack.params
    try:
        source = load_source(p.source, p.pretrained, str(model.device))
    except ModelLoadError as err:
        raise AttackError(f"attack 'transfer': source model: {err}") from None
    return source is model or weights_digest(source) == weights_digest(model)


def _with_sweep(suite: list[SuiteEntry], sweep: tuple[str, dict, list[float]] | None) -> list[SuiteEntry]:
    if sweep is None:
        return list(suite)
    name, params, eps_list = sweep
    extra = [SuiteEntry(f"sweep_eps{_fmt(e)}", create_attack(name, **{**params, "eps_255": e}), "sweep") for e in eps_list]
    return [*suite, *extra]


def _evaluate_batch(
    task: ZeroShotTask, images: torch.Tensor, labels: torch.Tensor, runs: list[SuiteEntry], seed: int, batch: int,
    meter: CostMeter | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Per-sample outcomes of one batch: clean, each attack with a column, the worst case per family;
    each run's cost into ``meter`` when given."""
    with torch.no_grad(), measured(meter, "clean", len(images)):
        clean_ok = task.classifier(images).argmax(1) == labels
    outcome: dict[str, torch.Tensor] = {"clean": clean_ok}
    results: dict[str, Any] = {"clean": None}

    def run_one(entry: SuiteEntry, rows: torch.Tensor) -> torch.Tensor:
        torch.manual_seed(_seed_for(seed, entry.name))  # image attacks key their draws by sample, not batch
        with measured(meter, entry.name, len(rows)):
            result = run_zeroshot_attack(entry.attack, task, images[rows], labels[rows])
        if len(rows) == len(images):
            results[entry.name] = result
        # Robust means correct clean and correct under attack (AutoAttack's count): an attack that
        # happens to fix a misclassified sample does not make it robust.
        return result.correct(labels[rows]) & clean_ok[rows]

    all_rows = torch.arange(len(images), device=images.device)
    for family, entries in _group(runs).items():
        columns = [e for e in entries if not e.worst_only]
        alive = clean_ok.clone()
        for e in columns:
            outcome[e.name] = run_one(e, all_rows)
            alive &= outcome[e.name]
        if family == "sweep":
            continue
        cascade = [e for e in entries if e.worst_only]
        survivors = alive.nonzero().squeeze(1).cpu()
        _, still = run_cascade(cascade, lambda e, sub: run_one(e, survivors[sub]), len(survivors))
        worst = torch.zeros_like(alive)
        worst[survivors.to(alive.device)] = still.to(alive.device)
        outcome[f"worst_{family}"] = worst
    return outcome, results


def _group(runs: list[SuiteEntry]) -> dict[str, list[SuiteEntry]]:
    out: dict[str, list[SuiteEntry]] = {}
    for e in runs:
        out.setdefault(e.family, []).append(e)
    return out


def _gather_outcomes(
    idx: torch.Tensor, local: dict[str, torch.Tensor], device: torch.device
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Every rank's (index, outcomes) rows, gathered and sorted by sample index."""
    names = list(local)
    table = torch.stack([idx.long()] + [local[n].long() for n in names], dim=1) if len(idx) else torch.zeros(0, len(names) + 1, dtype=torch.long)
    if dist.is_distributed():
        table = _gather_rows(table.to(device)).cpu()
    table = table[table[:, 0].argsort()]
    return table[:, 0], {n: table[:, i + 1].bool() for i, n in enumerate(names)}


def _gather_rows(table: torch.Tensor) -> torch.Tensor:
    """All ranks' rows (ranks may hold one row more or less than others)."""
    count = torch.tensor([len(table)], device=table.device)
    most = int(dist.all_reduce_sum(count.clone()).item())  # an upper bound for padding
    padded = torch.full((most, table.shape[1]), -1, dtype=table.dtype, device=table.device)
    padded[: len(table)] = table
    rows = dist.gather(padded)
    return rows[rows[:, 0] >= 0]


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
def image_features(model: ClipModel, batches: Iterable) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-norm image features and labels of every batch of ``(images, labels, indices)``."""
    xs, ys = [], []
    for images, labels, _ in batches:
        xs.append(model.encode_image(images.to(model.device)).cpu())
        ys.append(labels.cpu())
    return torch.cat(xs), torch.cat(ys)


def linear_probe_accuracy(features: torch.Tensor, labels: torch.Tensor, folds: int = 5, seed: int = 0) -> float:
    """Cross-validated accuracy of a logistic-regression probe on frozen image features.

    A standard CLIP evaluation; stratified k-fold on the evaluation subset itself, so no training
    split has to be read (every sample is scored once, by a probe that never saw it).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    y = labels.numpy()
    counts = torch.bincount(labels)
    k = min(folds, int(counts[counts > 0].min())) if len(labels) else 0
    if k < 2:
        return float("nan")
    cv = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    scores = cross_val_score(LogisticRegression(max_iter=2000, C=1.0), features.numpy(), y, cv=cv)
    return float(scores.mean())


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
