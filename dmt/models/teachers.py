"""Frozen teachers: a timm ViT encoder, loaded strictly, run in half precision."""
from __future__ import annotations

from pathlib import Path

import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

from dmt.errors import CheckpointError, ConfigError
from dmt.models.checkpoints import (CHECKPOINT_FORMATS, FORMAT_NORMALIZATION, IMAGENET_MEAN,
                                    IMAGENET_STD, kind_hint, read_checkpoint_file)
from dmt.models.vit import create_vit

_LIST_AT_MOST = 12


def create_encoder(arch: str, img_size: int = 224, **kwargs) -> nn.Module:
    """A timm ViT with no classifier and no stochastic layers (teachers are deterministic)."""
    return create_vit(arch, img_size, drop_rate=0.0, drop_path_rate=0.0, **kwargs)


def _fit_pos_embed(state: dict, model: nn.Module) -> dict:
    """Resamples the checkpoint's position embedding when img_size differs from training."""
    pos = state.get("pos_embed")
    if pos is None or pos.shape == model.pos_embed.shape:
        return state
    if pos.shape[-1] != model.pos_embed.shape[-1]:
        return state  # a width mismatch is reported by the strict check
    state = dict(state)
    state["pos_embed"] = resample_abs_pos_embed(
        pos.float(), new_size=list(model.patch_embed.grid_size),
        num_prefix_tokens=0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens,
    ).to(pos.dtype)
    return state


def _short(items: list) -> str:
    # Top-level keys (cls_token, pos_embed, norm) say more than the 12th block's; list them first.
    items = sorted(items, key=lambda k: (".blocks." in f".{k}", k))
    shown = ", ".join(str(i) for i in items[:_LIST_AT_MOST])
    more = f" (+{len(items) - _LIST_AT_MOST} more)" if len(items) > _LIST_AT_MOST else ""
    return shown + more


def load_encoder_strict(model: nn.Module, state: dict, source: str) -> None:
    """load_state_dict(strict=True), but one error that names the file and every culprit."""
    expected = model.state_dict()
    missing = sorted(k for k in expected if k not in state)
    unexpected = sorted(k for k in state if k not in expected)
    shapes = sorted(f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
                    for k, v in expected.items() if k in state and state[k].shape != v.shape)
    if missing or unexpected or shapes:
        lines = [f"checkpoint {source} does not fit the encoder"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {_short(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {_short(unexpected)}")
        if shapes:
            lines.append(f"  shape mismatches ({len(shapes)}): {_short(shapes)}")
        raise CheckpointError("\n".join(lines))
    model.load_state_dict(state, strict=True)


class FrozenTeacher(nn.Module):
    """Encoder tokens after the final LayerNorm, [B, 1 + N, D], without autograd."""

    def __init__(self, encoder: nn.Module, name: str, dtype: torch.dtype,
                 mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None):
        super().__init__()
        self.encoder = encoder.to(dtype).eval().requires_grad_(False)
        self.name = name
        # The input normalisation the teacher was trained with: given by the checkpoint
        # format where it fixes one, else timm's config for the arch.
        cfg = getattr(encoder, "pretrained_cfg", {}) or {}
        self.mean = tuple(mean if mean is not None else cfg.get("mean", (0.485, 0.456, 0.406)))
        self.std = tuple(std if std is not None else cfg.get("std", (0.229, 0.224, 0.225)))
        # Batches arrive normalised with ImageNet statistics (dmt.data's default); a teacher
        # trained with others converts them: x_own = x_imagenet * scale + shift.
        self.renormalise = self.mean != IMAGENET_MEAN or self.std != IMAGENET_STD
        scale = torch.tensor(IMAGENET_STD) / torch.tensor(self.std)
        shift = (torch.tensor(IMAGENET_MEAN) - torch.tensor(self.mean)) / torch.tensor(self.std)
        # On the encoder's device: a caller that moved the encoder alone gets a whole teacher.
        device = next(self.encoder.parameters()).device
        self.register_buffer("input_scale", scale.view(1, 3, 1, 1).to(device), persistent=False)
        self.register_buffer("input_shift", shift.view(1, 3, 1, 1).to(device), persistent=False)
        self.train(False)

    @property
    def dtype(self) -> torch.dtype:
        """The weights' dtype, which inputs are cast to: .to(dtype), .float() and .half()
        on the teacher (or its ensemble) change it."""
        return next(self.encoder.parameters()).dtype

    @property
    def embed_dim(self) -> int:
        return self.encoder.embed_dim

    @property
    def num_tokens(self) -> int:
        return self.encoder.patch_embed.num_patches + self.encoder.num_prefix_tokens

    def train(self, mode: bool = True):
        return super().train(False)  # frozen for good: no dropout, no drop-path, ever

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.renormalise:
            images = images * self.input_scale + self.input_shift
        return self.encoder.forward_features(images.to(self.dtype))


def load_teacher(kind: str, checkpoint: str | Path | None, arch: str = "vit_base_patch16_224",
                 img_size: int = 224, dtype: torch.dtype = torch.bfloat16,
                 name: str | None = None, seed: int = 0) -> FrozenTeacher:
    """Loads a frozen teacher from an official checkpoint.

    kind: "mae", "mocov3", "ibot", "dino" or "timm" (see dmt.models.checkpoints), or
    "random" for a randomly initialised encoder (demos and benchmarks only: checkpoint
    is ignored and `seed` makes it reproducible).
    """
    name = name or kind
    if kind == "random":
        with torch.random.fork_rng(devices=[]):
            # the CPU generator alone (the encoder is built there): torch.manual_seed would
            # reseed the GPUs' too, which fork_rng(devices=[]) does not restore
            torch.random.default_generator.manual_seed(seed)
            encoder = create_encoder(arch, img_size)
        return FrozenTeacher(encoder, name, dtype, IMAGENET_MEAN, IMAGENET_STD)
    if kind not in CHECKPOINT_FORMATS:
        raise ConfigError(f"unknown teacher kind '{kind}'; choose from "
                          f"{sorted(CHECKPOINT_FORMATS) + ['random']}")
    if checkpoint is None:
        raise ConfigError(f"teacher '{name}' of kind '{kind}' needs a checkpoint file")
    path = Path(checkpoint)
    raw = read_checkpoint_file(path)
    # The checkpoint overwrites the initialisation: keep it off the caller's random stream,
    # so that the student built next starts the same whichever teachers (and how many) load.
    with torch.random.fork_rng(devices=[]):
        encoder = create_encoder(arch, img_size)
    try:
        state = _fit_pos_embed(CHECKPOINT_FORMATS[kind](raw, path), encoder)
        load_encoder_strict(encoder, state, f"{path} (kind '{kind}', arch '{arch}')")
    except CheckpointError as err:  # a file of another kind is the likeliest cause: say so
        raise CheckpointError(f"{err}{kind_hint(raw, kind)}") from None
    mean, std = FORMAT_NORMALIZATION[kind] or (None, None)
    return FrozenTeacher(encoder, name, dtype, mean=mean, std=std)


class TeacherEnsemble(nn.Module):
    """The M frozen teachers of a run; all must produce tokens of the same shape."""

    def __init__(self, teachers: list[FrozenTeacher]):
        super().__init__()
        if not teachers:
            raise ConfigError("at least one teacher is required")
        names = [t.name for t in teachers]
        if len(set(names)) != len(names):
            raise ConfigError(f"teacher names must be unique, got {names}")
        widths = {t.name: t.embed_dim for t in teachers}
        if len(set(widths.values())) > 1:
            raise ConfigError(f"teachers have different widths {widths}: their tokens cannot be "
                              "summed (heterogeneous teachers need per-teacher adapters, "
                              "not supported yet)")
        tokens = {t.name: t.num_tokens for t in teachers}
        if len(set(tokens.values())) > 1:
            raise ConfigError(f"teachers produce different token counts {tokens} "
                              "(patch size or image size differ)")
        self.teachers = nn.ModuleList(teachers)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.teachers]

    @property
    def embed_dim(self) -> int:
        return self.teachers[0].embed_dim

    @property
    def num_tokens(self) -> int:
        return self.teachers[0].num_tokens

    def subset(self, names: list[str]) -> "TeacherEnsemble":
        unknown = [n for n in names if n not in self.names]
        if unknown:
            raise ConfigError(f"unknown teachers {unknown}; loaded: {self.names}")
        return TeacherEnsemble([t for t in self.teachers if t.name in names])

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return [teacher(images) for teacher in self.teachers]
