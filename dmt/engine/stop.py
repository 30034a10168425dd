"""Stop requests: SIGTERM (a scheduler's notice before it kills the job) or Ctrl-C end
the run at the end of the current log window with a checkpoint, instead of losing every
step since the last one. A second Ctrl-C stops at once."""
from __future__ import annotations

import signal
import sys
import threading

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def ignore_stop_signals(_worker_id: int | None = None) -> None:
    """For data-loader worker processes (worker_init_fn): a terminal's Ctrl-C reaches the
    whole process group, and the trainer, not each worker, decides when to stop (a forked
    worker would otherwise run the trainer's handler too)."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


class StopRequest:
    """Records the first stop signal; `agreed()` tells every rank whether any rank got one."""

    def __init__(self, announce: bool = True):
        self.signum = 0
        self.announce = announce
        self._previous = {}

    def install(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():  # where Python allows it
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum, _frame) -> None:
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt  # asked twice: stop now, without a checkpoint
        self.signum = self.signum or signum
        if self.announce:
            sys.stderr.write(f"\ndmt: {signal.Signals(signum).name} received: stopping at the "
                             "end of this log window with a checkpoint (Ctrl-C again to stop "
                             "at once, without one)\n")

    def agreed(self, group, device) -> int:
        """The signal any rank of the group received (0: none); a collective."""
        flag = torch.tensor(float(self.signum), device=device)
        if dist.is_initialized() and dist.get_world_size(group) > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        return int(flag.item())
