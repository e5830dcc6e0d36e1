"""Any model, any dataset, one command: `mmcoa evaluate` / `mmcoa attack` on model references (a weights
file, a saved folder, hf-hub: from a local cache) and dataset references (a registered name, an image
folder, a CSV declared with its own class names and templates), the evaluation cache, and bad input.

Commands run in this process through the console entry point (``stages.cli.main``: one-line errors, exit
codes) from a small project folder; those that need a fresh process (a Hugging Face cache chosen by the
environment, a proxy for the download) run the installed ``mmcoa``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

import open_clip
from mmcoa.models import create_model, save_model
from stages.cli import main
from test_models_real import make_hub_cache, state_of

MICRO = "mmcoa-test-micro"
MMCOA = Path(sys.executable).parent / "mmcoa"
CLASSES = ["cat", "dog", "bird"]
PARAMS = {"device": "cpu", "evaluate": {"n_samples": 12, "batch_size": 12, "linear_probe": False, "n_examples": 0,
                                        "suite": [{"name": "image", "attack": "pgd", "params": {"eps_255": 4, "steps": 1}}]}}


def digit_images(n_per_class: int) -> list[tuple[np.ndarray, int]]:
    """Real images: scikit-learn's 8x8 digits 0, 1, 2 scaled to 0..255."""
    from sklearn.datasets import load_digits

    d = load_digits()
    out = []
    for label in range(len(CLASSES)):
        for image in d.images[d.target == label][:n_per_class]:
            out.append((np.rint(image * 255 / 16).astype(np.uint8), label))
    return out


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A project folder: params, a weights file, a saved model, an ImageFolder tree, a CSV with class names."""
    root = tmp_path_factory.mktemp("project")
    images = digit_images(8)
    for split in ("train", "test"):
        for i, (image, label) in enumerate(images):
            folder = root / "tree" / split / f"class_{CLASSES[label]}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{i:03d}.png")
    rows = ["path,label"] + [f"tree/test/class_{CLASSES[y]}/{i:03d}.png,{y}" for i, (_, y) in enumerate(images)]
    (root / "drawings.csv").write_text("\n".join(rows) + "\n")
    (root / "names.txt").write_text("\n".join(CLASSES) + "\n")
    params = {**PARAMS, "evaluate": {**PARAMS["evaluate"], "sources": {
        "drawings": {"csv": "drawings.csv", "classnames": "names.txt", "templates": ["a drawing of a {c}."]}}}}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    torch.manual_seed(11)
    model = create_model(MICRO)
    save_file(state_of(model), str(root / "micro.safetensors"))
    save_model(model, root / "saved")
    return root


def mmcoa(args: list[str], cwd: Path, monkeypatch, capsys) -> tuple[int, str, str]:
    """Run `mmcoa ARGS` in this process from ``cwd``: (exit code, stdout, stderr)."""
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["mmcoa", *args])
    try:
        main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code or 0
    out, err = capsys.readouterr()
    return code, out, err


def cache_entries(project: Path) -> dict[str, int]:
    """Prepared subsets of the evaluation cache: folder -> its manifest's modification time."""
    cache = project / "data" / "eval-cache"
    return {p.name: (p / "manifest.json").stat().st_mtime_ns for p in cache.iterdir() if (p / "manifest.json").is_file()} \
        if cache.is_dir() else {}


def test_models_and_datasets_of_every_kind_in_one_command_then_reused(project, monkeypatch, capsys):
    models = [f"{MICRO}:micro.safetensors", "saved"]
    data = ["folder:tree", "drawings", "digits"]
    args = ["evaluate", *(a for m in models for a in ("--model", m)), *(a for d in data for a in ("--data", d))]

    code, out, err = mmcoa([*args, "--out", "first"], project, monkeypatch, capsys)
    assert code == 0, err
    suite = json.loads((project / "first" / "suite.json").read_text())
    pairs = {(r["model"], r["dataset"]) for r in suite["rows"]}
    assert pairs == {(m, d) for m in models for d in ("folder_tree", "drawings", "digits")}
    for row in suite["rows"]:
        assert row["entry"] in ("clean", "image", "worst_image") and row["low"] <= row["value"] <= row["high"], row
    # the same weights, as a file or as a saved folder: the same numbers
    by_model = [{(r["dataset"], r["entry"]): r["value"] for r in suite["rows"] if r["model"] == m} for m in models]
    assert by_model[0] == by_model[1]
    markdown = (project / "first" / "suite.md").read_text()
    assert all(m in markdown for m in models) and "95%" in markdown
    assert "100%" in err  # progress lines (stderr is no terminal here)

    prepared = cache_entries(project)
    assert len(prepared) == len(data)
    manifests = [json.loads((project / "data" / "eval-cache" / p / "manifest.json").read_text()) for p in prepared]
    drawings = next(m for m in manifests if m["name"] == "drawings")
    assert drawings["classnames"] == CLASSES and drawings["templates"] == ["a drawing of a {c}."]
    tree = next(m for m in manifests if m["dataset"] == "folder_tree")
    assert tree["classnames"] == sorted(f"class {c}" for c in CLASSES)  # folder names, as words

    # the pipeline's fetch-eval of the declared dataset draws the same subset as the cache
    code, _, err = mmcoa(["fetch-eval", "drawings", "--out", "data/eval/drawings"], project, monkeypatch, capsys)
    assert code == 0, err
    assert json.loads((project / "data" / "eval" / "drawings" / "manifest.json").read_text()) == drawings

    code, out, err = mmcoa([*args, "--out", "second"], project, monkeypatch, capsys)
    assert code == 0, err
    assert cache_entries(project) == prepared and err.count("reusing") == len(data)  # not prepared again
    assert (project / "second" / "suite.json").read_bytes() == (project / "first" / "suite.json").read_bytes()


def test_attack_on_a_weights_file_and_an_image_folder(project, monkeypatch, capsys, tmp_path):
    out = tmp_path / "attack.json"
    code, _, err = mmcoa(["attack", "--model", f"{MICRO}:micro.safetensors", "--data", "folder:tree", "--attack", "pgd",
                          "-a", "eps_255=4", "-a", "steps=1", "--out", str(out)], project, monkeypatch, capsys)
    assert code == 0, err
    result = json.loads(out.read_text())
    assert result["n"] == 12 and result["dataset"] == "folder_tree" and result["robust_acc"] <= result["clean_acc"]


def test_hf_hub_model_from_a_local_cache_outside_a_project(tmp_path, monkeypatch, capsys):
    """No params.yaml here: the built-in defaults; the model comes from the Hugging Face cache the test builds."""
    from huggingface_hub import constants

    torch.manual_seed(12)
    cache = make_hub_cache(tmp_path / "hub", "mmcoa-test/micro", state_of(create_model(MICRO)),
                           open_clip.get_model_config(MICRO), {})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("MMCOA_EVAL_CACHE", str(tmp_path / "cache"))
    (tmp_path / "work").mkdir()
    code, out, err = mmcoa(["evaluate", "--model", "hf-hub:mmcoa-test/micro", "--data", "digits", "--attack",
                            "pgd:eps_255=4,steps=1", "--n-samples", "10", "-S", "evaluate.linear_probe=false", "--out", "out"],
                           tmp_path / "work", monkeypatch, capsys)
    assert code == 0, err
    rows = json.loads((tmp_path / "work" / "out" / "suite.json").read_text())["rows"]
    assert {r["entry"] for r in rows} == {"clean", "pgd", "worst_image"} and all(r["n"] == 10 for r in rows)
    assert "hf-hub:mmcoa-test/micro" in out
    assert len(list((tmp_path / "cache").iterdir())) == 1  # prepared in the user's cache, not in the folder
    assert not (tmp_path / "work" / "data").exists()


def test_a_retrieval_file_declared_in_params(project, monkeypatch, capsys, tmp_path):
    captions = ["image,caption"] + [f"tree/test/class_{CLASSES[y]}/{i:03d}.png,a drawing of a {CLASSES[y]}"
                                    for i, (_, y) in enumerate(digit_images(8))]
    (project / "captions.csv").write_text("\n".join(captions) + "\n")
    code, _, err = mmcoa(["evaluate", "--model", f"{MICRO}:micro.safetensors", "--data", "pairs", "-S",
                          "evaluate.sources={pairs: {retrieval_csv: captions.csv}}", "-S", "evaluate.n_images=6",
                          "--attack", "pgd:eps_255=4,steps=1", "--out", str(tmp_path / "out")], project, monkeypatch, capsys)
    assert code == 0, err
    rows = json.loads((tmp_path / "out" / "suite.json").read_text())["rows"]
    assert {(r["task"], r["dataset"]) for r in rows} == {("retrieval", "pairs")}
    assert {r["metric"] for r in rows} == {f"{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)}
    assert {r["n"] for r in rows if r["metric"].startswith("i2t")} == {6} and "(retrieval)" in err


def _one_line_exit_2(code: int, err: str, *names: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert all(n in lines[0] for n in names), (names, lines[0])


def test_a_pretrained_tag_without_its_weights_and_a_bare_architecture_are_refused(project, monkeypatch, capsys):
    code, _, err = mmcoa(["evaluate", "--model", "ViT-B-32:openai", "--data", "digits", "--out", "o"], project,
                         monkeypatch, capsys)
    _one_line_exit_2(code, err, "openai", "open_clip_pytorch_model.bin")
    code, _, err = mmcoa(["attack", "--model", MICRO, "--attack", "pgd"], project, monkeypatch, capsys)
    _one_line_exit_2(code, err, MICRO, "without weights", f"{MICRO}:TAG")
    assert not (project / "o").exists()


def test_bad_input_is_one_line_exit_2_and_writes_nothing(project, monkeypatch, capsys, tmp_path):
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes((project / "micro.safetensors").read_bytes()[:1000])
    (tmp_path / "broken.csv").write_text("path,label\nnowhere/a.png,0\nnowhere/b.png,1\n" * 4)
    (tmp_path / "plain").mkdir()
    good = f"{MICRO}:micro.safetensors"
    cases = {  # (model, data, extra args) -> what the one line must name
        "unknown model": ("nosuch-arch", "digits", [], ["nosuch-arch", "mmcoa models"]),
        "unreadable weights": (f"{MICRO}:{truncated}", "digits", [], [str(truncated)]),
        "unknown dataset": (good, "imagenett", [], ["imagenett", "mmcoa datasets"]),
        "absent dataset": (good, "cifar10", ["-S", f"data.root={tmp_path / 'raw'}"], ["cifar10", str(tmp_path / "raw")]),
        "csv naming missing files": (good, f"csv:{tmp_path / 'broken.csv'}", [], ["nowhere/", "not found"]),
        "unprepared folder": (good, str(tmp_path / "plain"), [], [f"folder:{tmp_path / 'plain'}", "mmcoa fetch-eval"]),
        "missing prepared folder": (good, "data/eval/nope", [], ["data/eval/nope", "mmcoa fetch-eval nope --out"]),
        "unknown attack parameter": (good, "digits", ["--attack", "pgd:epz=1"], ["epz", "mmcoa attack --list"]),
        "wrong declared classnames": (good, "{csv: drawings.csv, classnames: [cat, dog]}", [], ["label '2'", "classnames"]),
    }
    before = cache_entries(project)
    for label, (model, data, extra, names) in cases.items():
        code, _, err = mmcoa(["evaluate", "--model", model, "--data", data, *extra, "--out", str(tmp_path / "out")],
                             project, monkeypatch, capsys)
        _one_line_exit_2(code, err, *names)
        assert not (tmp_path / "out").exists(), label
    code, _, err = mmcoa(["attack", "--model", good, "--attack", "pgd", "-a", "epz=1"], project, monkeypatch, capsys)
    _one_line_exit_2(code, err, "epz")
    assert cache_entries(project) == before  # nothing prepared either
    leftovers = [p for p in (project / "data" / "eval-cache").glob(".*")] if (project / "data" / "eval-cache").is_dir() else []
    assert not leftovers


def test_a_download_without_network_names_the_dataset_its_folder_and_the_fix(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"data": {"download": True, "root": str(tmp_path / "raw")}}))
    env = {**os.environ, "https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9", "no_proxy": ""}
    proc = subprocess.run([str(MMCOA), "fetch-eval", "cifar10", "--out", "eval"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    _one_line_exit_2(proc.returncode, proc.stderr, "cifar10", str(tmp_path / "raw" / "cifar-10-batches-py"),
                     "copy them into", "data.download: false")
    assert not (tmp_path / "eval").exists()


def test_attack_list_says_required_and_every_choice(monkeypatch, capsys, tmp_path):
    from typing import Literal, get_args, get_origin

    from mmcoa.attacks import attack_class, list_attacks
    from mmcoa.attacks.candidates import list_sources
    from stages.attack import describe_field

    monkeypatch.setenv("COLUMNS", "4000")  # one line per attack
    code, out, _ = mmcoa(["attack", "--list"], tmp_path, monkeypatch, capsys)
    flat = "".join(out.split())
    assert code == 0 and "PydanticUndefined" not in flat
    for name in list_attacks():
        assert name in out
        for key, info in attack_class(name).Params.model_fields.items():
            text = describe_field(key, info)
            if info.is_required():
                assert text == f"{key}=required"
            choices = next((get_args(a) for a in (info.annotation, *get_args(info.annotation)) if get_origin(a) is Literal), None)
            if choices:
                assert "|".join(choices) in text and "".join(text.split()) in flat, text
    assert "|".join(list_sources()) in describe_field("candidates", attack_class("word").Params.model_fields["candidates"])


def test_datasets_lists_classification_and_retrieval_sets_and_every_reference_form(monkeypatch, capsys, tmp_path):
    from mmcoa.data import list_datasets, list_schemes
    from mmcoa.data.retrieval import list_retrieval_datasets

    code, out, _ = mmcoa(["datasets", "--root", str(tmp_path)], tmp_path, monkeypatch, capsys)
    assert code == 0
    for name in list_datasets() + list_retrieval_datasets():
        assert name in out, name
    for scheme in [s for s in list_schemes() if s != "declared"] + ["retrieval-json", "retrieval-csv"]:
        assert f"{scheme}:PATH" in out, scheme
    assert "evaluate.sources" in out and "mmcoa fetch-eval" in out
