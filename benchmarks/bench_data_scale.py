"""Does streaming keep memory flat as a dataset grows, and does the loader keep up with the model?

    .venv/bin/python benchmarks/bench_data_scale.py [--sizes 2000,20000,100000] [--dir DIR] [--workers 2]

For each size N, an ImageFolder tree of N small files (32x32, half JPEG, half PNG, 10 classes,
train/ only) is written once under DIR (default: the system temp folder; reused by later runs).
Then, each in a fresh subprocess so that peaks do not mix:
  eval        stream every image through ``make_loader`` (resized to the model's 28 px, bicubic) and
              the tiny model's ``encode_image`` under no_grad;
  train       a fixed number of steps of forward/backward (zero-shot cross-entropy over the class
              prompts, both towers) on seeded random batches drawn from all N images;
  throughput  the loader alone (images/s) against the model alone on in-memory batches (images/s it
              consumes: forward for evaluation, forward/backward for training), interleaved so that
              both see the same load on a shared machine.
Memory: the subprocess's peak RSS (getrusage), and the sampled peak of its RSS plus its loader
workers' private memory (USS). The table ends with the ratios the design asks for: peak memory at the
largest N over the smallest (<= 1.2: memory does not grow with the dataset) and loader over model
throughput (> 1: the model, not the loader, is the bottleneck). On a machine whose cores are busy
with other work, numbers move from run to run; OMP_WAIT_POLICY=PASSIVE is set for that reason.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CLASSES = 10
BATCH = 256
PX = 32
REPEATS = 5  # interleaved loader/model timings per size
WINDOW = 12  # batches timed per loader measurement


def write_tree(base: Path, n: int) -> Path:
    """``base/n<N>/train/c<k>/<i>.{jpg,png}`` once; a ``.done`` marker makes reruns reuse it."""
    import numpy as np
    from PIL import Image

    tree = base / f"n{n}"
    if (tree / ".done").is_file():
        return tree
    rng = np.random.default_rng(n)
    for k in range(CLASSES):
        (tree / "train" / f"c{k}").mkdir(parents=True, exist_ok=True)
    ramp = np.linspace(0, 255, PX, dtype=np.float32)
    for i in range(n):
        k = i % CLASSES
        # A class-dependent colour gradient plus noise: compresses like a photo, not like pure noise.
        base_img = np.stack([np.add.outer(ramp, ramp * (k / CLASSES)) / 2, np.tile(ramp, (PX, 1)), np.full((PX, PX), 25.0 * k)], -1)
        img = np.clip(base_img + rng.normal(0, 12, base_img.shape), 0, 255).astype(np.uint8)
        ext = "jpg" if i % 2 else "png"
        Image.fromarray(img).save(tree / "train" / f"c{k}" / f"{i:06d}.{ext}", **({"quality": 90} if ext == "jpg" else {}))
    (tree / ".done").write_text(str(n))
    return tree


class TreePeak:
    """Peak memory of this process plus its loader workers, sampled every ``period`` s.

    Forked workers share most pages with their parent, so a sum of RSS counts those pages twice;
    this process's RSS plus each worker's USS (its private pages; psutil) counts every page once.
    Without psutil only this process's own peak RSS (getrusage) is reported.
    """

    def __init__(self, period: float = 0.25):
        import threading

        self.period, self.peak_mb, self._stop = period, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> float:
        import psutil

        me = psutil.Process()
        total = me.memory_info().rss
        for proc in me.children(recursive=True):
            try:
                total += proc.memory_full_info().uss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return total / 2**20

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.peak_mb = max(self.peak_mb, self._sample())

    def __enter__(self):
        try:
            import psutil  # noqa: F401

            self._thread.start()
        except ImportError:
            pass
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    @staticmethod
    def own_rss_mb() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


def eval_pass(ds, model, size, prompts, workers, steps) -> dict:
    """Every image through the loader and ``encode_image`` under no_grad."""
    import torch

    from mmcoa.data import make_loader

    model.eval()
    seen, start = 0, time.perf_counter()
    with torch.no_grad():
        for images, _, _ in make_loader(ds, in_order(len(ds)), size=size, num_workers=workers):
            model.encode_image(images)
            seen += len(images)
    return {"images_per_s": seen / (time.perf_counter() - start)}


def train_pass(ds, model, size, prompts, workers, steps) -> dict:
    """``steps`` forward/backward steps on seeded random batches (zero-shot cross-entropy, both towers)."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from mmcoa.data import make_loader

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    rng = np.random.default_rng(0)
    batches = (rng.integers(0, len(ds), BATCH).tolist() for _ in range(steps))
    tokens, seen, start = model.tokenize(prompts), 0, time.perf_counter()
    for images, labels, _ in make_loader(ds, batches, size=size, num_workers=workers, seed=0):
        loss = F.cross_entropy(100 * model.encode_image(images) @ model.encode_text(tokens).T, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seen += len(images)
    return {"images_per_s": seen / (time.perf_counter() - start)}


def throughput_pass(ds, model, size, prompts, workers, steps) -> dict:
    """Loader alone vs model alone, interleaved ``REPEATS`` times so that both see the same machine load.

    One loader streams the dataset in order (wrapping around); each repeat first drains the batches
    the workers prefetched while the model ran, then times ``WINDOW`` batches, then times the model
    alone on an in-memory batch: forward under no_grad (evaluation) and forward/backward (training).
    Ratios are medians of the per-repeat ratios.
    """
    import itertools
    import statistics

    import torch
    import torch.nn.functional as F

    from mmcoa.data import make_loader

    n = len(ds)
    cyclic = ([(k * BATCH + j) % n for j in range(BATCH)] for k in itertools.count())
    stream = iter(make_loader(ds, cyclic, size=size, num_workers=workers))
    x, y = torch.rand(BATCH, 3, size, size), torch.randint(0, CLASSES, (BATCH,))
    tokens, opt = model.tokenize(prompts), torch.optim.AdamW(model.parameters(), lr=1e-4)

    def train_step():
        loss = F.cross_entropy(100 * model.encode_image(x) @ model.encode_text(tokens).T, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def rate(fn, reps: int) -> float:
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        return reps * BATCH / (time.perf_counter() - start)

    loader, forward, train = [], [], []
    for _ in range(REPEATS):
        for _ in range(2 * max(1, workers)):  # prefetched while the model ran: not the loader's speed
            next(stream)
        loader.append(rate(partial(next, stream), WINDOW))
        with torch.no_grad():
            model.eval()
            forward.append(rate(lambda: model.encode_image(x), 4))
        model.train()
        train.append(rate(train_step, 2))
    del stream
    med = statistics.median
    return {"loader_images_per_s": med(loader), "eval_images_per_s": med(forward), "train_images_per_s": med(train),
            "loader_over_eval": med(a / b for a, b in zip(loader, forward)),
            "loader_over_train": med(a / b for a, b in zip(loader, train))}


PASSES = {"eval": eval_pass, "train": train_pass, "throughput": throughput_pass}


def in_order(n: int):
    return (list(range(s, min(s + BATCH, n))) for s in range(0, n, BATCH))


def child(mode: str, tree: Path, workers: int, steps: int, threads: int) -> dict:
    """One pass in this (fresh) process, with its peak memory; a JSON-ready dict."""
    import torch

    from mmcoa.data import open_dataset
    from mmcoa.models import create_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    ds = open_dataset(f"folder:{tree}", "train")
    model = create_model("mmcoa-test-micro")
    prompts = [f"a photo of a {c}." for c in ds.classnames]
    with TreePeak() as peak:
        start = time.perf_counter()
        out = PASSES[mode](ds, model, model.image_size[0], prompts, workers, steps)
    return {**out, "mode": mode, "n": len(ds), "seconds": time.perf_counter() - start,
            "rss_mb": TreePeak.own_rss_mb(), "tree_mb": peak.peak_mb}


def run_child(mode: str, tree: Path, args) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--tree", str(tree), "--workers", str(args.workers),
           "--steps", str(args.steps), "--threads", str(args.threads)]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="2000,20000,100000", help="comma-separated numbers of images")
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "mmcoa-bench-data-scale")
    ap.add_argument("--workers", type=int, default=2, help="loader worker processes")
    ap.add_argument("--steps", type=int, default=20, help="training steps per size")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the main process")
    ap.add_argument("--child", choices=tuple(PASSES), help=argparse.SUPPRESS)
    ap.add_argument("--tree", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.tree, args.workers, args.steps, args.threads)))
        return

    sizes = [int(s) for s in args.sizes.split(",")]
    rows = []
    for n in sizes:
        t0 = time.perf_counter()
        tree = write_tree(args.dir, n)
        print(f"n={n}: tree ready in {time.perf_counter() - t0:.0f}s ({tree})", file=sys.stderr, flush=True)
        r = {m: run_child(m, tree, args) for m in PASSES}
        rows.append((n, r))
        print(f"n={n}: {json.dumps(r)}", file=sys.stderr, flush=True)

    print("\n| images | eval peak MB: main RSS / +workers | train peak MB: main RSS / +workers | eval pass img/s "
          "| train pass img/s | loader alone img/s | model alone img/s: eval / train | loader/model: eval / train |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n, r in rows:
        ev, tr, th = r["eval"], r["train"], r["throughput"]
        print(f"| {n} | {ev['rss_mb']:.0f} / {ev['tree_mb']:.0f} | {tr['rss_mb']:.0f} / {tr['tree_mb']:.0f} | "
              f"{ev['images_per_s']:.0f} | {tr['images_per_s']:.0f} | {th['loader_images_per_s']:.0f} | "
              f"{th['eval_images_per_s']:.0f} / {th['train_images_per_s']:.0f} | "
              f"{th['loader_over_eval']:.2f} / {th['loader_over_train']:.2f} |")
    (lo, rlo), (hi, rhi) = rows[0], rows[-1]
    for key, label in (("rss_mb", "peak RSS of the main process"), ("tree_mb", "peak of main RSS + workers' private memory")):
        ratios = {p: rhi[p][key] / rlo[p][key] if rlo[p][key] else float("nan") for p in ("eval", "train")}
        verdict = "ok" if max(ratios.values()) <= 1.2 else "FAILS"
        print(f"{label}, {hi} / {lo} images: eval {ratios['eval']:.3f}, train {ratios['train']:.3f} (must be <= 1.2: {verdict})")
    for p in ("train", "eval"):
        worst = min(r["throughput"][f"loader_over_{p}"] for _, r in rows)
        print(f"loader / model throughput ({p}), worst over sizes: {worst:.2f} (must be > 1: {'ok' if worst > 1 else 'FAILS'})")


if __name__ == "__main__":
    main()
