"""Builds the run's pieces from a validated config: teachers, student, method, data."""
from __future__ import annotations

import torch

from dmt.choices import DATA_PATH
from dmt.config import used_teachers
from dmt.data import DualViewLoader, build_loader
from dmt.errors import CheckpointError, ConfigError
from dmt.losses import DistillationLoss
from dmt.methods import METHODS
from dmt.models import FrozenTeacher, Student, TeacherEnsemble, create_encoder, load_teacher
from dmt.models.vit import tiling_error

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def check_models(cfg: dict) -> None:
    """Before anything is built for real (shapes only, on the meta device): every
    architecture the run uses exists in timm, and its patches tile model.img_size (timm
    would otherwise drop the last pixel rows and columns without a word)."""
    img_size = cfg["model"]["img_size"]
    archs = {cfg["model"]["arch"]: "model.arch"}
    for i, entry in used_teachers(cfg):
        archs.setdefault(entry["arch"], f"teachers.{i}.arch")
    for arch, key in archs.items():
        check_arch(arch, img_size, key, size_key="model.img_size")


def check_arch(arch: str, img_size: int, key: str, size_key: str = "img_size") -> None:
    """One architecture (named by `key` in messages), on the meta device: a timm ViT whose
    patches tile img_size."""
    try:
        with torch.device("meta"):
            encoder = create_encoder(arch, img_size, check_tiling=False)
    except ConfigError as err:
        raise ConfigError(f"{key}: {err}") from None
    reason = tiling_error(encoder, arch, img_size, size_key, key)
    if reason:
        raise ConfigError(reason)


def build_teachers(cfg: dict, device: torch.device, warn=print,
                   shapes_only: bool = False) -> TeacherEnsemble:
    """The run's teachers. shapes_only: weightless encoders on the meta device, for ranks
    that need the teachers' width and token count but never run them (dedicated students)."""
    dtype = DTYPES[cfg["teacher_runtime"]["dtype"]]
    teachers, failures = [], []
    for i, entry in used_teachers(cfg):
        if entry["kind"] == "random":
            warn(f"teacher '{entry['name']}' is RANDOMLY INITIALISED ({entry['arch']}): fine for "
                 "a demo or a benchmark, meaningless for pretraining. Real runs pass official "
                 "MAE / MoCo v3 / iBOT checkpoints.")
            if entry["checkpoint"]:
                warn(f"teacher '{entry['name']}' is kind random, which loads no weights: its "
                     f"checkpoint {entry['checkpoint']} is ignored (set teachers.{i}.kind to "
                     "the checkpoint's kind to use it)")
        if cfg["method"]["fusion"] == "weighted" and entry["weight"] == 0 and not shapes_only:
            warn(f"teacher '{entry['name']}' has weight 0 with method.fusion=weighted: it runs "
                 "every step and adds nothing to the target; leave it out of method.teachers "
                 "to save its forward pass")
        if shapes_only:
            with torch.device("meta"):
                encoder = create_encoder(entry["arch"], cfg["model"]["img_size"])
            teachers.append(FrozenTeacher(encoder, entry["name"], dtype))
            continue
        try:
            teachers.append(load_teacher(entry["kind"], entry["checkpoint"], arch=entry["arch"],
                                         img_size=cfg["model"]["img_size"], dtype=dtype,
                                         name=entry["name"], seed=cfg["run"]["seed"] + i))
        except CheckpointError as err:  # go on: one message for every teacher that fails
            failures.append(f"teacher '{entry['name']}' (teachers.{i}): {err}")
    if failures:
        raise CheckpointError("\n".join(failures))
    ensemble = TeacherEnsemble(teachers)
    return ensemble if shapes_only else ensemble.to(device)


def teacher_weights(cfg: dict, ensemble: TeacherEnsemble) -> list[float]:
    by_name = {t["name"]: t["weight"] for t in cfg["teachers"]}
    return [float(by_name[name]) for name in ensemble.names]


def build_student(cfg: dict, teacher_dim: int) -> Student:
    m = cfg["model"]
    return Student(m["arch"], teacher_dim, adapter=m["adapter"], img_size=m["img_size"],
                   drop_path_rate=m["drop_path_rate"])


def uses_sample_images(cfg: dict) -> bool:
    """data.path null on a backend that reads files: the bundled sample photos (the demo)."""
    return cfg["data"]["path"] is None and DATA_PATH[cfg["data"]["backend"]] != "count"


def build_data(cfg: dict, path, device, rank: int = 0, world_size: int = 1,
               probe_cache=None) -> DualViewLoader:
    """The run's dual-view loader for one data shard (`rank` of `world_size`) of `path`,
    normalised with ImageNet statistics as the teachers expect."""
    data = cfg["data"]
    return build_loader(data["backend"], path, cfg["optim"]["micro_batch"],
                        image_size=cfg["model"]["img_size"], crop_scale=tuple(data["crop_scale"]),
                        color_jitter=tuple(data["color_jitter"]), seed=cfg["run"]["seed"],
                        rank=rank, world_size=world_size, device=str(device),
                        num_workers=data["num_workers"],
                        probe_cache=data["probe_cache"] if probe_cache is None else probe_cache)


def build_method(cfg: dict, student, teachers: TeacherEnsemble):
    m = cfg["method"]
    loss = DistillationLoss(terms=m["losses"], distance=m["distance"], direction=m["direction"],
                            num_prefix_tokens=student.backbone.num_prefix_tokens)
    return METHODS[m["name"]](student, teachers, loss, fusion=m["fusion"],
                              weights=teacher_weights(cfg, teachers))
