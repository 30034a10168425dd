"""The DeepSpeed JSON a run uses: a ds_configs/ file, checked for settings that would bypass
dmt's own machinery, with the batch arithmetic and clipping filled in from the YAML."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from dmt.config import resolve_path
from dmt.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]


def read_ds_config(file: Path) -> dict:
    """The file's JSON object; refuses what would bypass dmt (its optimizer and schedule,
    its skipping of non-finite steps) and fp16 without a GPU."""
    if not file.is_file():
        raise ConfigError(f"DeepSpeed config not found: {file}")
    try:
        ds = json.loads(file.read_text())
    except ValueError as err:
        raise ConfigError(f"DeepSpeed config {file} is not valid JSON: {err}") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"DeepSpeed config {file} must hold a JSON object")
    for key in ("zero_optimization", "bf16", "fp16", "torch_autocast"):
        if not isinstance(ds.get(key, {}), dict):
            raise ConfigError(f"{file}: '{key}' must be a JSON object, got {ds[key]!r}")
    for key in ("optimizer", "scheduler"):
        if key in ds:  # dmt owns these: client AdamW + the per-step schedule
            raise ConfigError(f"{file}: remove the '{key}' section; dmt configures it from "
                              "the 'optim' section of the experiment YAML")
    # The skip flag of non-finite steps lives on dmt's client optimizer (StepGuard) and
    # DeepSpeed's gradient overflow check covers what the guard does not see.
    zero = ds.get("zero_optimization", {})
    refused = {
        "torch_autocast.enabled": ds.get("torch_autocast", {}).get("enabled", False),
        "zero_optimization.offload_optimizer": zero.get("offload_optimizer", {}).get(
            "device", "none") not in ("none", None),
        "bf16.check_grad_overflow=false": ds.get("bf16", {}).get("check_grad_overflow", True)
        is False,
        # ZeRO-1/2 in fp32 find non-finite gradients only through the norm they compute
        "zero_optimization.compute_grad_norm=false": zero.get("compute_grad_norm", True) is False,
    }
    for key, present in refused.items():
        if present:
            raise ConfigError(f"{file}: dmt does not support {key}: it would bypass the "
                              "skipping of non-finite steps (dmt/engine/step_guard.py)")
    if ds.get("fp16", {}).get("enabled") and not torch.cuda.is_available():
        raise ConfigError(f"{file}: fp16 training needs a GPU (DeepSpeed has no fp16 on CPU); "
                          "use ds_configs/cpu_fp32.json or a bf16/fp32 config")
    return ds


def add_runtime_settings(ds: dict, data_ranks: int) -> dict:
    """What dmt sets whatever the file (unless the file says otherwise): no per-step GPU
    synchronisation it does not need."""
    ds.setdefault("zero_allow_untested_optimizer", True)
    # DeepSpeed's throughput timer synchronises the GPU twice per micro-batch by default;
    # dmt measures images/s per log window itself.
    ds.setdefault("timers", {"throughput": {"enabled": False}})
    # overlap_comm reduces gradients on a side stream, and ZeRO-1/2 then synchronise the GPU
    # after every backward. It pays only with several data-parallel ranks on GPUs: with one
    # there is nothing to reduce, and on CPU no stream to overlap with.
    if "zero_optimization" in ds and (not torch.cuda.is_available() or data_ranks == 1):
        ds["zero_optimization"]["overlap_comm"] = False
    return ds


def deepspeed_config(cfg: dict, accum: int, path: str | None = None) -> dict:
    """The run's DeepSpeed config: deepspeed.config (or `path`) with the YAML's batch
    arithmetic and clipping."""
    file = resolve_path(path or cfg["deepspeed"]["config"], REPO_ROOT)
    if not file.is_file():
        raise ConfigError(f"deepspeed.config file not found: {file}")
    ds = read_ds_config(file)
    # The YAML owns the batch arithmetic and clipping: a file that says otherwise is refused
    # rather than silently overwritten.
    optim_cfg = cfg["optim"]
    owned = {"train_batch_size": (optim_cfg["global_batch"], "optim.global_batch"),
             "train_micro_batch_size_per_gpu": (optim_cfg["micro_batch"], "optim.micro_batch"),
             "gradient_accumulation_steps": (accum, "the batch arithmetic"),
             "gradient_clipping": (float(optim_cfg["clip_grad"] or 0.0), "optim.clip_grad")}
    for key, (value, source) in owned.items():
        if key in ds and ds[key] != value:
            raise ConfigError(f"{file}: {key}={ds[key]} disagrees with {source} ({value}); "
                              f"dmt sets it from the experiment YAML: remove it from the file")
        ds[key] = value
    data_ranks = optim_cfg["global_batch"] // (optim_cfg["micro_batch"] * accum)
    _check_with_deepspeed(ds, file)
    return add_runtime_settings(ds, data_ranks)


def _check_with_deepspeed(ds: dict, file: Path) -> None:
    """DeepSpeed's own validation of the file's values (a ZeRO stage 7, say), which would
    otherwise fail as a pydantic traceback once the teachers are built. train_batch_size
    is left out: DeepSpeed would check it against this process's world size."""
    from deepspeed.runtime.config import DeepSpeedConfig, DeepSpeedConfigError
    try:
        DeepSpeedConfig({k: v for k, v in ds.items() if k != "train_batch_size"})
    except (ValueError, TypeError, AssertionError, DeepSpeedConfigError) as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()
                 and "errors.pydantic.dev" not in line]
        raise ConfigError(f"{file}: DeepSpeed refuses it: {' '.join(lines[:4])}") from None
