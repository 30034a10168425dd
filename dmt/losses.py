"""DMT's distillation losses, all in one place (paper eqs. 1-3).

Student and teacher are token tensors [B, T, D] (T = prefix tokens + N patches). Every
loss is computed in fp32 whatever the input dtype: the softmax over 768 channels or 196
positions loses too much in bf16.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from dmt.choices import DIRECTIONS, DISTANCES, FUSIONS
from dmt.choices import LOSS_TERMS as TERMS


def fuse_teachers(tokens: Sequence[torch.Tensor], mode: str = "sum",
                  weights: Sequence[float] | None = None) -> torch.Tensor:
    """Teacher tokens at the same position combined into one target, in fp32.

    "sum" is the paper's fusion (no weights, no temperature); "mean" divides by M;
    "weighted" uses one weight per teacher.
    """
    if mode == "sum":
        weights = [1.0] * len(tokens)
    elif mode == "mean":
        weights = [1.0 / len(tokens)] * len(tokens)
    elif mode == "weighted":
        if weights is None or len(weights) != len(tokens):
            raise ValueError(f"fusion 'weighted' needs one weight per teacher "
                             f"({len(tokens)}), got {weights}")
    else:  # a name in dmt.choices.FUSIONS without its branch here is refused, not summed
        raise ValueError(f"unknown fusion '{mode}'; choose from {FUSIONS}")
    # A fresh fp32 buffer: also turns inference-mode teacher outputs into normal tensors.
    fused = torch.zeros(tokens[0].shape, dtype=torch.float32, device=tokens[0].device)
    for w, t in zip(weights, tokens):
        fused.add_(t, alpha=float(w))
    return fused


def _kl(logits_p: torch.Tensor, logits_q: torch.Tensor, dim: int) -> torch.Tensor:
    """KL(softmax(p) || softmax(q)) along `dim`, from logits, numerically safe."""
    log_p = F.log_softmax(logits_p.float(), dim=dim)
    log_q = F.log_softmax(logits_q.float(), dim=dim)
    return (log_p.exp() * (log_p - log_q)).sum(dim)


def target_error(reference: torch.Tensor, approx: torch.Tensor) -> dict[str, float]:
    """How far approximate fused targets (FP8 teachers, say) are from the reference ones:
    as the TFD term sees them, KL(reference || approx) of the per-token channel softmaxes
    in nats per token, and as numbers, the relative Frobenius error."""
    reference, approx = reference.float(), approx.float()
    return {"target_kl": _kl(reference, approx, dim=-1).mean().item(),
            "target_rel_error": ((approx - reference).norm() / reference.norm()).item()}


def _divergence(student: torch.Tensor, teacher: torch.Tensor, dim: int, direction: str,
                distance: str) -> torch.Tensor:
    """Per-distribution divergence along `dim` (the dimension the softmax runs over)."""
    if distance == "mse":
        return (student.float() - teacher.float()).pow(2).mean(dim)
    if distance != "kl":
        raise ValueError(f"unknown distance '{distance}'; choose from {DISTANCES}")
    if direction == "student_teacher":
        return _kl(student, teacher, dim)
    if direction == "teacher_student":
        return _kl(teacher, student, dim)
    raise ValueError(f"unknown direction '{direction}'; choose from {DIRECTIONS}")


def tfd_loss(student: torch.Tensor, teacher: torch.Tensor, direction: str = "student_teacher",
             distance: str = "kl") -> torch.Tensor:
    """Token fusion distillation, eq. (2): softmax over the D channels of every token,
    KL(p_student || p_teacher) summed over channels, averaged over the T tokens (class
    token included) and over the batch."""
    return _divergence(student, teacher, dim=-1, direction=direction, distance=distance).mean()


def sfd_loss(student: torch.Tensor, teacher: torch.Tensor, num_prefix_tokens: int = 1,
             direction: str = "student_teacher", distance: str = "kl") -> torch.Tensor:
    """Spatial fusion distillation, eq. (3): the N patch tokens as a D x H' x W' map; per
    channel, softmax over the N positions, KL summed over positions, averaged over the D
    channels and over the batch. Prefix (class/register) tokens are dropped."""
    s = student[:, num_prefix_tokens:]
    t = teacher[:, num_prefix_tokens:]
    return _divergence(s, t, dim=1, direction=direction, distance=distance).mean()


class DistillationLoss:
    """L = L_TFD + L_SFD (or one of them, for the ablations)."""

    def __init__(self, terms: Sequence[str] = TERMS, distance: str = "kl",
                 direction: str = "student_teacher", num_prefix_tokens: int = 1):
        unknown = [t for t in terms if t not in TERMS]
        if unknown or not terms:
            raise ValueError(f"loss terms must be a non-empty subset of {TERMS}, got {list(terms)}")
        if distance not in DISTANCES:
            raise ValueError(f"unknown distance '{distance}'; choose from {DISTANCES}")
        if direction not in DIRECTIONS:
            raise ValueError(f"unknown direction '{direction}'; choose from {DIRECTIONS}")
        self.terms, self.distance, self.direction = tuple(terms), distance, direction
        self.num_prefix_tokens = num_prefix_tokens
        self._compute = self._evaluate

    def compile(self) -> DistillationLoss:
        """Compute the terms as one compiled graph: TFD's and SFD's softmaxes and KLs fuse
        into a few kernels instead of an fp32 copy of the [B, T, D] tensors per operation."""
        self._compute = torch.compile(self._evaluate)
        return self

    def __call__(self, student: torch.Tensor, teacher: torch.Tensor) -> dict[str, torch.Tensor]:
        if student.shape != teacher.shape:
            raise ValueError(f"student tokens {tuple(student.shape)} and teacher tokens "
                             f"{tuple(teacher.shape)} differ in shape")
        return self._compute(student, teacher)

    def _evaluate(self, student: torch.Tensor, teacher: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        if "tfd" in self.terms:
            out["tfd"] = tfd_loss(student, teacher, self.direction, self.distance)
        if "sfd" in self.terms:
            out["sfd"] = sfd_loss(student, teacher, self.num_prefix_tokens, self.direction,
                                  self.distance)
        out["loss"] = sum(out.values())
        return out
