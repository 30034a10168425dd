"""Reading the teacher checkpoints that users download, in their official layouts.

Each format is a function that turns the loaded file into a state dict whose keys
are timm ViT encoder keys. Decoders, heads, predictors, momentum encoders and mask
tokens are dropped here; whatever is left must fit the encoder exactly.
"""
from __future__ import annotations

import argparse
import pickle
from pathlib import Path

import torch

from dmt.errors import CheckpointError

# Keys that belong to the self-supervised training head, never to the encoder.
_NON_ENCODER_PREFIXES = ("decoder_", "decoder.", "mask_token", "masked_embed", "head.",
                         "predictor.", "momentum_encoder.")


def read_checkpoint_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except Exception as err:  # noqa: BLE001 - same message as an unreadable .pth
            raise CheckpointError(f"cannot read checkpoint {path}: {err}") from err
    # Official training checkpoints pickle their argparse arguments next to the weights.
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unreadable file gets the same message
            first = (str(err).splitlines() or [""])[0]
            if isinstance(err, pickle.UnpicklingError) or "weights only" in first.lower():
                # not torch's advice to retry with weights_only=False: that runs any code
                reason = "it pickles objects other than tensors, or is no checkpoint at all"
            else:
                reason = f"not a PyTorch checkpoint, or damaged ({type(err).__name__}: {first})"
            raise CheckpointError(f"cannot read checkpoint {path}: {reason}") from None


def _strip(state: dict, prefixes: tuple[str, ...]) -> dict:
    """Removes any of the leading prefixes, repeatedly ("module.backbone.x" -> "x")."""
    out = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for p in prefixes:
                if key.startswith(p):
                    key, changed = key[len(p):], True
        out[key] = value
    return out


def _drop_non_encoder(state: dict) -> dict:
    return {k: v for k, v in state.items() if not k.startswith(_NON_ENCODER_PREFIXES)}


def _need(obj: dict, key: str, kind: str, path: Path) -> dict:
    if not isinstance(obj, dict) or key not in obj:
        found = sorted(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"{path}: a '{kind}' checkpoint holds its weights under "
                              f"'{key}', but the file has {found}")
    return obj[key]


def mae_encoder(obj: dict, path: Path) -> dict:
    """MAE (facebookresearch/mae): {"model": {...}} with decoder_* keys and mask_token."""
    state = obj["model"] if isinstance(obj, dict) and "model" in obj else obj
    return _drop_non_encoder(state)


def mocov3_encoder(obj: dict, path: Path) -> dict:
    """MoCo v3: {"state_dict": {"module.base_encoder.*", "module.momentum_encoder.*",
    "module.predictor.*"}}; the base encoder is the teacher, its projection head dropped."""
    state = _need(obj, "state_dict", "mocov3", path)
    prefix = "base_encoder."
    state = _strip(state, ("module.",))
    encoder = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not encoder:
        raise CheckpointError(f"{path}: no 'module.base_encoder.' keys in this mocov3 checkpoint")
    return _drop_non_encoder(encoder)


def ibot_encoder(obj: dict, path: Path) -> dict:
    """iBOT: {"state_dict": ...} with optional "backbone."/"module." prefixes, masked_embed
    and head.*; or a full training checkpoint whose "teacher" holds "module.backbone.*"."""
    if isinstance(obj, dict) and "teacher" in obj:
        state = _strip(obj["teacher"], ("module.",))
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    elif isinstance(obj, dict) and "state_dict" in obj:
        state = obj["state_dict"]
    else:
        state = obj
    return _drop_non_encoder(_strip(state, ("module.", "backbone.")))


def dino_encoder(obj: dict, path: Path) -> dict:
    """DINO: a bare backbone state dict (prefixes tolerated, as in its full checkpoints)."""
    return _drop_non_encoder(_strip(obj, ("module.", "backbone.")))


def timm_encoder(obj: dict, path: Path) -> dict:
    """timm: a bare state dict (.pth or .safetensors); the classifier head is dropped."""
    state = {k: v for k, v in obj.items() if not k.startswith(("head.", "head_dist."))}
    return state


# The input statistics each kind's model was trained with. Every official self-supervised
# recipe (MAE, MoCo v3, iBOT, DINO) normalises with the ImageNet mean/std, although timm's
# default config for the same arch name says 0.5/0.5; a timm file (None) follows timm's.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FORMAT_NORMALIZATION = {"mae": (IMAGENET_MEAN, IMAGENET_STD),
                        "mocov3": (IMAGENET_MEAN, IMAGENET_STD),
                        "ibot": (IMAGENET_MEAN, IMAGENET_STD),
                        "dino": (IMAGENET_MEAN, IMAGENET_STD),
                        "timm": None}

CHECKPOINT_FORMATS = {
    "mae": mae_encoder,
    "mocov3": mocov3_encoder,
    "ibot": ibot_encoder,
    "dino": dino_encoder,
    "timm": timm_encoder,
}


def likely_kinds(obj) -> tuple[str, ...]:
    """The official layouts a loaded file looks like, from its top-level keys and key
    prefixes (a bare state dict fits dino and timm alike); () when none."""
    if not isinstance(obj, dict):
        return ()
    if "teacher" in obj:
        return ("ibot",)
    if isinstance(obj.get("model"), dict):
        return ("mae",)
    state = obj.get("state_dict")
    if isinstance(state, dict):
        if any(k.startswith(("module.base_encoder.", "base_encoder.")) for k in state):
            return ("mocov3",)
        return ("ibot",)
    if any(isinstance(v, torch.Tensor) for v in obj.values()):
        return ("dino", "timm")
    return ()


def kind_hint(obj, kind: str) -> str:
    """A line for a load error when the file looks like another kind than the one given."""
    kinds = likely_kinds(obj)
    if not kinds or kind in kinds:
        return ""
    return (f"\n  the file looks like a {' or '.join(repr(k) for k in kinds)} checkpoint, "
            f"not '{kind}': set the teacher's kind to it")
