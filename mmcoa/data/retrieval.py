"""Image-text retrieval datasets: one in-memory caption index over images read on demand, the
field's four on-disk formats, and a small registry.

A :class:`RetrievalDataset` holds the captions of a gallery flat (``captions``) with the image index
of each (``caption_image``); ``dataset[i]`` reads image ``i`` as uint8 [C, H, W]. Nothing else of an
image is kept in memory, so a 5,000-image gallery streams through a DataLoader. Each image and each
caption also carries its index in the dataset a reader opened (``source_indices``,
``caption_indices``), kept through :meth:`~RetrievalDataset.subset`, so two evaluations can be paired
on the same images and captions, never merely on the same gallery size.

Formats (each reader names the offending entry and the fix in a one-line :class:`DataError`):

* Karpathy-split JSON (``dataset_flickr30k.json``, ``dataset_coco.json``):
  ``{"images": [{"filename", "filepath"?, "split", "sentences": [{"raw"}, ...]}, ...]}``;
  splits ``train`` / ``val`` / ``test`` / ``restval`` (join with ``+``: ``train+restval``);
* COCO captions (``coco_{split}_karpathy.json``, torchvision ``CocoCaptions``):
  ``{"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}``, images under
  the folder or its ``val2014/``;
* ALBEF-style list (Co-Attack, SGA): ``[{"image": path, "caption": str | [str, ...]}, ...]``; entries
  naming the same image are merged;
* CSV of ``image,caption`` rows (several rows per image; an ``image,caption`` header is skipped;
  unquoted commas stay in the caption, as in the ``flickr30k_{split}_karpathy.txt`` files).

Registry: ``flickr30k`` and ``mscoco`` (a folder holding the Karpathy JSON and the images; the
Karpathy test split has 1,000 / 5,000 images), the synthetic ``fmnist_pairs`` (``synthetic.py``), and
``retrieval-json:PATH`` / ``retrieval-csv:PATH`` (images relative to PATH's folder, or to ``root``),
valid wherever a dataset name is (:func:`is_retrieval_dataset`, :func:`open_retrieval`).
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch.utils.data import Dataset

from mmcoa.data.registry import DataError, default_root
from mmcoa.registry import Registry


def read_image_file(path: Path) -> torch.Tensor:
    """An image file -> uint8 [3, H, W] (RGB)."""
    from PIL import Image, UnidentifiedImageError
    from torchvision.transforms.functional import pil_to_tensor

    try:
        with Image.open(path) as img:
            return pil_to_tensor(img.convert("RGB"))
    except (OSError, UnidentifiedImageError) as err:
        raise DataError(f"{path}: cannot read the image ({err}); replace the file or drop its entries") from None


class RetrievalDataset(Dataset):
    """A gallery of images and their captions.

    Args:
        name: the dataset's name in metric keys (no dots).
        images: one reference per image, handed to ``read`` (a file path, or a synthetic scene).
        captions: every caption, flat.
        caption_image: [len(captions)] index into ``images`` of each caption's image.
        protected: label-carrying words a text attack must not edit (class names, positions, counts;
            empty for free-form captions).
        read: reference -> uint8 [C, H, W].
        split: the split it holds (recorded in manifests).
        source_indices: [len(images)] each image's index in the dataset as its reader opened it
            (default: its position, i.e. this is that dataset).
        caption_indices: [len(captions)] each caption's index there (default: its position).

    ``dataset[i] -> (uint8 [C, H, W], i)``. Every image has at least one caption and no caption is
    empty (checked here, so every reader and :meth:`subset` keeps it true).
    """

    def __init__(
        self,
        name: str,
        images: Sequence[Any],
        captions: list[str],
        caption_image: torch.Tensor | Sequence[int],
        protected: set[str] | frozenset[str] = frozenset(),
        read: Callable[[Any], torch.Tensor] = read_image_file,
        split: str = "test",
        source_indices: torch.Tensor | Sequence[int] | None = None,
        caption_indices: torch.Tensor | Sequence[int] | None = None,
    ):
        self.name, self.split, self.images, self.captions = name, split, list(images), list(captions)
        self.caption_image = torch.as_tensor(caption_image, dtype=torch.long).reshape(-1)
        self.protected, self.read = set(protected), read
        self.source_indices = _indices(source_indices, len(self.images), "source_indices", "image")
        self.caption_indices = _indices(caption_indices, len(self.captions), "caption_indices", "caption")
        if len(self.caption_image) != len(self.captions):
            raise ValueError("caption_image needs one image index per caption")
        empty = [j for j, c in enumerate(self.captions) if not c.strip()]
        if empty:
            raise DataError(f"{name}: caption {empty[0]} is empty; give every caption some text")
        counts = torch.bincount(self.caption_image, minlength=len(self.images))
        if len(counts) > len(self.images):
            raise ValueError("caption_image names an image index past the gallery")
        bare = (counts == 0).nonzero().flatten().tolist()
        if bare:
            raise DataError(f"{name}: image {bare[0]} ({self.images[bare[0]]}) has no caption; add one or drop the image")

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.read(self.images[i]), i

    @property
    def n_captions(self) -> int:
        return len(self.captions)

    def describe(self, i: int) -> str:
        """Where image ``i`` comes from (for messages)."""
        return f"{self.name}[{i}] ({self.images[i]})"

    def subset(self, image_indices: Sequence[int] | torch.Tensor) -> RetrievalDataset:
        """The gallery restricted to ``image_indices`` (in that order) with all their captions; each
        image and caption keeps its ``source_indices`` / ``caption_indices`` entry."""
        keep = torch.as_tensor(image_indices, dtype=torch.long).reshape(-1)
        new_index = torch.full((len(self.images),), -1, dtype=torch.long)
        new_index[keep] = torch.arange(len(keep))
        mapped = new_index[self.caption_image]
        kept = (mapped >= 0).nonzero().flatten()
        # Captions ordered by their new image, then by their old order: the same layout as a reader's.
        order = kept[torch.argsort(mapped[kept], stable=True)]
        return RetrievalDataset(
            self.name,
            [self.images[i] for i in keep.tolist()],
            [self.captions[j] for j in order.tolist()],
            mapped[order],
            self.protected,
            self.read,
            self.split,
            self.source_indices[keep],
            self.caption_indices[order],
        )


def _indices(given: torch.Tensor | Sequence[int] | None, n: int, name: str, what: str) -> torch.Tensor:
    """``given`` as a long tensor of ``n`` indices (``arange(n)`` when None)."""
    if given is None:
        return torch.arange(n)
    out = torch.as_tensor(given, dtype=torch.long).reshape(-1)
    if len(out) != n:
        raise ValueError(f"{name} needs one index per {what}: {len(out)} for {n}")
    return out


# --- building a dataset from entries ------------------------------------------------------------


@dataclass
class Entry:
    """One record of a file: where it is (for messages), its image path, its captions."""

    where: str
    image: str
    captions: list[str]


def _resolve(entry: Entry, image_dirs: Sequence[Path]) -> Path:
    for d in image_dirs:
        path = d / entry.image
        if path.is_file():
            return path
    looked = " or ".join(str(d) for d in image_dirs)
    raise DataError(f"{entry.where}: image '{entry.image}' not found in {looked}; fix the path or pass the image folder as root")


def from_entries(
    name: str,
    entries: list[Entry],
    image_dirs: Sequence[Path],
    split: str = "test",
    protected: set[str] | frozenset[str] = frozenset(),
) -> RetrievalDataset:
    """Merge entries by image (first appearance order), check them, and build the dataset."""
    by_image: dict[str, list[str]] = {}
    paths: dict[str, Path] = {}
    for e in entries:
        for c in e.captions:
            if not isinstance(c, str) or not c.strip():
                raise DataError(f"{e.where}: empty caption for image '{e.image}'; remove it or give it text")
        if e.image not in paths:
            paths[e.image] = _resolve(e, image_dirs)
        by_image.setdefault(e.image, []).extend(c.strip() for c in e.captions)
    for e in entries:
        if not by_image[e.image]:
            raise DataError(f"{e.where}: image '{e.image}' has no caption; add at least one or drop the entry")
    images, captions, owner = [], [], []
    for i, (key, caps) in enumerate(by_image.items()):
        images.append(paths[key])
        captions.extend(caps)
        owner.extend([i] * len(caps))
    return RetrievalDataset(name, images, captions, owner, protected, split=split)


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not readable JSON ({err}); re-download or repair the file") from None


# --- the four formats ---------------------------------------------------------------------------


def karpathy_entries(data: dict, split: str, source: str) -> list[Entry]:
    """Karpathy-split JSON: the images of ``split`` (``a+b`` joins splits)."""
    wanted = set(split.split("+"))
    images = data.get("images")
    if not isinstance(images, list):
        raise DataError(f"{source}: no 'images' list; is this a Karpathy-split JSON?")
    entries = []
    for i, img in enumerate(images):
        where = f"{source}: images[{i}]"
        if not isinstance(img, dict) or "filename" not in img:
            raise DataError(f"{where}: no 'filename'; every image needs filename, split and sentences")
        if img.get("split") not in wanted:
            continue
        raws = [s.get("raw", "") if isinstance(s, dict) else "" for s in img.get("sentences") or []]
        entries.append(Entry(where, str(Path(img.get("filepath", "")) / img["filename"]), raws))
    if not entries:
        present = sorted({str(img.get("split")) for img in images if isinstance(img, dict)})
        raise DataError(f"{source}: no images in split '{split}'; splits present: {', '.join(present) or 'none'}")
    return entries


def coco_entries(data: dict, split: str, source: str) -> list[Entry]:
    """COCO captions JSON (``coco_{split}_karpathy.json``): the file is one split; images by id."""
    by_id: dict[Any, Entry] = {}
    for i, img in enumerate(data.get("images") or []):
        if not isinstance(img, dict) or "id" not in img or "file_name" not in img:
            raise DataError(f"{source}: images[{i}] needs 'id' and 'file_name'")
        by_id[img["id"]] = Entry(f"{source}: images[{i}]", img["file_name"], [])
    for i, ann in enumerate(data.get("annotations") or []):
        image_id = ann.get("image_id") if isinstance(ann, dict) else None
        if image_id not in by_id:
            raise DataError(f"{source}: annotations[{i}] names no listed image (image_id {image_id}); fix its image_id")
        caption = ann.get("caption")
        if not isinstance(caption, str) or not caption.strip():
            raise DataError(f"{source}: annotations[{i}] has an empty caption; remove it or give it text")
        by_id[ann["image_id"]].captions.append(caption)
    # torchvision's CocoCaptions orders images by id.
    return [by_id[k] for k in sorted(by_id)]


def albef_entries(data: list, split: str, source: str) -> list[Entry]:
    """ALBEF-style list of ``{"image", "caption": str | [str]}`` (the file is one split)."""
    entries = []
    for i, item in enumerate(data):
        where = f"{source}: entry {i}"
        if not isinstance(item, dict) or "image" not in item:
            raise DataError(f"{where}: needs an 'image' path and a 'caption' (a string or a list)")
        caption = item.get("caption")
        caps = [caption] if isinstance(caption, str) else list(caption or [])
        entries.append(Entry(where, str(item["image"]), caps))
    return entries


def csv_entries(path: Path) -> list[Entry]:
    """``image,caption`` rows; an ``image,caption`` header is skipped; extra commas stay in the caption."""
    entries = []
    with open(path, newline="", encoding="utf-8") as f:
        for n, row in enumerate(csv.reader(f), start=1):
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if n == 1 and [c.strip().lower() for c in row[:2]] == ["image", "caption"]:
                continue
            where = f"{path}: line {n}"
            if len(row) < 2:
                raise DataError(f"{where}: expected 'image,caption'")
            entries.append(Entry(where, row[0].strip(), [",".join(row[1:])]))
    if not entries:
        raise DataError(f"{path}: no 'image,caption' rows")
    return entries


def _json_layout(data: Any) -> Callable[[Any, str, str], list[Entry]] | None:
    """Which reader a parsed JSON file needs, from its shape."""
    if isinstance(data, list):
        return albef_entries
    if isinstance(data, dict) and "annotations" in data:
        return coco_entries
    if isinstance(data, dict) and "images" in data:
        return karpathy_entries
    return None


def _dataset_name(prefix: str, path: Path) -> str:
    return f"{prefix}_{re.sub(r'[^A-Za-z0-9_-]+', '_', path.stem)}"


def _image_dirs(base: Path) -> list[Path]:
    """Where a file's relative image paths may point: the folder, or its usual image subfolders."""
    return [base, base / "images", base / "val2014", base / "flickr30k-images"]


def read_retrieval_json(path: str | Path, split: str = "test", root: str | Path | None = None) -> RetrievalDataset:
    """Any of the three JSON layouts (told apart by their shape); images under the file's folder, else ``root``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{path}: no such file; give the path of a retrieval JSON (Karpathy, COCO or ALBEF layout)")
    data = _load_json(path)
    reader = _json_layout(data)
    if reader is None:
        raise DataError(
            f"{path}: unknown retrieval JSON layout; expected a Karpathy {{'images': [...sentences]}}, "
            "a COCO {'images', 'annotations'} or an ALBEF [{'image', 'caption'}] file"
        )
    dirs = _image_dirs(path.parent) + (_image_dirs(Path(root).expanduser()) if root else [])
    return from_entries(_dataset_name("json", path), reader(data, split, str(path)), dirs, split)


def read_retrieval_csv(path: str | Path, split: str = "test", root: str | Path | None = None) -> RetrievalDataset:
    """A CSV of ``image,caption`` rows; images under the file's folder, else ``root``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{path}: no such file; give the path of an image,caption CSV")
    dirs = _image_dirs(path.parent) + (_image_dirs(Path(root).expanduser()) if root else [])
    return from_entries(_dataset_name("csv", path), csv_entries(path), dirs, split)


# --- registry ----------------------------------------------------------------------------------

Opener = Callable[[str, "Path | None"], RetrievalDataset]
_REGISTRY: Registry[Opener] = Registry("retrieval dataset", DataError)
register_retrieval = _REGISTRY.register  # decorator: ``opener(split, root) -> RetrievalDataset`` under a name
# Names with a scheme carry their file: ``retrieval-json:PATH`` (parsed once, as open_clip parses hf-hub:).
_SCHEMES: Registry[Callable[[str, str, "Path | None"], RetrievalDataset]] = Registry("retrieval scheme", DataError)
_SCHEMES.register("retrieval-json")(read_retrieval_json)
_SCHEMES.register("retrieval-csv")(read_retrieval_csv)


def list_retrieval_datasets() -> list[str]:
    return _REGISTRY.names()


def parse_retrieval_name(name: str) -> tuple[str | None, str]:
    """``retrieval-json:PATH`` -> ("retrieval-json", PATH); a registered name -> (None, name)."""
    return _SCHEMES.split_scheme(name)


def is_retrieval_dataset(name: str) -> bool:
    scheme, ident = parse_retrieval_name(name)
    return scheme is not None or ident in _REGISTRY


def open_retrieval(name: str, split: str = "test", root: str | Path | None = None) -> RetrievalDataset:
    """A retrieval dataset by name (registered, or ``retrieval-json:PATH`` / ``retrieval-csv:PATH``)."""
    scheme, ident = parse_retrieval_name(name)
    if scheme is not None:
        return _SCHEMES[scheme](ident, split, root)
    if ident not in _REGISTRY:
        raise DataError(
            f"unknown retrieval dataset '{name}'; registered: {', '.join(list_retrieval_datasets())}, "
            "or retrieval-json:PATH / retrieval-csv:PATH"
        )
    return _REGISTRY[ident](split, Path(root).expanduser() if root else None)


def _karpathy_opener(name: str, json_name: str, images_hint: str):
    def opener(split: str, root: Path | None) -> RetrievalDataset:
        folder = root or default_root() / name
        path = folder / json_name
        if not path.is_file():
            raise DataError(
                f"{name}: {path} not found; put the Karpathy-split {json_name} (caption_datasets.zip of "
                f"Karpathy's NeuralTalk splits) and {images_hint} in {folder}, or pass that folder as root"
            )
        entries = karpathy_entries(_load_json(path), split, str(path))
        return from_entries(name, entries, _image_dirs(folder), split)

    return opener


register_retrieval("flickr30k")(
    _karpathy_opener(
        "flickr30k", "dataset_flickr30k.json", "the Flickr30k images (flickr30k-images/, on request from the dataset's authors)"
    )
)
register_retrieval("mscoco")(
    _karpathy_opener("mscoco", "dataset_coco.json", "the COCO 2014 images (val2014/ and train2014/ from images.cocodataset.org)")
)

from mmcoa.data import synthetic as _synthetic  # noqa: F401, E402  (registers fmnist_pairs)
