"""Where a training step's time goes: torch.profiler over a few steps, summed by kind.

Used by benchmarks/throughput.py --profile STUDENT:TEACHERS. On a GPU the time is device
kernel time and `device_busy` = kernel time / wall time says how much of the step the GPU
computes at all (a low value means launch overhead, host synchronisation or data waits;
the profiler's own overhead lowers it too: read it as a lower bound); on a CPU it is the
self time of the aten operators.
"""
from __future__ import annotations

import re
import time

import torch

# First match wins; patterns cover aten op names (CPU) and kernel names (CUDA).
CATEGORIES = [
    ("fp8 quantise", r"fp8_quantize|amax"),
    ("attention", r"flash|fmha|scaled_dot_product|sdpa|efficient_attention|attention"),
    ("fp8 matmul", r"scaled_mm|f8f8|e4m3e4m3|gemm.*e4m3"),
    ("matmul", r"gemm|matmul|\bmm\b|aten::mm|aten::addmm|aten::bmm|aten::baddbmm|"
               r"aten::linear\b|cutlass|xmma|sm\d+_|nvjet|cublas|\bconv|convolution"),
    ("communication", r"nccl|all_reduce|allreduce|all_gather|allgather|reduce_scatter|"
                      r"broadcast|gloo|c10d"),
    ("optimizer", r"adam|multi_tensor|_foreach"),
    ("softmax / norm", r"softmax|layer_?norm|rms_?norm|group_norm|batch_norm"),
    ("memory copy", r"memcpy|memset|copy_|\bto\b|_to_copy|contiguous|\bcat\b|aten::cat"),
]


def categorise(name: str) -> str:
    lowered = name.lower()
    for category, pattern in CATEGORIES:
        if re.search(pattern, lowered):
            return category
    return "elementwise / other"


def _self_time_us(event, cuda: bool) -> float:
    if cuda:  # renamed from self_cuda_time_total in newer PyTorch
        return float(getattr(event, "self_device_time_total",
                             getattr(event, "self_cuda_time_total", 0.0)))
    return float(event.self_cpu_time_total)


def counted(event, cuda: bool) -> bool:
    """Whether an event's self time is its own. On a GPU only kernels count: the aten ops
    that launched them, and record_function ranges (the optimizer step, fp8 quantise,
    compiled regions), which also appear as device events spanning their kernels, would
    count the same device time again."""
    if not cuda:
        return True
    return ("CPU" not in str(getattr(event, "device_type", "CPU"))
            and not getattr(event, "is_user_annotation", False))


def profile_steps(step, batches, phases_factory, steps: int, device: torch.device,
                  warmup: int = 3, top: int = 15) -> dict:
    """Runs `warmup` unrecorded steps (compilation, CUDA-graph warm-up and recording) and
    `steps` recorded ones; returns per-step ms by category, the top operators, and (GPU)
    the busy fraction."""
    from torch.profiler import ProfilerActivity, profile
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])

    def run(n: int) -> None:
        for _ in range(n):
            phases = phases_factory()
            phases.start(0.0)
            step(next(batches), phases)
        if cuda:
            torch.cuda.synchronize(device)

    run(warmup)
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        run(steps)
        wall_ms = 1e3 * (time.perf_counter() - start) / steps
    ops, by_category = [], {}
    for event in prof.key_averages():
        if not counted(event, cuda):
            continue
        ms = _self_time_us(event, cuda) / 1e3 / steps
        if ms <= 0:
            continue
        category = categorise(event.key)
        by_category[category] = by_category.get(category, 0.0) + ms
        ops.append({"name": event.key[:120], "category": category, "ms_per_step": round(ms, 3),
                    "calls_per_step": event.count / steps})
    ops.sort(key=lambda o: -o["ms_per_step"])
    busy = sum(by_category.values())
    return {
        "time_kind": "CUDA kernel time" if cuda else "CPU self time of aten operators",
        "steps": steps, "wall_ms_per_step": round(wall_ms, 3),
        "busy_ms_per_step": round(busy, 3),
        "device_busy": round(busy / wall_ms, 4) if cuda else None,
        "by_category_ms": {k: round(v, 3) for k, v in sorted(by_category.items(),
                                                              key=lambda kv: -kv[1])},
        "top_ops": ops[:top],
    }
