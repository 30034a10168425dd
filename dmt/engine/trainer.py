"""The training loop: a DeepSpeed student engine, frozen teachers beside it or on their own
ranks ("dedicated" placement, which stream the fused targets to the students).

One optimizer step = `accum` micro-batches per student rank x student ranks = global batch.
The loop is iteration-based; the trainer state (epoch, step in epoch, global step) plus the
deterministic data order is all `--resume auto` needs to continue exactly.
"""
from __future__ import annotations

import resource
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

from dmt.build import (DTYPES, build_data, build_method, build_student, build_teachers,
                       uses_sample_images)
from dmt.config import batch_arithmetic, dump_config, flatten, run_directory, student_ranks
from dmt.data import PROBING, backend_module, write_sample_images
from dmt.data.loader import DATA_STREAM_VERSION
from dmt.engine import checkpoint as ckpt
from dmt.engine.distributed import (DistInfo, any_rank, barrier, check_same_on_every_rank,
                                    fail_together, skip_lone_allreduce)
from dmt.engine.ds_config import REPO_ROOT, deepspeed_config
from dmt.engine.logger import RunLogger
from dmt.engine.optim import build_optimizer, lr_at, peak_lr, set_hyperparameters
from dmt.engine.runlock import ExclusiveLock, LockBusy
from dmt.engine.step_guard import NONFINITE_GRADIENTS, NONFINITE_TOKENS, StepGuard
from dmt.engine.stop import StopRequest
from dmt.errors import ConfigError, DataError, DMTError, StorageError
from dmt.models.fast import optimize_teachers
from dmt.placement import build_placement

SKIPPED_LIST = "skipped_files.txt"  # in the run directory
RUN_LOCK = ".lock"


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
    if not uses_sample_images(cfg):
        return data["path"]
    folder, marker = run_dir / "sample_images", run_dir / "sample_images" / ".complete"
    wanted = f"{data['sample_images']} images, seed {cfg['run']['seed']}"
    with fail_together(info.device):  # also the barrier: the others read what rank 0 wrote
        if info.is_main and not (marker.exists() and marker.read_text() == wanted):
            shutil.rmtree(folder, ignore_errors=True)
            write_sample_images(folder, num_images=data["sample_images"],
                                seed=cfg["run"]["seed"])
            marker.write_text(wanted)
    return str(folder)


@dataclass(frozen=True)
class Schedule:
    """How long the run is, in optimizer steps."""
    steps_per_epoch: int
    schedule_steps: int  # what the lr schedule spans: run.epochs
    total_steps: int  # what this run trains: run.max_steps may stop it earlier


def micro_batches(loader, state: dict, schedule: Schedule, accum: int) -> Iterator[dict]:
    """The micro-batches of the run from `state` on, epoch after epoch. Student ranks and
    the teacher ranks that serve them walk this same sequence."""
    epoch, step_in_epoch, step = state["epoch"], state["step_in_epoch"], state["global_step"]
    while step < schedule.total_steps:
        loader.set_epoch(epoch, start_batch=step_in_epoch * accum)
        batches = iter(loader)
        for _ in range(step_in_epoch, schedule.steps_per_epoch):
            if step >= schedule.total_steps:
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
    run_dir = run_directory(cfg)
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
        ckpt.check_loadable(resume_from, dp_world, saved,
                            ds_config.get("zero_optimization", {}).get("stage", 0))
    return Launch(run_dir, dp_world, accum, ds_config, resume, resume_from, saved, teacher_files)


_NODE_LOCAL_KEYS = ("data.path", "data.num_workers", "data.probe_cache", "run.progress")


def train(cfg: dict, info: DistInfo, resume: str | None = None) -> dict:
    # Before anything else: the ranks must agree on what they run, and where to. Settings
    # of a node's own I/O may differ (data staged to a per-node path is compared by size).
    facts = {k: v for k, v in flatten(cfg).items() if k not in _NODE_LOCAL_KEYS}
    check_same_on_every_rank(
        {**facts, "run directory": str(run_directory(cfg).absolute()), "--resume": resume},
        info.device,
        "Launch every rank with the same config file and overrides, from the same working "
        "directory (a node with another copy of the file, or other arguments?)")
    with fail_together(info.device):  # a checkpoint one node cannot read stops every rank
        launch = prepare_launch(cfg, info, resume)
    run_lock = _lock_run(launch.run_dir, info)
    try:  # also when training fails: an in-process caller may launch the run again
        return _train(cfg, info, launch, run_lock)
    finally:
        if run_lock is not None:
            run_lock.release()


def _train(cfg: dict, info: DistInfo, launch: Launch, run_lock: ExclusiveLock | None) -> dict:
    run_cfg, optim_cfg, runtime = cfg["run"], cfg["optim"], cfg["teacher_runtime"]
    log = RunLogger(launch.run_dir, 0, info.is_main, False, False, metrics=False)  # until the bar exists
    if run_lock is not None and run_lock.unsupported:
        log.warn(f"the run directory could not be locked ({run_lock.unsupported}): make sure "
                 "no other launch uses the same run.name")
    torch.manual_seed(run_cfg["seed"] + info.rank)

    # A rank that fails alone below (its node lacks a file) stops the others with it.
    with fail_together(info.device):
        teachers, method = _build_models(cfg, info, launch.dp_world, log)
    placement = _build_placement(cfg, method, info)  # (collective: it makes process groups)
    data_path = _prepare_data_path(cfg, launch.run_dir, info)
    loaders = _build_loaders(cfg, placement, data_path, info)
    check_same_on_every_rank({"data samples": loaders[0].num_samples}, info.device,
                             f"Every rank must read the same data set ({data_path}): a node "
                             "with an incomplete or other copy of it?")
    if launch.resume_from is not None:
        unverified = ckpt.check_same_samples(launch.saved, loaders[0].num_samples, data_path,
                                             launch.resume_from, len(loaders[0]) // launch.accum)
        if unverified:
            log.warn(unverified)
    schedule = _schedule(cfg, loaders[0], launch.accum)
    # nonfinite_streak: called-off steps in a row, carried across a resume
    state = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "nonfinite_total": 0,
             "nonfinite_streak": 0}
    if launch.resume_from is not None:
        state.update({k: v for k, v in launch.saved.items() if k in state})

    if placement.role == "teacher":
        _serve_targets(placement, loaders, state, schedule, launch.accum, run_cfg,
                       _validates_tags(launch.ds_config))
        return {"run_dir": launch.run_dir, "role": "teacher", **state}

    engine, optimizer, guard, group, without_rng = _build_engine(method, placement, launch,
                                                                 cfg, info)
    log.close()
    try:
        if info.is_main and state["global_step"] < schedule.total_steps:
            # the run's config, once it has passed every check (a complete run keeps its own)
            ckpt.write_atomic(launch.run_dir / "config.yaml", dump_config(cfg).encode())
        log = RunLogger(launch.run_dir, schedule.total_steps, info.is_main, run_cfg["progress"],
                        run_cfg["tensorboard"], start_step=state["global_step"])
    except StorageError as err:
        raise _with_last_checkpoint(err, launch.resume_from) from None
    _announce(cfg, launch, teachers, engine.is_compiled, loaders[0], data_path, schedule, state,
              without_rng, log)

    loader, accum, total_steps = loaders[0], launch.accum, schedule.total_steps
    batches = micro_batches(loader, state, schedule, accum)
    student_dtype = _engine_dtype(engine)
    peak, pending, last_ckpt = peak_lr(optim_cfg), [], launch.resume_from
    window_start, train_start, start_step = time.perf_counter(), time.perf_counter(), state["global_step"]
    skipped_reported = 0  # files a backend rejected up front are reported with epoch 0
    # SIGTERM / Ctrl-C: checkpoint at the end of the log window, then stop. A dedicated
    # teacher rank serves a fixed schedule, so there signals keep their default action.
    stop = (StopRequest(announce=info.is_main).install() if runtime["placement"] == "colocated"
            else StopRequest())
    stopped_by = 0
    try:
        while state["global_step"] < total_steps and not stopped_by:
            lr = lr_at(state["global_step"], schedule.schedule_steps,
                       warmup_steps(optim_cfg, schedule.steps_per_epoch), peak,
                       optim_cfg["min_lr"])
            for param_group in optimizer.param_groups:
                param_group["lr"] = lr
            row = _train_step(engine, method, placement, guard, batches, accum, student_dtype,
                              info.device)
            state["global_step"] += 1
            state["step_in_epoch"] += 1
            pending.append({**row, "lr": lr, "step": state["global_step"],
                            "epoch": state["epoch"]})
            log.advance(state["epoch"])
            if state["step_in_epoch"] == schedule.steps_per_epoch:
                state["epoch"], state["step_in_epoch"] = state["epoch"] + 1, 0
                skipped_reported = _report_new_skips(loader, skipped_reported,
                                                     state["epoch"] - 1, launch.run_dir, log)
            done = state["global_step"] == total_steps
            saving = checkpoint_due(state["global_step"], run_cfg, total_steps)
            # A checkpoint holds the counts: flush before saving.
            if len(pending) >= run_cfg["log_every"] or done or saving:
                elapsed = time.perf_counter() - window_start
                verdicts = _flush(pending, log, method.loss.terms, total_steps,
                                  optim_cfg["global_batch"] * len(pending) / elapsed, info, group)
                for flushed, bad in zip(pending, verdicts):
                    _judge_step(flushed["step"], bad, state, run_cfg, log, last_ckpt)
                pending, window_start = [], time.perf_counter()
                # A signal in the run's last window changes nothing: it ends here anyway.
                stopped_by = 0 if done else stop.agreed(group, info.device)  # one more scalar
                saving = saving or bool(stopped_by)
            if saving:
                _record_skipped(loader, launch.run_dir, info, group, log)
                saved_state = {**state, "student_ranks": launch.dp_world, "config": cfg,
                               "zero_stage": engine.zero_optimization_stage(),
                               "teacher_files": launch.teacher_files,
                               "num_samples": loader.num_samples, "data_path": str(data_path),
                               "data_stream": DATA_STREAM_VERSION}
                last_ckpt = ckpt.save_checkpoint(
                    engine, launch.run_dir / "checkpoints", state["global_step"], saved_state,
                    info.rank, run_cfg["keep_last"], group=group,
                    sole_writer=not (run_lock is not None and run_lock.unsupported))
                window_start = time.perf_counter()  # checkpoint time is not training time
    except StorageError as err:  # a full disk, a read-only folder: say what is safe
        raise _with_last_checkpoint(err, last_ckpt) from None
    finally:  # also when a step fails: the process must stay stoppable
        stop.restore()
    if stopped_by:
        log.warn(f"stopped by {signal.Signals(stopped_by).name} at step {state['global_step']}"
                 f" of {total_steps}; checkpoint {last_ckpt}: --resume auto continues the run")
    placement.close()
    return _finish(cfg, launch, loader, state, total_steps, start_step, last_ckpt, stopped_by,
                   train_start, info, group, log)


def _with_last_checkpoint(err: StorageError, last_ckpt) -> StorageError:
    if last_ckpt is None:
        return StorageError(f"{err}; no checkpoint was saved yet")
    return StorageError(f"{err}; the last complete checkpoint, {last_ckpt}, is intact: free "
                        f"space (or fix the permissions), then --resume {last_ckpt} continues "
                        "from it")


def _build_models(cfg: dict, info: DistInfo, dp_world: int, log: RunLogger):
    """Frozen half-precision teachers outside the engine, the student, and the method that
    pairs them."""
    runtime = cfg["teacher_runtime"]
    if runtime["placement"] == "dedicated" and info.rank < dp_world:
        # A dedicated student rank receives fused targets: it needs the teachers' shapes only.
        teachers = build_teachers(cfg, info.device, warn=log.warn, shapes_only=True)
    else:
        teachers = optimize_teachers(build_teachers(cfg, info.device, warn=log.warn),
                                     DTYPES[runtime["dtype"]], compile=runtime["compile"],
                                     stack=runtime["stack"], fp8=runtime["fp8"])
    student = build_student(cfg, teachers.embed_dim)
    method = build_method(cfg, student, teachers)  # refuses mismatched token grids
    return teachers, method


def _build_placement(cfg: dict, method, info: DistInfo):
    """This rank's side of the placement."""
    runtime = cfg["teacher_runtime"]
    return build_placement(runtime["placement"], runtime["teacher_ranks"], method,
                           micro_batch=cfg["optim"]["micro_batch"], device=info.device,
                           transfer_dtype=DTYPES[runtime["transfer_dtype"]],
                           prefetch=runtime["prefetch"])


def _build_loaders(cfg: dict, placement, data_path, info: DistInfo) -> list:
    """This rank's loaders: a student reads its own shard of the (seed, epoch) order; a
    dedicated teacher rank reads the shard of each student it serves."""
    shards = (placement.data_shards if placement.role == "teacher"
              else [(placement.data_rank, placement.data_world_size)])
    backend = cfg["data"]["backend"]

    def build() -> list:
        try:
            return [build_data(cfg, data_path, info.device, rank, world_size)
                    for rank, world_size in shards]
        except DataError as err:  # name the run's data and batch, which the loader cannot know
            raise DataError(f"data.path {data_path} (backend {backend}, optim.global_batch "
                            f"{cfg['optim']['global_batch']}): {err}") from None

    # A rank failing alone (its node lacks the data or the backend's library) stops every
    # rank. A probing backend's loader holds a collective, the probe, which shares its own
    # failures: there only the import before it is guarded here.
    with fail_together(info.device):
        backend_module(backend)
        loaders = None if backend in PROBING else build()
    return loaders if loaders is not None else build()


def _schedule(cfg: dict, loader, accum: int) -> Schedule:
    steps_per_epoch = len(loader) // accum
    if steps_per_epoch == 0:
        raise ConfigError(f"one epoch gives {len(loader)} micro-batches per rank, fewer than "
                          f"the {accum} one optimizer step needs (global batch "
                          f"{cfg['optim']['global_batch']} > {loader.num_samples} samples?)")
    schedule_steps = cfg["run"]["epochs"] * steps_per_epoch
    # max_steps stops early (smoke runs, tests); the lr schedule still spans run.epochs.
    total_steps = min(schedule_steps, cfg["run"]["max_steps"] or schedule_steps)
    return Schedule(steps_per_epoch, schedule_steps, total_steps)


def _build_engine(method, placement, launch: Launch, cfg: dict, info: DistInfo):
    """The student's DeepSpeed engine, confined to the student ranks by the placement's
    mpu, with the guard that calls off non-finite steps; restored from the checkpoint."""
    optim_cfg = cfg["optim"]
    optimizer = build_optimizer(method.student, optim_cfg)
    engine, _, _, _ = deepspeed.initialize(model=method.student, optimizer=optimizer,
                                           config=launch.ds_config, mpu=placement.mpu)
    method.student = engine
    group = placement.mpu.get_data_parallel_group() if placement.mpu else None
    guard = StepGuard.for_engine(engine, optimizer, info.device, group)
    skip_lone_allreduce(engine, group)
    if cfg["model"]["compile"]:
        method.compile()  # in place: the checkpoint's parameter names do not change
    without_rng = 0
    if launch.resume_from is not None:
        # Each rank loads its own ZeRO partition: one rank's damaged file stops them all.
        without_rng = ckpt.load_checkpoint(engine, launch.resume_from, info.rank, group)
        # The optimizer state restores the saved weight decay and betas: the config rules.
        set_hyperparameters(optimizer, optim_cfg)
    return engine, optimizer, guard, group, without_rng


def _announce(cfg: dict, launch: Launch, teachers, student_compiled: bool, loader, data_path,
              schedule: Schedule, state: dict, without_rng: int, log: RunLogger) -> None:
    """What this launch will do, and what it resumes from (with what changed since)."""
    runtime, optim_cfg, run_dir = cfg["teacher_runtime"], cfg["optim"], launch.run_dir
    execution = (teachers.describe() if runtime["placement"] == "colocated"
                 else f"{runtime['teacher_ranks']} teacher rank(s)")
    student = cfg["model"]["arch"] + (" (compiled)" if student_compiled else "")
    log.info(f"run {run_dir}: {schedule.total_steps} steps, {schedule.steps_per_epoch} per "
             f"epoch, global batch {optim_cfg['global_batch']} = {optim_cfg['micro_batch']} x "
             f"{launch.accum} accumulation x {launch.dp_world} student rank(s); teachers "
             f"{teachers.names} ({runtime['placement']}: {execution}); student {student}; "
             f"data {cfg['data']['backend']} {data_path} ({loader.num_samples} samples)")
    if runtime["placement"] == "dedicated":
        log.info(f"dedicated teacher ranks: SIGTERM and Ctrl-C stop the run at once, without a "
                 f"checkpoint; checkpoints come every {cfg['run']['checkpoint_every']} steps "
                 "(run.checkpoint_every)")
    if launch.resume_from is None:
        if launch.resume:
            log.info(f"--resume {launch.resume}: no checkpoint in {run_dir} yet, starting fresh")
        return
    log.info(f"resumed from {launch.resume_from} at step {state['global_step']} "
             f"(epoch {state['epoch']}, step {state['step_in_epoch']} of the epoch)")
    if not (run_dir / "checkpoints" / ckpt.LATEST).is_file() and launch.resume == "auto":
        log.warn(f"{run_dir / 'checkpoints' / ckpt.LATEST} was missing (a save cut short "
                 f"before its last step?): resumed from the newest complete checkpoint")
    stream_note = ckpt.data_stream_note(launch.saved, DATA_STREAM_VERSION, launch.resume_from)
    if stream_note:
        log.warn(stream_note)
    for change in ckpt.changed_settings(launch.saved["config"], cfg):
        log.info(f"changed since the checkpoint, applied from this step on: {change}")
    _warn_if_schedule_moved(launch.saved["config"], cfg, state["global_step"],
                            schedule.steps_per_epoch, log)
    if state["global_step"] < schedule.total_steps:
        _warn_if_disk_is_short(launch.resume_from, run_dir, log)
    if without_rng:  # the data order does not depend on it; drop-path and dropout do
        log.warn(f"{without_rng} of {launch.dp_world} student rank(s) found no rng_rank<r>.pt "
                 f"in {launch.resume_from}: their random state starts again from the seed, "
                 "so the run does not repeat an uninterrupted one exactly")
    if state["global_step"] >= schedule.total_steps:
        log.info(f"{run_dir} is already complete ({state['global_step']}/{schedule.total_steps} "
                 "steps): nothing to train. Raise run.epochs / run.max_steps to go on, or "
                 "set another run.name for a new run.")


def _warn_if_disk_is_short(checkpoint: Path, run_dir: Path, log: RunLogger) -> None:
    """The next save needs about as much space as the last one took."""
    size = sum(f.stat().st_size for f in checkpoint.iterdir() if f.is_file())
    free = shutil.disk_usage(run_dir).free
    if free < size:
        log.warn(f"{free / 2**20:.0f} MiB free on the disk of {run_dir}, and the checkpoint "
                 f"{checkpoint.name} takes {size / 2**20:.0f} MiB: the next save will likely "
                 "fail (free space first)")


def _train_step(engine, method, placement, guard: StepGuard, batches, accum: int,
                student_dtype: torch.dtype, device: torch.device) -> dict:
    """One optimizer step: `accum` micro-batches through teachers (or their stream) and the
    student. Returns the step's loss terms and verdict, still on the device."""
    terms, data_wait, indices = None, 0.0, []
    for micro in range(accum):
        t0 = time.perf_counter()
        batch = next(batches)
        data_wait += time.perf_counter() - t0
        indices.append(batch["index"].cpu())
        targets = placement.targets(batch)
        out = method({"student": batch["student"].to(device, student_dtype, non_blocking=True)},
                     targets=targets)
        guard.observe(out)
        step_terms = torch.stack([out[k].detach().float() for k in ("loss", *method.loss.terms)])
        terms = step_terms if terms is None else terms + step_terms
        engine.backward(out["loss"])
        if micro == accum - 1:
            # A non-finite micro-batch on any rank calls off this optimizer step on every
            # rank, on the device; the host reads the verdict at the flush.
            verdict = guard.decide()
        engine.step()
    # The gradient norm before clipping, as DeepSpeed's optimizers measure it (ZeRO, bf16,
    # fp16), else the guard's; a device scalar: the host reads it at the flush.
    grad_norm = engine.get_global_grad_norm()
    return {"terms": terms / accum, "verdict": verdict, "data_wait": data_wait,
            "grad_norm": guard.grad_norm if grad_norm is None else grad_norm,
            "digest": _digest(indices)}


def _report_new_skips(loader, reported: int, epoch: int, run_dir: Path, log: RunLogger) -> int:
    """At the end of an epoch: the unreadable files rank 0 found since the last report.
    Returns how many are reported so far."""
    if loader.skipped <= reported:
        return reported
    new_files = loader.skipped_files[reported:]
    more = f" and {len(new_files) - 5} more" if len(new_files) > 5 else ""
    log.warn(f"epoch {epoch}: {len(new_files)} newly found unreadable file(s) skipped on rank 0 "
             f"({loader.skipped} so far): {new_files[:5]}{more}; every rank's are listed in "
             f"{run_dir / SKIPPED_LIST} at each checkpoint and at the end")
    return loader.skipped


def _finish(cfg: dict, launch: Launch, loader, state: dict, total_steps: int, start_step: int,
            last_ckpt, stopped_by: int, train_start: float, info: DistInfo, group,
            log: RunLogger) -> dict:
    """After the last step: the skipped-file list, the exported student, the summary."""
    run_cfg, run_dir = cfg["run"], launch.run_dir
    skipped = _record_skipped(loader, run_dir, info, group, log)
    exported, export_file = None, run_dir / f"student_{cfg['model']['arch']}.pth"
    if run_cfg["export"] and last_ckpt is not None and info.is_main and not stopped_by:
        # An export older than the checkpoint (its write failed, or it predates a longer
        # run) is written again.
        current = (export_file.exists() and export_file.stat().st_mtime
                   >= (last_ckpt / "trainer_state.json").stat().st_mtime)
        try:
            exported = export_file if current else ckpt.export_student(last_ckpt, export_file)
        except StorageError as err:
            raise StorageError(f"{err}; the checkpoint {last_ckpt} is complete: free space, "
                               f"then python launch/export.py {last_ckpt} --out "
                               f"{export_file}") from None
    barrier(group)
    wall = time.perf_counter() - train_start
    steps_run = state["global_step"] - start_step
    log.summary({
        "run directory": str(run_dir),
        "steps": f"{state['global_step']} / {total_steps} ({steps_run} this launch)",
        "epochs completed": state["epoch"],
        "images/s (this launch)":
            f"{steps_run * cfg['optim']['global_batch'] / max(wall, 1e-9):.1f}",
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


def _lock_run(run_dir: Path, info: DistInfo) -> ExclusiveLock | None:
    """Rank 0 creates the run directory and holds its lock for the whole launch (the
    kernel drops it when the process ends); every rank stops if another launch holds it."""
    lock, busy, failed = None, None, None
    if info.is_main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            lock = ExclusiveLock(run_dir / RUN_LOCK).acquire()
            # A folder this launch cannot write to fails now, not at the first checkpoint.
            for folder in (run_dir, run_dir / "checkpoints"):
                if folder.is_dir():
                    tempfile.TemporaryFile(dir=folder).close()
        except LockBusy as holder:
            busy = str(holder)
        except OSError as err:  # read-only, full, no permission: every rank must hear of it
            failed = f"{err.strerror or err}: {err.filename or run_dir}"
    if any_rank(busy is not None or failed is not None, info.device):
        if lock is not None:  # taken before the writability check failed
            lock.release()
        if busy:
            raise ConfigError(f"{run_dir} is in use by another launch ({busy}): wait for it to "
                              "end, or choose another run.name / run.output_dir")
        if failed:
            raise ConfigError(f"cannot write in the run directory {run_dir} ({failed})")
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
            # A file name that is not valid UTF-8 holds its bytes as surrogates: written
            # back as those bytes, it cannot fail (and cost the checkpoint that follows).
            known = (set(listing.read_bytes().decode(errors="surrogateescape").splitlines())
                     if listing.exists() else set())
            if not found <= known:
                text = "".join(f"{p}\n" for p in sorted(known | found))
                ckpt.write_atomic(listing, text.encode(errors="surrogateescape"))
        except (OSError, StorageError) as err:  # a list is not worth stopping the run for
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


def _validates_tags(ds_config: dict) -> bool:
    """DeepSpeed all-reduces the checkpoint tag's hash at each save unless this is off."""
    return ds_config.get("checkpoint", {}).get("tag_validation", "Warn").lower() != "ignore"


def _serve_targets(placement, loaders, state: dict, schedule: Schedule, accum: int,
                   run_cfg: dict, validates_tags: bool) -> None:
    """A dedicated teacher rank: the same micro-batches as its students, fused targets out,
    and a seat at the students' checkpoint collectives."""
    streams = {s: micro_batches(loader, state, schedule, accum)
               for s, loader in zip(placement.students, loaders)}

    def after_micro_batch(served: int) -> None:
        if served % accum == 0:
            step = state["global_step"] + served // accum
            if checkpoint_due(step, run_cfg, schedule.total_steps):
                placement.join_checkpoint(ckpt.checkpoint_tag(step) if validates_tags else None)

    placement.serve(streams, micro_batches=(schedule.total_steps - state["global_step"]) * accum,
                    after_each=after_micro_batch)
    placement.close()


def _flush(pending: list[dict], log: RunLogger, terms: tuple[str, ...], total_steps: int,
           img_per_s: float, info: DistInfo, group) -> list[float]:
    """One host sync per window: reduce the window's loss terms across ranks, write lines.
    Returns the window's step verdicts (already agreed by all ranks)."""
    values = torch.stack([p["terms"] for p in pending])
    dist.all_reduce(values, group=group)
    values = values / dist.get_world_size(group)
    verdicts = torch.stack([p["verdict"] for p in pending]).to(values.dtype)
    # Gradient norms are global already (every rank holds the same): not averaged.
    norms = torch.stack([torch.as_tensor(float("nan") if p["grad_norm"] is None
                                         else p["grad_norm"], dtype=values.dtype,
                                         device=values.device) for p in pending])
    rows = torch.cat([values, norms[:, None], verdicts[:, None]], 1).tolist()
    memory = _peak_memory_gb(info.device)
    log.log_steps([{"step": p["step"], "total_steps": total_steps, "epoch": p["epoch"],
                    "loss": v[0], **{t: x for t, x in zip(terms, v[1:-2])}, "lr": p["lr"],
                    "grad_norm": None if p["grad_norm"] is None else v[-2],
                    "img_per_s": img_per_s, "data_wait_s": p["data_wait"],
                    "peak_mem_gb": memory, "skipped_nonfinite": v[-1] > 0,
                    "sample_digest": p["digest"]} for p, v in zip(pending, rows)])
    return [v[-1] for v in rows]
