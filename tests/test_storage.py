"""A full disk, a file-size limit or a failed write loses no checkpoint, leaves no partial
file behind, and stops the run with one line that says what is safe."""
import errno
import json
import os
import resource
import subprocess
import sys

import pytest
import torch

from dmt.data import write_sample_images
from dmt.engine import checkpoint as ckpt
from dmt.engine.logger import RunLogger, drop_rows_after
from dmt.errors import CheckpointError, StorageError
from engine_utils import PRETRAIN, REPO, check, clean_env, run_pretrain, tiny_config


class _Engine:
    """What save_checkpoint asks of a DeepSpeed engine; `fail` makes the write break
    half-way, as a full disk does (torch.save raises RuntimeError there)."""

    device = "cpu"

    def __init__(self, fail: bool = False, partitions=()):
        self.fail, self.partitions = fail, partitions

    def save_checkpoint(self, root, tag, client_state, save_latest):
        folder = os.path.join(root, tag)
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "mp_rank_00_model_states.pt"), "wb") as f:
            f.write(b"x" * 1000)
        for r in self.partitions:  # ZeRO: this rank's optimizer partition
            with open(os.path.join(folder, f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt"),
                      "wb") as f:
                f.write(b"x")
        if self.fail:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1000")


def _save(root, step, engine):
    return ckpt.save_checkpoint(engine, root, step, {"global_step": step}, rank=0, keep_last=2)


def test_a_failed_save_keeps_the_last_checkpoint_and_frees_its_space(tmp_path):
    root = tmp_path / "checkpoints"
    first = _save(root, 2, _Engine())
    with pytest.raises(StorageError, match=r"cannot write checkpoint step00000004 to "
                       rf"{root}/.tmp/step00000004 \(the file was cut short: a full disk, a quota or "
                       r"a file-size limit; \d+ MiB free"):
        _save(root, 4, _Engine(fail=True))
    assert not (root / ".tmp" / "step00000004").exists()  # the part written is gone
    assert (root / ckpt.LATEST).read_text() == "step00000002"
    assert ckpt.complete_checkpoints(tmp_path) == [first]
    # A save that died with its process leaves .tmp/<tag>; the next save of any step
    # removes it (here step 6, not the step that was cut short).
    (root / ".tmp" / "step00000004").mkdir(parents=True)
    (root / ".tmp" / "step00000004" / "part").write_bytes(b"x" * 100)
    _save(root, 6, _Engine())
    assert not (root / ".tmp").exists()


class _Clock:
    """Stands in for the time module in checkpoint.py: sleeping advances it at once, and
    may first run `on_sleep` (files that show up late on a network filesystem)."""

    def __init__(self):
        self.now, self.on_sleep = 0.0, None

    def monotonic(self):
        return self.now

    def sleep(self, seconds):
        if self.on_sleep:
            self.on_sleep()
        self.now += seconds


def test_a_save_rank_0_cannot_see_whole_is_refused_at_the_first_checkpoint(tmp_path,
                                                                          monkeypatch):
    """run.output_dir on a node-local disk (the same path on every node): rank 0 sees only
    its node's part. The run used to write such checkpoints until the end, when the export
    found that none could be resumed; now the first save stops it, and the last good
    checkpoint stays the latest."""
    root = tmp_path / "checkpoints"
    _save(root, 2, _Engine())
    clock = _Clock()
    monkeypatch.setattr(ckpt, "time", clock)
    state = {"student_ranks": 2, "zero_stage": 2}
    with pytest.raises(CheckpointError, match=r"checkpoint step00000004: rank 0 does not see "
                       r"rng_rank1.pt, the ZeRO partition of rank 1 in .*step00000004: "
                       r"run.output_dir must be a folder every node shares"):
        ckpt.save_checkpoint(_Engine(partitions=[0]), root, 4, state, rank=0, keep_last=2)
    assert clock.now >= 120  # looked again before giving up
    assert (root / ckpt.LATEST).read_text() == "step00000002"
    assert not (root / "step00000004").exists() and not (root / ".tmp").exists()
    # Rank 1's files showing up late (attribute caching on NFS) are waited for.
    part = root / ".tmp" / "step00000006"
    clock.on_sleep = lambda: [(part / name).write_bytes(b"x") for name in
                              ("rng_rank1.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt")]
    final = ckpt.save_checkpoint(_Engine(partitions=[0]), root, 6, state, rank=0, keep_last=2)
    assert (root / ckpt.LATEST).read_text() == "step00000006"
    assert (final / "rng_rank1.pt").is_file()


def test_retention_deletes_only_the_checkpoints_it_wrote(tmp_path):
    """A user's copy named like a checkpoint (step00000002.keep) is not one of the run's."""
    root = tmp_path / "checkpoints"
    _save(root, 2, _Engine())
    os.rename(root / "step00000002", root / "step00000002.keep")
    for step in (4, 6, 8):
        _save(root, step, _Engine())
    assert sorted(p.name for p in root.iterdir()) == [
        "latest", "step00000002.keep", "step00000006", "step00000008"]
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path)] == ["step00000006",
                                                                     "step00000008"]


def test_write_atomic_keeps_the_old_file_and_no_temporary_one(tmp_path, monkeypatch):
    target = tmp_path / "latest"
    target.write_text("step00000002")

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ckpt.os, "fsync", full)
    with pytest.raises(StorageError, match=rf"cannot write {target} \(No space left on device"):
        ckpt.write_atomic(target, b"step00000004")
    assert target.read_text() == "step00000002"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest"]


def test_a_failed_export_leaves_the_old_file_and_no_partial_one(tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt, "consolidated_student_state",
                        lambda path: {"backbone.pos_embed": torch.zeros(1, 2, 3)})
    out = tmp_path / "student.pth"
    out.write_bytes(b"old")

    def cut_short(state, file):  # export_student hands torch.save the file it opened
        file.write(b"x" * 10)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 10")

    monkeypatch.setattr(ckpt.torch, "save", cut_short)
    with pytest.raises(StorageError, match=rf"cannot write the exported student {out}"):
        ckpt.export_student(tmp_path / "ckpt", out)
    assert out.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student.pth"]


def test_a_metrics_write_that_fails_names_the_file(tmp_path):
    log = RunLogger(tmp_path, 10, enabled=True, progress=False, tensorboard=False)
    log.metrics.close()
    log.metrics = open("/dev/full", "w", buffering=1)  # every write: ENOSPC
    row = {"step": 1, "total_steps": 10, "epoch": 0, "loss": 1.0, "lr": 0.1, "img_per_s": 1.0}
    with pytest.raises(StorageError, match=r"cannot write the metrics /dev/full \(No space"):
        log.log_steps([row])


def _rows(*steps):
    return "".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in steps)


def test_a_restart_drops_exactly_the_rows_after_its_step(tmp_path):
    """A resume from step 2 redoes step 3: its one old row goes, rows 1..2 stay as they
    were; a line cut short by a crash goes too (each case dropping a single line)."""
    metrics_file = tmp_path / "metrics.jsonl"
    metrics_file.write_text(_rows(1, 2, 3))
    assert drop_rows_after(metrics_file, 2) == 1
    assert metrics_file.read_text() == _rows(1, 2)
    metrics_file.write_text(_rows(1, 2) + '{"step": 3, "lo')
    assert drop_rows_after(metrics_file, 2) == 1
    assert metrics_file.read_text() == _rows(1, 2)
    assert drop_rows_after(metrics_file, 2) == 0 and metrics_file.read_text() == _rows(1, 2)


def test_a_failed_metrics_rewrite_keeps_the_old_file_and_no_temporary_one(tmp_path, monkeypatch):
    """The rewrite is atomic: where it fails (a full disk), the old rows stay whole, the
    temporary file goes, and the error names metrics.jsonl."""
    metrics_file = tmp_path / "metrics.jsonl"
    metrics_file.write_text(_rows(1, 2, 3))

    def full(src, dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(StorageError, match=rf"cannot write the metrics {metrics_file} \(No space"):
        drop_rows_after(metrics_file, 1)
    assert metrics_file.read_text() == _rows(1, 2, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_the_plain_progress_line_reports_the_last_step_of_the_window(tmp_path, capsys):
    """Without a progress bar (batch jobs) each flush prints one line for the newest step
    of the window, not the oldest."""
    log = RunLogger(tmp_path, 10, enabled=True, progress=False, tensorboard=False)
    rows = [{"step": s, "total_steps": 10, "epoch": 0, "loss": 1.0 / s, "lr": 0.1,
             "img_per_s": 8.0} for s in (1, 2, 3)]
    capsys.readouterr()
    log.log_steps(rows)
    log.close()
    out = capsys.readouterr().out
    assert out.count("step ") == 1 and "step 3/10 " in out and "loss 0.3333" in out, out
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").open()] == [1, 2, 3]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_sample_images(tmp_path_factory.mktemp("images"), num_images=16, size=48,
                               seed=0, num_classes=2)


def test_a_run_that_cannot_write_its_checkpoint_stops_with_one_line(tmp_path, images):
    """A file-size limit (as a quota or a full disk would) hits the step-4 save: exit 2,
    one line naming the save, the reason and the checkpoint that is intact."""
    cfg = tiny_config(tmp_path, images, run={"max_steps": 2, "checkpoint_every": 2})
    check(run_pretrain(cfg))
    run_dir = tmp_path / "runs" / "run"
    limit = 2**20  # far below a checkpoint, above the metrics and logs

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    result = subprocess.run([sys.executable, str(PRETRAIN), "--config", str(cfg),
                             "--resume", "auto", "run.max_steps=4"], cwd=REPO, env=clean_env(),
                            capture_output=True, text=True, timeout=600, preexec_fn=limited)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("dmt: error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"cannot write checkpoint step00000004 to {run_dir}/checkpoints/.tmp" in errors[0]
    assert "the file was cut short" in errors[0]
    last = f"{run_dir}/checkpoints/step00000002"
    assert f"the last complete checkpoint, {last}, is intact" in errors[0]
    assert f"then --resume {last} continues from it" in errors[0]
    assert not (run_dir / "checkpoints" / ".tmp").exists()
    assert (run_dir / "checkpoints" / "latest").read_text() == "step00000002"
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").open()]
    assert steps == [1, 2, 3, 4]  # the steps trained before the save, as the log showed


def test_a_save_cut_before_its_pointer_leaves_the_pointer_on_a_complete_checkpoint(
        tmp_path, monkeypatch):
    """The pointer changes last: a save that fails renaming its directory, or writing the
    pointer, leaves `latest` naming the previous complete checkpoint."""
    root = tmp_path / "checkpoints"
    _save(root, 2, _Engine())
    real_replace = ckpt.os.replace

    def rename_fails(src, dst):  # the finished part's rename only
        if str(src).endswith(".tmp/step00000004"):
            raise OSError(errno.EACCES, os.strerror(errno.EACCES))
        real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", rename_fails)
    with pytest.raises(StorageError, match="cannot write checkpoint step00000004 to"):
        _save(root, 4, _Engine())
    assert ckpt.find_checkpoint("auto", tmp_path).name == "step00000002"
    assert not (root / ".tmp").exists()  # the part went at once
    # The same step saved again (after a resume from an older checkpoint): a failed rename
    # puts the step's earlier save back.
    monkeypatch.setattr(ckpt.os, "replace", real_replace)
    _save(root, 4, _Engine())
    (root / "step00000004" / "earlier").write_text("kept")
    monkeypatch.setattr(ckpt.os, "replace", rename_fails)
    with pytest.raises(StorageError, match="cannot write checkpoint step00000004 to"):
        _save(root, 4, _Engine())
    assert (root / "step00000004" / "earlier").read_text() == "kept"
    assert not (root / ".tmp").exists()
    (root / ckpt.LATEST).write_text("step00000002")

    def pointer_fails(src, dst):
        if str(dst).endswith(ckpt.LATEST):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", pointer_fails)
    with pytest.raises(StorageError, match=f"cannot write {root}/latest"):
        _save(root, 6, _Engine())
    assert (root / ckpt.LATEST).read_text() == "step00000002"
    assert ckpt.find_checkpoint("auto", tmp_path).name == "step00000002"  # the pointer rules
    assert not (root / ".tmp").exists()


def test_an_error_that_is_not_the_disks_is_not_called_a_storage_failure(tmp_path):
    """A collective that times out or memory that runs out during a save raise
    RuntimeError too: they pass through as they are, not as "cannot write"."""
    class Stalled(_Engine):
        def save_checkpoint(self, root, tag, client_state, save_latest):
            raise RuntimeError("[/pytorch/gloo] Timed out waiting 1800000ms for recv")

    with pytest.raises(RuntimeError, match="Timed out waiting") as failure:
        _save(tmp_path / "checkpoints", 2, Stalled())
    assert not isinstance(failure.value, StorageError)


def test_retention_counts_only_up_to_the_step_just_saved(tmp_path):
    """After a resume from an older checkpoint (step 3 saved while 4 and 6 exist), the
    later ones stay, and keep_last counts the ones up to step 3."""
    root = tmp_path / "checkpoints"
    for step in (2, 3, 4, 6):
        (root / ckpt.checkpoint_tag(step)).mkdir(parents=True)
    names = lambda: sorted(p.name for p in root.iterdir())  # noqa: E731
    ckpt._prune(root, "step00000003", keep_last=2)
    assert names() == ["step00000002", "step00000003", "step00000004", "step00000006"]
    ckpt._prune(root, "step00000003", keep_last=1)
    assert names() == ["step00000003", "step00000004", "step00000006"]


def test_the_random_state_round_trips():
    """What a checkpoint restores: Python's, NumPy's and torch's generators."""
    import random

    import numpy as np
    state = ckpt.rng_state()
    draws = (random.random(), np.random.rand(), torch.rand(3))
    random.random(), np.random.rand(), torch.rand(3)  # move on
    ckpt.set_rng_state(state)
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert draws[:2] == again[:2] and torch.equal(draws[2], again[2])


def test_log_lines_stay_whole_in_a_log_file(tmp_path, capsys):
    """Not a terminal (a job's log file): a message is one line, whatever its length, so
    grep finds it; the summary table wraps a long path in its cell rather than cut it."""
    log = RunLogger(tmp_path, 10, enabled=True, progress=False, tensorboard=False,
                    metrics=False)
    message = "resumed from " + "/a-long-folder" * 20 + " at step 2"
    log.info(message)
    log.warn(message)
    assert capsys.readouterr().out.splitlines() == [message, f"WARNING {message}"]
    path = "/runs/" + "x" * 150 + "/demo"
    log.summary({"run directory": path, "steps": "6 / 6"})
    table = capsys.readouterr().out
    assert max(len(line) for line in table.splitlines()) <= 80
    assert path in "".join(c for c in table if c not in " │\n")
