"""Helpers for tests that run launch/pretrain.py in fresh processes, as users do."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
PRETRAIN = REPO / "launch" / "pretrain.py"
_DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _DIST_VARS}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def tiny_config(tmp_path: Path, data_dir: Path, name: str = "run", **sections) -> Path:
    """A run small enough for a 2-core CPU: ViT-Tiny at 32 px, one ViT-Tiny teacher."""
    cfg = {
        "run": {"name": name, "output_dir": str(tmp_path / "runs"), "epochs": 2, "log_every": 1,
                "checkpoint_every": 100, "progress": False},
        "model": {"arch": "vit_tiny_patch16_224", "img_size": 32},
        "teachers": [{"name": "t0", "kind": "random", "arch": "vit_tiny_patch16_224"}],
        "teacher_runtime": {"dtype": "float32"},
        "data": {"backend": "torch", "path": str(data_dir), "num_workers": 0},
        "optim": {"global_batch": 8, "micro_batch": 4, "lr": 1e-3, "warmup_epochs": 0},
        "deepspeed": {"config": "ds_configs/cpu_fp32.json"},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            cfg.setdefault(section, {}).update(values)
        else:
            cfg[section] = values
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_pretrain(config: Path, *args: str, nproc: int = 1, launcher: str = "python",
                 timeout: int = 600) -> subprocess.CompletedProcess:
    if launcher == "python":
        cmd = [sys.executable, str(PRETRAIN)]
    elif launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={free_port()}", str(PRETRAIN)]
    elif launcher == "deepspeed":
        cmd = [str(Path(sys.executable).parent / "deepspeed"), f"--num_gpus={nproc}",
               f"--master_port={free_port()}", str(PRETRAIN)]
    else:
        raise ValueError(launcher)
    return subprocess.run(cmd + ["--config", str(config), *args], cwd=REPO, env=clean_env(),
                          capture_output=True, text=True, timeout=timeout)


def check(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def metrics(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]
