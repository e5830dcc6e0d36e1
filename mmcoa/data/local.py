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

A dataset declared as data (``evaluate.sources``, or a YAML file given to the CLI) is a mapping naming one
source, ``csv: PATH`` or ``folder: PATH``, with optional ``classnames`` (an inline list, a folder -> name
mapping for folders, or a file: ``.txt`` one per line, ``.json``/``.yaml``) and ``templates`` (a list or a
file, ``{c}`` where the class name goes); or ``retrieval_json: PATH`` / ``retrieval_csv: PATH``.
:func:`source_reference` turns it into the reference that opens it (``declared:JSON`` for classification),
which manifests record, so a prepared subset reopens it anywhere.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import yaml

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


def folder_spec(arg: str, classnames: list[str] | dict[str, str] | None = None,
                templates: list[str] | None = None) -> DatasetSpec:
    """An ImageFolder tree; ``classnames`` (a list in sorted folder order, or folder -> name) and
    ``templates`` replace the names read from the folders and the generic template."""
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
        names = folder_classnames(classes, classnames, base)
        return FileDataset(name, split, paths, labels, names, templates or [LOCAL_TEMPLATE])

    return DatasetSpec(
        name,
        open_split,
        folder=lambda root: base,
        obtain=f"create {base}/train/<class>/<image> and {base}/test/<class>/<image>",
    )


register_scheme("folder")(folder_spec)


def folder_classnames(classes: list[str], given: list[str] | dict[str, str] | None, where: Path) -> list[str]:
    """The class names of an image folder: the folder names as words, or the declared ones."""
    if given is None:
        return [clean_name(c) for c in classes]
    if isinstance(given, dict):
        missing = [c for c in classes if c not in given]
        if missing:
            raise DataError(f"{where}: class folder(s) {missing} have no entry in the declared classnames; add them")
        return [str(given[c]) for c in classes]
    if len(given) != len(classes):
        raise DataError(f"{where}: {len(given)} declared classnames for {len(classes)} class folders {classes}; "
                        "give one name per folder, in sorted folder order (or a folder -> name mapping)")
    return [str(n) for n in given]


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


def csv_classes(rows: list[dict[str, str]], where: Path, declared: list[str] | None = None) -> tuple[list[str], list[int]]:
    """(class names, label per row) from text labels or integer labels (+ optional classname).

    With ``declared`` class names the list fixes the classes and their order: an integer label indexes
    it, a text label must be one of its names."""
    raw = [r["label"].strip() for r in rows]
    numeric = all(v.lstrip("-").isdigit() for v in raw)
    if declared is not None:
        return list(declared), _declared_labels(raw, numeric, declared, where)
    if not numeric:
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


def _declared_labels(raw: list[str], numeric: bool, declared: list[str], where: Path) -> list[int]:
    index = {n: i for i, n in enumerate(declared)}
    labels = [int(v) for v in raw] if numeric else [index.get(v, -1) for v in raw]
    for row, (value, y) in enumerate(zip(raw, labels), start=2):  # row 1 is the header
        if not 0 <= y < len(declared):
            raise DataError(f"{where}: row {row}: label '{value}' is not one of the {len(declared)} declared classnames "
                            "(an index from 0, or one of the names); fix the row or the classnames")
    return labels


def csv_spec(arg: str, classnames: list[str] | None = None, templates: list[str] | None = None) -> DatasetSpec:
    """A labelled file list; ``classnames`` and ``templates`` (declared) replace the names read from the labels."""
    path = Path(arg).expanduser()
    name = f"csv_{path.stem}"

    def open_split(root: Path, split: str, download: bool) -> FileDataset:
        rows = read_csv_rows(path)
        names, labels = csv_classes(rows, path, classnames)
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
        _check_files(path, [paths[i] for i in keep])
        return FileDataset(name, split, [paths[i] for i in keep], np.asarray(labels)[keep], names, templates or [LOCAL_TEMPLATE])

    return DatasetSpec(
        name,
        open_split,
        folder=lambda root: path,
        obtain=f"create {path} with a header path,label[,split][,classname] (paths relative to its folder)",
    )


register_scheme("csv")(csv_spec)


def _check_files(csv_path: Path, paths: list[str]) -> None:
    """Every image a CSV names exists (a missing one is a broken list, not a corrupt image to skip)."""
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise DataError(f"{csv_path}: names {missing[0]}{more}, not found; paths are relative to the CSV's folder: "
                        "fix the path column or put the files there")


# --- datasets declared as data (params or a YAML file, no Python) -------------------------------

# A declaration names exactly one source: a classification CSV or image folder, or a retrieval file.
CLASSIFICATION_SOURCES = {"csv": csv_spec, "folder": folder_spec}
RETRIEVAL_SOURCES = {"retrieval_json": "retrieval-json", "retrieval_csv": "retrieval-csv"}
DECLARATION_KEYS = (*CLASSIFICATION_SOURCES, *RETRIEVAL_SOURCES, "classnames", "templates")


def source_reference(source: str | Mapping[str, Any]) -> str:
    """The dataset reference of an ``evaluate.sources`` value: a reference string as it is; a declaration
    (``{csv: PATH | folder: PATH, classnames: [..] | FILE, templates: [..] | FILE}``, or ``{retrieval_json:
    PATH}`` / ``{retrieval_csv: PATH}``) as the reference that opens it, which manifests record."""
    if isinstance(source, str):
        return source
    if not isinstance(source, Mapping):
        raise DataError(f"dataset declaration {source!r}: give a reference string or a mapping of {', '.join(DECLARATION_KEYS)}")
    unknown = sorted(set(source) - set(DECLARATION_KEYS))
    named = [k for k in (*CLASSIFICATION_SOURCES, *RETRIEVAL_SOURCES) if k in source]
    if unknown or len(named) != 1:
        problem = f"unknown key(s) {unknown}" if unknown else f"{len(named)} sources {named}"
        raise DataError(f"dataset declaration {dict(source)}: {problem}; it takes one of "
                        f"{', '.join((*CLASSIFICATION_SOURCES, *RETRIEVAL_SOURCES))} and optional classnames, templates")
    if named[0] in RETRIEVAL_SOURCES:
        extra = sorted(set(source) - {named[0]})
        if extra:
            raise DataError(f"dataset declaration {dict(source)}: a retrieval file carries its own captions; drop {extra}")
        return f"{RETRIEVAL_SOURCES[named[0]]}:{source[named[0]]}"
    return "declared:" + json.dumps({k: source[k] for k in sorted(source)}, ensure_ascii=False, separators=(",", ":"))


def read_list(value: Any, where: str, key: str) -> list[str] | dict[str, str]:
    """Class names or templates given inline (a list, or for class names a mapping) or as a file: ``.txt``
    one per line, ``.json`` / ``.yaml`` a list or a mapping."""
    if isinstance(value, str):
        path = Path(value).expanduser()
        if not path.is_file():
            raise DataError(f"{where}: {key} file {path} not found; give an inline list or a file (.txt one per line, .json/.yaml)")
        text = path.read_text(encoding="utf-8-sig")
        if path.suffix.lower() in (".json", ".yaml", ".yml"):
            value = yaml.safe_load(text)
        else:
            value = [line.strip() for line in text.splitlines() if line.strip()]
    if isinstance(value, dict) and key == "classnames":
        return {str(k): str(v) for k, v in value.items()}
    if not isinstance(value, list) or not value or not all(isinstance(v, (str, int)) for v in value):
        raise DataError(f"{where}: {key} must be a non-empty list of names (or a file holding one)")
    return [str(v) for v in value]


@register_scheme("declared")
def declared_spec(arg: str) -> DatasetSpec:
    """``declared:JSON``: the reference :func:`source_reference` gives a classification declaration."""
    try:
        decl = json.loads(arg)
    except json.JSONDecodeError as err:
        raise DataError(f"declared:{arg}: not a JSON declaration ({err.msg}); declare datasets in evaluate.sources") from None
    (kind,) = [k for k in CLASSIFICATION_SOURCES if k in decl]
    where = f"dataset {decl[kind]}"
    classnames = read_list(decl["classnames"], where, "classnames") if "classnames" in decl else None
    templates = read_list(decl["templates"], where, "templates") if "templates" in decl else None
    if templates is not None:
        bad = [t for t in templates if "{c}" not in t]
        if bad:
            raise DataError(f"{where}: template {bad[0]!r} has no {{c}}; write where the class name goes as {{c}}")
    if kind == "csv" and isinstance(classnames, dict):
        raise DataError(f"{where}: a CSV's classnames are a list (index = label), not a mapping")
    return CLASSIFICATION_SOURCES[kind](decl[kind], classnames, templates)
