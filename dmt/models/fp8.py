"""FP8 teacher matmuls: the linear layers of frozen teachers multiplied in float8 (e4m3).

A ViT-B teacher's block linears (qkv, proj, fc1, fc2) are ~95% of its FLOPs at 224 px, and
Hopper/Ada tensor cores multiply e4m3 at twice the bf16 rate. The targets only have to be
accurate enough that the distillation loss does not move beyond noise; tests/test_fp8.py
and benchmarks/throughput.py measure how far they move.

Scaling (both sides per row, "rowwise"): each weight row (output channel) is quantised once
with its own scale; each activation row (token) is quantised on the fly with its own scale,
so one large token does not flush the small ones to zero. torch._scaled_mm multiplies the
e4m3 operands, applies both scales and the bias, and writes bf16.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dmt.errors import ConfigError

E4M3 = getattr(torch, "float8_e4m3fn", None)
E4M3_MAX = 448.0         # largest finite e4m3fn value
_TINY = 1e-12             # floor for an all-zero row's scale
_ALIGN = 16               # _scaled_mm on CUDA needs K and N multiples of 16


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [R, K] -> (e4m3 [R, K], fp32 scale [R, 1]) with x ~= q.float() * scale."""
    scale = x.abs().amax(dim=1, keepdim=True).float().clamp(min=_TINY) / E4M3_MAX
    # The clamp guards against rounding just past 448, which the cast would turn into NaN.
    q = (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return q, scale


class Float8Linear(nn.Module):
    """Inference-only drop-in for a frozen nn.Linear: e4m3 weights and inputs, bf16 out."""

    def __init__(self, linear: nn.Linear, fast_accum: bool = True):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.fast_accum = fast_accum
        weight, scale = quantize_rows(linear.weight.detach())
        # Buffers, not parameters: frozen, moved by .to(), out of state_dict.
        self.register_buffer("weight_fp8", weight, persistent=False)                 # [N, K]
        self.register_buffer("weight_scale", scale.t().contiguous(), persistent=False)  # [1, N]
        bias = None if linear.bias is None else linear.bias.detach().to(torch.bfloat16)
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        q, scale = quantize_rows(rows)
        # weight_fp8.t() is column-major, the layout _scaled_mm wants for its second operand.
        y = torch._scaled_mm(q, self.weight_fp8.t(), scale_a=scale, scale_b=self.weight_scale,
                             bias=self.bias, out_dtype=torch.bfloat16,
                             use_fast_accum=self.fast_accum)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, e4m3 rowwise"


def fp8_unsupported(device: torch.device) -> str | None:
    """Why FP8 matmuls cannot run on `device` (None when they can), found by trying one."""
    if E4M3 is None:
        return f"torch {torch.__version__} has no float8_e4m3fn"
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        name = torch.cuda.get_device_name(device)
        return f"{name} has no FP8 tensor cores (compute capability 8.9+ needed: Ada, Hopper)"
    try:
        probe = nn.Linear(_ALIGN, _ALIGN).to(device)
        Float8Linear(probe)(torch.ones(_ALIGN, _ALIGN, device=device, dtype=torch.bfloat16))
    except (RuntimeError, NotImplementedError) as err:
        return f"torch._scaled_mm with rowwise scales failed on {device}: {err}"
    return None


def convert_to_fp8(encoder: nn.Module, fast_accum: bool = True) -> int:
    """Swap the block linears of a frozen timm ViT for Float8Linear in place; returns how
    many were swapped. Patch embedding, attention (SDPA) and norms stay in the encoder's
    dtype: they are a few percent of the FLOPs and the most sensitive to rounding."""
    blocks = getattr(encoder, "blocks", None)
    if blocks is None:
        raise ConfigError(f"fp8 teachers need a ViT with .blocks, got {type(encoder).__name__}")
    swapped = 0
    for block in blocks:
        for parent in block.modules():
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear and child.in_features % _ALIGN == 0 \
                        and child.out_features % _ALIGN == 0:
                    setattr(parent, name, Float8Linear(child, fast_accum))
                    swapped += 1
    return swapped

