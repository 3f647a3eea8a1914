"""The rank-sharded, resumable batch stream over a dataset's rows, epoch after epoch."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

logger = logging.getLogger(__name__)


def epoch_permutation(num_rows: int, seed: int, epoch: int) -> torch.Tensor:
    """torch.randperm(num_rows) from a generator seeded by (seed, epoch)."""
    state = np.random.SeedSequence([seed % 2**63, epoch]).generate_state(2)
    generator = torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)
    return torch.randperm(num_rows, generator=generator)  # (N,)


class BatchStream(Iterator[torch.Tensor]):
    """Infinite (b, T) LongTensor batches over epochs, sharded by rank.

    Epoch e permutes the rows with ``epoch_permutation(N, seed, e)``, truncates it to a
    multiple of ``world_size * batch_size`` (``drop_last=False`` wraps around instead, so
    every row is seen), and rank r takes ``perm[r::world_size]`` in consecutive slices of
    ``batch_size``: w ranks of batch b see at step s exactly the rows one rank of batch
    w*b sees.  ``state_dict()`` holds (epoch, batch_in_epoch); a stream loaded from it
    yields exactly the next batch.
    """

    def __init__(self, dataset: Dataset, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, num_workers: int = 0, drop_last: bool = True) -> None:
        if batch_size <= 0 or world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"need batch_size > 0 and 0 <= rank < world_size, got "
                             f"batch_size={batch_size}, rank={rank}, world_size={world_size}")
        self.num_rows = len(dataset)
        self.global_batch_size = world_size * batch_size
        if self.num_rows < self.global_batch_size:
            raise ValueError(f"the dataset has {self.num_rows} rows, fewer than one global "
                             f"batch of world_size*batch_size = {world_size}*{batch_size} = "
                             f"{self.global_batch_size}")
        self.dataset, self.batch_size, self.rank, self.world_size = (
            dataset, batch_size, rank, world_size)
        self.seed, self.num_workers, self.drop_last = seed, num_workers, drop_last
        self.epoch = 0
        self.batch_in_epoch = 0
        self._loader_iter: Iterator[torch.Tensor] | None = None
        self._cached: tuple[int, list[list[int]]] | None = None  # (epoch, its batches)

    @property
    def steps_per_epoch(self) -> int:
        return (self.num_rows // self.global_batch_size if self.drop_last
                else math.ceil(self.num_rows / self.global_batch_size))

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of row indices for ``epoch``."""
        perm = epoch_permutation(self.num_rows, self.seed, epoch)  # (N,)
        used = self.steps_per_epoch * self.global_batch_size
        if used > self.num_rows:
            perm = torch.cat([perm, perm[:used - self.num_rows]])
        mine = perm[:used][self.rank::self.world_size].tolist()
        return [mine[i:i + self.batch_size] for i in range(0, len(mine), self.batch_size)]

    def _batches(self) -> list[list[int]]:
        if self._cached is None or self._cached[0] != self.epoch:
            self._cached = (self.epoch, self.epoch_batches(self.epoch))
        return self._cached[1]

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> torch.Tensor:
        if self.batch_in_epoch >= self.steps_per_epoch:
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
            self._loader_iter = None
        if self.num_workers > 0:
            if self._loader_iter is None:
                self._loader_iter = self._start_loader()
            batch = next(self._loader_iter)
        else:
            rows = self._batches()[self.batch_in_epoch]
            batch = torch.stack([self.dataset[i] for i in rows])  # (b, T)
        self.batch_in_epoch += 1
        return batch

    def _start_loader(self) -> Iterator[torch.Tensor]:
        """A non-persistent DataLoader over the rest of the current epoch."""
        batches = self._batches()[self.batch_in_epoch:]
        loader = DataLoader(self.dataset, batch_sampler=batches, num_workers=self.num_workers,
                            persistent_workers=False)
        return iter(loader)

    def close(self) -> None:
        """Shut down DataLoader workers (they restart on the next batch)."""
        self._loader_iter = None

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "seed": self.seed,
                "global_batch_size": self.global_batch_size, "num_rows": self.num_rows}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from ``state``; a changed global batch maps by rows already consumed."""
        epoch, batch = int(state["epoch"]), int(state["batch_in_epoch"])
        saved_global = int(state.get("global_batch_size", self.global_batch_size))
        if saved_global != self.global_batch_size:
            batch = min(batch * saved_global // self.global_batch_size, self.steps_per_epoch)
            logger.warning("resuming a stream saved with global batch %d at %d: continuing at "
                           "batch %d of epoch %d", saved_global, self.global_batch_size,
                           batch, epoch)
        for key in ("seed", "num_rows"):
            if key in state and state[key] != getattr(self, key):
                logger.warning("resuming a stream saved with %s=%s, now %s: the order differs",
                               key, state[key], getattr(self, key))
        self.epoch, self.batch_in_epoch = epoch, batch
        self._loader_iter = None
