"""Which samples each optimisation step sees, and the generator of each sample's random draws.

The sample ids of micro-step k are a fixed function of (seed, k) and each sample's draws
(clip choice, VAE sampling, noise, timestep) come from a generator seeded by (seed, micro-step,
position in the global batch): a resumed run sees what the uninterrupted one would have, and N
processes with batch B/N see what one process with batch B sees.
"""

from __future__ import annotations

import torch
from torch.utils.data import Sampler


class StepSampler(Sampler):
    """Yields, for each micro-step from `start`, this process's sample ids of the global batch."""

    def __init__(
        self, size: int, global_batch: int, rank: int, world: int, start: int, total: int, seed: int
    ):
        self.size, self.global_batch, self.rank, self.world = size, global_batch, rank, world
        self.start, self.total, self.seed = start, total, seed
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            gen = torch.Generator().manual_seed(self.seed + 7919 * epoch)
            self._perms[epoch] = torch.randperm(self.size, generator=gen).tolist()
        return self._perms[epoch]

    def ids(self, micro_step: int) -> list[int]:
        local = self.global_batch // self.world
        ids = []
        for j in range(self.rank * local, (self.rank + 1) * local):
            position = micro_step * self.global_batch + j
            epoch, offset = divmod(position, self.size)
            ids.append(epoch * self.size + self._perm(epoch)[offset])
        return ids

    def __iter__(self):
        for k in range(self.start, self.total):
            yield self.ids(k)

    def __len__(self) -> int:
        return self.total - self.start


def sample_generators(seed: int, micro_step: int, positions: range) -> list[torch.Generator]:
    return [
        torch.Generator().manual_seed((seed + 1) * 2_000_003 + micro_step * 65_537 + j)
        for j in positions
    ]
