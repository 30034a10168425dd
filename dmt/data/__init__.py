"""Dual-view data: one entry point, several sources.

    loader = build_loader("dali", "/data/imagenet/train", batch_size=256, device="cuda")
    loader.set_epoch(epoch, start_batch=0)
    for batch in loader:  # batch["teacher"], batch["student"]: float32 [B, 3, S, S]
        ...

Adding a source = one module with a DualViewLoader subclass, one line in BACKENDS, and
its name in dmt/choices.py (DATA_PATH: what its data.path names) for the config check.
Modules are imported on first use, so DALI or FFCV are needed only when chosen.
"""
import importlib

from dmt.data.augment import IMAGENET_MEAN, IMAGENET_STD, ViewSpec
from dmt.data.folder import scan_image_folder
from dmt.data.loader import DualViewLoader
from dmt.data.samples import write_sample_images
from dmt.errors import ConfigError, DataError

# backend name -> (module, class, pip package it needs)
BACKENDS = {
    "torch": ("dmt.data.torch_backend", "TorchFolderLoader", None),
    "dali": ("dmt.data.dali_backend", "DaliFolderLoader", "nvidia-dali-cuda130"),
    "ffcv": ("dmt.data.ffcv_backend", "FFCVLoader", "ffcv"),
    "synthetic": ("dmt.data.synthetic_backend", "SyntheticLoader", None),
}
PROBING = {"dali"}  # backends that probe every file up front (dmt.data.probe)


def backend_module(backend: str):
    """The module that implements `backend`; a DataError names what is not installed."""
    if backend not in BACKENDS:
        raise ConfigError(f"unknown data backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    module_name, _, package = BACKENDS[backend]
    try:
        return importlib.import_module(module_name)
    except ImportError as error:
        raise DataError(f"data backend {backend!r} needs {package or error.name} installed "
                        f"({error})") from error


def build_loader(backend: str, path, batch_size: int, image_size: int = 224,
                 crop_scale=(0.2, 1.0), color_jitter=(0.4, 0.4, 0.4), seed: int = 0,
                 rank: int = 0, world_size: int = 1, device="cpu", drop_last: bool = True,
                 num_workers=None, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                 probe_cache="auto", shard_probe: bool = True) -> DualViewLoader:
    """A loader of dual-view batches from `backend` ("dali", "ffcv", "torch", "synthetic").

    path: image folder (torch, dali), .beton file (ffcv), sample count or None (synthetic).
    Each batch: "teacher", "student" float32 [batch_size, 3, image_size, image_size],
    normalised with mean/std, on `device`; "index", "label" int64 [batch_size].
    probe_cache, shard_probe (dali, which probes every file up front): where the probe
    index is kept ("auto", a file, or "off"; see dmt.data.probe.cache_path), and whether
    the ranks of an initialised process group split the probe. With shard_probe, the
    first dali loader of a folder is a collective: build it on every rank.
    """
    module = backend_module(backend)
    if len(color_jitter) != 3 or min(color_jitter) < 0:
        raise ConfigError(f"data.color_jitter must be 3 non-negative strengths, got {color_jitter}")
    if not 0 < crop_scale[0] <= crop_scale[1] <= 1:
        raise ConfigError(f"data.crop_scale must satisfy 0 < low <= high <= 1, got {crop_scale}")
    spec = ViewSpec(image_size=int(image_size), crop_scale=tuple(map(float, crop_scale)),
                    color_jitter=tuple(map(float, color_jitter)), seed=int(seed),
                    mean=tuple(map(float, mean)), std=tuple(map(float, std)))
    probing = {"probe_cache": probe_cache, "shard_probe": shard_probe} if backend in PROBING else {}
    return getattr(module, BACKENDS[backend][1])(path, batch_size, spec=spec, seed=seed, rank=rank,
                                       world_size=world_size, device=device,
                                       drop_last=drop_last, num_workers=num_workers, **probing)


__all__ = ["build_loader", "backend_module", "PROBING", "write_sample_images", "scan_image_folder", "DualViewLoader",
           "ViewSpec", "IMAGENET_MEAN", "IMAGENET_STD", "BACKENDS"]
