"""Batch samplers: identity-balanced P x K batches, and plain shuffled batches.

Both yield lists of indices and are deterministic per (seed, epoch): call
``set_epoch(e)`` before iterating; iterating twice in one epoch repeats the batches.

PK policy: an epoch is ``max(1, N // (P * K))`` batches. Identities are taken P at
a time from a shuffled order; when fewer than P are left, the leftovers sit out
and a fresh shuffle starts, so every batch holds P distinct identities and all
identities come up about equally often. K images are
drawn per identity without replacement, or with replacement when it has fewer.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterator, Sequence

import numpy as np


class _EpochSeeded:
    def __init__(self, seed: int):
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _rng(self) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch])


class PKSampler(_EpochSeeded):
    def __init__(self, labels: Sequence[Hashable], p: int, k: int, seed: int):
        super().__init__(seed)
        if p < 1 or k < 1:
            raise ValueError(f"PKSampler needs p >= 1 and k >= 1; got p={p}, k={k}")
        by_identity: dict[Hashable, list[int]] = {}
        for index, label in enumerate(labels):
            by_identity.setdefault(label, []).append(index)
        if p > len(by_identity):
            raise ValueError(
                f"PKSampler: p={p} identities per batch, but the data has only"
                f" {len(by_identity)} identities"
            )
        self._indices = [np.array(v) for v in by_identity.values()]
        self.p, self.k = p, k
        self._batches = max(1, len(labels) // (p * k))

    def __len__(self) -> int:
        return self._batches

    def __iter__(self) -> Iterator[list[int]]:
        rng = self._rng()
        order: list[int] = []
        for _ in range(self._batches):
            if len(order) < self.p:
                order = list(rng.permutation(len(self._indices)))
            chosen, order = order[: self.p], order[self.p :]
            yield [int(i) for identity in chosen for i in self._draw(rng, identity)]

    def _draw(self, rng: np.random.Generator, identity: int) -> np.ndarray:
        indices = self._indices[identity]
        return rng.choice(indices, size=self.k, replace=len(indices) < self.k)


class RandomBatchSampler(_EpochSeeded):
    """Shuffled batches over range(n), as upstream's shuffling DataLoader."""

    def __init__(self, n: int, batch_size: int, seed: int, drop_last: bool = False):
        super().__init__(seed)
        if batch_size < 1:
            raise ValueError(f"RandomBatchSampler needs batch_size >= 1; got {batch_size}")
        self.n, self.batch_size, self.drop_last = n, batch_size, drop_last

    def __len__(self) -> int:
        if self.drop_last:
            return self.n // self.batch_size
        return math.ceil(self.n / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        order = self._rng().permutation(self.n)
        for b in range(len(self)):
            yield order[b * self.batch_size : (b + 1) * self.batch_size].tolist()
