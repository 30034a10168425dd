#!/usr/bin/env python
"""How far FP8 teacher matmuls move the distillation targets, on your teachers and data.

    python launch/check_fp8.py --config configs/dmt_vit_small.yaml data.path=/data/imagenet/train
    python launch/check_fp8.py --config configs/demo.yaml --batches 2 teacher_runtime.dtype=bfloat16

Builds the configured teachers twice (bf16, and bf16 with FP8 block linears), runs a few
batches of the configured data through both, and reports per batch: the KL between the
per-token channel softmaxes of the fused targets (what TFD compares), their relative
error, and how much the DMT loss of a freshly initialised student moves, next to the
loss's batch-to-batch spread. Trained checkpoints have outlier channels that random
teachers lack: run this before turning teacher_runtime.fp8 on for a long run.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dmt  # noqa: E402,F401
import torch  # noqa: E402

from dmt.build import (build_data, build_method, build_student, build_teachers,  # noqa: E402
                       check_models, uses_sample_images)
from dmt.config import check_files, load_config  # noqa: E402
from dmt.data import write_sample_images  # noqa: E402
from dmt.errors import DMTError  # noqa: E402
from dmt.losses import target_error  # noqa: E402
from dmt.models.fast import optimize_teachers  # noqa: E402


def _data_path(cfg: dict, scratch: Path) -> str | None:
    if not uses_sample_images(cfg):
        return cfg["data"]["path"]
    write_sample_images(scratch, num_images=cfg["data"]["sample_images"], seed=cfg["run"]["seed"])
    return str(scratch)


def check(cfg: dict, batches: int, device: torch.device) -> dict:
    bf16 = optimize_teachers(build_teachers(cfg, device), torch.bfloat16, stack="never")
    fp8 = optimize_teachers(build_teachers(cfg, device), torch.bfloat16, stack="never", fp8=True)
    torch.manual_seed(cfg["run"]["seed"])
    method = build_method(cfg, build_student(cfg, bf16.embed_dim).to(device), bf16)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        loader = build_data(cfg, _data_path(cfg, Path(scratch)), device, probe_cache="off")
        for i, batch in enumerate(loader):
            if i == batches:
                break
            teacher_view = batch["teacher"].to(device)
            student = {"student": batch["student"].to(device)}
            with torch.no_grad():
                reference = method.teacher_targets(teacher_view)
                method.teachers = fp8
                approx = method.teacher_targets(teacher_view)
                method.teachers = bf16
                loss_ref = method(student, targets=reference)["loss"].item()
                loss_fp8 = method(student, targets=approx)["loss"].item()
            rows.append({"batch": i, **target_error(reference, approx),
                         "loss_bf16": loss_ref, "loss_fp8": loss_fp8})
            print(f"batch {i}: target KL {rows[-1]['target_kl']:.2e} nats/token, relative "
                  f"error {rows[-1]['target_rel_error']:.3f}, loss {loss_ref:.4f} -> "
                  f"{loss_fp8:.4f}", flush=True)
    if not rows:
        raise DMTError("the data gave no batch: check data.path and optim.micro_batch")
    losses = torch.tensor([r["loss_bf16"] for r in rows])
    shifts = [abs(r["loss_fp8"] - r["loss_bf16"]) for r in rows]
    return {"device": str(device), "teachers": bf16.names, "batches": rows,
            "max_target_kl": max(r["target_kl"] for r in rows),
            "max_loss_shift": max(shifts),
            "loss_spread_between_batches": losses.std().item() if len(rows) > 1 else None}


def _device(parser: argparse.ArgumentParser, name: str | None) -> torch.device:
    """--device, or the GPU when there is one; one usage line for a name torch does not
    know or a GPU this machine lacks."""
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        parser.error(f"--device {name}: expected cpu, cuda or cuda:N")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device {name}: expected cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {name}: CUDA is not available on this machine")
    return device


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="experiment YAML (teachers, data)")
    p.add_argument("--batches", type=int, default=4, help="batches to compare (default 4)")
    p.add_argument("--device", help="cuda or cpu (default: cuda if available)")
    p.add_argument("--out", help="write the report as JSON here")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.path=/data")
    args = p.parse_intermixed_args(argv)  # overrides before or after the options
    if args.batches < 1:
        p.error(f"--batches must be at least 1, got {args.batches}")
    device = _device(p, args.device)
    if args.out and (Path(args.out).is_dir() or not Path(args.out).parent.is_dir()):
        p.error(f"--out {args.out}: not a file in an existing folder")  # before the work
    try:
        cfg = load_config(args.config, args.overrides)
        check_files(cfg)
        check_models(cfg)
        report = check(cfg, args.batches, device)
    except DMTError as err:
        print(f"dmt check_fp8: error: {err}", file=sys.stderr)
        return 2
    spread = report["loss_spread_between_batches"]
    print(f"max target KL {report['max_target_kl']:.2e} nats/token; max loss shift "
          f"{report['max_loss_shift']:.4f}" + (f" vs batch-to-batch spread {spread:.4f}"
                                               if spread is not None else ""))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
