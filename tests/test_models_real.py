"""The real model path, offline: references, pretrained tags, weights files, the hub cache, load errors.

Everything runs on the micro config (or builds ViT-B-32 without weights); nothing is downloaded.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

import open_clip
from open_clip.transformer import QuickGELU
from mmcoa.models import ModelLoadError, create_model, load_model, parse_model_ref, save_model
from stages.common import StageError

MICRO = "mmcoa-test-micro"
MMCOA = Path(sys.executable).parent / "mmcoa"  # the console script of this environment


def activations(model) -> list[type]:
    """The activation class of every transformer MLP of both towers."""
    return [type(m.gelu) for m in model.clip.modules() if isinstance(m, nn.Sequential) and hasattr(m, "gelu")]


def state_of(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.clip.state_dict().items()}


def assert_same_weights(model, state: dict[str, torch.Tensor]) -> None:
    own = model.clip.state_dict()
    assert own.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(own[k], v.to(own[k].dtype)), k


def start_cli(args: list[str], cwd: Path, **env: str) -> subprocess.Popen:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **env}
    return subprocess.Popen([str(MMCOA), *args], cwd=cwd, env=full_env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


def write_params(path: Path, tree: dict) -> Path:
    path.write_text(yaml.safe_dump({"device": "cpu", "threads": 1, **tree}))
    return path


# --- references ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "pretrained", "schema", "identifier", "has_weights"),
    [
        ("ViT-B-32", None, "arch", "ViT-B-32", False),
        ("ViT-B/32", "openai", "arch", "ViT-B-32", True),
        ("hf-hub:chs20/fare2-clip", None, "hf-hub", "chs20/fare2-clip", True),
        (MICRO, "weights/fare.safetensors", "file", MICRO, True),
        ("local-dir:models/base", None, "local-dir", "models/base", True),
        ("models/base", None, "local-dir", "models/base", True),
    ],
)
def test_references_parse_once_into_a_schema(arch, pretrained, schema, identifier, has_weights):
    ref = parse_model_ref(arch, pretrained)
    assert (ref.schema, ref.identifier, ref.has_weights) == (schema, identifier, has_weights)
    assert parse_model_ref(ref) is ref


@pytest.mark.parametrize(
    ("arch", "pretrained", "message"),
    [
        ("hf-hub:chs20/fare2-clip", "openai", "carries its own weights"),
        ("fare.safetensors", None, "give its architecture as arch"),
        ("ViT-Q-99", None, "unknown architecture"),
        ("ViT-B-32", "no-such-tag", "neither a local file nor a tag"),
        ("hf-hub:", None, "Empty identifier"),
    ],
)
def test_reference_errors_say_what_to_write(arch, pretrained, message):
    with pytest.raises(ModelLoadError, match=message):
        parse_model_ref(arch, pretrained)


# --- pretrained tags: the weights' activation and preprocessing ---------------------------------


def test_openai_tag_builds_vit_b_32_with_quick_gelu_and_bicubic():
    """OpenAI's weights need QuickGELU; open_clip only warns and builds ViT-B-32 with nn.GELU."""
    assert not open_clip.get_model_config("ViT-B-32").get("quick_gelu")  # the bare arch would be GELU
    model = create_model("ViT-B-32", "openai", load_weights=False)  # the tag's config, no download
    acts = activations(model)
    assert len(acts) == 24 and set(acts) == {QuickGELU}, acts  # 12 image + 12 text blocks
    assert model.model_cfg["quick_gelu"] is True  # recorded, so a saved copy rebuilds it
    tag = open_clip.get_pretrained_cfg("ViT-B-32", "openai")
    assert model.preprocess == {
        "size": [224, 224], "mean": list(tag["mean"]), "std": list(tag["std"]),
        "interpolation": "bicubic", "resize_mode": "shortest",
    }


def test_pretrained_tag_weights_activation_and_preprocessing_survive_save_and_load(tmp_path, monkeypatch):
    """A tag whose weights are a local file (open_clip's ``file`` entry): the whole tag path, offline."""
    torch.manual_seed(3)
    src = create_model(MICRO)
    state = state_of(src)
    save_file(state, str(tmp_path / "w.safetensors"))
    tag = {"file": str(tmp_path / "w.safetensors"), "quick_gelu": True, "mean": (0.5, 0.4, 0.3),
           "std": (0.2, 0.25, 0.3), "interpolation": "bicubic", "resize_mode": "squash"}
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, MICRO, {"openai_like": tag})

    model = create_model(MICRO, "openai_like")
    assert_same_weights(model, state)
    assert set(activations(model)) == {QuickGELU} and set(activations(src)) == {nn.GELU}
    assert model.preprocess["mean"] == [0.5, 0.4, 0.3] and model.preprocess["interpolation"] == "bicubic"

    save_model(model, tmp_path / "saved")
    again = load_model(tmp_path / "saved")
    assert set(activations(again)) == {QuickGELU}
    assert again.preprocess == model.preprocess
    assert_same_weights(again, state)

    # 32 px inputs (CIFAR perturbed at native size) are resized inside the model with the tag's
    # interpolation, antialiased as torchvision's Resize is (a 32 -> 28 px downscale: antialiasing matters).
    x = torch.rand(4, 3, 32, 32)
    out = again.encode_image(x)
    assert torch.equal(out, model.encode_image(x))
    mean, std = torch.tensor(tag["mean"]).view(1, 3, 1, 1), torch.tensor(tag["std"]).view(1, 3, 1, 1)

    def by_hand(mode, antialias=True):
        up = F.interpolate(x, size=(28, 28), mode=mode, align_corners=False, antialias=antialias).clamp(0, 1)
        return F.normalize(again.clip.encode_image((up - mean) / std), dim=-1)

    assert torch.allclose(out, by_hand("bicubic"), atol=1e-6)
    assert not torch.allclose(out, by_hand("bicubic", antialias=False), atol=1e-4)
    assert not torch.allclose(out, by_hand("bilinear"), atol=1e-4)


def test_openai_style_weights_file_loads(tmp_path, caplog):
    """float16 tensors plus the TorchScript model's extra keys, as OpenAI's checkpoints have them."""
    torch.manual_seed(4)
    src = create_model(MICRO)
    state = {k: v.half() for k, v in state_of(src).items()}
    extras = {"input_resolution": torch.tensor(28), "context_length": torch.tensor(16), "vocab_size": torch.tensor(49408)}
    torch.save({**state, **extras}, tmp_path / "openai.pt")
    # and as a training checkpoint of a DDP-wrapped model
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "ddp.pt")

    with caplog.at_level(logging.WARNING):
        model = create_model(MICRO, str(tmp_path / "openai.pt"))
    assert_same_weights(model, state)
    assert model.clip.visual.conv1.weight.dtype == torch.float32
    assert any("QuickGELU" in r.getMessage() for r in caplog.records)  # this arch uses GELU: told so
    assert_same_weights(create_model(MICRO, str(tmp_path / "ddp.pt")), state)


# --- broken and foreign checkpoints -------------------------------------------------------------


class Foreign:
    """Any Python object: weights_only loading refuses to unpickle it."""


def test_broken_or_foreign_checkpoints_name_the_file(tmp_path):
    torch.manual_seed(5)
    micro = create_model(MICRO)
    good = tmp_path / "good.safetensors"
    save_file(state_of(micro), str(good))

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    other = tmp_path / "tiny.safetensors"
    save_file(state_of(create_model("mmcoa-tiny-fmnist")), str(other))
    noise = tmp_path / "noise.pt"
    noise.write_bytes(os.urandom(4096))
    pickled = tmp_path / "pickled.pt"
    torch.save({"visual.proj": torch.zeros(1), "extra": Foreign()}, pickled)
    cases = {
        truncated: "truncated or corrupt",
        other: f"not the weights of {MICRO}",
        noise: "not a readable PyTorch weights file",
        pickled: "refused",
        tmp_path / "absent.safetensors": "no such weights file",
    }
    for path, expected in cases.items():
        with pytest.raises(ModelLoadError) as info:
            create_model(MICRO, str(path))
        message = str(info.value)
        assert str(path) in message and expected in message and "\n" not in message, message

    with pytest.raises(ModelLoadError, match="no such model folder"):
        load_model(tmp_path / "nowhere")
    save_model(micro, tmp_path / "saved")
    weights = tmp_path / "saved" / "open_clip_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match="open_clip_model.safetensors"):
        load_model(tmp_path / "saved")


def test_truncated_text_warns_once_naming_it(caplog):
    model = create_model(MICRO)  # context of 16 tokens: start, 14 words, end
    fits, too_long = " ".join(["a"] * 14), " ".join(["a"] * 15) + " coat"
    with caplog.at_level(logging.WARNING):
        model.tokenize([fits, too_long, "a coat"])
        model.encode_texts([too_long, fits])
        model.tokenize([too_long])
    warned = [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]
    assert len(warned) == 1 and repr(too_long) in warned[0], warned


def test_tokenize_fitting_matches_the_tokenizer_and_flags_what_does_not_fit(caplog):
    model = create_model(MICRO)
    texts = [" ".join(["a"] * 14), " ".join(["a"] * 15) + " coat", "a coat", ""]
    with caplog.at_level(logging.WARNING):
        tokens, fits = model.tokenize_fitting(texts)
    assert fits.tolist() == [True, False, True, True]
    assert torch.equal(tokens, model.tokenizer(texts))  # the tower's own truncation where it does not fit
    assert not [r for r in caplog.records if "truncated" in r.getMessage()]  # candidates: rejected, not warned


# --- the base stage: loaded as it is ------------------------------------------------------------


def make_hub_cache(root: Path, repo_id: str, state: dict, model_cfg: dict, preprocess_cfg: dict) -> Path:
    """A Hugging Face hub cache as huggingface_hub lays it out, holding one open_clip model."""
    rev = "0123456789abcdef0123456789abcdef01234567"
    repo = root / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / rev
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}
    (snapshot / "open_clip_config.json").write_text(json.dumps(config))
    save_file(state, str(snapshot / "open_clip_model.safetensors"))
    return root


def test_hf_hub_model_passes_the_base_stage_unchanged(tmp_path):
    torch.manual_seed(6)
    state = state_of(create_model(MICRO))
    model_cfg = {**open_clip.get_model_config(MICRO), "quick_gelu": True}
    preprocess = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "interpolation": "bicubic", "resize_mode": "squash"}
    cache = make_hub_cache(tmp_path / "hub", "mmcoa-test/micro-robust", state, model_cfg, preprocess)
    params = write_params(tmp_path / "params.yaml", {"base": {"model": {"arch": "hf-hub:mmcoa-test/micro-robust"}}})

    code, out, err = finish(start_cli(["base", "--params", str(params), "--out", str(tmp_path / "base")], tmp_path,
                                      HF_HUB_CACHE=str(cache)))
    assert code == 0, err
    saved = load_file(str(tmp_path / "base" / "open_clip_model.safetensors"))
    assert saved.keys() == state.keys() and all(torch.equal(saved[k], v) for k, v in state.items())
    assert json.loads((tmp_path / "base" / "history.json").read_text()) == []  # not trained
    config = json.loads((tmp_path / "base" / "open_clip_config.json").read_text())
    assert config["model_cfg"]["quick_gelu"] is True
    assert {k: config["preprocess_cfg"][k] for k in preprocess} == preprocess
    loaded = load_model(tmp_path / "base")  # later stages need no hub cache
    assert set(activations(loaded)) == {QuickGELU} and loaded.preprocess["mean"] == [0.5, 0.5, 0.5]


def test_base_stage_never_pretrains_a_model_that_has_weights(tmp_path):
    from stages.base import base

    torch.manual_seed(7)
    save_file(state_of(create_model(MICRO)), str(tmp_path / "w.safetensors"))
    for model in ({"arch": "hf-hub:chs20/fare2-clip"}, {"arch": MICRO, "pretrained": str(tmp_path / "w.safetensors")}):
        params = write_params(tmp_path / "params.yaml", {"base": {"model": model, "pretrain": {"steps": 1}}})
        with pytest.raises(StageError) as info:
            base(out=tmp_path / "out", params=params, set_=[])
        assert "base.pretrain" in str(info.value) and "base.model" in str(info.value)
        assert not (tmp_path / "out").exists()


# --- `mmcoa attack`: a wrong model or data folder is one line, exit 2 ---------------------------


def test_attack_cli_load_errors_are_one_line_exit_2(tmp_path):
    params = write_params(tmp_path / "params.yaml", {})
    torch.manual_seed(8)
    micro = create_model(MICRO)
    save_model(micro, tmp_path / "good")
    save_model(micro, tmp_path / "truncated")
    weights = tmp_path / "truncated" / "open_clip_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:2000])
    (tmp_path / "empty").mkdir()
    cases = {  # (--model, --data) -> what the one line must name
        "missing model": (tmp_path / "missing", tmp_path / "empty", str(tmp_path / "missing")),
        "truncated weights": (tmp_path / "truncated", tmp_path / "empty", str(weights)),
        "no prepared split": (tmp_path / "good", tmp_path / "empty", str(tmp_path / "empty")),
    }
    procs = {
        label: start_cli(["attack", "--attack", "pgd", "--model", str(m), "--data", str(d), "--params", str(params)], tmp_path)
        for label, (m, d, _) in cases.items()
    }
    for label, proc in procs.items():
        code, out, err = finish(proc)
        assert code == 2, (label, code, err)
        assert "Traceback" not in err, (label, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and cases[label][2] in lines[0], (label, err)
