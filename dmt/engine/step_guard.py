"""Non-finite steps are called off on the device, so the training step never waits on
the host to decide.

Each micro-batch gets a verdict, a device scalar: 0 finite, 1 non-finite loss, 2
non-finite student tokens (the student itself has gone wrong: the trainer stops). At the
optimizer step the student ranks agree on the worst verdict (an all-reduce, MAX) and a
flag tells the fused AdamW kernel to skip the step: weights, both moment estimates and
the step count stay exactly as they were (lr 0 would still move the moments), and
DeepSpeed drops the gradients as after any step. The host reads the verdicts later, with
the logged losses, to count, warn and stop.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def nonfinite_verdict(out: dict) -> torch.Tensor:
    """0: the micro-batch is finite; 1: its loss is not; 2: the student's tokens are not."""
    loss_bad = (~torch.isfinite(out["loss"].detach())).float()
    tokens_bad = (~torch.isfinite(out["student_tokens"].detach())).any().float()
    return torch.maximum(loss_bad, 2.0 * tokens_bad)


class StepGuard:
    """Watches the micro-batches of each optimizer step; `decide()` before the step that
    applies them (DeepSpeed's boundary engine.step()) calls it off where any was bad."""

    def __init__(self, optimizer: torch.optim.Optimizer, device, group=None):
        if not optimizer.defaults.get("fused"):
            raise ValueError("StepGuard needs a fused torch optimizer (fused=True): only its "
                             "kernel reads the skip flag")
        # Fused AdamW reads `found_inf` in its kernel (the hook torch's GradScaler uses):
        # 1.0 skips the step. DeepSpeed calls this client optimizer once per parameter
        # group (ZeRO-1/2) or sub-group (ZeRO-3); every call reads the same flag.
        self.skip = torch.zeros((), dtype=torch.float32, device=device)  # the kernel's dtype
        optimizer.found_inf = self.skip
        self.group, self.device = group, device
        self.verdict = torch.zeros((), dtype=torch.float32, device=device)

    def observe(self, out: dict) -> None:
        self.verdict = torch.maximum(self.verdict, nonfinite_verdict(out))

    def decide(self) -> torch.Tensor:
        """The step's verdict, agreed by every rank of the group, still on the device; the
        flag is set from it and the guard starts afresh for the next step."""
        verdict, self.verdict = self.verdict, torch.zeros((), dtype=torch.float32,
                                                          device=self.device)
        if dist.is_initialized() and dist.get_world_size(self.group) > 1:
            dist.all_reduce(verdict, op=dist.ReduceOp.MAX, group=self.group)
        self.skip.copy_(verdict > 0)
        return verdict
