"""Which samples each rank reads at each step: the same global batches whatever the world size.

Global batch b of an epoch is ``perm[b*B:(b+1)*B]`` of a permutation seeded by (seed, epoch); the last
batch wraps around to the start so every step has B samples. Rank r takes the r-th slice of it. So a
run resumed mid-epoch restarts at batch b exactly, even on a different number of GPUs. Keys are
(epoch, index) pairs, so augmentation in persistent workers follows the epoch.
"""

import numpy as np

from histokt.errors import UserError


def epoch_permutation(n: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng((seed, epoch, 0x5A3)).permutation(n)


class GlobalBatchSampler:
    """A batch_sampler yielding this rank's share of each global batch, from ``start_batch`` on."""

    def __init__(self, n: int, global_batch: int, world: int = 1, rank: int = 0, seed: int = 0, shuffle=True):
        if n < 1:
            raise UserError("the split to train on is empty")
        if global_batch % world:
            raise UserError(f"--batch-size {global_batch} must be a multiple of the world size {world}")
        self.n, self.batch, self.world, self.rank = n, global_batch, world, rank
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        """Batches per epoch (not counting a resumed epoch's skipped start)."""
        return -(-self.n // self.batch)

    def __iter__(self):
        perm = epoch_permutation(self.n, self.seed, self.epoch, self.shuffle)
        perm = np.concatenate([perm, perm[: len(self) * self.batch - self.n]]) if self.n % self.batch else perm
        while len(perm) < len(self) * self.batch:  # a split smaller than one batch wraps more than once
            perm = np.concatenate([perm, perm])[: len(self) * self.batch]
        local = self.batch // self.world
        for b in range(self.start_batch, len(self)):
            mine = perm[b * self.batch + self.rank * local : b * self.batch + (self.rank + 1) * local]
            yield [(self.epoch, int(i)) for i in mine]


def eval_rows(n: int, world: int, rank: int) -> range:
    """The samples rank r evaluates: [r*n/world, (r+1)*n/world), contiguous, so ranks gather in order."""
    return range(rank * n // world, (rank + 1) * n // world)


def eval_shards(n: int, batch: int, world: int, rank: int) -> list[list[int]]:
    """This rank's evaluation batches of its ``eval_rows``."""
    rows = eval_rows(n, world, rank)
    return [list(range(a, min(a + batch, rows.stop))) for a in range(rows.start, rows.stop, batch)]
