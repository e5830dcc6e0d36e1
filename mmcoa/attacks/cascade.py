"""The attack cascade: per-sample robust flags carried across a family of attacks (AutoAttack's
``run_standard_evaluation`` scheme).

Each attack runs only on the samples every earlier attack left robust, so the worst case over the
family costs far less than running every attack on every sample, and equals it per sample: a sample
is robust in the worst case exactly when no attack of the family breaks it.
"""

from __future__ import annotations

from typing import Callable, Sequence, TypeVar

import torch

A = TypeVar("A")


def run_cascade(
    attacks: Sequence[A], run_one: Callable[[A, torch.Tensor], torch.Tensor], n: int
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Run ``attacks`` in order, each on the samples still robust.

    Args:
        attacks: any objects ``run_one`` understands (attacks, names, specs), strongest-first or
            cheapest-first: the order changes the cost, never the worst case.
        run_one: ``run_one(attack, idx [m] long) -> [m] bool``, True where sample ``idx[j]`` is still
            correct under ``attack``. Never called with an empty ``idx``.
        n: the number of samples.
    Returns:
        ``robust``: one [n] bool vector per attack, True where the sample survived that attack and
        every earlier one (samples an earlier attack broke are False without being attacked again);
        ``worst``: [n] bool, the last of them (robust against the whole family; all True if no attack).
    """
    alive = torch.ones(n, dtype=torch.bool)
    robust: list[torch.Tensor] = []
    for attack in attacks:
        idx = alive.nonzero().squeeze(1)
        if len(idx):
            ok = torch.as_tensor(run_one(attack, idx), dtype=torch.bool).cpu().view(-1)
            if len(ok) != len(idx):
                raise ValueError(f"run_one returned {len(ok)} flags for {len(idx)} samples")
            alive = alive.clone()
            alive[idx] = ok
        robust.append(alive)
    return robust, alive
