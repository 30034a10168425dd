"""Where the teachers run: on the student ranks ("colocated") or on their own ("dedicated").

Usage in a trainer, on every rank after torch.distributed / deepspeed.init_distributed:

    placement = build_placement("dedicated", teacher_ranks, method, micro_batch=B)
    if placement.role == "teacher":
        loaders = {s: build_loader(..., rank=r, world_size=w)
                   for s, (r, w) in zip(placement.students, placement.data_shards)}
        placement.serve(loaders, micro_batches=n)
    else:
        engine, *_ = deepspeed.initialize(model=student, optimizer=opt, config=ds,
                                          mpu=placement.mpu)
        loader = build_loader(..., rank=placement.data_rank,
                              world_size=placement.data_world_size)
        for batch in loader:
            out = method(batch, targets=placement.targets(batch))
            ...
        placement.close()
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from dmt.choices import PLACEMENTS
from dmt.errors import ConfigError
from dmt.placement.colocated import Colocated
from dmt.placement.dedicated import (DedicatedStudent, DedicatedTeacher, TargetsMismatchError,
                                     comm_device)
from dmt.placement.groups import StudentGroups, group_timeout
from dmt.placement.layout import RankLayout


__all__ = ["PLACEMENTS", "Colocated", "DedicatedStudent", "DedicatedTeacher", "RankLayout",
           "StudentGroups", "TargetsMismatchError", "build_placement", "comm_device"]


def build_placement(kind: str, teacher_ranks: int = 0, method=None, *,
                    micro_batch: int | None = None, device: torch.device | str | None = None,
                    transfer_dtype: torch.dtype = torch.bfloat16, prefetch: int = 2):
    """This rank's side of the placement; call it on every rank, in the same order.

    kind: "colocated" (teacher_ranks must be 0) or "dedicated" (the last `teacher_ranks`
    global ranks run teachers; needs torch.distributed initialised and, on teacher ranks,
    `method` with teachers and `micro_batch`). device: where targets are returned (student)
    or teachers run (teacher); defaults to the backend's device (cuda for NCCL, cpu for
    gloo). transfer_dtype: precision of the streamed targets. prefetch: batches a teacher
    may run ahead of its students.
    """
    if kind == "colocated":
        if teacher_ranks:
            raise ConfigError("placement 'colocated' runs teachers on every rank: "
                              f"teacher_ranks must be 0, got {teacher_ranks}")
        if method is None:
            raise ConfigError("placement 'colocated' needs the method (with its teachers)")
        return Colocated(method)
    if kind != "dedicated":
        raise ConfigError(f"unknown placement '{kind}'; choose from {list(PLACEMENTS)}")
    if not (dist.is_available() and dist.is_initialized()):
        raise ConfigError("placement 'dedicated' needs torch.distributed to be initialised")
    layout = RankLayout(dist.get_world_size(), int(teacher_ranks))
    groups = StudentGroups(layout.student_ranks)  # collective: every rank builds it
    # the targets' own communicator
    stream = dist.new_group(list(range(layout.world_size)), timeout=group_timeout())
    if layout.is_teacher(dist.get_rank()):
        if method is None or getattr(method, "teachers", None) is None or not micro_batch:
            raise ConfigError("a teacher rank needs the method with its teachers and micro_batch")
        return DedicatedTeacher(layout, groups, method, micro_batch, device, transfer_dtype,
                                prefetch, stream_group=stream)
    return DedicatedStudent(layout, groups, device, micro_batch, stream_group=stream)
