"""FFCV: reads a .beton (write one with launch/make_beton.py) with its JIT-compiled,
multithreaded JPEG decoder, crop and resize (OpenCV INTER_AREA).

Determinism: FFCV's RandomResizedCrop decoder draws crops from per-thread numpy
state, which no resume can replay. Our decoder instead reads each sample's crop box
from four extra fields of the image metadata record, refilled before every epoch
from dmt.data.augment.crop_boxes. FFCV hands the metadata array to the compiled
code at run time, so refilling costs no recompilation. The sample order comes from
dmt.data.sampling through a TraversalOrder. Flip, jitter and normalisation are the
shared tensor ops (FFCV's NormalizeImage after ToTensor loops forever in
Loader.__init__, upstream issues #350 and #396; we use neither).

Bad files: the .beton writer leaves out and reports undecodable files, so nothing
can fail at run time; `skipped` stays 0.
"""
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from ffcv.fields.basics import IntDecoder
from ffcv.fields.rgb_image import IMAGE_MODES, ResizedCropRGBImageDecoder
from ffcv.libffcv import imdecode, resize_crop
from ffcv.loader import Loader
from ffcv.loader.epoch_iterator import EpochIterator
from ffcv.pipeline.compiler import Compiler
from ffcv.reader import Reader
from ffcv.traversal_order.base import TraversalOrder

from dmt.data.augment import ViewSpec, crop_boxes, make_views
from dmt.data.loader import DualViewLoader
from dmt.data.sampling import ShardedEpochs
from dmt.errors import DataError
from dmt.transfer import to_device

_CROP_FIELDS = ("crop_top", "crop_left", "crop_height", "crop_width")


class _PlannedCropDecoder(ResizedCropRGBImageDecoder):
    """Decode + crop + resize, the crop box read from the sample's metadata record."""

    get_crop_generator = None  # not used: the crop comes from the metadata

    def __init__(self, image_size: int):
        super().__init__((image_size, image_size))

    def generate_code(self):
        jpg = IMAGE_MODES["jpg"]
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        # Jitted afresh for every loader, as FFCV does: numba dispatchers shared between
        # loaders broke (KeyError in typing) when a second loader compiled its pipeline.
        imdecode_c, resize_crop_c = Compiler.compile(imdecode), Compiler.compile(resize_crop)

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage = my_storage
            for dst_ix in my_range(len(batch_indices)):
                field = metadata[batch_indices[dst_ix]]
                image_data = mem_read(field["data_ptr"], storage_state)
                height, width = np.uint32(field["height"]), np.uint32(field["width"])
                if field["mode"] == jpg:
                    pixels = temp_storage[dst_ix]
                    imdecode_c(image_data, pixels, height, width, height, width,
                               0, 0, 1, 1, False, False)
                    pixels = pixels.reshape(-1)[:3 * height * width].reshape(height, width, 3)
                else:
                    pixels = image_data.reshape(height, width, 3)
                top, left = field["crop_top"], field["crop_left"]
                resize_crop_c(pixels, top, top + field["crop_height"],
                              left, left + field["crop_width"], destination[dst_ix])
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        return decode


@contextmanager
def _keep_torch_threads():
    """FFCV sets torch's thread count to its worker count; keep the trainer's."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class _EpochIterator(EpochIterator):
    """FFCV's epoch thread, except that an error inside it reaches the consumer
    (FFCV's own thread dies silently and leaves the consumer waiting forever)."""

    error = None

    def run(self):
        try:
            super().run()
        except BaseException as error:  # noqa: BLE001  (re-raised in the consumer)
            self.error = error
            self.output_queue.put(None)

    def __next__(self):
        try:
            return super().__next__()
        except StopIteration:
            if self.error is not None:
                raise DataError(f"FFCV failed while loading a batch: {self.error!r}") from self.error
            raise


class _PlannedOrder(TraversalOrder):
    """Hands FFCV the sample order we computed (FFCV calls the instance with its loader)."""

    def __init__(self, order):
        self.order = order

    def __call__(self, loader):
        return self

    def sample_order(self, epoch):
        return self.order


def _with_crop_fields(metadata: np.ndarray, column: str) -> np.ndarray:
    """A copy of FFCV's metadata whose `column` records carry four crop-box fields."""
    image = metadata.dtype[column]
    extended = np.dtype([(n, image.fields[n][0]) for n in image.names]
                        + [(n, "<u4") for n in _CROP_FIELDS], align=True)
    dtype = np.dtype([(n, extended if n == column else metadata.dtype[n])
                      for n in metadata.dtype.names], align=True)
    out = np.zeros(len(metadata), dtype=dtype)
    for name in metadata.dtype.names:
        if name == column:
            for sub in image.names:
                out[name][sub] = metadata[name][sub]
        else:
            out[name] = metadata[name]
    return out


def _check_whole(reader: Reader, path: Path) -> None:
    """A .beton cut short (a copy or a download that stopped) still opens: FFCV reads its
    allocation table from where it starts to wherever the file ends, and samples whose
    entries are gone would be decoded from the wrong bytes."""
    table, start = reader.alloc_table, int(reader.header["alloc_table_ptr"])
    images = reader.metadata[f"f{reader.field_names.index('image')}"]
    size = path.stat().st_size
    whole = ((size - start) % table.dtype.itemsize == 0 and len(table) > 0
             and int((table["ptr"] + table["size"]).max()) <= start
             and bool(np.isin(images["data_ptr"], table["ptr"]).all()))
    if not whole:
        raise DataError(f"{str(path)!r} is incomplete ({size} bytes; its allocation table "
                        f"does not cover its {reader.num_samples} samples): copy it again, or "
                        "write it again with launch/make_beton.py")


class FFCVLoader(DualViewLoader):
    def __init__(self, path, batch_size, *, spec: ViewSpec, seed=0, rank=0, world_size=1,
                 device="cpu", drop_last=True, num_workers=None):
        path = Path(path).expanduser()
        if path.is_dir():
            raise DataError(f"{str(path)!r} is a folder; the ffcv backend reads a .beton file: "
                            f"write one with python launch/make_beton.py {path} OUT.beton")
        if not path.is_file():
            raise DataError(f".beton file {str(path)!r} does not exist "
                            "(write one with launch/make_beton.py)")
        try:
            reader = Reader(str(path))
        except Exception as error:  # FFCV asserts on foreign or damaged files
            raise DataError(f"{str(path)!r} is not a readable FFCV .beton ({error})") from error
        if "image" not in reader.field_names:
            raise DataError(f"{str(path)!r} has no 'image' field (fields: {reader.field_names})")
        if reader.num_samples == 0:
            raise DataError(f"{str(path)!r} holds no samples")
        _check_whole(reader, path)
        super().__init__(ShardedEpochs(int(reader.num_samples), batch_size, seed, rank, world_size,
                                       drop_last), spec, device)
        self.path = path
        self._order = _PlannedOrder(self.plan.rank_batches(0).reshape(-1))
        pipelines = {name: None for name in reader.field_names}
        pipelines["image"] = [_PlannedCropDecoder(spec.image_size)]
        self._has_label = "label" in reader.field_names
        if self._has_label:
            pipelines["label"] = [IntDecoder()]
        with _keep_torch_threads():
            self._ffcv = Loader(str(path), batch_size=batch_size, order=self._order,
                                num_workers=num_workers or min(16, os.cpu_count() or 1),
                                pipelines=pipelines, drop_last=False, os_cache=True, seed=seed)
        column = f"f{reader.field_names.index('image')}"
        self._ffcv.reader.metadata = _with_crop_fields(self._ffcv.reader.metadata, column)
        self._image_meta = self._ffcv.reader.metadata[column]
        self._heights = self._image_meta["height"].astype(np.int64)
        self._widths = self._image_meta["width"].astype(np.int64)
        self._running = None  # FFCV's epoch thread, if one is alive

    def _stop_running(self):
        if self._running is not None:
            self._running.close()
            self._running.join()  # its compiled code reads the metadata we rewrite
            self._running = None

    def _start_ffcv_epoch(self) -> _EpochIterator:
        """What ffcv.Loader.__iter__ does, with the error-reporting epoch thread."""
        ffcv = self._ffcv
        with _keep_torch_threads():
            Compiler.set_num_threads(ffcv.num_workers)
        order = ffcv.next_traversal_order()
        ffcv.next_epoch += 1
        if ffcv.code is None:
            ffcv.generate_code()
        return _EpochIterator(ffcv, order)

    def _epoch_batches(self, epoch, batches):
        self._stop_running()
        if len(batches) == 0:
            return
        order = batches.reshape(-1)
        boxes = crop_boxes(self.spec, epoch, order, self._heights[order], self._widths[order])
        for k, name in enumerate(_CROP_FIELDS):
            self._image_meta[name][order] = boxes[:, k]
        self._order.order = order
        self._running = self._start_ffcv_epoch()
        try:
            for row, outputs in zip(batches, self._running):
                # to_device: on GPUs, a pinned copy of its own (even of a pinned buffer),
                # sent non_blocking: no wait for the GPU queue, and FFCV may refill its
                # buffer at once. On the CPU, make_views reads it before the next batch.
                crops = to_device(outputs[0], self.device).permute(0, 3, 1, 2)
                teacher, student = make_views(crops, self.spec, epoch, row)
                label = (torch.from_numpy(outputs[1].reshape(-1).copy()) if self._has_label
                         else torch.zeros(len(row), dtype=torch.int64))
                yield {"teacher": teacher, "student": student,
                       "index": torch.from_numpy(row.copy()), "label": label}
        finally:
            self._stop_running()
