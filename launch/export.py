#!/usr/bin/env python
"""Exports a run's student backbone as a timm state dict (any ZeRO stage).

    python launch/export.py runs/vits_3t --out vit_small_dmt.pth
    python launch/export.py runs/vits_3t/checkpoints/step00001000 --out vit_small_dmt.safetensors

The file loads with `timm.create_model(arch, img_size=..., num_classes=0).load_state_dict(...)`
at the run's model.arch and model.img_size (the position embeddings depend on it); the
command prints the exact call.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dmt  # noqa: E402,F401
from dmt.engine.checkpoint import (LATEST, export_student, find_checkpoint,  # noqa: E402
                                   read_trainer_state)
from dmt.errors import CheckpointError, ConfigError, DMTError  # noqa: E402


def _checkpoint_dir(path: Path) -> Path:
    """`path` as a checkpoint directory; refused here, as find_checkpoint's message is
    worded for --resume, which export does not take."""
    if not path.exists():
        raise CheckpointError(f"{path} does not exist (expected a run directory or a "
                              "checkpoint directory)")
    if not (path / "trainer_state.json").is_file():
        raise CheckpointError(f"{path} is neither a run directory (RUN/checkpoints/) nor a "
                              "checkpoint directory (RUN/checkpoints/stepNNNNNNNN with "
                              "trainer_state.json)")
    return path


def _a_runs_checkpoints(folder: Path) -> bool:
    """RUN/checkpoints/: its latest pointer or save in progress, or the run's config.yaml
    beside it."""
    return folder.name == "checkpoints" and (
        (folder / LATEST).exists() or (folder / ".tmp").exists()
        or (folder.parent / "config.yaml").is_file())


def _output_file(out: str, ckpt: Path) -> Path:
    """--out as a file path that writing cannot harm the checkpoint being read: an export
    inside RUN/checkpoints/ would replace one of its files (a model state, say)."""
    path = Path(out).expanduser()
    if not path.name or path.is_dir():
        what = "is a folder" if path.name else "names no file"
        raise ConfigError(f"--out {out!r} {what}; name the output file (.pth or .safetensors)")
    ckpt = ckpt.resolve()
    # a run's checkpoints/ folder (its latest pointer, other steps), else the checkpoint's own
    # (a step copied into another folder called checkpoints, beside teacher weights, say)
    protected = ckpt.parent if _a_runs_checkpoints(ckpt.parent) else ckpt
    if protected in path.resolve().parents:
        raise ConfigError(f"--out {out} is inside {protected}: writing it there would "
                          "replace or mix with checkpoint files; choose a path outside it")
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="run directory (its latest checkpoint) or a checkpoint directory")
    p.add_argument("--out", required=True, help="output file (.pth or .safetensors)")
    args = p.parse_args(argv)
    try:
        path = Path(args.path)
        ckpt = find_checkpoint("auto", path) if (path / "checkpoints").is_dir() else _checkpoint_dir(path)
        if ckpt is None:
            raise DMTError(f"{path} has no complete checkpoint yet")
        out = export_student(ckpt, _output_file(args.out, ckpt))
        model = read_trainer_state(ckpt)["config"]["model"]
    except DMTError as err:
        print(f"dmt export: error: {err}", file=sys.stderr)
        return 2
    print(f"exported the student backbone of {ckpt} to {out}\nload it with "
          f"timm.create_model({model['arch']!r}, img_size={model['img_size']}, num_classes=0)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
