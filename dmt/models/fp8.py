"""FP8 teacher matmuls: the linear layers of frozen teachers multiplied in float8 (e4m3).

A ViT-B teacher's block linears (qkv, proj, fc1, fc2) are ~95% of its FLOPs at 224 px, and
Hopper/Ada tensor cores multiply e4m3 at twice the bf16 rate. The targets only have to be
accurate enough that the distillation loss does not move beyond noise; tests/test_fp8.py
and benchmarks/throughput.py measure how far they move.

Scaling (both sides per row, "rowwise"): each weight row (output channel) is quantised once
with its own scale; each activation row (token) is quantised on the fly with its own scale,
so one large token does not flush the small ones to zero. torch._scaled_mm multiplies the
e4m3 operands, applies both scales and the bias, and writes bf16.

Cost: quantising an activation reads it once more and writes it in e4m3. Eager PyTorch
does that in separate kernels, which can eat what the faster matmul saves; under
torch.compile (teacher_runtime.compile) Inductor fuses it into the LayerNorm / GELU that
produces the activation. benchmarks/throughput.py measures both.
"""
from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

from dmt.errors import ConfigError
from dmt.models.vit import plain_blocks_error

E4M3 = getattr(torch, "float8_e4m3fn", None)
E4M3_MAX = 448.0         # largest finite e4m3fn value
_TINY = 1e-12             # floor for an all-zero row's scale
_ALIGN = 16               # _scaled_mm on CUDA needs K and N multiples of 16


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [R, K] -> (e4m3 [R, K], fp32 scale [R, 1]) with x ~= q.float() * scale."""
    with torch.profiler.record_function("fp8_quantize"):  # its own line in --profile
        # One reduction without an |x| temporary, then in place on the one fp32 copy.
        amax = torch.linalg.vector_norm(x, float("inf"), dim=1, keepdim=True,
                                        dtype=torch.float32)
        scale = amax.clamp_(min=_TINY).div_(E4M3_MAX)
        # copy=True: an fp32 input must not be scaled in place. The clamp guards against
        # rounding just past 448, which the cast turns into NaN.
        q = x.to(torch.float32, copy=True).div_(scale).clamp_(-E4M3_MAX, E4M3_MAX).to(E4M3)
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

    def _apply(self, fn, recurse=True):
        # Device moves only: a module-wide .to(bf16) / .half() must not turn the e4m3
        # weights and fp32 scales into something _scaled_mm refuses.
        # (A cast round trip would round the fp32 scales: take the device from fn alone.)
        device = fn(torch.empty(0, device=self.weight_fp8.device)).device
        for name in ("weight_fp8", "weight_scale", "bias"):
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, tensor.to(device))
        return self

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, e4m3 rowwise"


def fp8_unsupported(device: torch.device) -> str | None:
    """Why FP8 matmuls cannot run on `device` (None when they can), found by trying them.

    On a GPU the try runs in a child process: a faulty kernel can end in an illegal memory
    access (pytorch#133334: rowwise fast accumulation with rows % 256 != 0, as 197-token
    ViTs have), which poisons the CUDA context for good. In the child that is one clear
    reason to turn fp8 off; in this process it would end the run."""
    device = torch.device(device)
    if E4M3 is None:
        return f"torch {torch.__version__} has no float8_e4m3fn"
    if device.type == "cuda":
        if torch.cuda.get_device_capability(device) < (8, 9):
            name = torch.cuda.get_device_name(device)
            return f"{name} has no FP8 tensor cores (compute capability 8.9+ needed: Ada, Hopper)"
        return probe_in_child(str(device))
    try:  # off the global random stream: the student is initialised from it next
        with torch.random.fork_rng(devices=[]):
            probe_fp8(device)
    except Exception as err:  # noqa: BLE001 - torch's value checks raise ValueError too
        return f"torch._scaled_mm with rowwise scales failed on {device}: {err}"
    return None


def probe_fp8(device: torch.device) -> None:
    """Float8Linear at a ViT-B teacher's shapes: 197 and 8 x 197 token rows, width 768."""
    layer = nn.Linear(768, 768).to(device)
    fp8 = Float8Linear(layer)
    for rows in (197, 8 * 197):
        fp8(torch.randn(rows, 768, device=device, dtype=torch.bfloat16))
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # a kernel fault shows here, not at some later call


# The child prints the error's first line: torch's CUDA errors go on with advice lines.
_CHILD = """import sys, torch, dmt.models.fp8 as f
try:
    f.probe_fp8(torch.device({device!r}))
except Exception as err:
    print(f"{{type(err).__name__}}: {{str(err).strip().splitlines()[0]}}")
    sys.exit(1)
"""


@functools.cache
def probe_in_child(device: str) -> str | None:
    """probe_fp8 in a fresh interpreter: None when it passed, else the reason it did not."""
    root = str(Path(__file__).resolve().parents[2])  # the child imports this dmt
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (root, os.environ.get("PYTHONPATH")) if p))
    failed = f"torch._scaled_mm with rowwise scales failed on {device} (probe process)"
    try:
        done = subprocess.run([sys.executable, "-c", _CHILD.format(device=device)], env=env,
                              capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"{failed}: {err}"
    if done.returncode == 0:
        return None
    # A crash (a fault that kills the process) prints nothing of its own on stdout.
    reason = done.stdout.strip() or f"exit status {done.returncode}: {done.stderr.strip()[-300:]}"
    return f"{failed}: {reason}"


def fp8_blocker(encoder: nn.Module) -> str | None:
    """Why `encoder`'s linears cannot be swapped (None when they can): only plain timm ViT
    blocks (other attention classes read `qkv.weight` directly)."""
    return plain_blocks_error(encoder)


def convert_to_fp8(encoder: nn.Module, fast_accum: bool = True) -> int:
    """Swap the block linears (qkv, proj, fc1, fc2) of a frozen timm ViT for Float8Linear
    in place; returns how many were swapped. Patch embedding, attention (SDPA) and norms
    stay in the encoder's dtype: a few percent of the FLOPs, the most rounding-sensitive."""
    reason = fp8_blocker(encoder)
    if reason:
        raise ConfigError(f"fp8 teacher matmuls: {reason}")
    swapped = 0
    for block in encoder.blocks:
        for parent, names in ((block.attn, ("qkv", "proj")), (block.mlp, ("fc1", "fc2"))):
            for name in names:
                child = getattr(parent, name)
                if type(child) is nn.Linear and child.in_features % _ALIGN == 0 \
                        and child.out_features % _ALIGN == 0:
                    setattr(parent, name, Float8Linear(child, fast_accum))
                    swapped += 1
    return swapped

