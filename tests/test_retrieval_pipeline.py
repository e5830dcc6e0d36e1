"""A Karpathy-split JSON with images written here, through `mmcoa fetch-eval` and `mmcoa evaluate`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from test_pipeline import REPO, run  # the same CLI runner (tests/ is on sys.path)

MICRO = "mmcoa-test-micro"


def write_karpathy(root: Path, n: int, missing: bool = False) -> Path:
    """n RGB images of different sizes, two captions each, in the Karpathy-split layout."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    entries = []
    for i in range(n):
        size = (20 + i, 24)
        Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
        entries.append({"filename": f"{i}.png", "filepath": "images", "split": "test",
                        "sentences": [{"raw": f"a photo of pattern {i}"}, {"raw": f"an image showing pattern {i}"}]})
    entries.append({"filename": "train.png", "filepath": "images", "split": "train", "sentences": [{"raw": "ignored"}]})
    if missing:
        entries[3]["filename"] = "nowhere.png"
    path = root / "dataset_tiny.json"
    path.write_text(json.dumps({"images": entries}))
    return path


def params_for(tmp_path: Path, source: Path) -> Path:
    p = yaml.safe_load((REPO / "params.yaml").read_text())
    p["data"]["resolution"] = "model"  # the images differ in size: bring them to the model's input size
    pgd = {"attack": "pgd", "params": {"eps_255": 4, "steps": 2}}
    p["evaluate"].update({
        "datasets": ["tiny"], "sources": {"tiny": f"retrieval-json:{source}"}, "n_images": 8, "suite": [],
        "retrieval_suite": [{"name": "image", **pgd}, {"name": "text", "attack": "word", "params": {"k": 3}}],
    })
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(p, sort_keys=False))
    return path


@pytest.fixture
def micro_dir(tmp_path):
    from mmcoa.models import create_model, save_model

    torch.manual_seed(0)
    return save_model(create_model(MICRO), tmp_path / "model")


def test_karpathy_json_runs_through_fetch_eval_and_evaluate(tmp_path, micro_dir):
    params = params_for(tmp_path, write_karpathy(tmp_path / "kp", 10))
    run(["mmcoa", "fetch-eval", "tiny", "--out", str(tmp_path / "eval"), "--params", str(params)], tmp_path)
    manifest = json.loads((tmp_path / "eval" / "manifest.json").read_text())
    assert manifest["task"] == "retrieval" and manifest["name"] == "tiny" and len(manifest["indices"]) == 8
    run(["mmcoa", "evaluate", "--name", "micro", "--model", str(micro_dir), "--data", str(tmp_path / "eval"),
         "--out", str(tmp_path / "evals"), "--params", str(params)], tmp_path)
    result = json.loads((tmp_path / "evals" / "result.json").read_text())
    assert result["task"] == "retrieval" and result["n"] == 8 and result["n_captions"] == 16
    for attack in ("clean", "image", "text"):
        r = [result["metrics"][f"tiny.{attack}.{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10)]
        assert r[0] <= r[1] <= r[2] and r[3] <= r[4] <= r[5], r
    outcomes = json.loads((tmp_path / "evals" / "outcomes.json").read_text())["correct"]
    assert len(outcomes["clean.i2t_r1"]) == 8 and len(outcomes["clean.t2i_r1"]) == 16
    assert np.mean(outcomes["clean.t2i_r5"]) == pytest.approx(result["metrics"]["tiny.clean.t2i_r5"], abs=1e-6)


def test_a_missing_image_is_one_line_and_writes_nothing(tmp_path):
    params = params_for(tmp_path, write_karpathy(tmp_path / "kp", 6, missing=True))
    res = run(["mmcoa", "fetch-eval", "tiny", "--out", str(tmp_path / "eval"), "--params", str(params)], tmp_path, check=False)
    assert res.returncode == 2, res.stderr
    assert "nowhere.png" in res.stderr and len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
    assert not (tmp_path / "eval").exists()
