"""Defenses: one training loss per method, behind a registry (``create_defense``)."""

from mmcoa.defenses.adversary import Adversary, AdversaryError
from mmcoa.defenses.base import (
    Defense,
    DefenseContext,
    DefenseError,
    DefenseOutput,
    DefenseParams,
    clip_loss,
    create_defense,
    defense_class,
    list_defenses,
    register_defense,
)
from mmcoa.defenses import anchored, clean, fare, leaf, mmcoa, pmg_aft, tecoa, tga_zsr  # noqa: F401  (register)
from mmcoa.defenses.recipe import check_finetune, resolve


__all__ = [
    "Adversary",
    "AdversaryError",
    "Defense",
    "DefenseContext",
    "DefenseError",
    "DefenseOutput",
    "DefenseParams",
    "check_finetune",
    "clip_loss",
    "create_defense",
    "defense_class",
    "list_defenses",
    "register_defense",
    "resolve",
]
