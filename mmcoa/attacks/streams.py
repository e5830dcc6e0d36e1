"""Per-sample random streams of the image attacks: what a sample draws never depends on its batch.

An attack's random draws for one sample (PGD's and APGD's random starts, Square's windows and signs)
come from a generator of that sample alone, seeded from (seed, stream, the sample's clean image):

* ``seed``: the attack's ``seed`` param, or else the seed torch's global RNG was last seeded with
  (``torch.initial_seed()``), so a caller that seeds torch per run (the evaluation, each training
  step) gets draws that depend on that seed, and the global RNG itself is never consumed;
* ``stream``: which draw of the algorithm it is (``pgd/1``: PGD's second restart). Streams are
  named after the algorithm, not the registered attack, where one attack is by definition part of
  another: the ``aa`` suite's APGD-CE run is ``apgd_ce``'s run, from the same starts;
* the clean image's bytes (a digest): the sample's identity wherever it is, whatever batch,
  shard, rank or cascade subset it arrives in, without the caller passing dataset indices.

So per-sample outcomes are the same at any batch size, over any number of ranks, and between a
cascade (an attack given only some samples) and the attack run on all of them. Two identical images
draw identically, as they should: they are the same input.
"""

from __future__ import annotations

import hashlib
from typing import Callable

import torch


def image_digests(images: torch.Tensor) -> list[bytes]:
    """A digest of each image's shape, dtype and values ([B, ...] -> B digests of 16 bytes)."""
    flat = images.detach().cpu().contiguous()
    head = f"{tuple(flat.shape[1:])}/{flat.dtype}".encode()
    return [hashlib.blake2b(head + x.numpy().tobytes(), digest_size=16).digest() for x in flat]


class SampleStreams:
    """The random streams of one attack call on a batch: one generator per (stream, sample).

    Args:
        seed: the base seed (see the module docstring).
        images: [B, ...] the clean images; each row's digest identifies its sample.
    """

    def __init__(self, seed: int, images: torch.Tensor):
        self.seed = int(seed)
        self.keys = image_digests(images)
        self.device, self.dtype = images.device, images.dtype

    def generator(self, stream: str, row: int) -> torch.Generator:
        """A fresh CPU generator for sample ``row`` of the batch in ``stream``."""
        material = f"{self.seed}/{stream}/".encode() + self.keys[row]
        seed = int.from_bytes(hashlib.blake2b(material, digest_size=8).digest(), "little") >> 1
        return torch.Generator().manual_seed(seed)

    def generators(self, stream: str, rows: torch.Tensor) -> list[torch.Generator]:
        """One fresh generator per row in ``rows`` [m] (batch rows), in that order."""
        return [self.generator(stream, int(r)) for r in rows.tolist()]

    def draw(self, stream: str, rows: torch.Tensor, fn: Callable[[torch.Generator], torch.Tensor]) -> torch.Tensor:
        """``fn(generator)`` per row, stacked to [m, ...] on the images' device and dtype."""
        out = [fn(g) for g in self.generators(stream, rows)]
        if not out:
            return torch.zeros(0, device=self.device, dtype=self.dtype)
        return torch.stack(out).to(self.device, self.dtype)

    @staticmethod
    def uniform(gens: list[torch.Generator], n: int, device: torch.device) -> torch.Tensor:
        """[len(gens), n] uniforms in [0, 1), row j drawn from ``gens[j]`` (stateful: each call moves on)."""
        if not gens:
            return torch.zeros(0, n, device=device)
        return torch.stack([torch.rand(n, generator=g) for g in gens]).to(device)
