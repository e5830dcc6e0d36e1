"""The one image resize of mmcoa, as open_clip preprocesses: used by the data path and inside the model.

:func:`resize` takes float images in [0, 1] and is differentiable, so training, clean evaluation and
attacks (which perturb native-size pixels and back-propagate through the model's own resize) all see
the same pixels. It is torchvision's resize with antialiasing (as ``torchvision.transforms.Resize`` does
on images), then a centre crop (which pads with zeros where the image is smaller), clamped to [0, 1] as
an 8-bit pipeline clamps.

Resize modes (open_clip's names, as its pretrained configs carry them): ``shortest`` scales the shortest
side to the target and centre-crops (CLIP's own preprocessing); ``squash`` scales both sides to the
target (aspect ratio lost); ``longest`` scales the longest side to the target and pads the rest with
zeros (nothing cropped). Interpolation: ``bicubic``, ``bilinear`` (open_clip's) or ``nearest``.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from mmcoa.data.base import DataError

INTERPOLATIONS = ("bicubic", "bilinear", "nearest")
Size = tuple[int, int]


def _shortest(h: int, w: int, H: int, W: int) -> Size:
    if H == W:  # torchvision's Resize(S), which open_clip uses for a square target: the long side floored
        return (H, math.floor(H * w / h)) if h <= w else (math.floor(H * h / w), H)
    ratio = min(h / H, w / W)  # open_clip's ResizeKeepRatio (longest=0) for a non-square target
    return round(h / ratio), round(w / ratio)


def _longest(h: int, w: int, H: int, W: int) -> Size:
    ratio = max(h / H, w / W)  # open_clip's ResizeKeepRatio(longest=1)
    return max(1, round(h / ratio)), max(1, round(w / ratio))


def _squash(h: int, w: int, H: int, W: int) -> Size:
    return H, W


# resize mode -> the size an [h, w] image is scaled to before the centre crop (or pad) to [H, W]
RESIZE_MODES: dict[str, Callable[[int, int, int, int], Size]] = {
    "shortest": _shortest,
    "squash": _squash,
    "longest": _longest,
}


def _mode(name: str):
    from torchvision.transforms import InterpolationMode

    if name not in INTERPOLATIONS:
        raise DataError(f"interpolation: '{name}' is not one of {', '.join(INTERPOLATIONS)}")
    return InterpolationMode(name)


def check_resize(interpolation: str, resize_mode: str) -> None:
    """Raise :class:`DataError` for an unknown interpolation or resize mode (before any work starts)."""
    _mode(interpolation)
    if resize_mode not in RESIZE_MODES:
        raise DataError(f"resize_mode: '{resize_mode}' is not one of {', '.join(RESIZE_MODES)}")


def _target(size: int | Sequence[int]) -> Size:
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def resize(images: torch.Tensor, size: int | Sequence[int], interpolation: str = "bicubic",
           resize_mode: str = "shortest") -> torch.Tensor:
    """Float images [..., C, h, w] in [0, 1] -> [..., C, H, W] (``size``: S or [H, W]); differentiable.

    Unchanged (the same tensor) when the images already have the target size.
    """
    from torchvision.transforms.v2.functional import center_crop, resize as tv_resize

    check_resize(interpolation, resize_mode)
    if not images.is_floating_point():
        raise TypeError(f"resize takes float images in [0, 1], not {images.dtype}")
    H, W = _target(size)
    h, w = images.shape[-2:]
    if (h, w) == (H, W):
        return images
    scaled = list(RESIZE_MODES[resize_mode](h, w, H, W))
    out = tv_resize(images, scaled, interpolation=_mode(interpolation), antialias=True)
    return center_crop(out, [H, W]).clamp(0.0, 1.0)


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 in [0, 1] (the convention everywhere outside the data files)."""
    return images.float().div_(255.0)


def resize_floats(images: list[torch.Tensor], size: int, interpolation: str = "bicubic",
                  resize_mode: str = "shortest") -> torch.Tensor:
    """A list of uint8 [C, H, W] images of any sizes -> float [B, C, size, size] in [0, 1], not quantised.

    What the data path hands a model: the same pixels the model's own resize makes of the native image.
    Images of one size are resized together in one call (a dataset of uniform images costs one batched
    resize, not B small ones); the result is the same as resizing each alone.
    """
    check_resize(interpolation, resize_mode)
    out = torch.empty(len(images), images[0].shape[0], size, size, dtype=torch.float32)
    groups: dict[tuple, list[int]] = {}
    for k, img in enumerate(images):
        groups.setdefault(tuple(img.shape), []).append(k)
    for members in groups.values():
        out[members] = resize(to_float(torch.stack([images[k] for k in members])), size, interpolation, resize_mode)
    return out


def quantize(images: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] -> uint8 (rounded), for caches that store 8-bit pixels."""
    return images.mul(255.0).round_().clamp_(0, 255).to(torch.uint8)


def resize_image(img: torch.Tensor, size: int, interpolation: str = "bicubic", resize_mode: str = "shortest") -> torch.Tensor:
    """uint8 images [..., C, H, W] to uint8 [..., C, size, size] (:func:`resize`, then 8-bit rounding);
    unchanged if they already are that size."""
    if tuple(img.shape[-2:]) == (size, size):
        return img
    return quantize(resize(to_float(img), size, interpolation, resize_mode))


def resize_batch(images: list[torch.Tensor], size: int, interpolation: str = "bicubic", resize_mode: str = "shortest") -> torch.Tensor:
    """A list of uint8 [C, H, W] images of any sizes -> uint8 [B, C, size, size]: :func:`resize_floats`
    rounded to 8 bits, for callers that store or ship uint8 (a model fed these differs from its own
    resize by the rounding, at most 0.5/255; feed :func:`resize_floats` to avoid it)."""
    return quantize(resize_floats(images, size, interpolation, resize_mode))
