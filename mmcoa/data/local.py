"""Datasets a user points at: ``folder:PATH`` (an ImageFolder tree) and ``csv:PATH`` (a labelled file list).

``folder:PATH`` -- ``PATH/{train,test}/<class>/<image>`` (torchvision's ImageFolder layout; images may
sit in sub-folders of a class folder). Class names are the folder names with ``_`` read as a space;
the class list is the union over both splits, so a class missing from one split keeps its index.

``csv:PATH`` -- a UTF-8 CSV with a header row and the columns
  ``path``   image file, relative to the CSV's folder (absolute paths are kept);
  ``label``  either an integer class index or a class name (any text, any script);
  ``split``  optional: ``train`` or ``test``; without it a seeded stratified split holds out 30% as test;
  ``classname`` optional, with integer labels: the name of that label's class (the same on every row).
With text labels the classes are the sorted distinct labels; with integer labels they are 0..max, named
by ``classname`` or by the number itself. Either way both splits share one class list.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

from mmcoa.data.base import DataError, FileDataset, seeded_split
from mmcoa.data.classnames import clean_name
from mmcoa.data.registry import DatasetSpec, register_scheme

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
LOCAL_TEMPLATE = "a photo of a {c}."


def class_folders(*split_dirs: Path) -> list[str]:
    """Sorted names of the class folders found under any of ``split_dirs``."""
    return sorted({e.name for d in split_dirs if d.is_dir() for e in os.scandir(d) if e.is_dir()})


def scan_image_folder(split_dir: Path, classes: list[str]) -> tuple[list[str], list[int]]:
    """(file paths, labels) of the images under ``split_dir/<class>/``, in a stable sorted order."""
    paths, labels = [], []
    for label, cls in enumerate(classes):
        for dirpath, dirnames, filenames in os.walk(split_dir / cls):
            dirnames.sort()
            for f in sorted(filenames):
                if f.lower().endswith(IMG_EXTENSIONS):
                    paths.append(os.path.join(dirpath, f))
                    labels.append(label)
    return paths, labels


@register_scheme("folder")
def folder_spec(arg: str) -> DatasetSpec:
    base = Path(arg).expanduser()
    name = f"folder_{base.name}"

    def open_split(root: Path, split: str, download: bool) -> FileDataset:
        split_dir = base / split
        if not split_dir.is_dir():
            raise DataError(f"{name}: {split_dir} is missing; an image folder dataset needs {base}/train and {base}/test")
        classes = class_folders(base / "train", base / "test")
        paths, labels = scan_image_folder(split_dir, classes)
        if not paths:
            raise DataError(f"{name}: no images ({', '.join(IMG_EXTENSIONS)}) under {split_dir}/<class>/")
        return FileDataset(name, split, paths, labels, [clean_name(c) for c in classes], [LOCAL_TEMPLATE])

    return DatasetSpec(
        name,
        open_split,
        folder=lambda root: base,
        obtain=f"create {base}/train/<class>/<image> and {base}/test/<class>/<image>",
    )


def read_csv_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a dataset CSV, checked for the required columns."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = {"path", "label"} - set(reader.fieldnames or [])
        if missing:
            raise DataError(f"{path}: missing column(s) {', '.join(sorted(missing))}; the header needs path,label[,split][,classname]")
        rows = list(reader)
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def csv_classes(rows: list[dict[str, str]], where: Path) -> tuple[list[str], list[int]]:
    """(class names, label per row) from text labels or integer labels (+ optional classname)."""
    raw = [r["label"].strip() for r in rows]
    if not all(v.lstrip("-").isdigit() for v in raw):
        names = sorted(set(raw))
        index = {n: i for i, n in enumerate(names)}
        return names, [index[v] for v in raw]
    labels = [int(v) for v in raw]
    if min(labels) < 0:
        raise DataError(f"{where}: negative label {min(labels)}; labels are class indices from 0")
    names = [str(i) for i in range(max(labels) + 1)]
    for r, y in zip(rows, labels):
        given = (r.get("classname") or "").strip()
        if given:
            if names[y] not in (str(y), given):
                raise DataError(f"{where}: label {y} is named both '{names[y]}' and '{given}'; one name per label")
            names[y] = given
    return names, labels


@register_scheme("csv")
def csv_spec(arg: str) -> DatasetSpec:
    path = Path(arg).expanduser()
    name = f"csv_{path.stem}"

    def open_split(root: Path, split: str, download: bool) -> FileDataset:
        rows = read_csv_rows(path)
        names, labels = csv_classes(rows, path)
        paths = [str(path.parent / r["path"].strip()) for r in rows]
        if "split" in rows[0]:
            bad = sorted({r["split"] for r in rows} - {"train", "test"})
            if bad:
                raise DataError(f"{path}: split values {bad}; use train or test")
            keep = np.array([i for i, r in enumerate(rows) if r["split"] == split], dtype=np.int64)
        else:
            keep = seeded_split(np.asarray(labels, dtype=np.int64), split)
        if len(keep) == 0:
            raise DataError(f"{path}: no rows for split '{split}'")
        return FileDataset(name, split, [paths[i] for i in keep], np.asarray(labels)[keep], names, [LOCAL_TEMPLATE])

    return DatasetSpec(
        name,
        open_split,
        folder=lambda root: path,
        obtain=f"create {path} with a header path,label[,split][,classname] (paths relative to its folder)",
    )
