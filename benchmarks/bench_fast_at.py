"""What a fine-tuning step costs with each training adversary, against PGD-10, in one run.

    .venv/bin/python benchmarks/bench_fast_at.py [--method tecoa] [--arch mmcoa-tiny-fmnist] [--batch 128]
                                                 [--steps 5] [--repeats 3] [--threads 2]

For each adversary (PGD-10, PGD-2, FGSM with random start, N-FGSM; L-inf 4/255), ``--steps``
fine-tuning steps of ``--method`` from the same random-init model on the same random batches, timed
per step with the compute ledger (``mmcoa.ledger``), which also counts the image tower's forward and
backward passes at the model. The table gives, per adversary, the median seconds per step, the image
backward passes per step, and both as ratios to PGD-10, so the ratio of seconds can be read beside the
ratio of passes. Adversaries are interleaved within each repeat, so load on a shared machine hits them
alike; run with OMP_WAIT_POLICY=PASSIVE on a busy machine.
"""

from __future__ import annotations

import argparse
import os
import statistics

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from mmcoa.config import TrainAttackSpec  # noqa: E402
from mmcoa.defenses import DefenseContext, create_defense, defense_class  # noqa: E402
from mmcoa.ledger import ComputeLedger  # noqa: E402
from mmcoa.models import create_model, frozen_copy  # noqa: E402
from mmcoa.train import TrainConfig, train  # noqa: E402

ADVERSARIES = {
    "pgd-10": TrainAttackSpec(attack="pgd", params={"eps_255": 4, "step_255": 1, "steps": 10}),
    "pgd-2": TrainAttackSpec(attack="pgd", params={"eps_255": 4, "step_255": 2, "steps": 2}),
    "fgsm": TrainAttackSpec(attack="fgsm", params={"eps_255": 4}),
    "nfgsm": TrainAttackSpec(attack="nfgsm", params={"eps_255": 4}),
}
CLASSES = [f"class {i}" for i in range(10)]


class RandomData:
    """Random images in [0, 1] and labels: cost does not depend on what the pixels show."""

    def __init__(self, n: int, size: tuple[int, int, int]):
        g = torch.Generator().manual_seed(0)
        self.images, self.labels = torch.rand(n, *size, generator=g), torch.randint(0, len(CLASSES), (n,), generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def float_images(self, idx):
        return self.images[idx]


def one_run(method: str, arch: str, spec: TrainAttackSpec, data: RandomData, steps: int, batch: int) -> tuple[float, float]:
    """(median seconds per step, image backward passes per step) of ``steps`` steps."""
    torch.manual_seed(0)
    model = create_model(arch)
    original = frozen_copy(model) if defense_class(method).needs_original else None
    ctx = DefenseContext(CLASSES, "a photo of a {c}.", image_attack=spec, text_attack=None, original=original)
    ledger = ComputeLedger(model.device, model, original)
    history = train(model, create_defense(method, model, ctx), data, TrainConfig(steps=steps, batch_size=batch, lr=1e-5),
                    monitors=[ledger])
    ledger.close()
    return statistics.median(h["step_s"] for h in history[1:] or history), statistics.mean(h["bwd_image"] for h in history)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="tecoa", help="defense (the text side is not attacked)")
    ap.add_argument("--arch", default="mmcoa-tiny-fmnist")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5, help="steps per run (the first is a warm-up)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    size = create_model(args.arch).image_size
    data = RandomData(args.batch * args.steps, (1, *size))
    seconds = {name: [] for name in ADVERSARIES}
    passes = {}
    for _ in range(args.repeats):
        for name, spec in ADVERSARIES.items():
            s, p = one_run(args.method, args.arch, spec, data, args.steps, args.batch)
            seconds[name].append(s)
            passes[name] = p
    ref_s, ref_p = statistics.median(seconds["pgd-10"]), passes["pgd-10"]
    print(f"{args.method} on {args.arch}, batch {args.batch}, {args.steps} steps x {args.repeats} repeats "
          f"({args.threads} threads); image backward passes counted by the ledger")
    print(f"{'adversary':<10} {'s/step':>8} {'passes/step':>12} {'time / PGD-10':>14} {'passes / PGD-10':>16}")
    for name in ADVERSARIES:
        s = statistics.median(seconds[name])
        print(f"{name:<10} {s:8.3f} {passes[name]:12.1f} {s / ref_s:14.2f} {passes[name] / ref_p:16.2f}")


if __name__ == "__main__":
    main()
