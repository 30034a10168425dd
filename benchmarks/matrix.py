"""The throughput benchmark's matrix: presets, the settings of one run (Config), cells
(STUDENT:TEACHERS) and how one measured cell becomes a result row (FLOPs, MFU)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from dmt.choices import COMPILE_MODES
from dmt.flops import PeakFlops, dmt_step_flops, vit_shape

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SHORT = {"vit_tiny_patch16_224": "ViT-T", "vit_small_patch16_224": "ViT-S",
         "vit_base_patch16_224": "ViT-B", "vit_large_patch16_224": "ViT-L"}
ALIASES = {"T": "vit_tiny_patch16_224", "S": "vit_small_patch16_224",
           "B": "vit_base_patch16_224", "L": "vit_large_patch16_224"}

PRESETS = {
    # 2 shared CPU cores. fp32 everywhere: this class of CPU (AVX2, no AVX-512 BF16/AMX)
    # multiplies bf16/fp16 matrices tens of times slower than fp32 ("matmul_rates" in the JSON).
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
    variants_from: str | None = None  # an earlier result whose teacher variants decide
    threads: int | None = None
    jpeg_path: str | None = None
    out: str | None = None
    overwrite: bool = False          # replace an earlier result at `out`
    notes: list[str] = field(default_factory=list)


DATA_SOURCES = ("synthetic", "synthetic-loader", "jpeg")


def parse_cell(text: str) -> tuple[str, int]:
    """STUDENT:TEACHERS, e.g. S:3 -> ("vit_small_patch16_224", 3)."""
    student, sep, teachers = text.partition(":")
    if not sep or not student or not teachers.isdigit():
        raise ValueError(f"{text!r} is not STUDENT:TEACHERS (e.g. S:3)")
    return ALIASES.get(student, student), int(teachers)


def check_config(cfg: Config) -> None:
    """Every setting of a run, before anything is measured: a typo must not surface after
    a matrix that took twenty minutes. Raises ValueError naming the flag."""
    from dmt.build import check_arch
    from dmt.errors import ConfigError
    from dmt.placement.layout import RankLayout

    def positive(flag, value, least=1):
        if value is None or value < least:
            raise ValueError(f"{flag} must be at least {least}, got {value}")

    if cfg.micro_batch == "auto" and not cfg.device.startswith("cuda"):
        raise ValueError(f"--micro-batch auto needs a GPU (this run is on {cfg.device}): "
                         "pass --micro-batch N")
    if cfg.micro_batch != "auto" and not (cfg.micro_batch.isdigit() and int(cfg.micro_batch) > 0):
        raise ValueError(f"--micro-batch must be a positive integer or 'auto', got "
                         f"{cfg.micro_batch!r}")
    positive("--steps", cfg.steps)
    positive("--warmup", cfg.warmup, least=0)
    positive("--img-size", cfg.img_size)
    if cfg.threads is not None:
        positive("--threads", cfg.threads)
    if any(m < 0 for m in cfg.teacher_counts):  # '' is fine: a run of probes only
        raise ValueError(f"--teacher-counts must list counts >= 0, got {cfg.teacher_counts}")
    if any(m < 1 for m in cfg.teacher_variants):
        raise ValueError(f"--teacher-variants must list counts >= 1, got {cfg.teacher_variants}")
    if cfg.variants_from is not None:
        if cfg.teacher_variants:
            raise ValueError("--variants-from takes the teacher variants of an earlier run: "
                             "pass --teacher-variants '' with it")
        if not Path(cfg.variants_from).is_file():
            raise ValueError(f"--variants-from: no such file {cfg.variants_from}")
    for flag, sources in (("--data", cfg.data), ("--data-probe", cfg.data_probe)):
        unknown = [x for x in sources if x not in DATA_SOURCES]
        if unknown:
            raise ValueError(f"{flag}: unknown data source(s) {unknown}; choose from "
                             f"{list(DATA_SOURCES)}")
    if not cfg.data:
        raise ValueError("--data must name at least one data source")
    uses_jpeg = "jpeg" in cfg.data or "jpeg" in cfg.data_probe
    if uses_jpeg and cfg.jpeg_path is not None and not Path(cfg.jpeg_path).expanduser().is_dir():
        # (its images are listed when the cell runs: a typo here failed that cell only)
        raise ValueError(f"--jpeg-path {cfg.jpeg_path}: no such folder")
    if not cfg.students:
        raise ValueError("--students must name at least one student")
    if cfg.teacher_compile not in ("auto", "on", "off", *COMPILE_MODES):
        raise ValueError(f"--teacher-compile: {cfg.teacher_compile!r} is none of auto, on, off "
                         f"or a torch.compile mode {list(COMPILE_MODES)}")
    cells = [("--profile", cfg.profile)] if cfg.profile else []  # each only where it is used
    if cfg.dedicated:
        cells.append(("--dedicated-cell", cfg.dedicated_cell))
    if cfg.data_probe:
        cells.append(("--probe-cell", cfg.probe_cell))
    archs = {"--teacher-arch": cfg.teacher_arch,
             **{f"--students ({s})": s for s in cfg.students}}
    for flag, cell in cells:
        try:
            student, m = parse_cell(cell)
        except ValueError as err:
            raise ValueError(f"{flag}: {err}") from None
        if flag == "--dedicated-cell" and m < 1:
            raise ValueError(f"--dedicated-cell {cell}: teacher ranks need at least one teacher")
        archs.setdefault(f"{flag} ({cell})", student)
    if cfg.dedicated:
        t, sep, s = cfg.dedicated.partition(":")
        if not (sep and t.isdigit() and s.isdigit() and int(t) >= 1 and int(s) >= 1):
            raise ValueError(f"--dedicated must be TEACHER_RANKS:STUDENT_RANKS, both at least "
                             f"1 (e.g. 1:1), or '' to skip; got {cfg.dedicated!r}")
        try:  # the trainer's own rule
            RankLayout(int(t) + int(s), int(t))
        except ConfigError as err:
            raise ValueError(f"--dedicated {cfg.dedicated}: {err}") from None
    for flag, arch in archs.items():
        try:
            check_arch(ALIASES.get(arch, arch), cfg.img_size, flag, size_key="--img-size")
        except ConfigError as err:
            raise ValueError(str(err)) from None


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
           "mfu": achieved / peak.flops if peak.flops else None,
           "peak_tflops": peak.flops / 1e12 if peak.flops else None}  # per device, for `mfu`
    row.update(extra or {})
    return row
