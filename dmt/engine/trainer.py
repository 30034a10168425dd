"""The training loop: a DeepSpeed student engine, frozen teachers beside it or on their own
ranks ("dedicated" placement, which stream the fused targets to the students).

One optimizer step = `accum` micro-batches per student rank x student ranks = global batch.
The loop is iteration-based; the trainer state (epoch, step in epoch, global step) plus the
deterministic data order is all `--resume auto` needs to continue exactly.
"""
from __future__ import annotations

import json
import resource
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

from dmt.build import DTYPES, build_method, build_student, build_teachers
from dmt.config import batch_arithmetic, dump_config, resolve_path, student_ranks
from dmt.data import build_loader, write_sample_images
from dmt.engine import checkpoint as ckpt
from dmt.engine.distributed import DistInfo, any_rank, barrier, skip_lone_allreduce
from dmt.engine.logger import RunLogger
from dmt.engine.optim import build_optimizer, lr_at, peak_lr, set_hyperparameters
from dmt.engine.runlock import ExclusiveLock, LockBusy
from dmt.engine.step_guard import NONFINITE_GRADIENTS, NONFINITE_TOKENS, StepGuard
from dmt.engine.stop import StopRequest
from dmt.errors import ConfigError, DataError, DMTError
from dmt.models.fast import optimize_teachers
from dmt.placement import build_placement

REPO_ROOT = Path(__file__).resolve().parents[2]


def deepspeed_config(cfg: dict, accum: int, path: str | None = None) -> dict:
    """The ds_configs/ file with the batch arithmetic and clipping filled in from the YAML."""
    file = resolve_path(path or cfg["deepspeed"]["config"], REPO_ROOT)
    if not file.is_file():
        raise ConfigError(f"DeepSpeed config not found: {file}")
    try:
        ds = json.loads(file.read_text())
    except ValueError as err:
        raise ConfigError(f"DeepSpeed config {file} is not valid JSON: {err}") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"DeepSpeed config {file} must hold a JSON object")
    for key in ("optimizer", "scheduler"):
        if key in ds:  # dmt owns these: client AdamW + the per-step schedule below
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
    cuda = torch.cuda.is_available()
    if ds.get("fp16", {}).get("enabled") and not cuda:
        raise ConfigError(f"{file}: fp16 training needs a GPU (DeepSpeed has no fp16 on CPU); "
                          "use ds_configs/cpu_fp32.json or a bf16/fp32 config")
    # The YAML owns the batch arithmetic and clipping: a file that says otherwise is refused
    # rather than silently overwritten.
    owned = {"train_batch_size": (cfg["optim"]["global_batch"], "optim.global_batch"),
             "train_micro_batch_size_per_gpu": (cfg["optim"]["micro_batch"], "optim.micro_batch"),
             "gradient_accumulation_steps": (accum, "the batch arithmetic"),
             "gradient_clipping": (float(cfg["optim"]["clip_grad"] or 0.0), "optim.clip_grad")}
    for key, (value, source) in owned.items():
        if key in ds and ds[key] != value:
            raise ConfigError(f"{file}: {key}={ds[key]} disagrees with {source} ({value}); "
                              f"dmt sets it from the experiment YAML: remove it from the file")
        ds[key] = value
    ds.setdefault("zero_allow_untested_optimizer", True)
    # DeepSpeed's throughput timer synchronises the GPU twice per micro-batch by default;
    # dmt measures images/s per log window itself.
    ds.setdefault("timers", {"throughput": {"enabled": False}})
    # overlap_comm reduces gradients on a side stream, and ZeRO-1/2 then synchronise the GPU
    # after every backward. It pays only with several data-parallel ranks on GPUs: with one
    # there is nothing to reduce, and on CPU no stream to overlap with.
    data_ranks = cfg["optim"]["global_batch"] // (cfg["optim"]["micro_batch"] * accum)
    if "zero_optimization" in ds and (not cuda or data_ranks == 1):
        ds["zero_optimization"]["overlap_comm"] = False
    return ds


def _engine_dtype(engine) -> torch.dtype:
    if engine.bfloat16_enabled():
        return torch.bfloat16
    return torch.float16 if engine.fp16_enabled() else torch.float32


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (RSS)


def _digest(indices: list[torch.Tensor]) -> int:
    """A fingerprint of the samples a step consumed (tests compare sample orders with it)."""
    idx = torch.cat(indices).long()
    weights = torch.arange(1, idx.numel() + 1, dtype=torch.long)
    return int(((idx + 1) * weights).sum() % 2_147_483_647)


def _prepare_data_path(cfg: dict, run_dir: Path, info: DistInfo) -> str | None:
    data = cfg["data"]
    if data["path"] is not None or data["backend"] == "synthetic":
        return data["path"]
    folder, marker = run_dir / "sample_images", run_dir / "sample_images" / ".complete"
    wanted = f"{data['sample_images']} images, seed {cfg['run']['seed']}"
    if info.is_main and not (marker.exists() and marker.read_text() == wanted):
        shutil.rmtree(folder, ignore_errors=True)
        write_sample_images(folder, num_images=data["sample_images"], seed=cfg["run"]["seed"])
        marker.write_text(wanted)
    barrier()
    return str(folder)


def micro_batches(loader, state: dict, steps_per_epoch: int, accum: int,
                  total_steps: int) -> Iterator[dict]:
    """The micro-batches of the run from `state` on, epoch after epoch. Student ranks and
    the teacher ranks that serve them walk this same sequence."""
    epoch, step_in_epoch, step = state["epoch"], state["step_in_epoch"], state["global_step"]
    while step < total_steps:
        loader.set_epoch(epoch, start_batch=step_in_epoch * accum)
        batches = iter(loader)
        for _ in range(step_in_epoch, steps_per_epoch):
            if step >= total_steps:
                return
            for _ in range(accum):
                yield next(batches)
            step += 1
        epoch, step_in_epoch = epoch + 1, 0


@dataclass(frozen=True)
class Launch:
    """What a launch settled before building anything: its run directory, batch
    arithmetic, DeepSpeed config, and the checkpoint it resumes (if any)."""
    run_dir: Path
    dp_world: int
    accum: int
    ds_config: dict
    resume: str | None
    resume_from: Path | None
    saved: dict | None  # the checkpoint's trainer state
    teacher_files: dict


def prepare_launch(cfg: dict, info: DistInfo, resume: str | None) -> Launch:
    """Which checkpoint, if any, is settled before anything is built or written: a refused
    launch leaves the run directory as it was."""
    optim_cfg = cfg["optim"]
    dp_world = student_ranks(cfg, info.world_size)
    accum = batch_arithmetic(optim_cfg["global_batch"], optim_cfg["micro_batch"], dp_world)
    run_dir = Path(cfg["run"]["output_dir"]) / cfg["run"]["name"]
    ds_config = deepspeed_config(cfg, accum)
    if not resume and ((run_dir / "checkpoints" / ckpt.LATEST).exists()
                       or ckpt.complete_checkpoints(run_dir)):
        raise ConfigError(f"{run_dir} already holds checkpoints: pass --resume auto to continue "
                          "that run, or choose another run.name / run.output_dir")
    resume_from = ckpt.find_checkpoint(resume, run_dir) if resume else None
    teacher_files = ckpt.teacher_files(cfg, REPO_ROOT)
    saved = None
    if resume_from is not None:
        saved = ckpt.read_trainer_state(resume_from)
        ckpt.check_compatible(saved["config"], cfg, resume_from)
        ckpt.check_same_teacher_files(saved, teacher_files, resume_from)
        ckpt.check_loadable(resume_from, dp_world, saved)
    return Launch(run_dir, dp_world, accum, ds_config, resume, resume_from, saved, teacher_files)


def train(cfg: dict, info: DistInfo, resume: str | None = None) -> dict:
    launch = prepare_launch(cfg, info, resume)
    run_lock = _lock_run(launch.run_dir, info)
    try:  # also when training fails: an in-process caller may launch the run again
        return _train(cfg, info, launch, run_lock)
    finally:
        if run_lock is not None:
            run_lock.release()


def _train(cfg: dict, info: DistInfo, launch: Launch, run_lock: ExclusiveLock | None) -> dict:
    run_cfg, optim_cfg, runtime = cfg["run"], cfg["optim"], cfg["teacher_runtime"]
    run_dir, dp_world, accum, ds_config = (launch.run_dir, launch.dp_world, launch.accum,
                                           launch.ds_config)
    resume, resume_from, saved = launch.resume, launch.resume_from, launch.saved
    teacher_files = launch.teacher_files
    log = RunLogger(run_dir, 0, info.is_main, False, False, metrics=False)  # until the bar exists
    if run_lock is not None and run_lock.unsupported:
        log.warn(f"the run directory could not be locked ({run_lock.unsupported}): make sure "
                 "no other launch uses the same run.name")
    torch.manual_seed(run_cfg["seed"] + info.rank)

    # --- models: frozen half-precision teachers outside the engine, the student inside it
    if runtime["placement"] == "dedicated" and info.rank < dp_world:
        # A dedicated student rank receives fused targets: it needs the teachers' shapes only.
        teachers = build_teachers(cfg, info.device, warn=log.warn, shapes_only=True)
    else:
        teachers = optimize_teachers(build_teachers(cfg, info.device, warn=log.warn),
                                     DTYPES[runtime["dtype"]], compile=runtime["compile"],
                                     stack=runtime["stack"], fp8=runtime["fp8"])
    student = build_student(cfg, teachers.embed_dim)
    method = build_method(cfg, student, teachers)  # refuses mismatched token grids
    placement = build_placement(runtime["placement"], runtime["teacher_ranks"], method,
                                micro_batch=optim_cfg["micro_batch"], device=info.device,
                                transfer_dtype=DTYPES[runtime["transfer_dtype"]],
                                prefetch=runtime["prefetch"])

    # --- data: each student rank reads its own shard of the (seed, epoch) order
    data, data_path = cfg["data"], _prepare_data_path(cfg, run_dir, info)

    def loader_for(rank: int, world_size: int):
        return build_loader(data["backend"], data_path, optim_cfg["micro_batch"],
                            image_size=cfg["model"]["img_size"],
                            crop_scale=tuple(data["crop_scale"]),
                            color_jitter=tuple(data["color_jitter"]), seed=run_cfg["seed"],
                            rank=rank, world_size=world_size, device=str(info.device),
                            num_workers=data["num_workers"],
                            probe_cache=data["probe_cache"])  # ImageNet statistics

    shards = (placement.data_shards if placement.role == "teacher"
              else [(placement.data_rank, placement.data_world_size)])
    try:
        loaders = [loader_for(r, w) for r, w in shards]
    except DataError as err:  # name the run's data and batch, which the loader cannot know
        raise DataError(f"data.path {data_path} (backend {data['backend']}, optim.global_batch "
                        f"{optim_cfg['global_batch']}): {err}") from None
    if resume_from is not None:
        ckpt.check_same_samples(saved, loaders[0].num_samples, data_path, resume_from)
    steps_per_epoch = len(loaders[0]) // accum
    if steps_per_epoch == 0:
        raise ConfigError(f"one epoch gives {len(loaders[0])} micro-batches per rank, fewer than "
                          f"the {accum} one optimizer step needs (global batch "
                          f"{optim_cfg['global_batch']} > {loaders[0].num_samples} samples?)")
    schedule_steps = run_cfg["epochs"] * steps_per_epoch
    # max_steps stops early (smoke runs, tests); the lr schedule still spans run.epochs.
    total_steps = min(schedule_steps, run_cfg["max_steps"] or schedule_steps)

    # nonfinite_streak: called-off steps in a row, carried across a resume
    state = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "nonfinite_total": 0,
             "nonfinite_streak": 0}
    if resume_from is not None:
        state.update({k: v for k, v in saved.items() if k in state})

    if placement.role == "teacher":
        # DeepSpeed all-reduces the tag's hash at each save unless tag validation is off.
        validates_tags = ds_config.get("checkpoint", {}).get("tag_validation", "Warn").lower() != "ignore"
        _serve_targets(placement, loaders, state, steps_per_epoch, accum, total_steps, run_cfg,
                       validates_tags)
        return {"run_dir": run_dir, "role": "teacher", **state}

    # --- the student engine, confined to the student ranks by the placement's mpu
    client_optimizer = build_optimizer(student, optim_cfg)
    engine, _, _, _ = deepspeed.initialize(model=student, optimizer=client_optimizer,
                                                   config=ds_config,
                                                   mpu=placement.mpu)
    method.student = engine
    group = placement.mpu.get_data_parallel_group() if placement.mpu else None
    guard = StepGuard.for_engine(engine, client_optimizer, info.device, group)  # non-finite steps
    skip_lone_allreduce(engine, group)
    if resume_from is not None:
        # Each rank loads its own ZeRO partition: one rank's damaged file stops them all.
        without_rng = ckpt.load_checkpoint(engine, resume_from, info.rank, group)
        # The optimizer state restores the saved weight decay and betas: the config rules.
        set_hyperparameters(client_optimizer, optim_cfg)
    if info.is_main and state["global_step"] < total_steps:
        # the run's config, once it has passed every check (a complete run keeps its own)
        ckpt.write_atomic(run_dir / "config.yaml", dump_config(cfg).encode())
    log.close()
    log = RunLogger(run_dir, total_steps, info.is_main, run_cfg["progress"],
                    run_cfg["tensorboard"], start_step=state["global_step"])
    execution = (teachers.describe() if runtime["placement"] == "colocated"
                 else f"{runtime['teacher_ranks']} teacher rank(s)")
    log.info(f"run {run_dir}: {total_steps} steps, {steps_per_epoch} per epoch, global batch "
             f"{optim_cfg['global_batch']} = {optim_cfg['micro_batch']} x {accum} accumulation x "
             f"{dp_world} student rank(s); teachers {teachers.names} ({runtime['placement']}: "
             f"{execution}); student {cfg['model']['arch']}; data {data['backend']} "
             f"{data_path} ({loaders[0].num_samples} samples)")
    if runtime["placement"] == "dedicated":
        log.info(f"dedicated teacher ranks: SIGTERM and Ctrl-C stop the run at once, without a "
                 f"checkpoint; checkpoints come every {run_cfg['checkpoint_every']} steps "
                 "(run.checkpoint_every)")
    if resume_from is not None:
        log.info(f"resumed from {resume_from} at step {state['global_step']} "
                 f"(epoch {state['epoch']}, step {state['step_in_epoch']} of the epoch)")
        if not (run_dir / "checkpoints" / ckpt.LATEST).is_file() and resume == "auto":
            log.warn(f"{run_dir / 'checkpoints' / ckpt.LATEST} was missing (a save cut short "
                     f"before its last step?): resumed from the newest complete checkpoint")
        for change in ckpt.changed_settings(saved["config"], cfg):
            log.info(f"changed since the checkpoint, applied from this step on: {change}")
        _warn_if_schedule_moved(saved["config"], cfg, state["global_step"], steps_per_epoch, log)
        if without_rng:  # the data order does not depend on it; drop-path and dropout do
            log.warn(f"{without_rng} of {dp_world} student rank(s) found no rng_rank<r>.pt "
                     f"in {resume_from}: their random state starts again from the seed, "
                     "so the run does not repeat an uninterrupted one exactly")
        if state["global_step"] >= total_steps:
            log.info(f"{run_dir} is already complete ({state['global_step']}/{total_steps} "
                     "steps): nothing to train. Raise run.epochs / run.max_steps to go on, or "
                     "set another run.name for a new run.")
    elif resume:
        log.info(f"--resume {resume}: no checkpoint in {run_dir} yet, starting fresh")

    loader = loaders[0]
    batches = micro_batches(loader, state, steps_per_epoch, accum, total_steps)
    student_dtype = _engine_dtype(engine)
    peak, pending, last_ckpt = peak_lr(optim_cfg), [], resume_from
    window_start, train_start, start_step = time.perf_counter(), time.perf_counter(), state["global_step"]
    skipped_reported = 0  # files a backend rejected up front are reported with epoch 0
    # SIGTERM / Ctrl-C: checkpoint at the end of the log window, then stop. A dedicated
    # teacher rank serves a fixed schedule, so there signals keep their default action.
    stop = (StopRequest(announce=info.is_main).install() if runtime["placement"] == "colocated"
            else StopRequest())
    stopped_by = 0
    try:
        while state["global_step"] < total_steps and not stopped_by:
            lr = lr_at(state["global_step"], schedule_steps,
                       warmup_steps(optim_cfg, steps_per_epoch), peak, optim_cfg["min_lr"])
            for param_group in client_optimizer.param_groups:
                param_group["lr"] = lr
            terms, data_wait, indices = None, 0.0, []
            for micro in range(accum):
                t0 = time.perf_counter()
                batch = next(batches)
                data_wait += time.perf_counter() - t0
                indices.append(batch["index"].cpu())
                targets = placement.targets(batch)
                out = method({"student": batch["student"].to(info.device, student_dtype,
                                                             non_blocking=True)}, targets=targets)
                guard.observe(out)
                step_terms = torch.stack([out[k].detach().float()
                                          for k in ("loss", *method.loss.terms)])
                terms = step_terms if terms is None else terms + step_terms
                engine.backward(out["loss"])
                if micro == accum - 1:
                    # A non-finite micro-batch on any rank calls off this optimizer step on
                    # every rank, on the device; the host reads the verdict at the flush.
                    verdict = guard.decide()
                engine.step()
            state["global_step"] += 1
            state["step_in_epoch"] += 1
            pending.append({"terms": terms / accum, "verdict": verdict, "lr": lr,
                            "data_wait": data_wait, "digest": _digest(indices),
                            "step": state["global_step"], "epoch": state["epoch"]})
            log.advance(state["epoch"])
            if state["step_in_epoch"] == steps_per_epoch:
                state["epoch"], state["step_in_epoch"] = state["epoch"] + 1, 0
                if loader.skipped > skipped_reported:
                    new_files = loader.skipped_files[skipped_reported:]
                    more = f" and {len(new_files) - 5} more" if len(new_files) > 5 else ""
                    log.warn(f"epoch {state['epoch'] - 1}: {len(new_files)} newly found "
                             f"unreadable file(s) skipped on rank 0 ({loader.skipped} so far): "
                             f"{new_files[:5]}{more}; every rank's are listed in "
                             f"{run_dir / SKIPPED_LIST} at each checkpoint and at the end")
                    skipped_reported = loader.skipped
            done = state["global_step"] == total_steps
            saving = checkpoint_due(state["global_step"], run_cfg, total_steps)
            # A checkpoint holds the counts: flush before saving.
            if len(pending) >= run_cfg["log_every"] or done or saving:
                elapsed = time.perf_counter() - window_start
                verdicts = _flush(pending, log, method.loss.terms, total_steps,
                                  optim_cfg["global_batch"] * len(pending) / elapsed, info, group)
                for row, bad in zip(pending, verdicts):
                    _judge_step(row["step"], bad, state, run_cfg, log, last_ckpt)
                pending, window_start = [], time.perf_counter()
                # A signal in the run's last window changes nothing: it ends here anyway.
                stopped_by = 0 if done else stop.agreed(group, info.device)  # one more scalar
                saving = saving or bool(stopped_by)
            if saving:
                _record_skipped(loader, run_dir, info, group, log)
                saved_state = {**state, "student_ranks": dp_world, "config": cfg,
                               "zero_stage": engine.zero_optimization_stage(),
                               "teacher_files": teacher_files,
                               "num_samples": loaders[0].num_samples, "data_path": str(data_path)}
                last_ckpt = ckpt.save_checkpoint(engine, run_dir / "checkpoints",
                                                 state["global_step"], saved_state, info.rank,
                                                 run_cfg["keep_last"], group=group)
                window_start = time.perf_counter()  # checkpoint time is not training time
    finally:  # also when a step fails: the process must stay stoppable
        stop.restore()
    if stopped_by:
        log.warn(f"stopped by {signal.Signals(stopped_by).name} at step {state['global_step']}"
                 f" of {total_steps}; checkpoint {last_ckpt}: --resume auto continues the run")
    placement.close()

    skipped = _record_skipped(loader, run_dir, info, group, log)
    exported, export_file = None, run_dir / f"student_{cfg['model']['arch']}.pth"
    if run_cfg["export"] and last_ckpt is not None and info.is_main and not stopped_by:
        trained = state["global_step"] > start_step or not export_file.exists()
        exported = ckpt.export_student(last_ckpt, export_file) if trained else export_file
    barrier(group)
    wall = time.perf_counter() - train_start
    steps_run = state["global_step"] - start_step
    log.summary({
        "run directory": str(run_dir),
        "steps": f"{state['global_step']} / {total_steps} ({steps_run} this launch)",
        "epochs completed": state["epoch"],
        "images/s (this launch)": f"{steps_run * optim_cfg['global_batch'] / max(wall, 1e-9):.1f}",
        "wall time": f"{wall:.1f} s",
        "non-finite steps skipped": state["nonfinite_total"],
        "unreadable files skipped": skipped,
        "peak memory (rank 0)": f"{_peak_memory_gb(info.device):.2f} GiB",
        "last checkpoint": str(last_ckpt),
        "exported student": str(exported) if exported else "-",
        **({"stopped by": signal.Signals(stopped_by).name} if stopped_by else {}),
    })
    log.close()
    return {"run_dir": run_dir, "role": "student", "last_checkpoint": last_ckpt,
            "exported": exported, "stopped_by": stopped_by, **state}


SKIPPED_LIST = "skipped_files.txt"
RUN_LOCK = ".lock"


def _lock_run(run_dir: Path, info: DistInfo) -> ExclusiveLock | None:
    """Rank 0 creates the run directory and holds its lock for the whole launch (the
    kernel drops it when the process ends); every rank stops if another launch holds it."""
    lock, busy, failed = None, None, None
    if info.is_main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            lock = ExclusiveLock(run_dir / RUN_LOCK).acquire()
        except LockBusy as holder:
            busy = str(holder)
        except OSError as err:  # read-only, full, no permission: every rank must hear of it
            failed = f"{err.strerror or err}: {err.filename or run_dir}"
    if any_rank(busy is not None or failed is not None, info.device):
        if busy:
            raise ConfigError(f"{run_dir} is in use by another launch ({busy}): wait for it to "
                              "end, or choose another run.name / run.output_dir")
        if failed:
            raise ConfigError(f"cannot create the run directory {run_dir} ({failed})")
        raise ConfigError(f"rank 0 could not take the run directory {run_dir}: see its message")
    return lock


def _record_skipped(loader, run_dir: Path, info: DistInfo, group, log: RunLogger) -> int:
    """Gathers every student rank's skipped files (a collective) and adds them to the run's
    list; returns how many this launch found. Backends that probe up front see every bad
    file on every rank: each file counts once."""
    per_rank = [None] * dist.get_world_size(group)
    dist.all_gather_object(per_rank, list(loader.skipped_files), group=group)
    found = set().union(*per_rank)
    listing = run_dir / SKIPPED_LIST
    if info.is_main and found:
        try:  # the list of earlier launches of the run, and this one's
            known = set(listing.read_text().splitlines()) if listing.exists() else set()
            if not found <= known:
                ckpt.write_atomic(listing, "".join(f"{p}\n" for p in sorted(known | found)).encode())
        except OSError as err:  # a list is not worth stopping the run for
            log.warn(f"could not write the list of skipped files {listing}: {err}")
    return len(found)


def _judge_step(step: int, verdict: float, state: dict, run_cfg: dict, log: RunLogger,
                last_ckpt) -> None:
    """Count and report a called-off step once the host has read its verdict; stop the run
    when the student went non-finite or after run.max_nonfinite in a row."""
    if verdict == 0:
        state["nonfinite_streak"] = 0
        return
    state["nonfinite_streak"] += 1
    state["nonfinite_total"] += 1
    streak = state["nonfinite_streak"]
    if verdict == NONFINITE_TOKENS:
        log.close()
        raise DMTError(f"stopping at step {state['global_step']}: the student produced "
                       f"non-finite activations at step {step}; that step was called off, so "
                       f"the weights hold none of them. The last checkpoint is {last_ckpt or 'none'}."
                       " Lower the lr, enable optim.clip_grad, or use bf16 instead of fp16.")
    what = "gradients (the loss was finite)" if verdict == NONFINITE_GRADIENTS else "loss"
    log.warn(f"step {step}: non-finite {what}, step skipped ({streak} in a row, "
             f"{state['nonfinite_total']} in total)")
    if streak >= run_cfg["max_nonfinite"]:
        log.close()
        raise DMTError(f"stopping: {streak} non-finite steps in a row (run.max_nonfinite="
                       f"{run_cfg['max_nonfinite']}) at step {step}; the last checkpoint is "
                       f"{last_ckpt or 'none'}. Lower the lr, enable optim.clip_grad, or check "
                       "the data.")


def _warn_if_schedule_moved(saved_cfg: dict, cfg: dict, step: int, steps_per_epoch: int,
                            log: RunLogger) -> None:
    """A resumed run may raise run.epochs (the schedule then spans the new length): say
    what that does to the lr here, so a jump in the logged lr is no surprise."""
    before, now = saved_cfg["run"]["epochs"], cfg["run"]["epochs"]
    if before == now:
        return
    optim_cfg = cfg["optim"]
    lrs = [lr_at(step, epochs * steps_per_epoch, warmup_steps(optim_cfg, steps_per_epoch),
                 peak_lr(optim_cfg), optim_cfg["min_lr"]) for epochs in (before, now)]
    log.warn(f"run.epochs changed from {before} to {now}: the lr schedule now spans {now} "
             f"epochs, so the lr at step {step} is {lrs[1]:.3g} instead of {lrs[0]:.3g}")


def warmup_steps(optim_cfg: dict, steps_per_epoch: int) -> int:
    return round(optim_cfg["warmup_epochs"] * steps_per_epoch)


def checkpoint_due(step: int, run_cfg: dict, total_steps: int) -> bool:
    return step % run_cfg["checkpoint_every"] == 0 or step == total_steps


def _serve_targets(placement, loaders, state: dict, steps_per_epoch: int, accum: int,
                   total_steps: int, run_cfg: dict, validates_tags: bool) -> None:
    """A dedicated teacher rank: the same micro-batches as its students, fused targets out,
    and a seat at the students' checkpoint collectives."""
    streams = {s: micro_batches(loader, state, steps_per_epoch, accum, total_steps)
               for s, loader in zip(placement.students, loaders)}

    def after_micro_batch(served: int) -> None:
        if served % accum == 0:
            step = state["global_step"] + served // accum
            if checkpoint_due(step, run_cfg, total_steps):
                placement.join_checkpoint(ckpt.checkpoint_tag(step) if validates_tags else None)

    placement.serve(streams, steps=(total_steps - state["global_step"]) * accum,
                    on_step=after_micro_batch)
    placement.close()


def _flush(pending: list[dict], log: RunLogger, terms: tuple[str, ...], total_steps: int,
           img_per_s: float, info: DistInfo, group) -> list[float]:
    """One host sync per window: reduce the window's loss terms across ranks, write lines.
    Returns the window's step verdicts (already agreed by all ranks)."""
    values = torch.stack([p["terms"] for p in pending])
    dist.all_reduce(values, group=group)
    values = values / dist.get_world_size(group)
    verdicts = torch.stack([p["verdict"] for p in pending]).to(values.dtype)
    rows = torch.cat([values, verdicts[:, None]], 1).tolist()
    memory = _peak_memory_gb(info.device)
    log.log_steps([{"step": p["step"], "total_steps": total_steps, "epoch": p["epoch"],
                    "loss": v[0], **{t: x for t, x in zip(terms, v[1:-1])}, "lr": p["lr"],
                    "img_per_s": img_per_s, "data_wait_s": p["data_wait"],
                    "peak_mem_gb": memory, "skipped_nonfinite": v[-1] > 0,
                    "sample_digest": p["digest"]} for p, v in zip(pending, rows)])
    return [v[-1] for v in rows]
