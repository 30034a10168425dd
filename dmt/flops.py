"""Analytic ViT arithmetic and device peaks: the two halves of model FLOP utilisation (MFU).

Conventions (those of PaLM/Megatron MFU): one multiply-add = 2 FLOPs; only matmuls and
convolutions are counted (LayerNorm, softmax, GELU and residual adds are <1% of a ViT);
a training step costs 3x the forward (backward = 2x forward); nothing is added for
activation recomputation, so MFU does not reward wasted work.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ViTShape:
    """What the arithmetic of a plain ViT depends on."""

    depth: int
    width: int
    mlp_ratio: float
    patch_size: int
    num_patches: int
    num_prefix_tokens: int = 1
    in_chans: int = 3

    @property
    def tokens(self) -> int:
        return self.num_patches + self.num_prefix_tokens


def vit_forward_flops(depth: int, width: int, mlp_ratio: float, tokens: int, patch_size: int,
                      num_prefix_tokens: int = 1, in_chans: int = 3,
                      adapter_dim: int | None = None) -> float:
    """Forward FLOPs of one image through a ViT encoder (plus an optional linear adapter).

    Per block, with T tokens and width D: qkv 6TD^2, attention scores and weighted sum
    2 x 2T^2D, output projection 2TD^2, MLP 4rTD^2. The patch embedding is a matmul of
    the N patches (in_chans*p*p values) with D filters.
    """
    t, d = tokens, width
    per_block = (8 + 4 * mlp_ratio) * t * d * d + 4 * t * t * d
    num_patches = tokens - num_prefix_tokens
    patch_embed = 2 * num_patches * in_chans * patch_size * patch_size * d
    adapter = 2 * t * d * adapter_dim if adapter_dim else 0
    return float(depth * per_block + patch_embed + adapter)


def shape_flops(shape: ViTShape, adapter_dim: int | None = None) -> float:
    return vit_forward_flops(shape.depth, shape.width, shape.mlp_ratio, shape.tokens,
                             shape.patch_size, shape.num_prefix_tokens, shape.in_chans,
                             adapter_dim)


def vit_shape_of(model: nn.Module) -> ViTShape:
    """The shape of a timm VisionTransformer (or anything wrapping one as .encoder/.backbone)."""
    for attr in ("encoder", "backbone"):
        if hasattr(model, attr) and not hasattr(model, "blocks"):
            model = getattr(model, attr)
    blocks = model.blocks
    patch = model.patch_embed
    return ViTShape(
        depth=len(blocks),
        width=model.embed_dim,
        mlp_ratio=blocks[0].mlp.fc1.out_features / model.embed_dim,
        patch_size=patch.patch_size[0],
        num_patches=patch.num_patches,
        num_prefix_tokens=model.num_prefix_tokens,
        in_chans=patch.proj.in_channels,
    )


def vit_shape(arch: str, img_size: int = 224) -> ViTShape:
    """Shape of a timm architecture by name, built on the meta device (no memory, no time)."""
    from dmt.models.vit import create_vit  # late: flops is used without the models

    with torch.device("meta"):
        model = create_vit(arch, img_size, check_tiling=False)
    return vit_shape_of(model)


def dmt_step_flops(student: ViTShape, teachers: list[ViTShape],
                   adapter_dim: int | None = None) -> dict[str, float]:
    """FLOPs per image of one DMT training step: student forward+backward, teacher forwards."""
    student_step = 3.0 * shape_flops(student, adapter_dim)
    teacher_fwd = sum(shape_flops(t) for t in teachers)
    return {"student": student_step, "teachers": teacher_fwd, "total": student_step + teacher_fwd}


# --------------------------------------------------------------------------------------
# Device peaks. Dense (no 2:4 sparsity) tensor-core figures from NVIDIA's data sheets, in
# FLOP/s. Ordered: the first substring found in the device name wins.
_TF = 1e12
PEAK_TABLE: list[tuple[str, dict[str, float]]] = [
    ("GH200", {"bf16": 989 * _TF, "fp16": 989 * _TF, "fp8": 1979 * _TF, "tf32": 494.5 * _TF,
               "fp32": 67 * _TF}),
    # The PCIe card, H100 NVL's clocks and power.
    ("H200 NVL", {"bf16": 835 * _TF, "fp16": 835 * _TF, "fp8": 1671 * _TF, "tf32": 417.5 * _TF,
                  "fp32": 60 * _TF}),
    # H200 (SXM) has H100 SXM's tensor cores (more, faster memory).
    ("H200", {"bf16": 989 * _TF, "fp16": 989 * _TF, "fp8": 1979 * _TF, "tf32": 494.5 * _TF,
              "fp32": 67 * _TF}),
    ("H100 NVL", {"bf16": 835 * _TF, "fp16": 835 * _TF, "fp8": 1671 * _TF, "tf32": 417.5 * _TF,
                  "fp32": 60 * _TF}),
    ("H100 PCIe", {"bf16": 756 * _TF, "fp16": 756 * _TF, "fp8": 1513 * _TF, "tf32": 378 * _TF,
                   "fp32": 51 * _TF}),
    # "NVIDIA H100 80GB HBM3" is the SXM part.
    ("H100", {"bf16": 989 * _TF, "fp16": 989 * _TF, "fp8": 1979 * _TF, "tf32": 494.5 * _TF,
              "fp32": 67 * _TF}),
    ("A100", {"bf16": 312 * _TF, "fp16": 312 * _TF, "tf32": 156 * _TF, "fp32": 19.5 * _TF}),
    ("L40S", {"bf16": 362 * _TF, "fp16": 362 * _TF, "fp8": 733 * _TF, "fp32": 91.6 * _TF}),
    ("A10", {"bf16": 125 * _TF, "fp16": 125 * _TF, "fp32": 31.2 * _TF}),
    ("L4", {"bf16": 121 * _TF, "fp16": 121 * _TF, "fp8": 242.5 * _TF, "fp32": 30.3 * _TF}),
]

_DTYPE_KEYS = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


@dataclass(frozen=True)
class PeakFlops:
    flops: float | None  # FLOP/s; None when unknown
    source: str          # where the figure comes from, reported next to every MFU


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return cpu_model_name()
    return device.type


def cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown CPU"


def stated_peak(gpu_name: str, key: str) -> PeakFlops:
    """The PEAK_TABLE figure for a GPU name as torch reports it ("NVIDIA H100 80GB HBM3")
    and a precision key (bf16, fp16, fp8, tf32, fp32); flops None when not listed."""
    for pattern, peaks in PEAK_TABLE:
        if pattern in gpu_name:
            if key not in peaks:
                break
            return PeakFlops(peaks[key], f"data sheet: {pattern} dense {key} "
                                         f"{peaks[key] / _TF:g} TFLOP/s")
    return PeakFlops(None, f"unknown for {gpu_name} ({key})")


def device_peak_flops(device: torch.device | str, dtype: torch.dtype,
                      measure_if_unknown: bool = False) -> PeakFlops:
    """The device's dense peak for `dtype` from PEAK_TABLE, or None ("unknown").

    CPUs (and GPUs not in the table) have no stated peak here; with measure_if_unknown the
    best rate of a large matmul is measured instead and labelled as measured: an
    *achievable* peak, so MFU against it reads higher than against a data-sheet peak.
    """
    device = torch.device(device)
    key = _DTYPE_KEYS.get(dtype, str(dtype))
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
            key = "tf32"
        stated = stated_peak(name, key)
        if stated.flops is not None:
            return stated
    if not measure_if_unknown:
        return PeakFlops(None, f"unknown for {device_name(device)} ({key})")
    rate, size = measure_matmul_flops(device, dtype)
    return PeakFlops(rate, f"measured: best {size}x{size} {key} matmul on "
                           f"{device_name(device)} ({torch.get_num_threads()} threads)"
                     if device.type == "cpu" else
                     f"measured: best {size}x{size} {key} matmul on {device_name(device)}")


def measure_matmul_flops(device: torch.device | str, dtype: torch.dtype, size: int | None = None,
                         repeats: int = 5, min_seconds: float = 0.2) -> tuple[float, int]:
    """Best FLOP/s of a square matmul (best of `repeats` timed bursts) and the size used."""
    device = torch.device(device)
    size = size or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    flops_per = 2.0 * size ** 3

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    a @ b  # warm-up: library initialisation, kernel selection
    sync()
    best = 0.0
    for _ in range(repeats):
        n, start = 0, time.perf_counter()
        while True:
            a @ b
            n += 1
            sync()
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds:
                break
        best = max(best, n * flops_per / elapsed)
    return best, size
