"""Which samples each rank sees in each epoch: order, sharding, resume position.

The order is a function of (seed, epoch) only: a permutation obtained by sorting
hashed indices, so it does not depend on library versions or on who asks.
Sharding is interleaved (rank r takes positions r, r + W, r + 2W, ... of the
epoch's permutation) so ranks never overlap:

- drop_last=True: the epoch is truncated to the largest multiple of
  world_size * batch_size, every rank runs the same number of full batches
  (DeepSpeed needs equal step counts); the dropped tail differs every epoch.
- drop_last=False: the permutation is padded by wrapping around to its start until
  it fills whole global batches, so a few samples appear twice in that epoch.
"""
import math

import numpy as np

from dmt.data.rng import hash64
from dmt.errors import DataError

_ORDER_STREAM = 0x0D0E  # keeps the order's hashes apart from the augmentation's


class ShardedEpochs:
    def __init__(self, num_samples: int, batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, drop_last: bool = True):
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world_size {world_size}")
        self.num_samples, self.batch_size = int(num_samples), int(batch_size)
        self.seed, self.rank, self.world_size, self.drop_last = seed, rank, world_size, drop_last
        global_batch = batch_size * world_size
        if drop_last:
            self.num_batches = self.num_samples // global_batch
            if self.num_batches == 0:
                # batch_size is the per-rank micro-batch: a run's global batch is at least
                # this step of every rank, so it cannot fill a global batch either.
                raise DataError(
                    f"{self.num_samples} samples do not fill one micro-batch of {batch_size} "
                    f"on each of {world_size} rank(s) ({global_batch} samples), let alone a "
                    "global batch: add data or lower optim.micro_batch (and "
                    "optim.global_batch with it); in Python code, build_loader(..., "
                    "drop_last=False) repeats samples instead")
        else:
            self.num_batches = math.ceil(self.num_samples / global_batch)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The global permutation of all sample indices for `epoch` (int64)."""
        keys = hash64(self.seed, _ORDER_STREAM, epoch, np.arange(self.num_samples))
        return np.argsort(keys, kind="stable").astype(np.int64)

    def rank_batches(self, epoch: int, start_batch: int = 0) -> np.ndarray:
        """This rank's batches of `epoch` from `start_batch` on: int64 [n, batch_size]."""
        if not 0 <= start_batch <= self.num_batches:
            raise DataError(f"start_batch {start_batch} is outside 0..{self.num_batches}")
        used = self.num_batches * self.batch_size * self.world_size
        order = np.resize(self.epoch_order(epoch), used)  # truncates, or wraps around
        mine = order[self.rank::self.world_size]
        return mine.reshape(self.num_batches, self.batch_size)[start_batch:]
