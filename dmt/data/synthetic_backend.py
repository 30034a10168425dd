"""Random images made on the device, for benchmarks that must exclude I/O and decoding.

Sample i is a smooth random colour field (a 16x16 grid of uniform values, seeded by
(seed, i), interpolated bicubically) on a square canvas of 8/7 x image_size, the
usual 256-for-224 ratio. One grid_sample per batch evaluates that field directly on
every sample's crop box, so crop, resize and the rest of the views run on the device
with the same parameters as the real backends.

`path` is the number of samples (int or digit string); None means ImageNet-1k's
1,281,167.
"""
import numpy as np
import torch
import torch.nn.functional as F

from dmt.data.augment import ViewSpec, crop_boxes, make_views
from dmt.data.loader import DualViewLoader
from dmt.data.rng import uniform
from dmt.data.sampling import ShardedEpochs
from dmt.errors import DataError
from dmt.transfer import to_device

IMAGENET_TRAIN_SIZE = 1_281_167
_GRID = 16
_CONTENT_STREAM = 0xC0 << 16  # distinct from the augmentation streams


def _num_samples(path) -> int:
    if path is None:
        return IMAGENET_TRAIN_SIZE
    try:
        n = int(str(path))
    except ValueError:
        raise DataError(f"synthetic data takes a sample count as its path, got {path!r}") from None
    if n < 1:
        raise DataError(f"synthetic data needs at least one sample, got {n}")
    return n


class SyntheticLoader(DualViewLoader):
    def __init__(self, path, batch_size, *, spec: ViewSpec, seed=0, rank=0, world_size=1,
                 device="cpu", drop_last=True, num_workers=None):
        num_samples = _num_samples(path)
        super().__init__(ShardedEpochs(num_samples, batch_size, seed, rank, world_size, drop_last),
                         spec, device)
        self.canvas = round(spec.image_size * 8 / 7)
        self._cells = np.arange(3 * _GRID * _GRID)

    def _content(self, indices) -> torch.Tensor:
        """float [B, 3, G, G] in [0, 1]: sample i's colour grid, a function of (seed, i)."""
        values = uniform(self.spec.seed, _CONTENT_STREAM, indices[:, None], self._cells)
        return torch.from_numpy(values.astype(np.float32)).view(-1, 3, _GRID, _GRID)

    def _crops(self, epoch, indices) -> torch.Tensor:
        size, canvas = self.spec.image_size, self.canvas
        boxes = crop_boxes(self.spec, epoch, indices, np.full(len(indices), canvas),
                           np.full(len(indices), canvas)).astype(np.float32)
        top, left, h, w = (torch.from_numpy(boxes[:, k]) for k in range(4))
        # Affine map from output coords to canvas coords, both normalised to [-1, 1].
        theta = torch.zeros(len(indices), 2, 3)
        theta[:, 0, 0], theta[:, 0, 2] = w / canvas, (2 * left + w) / canvas - 1
        theta[:, 1, 1], theta[:, 1, 2] = h / canvas, (2 * top + h) / canvas - 1
        # Built on the host (seeded), moved pinned + non_blocking: no wait on the GPU queue.
        grid = F.affine_grid(to_device(theta, self.device), [len(indices), 3, size, size],
                             align_corners=False)
        content = to_device(self._content(indices), self.device)
        return F.grid_sample(content, grid, mode="bicubic", padding_mode="border",
                             align_corners=False).clamp_(0, 1)

    def _epoch_batches(self, epoch, batches):
        for row in batches:
            teacher, student = make_views(self._crops(epoch, row), self.spec, epoch, row)
            yield {"teacher": teacher, "student": student,
                   "index": torch.from_numpy(row.copy()),
                   "label": torch.zeros(len(row), dtype=torch.int64)}
