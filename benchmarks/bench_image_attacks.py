"""How fast our image attacks are: PGD against its floor, and against torchattacks' PGD.

    .venv/bin/python benchmarks/bench_image_attacks.py [--model DIR] [--repeats 5] [--threads 2]

(a) PGD-k time over its floor: k forward+backward passes of the image tower with respect to the
    input, plus one forward (the check of the final iterate). Random-init mmcoa-tiny-fmnist
    (batch 256, 28x28) and random-init open_clip ViT-B-32 (batch 8, 224x224).
(b) Our PGD over torchattacks' PGD (a module wrapping the same zero-shot head; class-prompt
    embeddings precomputed for both), L-inf eps 2/255, step 0.5/255, 10 steps, random start, on a
    trained model: the micro CLIP trained here for 150 steps on Fashion-MNIST (as the tests do), or
    the saved model dir given by --model; 256 Fashion-MNIST test images, their class prompts.
    Once with every sample attacked at every step (early_exit=False), once with early exit (the
    evaluation setting).
    For reference, APGD-CE (100 iterations) over torchattacks' APGD (CE) on the same model.
(c) The cascade (``mmcoa.attacks.cascade.run_cascade``) on the same model and images: a family of
    image attacks run each on every sample, against each run only on the samples every earlier
    attack left robust. The worst-case vectors must be identical (asserted); the family uses
    attacks whose outcome for a sample does not depend on which other samples share its batch
    (no random start), so that identity is exact.

Each case is timed with time.perf_counter after a warm-up, ours and the reference interleaved
(so load on a shared machine hits both alike); the table gives median times and the median of the
per-repeat ratios. On a machine whose cores are busy with other work, run with OMP_WAIT_POLICY=PASSIVE
(OpenMP threads spinning against another process distort every number).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmcoa.attacks import create_attack  # noqa: E402
from mmcoa.attacks.cascade import run_cascade  # noqa: E402
from mmcoa.attacks.objectives import ZeroShotImageObjective  # noqa: E402
from mmcoa.models import ClipModel, create_model, load_model  # noqa: E402
from mmcoa.zeroshot import ZeroShotClassifier, predict  # noqa: E402


def timed_pair(ours, reference, repeats: int) -> tuple[float, float, float]:
    """Median seconds of ``ours()`` and ``reference()`` and the median of their per-repeat ratios."""
    ours(), reference()  # warm-up (allocator, oneDNN primitive caches)
    t_ours, t_ref = [], []
    for r in range(repeats):
        pair = [(ours, t_ours), (reference, t_ref)]
        for fn, sink in pair if r % 2 == 0 else pair[::-1]:  # alternate which goes first
            start = time.perf_counter()
            fn()
            sink.append(time.perf_counter() - start)
    ratio = statistics.median(a / b for a, b in zip(t_ours, t_ref))
    return statistics.median(t_ours), statistics.median(t_ref), ratio


def zero_shot_head(model: ClipModel, n_classes: int = 10) -> ZeroShotClassifier:
    """A head with random unit class embeddings: as costly as real prompts, with no text pass."""
    g = torch.Generator().manual_seed(0)
    return ZeroShotClassifier(model, F.normalize(torch.randn(n_classes, model.embed_dim, generator=g), dim=-1))


def floor(classifier: ZeroShotClassifier, images: torch.Tensor, labels: torch.Tensor, steps: int):
    """The least PGD-k can cost: k forward+backward passes w.r.t. the input, plus one forward."""

    def run():
        x = images
        for _ in range(steps):
            x = x.detach().requires_grad_(True)
            loss = F.cross_entropy(classifier(x), labels, reduction="sum")
            (grad,) = torch.autograd.grad(loss, x)
        with torch.no_grad():
            classifier(x)
        return grad

    return run


def pgd_runner(classifier, images, labels, early_exit: bool, seed: int = 0, **params):
    attack = create_attack("pgd", **params)
    objective = ZeroShotImageObjective(classifier, labels)

    def run():
        torch.manual_seed(seed)
        return attack.perturb(images, objective, early_exit=early_exit)

    return run


class Logits(torch.nn.Module):
    """torchattacks wants a module images -> logits."""

    def __init__(self, classifier: ZeroShotClassifier):
        super().__init__()
        self.classifier = classifier

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(images)


def fashion_mnist():
    """Prepared Fashion-MNIST (4000 train / 400 test, as the tests use) in a temporary dir."""
    from mmcoa.data import load_prepared, prepare

    with tempfile.TemporaryDirectory(prefix="bench-fmnist-") as tmp:
        root = Path(tmp)
        prepare("fashion_mnist", root / "prepared", n_train=4000, n_test=400, seed=0, root=root / "raw")
        return load_prepared(root / "prepared", "train"), load_prepared(root / "prepared", "test")


def trained_micro(train_set, steps: int) -> ClipModel:
    """The micro CLIP trained from scratch for a few seconds, as the tests' fixture does."""
    from mmcoa.defenses import DefenseContext, create_defense
    from mmcoa.train import TrainConfig, train

    torch.manual_seed(0)
    model = create_model("mmcoa-test-micro")
    ctx = DefenseContext(train_set.classnames, train_set.templates[0], same_class_targets=True)
    cfg = TrainConfig(steps=steps, batch_size=256, lr=1e-3, optimizer="adamw", warmup_steps=20, schedule="cosine")
    train(model, create_defense("clean", model, ctx), train_set, cfg)
    return model


CASCADE_FAMILY = [
    ("pgd", dict(eps_255=1, step_255=0.25, steps=10, random_start=False)),
    ("pgd", dict(eps_255=2, step_255=0.5, steps=10, random_start=False)),
    ("pgd", dict(norm="l2", eps=0.5, step=0.125, steps=10, random_start=False)),
    ("typographic", dict(font_frac=0.5, position="center", background=True)),
    ("pgd", dict(eps_255=4, step_255=1, steps=10, random_start=False)),
]


def cascade_table(head: ZeroShotClassifier, images: torch.Tensor, labels: torch.Tensor, classnames: list[str]):
    """Rows (attack, samples attacked alone / in the cascade, seconds alone / in the cascade)."""
    attacks = [create_attack(name, **params) for name, params in CASCADE_FAMILY]
    counts: dict[str, list[int]] = {"full": [], "cascade": []}

    def runner(mode: str):
        def run_one(attack, idx):
            counts[mode].append(len(idx))
            objective = ZeroShotImageObjective(head, labels[idx], classnames=classnames)
            adv = attack.perturb(images[idx], objective, early_exit=True)
            return predict(head, adv) == labels[idx]

        return run_one

    clean = predict(head, images) == labels
    start = clean.nonzero().squeeze(1)  # both modes start from the clean-correct samples
    images, labels = images[start], labels[start]  # what run_one below attacks
    t0 = time.perf_counter()
    alone = []
    times_alone = []
    for attack in attacks:
        t = time.perf_counter()
        alone.append(runner("full")(attack, torch.arange(len(start))))
        times_alone.append(time.perf_counter() - t)
    worst_alone = torch.stack(alone).all(0)
    total_alone = time.perf_counter() - t0
    times_cascade = []

    def timed_cascade(attack, idx):
        t = time.perf_counter()
        out = runner("cascade")(attack, idx)
        times_cascade.append(time.perf_counter() - t)
        return out

    t0 = time.perf_counter()
    robust, worst = run_cascade(attacks, timed_cascade, len(start))
    total_cascade = time.perf_counter() - t0
    assert torch.equal(worst, worst_alone), "the cascade changed the worst case"
    rows = []
    for i, (name, params) in enumerate(CASCADE_FAMILY):
        budget = ", ".join(f"{k}={v}" for k, v in params.items() if k in ("eps_255", "eps", "font_frac"))
        n_cascade = counts["cascade"][i] if i < len(counts["cascade"]) else 0
        t_cascade = times_cascade[i] if i < len(times_cascade) else 0.0
        rows.append((f"{name} ({budget})", counts["full"][i], n_cascade, times_alone[i], t_cascade,
                     100 * alone[i].float().mean().item(), 100 * robust[i].float().mean().item()))
    summary = (len(clean), int(clean.sum()), 100 * worst.float().mean().item() * len(start) / len(clean),
               total_alone, total_cascade)
    return rows, summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="a saved model dir for (b) (default: train the micro CLIP here)")
    ap.add_argument("--train-steps", type=int, default=150)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    ap.add_argument("--vit-batch", type=int, default=8)
    ap.add_argument("--vit-steps", type=int, default=3)
    ap.add_argument("--skip-vit", action="store_true")
    ap.add_argument("--skip-apgd", action="store_true")
    ap.add_argument("--skip-cascade", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger().setLevel(logging.ERROR)  # open_clip warns about random init

    rows: list[tuple[str, float, float, float, str]] = []

    # (a) PGD over its floor, random-init models ---------------------------------------------
    torch.manual_seed(0)
    tiny = zero_shot_head(create_model("mmcoa-tiny-fmnist"))
    x = torch.rand(256, 1, 28, 28)
    y = torch.randint(0, 10, (256,))
    k = 10
    ours, ref, ratio = timed_pair(
        pgd_runner(tiny, x, y, False, eps_255=4, step_255=1, steps=k), floor(tiny, x, y, k), args.repeats
    )
    rows.append((f"PGD-{k} / floor, tiny random init, batch 256, 28px", ours, ref, ratio, "<= 1.10"))

    if not args.skip_vit:
        torch.manual_seed(0)
        vit = zero_shot_head(create_model("ViT-B-32"))
        xv = torch.rand(args.vit_batch, 3, 224, 224)
        yv = torch.randint(0, 10, (args.vit_batch,))
        kv = args.vit_steps
        ours, ref, ratio = timed_pair(
            pgd_runner(vit, xv, yv, False, eps_255=4, step_255=1, steps=kv),
            floor(vit, xv, yv, kv),
            args.repeats,
        )
        case = f"PGD-{kv} / floor, ViT-B-32 random init, batch {args.vit_batch}, 224px"
        rows.append((case, ours, ref, ratio, "<= 1.10"))
        del vit

    # (b) ours vs torchattacks on a trained model ----------------------------------------------
    import torchattacks

    train_set, test_set = fashion_mnist()
    t0 = time.perf_counter()
    if args.model:
        model, where = load_model(args.model), f"--model {args.model}"
    else:
        model = trained_micro(train_set, args.train_steps)
        where = f"the micro CLIP trained here for {args.train_steps} steps ({time.perf_counter() - t0:.0f} s)"
    head = ZeroShotClassifier.from_prompts(model, test_set.classnames, test_set.templates[:1])
    xb, yb = test_set.float_images(slice(0, 256)), test_set.labels[:256]
    clean = 100 * (predict(head, xb) == yb).float().mean().item()
    budget = dict(eps_255=2, step_255=0.5, steps=10)
    reference = torchattacks.PGD(Logits(head), eps=2 / 255, alpha=0.5 / 255, steps=10, random_start=True)

    def ta_pgd():
        torch.manual_seed(0)
        return reference(xb, yb)

    robust = 100 * (predict(head, pgd_runner(head, xb, yb, True, **budget)()) == yb).float().mean().item()
    robust_ref = 100 * (predict(head, ta_pgd()) == yb).float().mean().item()
    many = 3 * args.repeats  # sub-second cases: more repeats for a steadier median
    ours, ref, ratio = timed_pair(pgd_runner(head, xb, yb, False, **budget), ta_pgd, many)
    rows.append(("PGD-10 / torchattacks PGD, every sample every step", ours, ref, ratio, "<= 1.05"))
    ours, ref, ratio = timed_pair(pgd_runner(head, xb, yb, True, **budget), ta_pgd, many)
    rows.append(("PGD-10 / torchattacks PGD, early exit", ours, ref, ratio, "report"))

    if not args.skip_apgd:
        apgd = create_attack("apgd_ce", eps_255=2, steps=100)
        objective = ZeroShotImageObjective(head, yb)
        ta_apgd = torchattacks.APGD(Logits(head), eps=2 / 255, steps=100, loss="ce", n_restarts=1, seed=0)

        def ours_apgd():
            torch.manual_seed(0)
            return apgd.perturb(xb, objective, early_exit=False)

        ours, ref, ratio = timed_pair(ours_apgd, lambda: ta_apgd(xb, yb), max(3, args.repeats // 2))
        rows.append(("APGD-CE-100 / torchattacks APGD (ce), every sample", ours, ref, ratio, "report"))

    cascade = None
    if not args.skip_cascade:
        cascade = cascade_table(head, xb, yb, list(test_set.classnames))

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\ntorch {torch.__version__}, {args.threads} threads, load average {load:.1f}; (b) on {where}")
    print(f"(b) clean {clean:.1f}%, robust (L-inf 2/255, PGD-10): ours {robust:.1f}%, torchattacks {robust_ref:.1f}%\n")
    print("| case | ours (s) | reference (s) | ratio | target |")
    print("|---|---:|---:|---:|---|")
    for case, o, r, q, target in rows:
        print(f"| {case} | {o:.3f} | {r:.3f} | {q:.3f} | {target} |")
    if cascade is not None:
        rows_c, (n, n_clean, worst_acc, t_alone, t_cascade) = cascade
        print(f"\n(c) cascade on {n} images ({n_clean} clean-correct attacked); worst-case robust accuracy "
              f"{worst_acc:.1f}%, identical with and without the cascade (asserted)\n")
        print("| attack | samples alone | samples in cascade | alone (s) | cascade (s) | robust alone % | robust so far % |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for name, n_alone, n_cas, t_a, t_c, r_alone, r_cum in rows_c:
            print(f"| {name} | {n_alone} | {n_cas} | {t_a:.2f} | {t_c:.2f} | {r_alone:.1f} | {r_cum:.1f} |")
        print(f"| **family** | | | **{t_alone:.2f}** | **{t_cascade:.2f}** | | |")


if __name__ == "__main__":
    main()
