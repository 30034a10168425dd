"""A model-parallel unit ("mpu") that confines a DeepSpeed engine to the student ranks.

deepspeed.initialize(mpu=...) takes its data-parallel group, rank and world size from the
mpu (gradient all-reduce, ZeRO partitioning, parameter broadcast, the train_batch_size
check) instead of the world. DeepSpeed 0.19 also asks it for the model-parallel group
(grad-norm all-reduces, checkpoint names) through get_model_parallel_* /
get_tensor_model_parallel_* (deepspeed/utils/bwc.py, groups.py, runtime/engine.py):
we have no model parallelism, so that group is each student alone.

The object must NOT have `initialize_sequence_parallel` (DeepSpeed would then treat it as
its own sequence-parallel groups module and ignore the data-parallel group).
"""
from __future__ import annotations

import torch.distributed as dist


def group_timeout():
    """How long a collective of dmt's own groups waits for a stalled peer: the world group's
    timeout (DeepSpeed's DEEPSPEED_TIMEOUT, in minutes). A new group would otherwise take
    torch's default whatever the world group was given."""
    from deepspeed.constants import default_pg_timeout
    return default_pg_timeout


class StudentGroups:
    """Created on EVERY rank, in the same order (torch.distributed.new_group is collective)."""

    def __init__(self, student_ranks: list[int]):
        self.rank = dist.get_rank()
        self.student_ranks = list(student_ranks)
        # DeepSpeed's timeout (DEEPSPEED_TIMEOUT minutes), not torch's default for new groups
        self._dp_group = dist.new_group(self.student_ranks, timeout=group_timeout())
        # One single-rank group per student: model-parallel collectives become no-ops.
        singles = {r: dist.new_group([r], timeout=group_timeout()) for r in self.student_ranks}
        self._mp_group = singles.get(self.rank)

    # data parallelism: the student ranks only
    def get_data_parallel_group(self):
        return self._dp_group

    def get_data_parallel_rank(self) -> int:
        return self.student_ranks.index(self.rank)

    def get_data_parallel_world_size(self) -> int:
        return len(self.student_ranks)

    def get_data_parallel_group_ranks(self) -> list[int]:
        return list(self.student_ranks)

    # model parallelism: none (each student is its own group of one)
    def get_model_parallel_group(self):
        return self._mp_group

    def get_model_parallel_rank(self) -> int:
        return 0

    def get_model_parallel_world_size(self) -> int:
        return 1

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1

    def get_pipeline_model_parallel_rank(self) -> int:
        return 0


_WORLD_GROUPS: tuple | None = None  # (the process group they were made in, StudentGroups)


def world_student_groups() -> StudentGroups:
    """StudentGroups over every rank, made once per process group: new_group is collective
    and groups are never freed, so placements built in a loop (benchmarks, tests) share
    one set."""
    global _WORLD_GROUPS
    if _WORLD_GROUPS is None or _WORLD_GROUPS[0] is not dist.group.WORLD:
        _WORLD_GROUPS = (dist.group.WORLD, StudentGroups(range(dist.get_world_size())))
    return _WORLD_GROUPS[1]
