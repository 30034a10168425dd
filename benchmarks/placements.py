"""Colocated against dedicated teacher ranks on the same hardware: one spawned process per
rank (gloo on CPU, NCCL on GPUs), each writing its timings for the parent to combine."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path

import torch

from benchmarks.batches import StaticBatches
from benchmarks.common import MemorySampler
from benchmarks.matrix import DTYPES, Config, parse_cell, result_row
from benchmarks.steps import TeacherBank, ds_config, fast_step, make_student
from benchmarks.timing import Phases, sync
from dmt.engine.distributed import free_port, skip_lone_allreduce
from dmt.engine.step_guard import StepGuard
from dmt.flops import PeakFlops, vit_shape
from dmt.losses import DistillationLoss


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
    bank = TeacherBank(cfg.teacher_arch, cfg.img_size, off_heap=not cuda)
    kind, t_ranks, m, batch = spec["kind"], spec["teacher_ranks"], spec["m"], spec["batch"]
    is_teacher = kind == "dedicated" and rank >= world - t_ranks
    dtype = DTYPES[cfg.precision]
    teachers = bank.fast(m, device, dtype, spec["choice"]["mode"], spec["choice"]["compile"],
                         spec["choice"].get("fp8", False)) \
        if (kind == "colocated" or is_teacher) else None
    method = DMT(None, teachers, DistillationLoss())
    placement = build_placement(kind, t_ranks, method, micro_batch=batch, device=device)
    total = cfg.warmup + cfg.steps
    student_dtype = dtype  # the engine's dtype: the trainer casts the student view to it

    def data(data_rank):  # static batches, the same on a student and its teacher
        return StaticBatches(batch, cfg.img_size, device, student_dtype, seed=1 + data_rank)

    if placement.role == "teacher":
        feeds = {s: data(r) for s, (r, _) in zip(placement.students, placement.data_shards)}
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        with (contextlib.nullcontext() if cuda else MemorySampler()) as mem:
            placement.serve(feeds, micro_batches=total)
        serve_s = time.perf_counter() - t0
        dist.barrier()
        memory = (torch.cuda.max_memory_allocated(device) if cuda else mem.peak) / 2**30
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"role": "teacher", "serve_s": serve_s, "peak_memory_gib": memory}, f)
        return
    dim = vit_shape(cfg.teacher_arch, cfg.img_size).width
    student = make_student(spec["student"], dim, cfg.img_size)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4, weight_decay=0.05, fused=True)
    n_students = placement.data_world_size
    engine, *_ = deepspeed.initialize(
        model=student, optimizer=optimizer, mpu=placement.mpu,
        config=ds_config(batch * n_students, cfg.precision, cfg.zero_stage, n_students))
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
                sync(device)
                dist.barrier(group=group)
                phases, start = Phases(device), time.perf_counter()
            b = next(batches)
            phases.start(0.0)
            fast_step(placement, method, engine, guard, b, phases)
        sync(device)
        wall = time.perf_counter() - start
    placement.close()
    dist.barrier()
    memory = (torch.cuda.max_memory_allocated(device) if cuda else mem.peak) / 2**30
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"role": "student", "wall_s": wall, "images": cfg.steps * batch,
                   "breakdown_ms": phases.summary_ms(), "peak_memory_gib": memory}, f)


def run_placements(cfg: Config, device, choice: dict, batch: int, peak: PeakFlops) -> list[dict]:
    """Same hardware, two placements: T teacher + S student ranks vs T+S colocated ranks."""
    import torch.multiprocessing as mp
    t_ranks, s_ranks = (int(x) for x in cfg.dedicated.split(":"))
    world = t_ranks + s_ranks
    student_arch, m = parse_cell(cfg.dedicated_cell)
    if device.type == "cuda" and torch.cuda.device_count() < world:
        cfg.notes.append(f"placement comparison skipped: needs {world} GPUs, "
                         f"{torch.cuda.device_count()} present")
        return []
    threads = max(1, (cfg.threads or os.cpu_count() or 1) // world) if device.type == "cpu" else 1
    rows = []
    for kind, tr in (("colocated", 0), ("dedicated", t_ranks)):
        holder = tempfile.TemporaryDirectory(prefix=f"dmt_bench_{kind}_")
        out_dir = holder.name
        port = free_port()
        spec = {"cfg": asdict(cfg), "device": device.type, "kind": kind, "teacher_ranks": tr,
                "m": m, "batch": batch, "student": student_arch, "choice": choice,
                "threads": threads}
        print(f"  {kind}: {world} processes ({tr} teacher ranks), {threads} thread(s) each",
              flush=True)
        mp.start_processes(placement_worker, args=(world, port, spec, out_dir), nprocs=world,
                           start_method="spawn", join=True)
        with holder:  # the ranks' reports, removed once read
            ranks = [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(world)]
        students = [r for r in ranks if r["role"] == "student"]
        teachers = [r for r in ranks if r["role"] == "teacher"]
        img_s = sum(r["images"] for r in students) / max(r["wall_s"] for r in students)
        result = {"images_per_s": img_s,
                  "step_ms": 1e3 * max(r["wall_s"] for r in students) / cfg.steps,
                  "breakdown_ms": {k: round(v, 3) for k, v in students[0]["breakdown_ms"].items()},
                  "peak_memory_gib": max(r["peak_memory_gib"] for r in students),
                  "memory_kind": "per student rank (max)"}
        row = result_row(cfg, student_arch, m, kind, "synthetic", "fast", batch, result, peak,
                   {"ranks": world, "teacher_ranks": tr, "student_ranks": world - tr,
                    "threads_per_rank": threads,
                    "images_per_s_per_rank": img_s / world,
                    # what sizes a teacher rank's GPU; serve_s spans warm-up and measured steps
                    "teacher_rank_peak_memory_gib":
                        max((r["peak_memory_gib"] for r in teachers), default=None),
                    "teacher_rank_serve_s": max((r["serve_s"] for r in teachers), default=None),
                    "targets_mb_per_image": vit_shape(cfg.teacher_arch, cfg.img_size).tokens
                    * vit_shape(cfg.teacher_arch, cfg.img_size).width * 2 / 1e6})
        if peak.flops:  # MFU over all ranks of the run
            row["mfu"] = row["achieved_tflops"] * 1e12 / (peak.flops * world)
        rows.append(row)
    return rows
