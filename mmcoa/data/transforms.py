"""Image resizing as CLIP preprocesses: uint8 [C, H, W] in, uint8 [C, S, S] out, antialiased.

Resize modes (open_clip's names): ``shortest`` scales the shortest side to S and centre-crops (CLIP's
own preprocessing); ``squash`` scales both sides to S (aspect ratio lost); ``longest`` scales the
longest side to S and pads the rest with zeros (nothing cropped).
"""

from __future__ import annotations

from typing import Callable

import torch

from mmcoa.data.base import DataError

INTERPOLATIONS = ("bicubic", "bilinear", "nearest")


def _mode(name: str):
    from torchvision.transforms import InterpolationMode

    if name not in INTERPOLATIONS:
        raise DataError(f"interpolation: '{name}' is not one of {', '.join(INTERPOLATIONS)}")
    return InterpolationMode(name)


def _shortest(img: torch.Tensor, size: int, interp) -> torch.Tensor:
    from torchvision.transforms.functional import center_crop, resize

    return center_crop(resize(img, size, interpolation=interp, antialias=True), [size, size])


def _squash(img: torch.Tensor, size: int, interp) -> torch.Tensor:
    from torchvision.transforms.functional import resize

    return resize(img, [size, size], interpolation=interp, antialias=True)


def _longest(img: torch.Tensor, size: int, interp) -> torch.Tensor:
    from torchvision.transforms.functional import resize

    h, w = img.shape[-2:]
    nh, nw = max(1, round(h * size / max(h, w))), max(1, round(w * size / max(h, w)))
    out = resize(img, [nh, nw], interpolation=interp, antialias=True)
    top, left = (size - nh) // 2, (size - nw) // 2
    canvas = torch.zeros(*img.shape[:-2], size, size, dtype=img.dtype)
    canvas[..., top : top + nh, left : left + nw] = out
    return canvas


RESIZE_MODES: dict[str, Callable] = {"shortest": _shortest, "squash": _squash, "longest": _longest}


def check_resize(interpolation: str, resize_mode: str) -> None:
    """Raise :class:`DataError` for an unknown interpolation or resize mode (before any work starts)."""
    _mode(interpolation)
    if resize_mode not in RESIZE_MODES:
        raise DataError(f"resize_mode: '{resize_mode}' is not one of {', '.join(RESIZE_MODES)}")


def resize_image(img: torch.Tensor, size: int, interpolation: str = "bicubic", resize_mode: str = "shortest") -> torch.Tensor:
    """uint8 images [..., C, H, W] to [..., C, size, size]; unchanged if they already are that size."""
    if tuple(img.shape[-2:]) == (size, size):
        return img
    return RESIZE_MODES[resize_mode](img, size, _mode(interpolation))


def resize_batch(images: list[torch.Tensor], size: int, interpolation: str = "bicubic", resize_mode: str = "shortest") -> torch.Tensor:
    """A list of uint8 [C, H, W] images of any sizes -> uint8 [B, C, size, size].

    Images of one size are resized together in one call (a dataset of uniform images costs one
    batched resize, not B small ones); the result is the same as resizing each alone.
    """
    out = torch.empty(len(images), images[0].shape[0], size, size, dtype=images[0].dtype)
    groups: dict[tuple, list[int]] = {}
    for k, img in enumerate(images):
        groups.setdefault(tuple(img.shape), []).append(k)
    for members in groups.values():
        out[members] = resize_image(torch.stack([images[k] for k in members]), size, interpolation, resize_mode)
    return out
