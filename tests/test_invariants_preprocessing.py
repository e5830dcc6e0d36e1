"""One preprocessing: the pixels a model sees do not depend on who resized them.

An attack perturbs an image at its native size and back-propagates through the model's own resize
(``ClipModel.resize``); training and clean evaluation at ``data.resolution: model`` get images the loader
resized. Both must be the same pixels, for every interpolation and resize mode a pretrained tag can
carry, upscaling and downscaling, square and non-square images; otherwise an attack's budget is spent
on a different image than the one clean accuracy was measured on.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import open_clip
from open_clip.transform import PreprocessCfg
from mmcoa.data import make_loader
from mmcoa.data.base import ArrayDataset
from mmcoa.data.transforms import INTERPOLATIONS, RESIZE_MODES
from mmcoa.models import ClipModel, create_model

MICRO = "mmcoa-test-micro"  # a 28 px tower
# (height, width) of native images: down- and upscaled, square and not, portrait and landscape
SHAPES = [(56, 56), (14, 14), (40, 60), (60, 34), (20, 12), (9, 21)]


def tag_preprocessing() -> set[tuple[str, str]]:
    """Every (interpolation, resize_mode) open_clip's pretrained tags carry (its defaults where a tag names none)."""
    default = PreprocessCfg()
    return {
        (cfg.get("interpolation") or default.interpolation, cfg.get("resize_mode") or default.resize_mode)
        for cfg in (open_clip.get_pretrained_cfg(arch, tag) for arch, tag in open_clip.list_pretrained())
    }


# Every value mmcoa accepts: those of open_clip's tags (checked below) and nearest / longest besides.
SUPPORTED = [(i, m) for i in INTERPOLATIONS for m in RESIZE_MODES]


def test_every_tag_preprocessing_is_supported():
    carried = tag_preprocessing()
    assert len(carried) > 1  # the tags do differ: bilinear and squash both occur
    assert carried <= set(SUPPORTED), carried - set(SUPPORTED)


@pytest.fixture(scope="module")
def micro() -> ClipModel:
    torch.manual_seed(0)
    return create_model(MICRO)


def with_preprocessing(model: ClipModel, interpolation: str, resize_mode: str) -> ClipModel:
    """The same weights with another tag's preprocessing (as a tag's config gives it at load)."""
    pre = {**model.preprocess, "interpolation": interpolation, "resize_mode": resize_mode}
    return ClipModel(model.clip, model.model_cfg, model.tokenizer, pre, model.tokenizer_ref).eval()


def images_of(shape: tuple[int, int], n: int = 3) -> ArrayDataset:
    """A real in-memory dataset of ``n`` RGB images: smooth content plus noise (edges and ringing)."""
    rng = np.random.default_rng(shape[0] * 100 + shape[1])
    h, w = shape
    ramp = np.add.outer(np.linspace(0, 200, h), np.linspace(0, 55, w))[None, :, :, None]
    array = np.clip(ramp + rng.integers(0, 60, (n, h, w, 3)), 0, 255).astype(np.uint8)
    return ArrayDataset("shapes", "test", array, np.arange(n) % 2, ["a", "b"], ["a photo of a {}."])


@pytest.mark.parametrize("interpolation,resize_mode", SUPPORTED)
def test_attack_path_sees_the_data_paths_pixels(micro, interpolation, resize_mode):
    model = with_preprocessing(micro, interpolation, resize_mode)
    size = model.image_size[0]
    for shape in SHAPES:
        data = images_of(shape)
        batch = [list(range(len(data)))]
        native, _, _ = next(iter(make_loader(data, batch)))  # what an attack perturbs
        loaded, _, _ = next(iter(make_loader(data, batch, size=size, interpolation=interpolation, resize_mode=resize_mode)))
        inside = model.resize(native)
        where = f"{interpolation}/{resize_mode}, {shape[0]}x{shape[1]} -> {size}"
        assert inside.shape == loaded.shape == (len(data), 3, size, size), where
        assert (inside - loaded).abs().max() < 1e-5, where
        with torch.no_grad():
            assert torch.allclose(model.encode_image(native), model.encode_image(loaded), atol=1e-5), where


@pytest.mark.parametrize("interpolation,resize_mode", [(i, m) for i in ("bicubic", "bilinear") for m in RESIZE_MODES])
def test_the_resize_is_open_clips_preprocessing(interpolation, resize_mode):
    """Against open_clip's own inference transform (on PIL images, 8-bit; every interpolation and resize
    mode it implements): the same geometry (scaled size, crop and pad offsets) and the same antialiased
    filter, up to 8-bit rounding (about 0.3/255 on average here)."""
    from PIL import Image

    model = with_preprocessing(create_model(MICRO), interpolation, resize_mode)
    size = model.image_size[0]
    reference = open_clip.image_transform(size, is_train=False, mean=(0.0,) * 3, std=(1.0,) * 3,
                                          resize_mode=resize_mode, interpolation=interpolation)
    for shape in SHAPES:
        data = images_of(shape, n=1)
        want = reference(Image.fromarray(data.array[0]))
        native, _, _ = next(iter(make_loader(data, [[0]])))
        got = model.resize(native)[0]
        where = f"{interpolation}/{resize_mode}, {shape[0]}x{shape[1]} -> {size}"
        assert got.shape == want.shape, where
        assert (got - want).abs().mean() < 0.6 / 255 and (got - want).abs().max() < 5 / 255, where


def test_the_attack_path_is_differentiable(micro):
    """Attacks back-propagate to native pixels through the model's resize."""
    for interpolation, resize_mode in SUPPORTED:
        model = with_preprocessing(micro, interpolation, resize_mode)
        x = next(iter(make_loader(images_of((40, 60), n=2), [[0, 1]])))[0].requires_grad_(True)
        model.encode_image(x).sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0, (interpolation, resize_mode)
