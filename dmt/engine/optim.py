"""AdamW parameter groups and the per-step learning-rate schedule of the paper's recipe."""
from __future__ import annotations

import math

import torch
from torch import nn

# Parameters that are not weights in the decay sense (MAE / timm convention).
_NO_DECAY_NAMES = ("pos_embed", "cls_token", "reg_token", "dist_token")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weight matrices only; not on norms, biases, pos_embed, cls_token."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name.split(".")[-1] in _NO_DECAY_NAMES:
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def peak_lr(optim_cfg: dict) -> float:
    """An absolute lr if given, else base_lr x global_batch / 256 (MAE's scaling rule)."""
    if optim_cfg["lr"] is not None:
        return float(optim_cfg["lr"])
    return optim_cfg["base_lr"] * optim_cfg["global_batch"] / 256


def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float, minimum: float) -> float:
    """Linear warm-up over warmup_steps, then half-cosine from peak to minimum."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(1.0, progress)
    return minimum + (peak - minimum) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, optim_cfg: dict) -> torch.optim.AdamW:
    # torch's fused AdamW, on CUDA and on CPU (no DeepSpeed op to compile); fused also
    # because only the fused kernel can call a step off on the device (StepGuard).
    return torch.optim.AdamW(param_groups(model, optim_cfg["weight_decay"]),
                             lr=peak_lr(optim_cfg), betas=tuple(optim_cfg["betas"]), fused=True)


def set_hyperparameters(optimizer: torch.optim.Optimizer, optim_cfg: dict) -> None:
    """The config's weight decay and betas on the groups param_groups() made (decay first),
    over what a loaded checkpoint restored: a resumed run follows its config."""
    for group, weight_decay in zip(optimizer.param_groups, (optim_cfg["weight_decay"], 0.0)):
        group["weight_decay"] = weight_decay
        group["betas"] = tuple(optim_cfg["betas"])
