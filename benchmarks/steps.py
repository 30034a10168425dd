"""The two training steps the benchmark compares on the same batches: dmt's fast step (a
DeepSpeed engine, fast teachers, the trainer's non-finite guard) and the conventional
reference (fp32 timm teachers under autocast, a plain PyTorch loop)."""
from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import torch

from benchmarks.common import REPO_ROOT
from benchmarks.matrix import DTYPES, Config
from benchmarks.timing import Phases
from dmt.engine.distributed import skip_lone_allreduce
from dmt.engine.ds_config import add_runtime_settings, read_ds_config
from dmt.engine.step_guard import StepGuard
from dmt.flops import vit_shape
from dmt.losses import DistillationLoss, fuse_teachers


DS_CONFIGS = REPO_ROOT / "ds_configs"


class TeacherBank:
    """fp32 teacher encoders built once (seeded), copied per cell: the fast path converts
    its copy, the reference keeps fp32 weights as peers' code does.

    off_heap (for CPUs): the bank's own weights live in a memory-mapped temporary file.
    There the memory figure is the heap's peak, which would otherwise count every teacher
    the bank ever built in every later cell (ViT-T alone once read 0.46 GiB after a
    3-teacher cell, 0.22 GiB before it). GPU memory is counted on the GPU: no file."""

    def __init__(self, arch: str, img: int, off_heap: bool = True):
        from dmt.models import create_encoder
        self.arch, self.img, self.encoders = arch, img, []
        self._folder = (tempfile.TemporaryDirectory(prefix="dmt_teacher_bank_") if off_heap
                        else None)

        def grow(n):
            while len(self.encoders) < n:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(len(self.encoders))
                    encoder = create_encoder(arch, img).eval()
                self.encoders.append(self._off_heap(encoder, len(self.encoders))
                                     if self._folder else encoder)
        self.grow = grow

    def _off_heap(self, encoder: torch.nn.Module, index: int) -> torch.nn.Module:
        path = Path(self._folder.name) / f"t{index}.pt"
        torch.save(encoder.state_dict(), path)
        encoder.load_state_dict(torch.load(path, mmap=True, weights_only=True), assign=True)
        return encoder

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


def ds_config(batch: int, precision: str, zero_stage: int, data_ranks: int = 1) -> dict:
    """The repository's ZeRO file for `precision` (its buckets and loss scaler, read and
    checked as the trainer reads a run's), at `zero_stage`, for a global batch of `batch`
    over `data_ranks` ranks with no accumulation; overlap_comm as the trainer decides it."""
    ds = read_ds_config(DS_CONFIGS / f"zero2_{precision}.json")
    ds["zero_optimization"]["stage"] = zero_stage
    if "fp16" in ds:  # a low first loss scale: warm-up overflows would skip measured steps
        ds["fp16"]["initial_scale_power"] = 12
    ds.update(train_batch_size=batch, train_micro_batch_size_per_gpu=batch // data_ranks,
              gradient_accumulation_steps=1)
    return add_runtime_settings(ds, data_ranks)


def make_student(arch: str, teacher_dim: int, img: int):
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
    student = make_student(student_arch, dim, cfg.img_size)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4, weight_decay=0.05, fused=True)
    engine, *_ = deepspeed.initialize(model=student, optimizer=optimizer,
                                      config=ds_config(batch, cfg.precision, cfg.zero_stage))
    guard = StepGuard.for_engine(engine, optimizer, device)
    skip_lone_allreduce(engine)  # as the trainer does
    method = DMT(engine, teachers, DistillationLoss())
    if cfg.compile_student:
        method.compile()  # as the trainer does with model.compile: student and loss
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
    student = make_student(student_arch, dim, cfg.img_size).to(device)
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
