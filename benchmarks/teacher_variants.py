"""The teacher pass alone, per variant (reference, loop, stacked, compiled, FP8): the
evidence for the teacher path the matrix then runs."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from benchmarks.common import same_machine_error
from benchmarks.matrix import DTYPES, Config
from benchmarks.steps import TeacherBank
from benchmarks.timing import cleanup, sync
from dmt.flops import shape_flops, vit_shape
from dmt.losses import fuse_teachers, target_error


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

    def first_call(fn):
        """fn's result and the seconds its first call took (compilation, kernel choice)."""
        t0 = time.perf_counter()
        result = fn()
        sync(device)
        return result, time.perf_counter() - t0

    def timed(fn, label, m, first_s=None, **info):
        if first_s is None:
            _, first_s = first_call(fn)
        for _ in range(max(1, cfg.variant_steps // 3)):
            fn()
        sync(device)
        best = float("inf")
        for _ in range(cfg.variant_steps):
            t0 = time.perf_counter()
            fn()
            sync(device)
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
        ref = None  # the fp32 copies go before the fast variants are built
        baseline = None  # the plain loop's targets: what fp8 variants are compared with
        kinds = [("loop", False), ("stacked", False)]
        blocked = fp8_unavailable_reason(cfg, device)
        if blocked:
            out.append({"variant": "fp8", "teachers": m, "mode": "loop", "fp8": True,
                        "skipped": blocked})
            print(f"  teachers x{m} fp8 variants skipped: {blocked}", flush=True)
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
                    targets, first_s = first_call(lambda: fuse_teachers(fast(images)).float())
                    row = timed(lambda: fuse_teachers(fast(images)), label, m, first_s,
                                mode=mode, compile=compile_, fp8=fp8)
                    if baseline is None:
                        baseline = targets
                    elif fp8:
                        row.update(target_error(baseline, targets))
                        print(f"    vs {cfg.precision} loop: KL {row['target_kl']:.2e} nats/token,"
                              f" relative error {row['target_rel_error']:.3f}", flush=True)
                except Exception as err:  # noqa: BLE001 - a failed variant is a result too
                    print(f"  teachers x{m} {label}: failed: {str(err)[:200]}", flush=True)
                    out.append({"variant": label, "teachers": m, "mode": mode, "fp8": fp8,
                                "compile": compile_, "error": str(err)[:500]})
                fast = targets = None
                cleanup(device)
    return out


# What makes variants measured in another run stand for this one.
_SAME_FOR_VARIANTS = ("teacher_arch", "img_size", "precision", "reference_precision")


def variants_from(path: str, cfg: Config, machine: dict) -> list[dict]:
    """The teacher variants an earlier run measured (a GPU job split in parts: the compiled
    variants take minutes of their own), if it ran on this machine with these settings."""
    import json
    try:
        earlier = json.loads(Path(path).read_text())
        variants, config = earlier["teacher_variants"], earlier["config"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise SystemExit(f"--variants-from {path}: not a throughput result ({err})") from None
    if not variants:
        raise SystemExit(f"--variants-from {path}: that run measured no teacher variants")
    other = same_machine_error(earlier.get("machine", {}), machine)
    if other:
        raise SystemExit(f"--variants-from {path}: measured on another machine ({other})")
    for key in _SAME_FOR_VARIANTS:
        if config.get(key) != getattr(cfg, key):
            raise SystemExit(f"--variants-from {path}: measured with {key} {config.get(key)!r}, "
                             f"this run uses {getattr(cfg, key)!r}")
    return variants


def fp8_unavailable_reason(cfg: Config, device) -> str | None:
    from dmt.models.fp8 import fp8_unsupported
    if cfg.precision != "bf16":
        return f"fp8 teachers write bf16; this run's precision is {cfg.precision}"
    return fp8_unsupported(device)


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
        reason = fp8_unavailable_reason(cfg, torch.device(cfg.device))
        if reason:
            raise SystemExit(f"--teacher-fp8 on: {reason}")
    return {"mode": mode, "compile": compile_, "fp8": cfg.teacher_fp8, "why": why}
