"""Attacks: image, text and multimodal, behind one registry (``create_attack``, ``list_attacks``)."""

from mmcoa.attacks.base import (
    Attack,
    AttackError,
    AttackParams,
    ObjectiveOutput,
    attack_class,
    create_attack,
    list_attacks,
    register_attack,
)
from mmcoa.attacks import image  # noqa: F401  (registers the image attacks)
from mmcoa.attacks import apgd  # noqa: F401  (registers apgd_ce, apgd_t and the aa suite)
from mmcoa.attacks import fast  # noqa: F401  (registers the single-step fgsm and nfgsm)
from mmcoa.attacks import square  # noqa: F401  (registers the square attack)
from mmcoa.attacks import text  # noqa: F401  (registers the text attacks)
from mmcoa.attacks import transfer  # noqa: F401  (registers the transfer attack)
from mmcoa.attacks import typographic  # noqa: F401  (registers the typographic attack)

__all__ = [
    "Attack",
    "AttackError",
    "AttackParams",
    "ObjectiveOutput",
    "attack_class",
    "create_attack",
    "list_attacks",
    "register_attack",
]
from mmcoa.attacks import multimodal  # noqa: F401, E402  (registers the multimodal attack)
