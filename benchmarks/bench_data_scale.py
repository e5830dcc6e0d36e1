"""Does streaming keep memory flat as a dataset grows, and does the loader keep up with the model?

    .venv/bin/python benchmarks/bench_data_scale.py [--sizes 2000,20000,100000] [--dir DIR] [--workers 2]

For each size N, an ImageFolder tree of N small files (32x32, half JPEG, half PNG, 10 classes,
train/ only) is written once under DIR (default: the system temp folder; reused by later runs).
Then, each in a fresh subprocess so that peaks do not mix:
  eval   stream every image through ``make_loader`` (resized to the model's 28 px, bicubic) and the
         tiny model's ``encode_image`` under no_grad;
  train  a fixed number of steps of forward/backward (zero-shot cross-entropy over the class prompts,
         both towers) on seeded random batches drawn from all N images;
  loader ``make_loader`` alone over every image (images/s);
  model  ``encode_image`` alone on in-memory batches (images/s the model consumes, forward only), and
         forward/backward steps alone (training images/s).
Peak RSS is the subprocess's own peak (getrusage) plus the largest loader worker's peak.
The table ends with the ratios the design asks for: peak RSS at the largest N over the smallest
(<= 1.2: memory does not grow with the dataset) and loader over model throughput (> 1: the model,
not the loader, is the bottleneck).
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
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CLASSES = 10
BATCH = 256
PX = 32


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
    """Peak memory of this process and its loader workers, sampled every ``period`` s.

    Forked workers share most pages with their parent, so a sum of RSS counts them twice; the sum of
    PSS (each shared page split among its sharers; psutil on Linux) does not. Without psutil only
    this process's own peak RSS (getrusage) is reported.
    """

    def __init__(self, period: float = 0.25):
        import threading

        self.period, self.peak_pss_mb, self._stop = period, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> float:
        import psutil

        me = psutil.Process()
        total = 0
        for proc in [me, *me.children(recursive=True)]:
            try:
                total += proc.memory_full_info().pss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return total / 2**20

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.peak_pss_mb = max(self.peak_pss_mb, self._sample())

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


def loader_pass(ds, model, size, prompts, workers, steps) -> dict:
    """The loader alone over every image."""
    from mmcoa.data import make_loader

    start = time.perf_counter()
    seen = sum(len(images) for images, _, _ in make_loader(ds, in_order(len(ds)), size=size, num_workers=workers))
    return {"images_per_s": seen / (time.perf_counter() - start)}


def model_pass(ds, model, size, prompts, workers, steps) -> dict:
    """The model alone on in-memory batches: forward (evaluation) and forward/backward (training) rates."""
    import torch
    import torch.nn.functional as F

    x = torch.rand(BATCH, 3, size, size)
    model.eval()
    with torch.no_grad():
        model.encode_image(x)  # warm-up
        start, reps = time.perf_counter(), 8
        for _ in range(reps):
            model.encode_image(x)
        out = {"eval_images_per_s": reps * BATCH / (time.perf_counter() - start)}
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens, y = model.tokenize(prompts), torch.randint(0, CLASSES, (BATCH,))
    start, reps = time.perf_counter(), 5
    for _ in range(reps):
        loss = F.cross_entropy(100 * model.encode_image(x) @ model.encode_text(tokens).T, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    out["train_images_per_s"] = reps * BATCH / (time.perf_counter() - start)
    return out


PASSES = {"eval": eval_pass, "train": train_pass, "loader": loader_pass, "model": model_pass}


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
            "rss_mb": TreePeak.own_rss_mb(), "pss_mb": peak.peak_pss_mb}


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
    ap.add_argument("--child", choices=("eval", "train", "loader", "model"), help=argparse.SUPPRESS)
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
        r = {m: run_child(m, tree, args) for m in ("eval", "train", "loader", "model")}
        rows.append((n, r))
        print(f"n={n}: {json.dumps(r)}", file=sys.stderr, flush=True)

    print("\n| images | eval peak RSS / PSS MB | train peak RSS / PSS MB | loader img/s | eval img/s (model alone) "
          "| train img/s (model alone) | loader/model eval | loader/model train |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n, r in rows:
        m, ev, tr = r["model"], r["eval"], r["train"]
        print(f"| {n} | {ev['rss_mb']:.0f} / {ev['pss_mb']:.0f} | {tr['rss_mb']:.0f} / {tr['pss_mb']:.0f} | "
              f"{r['loader']['images_per_s']:.0f} | {ev['images_per_s']:.0f} ({m['eval_images_per_s']:.0f}) | "
              f"{tr['images_per_s']:.0f} ({m['train_images_per_s']:.0f}) | "
              f"{r['loader']['images_per_s'] / m['eval_images_per_s']:.2f} | {r['loader']['images_per_s'] / m['train_images_per_s']:.2f} |")
    (lo, rlo), (hi, rhi) = rows[0], rows[-1]
    for key, label in (("rss_mb", "peak RSS (main process)"), ("pss_mb", "peak PSS (main + workers)")):
        ratios = {p: rhi[p][key] / rlo[p][key] if rlo[p][key] else float("nan") for p in ("eval", "train")}
        verdict = "ok" if max(ratios.values()) <= 1.2 else "FAILS"
        print(f"{label}, {hi} / {lo} images: eval {ratios['eval']:.3f}, train {ratios['train']:.3f} (must be <= 1.2: {verdict})")
    for p, key in (("train", "train_images_per_s"), ("eval", "eval_images_per_s")):
        worst = min(r["loader"]["images_per_s"] / r["model"][key] for _, r in rows)
        print(f"loader / model throughput ({p}), worst over sizes: {worst:.2f} (must be > 1: {'ok' if worst > 1 else 'FAILS'})")


if __name__ == "__main__":
    main()
