"""Load, wrap and save open_clip CLIP models.

:class:`ClipModel` takes images as float tensors in [0, 1] (any size; resized to the tower's input
inside) and applies CLIP's mean/std normalisation itself, so every attack works in pixel space.
Checkpoints use open_clip's own ``local-dir`` format (``open_clip_config.json`` +
``open_clip_model.safetensors``): a saved model loads with ``open_clip.create_model("local-dir:DIR")``
too, and nothing is ever unpickled.
"""

from __future__ import annotations

import json
import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import open_clip

CONFIG_DIR = Path(__file__).parent / "model_configs"
CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"

open_clip.add_model_config(CONFIG_DIR)


class ModelLoadError(ValueError):
    """A model reference that cannot be resolved; the message says what was tried."""


class ClipModel(nn.Module):
    """An open_clip CLIP with pixel-space inputs.

    Args:
        clip: an ``open_clip`` CLIP / CustomTextCLIP.
        model_cfg: the architecture dict it was built from (saved beside the weights).
        tokenizer: callable ``list[str] -> LongTensor[N, context_length]``.
        mean, std: per-channel normalisation applied inside :meth:`encode_image`.
        tokenizer_ref: how to rebuild the tokenizer on load (an open_clip model name).
    """

    def __init__(
        self,
        clip: nn.Module,
        model_cfg: dict,
        tokenizer: Callable,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        tokenizer_ref: str,
    ):
        super().__init__()
        self.clip = clip
        self.model_cfg = model_cfg
        self.tokenizer = tokenizer
        self.tokenizer_ref = tokenizer_ref
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        size = self.clip.visual.image_size
        self.image_size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """[B, C, H, W] in [0, 1] -> [B, D] (unit norm unless ``normalize=False``)."""
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        if tuple(images.shape[-2:]) != self.image_size:
            images = F.interpolate(images, size=self.image_size, mode="bilinear", align_corners=False)
        feats = self.clip.encode_image((images - self.mean) / self.std)
        return F.normalize(feats, dim=-1) if normalize else feats

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """[N, L] token ids -> [N, D]."""
        feats = self.clip.encode_text(tokens)
        return F.normalize(feats, dim=-1) if normalize else feats

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(list(texts)).to(self.device)

    def encode_texts(self, texts: list[str], batch_size: int = 512) -> torch.Tensor:
        """Unit-norm embeddings of raw strings, in chunks (keeps autograd state of the caller)."""
        out = [self.encode_text(self.tokenize(texts[i : i + batch_size])) for i in range(0, len(texts), batch_size)]
        return torch.cat(out) if out else torch.empty(0, self.embed_dim, device=self.device)

    @property
    def embed_dim(self) -> int:
        return int(self.model_cfg["embed_dim"])

    @property
    def logit_scale(self) -> torch.Tensor:
        """exp(logit_scale): the temperature CLIP learned."""
        return self.clip.logit_scale.exp()

    def tower_parameters(self, tower: str) -> list[nn.Parameter]:
        """Parameters of ``image``, ``text`` or ``scale`` (logit scale/bias)."""
        return [p for n, p in self.clip.named_parameters() if tower_of(n) == tower]


def tower_of(param_name: str) -> str:
    """Which tower a parameter name of an open_clip CLIP belongs to."""
    if param_name.startswith("visual."):
        return "image"
    if param_name in ("logit_scale", "logit_bias"):
        return "scale"
    return "text"


def list_architectures() -> list[str]:
    return open_clip.list_models()


def _wrap(clip: nn.Module, model_cfg: dict, tokenizer_ref: str) -> ClipModel:
    pp = getattr(clip.visual, "preprocess_cfg", {}) or {}
    mean = tuple(pp.get("mean", open_clip.OPENAI_DATASET_MEAN))
    std = tuple(pp.get("std", open_clip.OPENAI_DATASET_STD))
    context = model_cfg.get("text_cfg", {}).get("context_length")
    tokenizer = open_clip.get_tokenizer(tokenizer_ref, context_length=context)
    clip.eval()
    return ClipModel(clip, model_cfg, tokenizer, mean, std, tokenizer_ref)


def create_model(arch: str, pretrained: str | None = None, device: str | torch.device = "cpu") -> ClipModel:
    """Build a model from an architecture and optional weights.

    ``arch``: an open_clip name (``ViT-B-32``), a shipped config (``mmcoa-tiny-fmnist``),
    ``hf-hub:org/name`` or a directory saved by :func:`save_model`.
    ``pretrained``: an open_clip tag (``openai``), a local weights file, a saved directory, or None
    for random initialisation (seeded by the caller).
    """
    if pretrained and Path(pretrained).is_dir():
        return load_model(pretrained, device)
    if Path(arch).is_dir():
        return load_model(arch, device)
    if not arch.startswith("hf-hub:") and open_clip.get_model_config(arch) is None:
        raise ModelLoadError(
            f"unknown architecture '{arch}': use an open_clip name (see `mmcoa models`), "
            "hf-hub:org/name, or a directory saved by mmcoa"
        )
    if pretrained and not os.path.isfile(pretrained) and not open_clip.get_pretrained_cfg(arch, pretrained):
        tags = [t for a, t in open_clip.list_pretrained() if a == arch]
        raise ModelLoadError(
            f"pretrained '{pretrained}' is neither a local file nor a tag of {arch} (tags: {tags or 'none'})"
        )
    try:
        with _quiet_random_init(pretrained is None):
            clip = open_clip.create_model(arch, pretrained=pretrained, device=device)
    except (RuntimeError, OSError) as err:
        raise ModelLoadError(
            f"could not load {arch} (pretrained={pretrained}): {err}. Pretrained tags and hf-hub "
            "names need network access; offline, pass a local weights file instead."
        ) from None
    model_cfg = open_clip.get_model_config(arch) if not arch.startswith("hf-hub:") else _hf_model_cfg(arch)
    return _wrap(clip, model_cfg, arch).to(device)


@contextmanager
def _quiet_random_init(active: bool):
    """Hide open_clip's "initialized randomly" warning when random initialisation is what was asked."""

    def drop(record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()

    root = logging.getLogger()
    if active:
        root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def _hf_model_cfg(arch: str) -> dict:
    from open_clip.factory import _get_hf_config

    return _get_hf_config(arch.removeprefix("hf-hub:"))["model_cfg"]


def save_model(model: ClipModel, directory: str | Path) -> Path:
    """Write ``open_clip_config.json`` and ``open_clip_model.safetensors`` into ``directory``.

    Files are written to temporary names first and renamed, so a crash never leaves a half model.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "model_cfg": model.model_cfg,
        "preprocess_cfg": {
            "size": list(model.image_size),
            "mean": model.mean.flatten().tolist(),
            "std": model.std.flatten().tolist(),
        },
        # The tokenizer is rebuilt from the arch name; a local-dir reference would be a path.
        "mmcoa": {"tokenizer": None if model.tokenizer_ref.startswith("local-dir:") else model.tokenizer_ref},
    }
    state = {k: v.detach().contiguous().cpu() for k, v in model.clip.state_dict().items()}
    tmp_w, tmp_c = directory / (WEIGHTS_NAME + ".tmp"), directory / (CONFIG_NAME + ".tmp")
    save_file(state, str(tmp_w))
    tmp_c.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    os.replace(tmp_w, directory / WEIGHTS_NAME)
    os.replace(tmp_c, directory / CONFIG_NAME)
    return directory


def load_model(directory: str | Path, device: str | torch.device = "cpu") -> ClipModel:
    """Load a directory written by :func:`save_model` (or any open_clip ``local-dir`` folder)."""
    directory = Path(directory)
    if not (directory / CONFIG_NAME).is_file():
        raise ModelLoadError(f"{directory}: no {CONFIG_NAME}; is this a model saved by mmcoa?")
    config = json.loads((directory / CONFIG_NAME).read_text())
    clip = open_clip.create_model(f"local-dir:{directory}", device=device)
    tokenizer_ref = (config.get("mmcoa") or {}).get("tokenizer") or f"local-dir:{directory}"
    # A shipped arch name rebuilds the same tokenizer without reading the folder again.
    if open_clip.get_model_config(tokenizer_ref) is None and not tokenizer_ref.startswith(("hf-hub:", "local-dir:")):
        tokenizer_ref = f"local-dir:{directory}"
    return _wrap(clip, config["model_cfg"], tokenizer_ref).to(device)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
