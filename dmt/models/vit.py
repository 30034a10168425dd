"""The one way dmt makes a timm Vision Transformer (student backbone or teacher encoder)."""
from __future__ import annotations

import difflib

import timm
from torch import nn

from dmt.errors import ConfigError


def tiling_error(model: nn.Module, arch: str, img_size: int, size_key: str = "img_size",
                 key: str | None = None) -> str | None:
    """Why `model` cannot distil at img_size (None when it can): no patch grid, or patches
    that do not tile the image. key: the config key naming the architecture, if any."""
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if patch is None:
        return (f"{key + ': ' if key else ''}timm architecture '{arch}' has no "
                "patch_embed.patch_size (dmt distils plain Vision Transformers' patch tokens)")
    patch = patch[0]
    if img_size % patch:
        below = img_size - img_size % patch
        return (f"{size_key}={img_size} is not a multiple of the patch size {patch} of "
                f"{arch}{f' ({key})' if key else ''}: the last {img_size % patch} pixel rows "
                f"and columns would never be seen; use {below} or {below + patch}")
    return None


def create_vit(arch: str, img_size: int = 224, check_tiling: bool = True, **kwargs) -> nn.Module:
    """timm.create_model(arch) without classifier, at img_size; one ConfigError for an
    unknown name, a model that is no ViT, or (check_tiling) patches that do not tile."""
    if not timm.is_model(arch):  # (asked first: building one may fail otherwise, e.g. OOM)
        close = difflib.get_close_matches(arch.split(".")[0], timm.list_models(), n=3)
        raise ConfigError(f"unknown timm architecture '{arch}'"
                          + (f" (close: {', '.join(close)})" if close else ""))
    try:
        model = timm.create_model(arch, pretrained=False, num_classes=0, img_size=img_size,
                                  **kwargs)
    except RuntimeError as err:  # a known name with an unknown tag: "Invalid pretrained tag"
        if "pretrained tag" not in str(err) and "Unknown model" not in str(err):
            raise  # out of memory, say: not a naming problem
        raise ConfigError(f"unknown timm architecture '{arch}': {err}") from err
    except TypeError as err:  # a CNN, say: no img_size / drop_path_rate arguments
        raise ConfigError(f"timm architecture '{arch}' is not a Vision Transformer dmt can "
                          f"use ({err})") from err
    if check_tiling and (reason := tiling_error(model, arch, img_size)):
        raise ConfigError(reason)
    return model


def plain_blocks_error(encoder: nn.Module) -> str | None:
    """Why `encoder` is not a plain timm VisionTransformer of Block(Attention, Mlp) (None
    when it is): what code that rewrites its layers (stacking, FP8) relies on. Other
    attention classes (BEiT, EVA) read their weights in ways such code does not see."""
    from timm.layers import Mlp
    from timm.models.vision_transformer import Block, VisionTransformer
    try:
        from timm.layers.attention import Attention
    except ImportError:  # timm < 1.0.16 kept it in the model file
        from timm.models.vision_transformer import Attention
    if type(encoder) is not VisionTransformer:
        return f"{type(encoder).__name__} is not a plain timm VisionTransformer"
    for i, block in enumerate(encoder.blocks):
        if type(block) is not Block or type(block.attn) is not Attention \
                or type(block.mlp) is not Mlp:
            return f"block {i} is not Block(Attention, Mlp)"
    return None
