"""Run one small classification evaluation in its own process (for the 1-vs-2-rank invariance test).

Usage: ``python tests/evaluate_worker.py '<json spec>'`` (or under ``torch.distributed.run``). The spec
names a saved model, the prepared data folder, the sample count, the suite and the batch size; rank 0
writes the gathered per-sample outcomes and indices to ``spec["out"]`` (torch.save).
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from mmcoa import distributed as dist  # noqa: E402
from mmcoa.data import load_prepared  # noqa: E402
from mmcoa.evaluate import evaluate_classification, sample_indices, suite_from_specs  # noqa: E402
from mmcoa.models import create_model  # noqa: E402
from mmcoa.train import in_memory_batches  # noqa: E402


def main(spec: dict) -> None:
    torch.set_num_threads(1)
    dist.init_from_env(torch.device("cpu"))
    model = create_model(spec["model"]).eval()
    test = load_prepared(spec["data_dir"], "test")
    idx = sample_indices(test.labels, spec["n"], spec["seed"])
    result = evaluate_classification(model, in_memory_batches(test), idx, test.classnames, test.templates[:1],
                                     suite_from_specs(spec["suite"]), "fashion_mnist", spec["batch_size"], spec["seed"],
                                     n_examples=0)
    if dist.is_main():
        torch.save({"indices": result.indices, "outcomes": result.outcomes}, spec["out"])
    if dist.is_distributed():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
