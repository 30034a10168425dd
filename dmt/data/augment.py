"""The method's two views, shared by every backend.

Teacher and student views come from the same RandomResizedCrop and horizontal flip
(token n of the student and of every teacher covers the same patch); only the
student gets colour jitter. Backends produce the crop (decode + crop + resize, the
expensive part, wherever they do it best); `make_views` does flip, jitter and
normalisation in batched tensor ops on whatever device the crops are on.

Every random parameter is a function of (seed, epoch, sample index) alone
(dmt.data.rng), so a sample looks the same whatever the worker count or resume point.
"""
import functools
import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch

from dmt.data.rng import uniform
from dmt.transfer import to_device

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Independent random streams per parameter (the 4th hash coordinate).
_CROP_ATTEMPTS = 10  # as torchvision's RandomResizedCrop
_AREA, _LOG_RATIO, _TOP, _LEFT = 0, 16, 32, 48
_FLIP, _BRIGHTNESS, _CONTRAST, _SATURATION, _JITTER_ORDER = 64, 65, 66, 67, 68

# The orders colour jitter can apply brightness (0), contrast (1) and saturation (2) in:
# torchvision's ColorJitter draws one uniformly per image.
JITTER_ORDERS = tuple(itertools.permutations(range(3)))

# ITU-R 601 luma weights, as torchvision's rgb_to_grayscale.
_LUMA = (0.2989, 0.587, 0.114)


@dataclass(frozen=True)
class ViewSpec:
    """Everything that defines the two views of a sample, given (epoch, index)."""
    image_size: int = 224
    crop_scale: tuple = (0.2, 1.0)
    crop_ratio: tuple = (3 / 4, 4 / 3)
    color_jitter: tuple = (0.4, 0.4, 0.4)  # brightness, contrast, saturation
    flip_prob: float = 0.5
    seed: int = 0
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD


def crop_boxes(spec: ViewSpec, epoch: int, indices, heights, widths) -> np.ndarray:
    """RandomResizedCrop boxes, int64 [B, 4] = (top, left, height, width) in pixels.

    Same algorithm as torchvision: up to 10 tries of (area, log-aspect) drawn
    uniformly, the first that fits wins; otherwise a centre crop with the aspect
    ratio clamped into range.
    """
    idx = np.asarray(indices, dtype=np.int64).reshape(-1, 1)
    H = np.asarray(heights, dtype=np.float64).reshape(-1, 1)
    W = np.asarray(widths, dtype=np.float64).reshape(-1, 1)
    tries = np.arange(_CROP_ATTEMPTS)
    seed, lo_ratio, hi_ratio = spec.seed, math.log(spec.crop_ratio[0]), math.log(spec.crop_ratio[1])

    area = H * W * uniform(seed, epoch, idx, _AREA + tries, low=spec.crop_scale[0], high=spec.crop_scale[1])
    aspect = np.exp(uniform(seed, epoch, idx, _LOG_RATIO + tries, low=lo_ratio, high=hi_ratio))
    w = np.round(np.sqrt(area * aspect))
    h = np.round(np.sqrt(area / aspect))
    fits = (w > 0) & (w <= W) & (h > 0) & (h <= H)
    first = np.argmax(fits, axis=1)[:, None]
    found = np.take_along_axis(fits, first, 1)[:, 0]
    w, h = np.take_along_axis(w, first, 1)[:, 0], np.take_along_axis(h, first, 1)[:, 0]
    u_top = np.take_along_axis(uniform(seed, epoch, idx, _TOP + tries), first, 1)[:, 0]
    u_left = np.take_along_axis(uniform(seed, epoch, idx, _LEFT + tries), first, 1)[:, 0]
    H, W = H[:, 0], W[:, 0]
    top = np.floor(u_top * (H - h + 1))
    left = np.floor(u_left * (W - w + 1))

    # Fallback: whole image, aspect clamped into crop_ratio, centred.
    in_ratio = W / H
    fb_w = np.where(in_ratio < spec.crop_ratio[0], W,
                    np.where(in_ratio > spec.crop_ratio[1], np.round(H * spec.crop_ratio[1]), W))
    fb_h = np.where(in_ratio < spec.crop_ratio[0], np.round(W / spec.crop_ratio[0]), H)
    fb_h = np.where(in_ratio > spec.crop_ratio[1], H, fb_h)
    top = np.where(found, top, (H - fb_h) // 2)
    left = np.where(found, left, (W - fb_w) // 2)
    h, w = np.where(found, h, fb_h), np.where(found, w, fb_w)
    return np.stack([top, left, h, w], axis=1).astype(np.int64)


def flips(spec: ViewSpec, epoch: int, indices) -> np.ndarray:
    """bool [B]: mirror this sample (both views)."""
    return uniform(spec.seed, epoch, np.asarray(indices, dtype=np.int64), _FLIP) < spec.flip_prob


def jitter_factors(spec: ViewSpec, epoch: int, indices) -> np.ndarray:
    """float32 [B, 3]: brightness, contrast, saturation factors, each uniform in
    [max(0, 1 - s), 1 + s] as torchvision's ColorJitter; exactly 1 where s == 0."""
    idx = np.asarray(indices, dtype=np.int64)
    columns = []
    for stream, strength in zip((_BRIGHTNESS, _CONTRAST, _SATURATION), spec.color_jitter):
        columns.append(uniform(spec.seed, epoch, idx, stream,
                               low=max(0.0, 1.0 - strength), high=1.0 + strength)
                       if strength > 0 else np.ones(len(idx)))
    return np.stack(columns, axis=1).astype(np.float32)


@functools.lru_cache(maxsize=64)
def _constant(values: tuple, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A fixed vector, made once per (values, device, dtype): building it per batch
    would be a blocking host-to-device copy. Shared: never modify it in place."""
    return torch.tensor(values, dtype=dtype, device=device)


def _luma(x: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] -> [B, 1, H, W] grey level (also works on [B, 3] channel means)."""
    weights = _constant(_LUMA, x.device, x.dtype)
    return torch.einsum("bc...,c->b...", x, weights).unsqueeze(1)


def jitter_orders(spec: ViewSpec, epoch: int, indices) -> np.ndarray:
    """int64 [B]: for each sample, which of JITTER_ORDERS its colour jitter runs in."""
    idx = np.asarray(indices, dtype=np.int64)
    u = uniform(spec.seed, epoch, idx, _JITTER_ORDER)
    return np.minimum((u * len(JITTER_ORDERS)).astype(np.int64), len(JITTER_ORDERS) - 1)


def _brightness_(x: torch.Tensor, factor: torch.Tensor) -> None:
    x.mul_(factor).clamp_(0, 1)


def _contrast_(x: torch.Tensor, factor: torch.Tensor) -> None:
    # The mean grey level is the grey level of the channel means (it is linear).
    mean_luma = _luma(x.mean(dim=(-2, -1)))[:, :, None, None]
    x.mul_(factor).add_((1 - factor) * mean_luma).clamp_(0, 1)


def _saturation_(x: torch.Tensor, factor: torch.Tensor) -> None:
    grey = _luma(x)  # before the in-place blend below
    x.mul_(factor).add_((1 - factor) * grey).clamp_(0, 1)


_JITTER_OPS = (_brightness_, _contrast_, _saturation_)


def color_jitter(x: torch.Tensor, factors: torch.Tensor, orders: np.ndarray) -> torch.Tensor:
    """Brightness, contrast and saturation with torchvision's formulas, each image in its
    own order, as torchvision's ColorJitter.

    x: float [B, 3, H, W] in [0, 1], consumed; factors: [B, 3] (`jitter_factors`);
    orders: int [B] on the host (`jitter_orders`). Images are grouped by order, so each
    group is one contiguous slice and each operation one batched call per order.
    """
    by_order = np.argsort(orders, kind="stable")
    starts = np.searchsorted(orders[by_order], np.arange(len(JITTER_ORDERS) + 1))
    rows = to_device(by_order, x.device)
    grouped = x.index_select(0, rows)
    f = factors.to(x.device, x.dtype).index_select(0, rows)[:, :, None, None, None]
    for order, lo, hi in zip(JITTER_ORDERS, starts[:-1].tolist(), starts[1:].tolist()):
        if lo == hi:
            continue
        for op in order:
            _JITTER_OPS[op](grouped[lo:hi], f[lo:hi, op])
    return x.index_copy_(0, rows, grouped)


@functools.lru_cache(maxsize=64)
def _normalize_affine(mean: tuple, std: tuple, device: torch.device, dtype: torch.dtype):
    """(scale, shift) [1, C, 1, 1] with x * scale + shift = (x - mean) / std, made once
    per (mean, std, device, dtype) for the same reason as `_constant`."""
    scale = 1 / _constant(std, device, dtype).view(1, -1, 1, 1)
    shift = -_constant(mean, device, dtype).view(1, -1, 1, 1) * scale
    return scale, shift


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    scale, shift = _normalize_affine(tuple(map(float, mean)), tuple(map(float, std)),
                                     x.device, x.dtype)
    return torch.addcmul(shift, x, scale)  # (x - mean) / std in one pass


def make_views(crops: torch.Tensor, spec: ViewSpec, epoch: int, indices) -> tuple:
    """(teacher, student) float32 [B, 3, S, S], normalised, on crops' device.

    crops: uint8 (0..255) or float (0..1) [B, 3, S, S], already cropped and resized,
    not yet flipped.
    """
    mirror = to_device(np.flatnonzero(flips(spec, epoch, indices)), crops.device)
    crops = crops.index_copy(0, mirror, crops.index_select(0, mirror).flip(-1))
    x = crops.float().div_(255) if crops.dtype == torch.uint8 else crops.float()
    teacher = normalize(x, spec.mean, spec.std)
    if not any(spec.color_jitter):
        return teacher, teacher.clone()
    factors = to_device(jitter_factors(spec, epoch, indices), x.device)
    student = color_jitter(x, factors, jitter_orders(spec, epoch, indices))
    return teacher, normalize(student, spec.mean, spec.std)
