"""The throughput benchmark's matrix: presets, the settings of one run (Config), cells
(STUDENT:TEACHERS) and how one measured cell becomes a result row (FLOPs, MFU)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dmt.flops import PeakFlops, dmt_step_flops, vit_shape

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SHORT = {"vit_tiny_patch16_224": "ViT-T", "vit_small_patch16_224": "ViT-S",
         "vit_base_patch16_224": "ViT-B", "vit_large_patch16_224": "ViT-L"}
ALIASES = {"T": "vit_tiny_patch16_224", "S": "vit_small_patch16_224",
           "B": "vit_base_patch16_224", "L": "vit_large_patch16_224"}

PRESETS = {
    # 2 shared CPU cores. fp32 everywhere: this class of CPU (AVX2, no AVX-512 BF16/AMX)
    # multiplies bf16/fp16 matrices ~50x slower than fp32 (see "matmul_rates" in the JSON).
    # One thread: two OpenMP threads competing with other processes for 2 cores made
    # timings swing 5-10x. ZeRO stage 0: at world size 1 on CPU, stages 1-2 only add gloo
    # calls and partition copies (measured 2.3x the step time of stage 0 for ViT-T).
    # ViT-S teachers for ViT-T/S students keep the cost ratio of the paper's setting (ViT-B
    # teacher : ViT-S student forward ~3.8x) at a fraction of the time.
    "cpu": dict(students=["T", "S"], teacher_arch="S", teacher_counts=[0, 1, 2, 3],
                img_size=64, micro_batch="16", steps=4, warmup=2, precision="fp32",
                reference_precision="fp32", zero_stage=0, data=["synthetic"],
                data_probe=["synthetic-loader", "jpeg"], probe_cell="T:3",
                teacher_variants=[3], variant_compile=True, variant_steps=3,
                dedicated="1:1", dedicated_cell="T:3", profile="T:3", threads=1),
    "gpu": dict(students=["T", "S", "B"], teacher_arch="B", teacher_counts=[0, 1, 2, 3],
                img_size=224, micro_batch="auto", steps=20, warmup=5, precision="bf16",
                reference_precision="fp16", zero_stage=1, data=["synthetic"],
                data_probe=["synthetic-loader", "jpeg"], probe_cell="S:3",
                teacher_variants=[3], variant_compile=True, variant_steps=10,
                dedicated="1:1", dedicated_cell="S:3", profile="S:3", threads=None),
}
BATCH_CANDIDATES = [1024, 768, 512, 384, 256, 192, 128, 96, 64, 32, 16, 8]


@dataclass
class Config:
    preset: str
    device: str
    students: list[str]
    teacher_arch: str
    teacher_counts: list[int]
    img_size: int
    micro_batch: str
    steps: int
    warmup: int
    precision: str
    reference_precision: str
    zero_stage: int
    data: list[str]
    data_probe: list[str]
    probe_cell: str
    teacher_variants: list[int]
    variant_compile: bool
    variant_steps: int
    dedicated: str
    dedicated_cell: str
    profile: str = ""                # STUDENT:TEACHERS cell to profile ("" = none)
    profile_steps: int = 3
    compile_student: bool = False
    teacher_mode: str = "auto"       # auto | loop | stacked
    teacher_compile: str = "auto"    # auto | on | off | <torch.compile mode>
    teacher_fp8: bool = False        # FP8 block linears in the matrix's teacher path
    threads: int | None = None
    jpeg_path: str | None = None
    out: str | None = None
    notes: list[str] = field(default_factory=list)


def parse_cell(text: str) -> tuple[str, int]:
    student, teachers = text.split(":")
    return ALIASES.get(student, student), int(teachers)


def flops_for(cfg: Config, student_arch: str, m: int) -> dict:
    teacher = vit_shape(cfg.teacher_arch, cfg.img_size)
    return dmt_step_flops(vit_shape(student_arch, cfg.img_size), [teacher] * m,
                          adapter_dim=teacher.width)


def result_row(cfg: Config, student_arch: str, m: int, placement: str, source: str, path: str,
               batch: int, result: dict, peak: PeakFlops, extra: dict | None = None) -> dict:
    """One measured cell with its FLOPs per image, achieved TFLOP/s and MFU."""
    flops = flops_for(cfg, student_arch, m)
    achieved = result["images_per_s"] * flops["total"]
    row = {"student": student_arch, "student_short": SHORT.get(student_arch, student_arch),
           "teachers": m, "teacher_arch": cfg.teacher_arch, "placement": placement,
           "data": source, "path": path, "img_size": cfg.img_size, "micro_batch": batch,
           **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in result.items()},
           "flops_per_image": flops, "achieved_tflops": achieved / 1e12,
           "mfu": achieved / peak.flops if peak.flops else None}
    row.update(extra or {})
    return row
