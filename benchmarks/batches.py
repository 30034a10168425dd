"""Where a benchmarked step's batches come from: static device tensors ("synthetic", no
data cost), or a dmt.data loader over generated samples or real JPEGs."""
from __future__ import annotations

import atexit
import shutil
import tempfile

import torch

from benchmarks.common import jpeg_folder
from benchmarks.matrix import Config


class StaticBatches:
    """'synthetic': a few random batches made once on the device and cycled: no data cost,
    the setting of the MFU target."""

    def __init__(self, batch: int, img: int, device, student_dtype, distinct: int = 2,
                 seed: int = 0):
        g = torch.Generator(device=device).manual_seed(seed)
        self.batches = []
        for k in range(distinct):
            teacher = torch.randn(batch, 3, img, img, device=device, generator=g)
            student = (teacher + 0.1 * torch.randn(teacher.shape, device=device, generator=g))
            self.batches.append({"teacher": teacher, "student": student.to(student_dtype),
                                 "index": torch.arange(k * batch, (k + 1) * batch)})
        self.i = 0

    def __iter__(self):
        return self

    def __next__(self):
        self.i += 1
        return self.batches[self.i % len(self.batches)]


class LoaderBatches:
    """A dmt.data loader, endlessly, with the views moved/cast as the trainer does."""

    def __init__(self, loader, device, student_dtype):
        self.loader, self.device, self.dtype = loader, device, student_dtype
        self.epoch, self.it = 0, None

    def __iter__(self):
        return self

    def __next__(self):
        while True:
            if self.it is None:
                if hasattr(self.loader, "set_epoch"):
                    self.loader.set_epoch(self.epoch)
                self.it, self.epoch = iter(self.loader), self.epoch + 1
            try:
                b = next(self.it)
                break
            except StopIteration:
                self.it = None
        return {"teacher": b["teacher"].to(self.device, non_blocking=True),
                "student": b["student"].to(self.device, self.dtype, non_blocking=True),
                "index": b["index"]}


_JPEG_DIR: dict[int, str] = {}  # image side -> folder


def _jpeg_folder(images: int, side: int) -> str:
    """A folder of >= `images` JPEGs (benchmarks.common.jpeg_folder): enough for 16 steps
    per epoch, so epoch restarts stay out of the measurement; made once and grown for
    larger batches."""
    folder = _JPEG_DIR.get(side)
    if folder is None:
        folder = _JPEG_DIR[side] = tempfile.mkdtemp(prefix="dmt_bench_jpeg_")
        atexit.register(shutil.rmtree, folder, ignore_errors=True)  # GiBs at 448 px
    return str(jpeg_folder(folder, images, side))


def make_batches(source: str, cfg: Config, batch: int, device, student_dtype):
    if source == "synthetic":
        return StaticBatches(batch, cfg.img_size, device, student_dtype)
    from dmt.data import build_loader
    if source == "synthetic-loader":
        loader = build_loader("synthetic", None, batch, image_size=cfg.img_size,
                              device=str(device))
        return LoaderBatches(loader, device, student_dtype)
    if source == "jpeg":
        path = cfg.jpeg_path or _jpeg_folder(16 * batch, max(2 * cfg.img_size, 160))
        backend = "torch"
        if device.type == "cuda":
            try:
                import nvidia.dali  # noqa: F401
                backend = "dali"
            except ImportError:
                pass
        loader = build_loader(backend, path, batch, image_size=cfg.img_size,
                              device=str(device))
        return LoaderBatches(loader, device, student_dtype)
    raise SystemExit(f"unknown data source {source!r}")
