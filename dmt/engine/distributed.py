"""One distributed set-up for `deepspeed`, `torchrun` and plain `python` launches."""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


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


def launched_world_size() -> int:
    """The number of processes the launcher started (torchrun/deepspeed or MPI), else 1."""
    for var in ("WORLD_SIZE", *_MPI_SIZE_VARS):
        if var in os.environ:
            return int(os.environ[var])
    return 1


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
    cuda = torch.cuda.is_available()
    if not cuda:
        # DeepSpeed would compile its shared-memory comm op (~30 s) at first use on CPU.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
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


def teardown() -> None:
    """Ends the process group once every rank is done with it (the barrier: a rank that
    left early would cut a peer's last collective short). Left to the interpreter's exit,
    NCCL communicators are aborted with a warning on every rank."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


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
