#!/usr/bin/env python
r"""DMT pretraining.

    python launch/pretrain.py --config configs/demo.yaml                 # one process
    torchrun --nproc_per_node 8 launch/pretrain.py --config configs/dmt_vit_small.yaml
    deepspeed --hostfile hosts launch/pretrain.py --config configs/dmt_vit_small.yaml \
        optim.micro_batch=128 run.name=vits_3t
    ... --resume auto                                                   # continue a run
"""
from __future__ import annotations

import argparse
import difflib
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dmt  # noqa: E402  (before timm: see dmt/__init__.py)
from dmt.config import batch_arithmetic, check_files, load_config, student_ranks  # noqa: E402
from dmt.errors import ConfigError, DMTError  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="experiment YAML (see configs/)")
    p.add_argument("--deepspeed_config", default=None,
                   help="DeepSpeed JSON; overrides deepspeed.config of the YAML")
    p.add_argument("--resume", default=None,
                   help="'auto' (latest checkpoint of this run, if any), a run directory, "
                        "or a checkpoint directory")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    p.add_argument("overrides", nargs="*",
                   help="dotted overrides, e.g. optim.micro_batch=64 (before, between or after "
                        "the options)")
    # Intermixed: `... run.name=a --resume auto run.epochs=4` is read as two overrides.
    return p.parse_intermixed_args(argv)


def check_resume(resume: str | None) -> None:
    """--resume is 'auto' or a path that exists (which kind of directory, the trainer checks):
    a typo is named at once, before the config is read or anything is built."""
    if not resume or resume == "auto" or Path(resume).exists():
        return
    close = difflib.get_close_matches(resume.lower(), ["auto"], n=1)
    hint = ("; did you mean 'auto'?" if close else
            " (it takes 'auto', a run directory or a checkpoint directory)")
    raise ConfigError(f"--resume {resume}: no such run or checkpoint directory{hint}")


def _where_to_resume(cfg: dict | None) -> str:
    if cfg is None:
        return "nothing was written"
    from dmt.config import run_directory
    from dmt.engine.checkpoint import find_checkpoint
    run_dir = run_directory(cfg)
    try:
        found = find_checkpoint("auto", run_dir)
    except DMTError as err:
        return str(err)
    if found is None:
        return f"no checkpoint of {run_dir} was written yet"
    return f"--resume auto continues from {found}"


def main(argv=None) -> int:
    args = parse_args(argv)
    rank, started, cfg = int(os.environ.get("RANK", 0)), False, None
    try:
        # Everything that can be checked is checked before any process group or model exists.
        check_resume(args.resume)
        cfg = load_config(args.config, args.overrides)
        if args.deepspeed_config:
            cfg["deepspeed"]["config"] = args.deepspeed_config
        check_files(cfg)
        from dmt.build import check_models
        check_models(cfg)
        from dmt.engine.distributed import launched_world_size, setup_distributed, teardown

        accum = batch_arithmetic(cfg["optim"]["global_batch"], cfg["optim"]["micro_batch"],
                                 student_ranks(cfg, launched_world_size()))

        from dmt.engine.ds_config import deepspeed_config
        from dmt.engine.trainer import train

        deepspeed_config(cfg, accum)  # a broken or refused DeepSpeed file, before start-up
        info = setup_distributed()
        rank, started = info.rank, True
        result = train(cfg, info, resume=args.resume)
        teardown()
    except KeyboardInterrupt:  # a second Ctrl-C: no checkpoint since the last one
        if rank == 0:
            print(f"dmt: interrupted; {_where_to_resume(cfg)}", file=sys.stderr)
        return 128 + signal.SIGINT
    except DMTError as err:
        if started:
            from dmt.engine.distributed import leave_on_error
            leave_on_error(err)
        # Checks before start-up fail alike on the ranks of a node: said once per node (a
        # path missing on one node only is that node's). Later errors may be one rank's own
        # (its data shard, its teacher stream): every rank speaks.
        if err.same_on_every_rank and rank != 0:  # the same words: rank 0 says them once
            if int(os.environ.get("LOCAL_RANK", 0)) == 0:  # for a node's own log
                print(f"dmt: error: [rank {rank}] stopped with every rank; rank 0 says why",
                      file=sys.stderr)
            return 2
        if started or rank == 0 or int(os.environ.get("LOCAL_RANK", 0)) == 0:
            many = int(os.environ.get("WORLD_SIZE", 1)) > 1
            # (an error every rank agreed on names its ranks itself)
            own = many and (started or rank != 0) and not err.same_on_every_rank
            prefix = f"[rank {rank}] " if own else ""
            print(f"dmt: error: {prefix}{err}", file=sys.stderr)
        return 2
    # Stopped by a signal (with a checkpoint): the shell's convention, 128 + the signal.
    return 128 + result["stopped_by"] if result.get("stopped_by") else 0


if __name__ == "__main__":
    sys.exit(main())
