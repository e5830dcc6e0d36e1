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


# JPEG and PNG decode through torchvision's libjpeg/libpng bindings: one C call per file, several
# times faster than PIL's Python-level open/load/convert for small images, and bit-identical to
# PIL's RGB conversion for greyscale, RGBA, palette and CMYK files (tests/test_datasets.py checks).
# Everything else, and any file these decoders reject, goes through PIL, whose error names the cause.
FAST_SUFFIXES = (".jpg", ".jpeg", ".png")
_FAST_DEPRECATION = "The image decoding and encoding capabilities of TorchVision"


def _fast_decode(path: str) -> torch.Tensor | None:
    """uint8 [3, H, W] from torchvision.io, or None when it cannot (then PIL decides)."""
    import warnings

    try:
        from torchvision.io import ImageReadMode, decode_image, read_file
    except ImportError:  # a torchvision without image I/O
        return None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_FAST_DEPRECATION, category=DeprecationWarning)
        try:
            img = decode_image(read_file(path), mode=ImageReadMode.RGB)
        except (RuntimeError, ValueError, OSError):
            return None
    return img if img.dtype == torch.uint8 and img.ndim == 3 and img.shape[0] == 3 else None


def read_image_file(path: str | Path) -> torch.Tensor:
    """Decode one image file to uint8 [3, H, W]; :class:`CorruptImageError` names the file if it fails."""
    from PIL import Image

    path = str(path)
    if path.lower().endswith(FAST_SUFFIXES):
        fast = _fast_decode(path)
        if fast is not None:
            return fast
    try:
        with Image.open(path) as img:
            img.load()
            return pil_to_uint8(img)
    except DECODE_ERRORS as err:
        raise CorruptImageError(path, f"{type(err).__name__}: {err}") from None
