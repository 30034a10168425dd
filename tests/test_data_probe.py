"""The up-front probe of an image folder (DALI): cached across launches by (path, size,
mtime), split across gloo ranks, and robust to a damaged cache. Expectations come from
PIL directly and from the names of the files the tests corrupt."""
import json
import logging
import os
import shutil
import threading
import time
from datetime import timedelta

import numpy as np
import pytest
from PIL import Image

from dmt.config import load_config
from dmt.data import build_loader, probe, write_sample_images
from dmt.data.folder import scan_image_folder
from dmt.errors import ConfigError, DataError
from engine_utils import free_port

BAD = ("truncated.jpg", "empty.jpg")


def _make_folder(folder):
    write_sample_images(folder, num_images=10, size=48, num_classes=2)
    good = sorted(folder.rglob("*.jpg"))
    data = good[0].read_bytes()
    (folder / "class_0" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "class_1" / "empty.jpg").write_bytes(b"")
    return folder


@pytest.fixture
def folder(tmp_path):
    return _make_folder(tmp_path / "images")


def expected(folder):
    """(heights, widths, bad names) straight from PIL and from what the tests corrupted."""
    files = scan_image_folder(folder).files
    heights, widths = [], []
    for f in files:
        if f.name in BAD:
            heights.append(0), widths.append(0)
            continue
        with Image.open(f) as image:
            widths.append(image.width), heights.append(image.height)
    return heights, widths, {str(f) for f in files if f.name in BAD}


class Counter:
    """Counts the decodes: wraps dmt.data.images.probe_image (thread-safe)."""

    def __init__(self, monkeypatch):
        from dmt.data import images
        self.paths, self._lock, real = [], threading.Lock(), images.probe_image

        def counting(path):
            with self._lock:
                self.paths.append(os.path.basename(path))
            return real(path)
        monkeypatch.setattr(images, "probe_image", counting)

    def take(self) -> list:
        paths, self.paths = sorted(self.paths), []
        return paths


def run(folder, cache):
    return probe.probe_folder(scan_image_folder(folder), cache=cache, num_threads=2)


def same(a, b) -> bool:
    return (np.array_equal(a.heights, b.heights) and np.array_equal(a.widths, b.widths)
            and a.bad == b.bad)


def check_against_pil(result, folder):
    heights, widths, bad = expected(folder)
    assert result.heights.tolist() == heights and result.widths.tolist() == widths
    assert {path for path, _ in result.bad} == bad
    assert all(reason for _, reason in result.bad)


def test_second_launch_reads_the_cache_and_decodes_nothing(folder, monkeypatch):
    calls = Counter(monkeypatch)
    first = run(folder, "auto")
    n = len(scan_image_folder(folder))
    assert len(calls.take()) == n and first.probed == n
    assert (folder / probe.CACHE_NAME).is_file()
    check_against_pil(first, folder)

    second = run(folder, "auto")
    assert calls.take() == [] and second.probed == 0
    assert same(first, second)
    check_against_pil(second, folder)


def test_changed_new_and_removed_files(folder, monkeypatch):
    cache = folder.parent / "index.json"
    calls = Counter(monkeypatch)
    run(folder, str(cache))
    calls.take()
    files = sorted((folder / "class_1").glob("img_*.jpg"))
    changed, removed = files[0], files[1]
    Image.new("RGB", (33, 21), (200, 30, 30)).save(changed, quality=80)  # other size, bytes
    removed.unlink()
    shutil.copy(files[2], folder / "class_0" / "new.jpg")

    third = run(folder, str(cache))
    assert calls.take() == sorted([changed.name, "new.jpg"])
    assert third.probed == 2
    check_against_pil(third, folder)  # the corrupt files still named, now from the cache
    index = json.loads(cache.read_text())
    assert removed.relative_to(folder).as_posix() not in index["files"]
    assert "class_0/new.jpg" in index["files"]
    row = index["files"].index(changed.relative_to(folder).as_posix())
    assert (index["height"][row], index["width"][row]) == (21, 33)
    assert index["bytes"][row] == changed.stat().st_size
    assert run(folder, str(cache)).probed == 0 and calls.take() == []


def test_a_read_error_is_reported_but_not_remembered(folder, monkeypatch):
    """An I/O error (errno set) may not repeat: that file is probed again next launch."""
    import errno

    from dmt.data import images
    victim = sorted((folder / "class_0").glob("img_*.jpg"))[0]
    real = images.probe_image

    def flaky(path):
        if os.path.basename(path) == victim.name:
            raise OSError(errno.EIO, "Input/output error", str(path))
        return real(path)
    monkeypatch.setattr(images, "probe_image", flaky)
    first = run(folder, "auto")
    assert str(victim) in {path for path, _ in first.bad}
    monkeypatch.setattr(images, "probe_image", real)
    calls = Counter(monkeypatch)
    second = run(folder, "auto")
    assert calls.take() == [victim.name] and second.probed == 1
    check_against_pil(second, folder)


@pytest.mark.parametrize("damage", [b"{not json", b'{"format": "dmt-probe-cache", "version": 3, '
                                    b'"files": ["a.jpg"], "bytes": [], "mtime_ns": [1], '
                                    b'"height": [1], "width": [1], "reasons": {}}',
                                    b"\xff\xfe\x00garbage", b"[1, 2, 3]",
                                    # an older dmt's: its verdicts predate the PNG IEND check
                                    b'{"format": "dmt-probe-cache", "version": 2, "files": [], '
                                    b'"bytes": [], "mtime_ns": [], "height": [], "width": [], '
                                    b'"reasons": {}}'])
def test_a_damaged_cache_is_ignored_with_a_warning(folder, monkeypatch, caplog, damage):
    cache = folder / probe.CACHE_NAME
    cache.write_bytes(damage)
    calls = Counter(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="dmt.data.probe"):
        result = run(folder, "auto")
    assert "ignoring the probe cache" in caplog.text and str(cache) in caplog.text
    assert len(calls.take()) == len(scan_image_folder(folder))
    check_against_pil(result, folder)
    assert json.loads(cache.read_text())["format"] == "dmt-probe-cache"  # replaced by a good one
    assert run(folder, "auto").probed == 0


def test_cache_off_and_cache_locations(folder, monkeypatch, tmp_path):
    calls = Counter(monkeypatch)
    n = len(scan_image_folder(folder))
    for off in ("off", None, False, "null"):
        assert probe.cache_path(folder, off) is None
    run(folder, "off"), run(folder, None)
    assert len(calls.take()) == 2 * n and not (folder / probe.CACHE_NAME).exists()
    assert probe.cache_path(folder, "auto") == folder / probe.CACHE_NAME
    assert probe.cache_path(folder, True) == folder / probe.CACHE_NAME
    assert probe.cache_path(folder, str(tmp_path / "x.json")) == tmp_path / "x.json"
    # A read-only data folder (root ignores permissions: pretend): the user's cache dir.
    monkeypatch.setattr(probe.os, "access", lambda path, mode: False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    elsewhere = probe.cache_path(folder, "auto")
    assert elsewhere.parent == tmp_path / "xdg" / "dmt"
    run(folder, "auto")
    assert elsewhere.is_file() and not (folder / probe.CACHE_NAME).exists()
    calls.take()
    assert run(folder, "auto").probed == 0 and calls.take() == []
    with pytest.raises(ConfigError):
        probe.cache_path(folder, 3)


def test_an_unwritable_folder_falls_back_to_the_user_cache(folder, monkeypatch, tmp_path,
                                                          caplog):
    """os.access says the folder is writable, yet writing fails (root-squashed NFS): the
    index goes to the user's cache dir, and later launches use it without a warning."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    real, written = probe._write_index, []

    def squashed(path, *args):
        written.append(path)
        if path.parent == folder:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *args)
    monkeypatch.setattr(probe, "_write_index", squashed)
    calls = Counter(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="dmt.data.probe"):
        first = run(folder, "auto")
        check_against_pil(first, folder)
        elsewhere = list((tmp_path / "xdg" / "dmt").glob("*.json"))
        assert len(elsewhere) == 1 and written == [folder / probe.CACHE_NAME, elsewhere[0]]
        calls.take(), written.clear()
        assert run(folder, "auto").probed == 0 and calls.take() == [] and written == []
        shutil.copy(next(folder.rglob("img_*.jpg")), folder / "class_0" / "new.jpg")  # a change
        assert run(folder, "auto").probed == 1 and written == elsewhere  # the folder: not again
    assert caplog.text == ""


def test_the_index_file_mode_follows_the_umask(folder):
    old = os.umask(0o027)
    try:
        run(folder, "auto")
    finally:
        os.umask(old)
    assert (folder / probe.CACHE_NAME).stat().st_mode & 0o777 == 0o640
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_a_file_rewritten_in_place_at_the_same_size_is_probed_again(folder, monkeypatch):
    """The size alone cannot tell a rewritten file: the mtime is part of the key. A good
    JPEG overwritten by as many zero bytes (then a later mtime) is probed, and now bad."""
    cache = folder.parent / "index.json"
    run(folder, str(cache))
    victim = sorted((folder / "class_0").glob("img_*.jpg"))[0]
    before = victim.stat()
    victim.write_bytes(bytes(before.st_size))
    os.utime(victim, ns=(before.st_atime_ns, before.st_mtime_ns + 10 ** 10))
    assert victim.stat().st_size == before.st_size
    calls = Counter(monkeypatch)
    again = run(folder, str(cache))
    assert calls.take() == [victim.name] and again.probed == 1
    assert str(victim) in {path for path, _ in again.bad}


def test_a_removal_alone_rewrites_the_index_and_no_change_leaves_it_alone(folder, monkeypatch):
    """Nothing to probe, yet a file went away: the index drops it (else it grows with
    every file ever removed). With no change at all the index file is not rewritten."""
    cache = folder.parent / "index.json"
    run(folder, str(cache))
    written = cache.stat().st_mtime_ns, cache.stat().st_ino
    calls = Counter(monkeypatch)
    assert run(folder, str(cache)).probed == 0
    assert (cache.stat().st_mtime_ns, cache.stat().st_ino) == written
    removed = sorted((folder / "class_1").glob("img_*.jpg"))[0]
    removed.unlink()
    assert run(folder, str(cache)).probed == 0 and calls.take() == []
    files = json.loads(cache.read_text())["files"]
    assert "class_1/" + removed.name not in files
    assert sorted(files) == sorted(f.relative_to(folder).as_posix()
                                   for f in scan_image_folder(folder).files)


def test_the_folders_index_wins_over_one_in_the_user_cache(folder, monkeypatch, tmp_path):
    """Where both exist (the folder became writable after a fallback, say), the index
    in the folder is the one read and kept up to date; the user cache's is left alone."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    run(folder, "auto")
    user = probe._user_cache_path(folder)
    assert user.parent == tmp_path / "xdg" / "dmt"
    user.parent.mkdir(parents=True)
    stale = {"format": "dmt-probe-cache", "version": 3, "files": [], "bytes": [],
             "mtime_ns": [], "height": [], "width": [], "reasons": {}}
    user.write_text(json.dumps(stale))
    calls = Counter(monkeypatch)
    assert run(folder, "auto").probed == 0 and calls.take() == []  # read from the folder
    shutil.copy(next(folder.rglob("img_*.jpg")), folder / "class_0" / "new.jpg")
    assert run(folder, "auto").probed == 1 and calls.take() == ["new.jpg"]
    assert "class_0/new.jpg" in json.loads((folder / probe.CACHE_NAME).read_text())["files"]
    assert json.loads(user.read_text()) == stale


def test_a_failed_index_write_leaves_no_temporary_file(folder, monkeypatch, caplog):
    """A full disk while writing the index: a warning, the probe's result still right,
    and no half-written temporary file beside the index."""
    import errno
    cache = folder.parent / "index.json"

    def full(src, dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "replace", full)
    with caplog.at_level(logging.WARNING, logger="dmt.data.probe"):
        result = run(folder, str(cache))
    check_against_pil(result, folder)
    assert "could not write the probe cache" in caplog.text and str(cache) in caplog.text
    assert sorted(p.name for p in folder.parent.iterdir()) == ["images"]


def test_a_missing_folder_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        probe.probe_image_folder(tmp_path / "nowhere", cache="off")


def test_config_key():
    assert load_config()["data"]["probe_cache"] == "auto"
    for value, parsed in (("off", False), ("null", None), ("/tmp/p.json", "/tmp/p.json")):
        assert load_config(overrides=[f"data.probe_cache={value}"])["data"]["probe_cache"] == parsed
    with pytest.raises(ConfigError, match="data.probe_cache"):
        load_config(overrides=["data.probe_cache=3"])
    with pytest.raises(ConfigError, match="did you mean 'data.probe_cache'"):
        load_config(overrides=["data.probe_cahce=off"])


def test_dali_loader_uses_the_cache(folder, monkeypatch):
    pytest.importorskip("nvidia.dali")
    calls = Counter(monkeypatch)
    first = build_loader("dali", folder, 2, image_size=32, num_workers=1, drop_last=False)
    assert len(calls.take()) == len(scan_image_folder(folder))
    second = build_loader("dali", folder, 2, image_size=32, num_workers=1, drop_last=False)
    assert calls.take() == []
    _, _, bad = expected(folder)
    assert set(first.skipped_files) == set(second.skipped_files) == bad
    assert first.files == second.files and np.array_equal(first.heights, second.heights)
    assert next(iter(second))["teacher"].shape == (2, 3, 32, 32)
    off = build_loader("dali", folder, 2, image_size=32, num_workers=1, probe_cache="off")
    assert len(calls.take()) == len(scan_image_folder(folder)) and off.files == first.files


# --- two gloo processes ---

def _worker(rank, world, port, folder, out_dir):
    import torch.distributed as dist

    from dmt.data import images
    from dmt.data import probe as probe_module

    decoded, real = [], images.probe_image
    images.probe_image = lambda path: decoded.append(os.path.basename(path)) or real(path)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=60))
    rounds = []
    for launch in range(2):  # the second "launch" finds the index rank 0 wrote
        probe_module._SHARED.clear()  # a new launch is a new process
        result = run(folder, "auto")
        # A dedicated teacher rank builds one loader per student it serves: rank 1 probes
        # twice, rank 0 once; the second probe must not enter a collective (no deadlock).
        again = run(folder, "auto") if rank == 1 else result
        rounds.append({"heights": result.heights.tolist(), "widths": result.widths.tolist(),
                       "bad": result.bad, "probed": result.probed, "decoded": sorted(decoded),
                       "again_same": same(result, again)})
        decoded.clear()
        dist.barrier()
    dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(rounds, f)


@pytest.mark.slow
def test_two_gloo_ranks_split_the_probe_and_agree(tmp_path):
    import torch.multiprocessing as mp

    folder = _make_folder(tmp_path / "images")
    single = run(folder, "off")  # the one-process result to match
    mp.start_processes(_worker, args=(2, free_port(), str(folder), str(tmp_path)), nprocs=2,
                       start_method="spawn", join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    files = scan_image_folder(folder).files
    for r, rounds in enumerate(ranks):
        first, second = rounds
        for launch in rounds:
            assert launch["heights"] == single.heights.tolist()
            assert launch["widths"] == single.widths.tolist()
            assert [tuple(b) for b in launch["bad"]] == single.bad
            assert launch["again_same"]
        assert first["probed"] == len(files)  # both ranks' decodes together
        assert first["decoded"] == sorted(f.name for f in files[r::2])  # its half only
        assert second["probed"] == 0 and second["decoded"] == []
    check_against_pil(single, folder)


def _missing_worker(rank, world, port, paths, out_dir):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=30))
    start = time.monotonic()
    try:
        probe.probe_image_folder(paths[rank], cache="off", num_threads=2)
        outcome = {"error": None}
    except Exception as error:  # noqa: BLE001  (reported to the test)
        outcome = {"error": type(error).__name__, "message": str(error)}
    outcome["seconds"] = time.monotonic() - start
    with open(os.path.join(out_dir, f"missing{rank}.json"), "w") as f:
        json.dump(outcome, f)
    dist.destroy_process_group()


@pytest.mark.slow
def test_a_folder_missing_on_one_rank_fails_every_rank_at_once(tmp_path):
    """Rank 1's folder does not exist: its scan fails inside the collective, so rank 0
    raises the same DataError instead of waiting in the gather until the timeout (30 s
    here: a regression shows as a timeout error, or as this test's own deadline)."""
    import multiprocessing

    paths = [str(_make_folder(tmp_path / "images")), str(tmp_path / "missing")]
    spawn = multiprocessing.get_context("spawn")
    port = free_port()
    workers = [spawn.Process(target=_missing_worker, args=(r, 2, port, paths, str(tmp_path)))
               for r in range(2)]
    for worker in workers:
        worker.start()
    deadline = time.monotonic() + 120  # two spawned processes importing torch, slowly
    for worker in workers:
        worker.join(max(0.0, deadline - time.monotonic()))
    hung = [w for w in workers if w.is_alive()]
    for worker in hung:
        worker.kill()
        worker.join()
    assert not hung, "a rank still waits in the probe's collective"
    for rank in range(2):
        outcome = json.loads((tmp_path / f"missing{rank}.json").read_text())
        assert outcome["error"] == "DataError", outcome
        assert "failed on rank 1" in outcome["message"] and "does not exist" in outcome["message"]
        assert paths[1] in outcome["message"]
        assert outcome["seconds"] < 25  # not the gloo timeout
