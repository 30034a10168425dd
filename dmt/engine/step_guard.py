"""Non-finite steps are called off on the device, so the training step never waits on
the host to decide.

Each micro-batch gets a verdict, a device scalar (the worst wins): non-finite student
tokens (the student itself has gone wrong: the trainer stops), non-finite loss, or, at
the step boundary, non-finite gradients where DeepSpeed applies them unchecked. At the
optimizer step the student ranks agree on the worst verdict (an all-reduce, MAX) and a
flag tells the fused AdamW kernel to skip the step: weights, both moment estimates and
the step count stay exactly as they were (lr 0 would still move the moments), and
DeepSpeed drops the gradients as after any step. The host reads the verdicts later, with
the logged losses, to count, warn and stop.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

FINITE, NONFINITE_GRADIENTS, NONFINITE_LOSS, NONFINITE_TOKENS = 0, 1, 2, 3


def nonfinite_verdict(out: dict) -> torch.Tensor:
    """FINITE, NONFINITE_LOSS or NONFINITE_TOKENS for one micro-batch's output."""
    loss_bad = (~torch.isfinite(out["loss"].detach())).float()
    tokens_bad = (~torch.isfinite(out["student_tokens"].detach())).any().float()
    return torch.maximum(NONFINITE_LOSS * loss_bad, NONFINITE_TOKENS * tokens_bad)


def gradients_unchecked_by(engine) -> list[torch.nn.Parameter] | None:
    """The parameters whose gradients DeepSpeed would apply without looking at them: with
    no ZeRO and no bf16/fp16 its engine hands them straight to the client optimizer. ZeRO
    and DeepSpeed's bf16/fp16 optimizers check the gradient norm themselves (None)."""
    if engine.zero_optimization_stage() == 0 and not (engine.bfloat16_enabled()
                                                      or engine.fp16_enabled()):
        return [p for p in engine.module.parameters() if p.requires_grad]
    return None


class StepGuard:
    """Watches the micro-batches of each optimizer step; `decide()` before the step that
    applies them (DeepSpeed's boundary engine.step()) calls it off where any was bad.
    With `check_gradients`, decide() also calls it off when their gradients are not
    finite, so call it after the step's last backward."""

    def __init__(self, optimizer: torch.optim.Optimizer, device, group=None,
                 check_gradients: list[torch.nn.Parameter] | None = None):
        if not optimizer.defaults.get("fused"):
            raise ValueError("StepGuard needs a fused torch optimizer (fused=True): only its "
                             "kernel reads the skip flag")
        # Fused AdamW reads `found_inf` in its kernel (the hook torch's GradScaler uses):
        # 1.0 skips the step. DeepSpeed calls this client optimizer once per parameter
        # group (ZeRO-1/2) or sub-group (ZeRO-3); every call reads the same flag.
        self.skip = torch.zeros((), dtype=torch.float32, device=device)  # the kernel's dtype
        optimizer.found_inf = self.skip
        self.group, self.device = group, device
        self.check_gradients = check_gradients
        self.verdict = torch.zeros((), dtype=torch.float32, device=device)
        self.grad_norm: torch.Tensor | None = None  # of check_gradients, at the last decide()

    @classmethod
    def for_engine(cls, engine, optimizer: torch.optim.Optimizer, device, group=None):
        """The guard for a DeepSpeed engine built on `optimizer`: it checks the gradients
        where the engine does not."""
        return cls(optimizer, device, group, check_gradients=gradients_unchecked_by(engine))

    def observe(self, out: dict) -> None:
        self.verdict = torch.maximum(self.verdict, nonfinite_verdict(out))

    def decide(self) -> torch.Tensor:
        """The step's verdict, agreed by every rank of the group, still on the device; the
        flag is set from it and the guard starts afresh for the next step."""
        verdict, self.verdict = self.verdict, torch.zeros((), dtype=torch.float32,
                                                          device=self.device)
        self.grad_norm = None
        grads = [p.grad for p in self.check_gradients or () if p.grad is not None]
        if grads:
            # One vectorised pass over the gradients: a sum passes any inf or NaN on
            # (inf - inf is NaN) and, unlike an L2 norm's squares, overflows only near 1e38.
            total = torch.stack([g.sum(dtype=torch.float32) for g in grads]).sum()
            verdict = torch.maximum(verdict, NONFINITE_GRADIENTS * (~torch.isfinite(total)).float())
            # DeepSpeed does not measure these gradients either: their L2 norm, for the log.
            self.grad_norm = torch.nn.utils.get_total_norm(grads)
        if dist.is_initialized() and dist.get_world_size(self.group) > 1:
            dist.all_reduce(verdict, op=dist.ReduceOp.MAX, group=self.group)
        self.skip.copy_(verdict > 0)
        return verdict
