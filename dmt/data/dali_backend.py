"""NVIDIA DALI: JPEG decoding on the GPU ("mixed": nvJPEG, and the hardware JPEG
decoder on GPUs that have one), crop and resize on the GPU; the same graph runs as a
CPU pipeline (device_id=None) when `device` is the CPU.

Determinism: DALI's own random operators keep per-thread state that a resume cannot
replay, so this graph draws nothing itself. Python feeds each batch's encoded files
and crop windows (dmt.data.augment.crop_boxes, from the sizes read up front) through
an external source; flip, jitter and normalisation are the shared tensor ops, run on
the GPU. A sample therefore gets the same crop as with the torch backend, whatever
the thread count or resume point; only the resampling kernel differs (DALI's cubic
with antialiasing vs PIL's bicubic).

Bad files: a DALI pipeline cannot skip a file at run time (a decode error stops it),
so the folder is probed up front (header + a 1/8-scale decode of JPEGs, in parallel),
by dmt.data.probe: split across the ranks of the process group and cached in an index
keyed by path, size and mtime, so a later launch probes only new or changed files.
Building this loader is then a collective (every rank builds one; shard_probe=False
opts out). Undecodable files are left out and counted in `skipped` /
`skipped_files`, with a warning naming each. Greyscale, CMYK and RGBA files are
decoded to RGB. EXIF orientation is ignored, as PIL does.
"""
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from dmt.data.augment import ViewSpec, crop_boxes, make_views
from dmt.data.loader import DualViewLoader
from dmt.data.probe import probe_image_folder
from dmt.data.sampling import ShardedEpochs
from dmt.errors import DataError

from nvidia.dali import fn, pipeline_def, types  # noqa: E402  (ImportError -> registry message)
from nvidia.dali.plugin.pytorch import feed_ndarray  # noqa: E402


@pipeline_def
def _crop_graph(feed, image_size: int, on_gpu: bool):
    encoded, roi_start, roi_end = fn.external_source(
        source=feed, num_outputs=3, batch=True, dtype=[types.UINT8, types.FLOAT, types.FLOAT],
        ndim=[1, 1, 1])
    images = fn.decoders.image(encoded, device="mixed" if on_gpu else "cpu",
                               output_type=types.RGB, adjust_orientation=False)
    crops = fn.resize(images, size=[image_size, image_size], roi_start=roi_start, roi_end=roi_end,
                      interp_type=types.INTERP_CUBIC, antialias=True)
    return fn.transpose(crops, perm=[2, 0, 1])  # HWC -> CHW


class _BatchFeed:
    """The external source: pops the epoch's rows, returns their files and crop windows.

    DALI calls it ahead of consumption (prefetching), so the rows it handed out are
    remembered in `in_flight` until their outputs come back.
    """

    def __init__(self, loader):
        self.loader, self.pending, self.in_flight, self.epoch = loader, deque(), deque(), 0
        self.readers = ThreadPoolExecutor(8)

    def __call__(self):
        if not self.pending:
            raise StopIteration
        row = self.pending.popleft()
        self.in_flight.append(row)
        loader = self.loader
        encoded = list(self.readers.map(lambda i: np.fromfile(loader.files[i], dtype=np.uint8), row))
        boxes = crop_boxes(loader.spec, self.epoch, row, loader.heights[row], loader.widths[row])
        top, left, h, w = boxes.T.astype(np.float32)
        starts = list(np.stack([top, left], axis=1))
        ends = list(np.stack([top + h, left + w], axis=1))
        return encoded, starts, ends


class DaliFolderLoader(DualViewLoader):
    def __init__(self, path, batch_size, *, spec: ViewSpec, seed=0, rank=0, world_size=1,
                 device="cpu", drop_last=True, num_workers=None, probe_cache="auto",
                 shard_probe=True):
        threads = num_workers or min(8, os.cpu_count() or 1)
        # Scanned inside the probe's collective: a folder missing on one node fails every rank.
        folder, probe = probe_image_folder(path, cache=probe_cache, num_threads=max(threads, 4),
                                           shard=shard_probe)
        keep = np.flatnonzero(probe.decodable)
        if len(keep) == 0:
            raise DataError(f"image folder {str(folder.root)!r}: none of its "
                            f"{len(folder)} image files can be decoded")
        super().__init__(ShardedEpochs(len(keep), batch_size, seed, rank, world_size, drop_last),
                         spec, device)
        for file, reason in probe.bad:
            self._note_skipped(file, reason)
        self.folder = folder
        self.files = [str(folder.files[i]) for i in keep]
        self.labels = np.asarray(folder.labels, dtype=np.int64)[keep]
        self.heights, self.widths = probe.heights[keep], probe.widths[keep]

        on_gpu = self.device.type == "cuda"
        if on_gpu and not torch.cuda.is_available():
            raise DataError(f"device {device!r} asked for, but CUDA is not available")
        device_id = (self.device.index if self.device.index is not None
                     else torch.cuda.current_device()) if on_gpu else None
        self._feed = _BatchFeed(self)
        self._pipe = _crop_graph(self._feed, image_size=spec.image_size, on_gpu=on_gpu, batch_size=batch_size,
                                 num_threads=threads, device_id=device_id, prefetch_queue_depth=2,
                                 seed=seed)
        self._pipe.build()
        self._pipe_dirty = False  # an epoch was left unfinished: outputs still queued

    def _drain(self):
        """Finish an abandoned epoch so the pipeline can start the next one cleanly."""
        self._feed.pending.clear()
        try:
            while True:
                self._pipe.run()
        except StopIteration:
            pass
        self._pipe.reset()
        self._feed.in_flight.clear()
        self._pipe_dirty = False

    def _to_torch(self, dali_batch) -> torch.Tensor:
        dense = dali_batch.as_tensor()
        out = torch.empty(dense.shape(), dtype=torch.uint8, device=self.device)
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        feed_ndarray(dense, out, cuda_stream=stream)
        return out

    def _epoch_batches(self, epoch, batches):
        if self._pipe_dirty:
            self._drain()
        if len(batches) == 0:
            return
        self._feed.epoch = epoch
        self._feed.pending.extend(batches)
        self._pipe_dirty = True
        try:
            while True:
                try:
                    (crops,) = self._pipe.run()
                except StopIteration:
                    break
                except RuntimeError as error:  # e.g. a file PIL accepted but nvJPEG does not
                    suspects = [self.files[i] for row in self._feed.in_flight for i in row]
                    self._pipe_dirty = False  # the pipeline is unusable; do not drain it
                    raise DataError("DALI failed on a batch holding one of: "
                                    + ", ".join(suspects[:16]) + f" ({error})") from error
                row = self._feed.in_flight.popleft()
                teacher, student = make_views(self._to_torch(crops), self.spec, epoch, row)
                yield {"teacher": teacher, "student": student, "index": torch.from_numpy(row.copy()),
                       "label": torch.from_numpy(self.labels[row])}
            self._pipe.reset()
            self._pipe_dirty = False
        finally:
            if self._pipe_dirty:
                self._drain()
