"""Defenses: one training loss per method, behind a registry (``create_defense``)."""

from mmcoa.defenses.base import (
    Defense,
    DefenseContext,
    DefenseOutput,
    clip_loss,
    create_defense,
    defense_class,
    list_defenses,
    register_defense,
)
from mmcoa.defenses import clean, fare, mmcoa, pmg_aft, tecoa  # noqa: F401  (register)

__all__ = [
    "Defense",
    "DefenseContext",
    "DefenseOutput",
    "clip_loss",
    "create_defense",
    "defense_class",
    "list_defenses",
    "register_defense",
]
