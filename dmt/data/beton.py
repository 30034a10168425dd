"""Write an FFCV .beton from an image folder (used by launch/make_beton.py).

Every file is probed first (dmt.data.probe, with the same cache as the DALI backend, so
a folder probed by either is not decoded again): FFCV's writer cannot skip a sample once
it has started, so undecodable files are left out up front and reported by name.
Decodable greyscale, CMYK and RGBA images are stored as RGB.

FFCV's writer forks its workers; forked from a process that already runs threads
(DALI, OpenMP, a thread pool) a worker can inherit a held lock and hang forever,
and the writer with it. So the writer runs in a fresh Python process
(`python -m dmt.data.beton`, arguments as JSON on stdin).
"""
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dmt.data.folder import scan_image_folder
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


class _RGBFolder:
    """Indexable (image HWC uint8 RGB, label) pairs, as FFCV's writer reads them."""

    def __init__(self, files, labels):
        self.files, self.labels = [str(f) for f in files], labels

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        return np.asarray(open_rgb(self.files[i])), int(self.labels[i])


def _write(out, files, labels, max_side, quality, write_mode, workers):
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    fields = {"image": RGBImageField(write_mode=write_mode, max_resolution=max_side,
                                     jpeg_quality=quality),
              "label": IntField()}
    writer = DatasetWriter(out, fields, num_workers=workers)
    writer.from_indexed_dataset(_RGBFolder(files, labels),
                                chunksize=max(1, min(100, len(files) // workers)))


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
    workers = num_workers or os.cpu_count() or 1
    probe = probe_folder(folder, cache=probe_cache, num_threads=max(workers, 4), shard=False)
    skipped = probe.bad
    good = np.flatnonzero(probe.decodable).tolist()
    if not good:
        raise DataError(f"image folder {str(folder.root)!r}: none of its {len(folder)} "
                        "image files can be decoded; nothing to write")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    files = [str(folder.files[i]) for i in good]
    labels = [folder.labels[i] for i in good]
    # Written beside `out` and renamed when whole: a failed or killed writer leaves no
    # .beton that opens but holds less than it should.
    partial = out.with_name(f".{out.name}.{os.getpid()}.partial")
    job = dict(out=str(partial), files=files, labels=labels, max_side=max_side,
               quality=quality, write_mode=write_mode, workers=workers)
    # The child must import this very dmt, installed or not.
    package_root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (package_root, os.environ.get("PYTHONPATH")) if p)}
    try:
        done = subprocess.run([sys.executable, "-m", "dmt.data.beton"], input=json.dumps(job),
                              text=True, env=env)
        if done.returncode != 0:
            raise DataError(f"the FFCV writer failed writing {str(out)!r} (exit code "
                            f"{done.returncode}); {str(out)!r} was left as it was")
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    return BetonReport(path=out, written=len(good), classes=folder.classes, skipped=skipped,
                       probed=probe.probed)


if __name__ == "__main__":
    _write(**json.loads(sys.stdin.read()))
