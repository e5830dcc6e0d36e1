"""A trainable method resolved against the registries: which defense class, its label and options,
and the checks only the registries can make (a defense or variant name, attacks of the right side
with valid params and schedules, the defense's own options), each naming the params key at fault."""

from __future__ import annotations

from dataclasses import dataclass

from mmcoa.config import FinetuneParams, Recipe
from mmcoa.defenses.adversary import check_slot
from mmcoa.defenses.base import Defense, DefenseParams, defense_class, list_defenses

SLOTS = {"image_attack": "image", "text_attack": "text"}


@dataclass(frozen=True)
class Resolved:
    """A method ready to train: its recipe, defense class, display label and typed options."""

    recipe: Recipe
    cls: type[Defense]
    label: str
    options: DefenseParams


def resolve(finetune: FinetuneParams, method: str) -> Resolved:
    """``method`` (a defense or a variant name) resolved; :class:`ValueError` names the key at fault."""
    defense = finetune.defense_of(method)
    if defense not in list_defenses():
        where = f"finetune.variants.{method}.defense" if method in finetune.variants else "finetune.methods"
        known = ", ".join([*list_defenses(), *finetune.variants])
        raise ValueError(f"{where}: unknown defense or variant '{defense}'; registered: {known}")
    recipe = finetune.recipe(method)
    cls = defense_class(defense)
    for slot, kind in SLOTS.items():
        if kind in cls.attacks:
            try:
                check_slot(getattr(recipe.params, slot), kind)
            except ValueError as err:
                raise ValueError(f"{finetune.slot_key(method, slot)}: {err}") from None
    try:
        options = cls.validate_options(recipe.params.options)
    except ValueError as err:
        raise ValueError(f"{finetune.slot_key(method, 'options')}: {err}") from None
    label = recipe.label or (cls.label if method == defense else f"{cls.label} ({method})")
    return Resolved(recipe, cls, label, options)


def check_finetune(finetune: FinetuneParams) -> None:
    """Resolve every method, variant and override target; the first problem raises (see :func:`resolve`)."""
    for m in finetune.overrides:
        if m not in list_defenses() and m not in finetune.variants:
            raise ValueError(f"finetune.overrides.{m}: unknown defense or variant; registered: "
                             f"{', '.join([*list_defenses(), *finetune.variants])}")
    for m in dict.fromkeys([*finetune.methods, *finetune.variants, *finetune.overrides]):
        resolve(finetune, m)
