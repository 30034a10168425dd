"""Timing a training step: per-phase CUDA events or perf_counter, images/s and peak memory
over measured steps, and the largest micro-batch that fits."""
from __future__ import annotations

import contextlib
import gc
import statistics
import sys
import time

import torch

from benchmarks.batches import make_batches
from benchmarks.common import MemorySampler
from benchmarks.matrix import Config


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

    def _spans_ms(self) -> list[list[float]]:
        if self.cuda:
            torch.cuda.synchronize()
            return [[a.elapsed_time(b) for a, b in zip(s, s[1:])] for s in self.steps]
        return [[(b - a) * 1e3 for a, b in zip(s, s[1:])] for s in self.steps]

    def spread_ms(self) -> dict:
        """How much the measured steps differ: min, median and max over steps of data wait
        + the phases (what happens between steps, 'other', is not split per step)."""
        per_step = sorted(1e3 * w + sum(s) for w, s in zip(self.data_wait, self._spans_ms()))
        if not per_step:
            return {}
        return {"min": round(per_step[0], 3), "median": round(statistics.median(per_step), 3),
                "max": round(per_step[-1], 3), "steps": len(per_step)}

    def summary_ms(self) -> dict:
        spans = self._spans_ms()
        n = max(1, len(spans))
        out = {name: sum(s[i] for s in spans) / n for i, name in enumerate(self.NAMES)}
        out["data"] = 1e3 * sum(self.data_wait) / n
        return out


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
        sync(device)
        phases = Phases(device)
        images = 0
        start = time.perf_counter()
        for _ in range(steps):
            t0 = time.perf_counter()
            b = next(batches)
            phases.start(time.perf_counter() - t0)
            step(b, phases)
            images += len(b["student"])
        sync(device)
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
            "breakdown_ms": {k: round(v, 3) for k, v in ms.items()},
            "phases_ms_per_step": phases.spread_ms(), **memory}


def cleanup(device):
    """Frees what the last cell or variant left: its tensors, its compiled code (every
    cell compiles the same teacher code again: past torch._dynamo's recompile limit it
    would silently run eager) and, on GPUs, its CUDA-graph pools and cached blocks."""
    gc.collect()
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        dali = sys.modules.get("nvidia.dali.backend")
        if dali is not None:  # DALI keeps a pool of its own, which empty_cache leaves alone
            dali.ReleaseUnusedMemory()


_OOM_MESSAGES = ("out of memory", "alloc_failed", "not_enough_workspace", "cuda failure 2",
                 "cublas_status_not_initialized")  # no memory left for cuBLAS's handle


def is_oom(err: BaseException) -> bool:
    """CUDA allocator failures, also those that cuBLAS / cuDNN / NCCL report in their words."""
    message = str(err).lower()
    return isinstance(err, torch.OutOfMemoryError) or any(m in message for m in _OOM_MESSAGES)


def release(keep: dict) -> None:
    """A ZeRO >= 1 engine is kept alive by the gradient hooks DeepSpeed registers (a cycle
    through C++ that gc cannot see): destroy() removes them, or every cell leaks one."""
    engine = keep.get("engine")
    if engine is not None and hasattr(engine, "destroy"):
        engine.destroy()


def run_path(builder, cfg: Config, source: str, batch: int, device, student_dtype,
             steps: int | None = None, warmup: int | None = None) -> dict:
    cleanup(device)  # here, not in an except block, whose traceback pins a failed attempt
    step, keep = builder(batch)
    try:
        batches = make_batches(source, cfg, batch, device, student_dtype)
        return measure(step, batches, cfg.steps if steps is None else steps,
                       cfg.warmup if warmup is None else warmup, device)
    finally:
        release(keep)
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
            if not is_oom(err):
                raise
            last = str(err)[:200]  # not the exception: its traceback pins the OOM'd tensors
    raise RuntimeError(f"no micro-batch in {candidates} fits: {last}")
