"""Batched vs one-at-a-time candidate evaluation for the text attacks.

Same attack, same candidates, same decisions: the batched run scores all candidates of a greedy round
in one objective call; the reference wraps the objective so that it is called once per candidate text
(how a naive implementation loops). Both must return identical texts. Model: ``mmcoa-tiny-fmnist``
(random init is fine for timing), 256 prompts of Fashion-MNIST classes.

    .venv/bin/python benchmarks/bench_text_attacks.py [--n 256]

Prints a markdown table; every ratio comes from this one run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from mmcoa.attacks import ObjectiveOutput, create_attack  # noqa: E402
from mmcoa.attacks.candidates import load_word_vectors  # noqa: E402
from mmcoa.attacks.objectives import EmbeddingKLObjective, ZeroShotTextObjective  # noqa: E402
from mmcoa.data.sources import FASHION_CLASSES  # noqa: E402
from mmcoa.models import create_model  # noqa: E402
from mmcoa.zeroshot import ZeroShotClassifier  # noqa: E402


class OneAtATime:
    """The objective called once per candidate text."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def __call__(self, texts, owners):
        outs = [self.inner([t], owners[i : i + 1]) for i, t in enumerate(texts)]
        self.calls += len(outs)
        fooled = None if outs[0].fooled is None else torch.cat([o.fooled for o in outs])
        return ObjectiveOutput(torch.cat([o.loss for o in outs]), fooled)


class Counting:
    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def __call__(self, texts, owners):
        self.calls += 1
        return self.inner(texts, owners)


def timed(attack, texts, objective, protected):
    t0 = time.perf_counter()
    adv = attack.perturb(texts, objective, protected=protected)
    return adv, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=256, help="prompts per batch")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model = create_model("mmcoa-tiny-fmnist").eval()
    names = list(FASHION_CLASSES)
    labels = torch.arange(args.n) % len(names)
    with torch.no_grad():
        feats = model.encode_image(torch.rand(args.n, 1, 28, 28))
    load_word_vectors()  # load GloVe once, outside the timings

    cases = []
    for template in ("a photo of a {c}.", "a blurry photo of the small {c}."):
        clf = ZeroShotClassifier.from_prompts(model, names, [template])
        texts = [template.format(c=names[y]) for y in labels.tolist()]
        zs = ZeroShotTextObjective(clf, feats, labels)
        cases.append((f"word glove k=10, zero-shot, `{template}`", create_attack("word", word_budget=1, k=10), texts, zs, names))
    template = "This is a photo of a {c}"
    texts = [template.format(c=names[y]) for y in labels.tolist()]
    with torch.no_grad():
        clean = model.encode_text(model.tokenize(texts), normalize=False)
    kl = EmbeddingKLObjective(model, clean)
    cases.append((f"word glove k=10, MMCoA KL, `{template}`", create_attack("word", word_budget=1, k=10), texts, kl, None))
    clf = ZeroShotClassifier.from_prompts(model, names, ["a photo of a {c}."])
    texts = ["a photo of a {c}.".format(c=names[y]) for y in labels.tolist()]
    zs = ZeroShotTextObjective(clf, feats, labels)
    cases.append(("char budget=1, 30/position, zero-shot, `a photo of a {c}.`",
                  create_attack("char", char_budget=1, max_candidates=30), texts, zs, names))

    rows = []
    for title, attack, texts, objective, protected in cases:
        attack.perturb(texts[:8], objective, protected=protected)  # warm-up (caches, allocator)
        batched_obj = Counting(objective)
        adv_b, t_b = timed(attack, texts, batched_obj, protected)
        scored = attack.stats.texts
        single_obj = OneAtATime(objective)
        adv_s, t_s = timed(attack, texts, single_obj, protected)
        assert adv_b == adv_s, f"{title}: batched and one-at-a-time runs disagree"
        rows.append((title, scored, batched_obj.calls, single_obj.calls, t_b, t_s))

    print(f"\nText attacks, {args.n} prompts, mmcoa-tiny-fmnist (random init), {args.threads} threads\n")
    print("| attack / objective | texts scored | calls batched | calls one-at-a-time | batched s | one-at-a-time s | speed-up |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for title, scored, cb, cs, tb, ts in rows:
        print(f"| {title} | {scored} | {cb} | {cs} | {tb:.2f} | {ts:.2f} | {ts / tb:.1f}x |")
    print("\nIdentical adversarial texts in both modes (asserted).")


if __name__ == "__main__":
    main()
