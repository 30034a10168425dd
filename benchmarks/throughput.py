"""DMT training-step throughput: images/s, step-time breakdown, peak memory, MFU.

    python benchmarks/throughput.py --preset cpu      # small shapes, a few minutes on 2 cores
    python benchmarks/throughput.py --preset gpu      # 224 px, ViT-T/S/B, 0-3 ViT-B teachers
    python benchmarks/report.py                       # table + plot from the results

For every cell of the matrix (student x number of teachers x placement x data source)
two steps run side by side in the same process on the same batches:

- fast: the student in a DeepSpeed engine (ZeRO, bf16 on GPUs, client fused torch
  AdamW, the trainer's on-device non-finite guard) and the teachers through
  dmt.models.fast (weights converted once, inference mode, SDPA, stacked and/or
  compiled where measured faster);
- reference, the conventional way peers run it: fp32 timm teachers under torch.no_grad
  and torch.autocast(fp16), the student in a plain PyTorch loop with torch AdamW
  (autocast fp16 + GradScaler on GPUs).

The speed-up is fast / reference from one run. MFU = analytic ViT FLOPs per image
(dmt.flops) x images/s / the device's peak, with the peak and its source in the JSON.
Phases are timed with CUDA events on GPUs (host sync only at the end of a window) and
perf_counter on CPU. "Other" is step time not covered by a phase (launch gaps, syncs).

Output: benchmarks/results/throughput_<preset>_<device>.json and a rich table.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dmt  # noqa: E402,F401  (before timm: CPU-torch torchvision fix)
import torch  # noqa: E402

from benchmarks.common import (RESULTS_DIR, MemorySampler, command_line,  # noqa: E402
                               machine_description, timestamp, write_json)
from dmt.flops import (PeakFlops, device_peak_flops, dmt_step_flops,  # noqa: E402
                       measure_matmul_flops, shape_flops, vit_shape)
from dmt.engine.distributed import skip_lone_allreduce  # noqa: E402
from dmt.engine.step_guard import StepGuard  # noqa: E402
from dmt.losses import DistillationLoss, fuse_teachers  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SHORT = {"vit_tiny_patch16_224": "ViT-T", "vit_small_patch16_224": "ViT-S",
         "vit_base_patch16_224": "ViT-B", "vit_large_patch16_224": "ViT-L"}
ALIASES = {"T": "vit_tiny_patch16_224", "S": "vit_small_patch16_224",
           "B": "vit_base_patch16_224", "L": "vit_large_patch16_224"}

# --------------------------------------------------------------------------- presets
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


def parse_args(argv=None) -> Config:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--students", help="comma list: T,S,B or timm names")
    p.add_argument("--teacher-arch", help="T/S/B or a timm name")
    p.add_argument("--teacher-counts", help="comma list, e.g. 0,1,2,3 (0 = student alone)")
    p.add_argument("--img-size", type=int)
    p.add_argument("--micro-batch", help="an integer, or 'auto' (largest that fits, GPU)")
    p.add_argument("--steps", type=int, help="measured steps per cell")
    p.add_argument("--warmup", type=int, help="unmeasured steps per cell")
    p.add_argument("--precision", choices=sorted(DTYPES), help="fast path: engine and teachers")
    p.add_argument("--reference-precision", choices=sorted(DTYPES),
                   help="reference: autocast dtype (fp32 = no autocast)")
    p.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3])
    p.add_argument("--data", help="comma list of synthetic, synthetic-loader, jpeg")
    p.add_argument("--data-probe", help="extra data sources measured on --probe-cell only "
                                        "('' = none)")
    p.add_argument("--probe-cell", help="STUDENT:TEACHERS for the data probe, e.g. S:3")
    p.add_argument("--jpeg-path", help="image folder for 'jpeg' (default: generated photos)")
    p.add_argument("--teacher-variants", help="teacher counts for the loop/stacked/compile "
                                              "measurement ('' = skip)")
    p.add_argument("--variant-compile", choices=["on", "off"], help="measure torch.compile too")
    p.add_argument("--teacher-mode", choices=["auto", "loop", "stacked"], default="auto",
                   help="auto: the fastest measured variant (or optimize_teachers' default)")
    p.add_argument("--teacher-compile", default="auto",
                   help="auto | on | off | a torch.compile mode such as reduce-overhead")
    p.add_argument("--teacher-fp8", choices=["on", "off"], default="off",
                   help="run the matrix's teachers with FP8 block linears (bf16 precision, "
                        "GPUs with FP8 tensor cores); the variants measure both either way")
    p.add_argument("--dedicated", help="TEACHER_RANKS:STUDENT_RANKS for the multi-process "
                                       "placement comparison, e.g. 1:1 ('' = skip)")
    p.add_argument("--dedicated-cell", help="STUDENT:TEACHERS for it, e.g. S:3")
    p.add_argument("--profile", help="STUDENT:TEACHERS cell to run under torch.profiler after "
                                     "the matrix, e.g. S:3 ('' = skip): time by kind of "
                                     "kernel, top operators, GPU busy fraction")
    p.add_argument("--compile-student", choices=["on", "off"],
                   help="engine.compile() the student (DeepSpeed's torch.compile wrapper)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: all cores)")
    p.add_argument("--out", help="JSON path (default benchmarks/results/"
                                 "throughput_<preset>_<device>.json)")
    a = p.parse_args(argv)
    preset = dict(PRESETS[a.preset])

    def csv(text, cast=str):
        return [cast(x) for x in text.split(",") if x.strip() != ""]

    overrides = {
        "students": csv(a.students) if a.students is not None else None,
        "teacher_arch": a.teacher_arch,
        "teacher_counts": csv(a.teacher_counts, int) if a.teacher_counts is not None else None,
        "img_size": a.img_size, "micro_batch": a.micro_batch, "steps": a.steps,
        "warmup": a.warmup, "precision": a.precision,
        "reference_precision": a.reference_precision, "zero_stage": a.zero_stage,
        "data": csv(a.data) if a.data is not None else None,
        "data_probe": csv(a.data_probe) if a.data_probe is not None else None,
        "probe_cell": a.probe_cell,
        "teacher_variants": csv(a.teacher_variants, int) if a.teacher_variants is not None
        else None,
        "variant_compile": (a.variant_compile == "on") if a.variant_compile else None,
        "dedicated": a.dedicated, "dedicated_cell": a.dedicated_cell, "threads": a.threads,
        "profile": a.profile,
        "compile_student": (a.compile_student == "on") if a.compile_student else None,
    }
    preset.update({k: v for k, v in overrides.items() if v is not None})
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg = Config(preset=a.preset, device=device, teacher_mode=a.teacher_mode,
                 teacher_compile=a.teacher_compile, teacher_fp8=a.teacher_fp8 == "on",
                 jpeg_path=a.jpeg_path, out=a.out,
                 **preset)
    cfg.students = [ALIASES.get(s, s) for s in cfg.students]
    cfg.teacher_arch = ALIASES.get(cfg.teacher_arch, cfg.teacher_arch)
    return cfg


def _cell(text: str) -> tuple[str, int]:
    student, teachers = text.split(":")
    return ALIASES.get(student, student), int(teachers)


# --------------------------------------------------------------------------- timing
class Phases:
    """Per-phase times of the measured steps. CUDA: events on the current stream, read
    after one synchronisation at the end; CPU: perf_counter (CPU ops are synchronous)."""

    NAMES = ("teacher", "student", "optimizer")

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.steps: list[list] = []
        self.data_wait: list[float] = []

    def _now(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start(self, data_wait_s: float):
        self.data_wait.append(data_wait_s)
        self.steps.append([self._now()])

    def mark(self):
        self.steps[-1].append(self._now())

    def summary_ms(self) -> dict:
        if self.cuda:
            torch.cuda.synchronize()
            spans = [[a.elapsed_time(b) for a, b in zip(s, s[1:])] for s in self.steps]
        else:
            spans = [[(b - a) * 1e3 for a, b in zip(s, s[1:])] for s in self.steps]
        n = max(1, len(spans))
        out = {name: sum(s[i] for s in spans) / n for i, name in enumerate(self.NAMES)}
        out["data"] = 1e3 * sum(self.data_wait) / n
        return out


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- data
class StaticBatches:
    """'synthetic': a few random batches made once on the device and cycled: no data cost,
    the setting of the MFU target."""

    def __init__(self, batch: int, img: int, device, student_dtype, distinct: int = 2,
                 seed: int = 0):
        g = torch.Generator(device=device).manual_seed(seed)
        self.batches = []
        for k in range(distinct):
            teacher = torch.randn(batch, 3, img, img, device=device, generator=g)
            student = (teacher + 0.1 * torch.randn(teacher.shape, device=device, generator=g))
            self.batches.append({"teacher": teacher, "student": student.to(student_dtype),
                                 "index": torch.arange(k * batch, (k + 1) * batch)})
        self.i = 0

    def __iter__(self):
        return self

    def __next__(self):
        self.i += 1
        return self.batches[self.i % len(self.batches)]


class LoaderBatches:
    """A dmt.data loader, endlessly, with the views moved/cast as the trainer does."""

    def __init__(self, loader, device, student_dtype):
        self.loader, self.device, self.dtype = loader, device, student_dtype
        self.epoch, self.it = 0, None

    def __iter__(self):
        return self

    def __next__(self):
        while True:
            if self.it is None:
                if hasattr(self.loader, "set_epoch"):
                    self.loader.set_epoch(self.epoch)
                self.it, self.epoch = iter(self.loader), self.epoch + 1
            try:
                b = next(self.it)
                break
            except StopIteration:
                self.it = None
        return {"teacher": b["teacher"].to(self.device, non_blocking=True),
                "student": b["student"].to(self.device, self.dtype, non_blocking=True),
                "index": b["index"]}


_JPEG_DIR: dict[int, str] = {}  # image side -> folder


def _jpeg_folder(images: int, side: int) -> str:
    """>= `images` JPEGs (real photos cut from images shipped in packages, ImageNet-like
    size): up to 1024 unique ones, then copies (same decode cost, quicker to make). Enough
    for 16 steps per epoch, so epoch restarts stay out of the measurement; made once and
    grown for larger batches."""
    from dmt.data import write_sample_images
    folder = _JPEG_DIR.get(side)
    if folder is None:
        folder = _JPEG_DIR[side] = tempfile.mkdtemp(prefix="dmt_bench_jpeg_")
        write_sample_images(folder, num_images=min(images, 1024), size=side, num_classes=8)
    files = sorted(Path(folder).rglob("*.jpg"))
    unique = [f for f in files if not f.name.startswith("copy")]
    for n in range(len(files), images):
        src = unique[n % len(unique)]
        shutil.copyfile(src, src.with_name(f"copy{n:06d}_{src.name}"))
    return folder


def make_batches(source: str, cfg: Config, batch: int, device, student_dtype):
    if source == "synthetic":
        return StaticBatches(batch, cfg.img_size, device, student_dtype)
    from dmt.data import build_loader
    if source == "synthetic-loader":
        loader = build_loader("synthetic", None, batch, image_size=cfg.img_size,
                              device=str(device))
        return LoaderBatches(loader, device, student_dtype)
    if source == "jpeg":
        path = cfg.jpeg_path or _jpeg_folder(16 * batch, max(2 * cfg.img_size, 160))
        backend = "torch"
        if device.type == "cuda":
            try:
                import nvidia.dali  # noqa: F401
                backend = "dali"
            except ImportError:
                pass
        loader = build_loader(backend, path, batch, image_size=cfg.img_size,
                              device=str(device))
        return LoaderBatches(loader, device, student_dtype)
    raise SystemExit(f"unknown data source {source!r}")


# --------------------------------------------------------------------------- models
class TeacherBank:
    """fp32 teacher encoders built once (seeded), copied per cell: the fast path converts
    its copy, the reference keeps fp32 weights as peers' code does."""

    def __init__(self, arch: str, img: int):
        from dmt.models import create_encoder
        self.arch, self.img, self.encoders = arch, img, []

        def grow(n):
            while len(self.encoders) < n:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(len(self.encoders))
                    self.encoders.append(create_encoder(arch, img).eval())
        self.grow = grow

    def fast(self, m: int, device, dtype, mode: str, compile_, fp8: bool = False):
        from dmt.models import FrozenTeacher, TeacherEnsemble
        from dmt.models.fast import optimize_teachers
        self.grow(m)
        ens = TeacherEnsemble([FrozenTeacher(copy.deepcopy(e).to(device), f"t{i}", dtype)
                               for i, e in enumerate(self.encoders[:m])])
        stack = {"auto": "auto", "loop": "never", "stacked": "always"}[mode]
        return optimize_teachers(ens, dtype, compile=compile_, stack=stack, fp8=fp8)

    def reference(self, m: int, device):
        self.grow(m)
        out = []
        for e in self.encoders[:m]:
            t = copy.deepcopy(e).to(device).eval()
            for p in t.parameters():
                p.requires_grad = False
            out.append(t)
        return out


def _ds_config(batch: int, precision: str, zero_stage: int, cuda: bool) -> dict:
    return {
        "train_batch_size": batch, "train_micro_batch_size_per_gpu": batch,
        "gradient_accumulation_steps": 1,
        # Buckets sized to small students: DeepSpeed's default (5e8 elements, two bf16
        # buffers with overlap_comm) would add 2 GB to every step's peak memory.
        "zero_optimization": {"stage": zero_stage, "overlap_comm": cuda,
                              "reduce_bucket_size": int(5e7), "allgather_bucket_size": int(5e7)},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "initial_scale_power": 12},
        "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }


def _student(arch: str, teacher_dim: int, img: int):
    from dmt.models import Student
    torch.manual_seed(0)
    return Student(arch, teacher_dim=teacher_dim, img_size=img)


class ConstantTargets:
    """0 teachers: the student alone, trained against a fixed target tensor."""

    def __init__(self, batch, tokens, dim, device):
        self.t = torch.randn(batch, tokens, dim, device=device)

    def targets(self, batch):
        return self.t[: len(batch["student"])]


def build_fast(cfg: Config, bank: TeacherBank, student_arch: str, m: int, batch: int,
               device, teacher_choice: dict):
    import deepspeed
    from dmt.methods.dmt import DMT
    from dmt.placement import Colocated
    dtype = DTYPES[cfg.precision]
    teachers = bank.fast(m, device, dtype, teacher_choice["mode"], teacher_choice["compile"],
                         teacher_choice.get("fp8", False)) if m else None
    dim = teachers.embed_dim if m else vit_shape(bank.arch, cfg.img_size).width
    student = _student(student_arch, dim, cfg.img_size)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4, weight_decay=0.05, fused=True)
    engine, *_ = deepspeed.initialize(model=student, optimizer=optimizer,
                                      config=_ds_config(batch, cfg.precision, cfg.zero_stage,
                                                        device.type == "cuda"))
    guard = StepGuard.for_engine(engine, optimizer, device)
    skip_lone_allreduce(engine)  # as the trainer does
    if cfg.compile_student:
        engine.compile()
    method = DMT(engine, teachers, DistillationLoss())
    placement = Colocated(method) if m else ConstantTargets(batch, student.num_tokens, dim, device)

    def step(b, phases: Phases):
        fast_step(placement, method, engine, guard, b, phases)

    return step, {"engine": engine, "teachers": teachers, "student": student}


def fast_step(placement, method, engine, guard: StepGuard, b, phases: Phases) -> None:
    """One DMT training step as the trainer runs it, phase by phase: targets, student
    forward+backward, optimizer (with the trainer's on-device non-finite guard)."""
    targets = placement.targets(b)
    phases.mark()
    out = method(b, targets=targets)
    guard.observe(out)
    engine.backward(out["loss"])
    guard.decide()
    phases.mark()
    engine.step()
    phases.mark()


def build_reference(cfg: Config, bank: TeacherBank, student_arch: str, m: int, batch: int,
                    device):
    teachers = bank.reference(m, device)
    dim = vit_shape(bank.arch, cfg.img_size).width
    student = _student(student_arch, dim, cfg.img_size).to(device)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4, weight_decay=0.05)
    amp_dtype = DTYPES[cfg.reference_precision]
    amp = amp_dtype != torch.float32
    scaler = torch.amp.GradScaler(device.type, enabled=amp and amp_dtype == torch.float16
                                  and device.type == "cuda")
    loss_fn = DistillationLoss()
    constant = ConstantTargets(batch, student.num_tokens, dim, device) if not m else None

    def step(b, phases: Phases):
        with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
            targets = fuse_teachers([t.forward_features(b["teacher"]) for t in teachers]) \
                if m else constant.targets(b)
        phases.mark()
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
            tokens = student(b["student"].float())
            loss = loss_fn(tokens, targets)["loss"]
        scaler.scale(loss).backward()
        phases.mark()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        phases.mark()

    return step, {"teachers": teachers, "student": student, "optimizer": optimizer}


# --------------------------------------------------------------------------- measuring
def measure(step, batches, steps: int, warmup: int, device) -> dict:
    """Runs warmup + steps; returns images/s, per-phase ms, peak memory."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    # On GPUs memory comes from the CUDA allocator; a sampling thread would only take the
    # GIL from the launch loop.
    with (contextlib.nullcontext() if cuda else MemorySampler()) as mem:
        for _ in range(warmup):
            scratch = Phases(device)
            scratch.start(0.0)
            step(next(batches), scratch)
        _sync(device)
        phases = Phases(device)
        images = 0
        start = time.perf_counter()
        for _ in range(steps):
            t0 = time.perf_counter()
            b = next(batches)
            phases.start(time.perf_counter() - t0)
            step(b, phases)
            images += len(b["student"])
        _sync(device)
        wall = time.perf_counter() - start
    ms = phases.summary_ms()
    step_ms = 1e3 * wall / steps
    ms["other"] = max(0.0, step_ms - sum(ms[k] for k in ("data", *Phases.NAMES)))
    if cuda:
        memory = {"peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30,
                  "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30,
                  "memory_kind": "torch.cuda.max_memory_allocated"}
    else:
        memory = {"peak_memory_gib": mem.peak / 2**30, "memory_kind": mem.kind}
    return {"images_per_s": images / wall, "step_ms": step_ms,
            "breakdown_ms": {k: round(v, 3) for k, v in ms.items()}, **memory}


def _cleanup(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


_OOM_MESSAGES = ("out of memory", "alloc_failed", "not_enough_workspace", "cuda failure 2")


def _is_oom(err: BaseException) -> bool:
    """CUDA allocator failures, also those that cuBLAS / cuDNN / NCCL report in their words."""
    message = str(err).lower()
    return isinstance(err, torch.OutOfMemoryError) or any(m in message for m in _OOM_MESSAGES)


def _release(keep: dict) -> None:
    """A ZeRO >= 1 engine is kept alive by the gradient hooks DeepSpeed registers (a cycle
    through C++ that gc cannot see): destroy() removes them, or every cell leaks one."""
    engine = keep.get("engine")
    if engine is not None and hasattr(engine, "destroy"):
        engine.destroy()


def run_path(builder, cfg: Config, source: str, batch: int, device, student_dtype,
             steps: int | None = None, warmup: int | None = None) -> dict:
    _cleanup(device)  # here, not in an except block, whose traceback pins a failed attempt
    step, keep = builder(batch)
    try:
        batches = make_batches(source, cfg, batch, device, student_dtype)
        return measure(step, batches, cfg.steps if steps is None else steps,
                       cfg.warmup if warmup is None else warmup, device)
    finally:
        _release(keep)
        del step, keep


def run_path_auto(builder, cfg: Config, source: str, device, student_dtype,
                  candidates: list[int], **measure_kw) -> tuple[int, dict]:
    """The largest micro-batch of `candidates` that runs, and its measurement."""
    last = None
    for batch in candidates:
        try:
            return batch, run_path(builder, cfg, source, batch, device, student_dtype,
                                   **measure_kw)
        except Exception as err:  # noqa: BLE001 - only OOM is retried
            if not _is_oom(err):
                raise
            last = str(err)[:200]  # not the exception: its traceback pins the OOM'd tensors
    raise RuntimeError(f"no micro-batch in {candidates} fits: {last}")


def flops_for(cfg: Config, student_arch: str, m: int) -> dict:
    teacher = vit_shape(cfg.teacher_arch, cfg.img_size)
    return dmt_step_flops(vit_shape(student_arch, cfg.img_size), [teacher] * m,
                          adapter_dim=teacher.width)


def _row(cfg, student_arch, m, placement, source, path, batch, result, peak: PeakFlops,
         extra=None) -> dict:
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


# --------------------------------------------------------------------------- teacher variants
def teacher_variants(cfg: Config, bank: TeacherBank, device, batch: int) -> list[dict]:
    """Teacher pass alone (forward + fusion), per variant: the evidence for the choice."""
    out = []
    dtype = DTYPES[cfg.precision]
    amp_dtype = DTYPES[cfg.reference_precision]
    compiles = [False]
    if cfg.variant_compile:
        # "reduce-overhead" adds CUDA graphs of the fixed-shape teacher pass.
        compiles += [True, "reduce-overhead"] if device.type == "cuda" else [True]
    shape = vit_shape(cfg.teacher_arch, cfg.img_size)
    g = torch.Generator(device=device).manual_seed(1)
    images = torch.randn(batch, 3, cfg.img_size, cfg.img_size, device=device, generator=g)

    def timed(fn, label, m, **info):
        t0 = time.perf_counter()
        fn()  # first call: compilation, kernel selection
        _sync(device)
        first_s = time.perf_counter() - t0
        for _ in range(max(1, cfg.variant_steps // 3)):
            fn()
        _sync(device)
        best = float("inf")
        for _ in range(cfg.variant_steps):
            t0 = time.perf_counter()
            fn()
            _sync(device)
            best = min(best, time.perf_counter() - t0)
        flops = m * shape_flops(shape)
        row = {"variant": label, "teachers": m, "micro_batch": batch, "ms": best * 1e3,
               "images_per_s": batch / best, "first_call_s": first_s,
               "tflops": flops * batch / best / 1e12, **info}
        out.append(row)
        print(f"  teachers x{m} {label:<28} {best * 1e3:9.1f} ms  "
              f"(first call {first_s:.1f} s)", flush=True)
        return row

    for m in cfg.teacher_variants:
        ref = bank.reference(m, device)

        def reference():
            with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype,
                                                 enabled=amp_dtype != torch.float32):
                return fuse_teachers([t.forward_features(images) for t in ref])
        timed(reference, f"reference ({cfg.reference_precision} autocast)"
              if amp_dtype != torch.float32 else "reference (fp32, no_grad)", m,
              mode="reference", compile=False)
        del ref
        baseline = None  # the plain loop's targets: what fp8 variants are compared with
        kinds = [("loop", False), ("stacked", False)]
        fp8_blocker = _fp8_blocker(cfg, device)
        if fp8_blocker:
            out.append({"variant": "fp8", "teachers": m, "mode": "loop", "fp8": True,
                        "skipped": fp8_blocker})
            print(f"  teachers x{m} fp8 variants skipped: {fp8_blocker}", flush=True)
        else:
            kinds.append(("loop", True))
        for compile_ in compiles:
            for mode, fp8 in kinds:
                label = f"{cfg.precision} {mode}" + (" +fp8" if fp8 else "") + (
                    f" +compile({compile_})" if compile_ is not True and compile_ else
                    " +compile" if compile_ else "")
                try:
                    fast = bank.fast(m, device, dtype, mode, compile_, fp8)
                    # The targets first: a variant that fails fails before it is timed.
                    targets = fuse_teachers(fast(images)).float()
                    row = timed(lambda: fuse_teachers(fast(images)), label, m, mode=mode,
                                compile=compile_, fp8=fp8)
                    if baseline is None:
                        baseline = targets
                    elif fp8:
                        row.update(_target_error(baseline, targets))
                        print(f"    vs {cfg.precision} loop: KL {row['target_kl']:.2e} nats/token,"
                              f" relative error {row['target_rel_error']:.3f}", flush=True)
                except Exception as err:  # noqa: BLE001 - a failed variant is a result too
                    print(f"  teachers x{m} {label}: failed: {str(err)[:200]}", flush=True)
                    out.append({"variant": label, "teachers": m, "mode": mode, "fp8": fp8,
                                "compile": compile_, "error": str(err)[:500]})
                fast = targets = None
                _cleanup(device)
    return out


def _fp8_blocker(cfg: Config, device) -> str | None:
    from dmt.models.fp8 import fp8_unsupported
    if cfg.precision != "bf16":
        return f"fp8 teachers write bf16; this run's precision is {cfg.precision}"
    return fp8_unsupported(device)


def _target_error(reference: torch.Tensor, approx: torch.Tensor) -> dict:
    """How far approximate fused targets are from the reference ones, as the TFD loss sees
    them (KL of the per-token channel softmaxes) and as numbers (relative Frobenius error)."""
    p, q = reference.log_softmax(-1), approx.log_softmax(-1)
    return {"target_kl": (p.exp() * (p - q)).sum(-1).mean().item(),
            "target_rel_error": ((approx - reference).norm() / reference.norm()).item()}


def choose_teachers(cfg: Config, variants: list[dict]) -> dict:
    """What the matrix runs: the fastest measured fast variant, unless forced."""
    mode = cfg.teacher_mode
    compile_ = {"on": True, "off": False, "auto": "auto"}.get(cfg.teacher_compile,
                                                              cfg.teacher_compile)
    fast = [v for v in variants if v["mode"] != "reference" and "error" not in v
            and "skipped" not in v and v.get("fp8", False) == cfg.teacher_fp8]
    if fast:
        candidates = [v for v in fast if (mode == "auto" or v["mode"] == mode)
                      and (compile_ == "auto" or v["compile"] == compile_)]
        best = min(candidates or fast, key=lambda v: v["ms"])
        why = f"fastest measured variant: {best['variant']} ({best['ms']:.1f} ms)"
        mode = best["mode"] if mode == "auto" else mode
        compile_ = best["compile"] if compile_ == "auto" else compile_
    else:
        why = "forced or default (no variants measured)"
        mode = "auto" if mode == "auto" else mode
        compile_ = False if compile_ == "auto" else compile_
    if cfg.teacher_fp8:
        mode = "loop"  # fp8 runs per teacher
        blocker = _fp8_blocker(cfg, torch.device(cfg.device))
        if blocker:
            raise SystemExit(f"--teacher-fp8 on: {blocker}")
    return {"mode": mode, "compile": compile_, "fp8": cfg.teacher_fp8, "why": why}


# --------------------------------------------------------------------------- profile
def profile_cell(cfg: Config, bank: TeacherBank, device, choice: dict, rows: list[dict],
                 fixed_batch: int | None, student_dtype) -> dict:
    """The fast step of one cell under torch.profiler, at the matrix's micro-batch."""
    from benchmarks.profiling import profile_steps
    student_arch, m = _cell(cfg.profile)
    batch = fixed_batch or next((r["micro_batch"] for r in rows if r["path"] == "fast" and
                                 (r["student"], r["teachers"]) == (student_arch, m)), 64)
    print(f"profile {SHORT.get(student_arch, student_arch)} + {m} teachers, batch {batch}:",
          flush=True)
    step, keep = build_fast(cfg, bank, student_arch, m, batch, device, choice)
    batches = make_batches("synthetic", cfg, batch, device, student_dtype)
    try:
        result = profile_steps(step, batches, lambda: Phases(device), cfg.profile_steps, device,
                               warmup=max(1, cfg.warmup))
    finally:
        _release(keep)
    del step, keep, batches
    _cleanup(device)
    for category, ms in result["by_category_ms"].items():
        print(f"  {category:<22} {ms:9.1f} ms/step", flush=True)
    if result["device_busy"] is not None:
        print(f"  GPU busy {100 * result['device_busy']:.0f}% of the step", flush=True)
    return {"student": student_arch, "teachers": m, "micro_batch": batch,
            "teacher_path": choice if m else None, **result}


# --------------------------------------------------------------------------- dedicated
def placement_worker(rank: int, world: int, port: int, spec: dict, out_dir: str):
    """One rank of a multi-process placement run (spawned): gloo on CPU, NCCL on GPUs."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      OMP_NUM_THREADS=str(spec["threads"]))
    torch.set_num_threads(spec["threads"])
    import deepspeed
    import torch.distributed as dist
    deepspeed.utils.logger.setLevel(logging.WARNING)
    cuda = spec["device"] == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    else:
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo",
                               timeout=timedelta(seconds=600))
    from dmt.methods.dmt import DMT
    from dmt.placement import build_placement
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    cfg = Config(**spec["cfg"])
    bank = TeacherBank(cfg.teacher_arch, cfg.img_size)
    kind, t_ranks, m, batch = spec["kind"], spec["teacher_ranks"], spec["m"], spec["batch"]
    is_teacher = kind == "dedicated" and rank >= world - t_ranks
    dtype = DTYPES[cfg.precision]
    teachers = bank.fast(m, device, dtype, spec["choice"]["mode"], spec["choice"]["compile"],
                         spec["choice"].get("fp8", False)) \
        if (kind == "colocated" or is_teacher) else None
    method = DMT(None, teachers, DistillationLoss())
    placement = build_placement(kind, t_ranks, method, micro_batch=batch, device=device)
    total = cfg.warmup + cfg.steps
    student_dtype = dtype if cfg.precision != "fp32" else torch.float32

    def data(data_rank):  # static batches, the same on a student and its teacher
        return StaticBatches(batch, cfg.img_size, device, student_dtype, seed=1 + data_rank)

    if placement.role == "teacher":
        feeds = {s: data(r) for s, (r, _) in zip(placement.students, placement.data_shards)}
        t0 = time.perf_counter()
        placement.serve(feeds, steps=total)
        dist.barrier()
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"role": "teacher", "serve_s": time.perf_counter() - t0}, f)
        return
    dim = vit_shape(cfg.teacher_arch, cfg.img_size).width
    student = _student(spec["student"], dim, cfg.img_size)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4, weight_decay=0.05, fused=True)
    n_students = placement.data_world_size
    engine, *_ = deepspeed.initialize(
        model=student, optimizer=optimizer, mpu=placement.mpu,
        config={**_ds_config(batch * n_students, cfg.precision, cfg.zero_stage, cuda),
                "train_micro_batch_size_per_gpu": batch})
    method.student = engine
    group = placement.mpu.get_data_parallel_group() if placement.mpu else None
    guard = StepGuard.for_engine(engine, optimizer, device, group)
    skip_lone_allreduce(engine, group)
    batches = data(placement.data_rank)
    phases = Phases(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    with (contextlib.nullcontext() if cuda else MemorySampler()) as mem:
        for i in range(total):
            if i == cfg.warmup:
                _sync(device)
                dist.barrier(group=group)
                phases, start = Phases(device), time.perf_counter()
            b = next(batches)
            phases.start(0.0)
            fast_step(placement, method, engine, guard, b, phases)
        _sync(device)
        wall = time.perf_counter() - start
    placement.close()
    dist.barrier()
    memory = (torch.cuda.max_memory_allocated(device) if cuda else mem.peak) / 2**30
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"role": "student", "wall_s": wall, "images": cfg.steps * batch,
                   "breakdown_ms": phases.summary_ms(), "peak_memory_gib": memory}, f)


def run_placements(cfg: Config, device, choice: dict, batch: int, peak: PeakFlops) -> list[dict]:
    """Same hardware, two placements: T teacher + S student ranks vs T+S colocated ranks."""
    import socket

    import torch.multiprocessing as mp
    t_ranks, s_ranks = (int(x) for x in cfg.dedicated.split(":"))
    world = t_ranks + s_ranks
    student_arch, m = _cell(cfg.dedicated_cell)
    if device.type == "cuda" and torch.cuda.device_count() < world:
        cfg.notes.append(f"placement comparison skipped: needs {world} GPUs, "
                         f"{torch.cuda.device_count()} present")
        return []
    threads = max(1, (cfg.threads or os.cpu_count() or 1) // world) if device.type == "cpu" else 1
    rows = []
    for kind, tr in (("colocated", 0), ("dedicated", t_ranks)):
        out_dir = tempfile.mkdtemp(prefix=f"dmt_bench_{kind}_")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        spec = {"cfg": asdict(cfg), "device": device.type, "kind": kind, "teacher_ranks": tr,
                "m": m, "batch": batch, "student": student_arch, "choice": choice,
                "threads": threads}
        print(f"  {kind}: {world} processes ({tr} teacher ranks), {threads} thread(s) each",
              flush=True)
        mp.start_processes(placement_worker, args=(world, port, spec, out_dir), nprocs=world,
                           start_method="spawn", join=True)
        ranks = [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(world)]
        students = [r for r in ranks if r["role"] == "student"]
        img_s = sum(r["images"] for r in students) / max(r["wall_s"] for r in students)
        result = {"images_per_s": img_s,
                  "step_ms": 1e3 * max(r["wall_s"] for r in students) / cfg.steps,
                  "breakdown_ms": {k: round(v, 3) for k, v in students[0]["breakdown_ms"].items()},
                  "peak_memory_gib": max(r["peak_memory_gib"] for r in students),
                  "memory_kind": "per student rank (max)"}
        row = _row(cfg, student_arch, m, kind, "synthetic", "fast", batch, result, peak,
                   {"ranks": world, "teacher_ranks": tr, "student_ranks": world - tr,
                    "threads_per_rank": threads,
                    "images_per_s_per_rank": img_s / world,
                    "targets_mb_per_image": vit_shape(cfg.teacher_arch, cfg.img_size).tokens
                    * vit_shape(cfg.teacher_arch, cfg.img_size).width * 2 / 1e6})
        if peak.flops:  # MFU over all ranks of the run
            row["mfu"] = row["achieved_tflops"] * 1e12 / (peak.flops * world)
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- main
def setup_single_process(device):
    import deepspeed
    deepspeed.utils.logger.setLevel(logging.WARNING)
    if "RANK" not in os.environ:
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    else:
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    import torch.distributed as dist
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")


def print_table(payload: dict) -> None:
    from rich.console import Console
    from rich.table import Table
    table = Table(title=f"DMT throughput - {payload['machine'].get('gpu') or payload['machine']['cpu']}"
                        f" - {payload['config']['img_size']} px - peak {payload['peak_flops']['source']}")
    for col in ("student", "teachers", "placement", "data", "path", "batch", "img/s", "speed-up",
                "data ms", "teacher ms", "student ms", "optim ms", "other ms", "mem GiB", "MFU"):
        table.add_column(col, justify="right" if col not in ("student", "placement", "data",
                                                              "path") else "left")
    for r in payload["rows"] + payload.get("placement_rows", []):
        b = r["breakdown_ms"]
        table.add_row(r["student_short"], str(r["teachers"]),
                      r["placement"] + (f" {r.get('teacher_ranks', 0)}T+{r.get('student_ranks')}S"
                                        if "ranks" in r else ""),
                      r["data"], r["path"], str(r["micro_batch"]), f"{r['images_per_s']:.1f}",
                      f"{r['speedup_vs_reference']:.2f}x" if r.get("speedup_vs_reference")
                      else "", f"{b.get('data', 0):.1f}", f"{b.get('teacher', 0):.1f}",
                      f"{b.get('student', 0):.1f}", f"{b.get('optimizer', 0):.1f}",
                      f"{b.get('other', 0):.1f}", f"{r['peak_memory_gib']:.2f}",
                      f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a")
    Console(width=200).print(table)


def main(argv=None) -> Path:
    cfg = parse_args(argv)
    device = torch.device(cfg.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    setup_single_process(device)
    started = time.perf_counter()
    dtype = DTYPES[cfg.precision]
    student_dtype = dtype  # the engine's dtype: the trainer casts the student view to it

    # --- peak FLOP/s: the data sheet on known GPUs, a measured matmul elsewhere
    peak = device_peak_flops(device, dtype, measure_if_unknown=True)
    matmul_rates = {}
    if device.type == "cpu":
        for name in ("fp32", "bf16", "fp16"):
            rate, size = measure_matmul_flops(device, DTYPES[name], size=512, repeats=2,
                                              min_seconds=0.1)
            matmul_rates[name] = {"gflops": round(rate / 1e9, 2), "size": size}
    print(f"peak: {peak.source} = {peak.flops / 1e12 if peak.flops else float('nan'):.3f} "
          f"TFLOP/s", flush=True)

    out = Path(cfg.out) if cfg.out else RESULTS_DIR / f"throughput_{cfg.preset}_{device.type}.json"
    variants, choice, rows, profile, placement_rows = [], None, [], None, []

    partial = out.with_name(out.name + ".partial")

    def save(complete: bool = False) -> dict:
        """Written after every part to OUT.partial, so a run cut short keeps what it
        measured without replacing the last complete result; renamed to OUT at the end."""
        payload = {
            "benchmark": "throughput", "preset": cfg.preset, "command": command_line(),
            "timestamp": timestamp(), "wall_s": round(time.perf_counter() - started, 1),
            "complete": complete, "machine": machine_description(device),
            "peak_flops": {"flops": peak.flops, "source": peak.source, "dtype": cfg.precision},
            "matmul_rates": matmul_rates,
            "config": {k: v for k, v in asdict(cfg).items() if k != "notes"},
            "teacher_variants": variants, "teacher_choice": choice,
            "rows": rows, "placement_rows": placement_rows, "profile": profile,
            "notes": cfg.notes + _notes(cfg, device),
        }
        write_json(partial, payload)
        if complete:
            partial.replace(out)
        return payload

    bank = TeacherBank(cfg.teacher_arch, cfg.img_size)
    fixed_batch = None if cfg.micro_batch == "auto" else int(cfg.micro_batch)
    if fixed_batch is None and device.type != "cuda":
        raise SystemExit("--micro-batch auto needs a GPU")

    if cfg.teacher_fp8 and _fp8_blocker(cfg, device):
        raise SystemExit(f"--teacher-fp8 on: {_fp8_blocker(cfg, device)}")

    # --- 1. teacher variants (evidence for loop / stacked / compile on this device)
    if cfg.teacher_variants:
        vbatch = fixed_batch or 256
        print(f"teacher variants ({cfg.teacher_arch}, batch {vbatch}):", flush=True)
        variants = teacher_variants(cfg, bank, device, vbatch)
    choice = choose_teachers(cfg, variants)
    print(f"teacher path for the matrix: {choice}", flush=True)
    save()

    # --- 2. the matrix
    cells = [(s, m, src) for src in cfg.data for s in cfg.students for m in cfg.teacher_counts]
    if cfg.data_probe:
        ps, pm = _cell(cfg.probe_cell)
        cells += [(ps, pm, src) for src in cfg.data_probe if src not in cfg.data]
    for student_arch, m, source in cells:
        label = f"{SHORT.get(student_arch, student_arch)} + {m} x {SHORT.get(cfg.teacher_arch)}"
        print(f"{label}, data {source}:", flush=True)

        def fast_builder(batch, student_arch=student_arch, m=m):
            return build_fast(cfg, bank, student_arch, m, batch, device, choice)

        def ref_builder(batch, student_arch=student_arch, m=m):
            return build_reference(cfg, bank, student_arch, m, batch, device)

        if fixed_batch is None:
            candidates = BATCH_CANDIDATES
            if m and choice["compile"]:
                # Find the batch with eager teachers (one step each): a compiled teacher
                # would recompile for every candidate, including those that then run out
                # of memory.
                def eager_builder(batch, student_arch=student_arch, m=m):
                    return build_fast(cfg, bank, student_arch, m, batch, device,
                                      dict(choice, compile=False))
                fit, _ = run_path_auto(eager_builder, cfg, source, device, student_dtype,
                                       candidates, steps=1, warmup=1)
                # One size above: compiled code often needs less activation memory.
                i = BATCH_CANDIDATES.index(fit)
                candidates = BATCH_CANDIDATES[max(0, i - 1):]
            batch, fast = run_path_auto(fast_builder, cfg, source, device, student_dtype,
                                        candidates)
            ref_batch, ref = run_path_auto(ref_builder, cfg, source, device, torch.float32,
                                           [b for b in BATCH_CANDIDATES if b <= batch])
        else:
            batch = ref_batch = fixed_batch
            fast = run_path(fast_builder, cfg, source, batch, device, student_dtype)
            ref = run_path(ref_builder, cfg, source, batch, device, torch.float32)
        speedup = fast["images_per_s"] / ref["images_per_s"]
        rows.append(_row(cfg, student_arch, m, "colocated", source, "fast", batch, fast, peak,
                         {"speedup_vs_reference": speedup,
                          "teacher_path": choice if m else None}))
        rows.append(_row(cfg, student_arch, m, "colocated", source, "reference", ref_batch, ref,
                         peak))
        print(f"  fast {fast['images_per_s']:.1f} img/s, reference {ref['images_per_s']:.1f} "
              f"img/s (batch {batch}/{ref_batch}): {speedup:.2f}x", flush=True)
        save()

    # --- 3. where the time goes in one cell
    if cfg.profile:
        profile = profile_cell(cfg, bank, device, choice, rows, fixed_batch, student_dtype)
        save()

    # --- 4. placements on several ranks (same hardware, both placements)
    if cfg.dedicated:
        print(f"placements ({cfg.dedicated} teacher:student ranks, cell {cfg.dedicated_cell}):",
              flush=True)
        pbatch = fixed_batch or next((r["micro_batch"] for r in rows
                                      if (r["student"], r["teachers"]) == _cell(cfg.dedicated_cell)
                                      and r["path"] == "fast"), 64)
        placement_rows.extend(run_placements(cfg, device, choice, pbatch, peak))

    payload = save(complete=True)
    print_table(payload)
    print(f"wrote {out} ({payload['wall_s']} s)")
    return out


def _notes(cfg: Config, device) -> list[str]:
    notes = ["MFU counts matmul FLOPs only (dmt.flops): student step = 3 x forward, teachers "
             "forward only; nothing is credited for recomputation."]
    if device.type == "cuda":
        notes.append("GPU: 'data ms' is host time waiting for the next batch; GPU work a "
                     "device-side loader queues (decode, crop, jitter) runs on the step's "
                     "stream and shows in the other phases. Memory is "
                     "torch.cuda.max_memory_allocated, reset per path.")
    if device.type == "cpu":
        notes.append("CPU: the peak is a measured fp32 matmul rate, not a data-sheet figure; "
                     "memory is the peak of allocated host bytes (glibc), which includes the "
                     "interpreter and libraries. CPU timings say nothing about GPU speed.")
        if cfg.reference_precision == "fp32":
            notes.append("CPU reference runs fp32 without autocast: fp16/bf16 matmuls are "
                         "~50x slower than fp32 on this CPU (see matmul_rates), so the GPU "
                         "recipe's fp16 autocast would only measure that.")
    return notes


if __name__ == "__main__":
    main()
