"""Image files to uint8 tensors: every colour mode becomes RGB; a damaged file names itself."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mmcoa.data.errors import CorruptImageError

# Errors that decoding a damaged or truncated file raises (PIL raises several kinds).
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, RuntimeError)


def to_rgb(img):
    """A PIL image in RGB: greyscale, RGBA (alpha dropped), CMYK, palette, 16-bit and float modes."""
    if img.mode == "RGB":
        return img
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # PIL's advice for palette images with a transparent index
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        from PIL import Image

        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        img = Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8))
    return img.convert("RGB")


def pil_to_uint8(img, keep_gray: bool = False) -> torch.Tensor:
    """uint8 [C, H, W]: [1, H, W] for a greyscale image when ``keep_gray``, RGB otherwise."""
    from torchvision.transforms.functional import pil_to_tensor

    return pil_to_tensor(img if keep_gray and img.mode == "L" else to_rgb(img))


def read_image_file(path: str | Path) -> torch.Tensor:
    """Decode one image file to uint8 [3, H, W]; :class:`CorruptImageError` names the file if it fails."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
            return pil_to_uint8(img)
    except DECODE_ERRORS as err:
        raise CorruptImageError(str(path), f"{type(err).__name__}: {err}") from None
