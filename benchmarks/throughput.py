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

This file is the command line and the order of the parts; the parts live beside it:
matrix.py (presets, settings, result rows), steps.py (the fast and reference steps),
batches.py (data sources), timing.py (phases, measuring, micro-batch search),
teacher_variants.py (the teacher-path evidence), placements.py (multi-process
placements), profiling.py (torch.profiler by kind of kernel).
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
import traceback
from dataclasses import asdict, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dmt  # noqa: E402,F401  (before timm: CPU-torch torchvision fix)
import torch  # noqa: E402

from benchmarks.batches import make_batches  # noqa: E402
from benchmarks.common import (RESULTS_DIR, command_line, exclusive_output,  # noqa: E402
                               machine_description, partial_path, refuse_to_replace,
                               timestamp, write_json)
from benchmarks.matrix import (ALIASES, BATCH_CANDIDATES, DTYPES, PRESETS, SHORT,  # noqa: E402
                               Config, check_config, parse_cell, result_row)
from benchmarks.placements import run_placements  # noqa: E402
from benchmarks.steps import TeacherBank, build_fast, build_reference  # noqa: E402
from benchmarks.teacher_variants import (choose_teachers, fp8_unavailable_reason,  # noqa: E402
                                         teacher_variants, variants_from)
from benchmarks.timing import Phases, cleanup, release, run_path, run_path_auto  # noqa: E402
from dmt.flops import device_peak_flops, measure_matmul_flops  # noqa: E402


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
    p.add_argument("--variants-from", metavar="RESULT.json",
                   help="choose the teacher path from the variants an earlier run measured on "
                        "this machine (with --teacher-variants '')")
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
                   help="compile the student's forward+backward and the loss, as the "
                        "trainer's model.compile does")
    p.add_argument("--threads", type=int,
                   help="torch CPU threads (--preset cpu: 1, as each rank of the placement "
                        "comparison and the measured peak use; --preset gpu: torch's default)")
    p.add_argument("--out", help="JSON path (default benchmarks/results/"
                                 "throughput_<preset>_<device>.json)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the results already at --out (and an interrupted run's "
                        "OUT.partial); without it such a run is refused")
    a = p.parse_args(argv)
    preset = dict(PRESETS[a.preset])

    def csv(text, cast=str, flag=""):
        try:
            return [cast(x.strip()) for x in text.split(",") if x.strip() != ""]
        except ValueError:
            p.error(f"{flag}: expected a comma list of integers, got {text!r}")

    overrides = {
        "students": csv(a.students) if a.students is not None else None,
        "teacher_arch": a.teacher_arch,
        "teacher_counts": csv(a.teacher_counts, int, "--teacher-counts")
        if a.teacher_counts is not None else None,
        "img_size": a.img_size, "micro_batch": a.micro_batch, "steps": a.steps,
        "warmup": a.warmup, "precision": a.precision,
        "reference_precision": a.reference_precision, "zero_stage": a.zero_stage,
        "data": csv(a.data) if a.data is not None else None,
        "data_probe": csv(a.data_probe) if a.data_probe is not None else None,
        "probe_cell": a.probe_cell,
        "teacher_variants": csv(a.teacher_variants, int, "--teacher-variants")
        if a.teacher_variants is not None else None,
        "variant_compile": (a.variant_compile == "on") if a.variant_compile else None,
        "dedicated": a.dedicated, "dedicated_cell": a.dedicated_cell, "threads": a.threads,
        "profile": a.profile,
        "compile_student": (a.compile_student == "on") if a.compile_student else None,
    }
    preset.update({k: v for k, v in overrides.items() if v is not None})
    if a.students is not None:
        follow_students(preset, given={"profile": a.profile, "dedicated_cell": a.dedicated_cell,
                                       "probe_cell": a.probe_cell})
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        kind = torch.device(device).type
    except RuntimeError:
        kind = None
    if kind not in ("cpu", "cuda"):
        p.error(f"--device {device}: expected cpu, cuda or cuda:N")
    if kind == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {device}: CUDA is not available on this machine")
    cfg = Config(preset=a.preset, device=device, teacher_mode=a.teacher_mode,
                 teacher_compile=a.teacher_compile, teacher_fp8=a.teacher_fp8 == "on",
                 jpeg_path=a.jpeg_path, out=a.out, overwrite=a.overwrite,
                 variants_from=a.variants_from,
                 **preset)
    try:
        check_config(cfg)
    except ValueError as err:
        p.error(str(err))
    cfg.students = [ALIASES.get(s, s) for s in cfg.students]
    cfg.teacher_arch = ALIASES.get(cfg.teacher_arch, cfg.teacher_arch)
    return cfg


def follow_students(preset: dict, given: dict) -> None:
    """The preset's own cells (profile, placement, data probe) move to the last student of
    --students when theirs is not in it: a run of ViT-T alone must not also build and time
    a ViT-S for them. A cell given on the command line stays as given."""
    chosen = [ALIASES.get(x, x) for x in preset["students"]]
    for key, flag_value in given.items():
        cell = preset.get(key)
        if flag_value is None and cell and chosen:
            student, _, teachers = cell.partition(":")
            if ALIASES.get(student, student) not in chosen:
                preset[key] = f"{preset['students'][-1]}:{teachers}"


def profile_cell(cfg: Config, bank: TeacherBank, device, choice: dict, rows: list[dict],
                 fixed_batch: int | None, student_dtype) -> dict:
    """The fast step of one cell under torch.profiler, at the matrix's micro-batch."""
    from benchmarks.profiling import profile_steps
    student_arch, m = parse_cell(cfg.profile)
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
        release(keep)
    del step, keep, batches
    cleanup(device)
    for category, ms in result["by_category_ms"].items():
        print(f"  {category:<22} {ms:9.1f} ms/step", flush=True)
    if result["device_busy"] is not None:
        print(f"  GPU busy {100 * result['device_busy']:.0f}% of the step", flush=True)
    return {"student": student_arch, "teachers": m, "micro_batch": batch,
            "teacher_path": choice if m else None, **result}


def setup_single_process(device):
    import deepspeed
    deepspeed.utils.logger.setLevel(logging.WARNING)
    if "RANK" not in os.environ:
        from dmt.engine.distributed import free_port
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
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
    out = Path(cfg.out) if cfg.out else RESULTS_DIR / f"throughput_{cfg.preset}_{device.type}.json"
    with exclusive_output(out):
        refuse_to_replace(out, cfg.overwrite)
        partial_path(out).unlink(missing_ok=True)  # (replaced, with --overwrite): not this run's
        try:
            return measure(cfg, device, out)
        except KeyboardInterrupt:  # Ctrl-C: where the measured cells are, not a traceback
            print(f"interrupted; {_what_was_kept(out)}", file=sys.stderr)
            raise SystemExit(128 + signal.SIGINT) from None


def _what_was_kept(out: Path) -> str:
    partial = partial_path(out)
    kept = (f"what was measured is in {partial} (\"complete\": false)" if partial.exists()
            else "nothing was measured yet")
    return kept + (f"; {out} is unchanged" if out.exists() else "")


def measure(cfg: Config, device: torch.device, out: Path) -> Path:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    setup_single_process(device)
    started = time.perf_counter()
    dtype = DTYPES[cfg.precision]
    student_dtype = dtype  # the engine's dtype: the trainer casts the student view to it

    # Refusals before the peak measurement, which takes a while of its own.
    fixed_batch = None if cfg.micro_batch == "auto" else int(cfg.micro_batch)
    if fixed_batch is None and device.type != "cuda":
        raise SystemExit("--micro-batch auto needs a GPU")
    if cfg.teacher_fp8 and (reason := fp8_unavailable_reason(cfg, device)):
        raise SystemExit(f"--teacher-fp8 on: {reason}")
    variants = (variants_from(cfg.variants_from, cfg, machine_description(device))
                if cfg.variants_from else [])

    peak, matmul_rates = _peaks(device, dtype)
    # The reference's MFU is taken against the peak of the precision it runs in: on a CPU
    # a bf16 fast path's peak is a fraction of the fp32 reference's.
    ref_peak = (peak if cfg.reference_precision == cfg.precision else
                device_peak_flops(device, DTYPES[cfg.reference_precision], measure_if_unknown=True))
    choice, rows, profile, placement_rows = None, [], None, []
    failed_cells = []  # cells that raised (out of memory at a fixed micro-batch, say)

    partial = partial_path(out)

    def save(complete: bool = False) -> dict:
        """Written after every part to OUT.partial, so a run cut short keeps what it
        measured without replacing the last complete result; renamed to OUT at the end."""
        payload = {
            "benchmark": "throughput", "preset": cfg.preset, "command": command_line(),
            "timestamp": timestamp(), "wall_s": round(time.perf_counter() - started, 1),
            "complete": complete, "machine": machine_description(device),
            "peak_flops": {"flops": peak.flops, "source": peak.source, "dtype": cfg.precision},
            "reference_peak_flops": {"flops": ref_peak.flops, "source": ref_peak.source,
                                     "dtype": cfg.reference_precision},
            "matmul_rates": matmul_rates,
            "config": {k: v for k, v in asdict(cfg).items() if k not in ("notes", "overwrite")},
            "teacher_variants": variants, "teacher_choice": choice,
            "rows": rows, "failed_cells": failed_cells, "placement_rows": placement_rows,
            "profile": profile,
            "notes": cfg.notes + _notes(cfg, device, matmul_rates),
        }
        write_json(partial, payload)
        if complete:
            partial.replace(out)
        return payload

    bank = TeacherBank(cfg.teacher_arch, cfg.img_size, off_heap=device.type == "cpu")

    # --- 1. teacher variants (evidence for loop / stacked / compile on this device)
    if cfg.variants_from:
        print(f"teacher variants from {cfg.variants_from} ({len(variants)})", flush=True)
    elif cfg.teacher_variants:
        vbatch = fixed_batch or 256
        print(f"teacher variants ({cfg.teacher_arch}, batch {vbatch}):", flush=True)
        variants = teacher_variants(cfg, bank, device, vbatch)
    choice = choose_teachers(cfg, variants)
    print(f"teacher path for the matrix: {choice}", flush=True)
    save()

    # --- 2. the matrix
    cells = [(s, m, src) for src in cfg.data for s in cfg.students for m in cfg.teacher_counts]
    if cfg.data_probe:
        ps, pm = parse_cell(cfg.probe_cell)
        cells += [(ps, pm, src) for src in cfg.data_probe if src not in cfg.data]
    for student_arch, m, source in cells:
        label = f"{SHORT.get(student_arch, student_arch)} + {m} x {SHORT.get(cfg.teacher_arch)}"
        print(f"{label}, data {source}:", flush=True)
        failed = None
        try:
            rows.extend(measure_cell(cfg, bank, device, choice, student_arch, m, source,
                                     fixed_batch, peak, ref_peak))
        except Exception as err:  # noqa: BLE001  (one cell failing is a result; the rest run)
            traceback.print_exc()
            failed = f"{type(err).__name__}: {str(err)[:500]}"
        if failed:  # (out of the except: its traceback no longer holds the cell's tensors)
            print(f"  failed: {failed[:300]}", flush=True)
            failed_cells.append({"student": student_arch, "teachers": m, "data": source,
                                 "error": failed})
            cleanup(device)
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
                                      if (r["student"], r["teachers"]) == parse_cell(cfg.dedicated_cell)
                                      and r["path"] == "fast"), 64)
        placement_rows.extend(run_placements(cfg, device, choice, pbatch, peak))

    payload = save(complete=True)
    print_table(payload)
    print(f"wrote {out} ({payload['wall_s']} s)")
    if failed_cells:
        raise SystemExit(f"{len(failed_cells)} cell(s) failed, listed in {out} (failed_cells): "
                         + "; ".join(f"{SHORT.get(c['student'], c['student'])} + {c['teachers']}"
                                     f" ({c['data']}): {c['error'][:120]}" for c in failed_cells))
    return out


def _peaks(device: torch.device, dtype: torch.dtype) -> tuple:
    """The peak FLOP/s MFU is measured against (the data sheet on known GPUs, a measured
    matmul elsewhere) and, on CPUs, the measured matmul rate of each precision."""
    peak = device_peak_flops(device, dtype, measure_if_unknown=True)
    matmul_rates = {}
    if device.type == "cpu":
        for name in ("fp32", "bf16", "fp16"):
            rate, size = measure_matmul_flops(device, DTYPES[name], size=512, repeats=2,
                                              min_seconds=0.1)
            matmul_rates[name] = {"gflops": round(rate / 1e9, 2), "size": size}
    print(f"peak: {peak.source} = {peak.flops / 1e12 if peak.flops else float('nan'):.3f} "
          f"TFLOP/s", flush=True)
    return peak, matmul_rates


def measure_cell(cfg: Config, bank: TeacherBank, device: torch.device, choice: dict,
                 student_arch: str, m: int, source: str, fixed_batch: int | None,
                 peak, ref_peak) -> list[dict]:
    """One cell of the matrix: dmt's fast step and the reference step on the same data,
    each at the largest micro-batch that fits (auto) or at `fixed_batch`."""
    student_dtype = DTYPES[cfg.precision]  # the engine's: the trainer casts the view to it

    def fast_builder(batch):
        return build_fast(cfg, bank, student_arch, m, batch, device, choice)

    def ref_builder(batch):
        return build_reference(cfg, bank, student_arch, m, batch, device)

    if fixed_batch is None:
        candidates = BATCH_CANDIDATES
        if (m and choice["compile"]) or cfg.compile_student:
            # Find the batch eagerly (one step each): a compiled teacher or student would
            # recompile for every candidate, including those that then run out of memory.
            eager_cfg = replace(cfg, compile_student=False)

            def eager_builder(batch):
                return build_fast(eager_cfg, bank, student_arch, m, batch, device,
                                  dict(choice, compile=False))
            fit, _ = run_path_auto(eager_builder, eager_cfg, source, device, student_dtype,
                                   candidates, steps=1, warmup=1)
            # One size above: compiled code often needs less activation memory. With
            # CUDA graphs one size below: their private memory pool is not shared with
            # the student, and running out of memory while a graph is captured can
            # leave the CUDA context unusable rather than raise a catchable OOM.
            graphs = bool(m) and choice["compile"] in ("reduce-overhead", "max-autotune")
            i = BATCH_CANDIDATES.index(fit)
            candidates = BATCH_CANDIDATES[min(i + 1, len(BATCH_CANDIDATES) - 1)
                                          if graphs else max(0, i - 1):]
        batch, fast = run_path_auto(fast_builder, cfg, source, device, student_dtype,
                                    candidates)
        ref_batch, ref = run_path_auto(ref_builder, cfg, source, device, torch.float32,
                                       [b for b in BATCH_CANDIDATES if b <= batch])
    else:
        batch = ref_batch = fixed_batch
        fast = run_path(fast_builder, cfg, source, batch, device, student_dtype)
        ref = run_path(ref_builder, cfg, source, batch, device, torch.float32)
    speedup = fast["images_per_s"] / ref["images_per_s"]
    print(f"  fast {fast['images_per_s']:.1f} img/s, reference {ref['images_per_s']:.1f} "
          f"img/s (batch {batch}/{ref_batch}): {speedup:.2f}x", flush=True)
    return [result_row(cfg, student_arch, m, "colocated", source, "fast", batch, fast, peak,
                       {"speedup_vs_reference": speedup, "teacher_path": choice if m else None}),
            result_row(cfg, student_arch, m, "colocated", source, "reference", ref_batch, ref,
                       ref_peak)]


def _notes(cfg: Config, device, matmul_rates: dict) -> list[str]:
    notes = ["MFU counts matmul FLOPs only (dmt.flops): student step = 3 x forward, teachers "
             "forward only; nothing is credited for recomputation."]
    if device.type == "cuda":
        notes.append("GPU: 'data ms' is host time waiting for the next batch; GPU work a "
                     "device-side loader queues (decode, crop, jitter) runs on the step's "
                     "stream and shows in the other phases. Memory is "
                     "torch.cuda.max_memory_allocated, reset per path.")
    if device.type == "cpu":
        notes.append(f"CPU: the peak is a measured {cfg.precision} matmul rate (the reference's "
                     f"MFU: {cfg.reference_precision}), not a data-sheet figure; "
                     "memory is the peak of allocated host bytes (glibc), which includes the "
                     "interpreter and libraries. CPU timings say nothing about GPU speed.")
        fp32 = matmul_rates.get("fp32", {}).get("gflops", 0)
        half = max((matmul_rates[k]["gflops"] for k in ("bf16", "fp16") if k in matmul_rates),
                   default=0)
        if cfg.reference_precision == "fp32" and half and fp32 / half >= 2:
            notes.append(f"CPU reference runs fp32 without autocast: fp16/bf16 matmuls are "
                         f"{fp32 / half:.0f}x slower than fp32 on this CPU (matmul_rates), so "
                         "the GPU recipe's fp16 autocast would only measure that.")
    return notes


if __name__ == "__main__":
    main()
