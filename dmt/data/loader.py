"""What every backend's loader shares: epoch and resume position, skip accounting.

A backend subclasses DualViewLoader and implements `_epoch_batches(epoch, batches)`,
a generator of batch dicts for the given rows of sample indices.
"""
import logging

import torch

from dmt.data.augment import ViewSpec
from dmt.data.sampling import ShardedEpochs

log = logging.getLogger(__name__)

# Raised whenever the same (seed, epoch, index) comes to give another sample order, crop,
# flip or jitter. Checkpoints record it, so that a resume across versions says it cannot
# repeat the uninterrupted run. 2: colour jitter in a per-image random order.
DATA_STREAM_VERSION = 2


class DualViewLoader:
    """Iterable of {"teacher", "student", "index", "label"} batches.

    `set_epoch(e, start_batch=k)` makes the next iteration yield batches k.. of
    epoch e; without it, each new iteration runs the next epoch (0, 1, 2, ...).
    """

    def __init__(self, plan: ShardedEpochs, spec: ViewSpec, device="cpu"):
        self.plan, self.spec = plan, spec
        self.device = torch.device(device)
        self._next_epoch, self._start_batch = 0, 0
        self._skipped = {}  # path -> reason, in the order first seen

    # --- the interface the engine uses ---
    def __len__(self) -> int:
        return self.plan.num_batches

    @property
    def num_samples(self) -> int:
        return self.plan.num_samples

    @property
    def batch_size(self) -> int:
        return self.plan.batch_size

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch {start_batch} is outside 0..{len(self)}")
        self._next_epoch, self._start_batch = int(epoch), int(start_batch)

    @property
    def skipped(self) -> int:
        """Undecodable files skipped so far (each counted once)."""
        return len(self._skipped)

    @property
    def skipped_files(self) -> list:
        return list(self._skipped)

    def __iter__(self):
        epoch, start = self._next_epoch, self._start_batch
        self._next_epoch, self._start_batch = epoch + 1, 0
        return self._run_epoch(epoch, self.plan.rank_batches(epoch, start))

    # --- for subclasses ---
    def _epoch_batches(self, epoch: int, batches):
        raise NotImplementedError

    def _note_skipped(self, path: str, reason: str) -> None:
        if path not in self._skipped:
            self._skipped[path] = reason
            log.warning("skipping undecodable image %s (%s)", path, reason)

    def _run_epoch(self, epoch, batches):
        yield from self._epoch_batches(epoch, batches)
        # For callers that iterate whole epochs (the trainer stops at its last step of an
        # epoch and reports skips itself, with the run's list).
        if self.skipped:
            log.warning("end of epoch %d: %d undecodable file(s) skipped so far: %s", epoch,
                        self.skipped, ", ".join(self.skipped_files[:5])
                        + (" ..." if self.skipped > 5 else ""))

    def __repr__(self):
        return (f"{type(self).__name__}(num_samples={self.num_samples}, "
                f"batch_size={self.batch_size}, batches={len(self)}, "
                f"rank={self.plan.rank}/{self.plan.world_size}, device={self.device})")
