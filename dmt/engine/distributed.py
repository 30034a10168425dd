"""One distributed set-up for `deepspeed`, `torchrun` and plain `python` launches."""
from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dmt.errors import ConfigError, DMTError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """A TCP port free on this host now (for a one-host process group)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_MPI_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")
# What torchrun and the deepspeed launcher export to every process they start.
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _under_mpi() -> bool:
    return any(v in os.environ for v in _MPI_SIZE_VARS)


def launched_world_size() -> int:
    """The number of processes the launcher started (torchrun/deepspeed or MPI), else 1."""
    for var in ("WORLD_SIZE", *_MPI_SIZE_VARS):
        if var in os.environ:
            return int(os.environ[var])
    return 1


JOIN_NOTICE_S = 30.0  # a rendezvous still waiting after this long says so


@contextmanager
def notice_if_slow(seconds: float, message: str) -> Iterator[None]:
    """Prints `message` to stderr if the block still runs after `seconds`: a rank waiting
    for peers that never come would otherwise stay silent until the timeout."""
    timer = threading.Timer(seconds, lambda: print(message, file=sys.stderr, flush=True))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def setup_distributed() -> DistInfo:
    """Initialises torch.distributed through DeepSpeed (NCCL on GPUs, gloo on CPU).

    The `deepspeed` and `torchrun` launchers export RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*;
    a plain `python` launch gets a one-process group here, so the same code path runs.
    """
    import deepspeed

    if "RANK" not in os.environ and launched_world_size() == 1:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    # (Under mpirun, DeepSpeed discovers ranks through mpi4py and sets these variables.)
    missing = [v for v in _LAUNCH_VARS if v not in os.environ]
    if missing and len(missing) < len(_LAUNCH_VARS) and not _under_mpi():
        # DeepSpeed would take this for an MPI launch and fail on a missing mpi4py.
        given = [v for v in _LAUNCH_VARS if v not in missing]
        raise ConfigError(f"{', '.join(missing)} not set, while {', '.join(given)} are: "
                          f"set all of {', '.join(_LAUNCH_VARS)} (torchrun and the "
                          "deepspeed launcher do), or none for a one-process run")
    cuda = torch.cuda.is_available()
    if not cuda:
        # DeepSpeed would compile its shared-memory comm op (~30 s) at first use on CPU.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not dist.is_initialized():
        from deepspeed.constants import default_pg_timeout
        waiting = (f"dmt: [rank {os.environ.get('RANK', '?')}] still waiting for the "
                   f"{launched_world_size()} ranks to meet at {os.environ.get('MASTER_ADDR')}:"
                   f"{os.environ.get('MASTER_PORT')}: has every node's launcher started? (gives "
                   f"up after DEEPSPEED_TIMEOUT, {default_pg_timeout.total_seconds() / 60:g} min)")
        try:
            with notice_if_slow(JOIN_NOTICE_S, waiting):
                deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
        except (RuntimeError, OSError) as err:  # DistNetworkError is a RuntimeError
            if "clients joined" in str(err):  # rank 0's store gave up on its peers
                raise DMTError(
                    f"rank 0 gave up waiting for its peers at {os.environ.get('MASTER_ADDR')}:"
                    f"{os.environ.get('MASTER_PORT')} ({err}): has every node's launcher "
                    "started, with the same MASTER_ADDR and MASTER_PORT? (DEEPSPEED_TIMEOUT "
                    "sets how long rank 0 waits)") from None
            if "EADDRINUSE" not in str(err) and "address already in use" not in str(err):
                raise
            raise ConfigError(
                f"MASTER_PORT {os.environ['MASTER_PORT']} on {os.environ['MASTER_ADDR']} is "
                "in use (another job on this node?): pick a free port, `deepspeed "
                "--master_port N ...` or `torchrun --master_port N ...` (with c10d: "
                "--rdzv_endpoint HOST:N)") from None
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def barrier(group=None) -> None:
    if dist.is_initialized():
        dist.barrier(group=group)


def ranks_agreeing(this_rank: bool, device, group=None) -> int:
    """How many ranks of the group say yes (a collective: every rank of the group calls it)."""
    count = torch.tensor([float(this_rank)], device=device)
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(count, op=dist.ReduceOp.SUM, group=group)
    return int(count.item())


def any_rank(failed: bool, device, group=None) -> bool:
    """Whether any rank of the group failed: every rank leaves together, with a message,
    instead of the others waiting in the next collective until a timeout."""
    return ranks_agreeing(failed, device, group) > 0


@contextmanager
def fail_together(device) -> Iterator[None]:
    """Runs a block that one rank may fail alone (a data folder or a checkpoint missing on
    its node) and that holds no collective: if any rank fails, every rank stops, and rank 0
    says what failed where. Otherwise the others would wait at their next collective until
    the timeout (NCCL) or die of a lost peer (gloo). A failing rank also says its own error,
    unless every rank failed alike. Costs one scalar all-reduce, which is also a barrier."""
    failure = None
    try:
        yield
    except Exception as err:  # noqa: BLE001  (crashes too: re-raised below)
        failure = err
    if not dist.is_initialized() or dist.get_world_size() == 1:
        if failure is not None:
            raise failure
        return
    if not any_rank(failure is not None, device):
        return
    said = [None] * dist.get_world_size()  # (words, crashed) of each rank that failed
    dist.all_gather_object(said, None if failure is None else
                           (_in_words(failure), not isinstance(failure, DMTError)))
    ranks_by_words: dict[str, list[int]] = {}
    for rank, failed in enumerate(said):
        if failed is not None:
            ranks_by_words.setdefault(failed[0], []).append(rank)
    everywhere = len(ranks_by_words) == 1 and None not in said
    # A crashed rank leaves with its traceback; the others must not wait for it at a barrier.
    stops_alike = not any(failed and failed[1] for failed in said)
    if isinstance(failure, DMTError):
        failure.every_rank_stops = stops_alike
    if failure is not None and (not isinstance(failure, DMTError)
                                or (dist.get_rank() != 0 and not everywhere)):
        raise failure  # for this node's log (a crash: with its traceback); rank 0 sums up
    text = "; ".join(f"{words} ({_where(ranks, len(said))})"
                     for words, ranks in list(ranks_by_words.items())[:4])
    text += " ..." if len(ranks_by_words) > 4 else ""
    err = (type(failure) if failure is not None else DMTError)(text)
    err.same_on_every_rank = True  # every rank gathered the same words
    err.every_rank_stops = stops_alike
    raise err from None


def _in_words(err: Exception) -> str:
    return str(err) if isinstance(err, DMTError) else f"{type(err).__name__}: {err}"


def _where(ranks: list[int], world_size: int) -> str:
    if len(ranks) == world_size:
        return f"on all {world_size} ranks"
    return f"on rank {ranks[0]}" if len(ranks) == 1 else f"on ranks {_short_list(ranks)}"


def teardown() -> None:
    """Ends the process group once every rank is done with it (the barrier: a rank that
    left early would cut a peer's last collective short). Left to the interpreter's exit,
    NCCL communicators are aborted with a warning on every rank."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def leave_on_error(err: DMTError) -> None:
    """Ends the process group of a rank stopping on `err`. Left to the interpreter's exit,
    the store's and gloo's threads were sometimes torn down mid-flight ("terminate called
    without an active exception": an abort, -6, instead of the error's own exit code).
    Where every rank stops at the same point they leave together, as at a normal end;
    otherwise without `teardown`'s barrier, which a peer still working would never reach."""
    try:
        if err.every_rank_stops:
            teardown()
        elif dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - a peer already gone: the error is said regardless
        pass


def skip_lone_allreduce(engine, group=None) -> bool:
    """A DeepSpeed engine without ZeRO on a single data-parallel rank still copies every
    gradient into a bucket and back around an all-reduce over that one rank: three passes
    over the gradients for nothing. Turn it off there; ZeRO stages keep it, as their
    reduction is also what moves the gradients to the optimizer's partitions."""
    lone = dist.get_world_size(group) == 1 if dist.is_initialized() else True
    if lone and engine.zero_optimization_stage() == 0:
        engine.enable_backward_allreduce = False
        return True
    return False


def check_same_on_every_rank(facts: dict, device, remedy: str) -> None:
    """Refuse a launch whose ranks disagree on `facts` (their merged config, the size of the
    data set they read): one rank with another learning rate, run directory or copy of the
    data would otherwise train silently wrong, or hang at a mismatched collective. Costs one
    all-gather of a digest; only on a mismatch are the facts gathered, to name them."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    text = json.dumps(facts, sort_keys=True, default=str)
    digest = torch.tensor([int.from_bytes(hashlib.sha256(text.encode()).digest()[:7], "big")],
                          dtype=torch.int64, device=device)
    digests = [torch.empty_like(digest) for _ in range(dist.get_world_size())]
    dist.all_gather(digests, digest)
    if len({int(d.item()) for d in digests}) == 1:
        return
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, facts)
    differences = []
    for key in sorted({k for f in every for k in f}):
        ranks_by_value: dict[str, list[int]] = {}  # JSON text: 1 and 1.0 differ, as above
        for r, f in enumerate(every):
            ranks_by_value.setdefault(json.dumps(f.get(key, "(absent)"), default=str),
                                      []).append(r)
        if len(ranks_by_value) > 1:
            differences.append(f"{key}: " + ", ".join(
                f"{value} on rank(s) {_short_list(ranks)}"
                for value, ranks in ranks_by_value.items()))
    err = ConfigError("the ranks of this launch disagree: " + "; ".join(differences[:6])
                      + f"{' ...' if len(differences) > 6 else ''}. {remedy}")
    err.same_on_every_rank = err.every_rank_stops = True  # every rank gathered the same facts
    raise err


def _short_list(ranks: list[int]) -> str:
    return str(ranks) if len(ranks) <= 8 else str(ranks[:8])[:-1] + ", ...]"
