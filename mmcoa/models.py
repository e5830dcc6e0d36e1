"""Load, wrap and save open_clip CLIP models.

A model reference is parsed once, by :func:`parse_model_ref`, into a :class:`ModelRef` (schema,
identifier), and a small registry holds one resolver per schema:

- ``arch``: an open_clip architecture (``ViT-B-32``, or a shipped config such as ``mmcoa-tiny-fmnist``),
  with an optional pretrained tag (``openai``). A tag brings the activation and preprocessing its weights
  were trained with, from open_clip's pretrained config (QuickGELU, mean/std, bicubic for OpenAI's).
- ``file``: an architecture plus a local weights file (``.safetensors``, ``.pt``, ``.pth``, ``.bin``): an
  open_clip or OpenAI-style state dict.
- ``hf-hub``: ``hf-hub:ORG/NAME``, an open_clip model on the Hugging Face hub (how FARE and TeCoA robust
  CLIPs are published), read from the local cache when ``HF_HUB_OFFLINE=1``.
- ``local-dir``: a folder saved by :func:`save_model` (open_clip's ``local-dir`` format), given as a path
  or as ``local-dir:PATH``.

Weights are read with safetensors or ``torch.load(weights_only=True)``: nothing is ever unpickled. A
file that cannot be read, or that holds the weights of another architecture, raises
:class:`ModelLoadError` naming the file and what was expected.

:class:`ClipModel` takes images as float tensors in [0, 1] and applies the preprocessing its weights
expect inside (resize to the tower's size with the recorded interpolation and resize mode, mean/std
normalisation), so every attack works in pixel space, e.g. on 32 px CIFAR images upsampled inside the
model as the MMCoA authors do. The resize is the data path's own (:func:`mmcoa.data.transforms.resize`,
antialiased): an image resized by the loader and one resized inside the model are the same pixels.
Checkpoints use open_clip's ``local-dir`` format (``open_clip_config.json`` +
``open_clip_model.safetensors``), with the activation (``model_cfg.quick_gelu``) and preprocessing
(``preprocess_cfg``) recorded, so every later stage rebuilds the model exactly; a saved folder loads with
``open_clip.create_model("local-dir:DIR")`` too.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
from contextlib import contextmanager
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import open_clip
from open_clip.factory import _find_checkpoint_in_dir, _get_hf_config, parse_model_name

from mmcoa.data.transforms import INTERPOLATIONS, RESIZE_MODES, resize as resize_images
from mmcoa.registry import Registry

CONFIG_DIR = Path(__file__).parent / "model_configs"
CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
# Keys an OpenAI TorchScript model's state dict carries besides the weights.
_OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")
_MAX_TRUNCATION_WARNINGS = 20

open_clip.add_model_config(CONFIG_DIR)
log = logging.getLogger(__name__)


class ModelLoadError(ValueError):
    """A model reference that cannot be resolved or loaded; the one-line message says what was tried."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


# --- model references ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelRef:
    """A parsed model reference.

    ``schema``: ``arch`` | ``file`` | ``hf-hub`` | ``local-dir``. ``identifier``: the architecture name
    (``arch``, ``file``), the hub id (``hf-hub``) or the folder (``local-dir``). ``pretrained``: the tag
    (``arch``) or the weights file (``file``).
    """

    schema: str
    identifier: str
    pretrained: str | None = None

    @property
    def has_weights(self) -> bool:
        """Whether the reference carries trained weights (all but a bare architecture, which is random)."""
        return self.schema != "arch" or self.pretrained is not None

    def __str__(self) -> str:
        if self.schema == "hf-hub":
            return f"hf-hub:{self.identifier}"
        if self.schema == "local-dir":
            return self.identifier
        return self.identifier + (f" + {self.pretrained}" if self.pretrained else "")


def _known_arch(name: str) -> str | None:
    """The open_clip config name for ``name`` (``ViT-B/32`` is ``ViT-B-32``), or None."""
    for candidate in (name, name.replace("/", "-")):
        if open_clip.get_model_config(candidate) is not None:
            return candidate
    return None


def _looks_like_path(text: str) -> bool:
    return os.sep in text or "/" in text or text.startswith((".", "~")) or Path(text).exists()


def parse_model_ref(arch: str | ModelRef, pretrained: str | None = None) -> ModelRef:
    """Parse ``base.model``-style ``arch`` + ``pretrained`` into a :class:`ModelRef` (no file is read).

    ``arch``: an open_clip architecture, ``hf-hub:ORG/NAME``, ``local-dir:PATH`` or a folder saved by
    mmcoa. ``pretrained`` (architectures only): an open_clip tag, or a local weights file.
    """
    if isinstance(arch, ModelRef):
        if pretrained is not None:
            raise ModelLoadError(f"{arch}: a parsed reference takes no separate pretrained ('{pretrained}')")
        return arch
    try:
        schema, identifier = parse_model_name(str(arch))
    except ValueError as err:
        raise ModelLoadError(f"model reference '{arch}': {err}") from None
    if schema is None:
        name = _known_arch(identifier)
        if name is not None:
            schema, identifier = "arch", name
        elif Path(identifier).suffix.lower() in WEIGHT_SUFFIXES:
            raise ModelLoadError(
                f"'{identifier}' is a weights file: give its architecture as arch and the file as pretrained "
                f"(e.g. arch: ViT-B-32-quickgelu, pretrained: {identifier})"
            )
        elif _looks_like_path(identifier):
            schema = "local-dir"
        else:
            raise ModelLoadError(
                f"unknown architecture '{identifier}': use an open_clip name (see `mmcoa models`), "
                "hf-hub:org/name, or a folder saved by mmcoa"
            )
    if schema != "arch":
        if pretrained:
            raise ModelLoadError(
                f"'{arch}' carries its own weights; pretrained '{pretrained}' does not apply to it (set it to null)"
            )
        return ModelRef(schema, identifier)
    if not pretrained:
        return ModelRef("arch", identifier)
    if open_clip.get_pretrained_cfg(identifier, pretrained):
        return ModelRef("arch", identifier, pretrained)
    path = Path(pretrained).expanduser()
    if path.is_dir():
        raise ModelLoadError(
            f"pretrained '{pretrained}' is a folder: give a folder saved by mmcoa as arch, with pretrained: null"
        )
    if path.suffix.lower() in WEIGHT_SUFFIXES or path.is_file():
        return ModelRef("file", identifier, pretrained)
    tags = open_clip.list_pretrained_tags_by_model(identifier)
    raise ModelLoadError(
        f"pretrained '{pretrained}' is neither a local file nor a tag of {identifier} (tags: {tags or 'none'})"
    )


# --- resolvers: one per schema ------------------------------------------------------------------


@dataclass
class _Resolved:
    """How open_clip builds a reference, and where its weights are."""

    build_name: str  # the name open_clip.create_model builds the architecture from
    model_cfg: dict  # recorded beside saved weights; includes quick_gelu when the weights need it
    tokenizer_ref: str  # an open_clip name get_tokenizer understands
    preprocess: dict  # overrides of open_clip's preprocessing (a pretrained tag's)
    weights: Callable[[], Path] | None  # the weights file (fetched on demand); None = random init


_RESOLVERS: Registry[Callable[[ModelRef], _Resolved]] = Registry("model reference schema", ModelLoadError)
_resolver = _RESOLVERS.register  # decorator: how one schema of reference becomes an architecture and weights


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


@_resolver("arch")
def _resolve_arch(ref: ModelRef) -> _Resolved:
    model_cfg = open_clip.get_model_config(ref.identifier)
    if ref.pretrained is None:
        return _Resolved(ref.identifier, model_cfg, ref.identifier, {}, None)
    tag = open_clip.get_pretrained_cfg(ref.identifier, ref.pretrained)
    # open_clip only warns when an arch's activation differs from its tag's (ViT-B-32 + openai): the
    # weights decide, so OpenAI's get the QuickGELU they were trained with.
    if tag.get("quick_gelu"):
        model_cfg["quick_gelu"] = True
    preprocess = {k: tag[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in tag}

    def weights() -> Path:
        try:
            path = open_clip.download_pretrained(tag)
        except Exception as err:  # network, hub cache, checksum: all say the same to the user
            raise ModelLoadError(
                f"{ref}: could not fetch the tag's weights ({_first_line(err)}). Offline, fetch them once "
                "elsewhere and pass the file as pretrained, or use a model in the local Hugging Face cache"
            ) from None
        if not path:
            raise ModelLoadError(f"{ref}: open_clip knows no download for this tag")
        return Path(path)

    return _Resolved(ref.identifier, model_cfg, ref.identifier, preprocess, weights)


@_resolver("file")
def _resolve_file(ref: ModelRef) -> _Resolved:
    model_cfg = open_clip.get_model_config(ref.identifier)
    return _Resolved(ref.identifier, model_cfg, ref.identifier, {}, lambda: Path(ref.pretrained).expanduser())


@_resolver("hf-hub")
def _resolve_hf_hub(ref: ModelRef) -> _Resolved:
    name = str(ref)
    try:
        config = _get_hf_config(ref.identifier)
    except Exception as err:
        raise ModelLoadError(
            f"{name}: no {CONFIG_NAME} found ({_first_line(err)}). With HF_HUB_OFFLINE=1 the model must be in "
            "the local Hugging Face cache (HF_HUB_CACHE or HF_HOME)"
        ) from None
    if not isinstance(config, dict) or not isinstance(config.get("model_cfg"), dict):
        raise ModelLoadError(f"{name}: its {CONFIG_NAME} has no model_cfg; is it an open_clip model?")

    def weights() -> Path:
        try:
            return Path(open_clip.pretrained.download_pretrained_from_hf(ref.identifier))
        except Exception as err:
            raise ModelLoadError(f"{name}: no open_clip weights file found ({_first_line(err)})") from None

    return _Resolved(name, config["model_cfg"], name, {}, weights)


@_resolver("local-dir")
def _resolve_local_dir(ref: ModelRef) -> _Resolved:
    folder = Path(ref.identifier).expanduser()
    if not folder.is_dir():
        raise ModelLoadError(f"{folder}: no such model folder (one saved by mmcoa holds {CONFIG_NAME} and {WEIGHTS_NAME})")
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise ModelLoadError(f"{folder}: no {CONFIG_NAME}; is this a model saved by mmcoa?")
    try:
        config = json.loads(config_path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ModelLoadError(f"{config_path}: not valid JSON ({err})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_cfg"), dict):
        raise ModelLoadError(f"{config_path}: no model_cfg; is this a model saved by mmcoa?")
    local = f"local-dir:{folder}"
    recorded = (config.get("mmcoa") or {}).get("tokenizer")
    tokenizer_ref = recorded if recorded and _portable_tokenizer(recorded, config["model_cfg"]) else local

    def weights() -> Path:
        found = _find_checkpoint_in_dir(folder)
        if found is None:
            raise ModelLoadError(f"{folder}: no weights file (expected {WEIGHTS_NAME})")
        return Path(found)

    return _Resolved(local, config["model_cfg"], tokenizer_ref, {}, weights)


def _portable_tokenizer(tokenizer_ref: str, model_cfg: dict) -> bool:
    """Whether a saved folder must record the tokenizer's source rather than rebuild it from its own config.

    A folder rebuilds open_clip's default tokenizer from its text config; only a SigLIP architecture
    (chosen by name) and a hub model with a Hugging Face tokenizer need their original name.
    """
    schema, identifier = parse_model_name(tokenizer_ref)
    if schema is None:
        return open_clip.get_model_config(identifier) is not None
    return schema == "hf-hub" and "hf_tokenizer_name" in model_cfg.get("text_cfg", {})


# --- weights ------------------------------------------------------------------------------------


def _read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], bool]:
    """A weights file as a flat name -> tensor dict, and whether it came from an OpenAI TorchScript model."""
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such weights file")
    suffix = path.suffix.lower()
    if suffix not in WEIGHT_SUFFIXES:
        raise ModelLoadError(f"{path}: unknown weights format '{path.suffix}'; expected one of {', '.join(WEIGHT_SUFFIXES)}")
    kind = "safetensors" if suffix == ".safetensors" else "PyTorch"
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        text = str(err)
        found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if found:
            raise ModelLoadError(
                f"{path}: refused: it holds a Python object ({found.group(1)}) besides tensors, and mmcoa never "
                "unpickles those (weights_only loading); save a plain state dict or a .safetensors file"
            ) from None
        detail = text.split("WeightsUnpickler error:", 1)[-1].strip() or text
        raise ModelLoadError(f"{path}: not a readable {kind} weights file (truncated or corrupt?): {detail.splitlines()[0]}") from None
    except Exception as err:
        raise ModelLoadError(f"{path}: not a readable {kind} weights file (truncated or corrupt?): {_first_line(err)}") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    openai = isinstance(obj, dict) and any(k in obj for k in _OPENAI_EXTRA_KEYS)
    if isinstance(obj, dict):
        obj = {k: v for k, v in obj.items() if k not in _OPENAI_EXTRA_KEYS}
    if not obj or not isinstance(obj, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items()):
        raise ModelLoadError(f"{path}: not a state dict (a mapping of parameter names to tensors)")
    if all(k.startswith("module.") for k in obj):  # saved from a DistributedDataParallel wrapper
        obj = {k.removeprefix("module."): v for k, v in obj.items()}
    return obj, openai


def _load_weights(clip: nn.Module, path: Path, expected: str) -> bool:
    """Load ``path`` into ``clip`` exactly (strict names and shapes); return whether it is OpenAI-style."""
    from open_clip.model import convert_to_custom_text_state_dict

    state, openai = _read_state_dict(path)
    if "positional_embedding" in state and not hasattr(clip, "positional_embedding"):
        state = convert_to_custom_text_state_dict(state)  # old open_clip layout of a custom-text model
    own = clip.state_dict()
    for key in ("logit_scale", "logit_bias"):  # scalar vs 1-element tensors, as open_clip's loader allows
        if key in state and key in own and state[key].numel() == own[key].numel():
            state[key] = state[key].reshape(own[key].shape)
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {list(state[k].shape)} vs {list(own[k].shape)}" for k in own if k in state and state[k].shape != own[k].shape]
    problems = [
        f"{len(names)} {what} (e.g. {', '.join(names[:3])})"
        for what, names in (("missing", missing), ("unexpected", unexpected), ("of another shape, file vs model", shapes))
        if names
    ]
    if problems:
        raise ModelLoadError(f"{path}: not the weights of {expected}: parameters {'; '.join(problems)}")
    clip.load_state_dict(state, strict=True)
    return openai


# --- building -----------------------------------------------------------------------------------


@contextmanager
def _quiet_open_clip():
    """Hide open_clip's "initialized randomly" warning: the weights are loaded after it builds the model."""

    def drop(record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def _build(ref: ModelRef, device: str | torch.device, load_weights: bool) -> ClipModel:
    src = _RESOLVERS[ref.schema](ref)
    quick_gelu = bool(src.model_cfg.get("quick_gelu", False))
    try:
        with _quiet_open_clip():
            clip = open_clip.create_model(
                src.build_name, load_weights=False, device=device, force_quick_gelu=quick_gelu,
                force_preprocess_cfg=src.preprocess or None,
            )
    except Exception as err:  # a config open_clip cannot build from
        raise ModelLoadError(f"{ref}: open_clip cannot build its architecture: {_first_line(err)}") from None
    if load_weights and src.weights is not None:
        path = src.weights()
        openai = _load_weights(clip, path, src.build_name)
        if openai and not quick_gelu:
            hint = f" (use {ref.identifier}-quickgelu)" if _known_arch(f"{ref.identifier}-quickgelu") else ""
            log.warning("%s looks like OpenAI's weights, trained with QuickGELU, but %s uses GELU%s", path, ref.identifier, hint)
    return _wrap(clip, src.model_cfg, src.tokenizer_ref).to(device)


def _wrap(clip: nn.Module, model_cfg: dict, tokenizer_ref: str) -> ClipModel:
    pp = dict(getattr(clip.visual, "preprocess_cfg", {}) or {})
    size = pp.get("size", clip.visual.image_size)
    preprocess = {
        "size": list(size) if isinstance(size, (tuple, list)) else [size, size],
        "mean": [float(v) for v in pp.get("mean", open_clip.OPENAI_DATASET_MEAN)],
        "std": [float(v) for v in pp.get("std", open_clip.OPENAI_DATASET_STD)],
        "interpolation": pp.get("interpolation", "bicubic"),
        "resize_mode": pp.get("resize_mode", "shortest"),
    }
    context = model_cfg.get("text_cfg", {}).get("context_length")
    try:
        tokenizer = open_clip.get_tokenizer(tokenizer_ref, context_length=context)
    except Exception as err:
        raise ModelLoadError(f"{tokenizer_ref}: cannot build its tokenizer: {_first_line(err)}") from None
    clip.eval()
    return ClipModel(clip, model_cfg, tokenizer, preprocess, tokenizer_ref)


def create_model(
    arch: str | ModelRef,
    pretrained: str | None = None,
    device: str | torch.device = "cpu",
    load_weights: bool = True,
) -> ClipModel:
    """Build a model from a reference (see :func:`parse_model_ref`).

    ``arch``: an open_clip name (``ViT-B-32``), a shipped config (``mmcoa-tiny-fmnist``), ``hf-hub:org/name``,
    a folder saved by :func:`save_model`, or a :class:`ModelRef`. ``pretrained``: an open_clip tag
    (``openai``), a local weights file, or None for random initialisation (seeded by the caller).
    ``load_weights=False`` builds the architecture with its weights' activation and preprocessing but
    random values (no download).
    """
    return _build(parse_model_ref(arch, pretrained), device, load_weights)


def load_model(directory: str | Path, device: str | torch.device = "cpu") -> ClipModel:
    """Load a folder written by :func:`save_model` (or any open_clip ``local-dir`` folder)."""
    return _build(ModelRef("local-dir", str(directory)), device, load_weights=True)


def save_model(model: ClipModel, directory: str | Path) -> Path:
    """Write ``open_clip_config.json`` and ``open_clip_model.safetensors`` into ``directory``.

    The config records the activation and the preprocessing, so a reload is the same model. Files are
    written to temporary names first and renamed, so a crash never leaves a half model.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    portable = _portable_tokenizer(model.tokenizer_ref, model.model_cfg)
    config = {
        "model_cfg": model.model_cfg,
        "preprocess_cfg": model.preprocess,
        # None: the folder rebuilds the tokenizer from its own text config.
        "mmcoa": {"tokenizer": model.tokenizer_ref if portable else None},
    }
    state = {k: v.detach().contiguous().cpu() for k, v in model.clip.state_dict().items()}
    tmp_w, tmp_c = directory / (WEIGHTS_NAME + ".tmp"), directory / (CONFIG_NAME + ".tmp")
    save_file(state, str(tmp_w))
    tmp_c.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    os.replace(tmp_w, directory / WEIGHTS_NAME)
    os.replace(tmp_c, directory / CONFIG_NAME)
    return directory


# --- the wrapper --------------------------------------------------------------------------------


class ClipModel(nn.Module):
    """An open_clip CLIP with pixel-space inputs.

    Args:
        clip: an ``open_clip`` CLIP / CustomTextCLIP.
        model_cfg: the architecture dict it was built from (saved beside the weights).
        tokenizer: callable ``(list[str], context_length=None) -> LongTensor[N, context_length]``.
        preprocess: what the weights expect: ``size`` [H, W], ``mean``, ``std``, ``interpolation``
            (bicubic, bilinear, nearest) and ``resize_mode`` (shortest, longest, squash).
        tokenizer_ref: how to rebuild the tokenizer on load (an open_clip model name).
    """

    def __init__(self, clip: nn.Module, model_cfg: dict, tokenizer: Callable, preprocess: dict, tokenizer_ref: str):
        super().__init__()
        if preprocess["interpolation"] not in INTERPOLATIONS or preprocess["resize_mode"] not in RESIZE_MODES:
            raise ModelLoadError(
                f"preprocessing {preprocess['interpolation']}/{preprocess['resize_mode']} is not supported: "
                f"interpolation one of {INTERPOLATIONS}, resize_mode one of {tuple(RESIZE_MODES)}"
            )
        self.clip = clip
        self.model_cfg = model_cfg
        self.tokenizer = tokenizer
        self.tokenizer_ref = tokenizer_ref
        self._preprocess = dict(preprocess)
        self.register_buffer("mean", torch.tensor(preprocess["mean"]).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(preprocess["std"]).view(1, -1, 1, 1), persistent=False)
        size = self.clip.visual.image_size
        self.image_size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        self._context: int | None = None
        self._pad_id: int | None = None
        self._length_checked: set[str] = set()
        self._truncation_warnings = 0

    @property
    def device(self) -> torch.device:
        return self.mean.device

    @property
    def preprocess(self) -> dict:
        """size, mean, std, interpolation, resize_mode: what the weights were trained with (a copy)."""
        return {k: list(v) if isinstance(v, list) else v for k, v in self._preprocess.items()}

    def resize(self, images: torch.Tensor) -> torch.Tensor:
        """Bring [B, C, h, w] in [0, 1] to the tower's size as the weights' preprocessing does.

        The data path's resize (:func:`mmcoa.data.transforms.resize`: antialiased, differentiable), so
        an attack on native-size pixels sees what training and clean evaluation see.
        """
        return resize_images(images, self.image_size, self._preprocess["interpolation"], self._preprocess["resize_mode"])

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """[B, C, H, W] in [0, 1], any size -> [B, D] (unit norm unless ``normalize=False``)."""
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        feats = self.clip.encode_image((self.resize(images) - self.mean) / self.std)
        return F.normalize(feats, dim=-1) if normalize else feats

    def encode_image_tokens(self, images: torch.Tensor, normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`encode_image` of ``images`` and, from the same pass, the ViT's output tokens [B, 1 + N, D]
        (class token, then N patches), each through ``ln_post`` and ``proj`` as the class token is.

        The tokens are read by a forward hook on the transformer, so the embedding is the one
        :meth:`encode_image` returns (the model is not changed). Needs an open_clip VisionTransformer.
        """
        visual = self.clip.visual
        if not all(hasattr(visual, name) for name in ("transformer", "ln_post", "proj")):
            raise ValueError(f"the image tower is a {type(visual).__name__}; patch tokens need a VisionTransformer")
        seen: list[torch.Tensor] = []
        handle = visual.transformer.register_forward_hook(lambda module, args, out: seen.append(out))
        try:
            feats = self.encode_image(images, normalize)
        finally:
            handle.remove()
        tokens = visual.ln_post(seen[-1])
        return feats, tokens @ visual.proj if visual.proj is not None else tokens

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """[N, L] token ids -> [N, D]."""
        feats = self.clip.encode_text(tokens)
        return F.normalize(feats, dim=-1) if normalize else feats

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """Token ids [N, context]; a text longer than the context is truncated, with a warning naming it."""
        texts = list(texts)
        tokens = self.tokenizer(texts)
        pad = self._context_and_pad()[1]
        full = (tokens[:, -1] != pad).tolist()  # only a text that fills the context can be cut
        if any(full):
            self._warn_truncated([t for t, f in zip(texts, full) if f], tokens.shape[1])
        return tokens.to(self.device)

    def _context_and_pad(self) -> tuple[int, int]:
        """The text context length and the padding id, read off the tokenizer once."""
        if self._pad_id is None:
            empty = self.tokenizer([""])
            self._context, self._pad_id = int(empty.shape[1]), int(empty[0, -1])
        return self._context, self._pad_id

    def tokenize_fitting(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids [N, context] and bool [N], True where a text fits the context, from one tokenizer
        pass: the tokens of a text that fits are the first ``context`` of its ``context + 1`` tokens.
        Texts that do not fit are tokenized again with the tower's own truncation. No warnings: the
        callers (text attacks scoring candidates) reject what does not fit."""
        texts = list(texts)
        context, pad = self._context_and_pad()
        longer = self.tokenizer(texts, context_length=context + 1)
        fits = longer[:, context] == pad
        tokens = longer[:, :context].clone()
        if not bool(fits.all()):
            tokens[~fits] = self.tokenizer([t for t, f in zip(texts, fits.tolist()) if not f])
        return tokens.to(self.device), fits.to(self.device)

    def _warn_truncated(self, texts: list[str], context: int) -> None:
        for text in texts:
            if text in self._length_checked or self._truncation_warnings > _MAX_TRUNCATION_WARNINGS:
                continue
            self._length_checked.add(text)
            # One more position than the context: filled iff the text needed more than the context.
            if int(self.tokenizer([text], context_length=context + 1)[0, context]) == self._pad_id:
                continue
            self._truncation_warnings += 1
            if self._truncation_warnings > _MAX_TRUNCATION_WARNINGS:
                logging.warning("more texts are truncated to the text tower's context; no further warnings")
            else:
                logging.warning("text truncated to the text tower's context of %d tokens: %r", context, text)

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


def frozen_copy(model: ClipModel) -> ClipModel:
    """An independent copy in eval mode with every parameter frozen (a reference the training of
    ``model`` cannot move, as PMG-AFT and FARE need)."""
    frozen = deepcopy(model).eval()
    for p in frozen.parameters():
        p.requires_grad_(False)
    return frozen


def distinct(texts: list[str]) -> tuple[list[str], torch.Tensor]:
    """The distinct texts in first-seen order, and per input text its row among them (long [N]).

    Batches of captions and of candidate prompts repeat many texts: encoding each distinct text once
    and indexing the rows is what keeps text encoding cheap."""
    unique = list(dict.fromkeys(texts))
    row = {t: i for i, t in enumerate(unique)}
    return unique, torch.tensor([row[t] for t in texts], dtype=torch.long)


def tower_of(param_name: str) -> str:
    """Which tower a parameter name of an open_clip CLIP belongs to."""
    if param_name.startswith("visual."):
        return "image"
    if param_name in ("logit_scale", "logit_bias"):
        return "scale"
    return "text"


def list_architectures() -> list[str]:
    return open_clip.list_models()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
