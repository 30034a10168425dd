"""The student: a timm ViT (final LayerNorm kept) followed by an adapter to the teacher width."""
from __future__ import annotations

import torch
from torch import nn

from dmt.choices import ADAPTERS
from dmt.errors import ConfigError
from dmt.models.vit import create_vit


def build_adapter(kind: str, in_dim: int, out_dim: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    if kind == "identity":
        if in_dim != out_dim:
            raise ConfigError(f"adapter 'identity' needs equal widths, student {in_dim} "
                              f"vs teacher {out_dim}; use 'linear'")
        return nn.Identity()
    if kind == "mlp":
        return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
    raise ConfigError(f"unknown adapter '{kind}'; choose from {list(ADAPTERS)}")


class Student(nn.Module):
    """Tokens [B, 1 + N, D'] of a timm ViT, mapped by the adapter to [B, 1 + N, D]."""

    def __init__(self, arch: str, teacher_dim: int, adapter: str = "linear",
                 img_size: int = 224, drop_path_rate: float = 0.0):
        super().__init__()
        self.backbone = create_vit(arch, img_size, drop_path_rate=drop_path_rate)
        self.arch, self.img_size, self.out_dim = arch, img_size, teacher_dim
        self.adapter = build_adapter(adapter, self.backbone.embed_dim, teacher_dim)

    @property
    def num_tokens(self) -> int:
        return self.backbone.patch_embed.num_patches + self.backbone.num_prefix_tokens

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.backbone.forward_features(images))


def backbone_state_dict(student_state: dict) -> dict:
    """The backbone alone, with timm's keys: loads into timm.create_model(arch, num_classes=0)."""
    prefix = "backbone."
    state = {k[len(prefix):]: v for k, v in student_state.items() if k.startswith(prefix)}
    if not state:
        raise ConfigError("no 'backbone.' keys: this is not a dmt student state dict")
    return state
