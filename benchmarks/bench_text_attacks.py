"""Batched vs one-at-a-time candidate evaluation for the text attacks.

Same attack, same candidates, same decisions: the batched run scores all candidates of a greedy round
in one objective call; the reference wraps the objective so that it is called once per candidate text
(how a naive implementation loops). Both must return identical texts. Model: ``mmcoa-tiny-fmnist``
(random init is fine for timing), 256 prompts of Fashion-MNIST classes.

    .venv/bin/python benchmarks/bench_text_attacks.py [--n 256]

Second table: cost per sample as the label set grows (10, 100, 1000 class prompts, names from
clip-benchmark's ImageNet list; labels drawn uniformly, so a batch holds up to min(classes, n) distinct
prompts). Candidate texts are encoded once per distinct string, whatever the number of samples that
share it: the texts encoded must stay within distinct prompts x (1 + positions x (k + 1)) (asserted),
while the texts scored grow with the samples.

Prints markdown tables; every ratio comes from this one run.
"""

from __future__ import annotations

import argparse
import logging
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
from mmcoa.attacks.text import Words  # noqa: E402
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


class CountingEncoder:
    """Wraps an objective's text encoder; counts the distinct strings it is asked to encode."""

    def __init__(self, inner):
        self.inner, self.encoded = inner, 0

    def __call__(self, texts):
        self.encoded += len(set(texts))
        return self.inner(texts)


def class_names(n_classes: int) -> list[str]:
    from mmcoa.data.classnames import clip_benchmark_list

    names = list(dict.fromkeys(clip_benchmark_list("classnames").get("imagenet1k", [])))
    if len(names) < n_classes:  # clip-benchmark absent: plain GloVe words as names
        vectors = load_word_vectors()
        names = [vectors.words[i] for i in vectors.vocab_rows[1000 : 1000 + n_classes]]
    return names[:n_classes]


def class_scaling(model, n: int, counts=(10, 100, 1000)) -> list[tuple]:
    """Rows (attack, classes, distinct prompts, texts scored, texts encoded, seconds, ms per sample)."""
    template = "a blurry photo of the small {c}."
    k = 10
    rows = []
    for n_classes in counts:
        names = class_names(n_classes)
        labels = torch.randint(0, n_classes, (n,), generator=torch.Generator().manual_seed(0))
        clf = ZeroShotClassifier.from_prompts(model, names, [template])
        texts = [template.format(c=names[y]) for y in labels.tolist()]
        # "Images" whose embedding is their own prompt's: every sample starts correct, so every
        # sample is attacked through all its positions (a random model would misclassify most).
        feats = clf.class_emb[labels]
        distinct = len(set(texts))
        for title, attack in (("word glove k=10", create_attack("word", word_budget=1, k=k)),
                              ("char 30/position", create_attack("char", char_budget=1, max_candidates=30))):
            objective = ZeroShotTextObjective(clf, feats, labels)
            objective.encode = CountingEncoder(objective.encode)
            attack.perturb(texts[:4], objective, protected=names)  # warm-up: vectors, caches
            objective.encode.encoded = 0
            _, seconds = timed(attack, texts, objective, names)
            per_prompt = max(len(Words(t).cores) for t in texts)
            cand = k if title.startswith("word") else 30
            bound = distinct * (1 + per_prompt * (cand + 1))
            assert objective.encode.encoded <= bound, f"{title}, {n_classes} classes: encoded more than distinct prompts allow"
            rows.append((title, n_classes, distinct, attack.stats.texts, objective.encode.encoded, seconds, 1000 * seconds / n))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=256, help="prompts per batch")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger().setLevel(logging.ERROR)  # long ImageNet names are truncated to the context
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

    rows = class_scaling(model, args.n)
    print(f"\nCost as the label set grows, {args.n} samples, template `a blurry photo of the small {{c}}.`\n")
    print("| attack | classes | distinct prompts | texts scored | texts encoded | seconds | ms / sample |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for title, c, d, scored, enc, sec, ms in rows:
        print(f"| {title} | {c} | {d} | {scored} | {enc} | {sec:.2f} | {ms:.1f} |")
    print("\nTexts encoded <= distinct prompts x (1 + positions x (k + 1)) (asserted).")


if __name__ == "__main__":
    main()
