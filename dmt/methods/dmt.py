"""DMT: a student distilled from the summed tokens of M frozen teachers."""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from dmt.errors import ConfigError
from dmt.losses import FUSIONS, DistillationLoss, fuse_teachers
from dmt.models import Student, TeacherEnsemble

VIEWS = ("teacher", "student")


class DMT:
    """Runs one dual-view batch through teachers and student and returns the losses.

    The teachers see the weakly augmented view ("teacher"), the student the strongly
    augmented one ("student"); both share crop and flip, so token n matches token n.
    `student` may be replaced by a DeepSpeed engine wrapping it (same forward).
    """

    def __init__(self, student: Student | Callable, teachers: TeacherEnsemble,
                 loss: DistillationLoss | None = None, fusion: str = "sum",
                 weights: Sequence[float] | None = None):
        _check_pairing(student, teachers, fusion, weights)
        self.student = student
        self.teachers = teachers
        # SFD drops the prefix tokens: the class token, and registers where the student has them.
        backbone = getattr(student, "backbone", None)
        self.loss = loss or DistillationLoss(
            num_prefix_tokens=getattr(backbone, "num_prefix_tokens", 1))
        self.fusion, self.weights = fusion, weights

    def compile(self) -> DMT:
        """The student's forward (and so its backward) and the loss as compiled graphs. A
        DeepSpeed engine compiles its module in place (engine.compile()), so parameter
        names, checkpoints and the export stay as they are. Teachers compile on their own
        (teacher_runtime.compile)."""
        self.student.compile()
        self.loss.compile()
        return self

    @torch.no_grad()
    def teacher_targets(self, images: torch.Tensor) -> torch.Tensor:
        """Fused teacher tokens [B, T, D] in fp32; no autograd graph, no activations kept."""
        return fuse_teachers(self.teachers(images), self.fusion, self.weights)

    def __call__(self, batch: Mapping[str, torch.Tensor],
                 targets: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Total loss and each term, plus the student's tokens ("student_tokens": the
        trainer's StepGuard checks them to call off a step whose activations went
        non-finite).
        `targets` lets dedicated teacher ranks supply the fused tokens."""
        needed = ("student",) if targets is not None else VIEWS
        if not isinstance(batch, Mapping) or any(k not in batch for k in needed):
            got = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
            raise ConfigError(f"DMT takes a batch mapping the views {list(needed)} to image "
                              f"tensors (dmt.data's loaders yield it), got {got}")
        if targets is None:
            targets = self.teacher_targets(batch["teacher"])
        student_tokens = self.student(batch["student"])
        return {**self.loss(student_tokens, targets), "student_tokens": student_tokens}


def _check_pairing(student, teachers, fusion: str, weights) -> None:
    """What would otherwise fail at the first batch, after the teachers' forward: token
    grids and widths that differ, a fusion that does not exist or misses its weights.
    (A DeepSpeed engine or a plain callable as the student is taken on trust.)"""
    if fusion not in FUSIONS:
        raise ConfigError(f"unknown fusion '{fusion}'; choose from {FUSIONS}")
    if teachers is None:
        return
    if fusion == "weighted" and (weights is None or len(weights) != len(teachers.names)):
        raise ConfigError(f"fusion 'weighted' needs one weight per teacher {teachers.names}, "
                          f"got {weights}")
    if not isinstance(student, Student):
        return
    if student.num_tokens != teachers.num_tokens:
        raise ConfigError(
            f"student {student.arch} gives {student.num_tokens} tokens at img_size "
            f"{student.img_size}, the teachers {teachers.num_tokens}: use the same patch size "
            "and img_size (token n of the student is matched with token n of the teachers)")
    if student.out_dim != teachers.embed_dim:
        raise ConfigError(f"student adapter outputs width {student.out_dim}, the teachers' "
                          f"tokens are {teachers.embed_dim} wide: build Student(arch, "
                          f"teacher_dim={teachers.embed_dim})")
