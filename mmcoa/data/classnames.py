"""Class names and prompt templates: the field's shipped lists, and the MMCoA authors' single templates.

clip-benchmark ships ``en_classnames.json`` (clean names, index order of its loaders) and
``en_zeroshot_classification_templates.json`` (CLIP's prompt ensembles); timm ships ImageNet's
synset order (WordNet ids), which is the order of clip-benchmark's ``imagenet1k`` names.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from importlib import resources

# The authors' single prompt per dataset (REFERENCE.md section 1), in the ``{c}`` form.
PAPER_DEFAULT = "This is a photo of a {c}"
PAPER_TEMPLATES = {
    "caltech256": "A photo of a {c}.",
    "cars": "A photo of a {c}.",
    "country211": "A photo I took in {c}.",
    "dtd": "A surface with a {c} texture.",
    "eurosat": "A centered satellite photo of {c}.",
    "fgvc_aircraft": "A photo of a {c}, a type of aircraft.",
    "flowers": "A photo of a {c}, a type of flower.",
    "pets": "A photo of a {c}, a type of pet.",
    "food101": "A photo of {c}, a type of food.",
}


def paper_template(name: str) -> str:
    return PAPER_TEMPLATES.get(name, PAPER_DEFAULT)


@lru_cache(maxsize=None)
def clip_benchmark_list(kind: str) -> dict[str, list[str]]:
    """clip-benchmark's shipped ``en_classnames`` or ``en_zeroshot_classification_templates`` ({} if absent)."""
    try:
        ref = resources.files("clip_benchmark") / "datasets" / f"en_{kind}.json"
        return json.loads(ref.read_text(encoding="utf-8"))
    except (ModuleNotFoundError, FileNotFoundError):
        return {}


def field_classnames(key: str | None) -> list[str] | None:
    names = clip_benchmark_list("classnames").get(key) if key else None
    return list(names) if names else None


def field_templates(key: str | None, fallback: str) -> list[str]:
    found = clip_benchmark_list("zeroshot_classification_templates").get(key) if key else None
    return list(found) if found else [fallback]


def clean_name(raw: str) -> str:
    """A folder or file's class name as words: ``golden_retriever`` -> ``golden retriever``."""
    return raw.replace("_", " ").strip()


def caltech256_name(raw: str) -> str:
    """Caltech-256's folder names: ``001.ak47`` -> ``ak47``, ``253.faces-easy-101`` -> ``faces easy``."""
    name = re.sub(r"^\d+\.", "", raw)
    name = re.sub(r"-101$", "", name)  # classes shared with Caltech-101 carry this suffix
    return clean_name(name.replace("-", " "))


@lru_cache(maxsize=1)
def imagenet_wnids() -> list[str]:
    """ImageNet-1k's 1000 WordNet ids in class-index order (timm's shipped synset list)."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [info.index_to_label_name(i) for i in range(info.num_classes())]


def imagenet_names(wnids: list[str]) -> list[str]:
    """Clean names for ImageNet WordNet ids, in the given order (any subset of the 1000 classes).

    clip-benchmark's ``imagenet1k`` names follow timm's index order; an id outside the 1000 keeps
    timm's lemma (first synonym) or, failing that, the id itself.
    """
    order = {w: i for i, w in enumerate(imagenet_wnids())}
    clean = field_classnames("imagenet1k") or []
    out = []
    for w in wnids:
        if w in order and order[w] < len(clean):
            out.append(clean[order[w]])
        else:
            out.append(_imagenet_lemma(w) or w)
    return out


def _imagenet_lemma(wnid: str) -> str | None:
    from timm.data import ImageNetInfo

    try:
        return ImageNetInfo("imagenet-22k").label_name_to_description(wnid).split(",")[0].strip()
    except Exception:  # noqa: BLE001  (an unknown id: the caller falls back to the id)
        return None
