"""DMT: a student distilled from the summed tokens of M frozen teachers."""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from dmt.losses import DistillationLoss, fuse_teachers
from dmt.models import Student, TeacherEnsemble


class DMT:
    """Runs one dual-view batch through teachers and student and returns the losses.

    The teachers see the weakly augmented view ("teacher"), the student the strongly
    augmented one ("student"); both share crop and flip, so token n matches token n.
    `student` may be replaced by a DeepSpeed engine wrapping it (same forward).
    """

    def __init__(self, student: Student | Callable, teachers: TeacherEnsemble,
                 loss: DistillationLoss | None = None, fusion: str = "sum",
                 weights: Sequence[float] | None = None):
        self.student = student
        self.teachers = teachers
        self.loss = loss or DistillationLoss()
        self.fusion, self.weights = fusion, weights

    @torch.no_grad()
    def teacher_targets(self, images: torch.Tensor) -> torch.Tensor:
        """Fused teacher tokens [B, T, D] in fp32; no autograd graph, no activations kept."""
        return fuse_teachers(self.teachers(images), self.fusion, self.weights)

    def __call__(self, batch: Mapping[str, torch.Tensor],
                 targets: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Total loss and each term, plus the student's tokens ("student_tokens": the
        engine builds a zero-gradient surrogate from them when the loss is not finite).
        `targets` lets dedicated teacher ranks supply the fused tokens."""
        if targets is None:
            targets = self.teacher_targets(batch["teacher"])
        student_tokens = self.student(batch["student"])
        return {**self.loss(student_tokens, targets), "student_tokens": student_tokens}
