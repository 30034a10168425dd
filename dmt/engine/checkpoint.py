"""Checkpoints that are never half-written, resumable exactly, and exportable to timm.

Layout of a run directory:
    RUN/checkpoints/step00001000/   DeepSpeed's files + rng_rank{r}.pt + trainer_state.json
    RUN/checkpoints/latest          name of the newest complete checkpoint (changed last)
DeepSpeed writes into RUN/checkpoints/.tmp/<tag>/ first; rank 0 renames the directory
once every rank has finished, then replaces `latest`. A crash at any point leaves the
previous checkpoint and pointer intact. (Like DeepSpeed itself, this assumes all ranks
see one shared filesystem.)
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from dmt.choices import loads_checkpoint
from dmt.config import flatten, resolve_path, used_teachers
from dmt.engine.distributed import any_rank, barrier, ranks_agreeing
from dmt.errors import CheckpointError, StorageError, is_write_failure, storage_error
from dmt.models import backbone_state_dict

LATEST = "latest"
_TAG = re.compile(r"step\d{8,}")  # what checkpoint_tag writes; a user's step*.keep is not one


def checkpoint_tag(step: int) -> str:
    return f"step{step:08d}"


def _checkpoint_dirs(ckpt_root: Path) -> list[Path]:
    """The directories save_checkpoint made (complete or not), oldest first."""
    return sorted(p for p in ckpt_root.glob("step*") if _TAG.fullmatch(p.name) and p.is_dir())


def write_atomic(path: Path, data: bytes) -> None:
    """`path` holds `data` or what it held before, never a part; a failed write leaves no
    temporary file behind and raises StorageError."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise storage_error(path, err) from None


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(engine, ckpt_root: Path, step: int, trainer_state: dict, rank: int,
                    keep_last: int, group=None, sole_writer: bool = True) -> Path:
    """Collective over the student ranks (`group`; dedicated teacher ranks join DeepSpeed's
    own world-wide collectives separately). Returns the final checkpoint directory.
    sole_writer: no other launch can be saving into ckpt_root (the run lock holds)."""
    tag = checkpoint_tag(step)
    tmp_root, final = ckpt_root / ".tmp", ckpt_root / tag
    if rank == 0:
        # Saves of one launch follow one another: with the run lock held, anything here is
        # left over from a save that failed, possibly of another step. It frees space.
        shutil.rmtree(tmp_root if sole_writer else tmp_root / tag, ignore_errors=True)
        try:
            tmp_root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise storage_error(tmp_root, err, "the checkpoint folder") from None
    barrier(group)
    try:
        engine.save_checkpoint(str(tmp_root), tag=tag, client_state={"trainer": trainer_state},
                               save_latest=False)
        torch.save(rng_state(), tmp_root / tag / f"rng_rank{rank}.pt")
    except (OSError, RuntimeError) as err:
        if not is_write_failure(err):  # a collective, memory: not the disk's doing
            raise
        if not dist.is_initialized() or dist.get_world_size(group) == 1:
            # The part written takes space. (With several ranks others may still be
            # writing there: the next save removes it.)
            shutil.rmtree(tmp_root / tag, ignore_errors=True)
            _remove_if_empty(tmp_root)
        raise storage_error(tmp_root / tag, err, f"checkpoint {tag} to") from None
    barrier(group)
    # Rank 0 completes the save, so it must see every rank's part: with run.output_dir on a
    # node-local disk (the same path on every node) each node would keep only its own, and
    # no checkpoint of the run could be resumed.
    unseen = _unseen_parts(tmp_root / tag, trainer_state) if rank == 0 else []
    if any_rank(bool(unseen), engine.device, group):
        if rank == 0:
            shutil.rmtree(tmp_root / tag, ignore_errors=True)
            for script in tmp_root.glob("zero_to_*.py"):  # DeepSpeed's copies
                script.unlink(missing_ok=True)
            _remove_if_empty(tmp_root)
        raise CheckpointError(
            f"checkpoint {tag}: rank 0 does not see "
            f"{', '.join(unseen[:4]) if unseen else 'the files of every rank'} in "
            f"{tmp_root / tag}: run.output_dir must be a folder every node shares (a "
            "node-local disk at the same path keeps each node's part apart)")
    if rank == 0:
        _complete(ckpt_root, tag, trainer_state)
        _remove_if_empty(tmp_root)
        _prune(ckpt_root, tag, keep_last)
    barrier(group)
    return final


def _unseen_parts(path: Path, trainer_state: dict) -> list[str]:
    """The files of other ranks that `path` lacks: each student rank's RNG state and, where
    the optimizer is partitioned (ZeRO, or DeepSpeed's bf16 optimizer), its partition. A
    network filesystem may show another node's new files a little late (attribute
    caching): a miss is looked for again for 2 min, or half the collectives' timeout, for
    which the other ranks wait."""
    from deepspeed.constants import default_pg_timeout
    ranks = trainer_state.get("student_ranks", 1)
    deadline = time.monotonic() + min(120.0, default_pg_timeout.total_seconds() / 2)
    while True:
        unseen = [f"rng_rank{r}.pt" for r in range(ranks)
                  if not (path / f"rng_rank{r}.pt").is_file()]
        unseen += [f"the ZeRO partition of rank {r}" for r in _partitions(path, trainer_state)[1]]
        if not unseen or time.monotonic() > deadline:
            return unseen
        time.sleep(5)


def _complete(ckpt_root: Path, tag: str, trainer_state: dict) -> None:
    """Rank 0, once every rank has written .tmp/<tag>: the trainer state, the rename, and
    the `latest` pointer last. A failure before the rename leaves the checkpoints as they
    were and deletes the part; a failed pointer write leaves `latest` where it was."""
    tmp_root, final = ckpt_root / ".tmp", ckpt_root / tag
    stale = tmp_root / f"{tag}.replaced"  # the same step saved before (an older resume)
    shutil.rmtree(stale, ignore_errors=True)
    try:
        write_atomic(tmp_root / tag / "trainer_state.json",
                     json.dumps(trainer_state, indent=1).encode())
        if final.exists():
            os.replace(final, stale)
        os.replace(tmp_root / tag, final)
        write_atomic(ckpt_root / LATEST, tag.encode())
    except (OSError, StorageError) as err:
        if stale.exists() and not final.exists():
            os.replace(stale, final)  # the step's earlier save, back in place
        shutil.rmtree(tmp_root / tag, ignore_errors=True)
        shutil.rmtree(stale, ignore_errors=True)
        _remove_if_empty(tmp_root)
        if isinstance(err, StorageError):
            raise
        raise storage_error(final, err, f"checkpoint {tag} to") from None
    shutil.rmtree(stale, ignore_errors=True)
    # DeepSpeed's offline converters, which it copies beside a ZeRO save: next to `latest`,
    # where `zero_to_fp32.py checkpoints/ OUT` looks (and out of .tmp/, which then goes).
    for script in tmp_root.glob("zero_to_*.py"):
        try:
            os.replace(script, ckpt_root / script.name)
        except OSError:  # a convenience: the checkpoint is complete without it
            pass


def _remove_if_empty(tmp_root: Path) -> None:
    try:  # an empty .tmp/ would read as a save in progress
        tmp_root.rmdir()
    except OSError:  # not empty: another rank's save is still writing there
        pass


def _prune(ckpt_root: Path, newest: str, keep_last: int) -> None:
    """Keeps the `keep_last` newest checkpoints up to `newest`; never touches later ones."""
    tags = [p for p in _checkpoint_dirs(ckpt_root) if p.name <= newest]
    for old in tags[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """The run's complete checkpoints, oldest first (a save in progress lives in .tmp/)."""
    return [p for p in _checkpoint_dirs(Path(run_dir) / "checkpoints")
            if (p / "trainer_state.json").is_file()]


def _alternatives(run_dir: Path, bad: Path) -> str:
    others = [p for p in complete_checkpoints(run_dir) if p.resolve() != bad.resolve()]
    if not others:
        return "no other complete checkpoint is left in the run"
    return (f"the newest other complete checkpoint is {others[-1]}: pass that directory "
            "instead (to --resume or launch/export.py)")


def find_checkpoint(resume: str, run_dir: Path) -> Path | None:
    """`auto`: the run's latest complete checkpoint (None if there is none yet);
    otherwise a checkpoint directory or a run directory."""
    if resume == "auto":
        pointer = run_dir / "checkpoints" / LATEST
        if not pointer.is_file():
            # A save renames its finished directory, then writes the pointer: a crash in
            # between (or a deleted pointer) leaves complete checkpoints without one.
            done = complete_checkpoints(run_dir)
            return done[-1] if done else None
        tag = pointer.read_text().strip()
        path = run_dir / "checkpoints" / tag
        if not tag.startswith("step") or Path(tag).name != tag:  # not what save_checkpoint writes
            raise CheckpointError(f"{pointer} names no checkpoint ({tag!r}); "
                                  + _alternatives(run_dir, pointer))
        if not path.is_dir():
            raise CheckpointError(f"{pointer} points to {path}, which does not exist; "
                                  + _alternatives(run_dir, path))
        return path
    path = Path(resume)
    if (path / "checkpoints").is_dir():  # a run directory: its latest checkpoint
        found = find_checkpoint("auto", path)
        if found is None:
            raise CheckpointError(f"--resume {resume}: the run has no complete checkpoint yet")
        return found
    if not path.is_dir() or not (path / "trainer_state.json").is_file():
        raise CheckpointError(f"--resume {resume}: not a dmt checkpoint directory (expected "
                              "RUN/checkpoints/stepNNNNNNNN with trainer_state.json) "
                              "nor a run directory")
    return path


def read_trainer_state(path: Path) -> dict:
    """The trainer state (step, epoch, config...) of a checkpoint directory."""
    file = path / "trainer_state.json"
    try:
        state = json.loads(file.read_text())
        if not {"config", "global_step", "epoch", "step_in_epoch"} <= state.keys():
            raise ValueError("it lacks the step counters or the config")
        return state
    except (OSError, ValueError, AttributeError) as err:
        raise CheckpointError(f"{file} is unreadable ({err}); "
                              + _alternatives(path.parent.parent, path)) from None


def _partition_ranks(path: Path) -> set[int]:
    """The data-parallel ranks whose ZeRO optimizer partitions the checkpoint holds."""
    return {int(m.group(1)) for f in path.glob("*zero_pp_rank_*_optim_states.pt")
            if (m := re.search(r"zero_pp_rank_(\d+)_", f.name))}


def _partitions(path: Path, trainer_state: dict) -> tuple[int, list[int]]:
    """How many student ranks' optimizer partitions the checkpoint must hold (0: none, the
    whole state is in the model states, for any number of ranks), and which it lacks."""
    found = _partition_ranks(path)
    # Checkpoints before dmt recorded zero_stage: ZeRO-3 shows in its model state names;
    # for ZeRO-1/2 trust the partitions found.
    zero = trainer_state.get("zero_stage", 3 if any(path.glob("zero_pp_rank_*_model_states.pt"))
                             else int(bool(found)))
    if not zero and not found:
        return 0, []
    # (Stage 0 with partitions: DeepSpeed's bf16 optimizer partitions its state too.)
    saved_ranks = trainer_state.get("student_ranks", max(found, default=0) + 1)
    return saved_ranks, sorted(set(range(saved_ranks)) - found)


def check_complete(path: Path, trainer_state: dict) -> int:
    """Refuse a checkpoint that lacks files DeepSpeed (or an export) would need: its model
    states, or a ZeRO partition of one of the student ranks that wrote it. Returns how many
    student ranks' ZeRO partitions it holds (0: no ZeRO)."""
    if not any(path.glob("*mp_rank_*_model_states.pt")):  # ZeRO-3: zero_pp_rank_R_mp_rank_..
        raise CheckpointError(f"checkpoint {path} has no DeepSpeed model states "
                              "(*mp_rank_00_model_states.pt); " + _alternatives(path.parent.parent, path))
    saved_ranks, missing = _partitions(path, trainer_state)
    if missing:
        stage = (f"ZeRO-{trainer_state['zero_stage']}" if "zero_stage" in trainer_state
                 else "ZeRO")  # else guessed
        raise CheckpointError(f"checkpoint {path} ({stage}) lacks the optimizer partitions "
                              f"of student rank(s) {missing} (*zero_pp_rank_R_*optim_states.pt); "
                              + _alternatives(path.parent.parent, path))
    return saved_ranks


# Which ZeRO stages write the same optimizer files (1 and 2 resume each other: tested).
_ZERO_LAYOUT = {0: "no ZeRO", 1: "ZeRO-1/2", 2: "ZeRO-1/2", 3: "ZeRO-3"}


def _deepspeed_zero_stage(path: Path) -> int | None:
    """The ZeRO stage in DeepSpeed's own copy of its config, for checkpoints written before
    dmt recorded zero_stage; None when it cannot be read (the checks after this one, or
    DeepSpeed, name the damage). mmap: the tensors are not read."""
    for file in sorted(path.glob("*mp_rank_*_model_states.pt"))[:1]:
        try:
            ds_config = torch.load(file, map_location="cpu", mmap=True,
                                   weights_only=False)["ds_config"]
            stage = int((ds_config.get("zero_optimization") or {}).get("stage", 0))
        except Exception:  # noqa: BLE001  (any damage: leave it to the later checks)
            return None
        return stage if stage in _ZERO_LAYOUT else None
    return None


def check_loadable(path: Path, student_ranks: int, trainer_state: dict,
                   zero_stage: int) -> None:
    """Refuse, before any model is built, a checkpoint DeepSpeed would fail on: missing
    files, another ZeRO layout, or ZeRO partitions for another number of student ranks."""
    saved_stage = (trainer_state["zero_stage"] if "zero_stage" in trainer_state
                   else _deepspeed_zero_stage(path))
    if saved_stage is not None and _ZERO_LAYOUT[saved_stage] != _ZERO_LAYOUT[zero_stage]:
        raise CheckpointError(
            f"checkpoint {path} was written with ZeRO stage {saved_stage} "
            f"({_ZERO_LAYOUT[saved_stage]}), this launch's deepspeed.config has stage "
            f"{zero_stage}: their optimizer states are stored differently; resume with a "
            f"{_ZERO_LAYOUT[saved_stage]} config (the checkpoint itself is intact)")
    saved_ranks = check_complete(path, trainer_state)
    if saved_ranks and saved_ranks != student_ranks:
        raise CheckpointError(
            f"checkpoint {path} holds ZeRO optimizer partitions of {saved_ranks} student "
            f"rank(s), this launch has {student_ranks}: a ZeRO checkpoint resumes only on the "
            f"same number of student ranks (launch with {saved_ranks}; checkpoints without ZeRO "
            "resume on any number)")


# What must not change for a resumed run to be the same run (objective, data order, shapes).
_RESUME_KEYS = [("model", "arch"), ("model", "img_size"), ("model", "adapter"),
                ("optim", "global_batch"), ("run", "seed"), ("method", "losses"),
                ("method", "distance"), ("method", "direction"), ("method", "fusion"),
                ("data", "sample_images"),
                ("data", "crop_scale"), ("data", "color_jitter")]


def _teacher_identity(cfg: dict) -> list[tuple]:
    weighted = cfg["method"]["fusion"] == "weighted"
    return [(t["name"], t["kind"], t["arch"], t["weight"] if weighted else None)
            for _, t in used_teachers(cfg)]


def check_compatible(saved_cfg: dict, cfg: dict, path: Path) -> None:
    """A checkpoint resumes only the same student, teachers, objective and data order."""
    diffs = [f"{a}.{b}: checkpoint {saved_cfg[a][b]!r} vs now {cfg[a][b]!r}"
             for a, b in _RESUME_KEYS if saved_cfg[a][b] != cfg[a][b]]
    saved_t, now_t = _teacher_identity(saved_cfg), _teacher_identity(cfg)
    if saved_t != now_t:
        diffs.append(f"teachers (name, kind, arch, weight): checkpoint {saved_t} vs now {now_t}")
    if diffs:
        raise CheckpointError(f"checkpoint {path} was written by a different run:\n  "
                              + "\n  ".join(diffs))


def teacher_files(cfg: dict, repo_root: Path) -> dict[str, str]:
    """Each used teacher's checkpoint file as its size and the SHA-256 of its first MiB:
    enough to tell another file from the one a run started with, without reading GBs."""
    prints = {}
    for _, t in used_teachers(cfg):
        if not loads_checkpoint(t) or not t["checkpoint"]:
            continue
        file = resolve_path(t["checkpoint"], repo_root)
        with open(file, "rb") as f:
            head = hashlib.sha256(f.read(2**20)).hexdigest()[:16]
        prints[t["name"]] = f"{file.stat().st_size} bytes, sha256 of the first MiB {head}"
    return prints


def check_same_teacher_files(trainer_state: dict, now: dict[str, str], path: Path) -> None:
    """A resumed run distils from the same teacher weights it started with (another file at
    the same path, or the same file at another path, is told apart by its contents)."""
    saved = trainer_state.get("teacher_files")  # absent before dmt recorded them
    if saved is None:
        return
    changed = [f"{name}: checkpoint {saved[name]} vs now {now[name]}"
               for name in saved if name in now and saved[name] != now[name]]
    if changed:
        raise CheckpointError(f"checkpoint {path} was written with other teacher weights "
                              "(a resumed run must distil from the same teachers):\n  "
                              + "\n  ".join(changed))


def data_stream_note(trainer_state: dict, version: int, path: Path) -> str | None:
    """A warning when the checkpoint was written by a dmt whose sample order or
    augmentations differ from this one's (dmt.data.loader.DATA_STREAM_VERSION): the run
    goes on, but no longer repeats the uninterrupted one step for step."""
    saved = trainer_state.get("data_stream")
    if saved == version:
        return None
    if saved is not None:
        return (f"checkpoint {path} was written by a dmt whose data stream is version "
                f"{saved}, this one's {version}: the run goes on with this version's sample "
                "order and augmentations, so it does not repeat the uninterrupted run step "
                "for step")
    # (dmts between the per-image jitter order and the record wrote version 2 unrecorded)
    return (f"checkpoint {path} was written by an earlier dmt, which did not record its data "
            f"stream version: the run goes on with this version's ({version}) sample order "
            "and augmentations, so it may not repeat the uninterrupted run step for step (it "
            "does not if that dmt predates the per-image colour-jitter order, version 2)")


def changed_settings(saved_cfg: dict, cfg: dict) -> list[str]:
    """The config keys a resume may change (the others are refused above), as
    "key: was -> now" lines; a key the checkpoint's config lacks (an earlier dmt's) is
    "unset" there."""
    refused = {f"{a}.{b}" for a, b in _RESUME_KEYS} | {"teachers", "method.teachers", "run.name",
                                                       "run.output_dir"}
    before, now = flatten(saved_cfg), flatten(cfg)
    return [f"{key}: {repr(before[key]) if key in before else 'unset'} -> {now[key]!r}"
            for key in now if key not in refused and (key not in before or before[key] != now[key])]


_SAME_DATA_WAY_OUT = ("The order of every epoch and the lr schedule depend on that count, so "
                      "the run would not continue as it started: restore the data (a file that "
                      "has become undecodable counts too), or start a new run from this "
                      "checkpoint's weights (launch/export.py)")


def check_same_samples(trainer_state: dict, num_samples: int, data_path, path: Path,
                       steps_per_epoch: int) -> str | None:
    """Every epoch's sample order is a function of (seed, epoch, number of samples), and the
    lr schedule of the steps per epoch: a resumed run must read as many samples as it wrote
    the checkpoint with (a folder that gained or lost images, or another dataset). Returns a
    warning when the checkpoint cannot tell (written before dmt recorded the count)."""
    saved = trainer_state.get("num_samples")
    if saved is not None:
        if saved != num_samples:
            raise CheckpointError(
                f"checkpoint {path} was written by a run that read {saved} samples (data.path "
                f"{trainer_state.get('data_path')}); this launch reads {num_samples} in "
                f"{data_path}. " + _SAME_DATA_WAY_OUT)
        return None
    # A checkpoint of an earlier dmt: its position still tells its steps per epoch once
    # an epoch has passed (global_step = epoch x steps per epoch + step in the epoch).
    epoch, step_in_epoch = trainer_state.get("epoch", 0), trainer_state.get("step_in_epoch", 0)
    done = trainer_state.get("global_step", 0) - step_in_epoch
    saved_steps = done // epoch if epoch and done % epoch == 0 else None
    if (saved_steps is not None and saved_steps != steps_per_epoch) \
            or step_in_epoch > steps_per_epoch:
        ran = (f"{saved_steps} optimizer steps per epoch" if saved_steps is not None
               else f"at least {step_in_epoch} optimizer steps per epoch")
        raise CheckpointError(
            f"checkpoint {path} was written by a run of {ran} (an earlier dmt, which did not "
            f"record its sample count); this launch reads {num_samples} samples in "
            f"{data_path}: {steps_per_epoch} steps per epoch. " + _SAME_DATA_WAY_OUT)
    return (f"checkpoint {path} was written by an earlier dmt, which did not record its "
            f"sample count: resuming on the assumption that {data_path} holds the "
            f"{num_samples} samples it was written with (each epoch's order depends on the "
            "count; a changed data set is only caught when it changes the steps per epoch)")


def _unreadable(path: Path, rank: int | None, data_rank: int | None) -> str | None:
    """The first of the files this rank will load that is damaged (torch.save writes zip
    archives, whose checksums testzip verifies), or None. rank None: every DeepSpeed file
    (what an export reads), no RNG state."""
    mine = [f for f in sorted(path.glob("*.pt"))
            if (f.name.startswith("rng_") and f.name == f"rng_rank{rank}.pt")
            or (not f.name.startswith("rng_")
                and ("zero_pp_rank_" not in f.name or data_rank is None
                     or f"zero_pp_rank_{data_rank}_" in f.name))]
    for file in mine:
        try:
            with zipfile.ZipFile(file) as archive:
                bad = archive.testzip()
            if bad is not None:
                return f"{file.name}: {bad} fails its checksum"
        except (zipfile.BadZipFile, OSError) as err:
            return f"{file.name}: {err}"
    return None


def load_checkpoint(engine, path: Path, rank: int, group=None) -> int:
    """Restores engine, optimizer and this rank's RNG; returns how many ranks found no RNG
    state of theirs (a checkpoint of fewer ranks, without ZeRO partitions). Each rank
    loads its own files (ZeRO partitions), so they are checked first and the ranks agree:
    one rank's damaged file stops every rank, before DeepSpeed's collectives could hang.
    The ranks agree again after DeepSpeed's load, which can fail on one rank only (an
    intact file of another run)."""
    data_rank = dist.get_rank(group) if dist.is_initialized() else 0
    failure = _unreadable(path, rank, data_rank)
    if any_rank(failure is not None, engine.device, group):
        where = f"rank {rank} found {failure}" if failure else "another rank found a damaged file"
        raise CheckpointError(f"checkpoint {path} is damaged: {where}; "
                              + _alternatives(path.parent.parent, path))
    failure = None
    try:
        load_path, client = engine.load_checkpoint(str(path.parent), tag=path.name)
        if load_path is None:
            failure = "DeepSpeed found nothing to load"
    except (torch.OutOfMemoryError, dist.DistError):
        raise  # the machine's trouble, not the files'
    except Exception as err:  # noqa: BLE001
        # Foreign files surface as any of torch's, pickle's or DeepSpeed's internal errors.
        failure = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:300]}"
    if any_rank(failure is not None, engine.device, group):
        where = f"rank {rank}: {failure}" if failure else "it failed on another rank"
        raise CheckpointError(f"DeepSpeed could not load the checkpoint in {path} ({where}); "
                              + _alternatives(path.parent.parent, path))
    rng_file = path / f"rng_rank{rank}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return ranks_agreeing(not rng_file.is_file(), engine.device, group)


def consolidated_student_state(ckpt_dir: Path) -> dict:
    """The full fp32 student state dict of a checkpoint, from any ZeRO stage (with ZeRO the
    fp32 master weights live in the optimizer partitions, so every one must be there)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {ckpt_dir}")
    check_complete(ckpt_dir, read_trainer_state(ckpt_dir))
    damaged = _unreadable(ckpt_dir, rank=None, data_rank=None)
    if damaged:
        raise CheckpointError(f"checkpoint {ckpt_dir} is damaged: {damaged}; "
                              + _alternatives(ckpt_dir.parent.parent, ckpt_dir))
    try:
        if _partition_ranks(ckpt_dir):
            state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir.parent),
                                                             tag=ckpt_dir.name)
        else:  # ZeRO stage 0: the module states file holds the whole model
            file = sorted(ckpt_dir.glob("mp_rank_*_model_states.pt"))[0]
            state = torch.load(file, map_location="cpu", weights_only=False)["module"]
    except Exception as err:  # noqa: BLE001 - foreign files fail in torch, pickle or DeepSpeed
        raise CheckpointError(f"could not read the student from {ckpt_dir} "
                              f"({type(err).__name__}: {(str(err).splitlines() or [''])[0][:300]}); "
                              + _alternatives(ckpt_dir.parent.parent, ckpt_dir)) from None
    return {k: v.float() for k, v in state.items()}


def export_student(ckpt_dir: Path, out: Path) -> Path:
    """Writes the student backbone as a timm state dict (.pth, or .safetensors by suffix)."""
    state = backbone_state_dict(consolidated_student_state(ckpt_dir))
    state = {k: v.contiguous() for k, v in state.items()}
    from safetensors import SafetensorError
    from safetensors.torch import save

    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        # Opened here, so the file gets the mode of any new file (0o666 minus the umask):
        # safetensors' save_file makes it private, which others on a shared disk cannot read.
        with open(tmp, "wb") as f:
            if out.suffix == ".safetensors":
                f.write(save(state))
            else:
                torch.save(state, f)
        os.replace(tmp, out)
    except (OSError, RuntimeError, SafetensorError) as err:
        with contextlib.suppress(OSError):  # (its folder may be what failed: a file, say)
            tmp.unlink(missing_ok=True)
        if isinstance(err, RuntimeError) and not is_write_failure(err):
            raise
        raise storage_error(out, err, "the exported student") from None
    return out
