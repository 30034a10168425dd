"""End-to-end training runs through the real launchers and a real DeepSpeed engine (CPU, gloo)."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from dmt.data import write_sample_images
from engine_utils import (PRETRAIN, REPO, check, clean_env, free_port, metrics, run_pretrain,
                          tiny_config)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_sample_images(tmp_path_factory.mktemp("images"), num_images=32, size=48,
                               seed=0, num_classes=2)


@pytest.fixture(scope="module")
def fixed_images(tmp_path_factory):
    """Eight photos: with full-image crops and no jitter, every step sees the same batch."""
    return write_sample_images(tmp_path_factory.mktemp("fixed"), num_images=8, size=48,
                               seed=1, num_classes=2)


def _timm_load(path, arch="vit_tiny_patch16_224"):
    model = timm.create_model(arch, pretrained=False, num_classes=0, img_size=32)
    state = torch.load(path, map_location="cpu")
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return model, state


@pytest.mark.slow
def test_two_ranks_zero2_bf16_loss_decreases(tmp_path, fixed_images):
    # 2 ranks x micro 4 = global 8 = the whole (fixed) data set in every step.
    cfg = tiny_config(tmp_path, fixed_images, name="ddp", run={"epochs": 24, "max_steps": 24},
                      data={"crop_scale": [1.0, 1.0], "color_jitter": [0, 0, 0]},
                      deepspeed={"config": "ds_configs/zero2_bf16.json"})
    result = check(run_pretrain(cfg, nproc=2, launcher="deepspeed"))
    rows = metrics(tmp_path / "runs" / "ddp")
    assert [r["step"] for r in rows] == list(range(1, 25))
    first = sum(r["loss"] for r in rows[:4]) / 4
    last = sum(r["loss"] for r in rows[-4:]) / 4
    assert last < 0.8 * first, (first, last)
    assert all(0 < r["grad_norm"] < float("inf") for r in rows)  # ZeRO-2's bf16 optimizer's
    assert "2 student rank(s)" in result.stdout
    # ZeRO partitions belong to 2 ranks: resuming on 1 is refused up front, by name.
    config_before = (tmp_path / "runs" / "ddp" / "config.yaml").read_text()
    result = run_pretrain(cfg, "--resume", "auto", "run.max_steps=30")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "ZeRO optimizer partitions of 2 student rank(s), this launch has 1" in result.stderr
    assert (tmp_path / "runs" / "ddp" / "config.yaml").read_text() == config_before
    # Rank 1's partition cut short: only rank 1 reads it, yet both ranks stop, at once.
    ckpt = tmp_path / "runs" / "ddp" / "checkpoints" / "step00000024"
    (partition,) = ckpt.glob("*zero_pp_rank_1_*optim_states.pt")
    partition.write_bytes(partition.read_bytes()[:1000])
    result = run_pretrain(cfg, "--resume", "auto", "run.max_steps=30", nproc=2,
                          launcher="torchrun", timeout=300)
    assert result.returncode != 0
    assert f"[rank 1] checkpoint {ckpt} is damaged: rank 1 found {partition.name}" in result.stderr
    assert f"[rank 0] checkpoint {ckpt} is damaged: another rank found" in result.stderr
    # An intact file of another kind: only rank 1 reads it, and DeepSpeed fails there
    # alone; the ranks agree after the load, so both stop with the message.
    torch.save({"step": 24}, partition)
    result = run_pretrain(cfg, "--resume", "auto", "run.max_steps=30", nproc=2,
                          launcher="torchrun", timeout=300)
    assert result.returncode != 0
    assert f"[rank 1] DeepSpeed could not load the checkpoint in {ckpt} (rank 1: " in result.stderr
    assert (f"[rank 0] DeepSpeed could not load the checkpoint in {ckpt} (it failed on another "
            "rank)") in result.stderr
    # ... and gone, it is named before anything is built.
    partition.unlink()
    result = run_pretrain(cfg, "--resume", "auto", "run.max_steps=30", nproc=2,
                          launcher="torchrun", timeout=300)
    assert "(ZeRO-2) lacks the optimizer partitions of student rank(s) [1]" in result.stderr
    assert (tmp_path / "runs" / "ddp" / "config.yaml").read_text() == config_before


@pytest.mark.slow
def test_zero3_matches_stage0_and_exports(tmp_path, images):
    """The same fp32 run under ZeRO-3 and without ZeRO exports the same student weights,
    and the export loads into timm with no missing or unexpected keys."""
    zero3_fp32 = tmp_path / "zero3_fp32.json"
    ds = json.loads((REPO / "ds_configs" / "zero3_bf16.json").read_text())
    del ds["bf16"]
    zero3_fp32.write_text(json.dumps(ds))
    exports, norms = {}, {}
    for name, ds_path in (("z0", "ds_configs/cpu_fp32.json"), ("z3", str(zero3_fp32))):
        cfg = tiny_config(tmp_path, images, name=name, run={"max_steps": 3},
                          deepspeed={"config": ds_path})
        check(run_pretrain(cfg))
        norms[name] = [r["grad_norm"] for r in metrics(tmp_path / "runs" / name)]
        out = tmp_path / f"{name}.safetensors" if name == "z3" else tmp_path / f"{name}.pth"
        done = check(subprocess.run([sys.executable, "launch/export.py",
                                     str(tmp_path / "runs" / name), "--out", str(out)],
                                    cwd=REPO, capture_output=True, text=True))
        # The printed call is the one _timm_load makes: the run's arch and img_size.
        assert ("timm.create_model('vit_tiny_patch16_224', img_size=32, num_classes=0)"
                in done.stdout), done.stdout
        # Readable as any new file is (safetensors' own writer made it private).
        (tmp_path / "plain").touch()
        assert out.stat().st_mode == (tmp_path / "plain").stat().st_mode
        if out.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(out))
            torch.save(state, tmp_path / "z3.pth")
            out = tmp_path / "z3.pth"
        exports[name] = _timm_load(out)[1]
    # The logged gradient norm: ZeRO-3's optimizer measures it, without ZeRO dmt's guard.
    assert len(norms["z0"]) == 3 and all(n > 0 for n in norms["z0"])
    assert norms["z3"] == pytest.approx(norms["z0"], rel=1e-4)
    assert exports["z0"].keys() == exports["z3"].keys()
    for key in exports["z0"]:
        torch.testing.assert_close(exports["z3"][key], exports["z0"][key], rtol=1e-4, atol=1e-5)
    # The run's own export (written at the end of training) is the same backbone.
    own = torch.load(tmp_path / "runs" / "z0" / "student_vit_tiny_patch16_224.pth")
    assert all(torch.equal(own[k], exports["z0"][k]) for k in own)


@pytest.mark.slow
def test_resume_reproduces_uninterrupted_run(tmp_path, images):
    # 32 images / global 8 = 4 steps per epoch; stop at step 3 (mid-epoch), resume to 8.
    full = tiny_config(tmp_path, images, name="full", run={"epochs": 2})
    check(run_pretrain(full))
    part = tiny_config(tmp_path, images, name="part", run={"epochs": 2, "checkpoint_every": 3})
    check(run_pretrain(part, "run.max_steps=3"))
    # Steps 4-5 ran after the checkpoint before a crash cut a line short: the resumed run
    # redoes them, and metrics.jsonl holds each step once.
    with open(tmp_path / "runs" / "part" / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 1.0}\n{"step": 5, "loss": 1.0}\n{"step": 6, "lo')
    resumed = check(run_pretrain(part, "--resume", "auto"))
    assert "resumed from" in resumed.stdout and "step 3" in resumed.stdout
    assert "found no rng_rank" not in resumed.stdout
    assert "data stream" not in resumed.stdout  # the checkpoint records this dmt's version
    a, b = metrics(tmp_path / "runs" / "full"), metrics(tmp_path / "runs" / "part")
    assert [r["step"] for r in b] == list(range(1, 9))
    assert [r["sample_digest"] for r in a] == [r["sample_digest"] for r in b]
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5, abs=1e-6), (ra, rb)
        assert rb["lr"] == pytest.approx(ra["lr"], rel=1e-12)


def test_compiled_student_trains_like_eager_and_its_checkpoint_resumes_eager(tmp_path, images):
    # model.compile compiles the engine's module in place and the loss: the losses of an
    # eager run within float rounding, and checkpoint names that an eager launch loads.
    eager = tiny_config(tmp_path, images, name="eager", run={"epochs": 1})
    check(run_pretrain(eager))
    compiled = tiny_config(tmp_path, images, name="compiled", model={"compile": True},
                           run={"epochs": 1, "checkpoint_every": 2})
    first = check(run_pretrain(compiled, "run.max_steps=2"))
    assert "vit_tiny_patch16_224 (compiled)" in " ".join(first.stdout.split())
    resumed = check(run_pretrain(compiled, "--resume", "auto", "model.compile=false"))
    assert "resumed from" in resumed.stdout and "(compiled)" not in resumed.stdout
    a, b = metrics(tmp_path / "runs" / "eager"), metrics(tmp_path / "runs" / "compiled")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-4), (ra, rb)


def test_ranks_that_disagree_on_config_or_data_are_refused(tmp_path, images):
    """Nodes launched with other settings (another copy of the YAML, another copy of the
    data) used to train silently wrong: rank 1 stepped its share with its own lr, or its
    own number of steps per epoch. Now the launch stops before writing anything, naming
    what differs and on which rank. Each rank starts in its own directory, as a node does."""
    wrapper = tmp_path / "node.sh"
    wrapper.write_text('#!/bin/sh\nif [ "$RANK" = 1 ]; then cd "$DIR1"; set -- "$@" $EXTRA1; '
                       'else cd "$DIR0"; fi\nexec "$PY" "$PRETRAIN" "$@"\n')
    wrapper.chmod(0o755)
    fewer = write_sample_images(tmp_path / "fewer", num_images=24, size=48, seed=0,
                                num_classes=2)
    for node, data in (("node0", images), ("node1", fewer)):
        (tmp_path / node).mkdir()
        (tmp_path / node / "data").symlink_to(data)
    cfg = tiny_config(tmp_path, "data", name="mixed", optim={"global_batch": 16})

    def launch(extra1: str) -> subprocess.CompletedProcess:
        env = {**clean_env(), "DIR0": str(tmp_path / "node0"), "DIR1": str(tmp_path / "node1"),
               "EXTRA1": extra1, "PY": sys.executable, "PRETRAIN": str(PRETRAIN)}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
               f"--master_port={free_port()}", "--no-python", str(wrapper), "--config", str(cfg)]
        return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=300)

    result = launch("optim.lr=0.1")
    assert result.returncode != 0
    assert ("the ranks of this launch disagree: optim.lr: 0.001 on rank(s) [0], 0.1 on "
            "rank(s) [1]" in result.stderr), result.stderr[-3000:]
    assert result.stderr.count("the ranks of this launch disagree") == 1  # rank 0 says it
    assert not (tmp_path / "runs" / "mixed").exists()  # refused before anything was written
    result = launch("")  # the same config, but node 1's copy of the data has 24 images, not 32
    assert result.returncode != 0
    assert "data samples: 32 on rank(s) [0], 24 on rank(s) [1]" in result.stderr, \
        result.stderr[-3000:]
    assert not (tmp_path / "runs" / "mixed" / "checkpoints").exists()


def test_a_data_folder_empty_on_one_node_stops_every_rank_naming_it(tmp_path, images):
    """Two "nodes" launched by hand, each with its own copy of the data (data.path may
    differ per node); node 1's is empty. Rank 1 used to stop alone, and rank 0 then died in
    its next collective with gloo's "Connection closed by peer" traceback (on NCCL: waited
    until the timeout). Now both stop at once, rank 0 naming rank 1's problem."""
    (tmp_path / "empty").mkdir()
    for node, data in (("node0", images), ("node1", tmp_path / "empty")):
        (tmp_path / node).mkdir()
        (tmp_path / node / "data").symlink_to(data)
    cfg = tiny_config(tmp_path, "data", name="lonely", optim={"global_batch": 16})
    env = {**clean_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "WORLD_SIZE": "2", "LOCAL_RANK": "0", "DEEPSPEED_TIMEOUT": "2"}
    procs = [subprocess.Popen([sys.executable, str(PRETRAIN), "--config", str(cfg)],
                              cwd=tmp_path / f"node{rank}", env={**env, "RANK": str(rank)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    (_, err0), (_, err1) = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [2, 2], err0[-2000:] + err1[-2000:]
    assert "Traceback" not in err0 + err1, err0[-2000:] + err1[-2000:]
    assert re.search(r"dmt: error: data.path data \(backend torch, optim.global_batch 16\): "
                     r"image folder 'data' holds no image files \(looked for [^)]*\) "
                     r"\(on rank 1\)", err0), err0[-2000:]
    assert "dmt: error: [rank 1] data.path data" in err1, err1[-2000:]  # node 1's own log
    assert not (tmp_path / "runs" / "lonely" / "checkpoints").exists()


@pytest.mark.slow
def test_torchrun_two_ranks_and_checkpoint_rotation(tmp_path, images):
    cfg = tiny_config(tmp_path, images, name="tr", run={"epochs": 1, "checkpoint_every": 1,
                                                        "keep_last": 2, "tensorboard": True})
    check(run_pretrain(cfg, nproc=2, launcher="torchrun"))
    ckpts = tmp_path / "runs" / "tr" / "checkpoints"
    # 32 images / (2 ranks x 4) = 4 steps; only the last two kept, `latest` on the newest.
    assert sorted(p.name for p in ckpts.glob("step*")) == ["step00000003", "step00000004"]
    assert (ckpts / "latest").read_text() == "step00000004"
    assert not (ckpts / ".tmp").exists()  # an empty .tmp/ would read as a save in progress
    state = json.loads((ckpts / "step00000004" / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and state["epoch"] == 1 and state["step_in_epoch"] == 0
    assert {p.name for p in (ckpts / "step00000004").glob("rng_rank*.pt")} == {"rng_rank0.pt", "rng_rank1.pt"}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tmp_path / "runs" / "tr" / "tensorboard"))
    events.Reload()
    losses = [e.value for e in events.Scalars("train/loss")]
    assert losses == pytest.approx([r["loss"] for r in metrics(tmp_path / "runs" / "tr")])


@pytest.mark.slow
def test_interrupted_save_leaves_previous_checkpoint_usable(tmp_path, images):
    cfg = tiny_config(tmp_path, images, name="crash", run={"epochs": 1, "checkpoint_every": 2})
    check(run_pretrain(cfg, "run.max_steps=2"))
    ckpts = tmp_path / "runs" / "crash" / "checkpoints"
    # A save that died half-way: DeepSpeed files in .tmp, never renamed, pointer untouched.
    half = ckpts / ".tmp" / "step00000004"
    shutil.copytree(ckpts / "step00000002", half)
    (half / "mp_rank_00_model_states.pt").write_bytes(b"truncated")
    # A checkpoint without this rank's RNG state still resumes, and says so; one written
    # before dmt recorded the sample count too.
    (ckpts / "step00000002" / "rng_rank0.pt").unlink()
    state_file = ckpts / "step00000002" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert state.pop("num_samples") == 32
    state_file.write_text(json.dumps(state))
    result = check(run_pretrain(cfg, "--resume", "auto"))
    assert "resumed from" in result.stdout and "step00000002" in result.stdout
    assert "1 of 1 student rank(s) found no rng_rank<r>.pt" in result.stdout
    # Another dataset (48 samples instead of 32) would change every epoch's order: refused.
    err = _error_of(tmp_path, cfg, "--resume", "auto", "data.backend=synthetic", "data.path=48")
    assert "written by a run that read 32 samples" in err and "this launch reads 48" in err
    assert (ckpts / "latest").read_text() == "step00000004"
    assert not half.exists()


@pytest.mark.slow
def test_damaged_checkpoints_are_refused_with_a_way_out(tmp_path, images):
    """Each kind of damage gets one message naming the file and the checkpoint to use
    instead, and leaves the run directory (config, metrics) as it was."""
    cfg = tiny_config(tmp_path, images, name="dmg", run={"epochs": 1, "checkpoint_every": 2,
                                                        "keep_last": 2})
    check(run_pretrain(cfg, "run.export=false"))
    run_dir = tmp_path / "runs" / "dmg"
    ckpts, newest = run_dir / "checkpoints", run_dir / "checkpoints" / "step00000004"
    way_out = f"newest other complete checkpoint is {ckpts / 'step00000002'}: pass that directory"
    untouched = {f: (run_dir / f).read_bytes() for f in ("config.yaml", "metrics.jsonl")}

    def refused(expected: str):
        result = run_pretrain(cfg, "--resume", "auto", "run.epochs=2", timeout=300)
        assert result.returncode == 2, result.stdout + result.stderr
        assert expected in result.stderr and way_out in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
        assert all((run_dir / f).read_bytes() == data for f, data in untouched.items())

    state_file, states = newest / "trainer_state.json", newest / "mp_rank_00_model_states.pt"
    good_state, good_states = state_file.read_bytes(), states.read_bytes()
    pointer = ckpts / "latest"
    pointer.write_text("")  # an emptied pointer: the newest complete checkpoint is the way out
    result = run_pretrain(cfg, "--resume", "auto", "run.epochs=2", timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert f"{pointer} names no checkpoint ('')" in result.stderr, result.stderr
    assert f"complete checkpoint is {newest}: pass that directory" in result.stderr, result.stderr
    pointer.write_text("..")  # the run directory itself is no checkpoint either
    assert "names no checkpoint ('..')" in run_pretrain(cfg, "--resume", "auto").stderr
    pointer.write_text(newest.name)
    state_file.write_text('{"global_step": 4, "conf')
    refused(f"{state_file} is unreadable")
    state_file.write_bytes(good_state)
    states.write_bytes(good_states[: len(good_states) // 2])
    refused(f"checkpoint {newest} is damaged: rank 0 found mp_rank_00_model_states.pt")
    # An export of it says the same in one line (it used to end in torch's traceback).
    export = subprocess.run([sys.executable, "launch/export.py", str(newest), "--out",
                             str(tmp_path / "x.pth")], cwd=REPO, capture_output=True, text=True)
    assert export.returncode == 2 and "Traceback" not in export.stderr, export.stderr
    assert f"checkpoint {newest} is damaged: mp_rank_00_model_states.pt" in export.stderr
    assert way_out in export.stderr and not (tmp_path / "x.pth").exists()
    states.unlink()
    refused(f"checkpoint {newest} has no DeepSpeed model states")
    shutil.rmtree(newest)
    refused("points to")
    # The way out works: the older checkpoint resumes and trains on.
    result = check(run_pretrain(cfg, "--resume", str(ckpts / "step00000002"), "run.epochs=2"))
    assert "resumed from" in result.stdout and "step00000002" in result.stdout
    # run.epochs went from 1 to 2: the warning gives the lr the next step then trains with.
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert (f"run.epochs changed from 1 to 2: the lr schedule now spans 2 epochs, so the lr "
            f"at step 2 is {rows[2]['lr']:.3g}") in " ".join(result.stdout.split())


@pytest.mark.slow
def test_resume_refuses_a_different_student(tmp_path, images):
    cfg = tiny_config(tmp_path, images, name="mm", run={"max_steps": 1})
    check(run_pretrain(cfg))
    config_before = (tmp_path / "runs" / "mm" / "config.yaml").read_text()
    result = run_pretrain(cfg, "--resume", "auto", "model.arch=vit_small_patch16_224",
                          "model.adapter=linear")
    assert result.returncode == 2
    assert "different run" in result.stderr and "vit_small_patch16_224" in result.stderr
    result = run_pretrain(cfg, "--resume", "auto", "method.losses=[tfd]", "run.seed=3")
    assert result.returncode == 2
    assert "method.losses" in result.stderr and "run.seed" in result.stderr
    # Starting afresh over a run's checkpoints would overwrite them: refused.
    result = run_pretrain(cfg)
    assert result.returncode == 2 and "already holds checkpoints" in result.stderr
    # Refused launches leave the run's config as it was.
    assert (tmp_path / "runs" / "mm" / "config.yaml").read_text() == config_before


@pytest.mark.slow
def test_resume_with_another_zero_layout_is_refused_but_zero1_and_2_resume_each_other(
        tmp_path, images):
    """A ZeRO-2 checkpoint resumed without ZeRO used to fail inside DeepSpeed, and the
    message called the (intact) checkpoint damaged."""
    zero1 = tmp_path / "zero1_fp32.json"
    ds = json.loads((REPO / "ds_configs" / "zero2_fp32.json").read_text())
    ds["zero_optimization"]["stage"] = 1
    zero1.write_text(json.dumps(ds))
    cfg = tiny_config(tmp_path, images, name="z2", run={"max_steps": 2},
                      deepspeed={"config": "ds_configs/zero2_fp32.json"})
    check(run_pretrain(cfg))
    ckpt = tmp_path / "runs" / "z2" / "checkpoints" / "step00000002"
    # DeepSpeed's converter sits beside `latest`, where it looks for the newest checkpoint.
    assert sorted(p.name for p in ckpt.parent.iterdir()) == [
        "latest", "step00000002", "zero_to_fp32.py", "zero_to_torch.py"]
    refused = run_pretrain(cfg, "--resume", "auto", "run.max_steps=4",
                           "deepspeed.config=ds_configs/cpu_fp32.json")
    assert refused.returncode == 2
    assert (f"checkpoint {ckpt} was written with ZeRO stage 2 (ZeRO-1/2), this launch's "
            "deepspeed.config has stage 0") in refused.stderr, refused.stderr[-2000:]
    resumed = check(run_pretrain(cfg, "--resume", "auto", "run.max_steps=4",
                                 f"deepspeed.config={zero1}"))
    assert "resumed from" in resumed.stdout
    assert [r["step"] for r in metrics(tmp_path / "runs" / "z2")] == [1, 2, 3, 4]


def test_resume_follows_the_config_and_a_checkpoint_without_pointer(tmp_path, images):
    """A save cut short after its rename leaves a complete checkpoint and no `latest`:
    --resume auto continues from it (it used to start afresh and overwrite it). Settings a
    resume may change apply from the resumed step on and are listed, the optimizer's
    weight decay and betas included (the loaded optimizer state used to keep the old)."""
    cfg = tiny_config(tmp_path, images, name="ptr", run={"epochs": 1, "checkpoint_every": 2})
    check(run_pretrain(cfg, "run.max_steps=2", "run.export=false"))
    run_dir = tmp_path / "runs" / "ptr"
    (run_dir / "checkpoints" / "latest").unlink()
    assert "already holds checkpoints" in _error_of(tmp_path, cfg)
    result = check(run_pretrain(cfg, "--resume", "auto", "run.max_steps=4",
                                "optim.weight_decay=0.125", "optim.betas=[0.8,0.99]"))
    out = " ".join(result.stdout.split())
    assert "resumed from" in out and "step00000002 at step 2" in out, out
    assert "latest was missing" in out
    assert "optim.weight_decay: 0.05 -> 0.125" in out and "optim.betas: [0.9, 0.95] -> [0.8, 0.99]" in out
    assert [r["step"] for r in metrics(run_dir)] == [1, 2, 3, 4]
    saved = torch.load(run_dir / "checkpoints" / "step00000004" / "mp_rank_00_model_states.pt",
                       weights_only=False)["optimizer"]["param_groups"]
    assert [(g["weight_decay"], tuple(g["betas"])) for g in saved] == [(0.125, (0.8, 0.99)),
                                                                      (0.0, (0.8, 0.99))]
    # A launch that finds the run complete trains nothing and keeps the run's config.
    config = (run_dir / "config.yaml").read_text()
    assert "weight_decay: 0.125" in config
    student = run_dir / "student_vit_tiny_patch16_224.pth"
    exported = student.stat().st_mtime_ns
    done = check(run_pretrain(cfg, "--resume", "auto", "run.max_steps=4", "optim.lr=0.5"))
    assert "already complete" in done.stdout and (run_dir / "config.yaml").read_text() == config
    assert student.stat().st_mtime_ns == exported  # up to date: not written again
    # An export older than the checkpoint (its write failed, leaving an earlier one) is
    # written again by the next launch.
    os.utime(student, (0, 0))
    check(run_pretrain(cfg, "--resume", "auto", "run.max_steps=4"))
    assert student.stat().st_mtime > 0


def test_a_run_directory_in_use_is_refused(tmp_path, images):
    from dmt.engine.runlock import ExclusiveLock
    cfg = tiny_config(tmp_path, images, name="busy", run={"max_steps": 1})
    run_dir = tmp_path / "runs" / "busy"
    with ExclusiveLock(run_dir / ".lock"):  # what a running launch holds
        err = _error_of(tmp_path, cfg)
    assert f"{run_dir} is in use by another launch (process " in err, err
    assert not (run_dir / "config.yaml").exists() and not (run_dir / "checkpoints").exists()
    check(run_pretrain(cfg))  # the lock went with its holder


NAN_SCRIPT = r"""
import sys, torch
sys.path.insert(0, "launch")
import dmt, dmt.losses as L
calls = {"n": 0}
original = L.DistillationLoss.__call__
def poisoned(self, s, t):
    out = original(self, s, t)
    calls["n"] += 1
    if calls["n"] in BAD_CALLS:
        out["loss"] = out["loss"] * float("nan")
    return out
L.DistillationLoss.__call__ = poisoned
import pretrain
sys.exit(pretrain.main(sys.argv[1:]))
"""


GRADS_SCRIPT = NAN_SCRIPT.replace(
    'out["loss"] = out["loss"] * float("nan")',
    # a finite loss with NaN gradients: sqrt at 0 has an infinite slope, times 0
    'out["loss"] = out["loss"] + 0.0 * torch.sqrt(s - s.detach()).sum()')
assert GRADS_SCRIPT != NAN_SCRIPT


def _checkpoint_tensors(step_dir) -> dict:
    """Every tensor DeepSpeed saved for one step (weights, AdamW moments and step counts,
    ZeRO partitions), by file and key path; RNG states left out."""
    found = {}

    def walk(obj, key):
        if torch.is_tensor(obj):
            found[key] = obj
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{key}/{k}")
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(v, f"{key}/{i}")

    for file in sorted(step_dir.glob("*.pt")):
        if not file.name.startswith("rng_"):
            walk(torch.load(file, map_location="cpu", weights_only=False), file.name)
    return found


@pytest.mark.slow
def test_nonfinite_loss_skips_step_then_stops(tmp_path, images):
    cfg = tiny_config(tmp_path, images, name="nan", run={"epochs": 1, "max_nonfinite": 3,
                                                         "checkpoint_every": 1, "keep_last": 4})

    def run(bad_calls, name, *overrides, script=NAN_SCRIPT):
        script = script.replace("BAD_CALLS", repr(set(bad_calls)))
        return subprocess.run([sys.executable, "-c", script, "--config", str(cfg),
                               f"run.name={name}", *overrides], cwd=REPO, capture_output=True,
                              text=True, env={**__import__("engine_utils").clean_env()})

    # micro 4, global 8: 2 micro-batches a step. Poisoning call 3 hits step 2 only.
    # No ZeRO, fp32 (the guard's flag in the fused AdamW kernel skips the step), and the
    # default ZeRO-2 bf16 (DeepSpeed's gradient overflow check sees the NaN first); then
    # NaN gradients under a finite loss, where no-ZeRO fp32 relies on the guard alone.
    for name, ds_config, script in [("once", "cpu_fp32", NAN_SCRIPT),
                                    ("once_bf16", "zero2_bf16", NAN_SCRIPT),
                                    ("grads", "cpu_fp32", GRADS_SCRIPT)]:
        result = check(run([3], name, f"deepspeed.config=ds_configs/{ds_config}.json",
                           script=script))
        if script is GRADS_SCRIPT:
            assert ("step 2: non-finite gradients (the loss was finite), step skipped"
                    in result.stdout + result.stderr)
        rows = metrics(tmp_path / "runs" / name)
        assert [r["skipped_nonfinite"] for r in rows] == [False, True, False, False]
        ckpts = tmp_path / "runs" / name / "checkpoints"
        state = json.loads((ckpts / "step00000004" / "trainer_state.json").read_text())
        assert state["nonfinite_total"] == 1
        # The skipped step changed nothing: weights, both AdamW moments and its step count
        # are those after step 1, bit for bit (lr 0 would still have moved the moments).
        # The (non-finite) gradients were dropped: step 3 trains on.
        after = [_checkpoint_tensors(ckpts / f"step0000000{i}") for i in (1, 2, 3)]
        assert after[0].keys() == after[1].keys() and any("exp_avg_sq" in k for k in after[0])
        for key, value in after[0].items():
            assert torch.equal(value, after[1][key]), (ds_config, key)
        moved = [k for k, v in after[2].items() if not torch.equal(v, after[1][k])]
        assert any("exp_avg" in k for k in moved) and all(torch.isfinite(v).all()
                                                          for v in after[2].values())
    # Every step poisoned: three in a row, then a clear stop.
    result = run(range(1, 100), "always")
    assert result.returncode == 2
    assert "3 non-finite steps in a row" in result.stderr
    # Non-finite student activations: the student itself has gone wrong, so the run stops
    # before the optimizer touches the weights, naming the last checkpoint (step 1).
    script = TOKENS_SCRIPT.replace("BAD_CALLS", "{3}")
    result = subprocess.run([sys.executable, "-c", script, "--config", str(cfg),
                             "run.name=tokens"], cwd=REPO, capture_output=True, text=True,
                            env=__import__("engine_utils").clean_env())
    assert result.returncode == 2
    assert "stopping at step 2: the student produced non-finite activations" in result.stderr
    assert "last checkpoint is" in result.stderr and "step00000001" in result.stderr
    assert (tmp_path / "runs" / "tokens" / "checkpoints" / "latest").read_text() == "step00000001"
    # The host judges a window of steps at once (run.log_every): the stop comes at the end
    # of the window that holds the bad step, which was called off; its rows are written.
    result = subprocess.run([sys.executable, "-c", script, "--config", str(cfg),
                             "run.name=late", "run.log_every=3", "run.checkpoint_every=100"],
                            cwd=REPO, capture_output=True, text=True,
                            env=__import__("engine_utils").clean_env())
    assert result.returncode == 2
    assert ("stopping at step 3: the student produced non-finite activations at step 2"
            in result.stderr)
    assert [r["skipped_nonfinite"] for r in metrics(tmp_path / "runs" / "late")] == [False, True, False]
    # A streak that spans two windows (steps 2 | 3, 4) still stops at the third in a row.
    result = run(range(3, 100), "streak", "run.log_every=2", "run.checkpoint_every=100")
    assert result.returncode == 2
    assert "3 non-finite steps in a row (run.max_nonfinite=3) at step 4" in result.stderr
    # ... and one that spans a resume: steps 3, 4 end the first launch (its checkpoint
    # holds the streak), step 5 of the second is the third in a row.
    check(run(range(5, 9), "resumed", "run.epochs=2", "run.max_steps=4"))
    result = run([1, 2], "resumed", "run.epochs=2", "--resume", "auto")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "3 non-finite steps in a row (run.max_nonfinite=3) at step 5" in result.stderr


TOKENS_SCRIPT = NAN_SCRIPT.replace(
    "original = L.DistillationLoss.__call__", "original = L.DistillationLoss.__call__\n"
    "import dmt.models.student as S\nforward = S.Student.forward\n"
    "def nan_tokens(self, x):\n"
    "    out = forward(self, x)\n"
    "    calls['n'] += 1\n"
    "    return out * float('nan') if calls['n'] in BAD_CALLS else out\n"
    "S.Student.forward = nan_tokens").replace(
    "L.DistillationLoss.__call__ = poisoned", "")


def _error_of(tmp_path, config, *overrides):
    result = run_pretrain(config, *overrides, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    return result.stderr


def test_config_errors_are_one_clear_message(tmp_path, images):
    cfg = tiny_config(tmp_path, images)
    err = _error_of(tmp_path, cfg, "optim.micro_bach=2")
    assert "unknown config key 'optim.micro_bach'" in err and "optim.micro_batch" in err
    err = _error_of(tmp_path, cfg, "optim.micro_batch=four")
    assert "'optim.micro_batch' must be int" in err
    err = _error_of(tmp_path, cfg, "teachers.0.kind=mae", f"teachers.0.checkpoint={tmp_path}/nope.pth")
    assert "checkpoint file not found" in err and "nope.pth" in err
    err = _error_of(tmp_path, cfg, "optim.global_batch=10")
    assert "optim.global_batch=10 is not a multiple of optim.micro_batch=4" in err
    err = _error_of(tmp_path, tmp_path / "missing.yaml")
    assert "config file not found" in err
    assert "Traceback" not in err


@pytest.mark.slow
def test_dedicated_teacher_rank_matches_colocated_through_a_resume(tmp_path, images):
    """1 teacher rank + 2 student ranks give the losses of 2 colocated ranks, also when the
    dedicated run is stopped at step 2 and resumed (teacher ranks pick up the position).
    The teacher loads a checkpoint, as real runs do: student ranks that load none must
    start from the same student (loading once drew on the global random stream)."""
    from dmt.models.teachers import create_encoder
    teacher_file = tmp_path / "teacher.pth"
    torch.save(create_encoder("vit_tiny_patch16_224", 32).state_dict(), teacher_file)
    common = dict(run={"epochs": 1, "checkpoint_every": 2},
                  teachers=[{"name": "t0", "kind": "timm", "checkpoint": str(teacher_file),
                             "arch": "vit_tiny_patch16_224"}])
    coloc = tiny_config(tmp_path, images, name="coloc", **common)
    check(run_pretrain(coloc, nproc=2, launcher="torchrun"))
    dedic = tiny_config(tmp_path, images, name="dedic", **common,
                        teacher_runtime={"dtype": "float32", "placement": "dedicated",
                                         "teacher_ranks": 1})
    # Steps 1-2 stream the targets in fp32, one batch ahead; after the resume, in bf16 (the
    # default), two ahead.
    check(run_pretrain(dedic, "run.max_steps=2", "teacher_runtime.transfer_dtype=float32",
                       "teacher_runtime.prefetch=1", nproc=3, launcher="torchrun"))
    result = check(run_pretrain(dedic, "--resume", "auto", nproc=3, launcher="torchrun"))
    assert "2 student rank(s)" in result.stdout and "resumed from" in result.stdout
    # Signals do not checkpoint here: the run says so, and names the checkpoint interval.
    assert ("dedicated teacher ranks: SIGTERM and Ctrl-C stop the run at once, without a "
            "checkpoint; checkpoints come every 2 steps") in " ".join(result.stdout.split())
    a, b = metrics(tmp_path / "runs" / "coloc"), metrics(tmp_path / "runs" / "dedic")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert [r["sample_digest"] for r in a] == [r["sample_digest"] for r in b]
    # fp32 targets are the colocated ones exactly; bf16 (8 mantissa bits) moves the loss by
    # well under 1e-3 relative.
    for ra, rb in zip(a, b):
        exact = rb["step"] <= 2
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-6 if exact else 1e-3), (ra, rb)


def test_placement_arithmetic_errors(tmp_path, images):
    cfg = tiny_config(tmp_path, images)
    err = _error_of(tmp_path, cfg, "teacher_runtime.teacher_ranks=1")
    assert "teacher_ranks must be 0 with placement 'colocated'" in err
    err = _error_of(tmp_path, cfg, "teacher_runtime.placement=dedicated")
    assert "needs teacher_runtime.teacher_ranks >= 1" in err


@pytest.mark.slow
@pytest.mark.timeout(300)  # FFCV can hang in its loader start-up (ENVIRONMENT.md); fail, not hang
@pytest.mark.parametrize("backend", ["dali", "ffcv"])
def test_trainer_runs_on_the_accelerated_data_backends(tmp_path, images, backend):
    path = images
    if backend == "ffcv":
        pytest.importorskip("ffcv")
        path = tmp_path / "train.beton"
        check(subprocess.run([sys.executable, "launch/make_beton.py", str(images), str(path)],
                             cwd=REPO, capture_output=True, text=True, timeout=240))
    else:
        pytest.importorskip("nvidia.dali")
    cfg = tiny_config(tmp_path, path, name=backend, run={"max_steps": 2},
                      data={"backend": backend, "num_workers": 1})
    check(run_pretrain(cfg, timeout=240))
    rows = metrics(tmp_path / "runs" / backend)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["loss"] > 0 for r in rows)


@pytest.mark.slow
def test_skipped_files_are_all_listed(tmp_path, images):
    # 32 photos + 7 undecodable files, micro-batch 1: every file is drawn in the epoch.
    data = tmp_path / "data"
    shutil.copytree(images, data)
    bad = sorted(f"bad{i}.jpg" for i in range(7))
    for name in bad:
        (data / "class_0" / name).write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    cfg = tiny_config(tmp_path, data, name="bad", run={"epochs": 1, "log_every": 50},
                      optim={"global_batch": 1, "micro_batch": 1})
    result = check(run_pretrain(cfg))
    assert re.search(r"data\s+torch\s.*?\(39\s+samples\)", result.stdout, re.S)  # what it reads
    assert "7 newly found unreadable file(s)" in result.stdout and "and 2 more" in result.stdout
    listed = (tmp_path / "runs" / "bad" / "skipped_files.txt").read_text().split()
    assert sorted(p.rsplit("/", 1)[1] for p in listed) == bad
    # A launch that ends before its epoch does (run.max_steps) lists what it found.
    cfg = tiny_config(tmp_path, data, name="cut", run={"epochs": 1, "log_every": 50},
                      optim={"global_batch": 1, "micro_batch": 1})
    assert "newly found" not in check(run_pretrain(cfg, "run.max_steps=20")).stdout
    listed = (tmp_path / "runs" / "cut" / "skipped_files.txt").read_text().split()
    assert listed and {p.rsplit("/", 1)[1] for p in listed} < set(bad)


def _fake_checkpoint(path, files, **state):
    path.mkdir(parents=True)
    for name in files:
        (path / name).write_bytes(b"x")
    (path / "trainer_state.json").write_text(json.dumps(state))
    return path


def test_a_zero_checkpoint_needs_every_optimizer_partition(tmp_path):
    """With ZeRO the fp32 master weights live in the optimizer partitions: a checkpoint
    without them is refused for resume and export alike (an export used to fall back to
    the rounded module weights without a word)."""
    from dmt.engine.checkpoint import check_complete, consolidated_student_state
    from dmt.errors import CheckpointError
    model = "mp_rank_00_model_states.pt"
    optim = "zero_pp_rank_{}_mp_rank_00_optim_states.pt"
    cases = [  # files, trainer state, the ranks whose partitions are missing (None: complete)
        ([model], {"zero_stage": 2, "student_ranks": 2}, [0, 1]),
        ([model, optim.format(0)], {"zero_stage": 2, "student_ranks": 2}, [1]),
        ([model, optim.format(0), optim.format(1)], {"zero_stage": 1, "student_ranks": 2}, None),
        ([model], {"zero_stage": 0, "student_ranks": 4}, None),
        ([model], {}, None),  # before dmt recorded zero_stage: no partitions, no ZeRO
        (["zero_pp_rank_0_mp_rank_00_model_states.pt"], {"student_ranks": 1}, [0]),  # ZeRO-3
    ]
    for i, (files, state, missing) in enumerate(cases):
        path = _fake_checkpoint(tmp_path / "runs" / f"r{i}" / "checkpoints" / "step00000002",
                                files, config={}, global_step=2, epoch=0, step_in_epoch=2,
                                **state)
        if missing is None:
            check_complete(path, state)
            continue
        with pytest.raises(CheckpointError, match=re.escape(
                f"lacks the optimizer partitions of student rank(s) {missing}")):
            check_complete(path, state)
        with pytest.raises(CheckpointError, match="lacks the optimizer partitions"):
            consolidated_student_state(path)


def test_a_checkpoint_of_an_earlier_dmt_is_refused_for_another_zero_layout(tmp_path):
    """Before dmt recorded zero_stage, a ZeRO-2 checkpoint resumed without ZeRO (or with
    ZeRO-3) failed inside DeepSpeed ('AttributeError: 'NoneType' object has no attribute
    'copy''); DeepSpeed's own copy of its config in the model states names the stage."""
    from dmt.engine.checkpoint import check_loadable
    from dmt.errors import CheckpointError
    state = {"student_ranks": 1}  # no zero_stage: written by an earlier dmt
    path = _fake_checkpoint(tmp_path / "runs" / "old" / "checkpoints" / "step00000004",
                            ["zero_pp_rank_0_mp_rank_00_optim_states.pt"], config={},
                            global_step=4, epoch=0, step_in_epoch=4, **state)
    torch.save({"module": {"w": torch.zeros(2)}, "ds_config": {"zero_optimization": {
        "stage": 2}}}, path / "mp_rank_00_model_states.pt")
    for stage in (0, 3):
        with pytest.raises(CheckpointError, match=re.escape(
                f"written with ZeRO stage 2 (ZeRO-1/2), this launch's deepspeed.config has "
                f"stage {stage}")):
            check_loadable(path, 1, state, stage)
    check_loadable(path, 1, state, 1)
    # A model states file that cannot be read leaves it to the later checks, as before.
    (path / "mp_rank_00_model_states.pt").write_bytes(b"x")
    check_loadable(path, 1, state, 0)


def test_a_checkpoint_without_its_sample_count_is_checked_by_its_steps_per_epoch():
    """Checkpoints of an earlier dmt hold no num_samples: one past its first epoch tells its
    steps per epoch by its position, and another count is refused (it resumed silently into
    a shifted schedule: 'step 21/21 epoch 3' of a 3-epoch run); else it resumes, warned."""
    from dmt.engine.checkpoint import check_same_samples
    from dmt.errors import CheckpointError
    old = {"epoch": 1, "step_in_epoch": 2, "global_step": 8}  # 6 steps per epoch
    with pytest.raises(CheckpointError, match=r"a run of 6 optimizer steps per epoch \(an "
                       r"earlier dmt.*reads 454 samples in data: 7 steps per epoch"):
        check_same_samples(old, 454, "data", Path("ckpt"), 7)
    assert "did not record its sample count" in check_same_samples(old, 384, "data",
                                                                   Path("ckpt"), 6)
    first_epoch = {"epoch": 0, "step_in_epoch": 5, "global_step": 5}
    with pytest.raises(CheckpointError, match="at least 5 optimizer steps per epoch"):
        check_same_samples(first_epoch, 100, "data", Path("ckpt"), 4)
    assert check_same_samples(first_epoch, 384, "data", Path("ckpt"), 6)
    with pytest.raises(CheckpointError, match="read 384 samples"):  # a recorded count
        check_same_samples({**old, "num_samples": 384}, 454, "data", Path("ckpt"), 7)
    assert check_same_samples({**old, "num_samples": 384}, 384, "data", Path("ckpt"), 6) is None


def test_a_checkpoint_of_another_data_stream_version_resumes_with_a_warning():
    """A dmt whose sample order or augmentations changed cannot repeat the old run step for
    step; checkpoints from before the version was recorded may be of either kind."""
    from dmt.data.loader import DATA_STREAM_VERSION
    from dmt.engine.checkpoint import data_stream_note
    here = DATA_STREAM_VERSION
    assert data_stream_note({"data_stream": here}, here, Path("ckpt")) is None
    other = data_stream_note({"data_stream": here - 1}, here, Path("ckpt"))
    assert f"data stream is version {here - 1}, this one's {here}" in other
    assert "does not repeat the uninterrupted run" in other
    unrecorded = data_stream_note({}, here, Path("ckpt"))
    # (dmts from the per-image jitter order until the record wrote version 2 unrecorded)
    assert "did not record its data stream version" in unrecorded
    assert "may not repeat" in unrecorded and "predates the per-image" in unrecorded


def test_changed_settings_lists_what_a_resume_changes_and_what_the_checkpoint_lacked():
    from dmt.config import load_config
    from dmt.engine.checkpoint import changed_settings
    saved = load_config(REPO / "configs" / "demo.yaml")
    del saved["model"]["compile"]  # a checkpoint of a dmt before that key existed
    now = load_config(REPO / "configs" / "demo.yaml", ["run.log_every=7", "run.name=other"])
    assert sorted(changed_settings(saved, now)) == [
        f"model.compile: unset -> {now['model']['compile']!r}",
        f"run.log_every: {saved['run']['log_every']!r} -> 7"]  # run.name: refused before


def test_resume_refuses_other_teacher_weights_at_any_path(tmp_path):
    from dmt.config import load_config
    from dmt.engine.checkpoint import check_same_teacher_files, teacher_files
    from dmt.errors import CheckpointError
    first, same, other = (tmp_path / n for n in ("a.pth", "moved.pth", "b.pth"))
    torch.save({"w": torch.zeros(300_000)}, first)  # over 1 MiB: only the head is hashed
    same.write_bytes(first.read_bytes())
    torch.save({"w": torch.ones(300_000)}, other)

    def files(path, used="[t0]"):
        cfg = load_config(None, [f"teachers=[{{name: t0, kind: timm, checkpoint: {path}}}, "
                                 "{name: t1, kind: random}]", f"method.teachers={used}"])
        return teacher_files(cfg, REPO)

    started = {"teacher_files": files(first)}
    assert list(started["teacher_files"]) == ["t0"]  # a random teacher has no file
    check_same_teacher_files(started, files(same), tmp_path)  # the same bytes, moved
    with pytest.raises(CheckpointError, match="other teacher weights.*\n  t0: checkpoint "
                       f"{first.stat().st_size} bytes"):
        check_same_teacher_files(started, files(other), tmp_path)
    check_same_teacher_files({}, files(other), tmp_path)  # a checkpoint from before the check


def test_the_run_lock_is_released_however_training_ends(tmp_path, images, monkeypatch):
    from dmt.config import load_config
    from dmt.engine import trainer
    from dmt.engine.distributed import DistInfo
    from dmt.engine.runlock import ExclusiveLock
    from dmt.errors import ConfigError, DataError
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    cfg = load_config(tiny_config(tmp_path, images, name="inproc"))

    def fails(*args):
        raise DataError("the data went away")

    monkeypatch.setattr(trainer, "_train", fails)
    with pytest.raises(DataError) as failure:  # pytest keeps the traceback, and its frames
        trainer.train(cfg, info)
    assert failure.value is not None
    with ExclusiveLock(tmp_path / "runs" / "inproc" / ".lock"):
        pass  # free again: a later train() in this process may take the run
    # A run directory that cannot be made is one message (on every rank), not a traceback.
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match=f"cannot write in the run directory {blocker}/x"):
        trainer._lock_run(blocker / "x", info)


def test_resume_with_a_run_directory_takes_its_newest_checkpoint_without_pointer(tmp_path):
    from dmt.engine.checkpoint import find_checkpoint
    from dmt.errors import CheckpointError
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="the run has no complete checkpoint yet"):
        find_checkpoint(str(run), run)
    for step in (2, 4):
        _fake_checkpoint(run / "checkpoints" / f"step{step:08d}", [])
    (run / "checkpoints" / "step00000006").mkdir()  # no trainer state: not complete
    assert find_checkpoint(str(run), run).name == "step00000004"
    (run / "checkpoints" / "latest").write_text("step00000002")  # the pointer rules
    assert find_checkpoint(str(run), run).name == "step00000002"


def test_gradient_accumulation_trains_like_one_big_micro_batch(tmp_path, fixed_images):
    """Global batch 8 as one micro-batch of 8, or as 2 accumulated micro-batches of 4: the
    same samples, so the same logged losses (the terms are averaged over micro-batches,
    the gradients too: the same gradient norm) and the same training, clipping on."""
    losses = {}
    for micro in (8, 4):
        cfg = tiny_config(tmp_path, fixed_images, name=f"micro{micro}",
                          run={"epochs": 3, "checkpoint_every": 100, "export": False},
                          optim={"global_batch": 8, "micro_batch": micro, "lr": 1e-3,
                                 "warmup_epochs": 0, "clip_grad": 0.05})
        check(run_pretrain(cfg))
        losses[micro] = [(r["loss"], r["tfd"], r["sfd"], r["grad_norm"])
                         for r in metrics(tmp_path / "runs" / f"micro{micro}")]
    assert len(losses[8]) == len(losses[4]) == 3
    assert losses[4][0] == pytest.approx(losses[8][0], rel=1e-5)  # before any update
    for one, two in zip(losses[8][1:], losses[4][1:]):
        assert two == pytest.approx(one, rel=1e-3)
    assert losses[8][2][0] != pytest.approx(losses[8][0][0], rel=1e-3)  # it did train
