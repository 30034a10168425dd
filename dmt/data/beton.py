"""Write an FFCV .beton from an image folder (used by launch/make_beton.py).

Every file is probed first (dmt.data.probe, with the same cache as the DALI backend, so
a folder probed by either is not decoded again): FFCV's writer cannot skip a sample once
it has started, so undecodable files are left out up front and reported by name.
Decodable greyscale, CMYK and RGBA images are stored as RGB.

FFCV's writer forks its workers; forked from a process that already runs threads
(DALI, OpenMP, a thread pool) a worker can inherit a held lock and hang forever,
and the writer with it. So the writer runs in a fresh Python process
(`python -m dmt.data.beton`, arguments as JSON on stdin).

FFCV's writer also waits forever when one of its workers raises. There, a worker that
fails on a file names it (a small JSON file) and the writer ends; the file is then a
counted skip and the .beton is written again without it.
"""
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dmt.data.folder import IMAGE_EXTENSIONS, scan_image_folder
from dmt.data.images import open_rgb
from dmt.data.probe import probe_folder
from dmt.errors import DataError


@dataclass
class BetonReport:
    path: Path
    written: int
    classes: list
    skipped: list = field(default_factory=list)  # [(path, reason)]
    probed: int = 0  # files decoded by the probe now; the others came from its cache


# The file a writer worker is on, named if the worker fails (each worker is a process).
_CURRENT = None

# A worker that keeps failing on file after file is no bad file: stop retrying after these.
_MAX_WRITE_FAILURES = 8


class _RGBFolder:
    """Indexable (image HWC uint8 RGB, label) pairs, as FFCV's writer reads them."""

    def __init__(self, files, labels, max_side):
        self.files, self.labels, self.max_side = [str(f) for f in files], labels, max_side

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        global _CURRENT
        _CURRENT = self.files[i]
        return _shrink(np.asarray(open_rgb(self.files[i])), self.max_side), int(self.labels[i])


def _shrink(pixels: np.ndarray, max_side):
    """FFCV's own shrink (OpenCV area resize, sides rounded down), but no side below 1 px:
    FFCV makes a 4000x50 image 64x0 at max_side 64, and OpenCV raises on it. FFCV then
    finds the longer side within max_side and leaves the image alone."""
    height, width = pixels.shape[:2]
    if max_side is None or max(height, width) <= max_side:
        return pixels
    import cv2
    ratio = max_side / max(height, width)
    size = (max(1, int(ratio * width)), max(1, int(ratio * height)))
    return cv2.resize(pixels, size, interpolation=cv2.INTER_AREA)


def _naming_failures(work, failure_file: str):
    """FFCV's worker job, but a failure names the file it was on instead of hanging."""
    def job(*args):
        try:
            work(*args)
        except BaseException as error:  # noqa: BLE001  (any: FFCV would wait forever)
            # Written whole, then linked into place: the watcher never reads half a file,
            # and the first failure wins.
            draft = f"{failure_file}.{os.getpid()}"
            with open(draft, "w", encoding="utf-8") as f:
                json.dump({"file": _CURRENT, "reason": f"{type(error).__name__}: {error}"}, f)
            try:
                os.link(draft, failure_file)
            except FileExistsError:
                pass
            os.unlink(draft)
            os._exit(1)
    return job


def _end_when_a_worker_fails(failure_file: str, workers: list) -> None:
    """FFCV's writer polls its workers' progress forever: end it once one has failed,
    named its file (failure_file) or not (killed outright, by the OOM killer say)."""
    def watch():
        while not os.path.exists(failure_file) and not any(
                worker.exitcode not in (None, 0) for worker in list(workers)):
            time.sleep(0.2)
        for worker in list(workers):
            worker.kill()
        os._exit(3)
    threading.Thread(target=watch, daemon=True).start()


def _tracked(process_class, started: list):
    """process_class, but each started process is also put in `started`."""
    class Tracked(process_class):
        def start(self):
            super().start()
            started.append(self)
    return Tracked


def _write(out, files, labels, max_side, quality, write_mode, workers, failure_file):
    import ffcv.writer
    from ffcv.fields import IntField, RGBImageField

    ffcv.writer.worker_job_indexed_dataset = _naming_failures(
        ffcv.writer.worker_job_indexed_dataset, failure_file)
    workers_started = []
    ffcv.writer.Process = _tracked(ffcv.writer.Process, workers_started)
    _end_when_a_worker_fails(failure_file, workers_started)
    fields = {"image": RGBImageField(write_mode=write_mode, max_resolution=max_side,
                                     jpeg_quality=quality),
              "label": IntField()}
    writer = ffcv.writer.DatasetWriter(out, fields, num_workers=workers)
    writer.from_indexed_dataset(_RGBFolder(files, labels, max_side),
                                chunksize=max(1, min(100, len(files) // workers)))


def _output_path(out) -> Path:
    """`out`, ~ expanded, with its folder made: an output that cannot be written is
    found before the probe and the write, not after them."""
    out = Path(out).expanduser()
    try:
        if out.is_dir():
            raise DataError(f"the output {str(out)!r} is a folder; name a .beton file")
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DataError(f"cannot make the output's folder {str(out.parent)!r}: "
                        f"{error.strerror or error}") from None
    if not os.access(out.parent, os.W_OK):
        raise DataError(f"cannot write in the output's folder {str(out.parent)!r}")
    return out


def _refuse_an_output_among_the_images(out: Path, folder) -> None:
    """An output with an image name inside the source folder would replace a source image
    (the .beton renamed over it) or be listed as one by the next scan. Inside means under
    the root, as given or resolved, or in a folder the scan listed images from: a class
    folder may be a link to images elsewhere."""
    if not out.name.lower().endswith(IMAGE_EXTENSIONS):
        return
    root, target = Path(folder.root), out.resolve()
    roots = {Path(os.path.abspath(root)), root.resolve()}
    above = {*Path(os.path.abspath(out)).parents, *target.parents}
    listed = {d.resolve() for d in {Path(f).parent for f in folder.files}}
    if (roots | listed) & above:
        raise DataError(f"the output {str(out)!r} is an image name inside the source folder "
                        f"{str(root)!r}: it would replace a source image; name a .beton file "
                        "(or write it elsewhere)")


def write_beton(src, out, max_side=None, quality: int = 90, write_mode: str = "jpg",
                num_workers=None, probe_cache="auto") -> BetonReport:
    """Write src's decodable images (+ class labels) to `out`; report what was skipped.

    max_side: shrink images whose longer side exceeds it (None keeps sizes).
    write_mode: FFCV's "jpg" (re-encode at `quality`), "raw" (pixels) or "smart".
    probe_cache: where the probe index lives (dmt.data.probe.cache_path; "off" for none).
    """
    if max_side is not None and max_side < 1:
        raise ValueError(f"max_side must be a positive number of pixels, got {max_side}")
    if not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be in 1..100, got {quality}")
    if num_workers is not None and num_workers < 1:
        raise ValueError(f"num_workers must be at least 1, got {num_workers}")
    folder = scan_image_folder(src)
    # before _output_path makes the output's folder (inside the source, say)
    _refuse_an_output_among_the_images(Path(out).expanduser(), folder)
    out = _output_path(out)  # before the probe, which can take long
    workers = num_workers or os.cpu_count() or 1
    probe = probe_folder(folder, cache=probe_cache, num_threads=max(workers, 4), shard=False)
    skipped = list(probe.bad)
    good = np.flatnonzero(probe.decodable).tolist()
    files = [str(folder.files[i]) for i in good]
    labels = [folder.labels[i] for i in good]
    while True:
        if not files:
            raise DataError(f"image folder {str(folder.root)!r}: none of its {len(folder)} "
                            "image files can be decoded; nothing to write")
        failed = _write_in_a_fresh_process(out, files, labels, max_side, quality, write_mode,
                                           workers)
        if failed is None:
            break
        skipped.append(failed)
        if len(skipped) - len(probe.bad) >= _MAX_WRITE_FAILURES:
            raise DataError(f"the FFCV writer failed on {_MAX_WRITE_FAILURES} files, the last "
                            f"{failed[0]!r} ({failed[1]}); {str(out)!r} was left as it was")
        keep = [i for i, f in enumerate(files) if f != failed[0]]
        files, labels = [files[i] for i in keep], [labels[i] for i in keep]
    return BetonReport(path=out, written=len(files), classes=folder.classes, skipped=skipped,
                       probed=probe.probed)


def _write_in_a_fresh_process(out: Path, files, labels, max_side, quality, write_mode,
                              workers):
    """None once `out` is written, or (file, reason) of a file a writer worker failed on."""
    # Written beside `out` and renamed when whole: a failed or killed writer leaves no
    # .beton that opens but holds less than it should.
    partial = out.with_name(f".{out.name}.{os.getpid()}.partial")
    failure_file = out.with_name(f".{out.name}.{os.getpid()}.failed")
    job = dict(out=str(partial), files=files, labels=labels, max_side=max_side,
               quality=quality, write_mode=write_mode, workers=workers,
               failure_file=str(failure_file))
    # The child must import this very dmt, installed or not.
    package_root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (package_root, os.environ.get("PYTHONPATH")) if p)}
    try:
        done = subprocess.run([sys.executable, "-m", "dmt.data.beton"], input=json.dumps(job),
                              text=True, env=env)
        if done.returncode == 0:
            os.replace(partial, out)
            return None
        failed = _read_failure(failure_file)
        if failed.get("file") in files:
            return failed["file"], failed["reason"]
        why = f": {failed['reason']}" if failed.get("reason") else ""
        raise DataError(f"the FFCV writer failed writing {str(out)!r} (exit code "
                        f"{done.returncode}{why}); {str(out)!r} was left as it was")
    finally:
        partial.unlink(missing_ok=True)
        failure_file.unlink(missing_ok=True)


def _read_failure(failure_file: Path) -> dict:
    """What a failed writer worker said ({} when none said anything)."""
    try:
        return json.loads(failure_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


if __name__ == "__main__":
    _write(**json.loads(sys.stdin.read()))
