"""Real open_clip models and real dataset formats, offline."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import open_clip
from mmcoa.data import DataError, load_prepared, prepare
from mmcoa.models import ModelLoadError, create_model, load_model, save_model


def test_save_load_roundtrip_is_open_clip_local_dir(tmp_path):
    torch.manual_seed(0)
    model = create_model("mmcoa-test-micro")
    save_model(model, tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["open_clip_config.json", "open_clip_model.safetensors"]
    again = load_model(tmp_path / "m")
    x = torch.rand(3, 1, 28, 28)
    assert torch.equal(model.encode_image(x), again.encode_image(x))
    tokens = model.tokenize(["a photo of a coat."])
    assert torch.equal(model.encode_text(tokens), again.encode_text(tokens))
    # The folder is a plain open_clip model too.
    raw = open_clip.create_model(f"local-dir:{tmp_path / 'm'}")
    assert torch.allclose(raw.encode_text(tokens), model.clip.encode_text(tokens))


def test_pretrained_local_weights_file(tmp_path):
    """The real pretrained path: an open_clip architecture plus a local weights file."""
    from safetensors.torch import save_file

    torch.manual_seed(1)
    src = create_model("mmcoa-test-micro")
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in src.clip.state_dict().items()}, str(path))
    loaded = create_model("mmcoa-test-micro", pretrained=str(path))
    x = torch.rand(2, 3, 28, 28)
    assert torch.equal(src.encode_image(x), loaded.encode_image(x))


def test_model_errors_are_clear():
    with pytest.raises(ModelLoadError, match="unknown architecture"):
        create_model("ViT-Q-99")
    with pytest.raises(ModelLoadError, match="neither a local file nor a tag"):
        create_model("ViT-B-32", pretrained="no-such-tag")


def test_images_are_pixel_space_and_resized():
    model = create_model("mmcoa-test-micro")
    small = torch.rand(2, 3, 14, 14)
    assert model.encode_image(small).shape == (2, 32)
    assert torch.allclose(model.encode_image(small).norm(dim=-1), torch.ones(2), atol=1e-5)


def test_prepare_fashion_mnist_is_stratified_and_seeded(tmp_path, fmnist_dir):
    train = load_prepared(fmnist_dir, "train")
    assert train.images.dtype == torch.uint8 and train.images.shape[1:] == (1, 28, 28)
    assert len(train) == 4000 and train.labels.bincount().tolist() == [400] * 10
    meta = json.loads((fmnist_dir / "meta.json").read_text())
    assert meta["classnames"][0] == "t-shirt"


def test_imagefolder_source_real_format(tmp_path):
    """A torchvision ImageFolder tree (train/ and test/, one folder per class) of real PNG files."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            d = tmp_path / "folder" / split / cls
            d.mkdir(parents=True)
            for i in range(6):
                Image.fromarray(rng.integers(0, 255, (20 + i, 24, 3), dtype=np.uint8)).save(d / f"{i}.png")
    meta = prepare(f"folder:{tmp_path / 'folder'}", tmp_path / "out", n_train=8, n_test=4, seed=0, image_size=16)
    assert meta["classnames"] == ["cat", "dog"]
    test = load_prepared(tmp_path / "out", "test")
    assert test.images.shape == (4, 3, 16, 16) and test.labels.bincount().tolist() == [2, 2]


def test_missing_data_says_how(tmp_path, monkeypatch):
    import mmcoa.data.sources as sources

    monkeypatch.setattr(sources, "DEBIAN_FASHION_MNIST", tmp_path / "nowhere")
    with pytest.raises(DataError, match="dataset-fashion-mnist"):
        prepare("fashion_mnist", tmp_path / "o", 10, 10, 0, root=tmp_path / "raw")
    assert not (tmp_path / "o" / "train.safetensors").exists()
