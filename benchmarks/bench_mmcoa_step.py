"""One MMCoA training step: ours against a step structured like the authors' training loop.

Usage: ``.venv/bin/python benchmarks/bench_mmcoa_step.py [--quick]`` (prints a markdown table).

The reference step does what the authors' loop does, on the same batch, weights and random state:

* ``zero_grad`` BEFORE the attack; at every PGD step the text tower is re-run WITH gradients on all
  class prompts and the zero-shot cross-entropy is back-propagated with ``.backward()`` into every
  weight (and the input);
* the text attack (word substitution, KL objective, budget 1) handles one caption and one candidate
  at a time: the clean caption, each word replaced by [UNK] for importance, then each candidate,
  each a text-tower forward of its own. Candidates come from our attack's own source and filters,
  so both steps choose the same substitutions;
* the loss 0.5 * CLIP_loss(x', t) + 0.5 * CLIP_loss(x, t'), back-propagated, and an Adam step.

Ours is ``create_defense("mmcoa")``: class prompts encoded once per step without gradients, attack
gradients with respect to the inputs only, the text attack batched over unique texts, one pass per
tower with gradients for the loss. The same PGD start noise (same seed, drawn first) and the same
substitution choices make the two loss values agree; the table reports both and the time ratio.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from mmcoa.attacks.candidates import match_case  # noqa: E402
from mmcoa.attacks.text import MASK, Words  # noqa: E402
from mmcoa.config import TrainAttackSpec  # noqa: E402
from mmcoa.defenses import DefenseContext, create_defense  # noqa: E402
from mmcoa.models import create_model  # noqa: E402
from mmcoa.train import TrainConfig, build_optimizer  # noqa: E402

SEED = 0
LOSS_TOLERANCE = 1e-4  # relative: float reordering between batched and one-at-a-time encoding
ADAM = dict(lr=1e-6, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.2)  # the authors' optimiser


# --- the reference step ----------------------------------------------------------------------


def reference_clip_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    logits = scale * img @ txt.T
    target = torch.arange(len(img))
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def reference_word_attack(model, captions: list[str], word, protected: list[str]) -> list[str]:
    """Budget-1 word substitution, one caption and one candidate at a time (KL objective)."""
    editable, accept = word._filters(protected)  # our attack's exact filters (class names protected) and source

    def embed(text: str) -> torch.Tensor:
        with torch.no_grad():
            return F.log_softmax(model.encode_text(model.tokenize([text]), normalize=False)[0].float(), -1)

    out = []
    for caption in captions:
        clean = embed(caption)

        def kl(text: str) -> float:
            return float((clean.exp() * (clean - embed(text))).sum())

        doc = Words(caption)
        positions = [j for j, w in enumerate(doc.cores) if editable(w)]
        base = kl(caption)
        importance = [kl(doc.replaced(j, MASK)) - base for j in positions]
        order = [j for _, _, j in sorted(zip((-v for v in importance), range(len(positions)), positions))]
        best, best_loss = caption, base
        for j in order:
            (cands,) = word.source.propose([(tuple(doc.cores), j)], word.params.k, accept)
            for cand in cands:
                new = match_case(doc.cores[j], cand)
                if new == doc.cores[j]:
                    continue
                text = doc.replaced(j, new)
                loss = kl(text)
                if loss > best_loss:
                    best, best_loss = text, loss
        out.append(best)
    return out


def reference_step(model, optimizer, images, labels, prompts, pgd: TrainAttackSpec, word, scale_max, classnames) -> float:
    eps, alpha = pgd.params["eps_255"] / 255, pgd.params["step_255"] / 255
    optimizer.zero_grad()  # before the attack, as the authors do: the attack's gradients leak
    torch.manual_seed(SEED)
    x = (images + torch.empty_like(images).uniform_(-eps, eps)).clamp(0, 1)
    for _ in range(pgd.params["steps"]):
        x.requires_grad_(True)
        class_txt = model.encode_text(model.tokenize(prompts))  # with gradients, every PGD step
        scale = model.logit_scale.clamp(max=scale_max)
        loss = F.cross_entropy(scale * model.encode_image(x) @ class_txt.T, labels)
        loss.backward()
        x = x.detach() + alpha * x.grad.sign()
        x = (images + (x - images).clamp(-eps, eps)).clamp(0, 1)
    captions = [prompts[i] for i in labels.tolist()]
    adv_captions = reference_word_attack(model, captions, word, classnames) if word is not None else captions
    scale = model.logit_scale.clamp(max=scale_max)
    txt = model.encode_text(model.tokenize(captions))
    txt_adv = model.encode_text(model.tokenize(adv_captions))
    loss = 0.5 * reference_clip_loss(model.encode_image(x), txt, scale) + 0.5 * reference_clip_loss(
        model.encode_image(images), txt_adv, scale
    )
    loss.backward()
    optimizer.step()
    return loss.item()


# --- our step --------------------------------------------------------------------------------


def our_step(model, optimizer, defense, images, labels) -> float:
    optimizer.zero_grad(set_to_none=True)
    torch.manual_seed(SEED)
    out = defense.loss(model, images, labels)
    out.loss.backward()
    optimizer.step()
    return out.loss.item()


# --- inputs ----------------------------------------------------------------------------------


def fashion_batch(n: int):
    """A real Fashion-MNIST batch (Debian's files), or random images if they are missing."""
    from mmcoa.data import load_prepared, prepare

    try:
        with tempfile.TemporaryDirectory() as tmp:
            prepare("fashion_mnist", Path(tmp) / "p", n_train=max(n, 100), n_test=100, seed=0, root=Path(tmp) / "raw")
            data = load_prepared(Path(tmp) / "p", "train")
        return data.float_images(slice(0, n)), data.labels[:n], data.classnames, data.templates[0], "Fashion-MNIST"
    except Exception:  # noqa: BLE001 - a benchmark may run without the dataset
        names = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]
        g = torch.Generator().manual_seed(SEED)
        return torch.rand(n, 1, 28, 28, generator=g), torch.arange(n) % 10, names, "a photo of a {c}.", "random"


def imagenet_names(k: int) -> list[str]:
    """The first ``k`` ImageNet class names of clip-benchmark's list (generic names without it)."""
    try:
        ref = resources.files("clip_benchmark") / "datasets" / "en_classnames.json"
        return json.loads(ref.read_text())["imagenet1k"][:k]
    except Exception:  # noqa: BLE001
        return [f"object {i}" for i in range(k)]


# --- the measurement -------------------------------------------------------------------------


def measure(arch: str, images, labels, classnames, template, pgd_steps: int, word_budget: int) -> dict:
    torch.manual_seed(SEED)
    base = create_model(arch)
    ctx = DefenseContext(
        classnames, template,
        image_attack=TrainAttackSpec(attack="pgd", params=dict(eps_255=1, step_255=1, steps=pgd_steps, random_start=True)),
        text_attack=TrainAttackSpec(attack="word", params=dict(word_budget=word_budget)),
    )
    prompts = [template.format(c=c) for c in classnames]
    cfg = TrainConfig(steps=1, batch_size=len(images), optimizer="adam", **ADAM)

    ours_model = copy.deepcopy(base)
    defense = create_defense("mmcoa", ours_model, ctx)
    word = defense.text_adversary.attack if defense.text_adversary is not None else None
    if word is not None:  # load the word vectors and candidate cache once, for both steps
        word.perturb([prompts[i] for i in labels.tolist()], lambda texts, owners: _zero(texts))
    ours_opt = build_optimizer(list(ours_model.clip.named_parameters()), cfg)
    t0 = time.perf_counter()
    ours_loss = our_step(ours_model, ours_opt, defense, images, labels)
    ours_s = time.perf_counter() - t0

    ref_model = copy.deepcopy(base)
    ref_opt = torch.optim.Adam(ref_model.parameters(), **ADAM)
    t0 = time.perf_counter()
    ref_loss = reference_step(
        ref_model, ref_opt, images, labels, prompts, ctx.image_attack, word, ctx.logit_scale_max, classnames
    )
    ref_s = time.perf_counter() - t0
    return {"ours_loss": ours_loss, "ref_loss": ref_loss, "ours_s": ours_s, "ref_s": ref_s}


def _zero(texts):
    from mmcoa.attacks import ObjectiveOutput

    return ObjectiveOutput(torch.zeros(len(texts)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model only")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows = []
    x, y, names, template, source = fashion_batch(64)
    for budget in (1, 0):
        rows.append(("mmcoa-tiny-fmnist", source, len(names), len(x), 10, budget,
                     measure("mmcoa-tiny-fmnist", x, y, names, template, 10, budget)))
    if not args.quick:
        g = torch.Generator().manual_seed(SEED)
        x = torch.rand(8, 3, 224, 224, generator=g)
        names = imagenet_names(100)
        y = torch.randperm(len(names), generator=g)[: len(x)]
        rows.append(("ViT-B-32 (random init)", "random", len(names), len(x), 2, 1,
                     measure("ViT-B-32", x, y, names, "a photo of a {c}.", 2, 1)))

    print(f"\nOne MMCoA training step, ours vs authors'-loop structure (torch {torch.__version__}, "
          f"{args.threads} CPU threads, Adam step included)\n")
    print("| model | images | class prompts | batch | PGD steps | word budget | loss ours | loss reference "
          "| abs diff | ours (s) | reference (s) | speed-up |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for arch, src, classes, b, steps, budget, r in rows:
        diff = abs(r["ours_loss"] - r["ref_loss"])
        print(f"| {arch} | {src} | {classes} | {b} | {steps} | {budget} | {r['ours_loss']:.6f} | {r['ref_loss']:.6f} "
              f"| {diff:.1e} | {r['ours_s']:.2f} | {r['ref_s']:.2f} | {r['ref_s'] / r['ours_s']:.2f}x |")
    # A speed-up is only meaningful between steps that did the same work: same adversarial inputs, same loss.
    unequal = [(arch, budget) for arch, _, _, _, _, budget, r in rows
               if abs(r["ours_loss"] - r["ref_loss"]) > LOSS_TOLERANCE * max(1.0, abs(r["ref_loss"]))]
    if unequal:
        sys.exit(f"bench_mmcoa_step: the two steps computed different losses for {unequal}: they did unequal work")


if __name__ == "__main__":
    main()
