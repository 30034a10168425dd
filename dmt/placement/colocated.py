"""Teachers on the same ranks as the student: every rank computes its own targets."""
from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist


class Colocated:
    """targets(batch) = method.teacher_targets(batch["teacher"]); the engine spans the world."""

    role = "student"
    kind = "colocated"

    def __init__(self, method):
        initialised = dist.is_available() and dist.is_initialized()
        self.method = method
        self.data_rank = dist.get_rank() if initialised else 0
        self.data_world_size = dist.get_world_size() if initialised else 1
        self.mpu = None  # DeepSpeed's default: data parallelism over the whole world

    def targets(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.method.teacher_targets(batch["teacher"])

    def close(self) -> None:
        pass
