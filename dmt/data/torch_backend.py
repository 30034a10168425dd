"""The fallback that needs nothing beyond PyTorch and PIL: a DataLoader over a folder.

Workers decode with PIL and cut the crop with one bicubic resize (PIL filters
with the right support when shrinking, as torchvision does on PIL images). Flip,
jitter and normalisation run in the workers for a CPU device, and batched on the
GPU for a CUDA device (the workers then ship 4x smaller uint8 crops).

An undecodable file is a counted skip: its slot in the batch is filled with the
next decodable sample of the same batch, or in a batch without one, with the next
decodable file of the folder (so the batch size stays constant and the choice is
deterministic), and the loader warns once naming the file.

The workers ignore stop signals (dmt.engine.stop.ignore_stop_signals), so a scheduler's
SIGTERM to the whole job leaves them serving until the trainer's checkpoint. The same
makes multiprocessing's own exit handler (SIGTERM, then wait) hang on a loader still
alive at exit, e.g. one pinned by an exception's traceback: `close()` ends them the
DataLoader's way, and an exit handler closes every loader still open.
"""
import atexit
import os
import weakref

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from dmt.data.augment import ViewSpec, crop_boxes, make_views
from dmt.data.folder import scan_image_folder
from dmt.data.images import UNDECODABLE_ERRORS, open_rgb
from dmt.data.loader import DualViewLoader
from dmt.data.sampling import ShardedEpochs
from dmt.engine.stop import ignore_stop_signals
from dmt.errors import DataError


class _Undecodable:
    def __init__(self, path, reason, epoch, index):
        self.path, self.reason, self.epoch, self.index = path, reason, epoch, index


class _CropDataset(Dataset):
    """Item (epoch, index) -> (uint8 crop [3, S, S], epoch, index, label), or _Undecodable."""

    def __init__(self, files, labels, spec: ViewSpec):
        self.files, self.labels, self.spec = [str(f) for f in files], labels, spec

    def __len__(self):
        return len(self.files)

    def __getitem__(self, key):
        epoch, index = key
        path = self.files[index]
        try:
            image = open_rgb(path)
        except UNDECODABLE_ERRORS as error:
            return _Undecodable(path, f"{type(error).__name__}: {error}", epoch, index)
        top, left, h, w = crop_boxes(self.spec, epoch, [index], [image.height], [image.width])[0]
        size = self.spec.image_size
        crop = image.resize((size, size), Image.BICUBIC, box=(left, top, left + w, top + h))
        pixels = torch.from_numpy(np.asarray(crop).copy()).permute(2, 0, 1).contiguous()
        return pixels, epoch, index, self.labels[index]


# How far past a batch of only undecodable files to look for a file that decodes.
STAND_IN_SEARCH = 64


class _Collate:
    """Stacks a batch, fills the slots of undecodable files, and (CPU) makes the views."""

    def __init__(self, spec: ViewSpec, make_views_here: bool, dataset: _CropDataset):
        self.spec, self.make_views_here, self.dataset = spec, make_views_here, dataset

    def _stand_in(self, first: _Undecodable):
        """For a batch without one decodable file (likely with small micro-batches): the
        first decodable file after the batch's first, in dataset order."""
        size = len(self.dataset)
        for offset in range(1, min(STAND_IN_SEARCH, size - 1) + 1):
            sample = self.dataset[(first.epoch, (first.index + offset) % size)]
            if not isinstance(sample, _Undecodable):
                return sample
        raise DataError(f"every image of a batch is undecodable, and so are the files after "
                        f"{first.path} that could stand in for them")

    def __call__(self, samples):
        bad = [s for s in samples if isinstance(s, _Undecodable)]
        pool = samples if len(bad) < len(samples) else [*samples, self._stand_in(samples[0])]
        good = [i for i, s in enumerate(pool) if not isinstance(s, _Undecodable)]
        # Deterministic stand-in: the next decodable sample of this batch (cyclic).
        filled = [pool[min(good, key=lambda j: (j - i) % len(pool))]
                  for i in range(len(samples))]
        crops = torch.stack([s[0] for s in filled])
        epoch = filled[0][1]
        index = torch.tensor([s[2] for s in filled], dtype=torch.int64)
        batch = {"index": index, "label": torch.tensor([s[3] for s in filled], dtype=torch.int64),
                 "epoch": epoch, "skipped": [(s.path, s.reason) for s in bad]}
        if self.make_views_here:
            batch["teacher"], batch["student"] = make_views(crops, self.spec, epoch, index.numpy())
        else:
            batch["crops"] = crops
        return batch


class _PlanSampler:
    """Batch sampler replaying the rows the loader sets before each epoch."""

    def __init__(self):
        self.keys = []

    def __iter__(self):
        return iter(self.keys)

    def __len__(self):
        return len(self.keys)


class TorchFolderLoader(DualViewLoader):
    def __init__(self, path, batch_size, *, spec: ViewSpec, seed=0, rank=0, world_size=1,
                 device="cpu", drop_last=True, num_workers=None):
        folder = scan_image_folder(path)
        super().__init__(ShardedEpochs(len(folder), batch_size, seed, rank, world_size, drop_last),
                         spec, device)
        if num_workers is None:
            num_workers = min(8, os.cpu_count() or 1)
        self.folder = folder
        on_cpu = self.device.type == "cpu"
        self._sampler = _PlanSampler()
        dataset = _CropDataset(folder.files, folder.labels, spec)
        self._collate = _Collate(spec, make_views_here=on_cpu, dataset=dataset)
        self._dataloader = DataLoader(
            dataset,
            batch_sampler=self._sampler, num_workers=num_workers, collate_fn=self._collate,
            pin_memory=not on_cpu, persistent_workers=num_workers > 0,
            worker_init_fn=ignore_stop_signals,
            prefetch_factor=4 if num_workers > 0 else None)
        if num_workers > 0:
            _OPEN.add(self)

    def close(self) -> None:
        """Ends the worker processes now (a later iteration starts new ones; the one under
        way, if any, raises DataError rather than end the epoch short)."""
        workers = getattr(self._dataloader, "_iterator", None)  # persistent workers live here
        self._dataloader._iterator = None
        if workers is not None and hasattr(workers, "_shutdown_workers"):
            workers._shutdown_workers()  # what DataLoader runs when the iterator is freed

    def _epoch_batches(self, epoch, batches):
        self._sampler.keys = [[(epoch, int(i)) for i in row] for row in batches]
        served = 0
        for served, batch in enumerate(_in_own_words(self._dataloader), 1):
            for path, reason in batch["skipped"]:
                self._note_skipped(path, reason)
            if "crops" in batch:  # CUDA: flip, jitter, normalise on the GPU
                crops = batch["crops"].to(self.device, non_blocking=True)
                teacher, student = make_views(crops, self.spec, epoch, batch["index"].numpy())
            else:
                teacher, student = batch["teacher"], batch["student"]
            yield {"teacher": teacher, "student": student,
                   "index": batch["index"], "label": batch["label"]}
        if served < len(batches):  # DataLoader ends quietly when its workers were shut down
            raise DataError(f"epoch {epoch} ended after {served} of {len(batches)} batches: "
                            "the loader was closed while it was being iterated")


def _in_own_words(batches):
    """Batches of a DataLoader, whose workers' DataErrors torch re-raises here wrapped as
    "Caught DataError in DataLoader worker process N. Original Traceback ...": the user
    gets the worker's message alone."""
    try:
        yield from batches
    except DataError as err:
        text = str(err)
        # The message follows the last traceback's frames (a chained error comes after its
        # cause), on the first line that starts with the error's type, the frames being
        # indented: the message itself may name the type too.
        last = text.rfind("Traceback (most recent call last):\n")
        at = text.find(f"\n{type(err).__module__}.{type(err).__qualname__}: ", last)
        if text.startswith("Caught ") and last >= 0 and at >= 0:
            err.args = (text[text.index(": ", at) + 2:].rstrip(),)
        raise


_OPEN = weakref.WeakSet()  # loaders with worker processes
# A forked child shares its parent's loaders' queues: its exit must not stop their workers.
os.register_at_fork(after_in_child=_OPEN.clear)


@atexit.register
def _close_open_loaders() -> None:
    # Registered after the exit handlers of multiprocessing and torch (imported above),
    # so it runs before them: atexit runs the last registered first.
    for loader in list(_OPEN):
        loader.close()
