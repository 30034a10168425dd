"""Teachers on the same ranks as the student: every rank computes its own targets."""
from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist

from dmt.placement.groups import world_student_groups


class Colocated:
    """targets(batch) = method.teacher_targets(batch["teacher"]); the engine spans the world."""

    role = "student"
    kind = "colocated"

    def __init__(self, method):
        initialised = dist.is_available() and dist.is_initialized()
        self.method = method
        self.data_rank = dist.get_rank() if initialised else 0
        self.data_world_size = dist.get_world_size() if initialised else 1
        # Data parallelism over the whole world, on groups dmt makes: DeepSpeed's own clone
        # of the world group gets torch's default timeout (30 min on gloo), not
        # DEEPSPEED_TIMEOUT.
        self.mpu = world_student_groups() if initialised else None

    def targets(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.method.teacher_targets(batch["teacher"])

    def close(self) -> None:
        pass
