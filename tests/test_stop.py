"""A stop signal (a scheduler's SIGTERM, a terminal's Ctrl-C) ends the run at the end of
the log window with a checkpoint; --resume auto then goes on from exactly there."""
import os
import signal
import subprocess
import sys
import time

import pytest

from dmt.data import write_sample_images
from dmt.engine.stop import StopRequest
from engine_utils import (PRETRAIN, REPO, check, clean_env, free_port, metrics, run_pretrain,
                          tiny_config)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_sample_images(tmp_path_factory.mktemp("images"), num_images=32, size=48,
                               seed=0, num_classes=2)


def _start_and_wait_for_a_window(command: list[str], run_dir) -> subprocess.Popen:
    """Starts a run in a session of its own; returns once its first log window is written."""
    process = subprocess.Popen(command, cwd=REPO, env=clean_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        file = run_dir / "metrics.jsonl"
        if file.is_file() and file.read_text().strip():
            break
        time.sleep(0.2)
    assert process.poll() is None, process.communicate()
    return process


def _signal_mid_run(config, signum: int, run_dir, whole_group: bool):
    """Starts a long run, waits for its first logged window, sends the signal (to the whole
    process group, as a terminal does, or to the trainer alone, as a scheduler may)."""
    process = _start_and_wait_for_a_window([sys.executable, str(PRETRAIN), "--config",
                                            str(config)], run_dir)
    if whole_group:
        os.killpg(process.pid, signum)
    else:
        process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=300)
    return process.returncode, stdout + stderr


@pytest.mark.slow
@pytest.mark.parametrize("signum, workers, whole_group", [(signal.SIGTERM, 0, False),
                                                           (signal.SIGINT, 2, True)])
def test_a_stop_signal_checkpoints_and_resumes(tmp_path, images, signum, workers, whole_group):
    name = signal.Signals(signum).name
    # 4 steps an epoch, 50 epochs: the run is far from done when the signal comes. A log
    # window of 6 steps (12 micro-batches) outlasts what the data workers prefetched (8),
    # so the loader must go on working after the signal.
    cfg = tiny_config(tmp_path, images, name="stop", run={"epochs": 50, "log_every": 6},
                      data={"num_workers": workers})
    run_dir = tmp_path / "runs" / "stop"
    code, output = _signal_mid_run(cfg, signum, run_dir, whole_group)
    assert code == 128 + signum, output
    rows = metrics(run_dir)
    stopped_at = rows[-1]["step"]
    # The stop comes at the end of a log window, with a checkpoint of that very step.
    assert stopped_at % 6 == 0 and [r["step"] for r in rows] == list(range(1, stopped_at + 1))
    assert f"stopped by {name} at step {stopped_at} of 200" in output
    assert output.count(f"{name} received") == 1  # the trainer's notice, not each worker's
    tag = f"step{stopped_at:08d}"
    assert (run_dir / "checkpoints" / "latest").read_text() == tag
    assert "Traceback" not in output
    assert not (run_dir / "student_vit_tiny_patch16_224.pth").exists()  # not finished
    result = check(run_pretrain(cfg, "--resume", "auto", f"run.max_steps={stopped_at + 2}"))
    assert "resumed from" in result.stdout and f"at step {stopped_at} " in result.stdout
    assert [r["step"] for r in metrics(run_dir)] == list(range(1, stopped_at + 3))


def _worker_of_rank(launcher: int, rank: int) -> int | None:
    """The pid of the launcher's child process that runs `rank` (Linux /proc; torchrun
    starts each worker in a session of its own)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
            if parent != launcher:
                continue
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
        except (OSError, ValueError, IndexError):
            continue
        if env.get(b"RANK") == str(rank).encode():
            return int(entry)
    return None


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="finds the rank's process in /proc (Linux)")
def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(tmp_path, images):
    """A scheduler may signal one process first: the ranks agree at the window's end, so
    all of them checkpoint the same step and stop."""
    cfg = tiny_config(tmp_path, images, name="one", run={"epochs": 50, "log_every": 3})
    run_dir = tmp_path / "runs" / "one"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                f"--master_port={free_port()}", str(PRETRAIN), "--config", str(cfg)]
    process = _start_and_wait_for_a_window(launcher, run_dir)
    rank1 = _worker_of_rank(process.pid, 1)
    assert rank1 is not None
    os.kill(rank1, signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=300)
    output = stdout + stderr
    assert process.returncode != 0  # torchrun reports its workers' 143
    rows = metrics(run_dir)
    stopped_at = rows[-1]["step"]
    assert stopped_at % 3 == 0 and stopped_at < 200, output
    assert f"stopped by SIGTERM at step {stopped_at} of 200" in output  # said by rank 0
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step{stopped_at:08d}"
    assert sorted(p.name for p in (run_dir / "checkpoints" / f"step{stopped_at:08d}")
                  .glob("rng_rank*.pt")) == ["rng_rank0.pt", "rng_rank1.pt"]


# In-process checks of the handler itself (fast; no run launched). signal.raise_signal
# delivers synchronously, so the handler has run when it returns.

def test_a_second_ctrl_c_stops_at_once():
    """The first Ctrl-C only records the request; the second raises KeyboardInterrupt so
    a user can still stop at once, without waiting for the window's end."""
    stop = StopRequest(announce=False).install()
    try:
        signal.raise_signal(signal.SIGINT)
        assert stop.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    finally:
        stop.restore()


def test_the_first_stop_signal_is_the_one_kept():
    """A SIGTERM after a Ctrl-C does not overwrite the recorded signal: the run reports
    (and exits with) the signal that asked first."""
    stop = StopRequest(announce=False).install()
    try:
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGTERM)  # not a second Ctrl-C: no KeyboardInterrupt
        assert stop.signum == signal.SIGINT
    finally:
        stop.restore()


def test_restore_reinstalls_the_previous_handlers():
    """After the run, the handlers that were there before (a caller's own) come back."""

    def mine(_signum, _frame):
        pass

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        signal.signal(signal.SIGTERM, mine)
        stop = StopRequest(announce=False).install()
        assert signal.getsignal(signal.SIGTERM) != mine
        stop.restore()
        assert signal.getsignal(signal.SIGTERM) is mine
        assert signal.getsignal(signal.SIGINT) is before[signal.SIGINT]
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
