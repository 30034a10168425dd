"""Mistakes a user makes in a config or on a command line get one clear error naming the culprit."""
import importlib.util
import re
import socket
import subprocess
import sys
import time

import pytest
import torch

from dmt.build import build_teachers
from dmt.config import batch_arithmetic, check_files, load_config
from dmt.data.sampling import ShardedEpochs
from dmt.errors import ConfigError, DataError
from engine_utils import PRETRAIN, REPO, check, clean_env, metrics, run_pretrain, tiny_config

# FFCV compiles its helpers with numba; numba's finaliser raises a harmless KeyError at
# garbage collection (upstream noise, as in test_data_tools).
pytestmark = pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <finalize object:pytest.PytestUnraisableExceptionWarning")


def load_script(relative):
    path = REPO / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_config_file_that_is_not_a_mapping_is_named(tmp_path):
    listed = tmp_path / "listed.yaml"
    listed.write_text("- run\n- model\n")
    with pytest.raises(ConfigError, match=r"listed\.yaml must hold a mapping.*got a list"):
        load_config(listed)


def test_a_config_file_that_is_not_utf8_or_not_a_file_is_named(tmp_path):
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("run:\n  name: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"(?s)latin1\.yaml is not valid YAML.*position 16"):
        load_config(latin1)  # was a UnicodeDecodeError traceback
    utf16 = tmp_path / "utf16.yaml"  # with its byte-order mark, as Windows editors write it
    utf16.write_text("run:\n  epochs: 2\n", encoding="utf-16")
    assert load_config(utf16)["run"]["epochs"] == 2
    with pytest.raises(ConfigError, match=rf"config file {tmp_path} is not a regular file"):
        load_config(tmp_path)


@pytest.mark.parametrize("name, message", [(r"\ud800", "cannot be a file name"),
                                           ("x" * 256, "is longer than a folder name may be")])
def test_a_run_name_the_filesystem_refuses_is_a_config_error(name, message):
    with pytest.raises(ConfigError, match=rf"'run\.name' {message}"):
        load_config(REPO / "configs" / "demo.yaml", [f'run.name="{name}"'])


def test_a_duplicate_section_in_a_config_file_is_refused_with_both_lines(tmp_path):
    demo = (REPO / "configs" / "demo.yaml").read_text()
    first = demo.splitlines().index("run:") + 1
    doubled = tmp_path / "doubled.yaml"
    doubled.write_text(demo + "run:\n  epochs: 5\n")
    second = len(demo.splitlines()) + 1
    assert first < second
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(doubled))}: duplicate key 'run' "
                       rf"\(lines {first} and {second}\)"):
        load_config(doubled)


@pytest.mark.parametrize("text, key, lines", [
    ("optim:\n  base_lr: 1.0e-3\n  min_lr: 0\n  base_lr: 2.0e-3\n", "optim.base_lr", (2, 4)),
    ("teachers:\n  - {name: a, kind: random}\n  - kind: random\n    name: b\n    kind: mae\n",
     "teachers.1.kind", (3, 5)),
])
def test_a_duplicate_key_at_any_depth_is_refused(tmp_path, text, key, lines):
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"exp\.yaml: duplicate key '{re.escape(key)}' "
                       rf"\(lines {lines[0]} and {lines[1]}\)"):
        load_config(path)


def test_yaml_merge_keys_and_repeated_overrides_are_not_duplicates(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("teachers:\n  - &t {name: a, kind: random, weight: 2}\n"
                    "  - {<<: *t, name: b}\n")
    cfg = load_config(path, ["run.name=first", "run.name=second"])
    assert [(t["name"], t["weight"]) for t in cfg["teachers"]] == [("a", 2), ("b", 2)]
    assert cfg["run"]["name"] == "second"  # the later override wins, as on any command line
    with pytest.raises(ConfigError, match=r"duplicate key 'teachers\.0\.kind' \(line 1, "
                       r"columns 3 and 14\)"):
        load_config(path, ["teachers=[{kind: mae, kind: ibot}]"])


@pytest.mark.parametrize("override, message", [
    ("optim.base_lr=-1", "'optim.base_lr' must be positive, got -1"),
    ("optim.base_lr=0", "'optim.base_lr' must be positive, got 0"),
    ("optim.lr=-0.001", "'optim.lr' must be positive, got -0.001"),
    ("optim.min_lr=-1.0e-6", "'optim.min_lr' must be at least 0, got -1e-06"),
    ("optim.weight_decay=-0.05", "'optim.weight_decay' must be at least 0, got -0.05"),
    ("optim.warmup_epochs=-1", "'optim.warmup_epochs' must be at least 0, got -1"),
    ("optim.clip_grad=-1.0", "'optim.clip_grad' must be at least 0, got -1.0"),
    ("optim.betas=[0.9, 1.5]", r"'optim.betas' must be two numbers in \[0, 1\)"),
])
def test_negative_optimizer_values_are_refused_by_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(REPO / "configs" / "demo.yaml", [override])


def test_boundary_optimizer_values_are_accepted():
    cfg = load_config(REPO / "configs" / "demo.yaml",
                      ["optim.min_lr=0", "optim.weight_decay=0", "optim.warmup_epochs=0",
                       "optim.lr=null", "optim.betas=[0, 0.999]"])
    o = cfg["optim"]
    assert (o["min_lr"], o["weight_decay"], o["warmup_epochs"], o["lr"]) == (0, 0, 0, None)


@pytest.mark.parametrize("override, message", [
    ("data.crop_scale=[0.5, 0.2]", r"'data.crop_scale' must satisfy 0 < low <= high <= 1"),
    ("data.crop_scale=[0, 1]", r"'data.crop_scale' must satisfy"),
    ("data.color_jitter=[0.4, -0.1, 0.4]", r"'data.color_jitter' must be 3 non-negative"),
    ("teacher_runtime.prefetch=0", "'teacher_runtime.prefetch' must be at least 1, got 0"),
    ("teacher_runtime.transfer_dtype=int8", "teacher_runtime.transfer_dtype"),
])
def test_bad_ranges_and_choices_are_named_with_their_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(REPO / "configs" / "demo.yaml", [override])


@pytest.mark.parametrize("override, message", [
    # An infinite rate passed "must be positive" and trained on NaNs.
    ("optim.base_lr=.inf", r"'optim.base_lr' must be a finite number, got inf"),
    ("optim.weight_decay=.nan", r"'optim.weight_decay' must be a finite number, got nan"),
    ("model.drop_path_rate=-.inf", r"'model.drop_path_rate' must be a finite number"),
    ("data.color_jitter=[.inf, 0, 0]", r"'data.color_jitter' must be a list of 3 finite"),
    ("optim.betas=[0.9, 1" + "0" * 400 + "]", r"'optim.betas' must be two numbers in"),  # no OverflowError
    # On a command line nan and inf are YAML text: said so, rather than a bare type error.
    ("optim.base_lr=inf", r"must be float or int, got 'inf' \(str\) \(YAML reads nan and inf "
                          r"as text; a number is needed\)"),
    ("teachers.0.weight=nan", r"teachers\[0\].weight must be float or int, got 'nan' \(YAML"),
    # No hint for a bool or int key: no spelling of inf would do there.
    ("run.progress=inf", r"'run.progress' must be bool, got 'inf' \(str\)$"),
    ("run.epochs=nan", r"'run.epochs' must be int, got 'nan' \(str\)$"),
])
def test_non_finite_numbers_are_refused_by_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(REPO / "configs" / "demo.yaml", [override])


@pytest.mark.parametrize("override, message", [
    ("model.arch=vit_tiny_patch17_224",
     "model.arch: unknown timm architecture 'vit_tiny_patch17_224'"),
    ("teachers.1.arch=vit_small_patch16_255",
     "teachers.1.arch: unknown timm architecture 'vit_small_patch16_255'"),
    ("model.arch=resnet50", "model.arch: timm architecture 'resnet50' is not a Vision "
     "Transformer dmt can use"),
    ("model.arch=naflexvit_base_patch16_gap", "model.arch: timm architecture "
     "'naflexvit_base_patch16_gap' has no patch_embed.patch_size"),
    ("model.img_size=70", "model.img_size=70 is not a multiple of the patch size 16 of "
     "vit_tiny_patch16_224 (model.arch): the last 6 pixel rows and columns would never be "
     "seen; use 64 or 80"),
])
def test_models_are_checked_before_anything_is_built(override, message):
    from dmt.build import check_models
    check_models(load_config(REPO / "configs" / "demo.yaml"))
    with pytest.raises(ConfigError) as err:
        check_models(load_config(REPO / "configs" / "demo.yaml", [override]))
    assert message in str(err.value)


def test_running_out_of_memory_while_building_a_model_is_not_called_an_unknown_name(
        monkeypatch):
    import timm

    from dmt.models.vit import create_vit

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory")
    monkeypatch.setattr(timm, "create_model", out_of_memory)
    with pytest.raises(RuntimeError, match="can't allocate memory") as err:
        create_vit("vit_base_patch16_224", 224)
    assert not isinstance(err.value, ConfigError)
    with pytest.raises(ConfigError, match=r"unknown timm architecture 'vit_base_patch15_224' "
                                          r"\(close: .*vit_base_patch16_224"):
        create_vit("vit_base_patch15_224", 224)
    monkeypatch.undo()
    with pytest.raises(ConfigError, match=r"unknown timm architecture 'vit_tiny_patch16_224.bogus'"
                                          r": Invalid pretrained tag"):
        create_vit("vit_tiny_patch16_224.bogus", 224)


def test_a_data_path_under_the_home_folder_may_start_with_a_tilde(tmp_path, monkeypatch):
    from dmt.data import write_sample_images
    monkeypatch.setenv("HOME", str(tmp_path))
    write_sample_images(tmp_path / "flat", num_images=2, size=32, seed=0)
    check_files(load_config(REPO / "configs" / "demo.yaml", ["data.path=~/flat"]))
    with pytest.raises(ConfigError, match="data.path does not exist: ~/nope"):
        check_files(load_config(REPO / "configs" / "demo.yaml", ["data.path=~/nope"]))


def test_a_teacher_the_run_does_not_use_is_not_checked():
    from dmt.build import check_models
    check_models(load_config(REPO / "configs" / "demo.yaml",
                             ["teachers.1.arch=vit_small_patch16_255", "method.teachers=[teacher_a]"]))


@pytest.mark.parametrize("name", ["../../escape", "a/b", "..", "''"])
def test_run_name_cannot_point_outside_the_output_dir(name):
    with pytest.raises(ConfigError, match="'run.name' must be a plain folder name"):
        load_config(REPO / "configs" / "demo.yaml", [f"run.name={name}"])
    assert load_config(REPO / "configs" / "demo.yaml", ["run.name=vit-s_3t.v2"])


def test_pretrain_takes_overrides_on_both_sides_of_an_option():
    pretrain = load_script("launch/pretrain.py")
    args = pretrain.parse_args(["--config", "x.yaml", "run.name=k1", "--resume", "auto",
                                "run.epochs=4", "--deepspeed_config", "ds.json", "optim.lr=1"])
    assert args.overrides == ["run.name=k1", "run.epochs=4", "optim.lr=1"]
    assert (args.config, args.resume, args.deepspeed_config) == ("x.yaml", "auto", "ds.json")


@pytest.mark.parametrize("resume, message", [
    ("autoo", "--resume autoo: no such run or checkpoint directory; did you mean 'auto'?"),
    ("Auto", "--resume Auto: no such run or checkpoint directory; did you mean 'auto'?"),
    ("runs/nowhere", "--resume runs/nowhere: no such run or checkpoint directory (it takes "
     "'auto', a run directory or a checkpoint directory)"),
])
def test_a_resume_that_is_neither_auto_nor_a_path_is_named_first(resume, message, capsys,
                                                                   tmp_path, monkeypatch):
    pretrain = load_script("launch/pretrain.py")
    monkeypatch.chdir(tmp_path)  # runs/nowhere is relative: nothing there
    # refused before the config is read: the missing config file is not what it reports
    assert pretrain.main(["--config", "missing.yaml", "--resume", resume]) == 2
    assert capsys.readouterr().err == f"dmt: error: {message}\n"


def test_resume_auto_and_existing_paths_pass_the_early_check(tmp_path):
    pretrain = load_script("launch/pretrain.py")
    (tmp_path / "run").mkdir()
    for resume in (None, "auto", str(tmp_path / "run")):
        pretrain.check_resume(resume)


# --- synthetic data: data.path is a sample count ---------------------------------

def _synthetic(*overrides):
    return load_config(REPO / "configs" / "demo.yaml", ["data.backend=synthetic", *overrides])


def test_synthetic_sample_count_passes_every_check():
    cfg = _synthetic("data.path=100")
    assert cfg["data"]["path"] == 100
    check_files(cfg)  # no file named "100" is looked for
    assert _synthetic("data.path=null")["data"]["path"] is None
    check_files(_synthetic("data.path='100'"))  # quoted, as configs wrote it before


@pytest.mark.parametrize("value", ["0", "-5", "'-5'", "'1e3'", "true", "2.5"])
def test_synthetic_needs_a_positive_integer_count(value):
    with pytest.raises(ConfigError, match="data.path"):
        _synthetic(f"data.path={value}")


def test_exponents_without_a_dot_are_numbers(tmp_path):
    # PyYAML (YAML 1.1) would read 1e-6 as the string '1e-6'; a user means the number.
    experiment = tmp_path / "exp.yaml"
    experiment.write_text("optim:\n  base_lr: 1.5e-4\n  min_lr: 1e-6\n")
    cfg = load_config(experiment, ["optim.weight_decay=5E-2", "data.crop_scale=[2e-1, 1]"])
    assert (cfg["optim"]["base_lr"], cfg["optim"]["min_lr"]) == (1.5e-4, 1e-6)
    assert cfg["optim"]["weight_decay"] == 0.05 and cfg["data"]["crop_scale"] == [0.2, 1]
    assert load_config(None, ["run.name='1e3'"])["run"]["name"] == "1e3"  # quoted: a string


def test_other_backends_still_need_a_path_not_a_count():
    with pytest.raises(ConfigError, match=r"'data.path' must be str for backend torch.*got 100"):
        load_config(REPO / "configs" / "demo.yaml", ["data.backend=torch", "data.path=100"])


def test_synthetic_count_trains_and_overrides_follow_options(tmp_path):
    """The CLI end to end: 64 synthetic samples, global batch 8, so an epoch is 8 steps,
    and the override after --resume is applied (10 steps, not the config's 2 epochs)."""
    cfg = tiny_config(tmp_path, tmp_path, name="syn", data={"backend": "synthetic", "path": None})
    check(run_pretrain(cfg, "data.path=64", "--resume", "auto", "run.max_steps=10"))
    rows = metrics(tmp_path / "runs" / "syn")
    assert [r["step"] for r in rows] == list(range(1, 11))
    assert [r["epoch"] for r in rows] == [0] * 8 + [1] * 2


@pytest.mark.parametrize("given", [
    {"RANK": "1", "WORLD_SIZE": "2"},  # set by hand, LOCAL_RANK and MASTER_* forgotten
    {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"},
])
def test_a_half_set_launch_environment_names_what_is_missing(tmp_path, given):
    """DeepSpeed took such an environment for an MPI launch: 'No module named mpi4py'."""
    cfg = tiny_config(tmp_path, tmp_path, name="env", data={"backend": "synthetic", "path": 16})
    env = {**clean_env(), **given}
    result = subprocess.run([sys.executable, str(PRETRAIN), "--config", str(cfg)], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=300)
    missing = [v for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
               if v not in given]
    assert result.returncode == 2, result.stderr[-2000:]
    assert re.search(rf"dmt: error: (\[rank 1\] )?{', '.join(missing)} not set, while ",
                     result.stderr), result.stderr
    assert "mpi4py" not in result.stderr and "Traceback" not in result.stderr


def test_a_master_port_in_use_is_named_with_the_way_out(tmp_path):
    cfg = tiny_config(tmp_path, tmp_path, name="port", data={"backend": "synthetic", "path": 16})
    with socket.socket() as busy:  # another job's rendezvous on this node
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = {**clean_env(), "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        result = subprocess.run([sys.executable, str(PRETRAIN), "--config", str(cfg)],
                                cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert (f"dmt: error: MASTER_PORT {port} on 127.0.0.1 is in use (another job on this "
            "node?): pick a free port") in result.stderr
    assert not (tmp_path / "runs" / "port").exists()


def test_a_disagreement_names_each_value_with_its_own_ranks(monkeypatch):
    """Four ranks, three learning rates (and an int against a float, which compare equal
    in Python but differ in the file): each value is named with the ranks that hold it."""
    import torch.distributed as dist

    from dmt.engine.distributed import check_same_on_every_rank
    every = [{"optim.lr": 0.001, "run.seed": 1}, {"optim.lr": 0.1, "run.seed": 1.0},
             {"optim.lr": 0.2, "run.seed": 1}, {"optim.lr": 0.001, "run.seed": 1}]
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: len(every))
    monkeypatch.setattr(dist, "all_gather", lambda out, t: [o.fill_(i) for i, o in enumerate(out)])
    monkeypatch.setattr(dist, "all_gather_object", lambda out, obj: out.__setitem__(slice(None), every))
    with pytest.raises(ConfigError) as err:
        check_same_on_every_rank(every[0], "cpu", "Launch alike.")
    assert str(err.value) == (
        "the ranks of this launch disagree: optim.lr: 0.001 on rank(s) [0, 3], 0.1 on rank(s) "
        "[1], 0.2 on rank(s) [2]; run.seed: 1 on rank(s) [0, 2, 3], 1.0 on rank(s) [1]. "
        "Launch alike.")
    assert err.value.same_on_every_rank


def test_a_rendezvous_still_waiting_says_so_and_a_quick_one_says_nothing(capsys):
    """A rank whose peers never come (a node that did not start) used to print nothing
    until the timeout; setup_distributed wraps the rendezvous in this notice."""
    from dmt.engine.distributed import notice_if_slow
    with notice_if_slow(0.05, "still waiting for the 2 ranks"):
        time.sleep(0.5)
    with notice_if_slow(0.05, "never shown"):
        pass
    time.sleep(0.3)
    err = capsys.readouterr().err
    assert err.count("still waiting for the 2 ranks") == 1 and "never shown" not in err


# --- teachers ------------------------------------------------------------------

def test_only_the_selected_teachers_need_checkpoints(tmp_path):
    mae, ibot = tmp_path / "mae.pth", tmp_path / "ibot.pth"
    mae.touch()
    ibot.touch()
    cfg = load_config(REPO / "configs" / "dmt_vit_small.yaml",
                      ["method.teachers=[mae, ibot]", f"teachers.0.checkpoint={mae}",
                       f"teachers.2.checkpoint={ibot}", f"data.path={tmp_path}"])
    check_files(cfg)  # the unused mocov3 checkpoint is not looked for
    ibot.unlink()
    with pytest.raises(ConfigError, match="ibot.pth") as err:
        check_files(cfg)
    assert "vit-b-300ep" not in str(err.value)


def test_every_missing_teacher_checkpoint_is_named_at_once(tmp_path):
    cfg = load_config(REPO / "configs" / "dmt_vit_small.yaml",
                      [f"data.path={tmp_path}", "teachers.1.checkpoint=null"])
    with pytest.raises(ConfigError) as err:
        check_files(cfg)
    message = str(err.value)
    assert "teachers[0] ('mae'): checkpoint file not found: checkpoints/mae_pretrain_vit_base.pth" in message
    assert "teachers[1] ('mocov3', kind mocov3) has no checkpoint" in message
    assert "ibot_vitb16_checkpoint_teacher.pth" in message


def test_a_dangling_link_or_link_loop_is_said_as_such(tmp_path):
    """A link to an unmounted file system reads as "does not exist" to Path.exists(); the
    error says which link points where, so the user looks at the mount, not the config."""
    dangling, loop = tmp_path / "imagenet", tmp_path / "loop"
    dangling.symlink_to(tmp_path / "mnt" / "imagenet")
    loop.symlink_to(loop)
    with pytest.raises(ConfigError) as err:
        check_files(load_config(REPO / "configs" / "demo.yaml", [f"data.path={dangling}"]))
    assert str(err.value) == (f"data.path does not exist: {dangling} (a link to "
                              f"{tmp_path / 'mnt' / 'imagenet'}, which does not exist)")
    with pytest.raises(ConfigError) as err:
        check_files(load_config(REPO / "configs" / "demo.yaml", [f"data.path={loop}"]))
    assert str(err.value) == f"data.path does not exist: {loop} (a loop of symbolic links)"
    cfg = load_config(REPO / "configs" / "dmt_vit_small.yaml",
                      [f"data.path={tmp_path}", f"teachers.0.checkpoint={dangling}",
                       "method.teachers=[mae]"])
    with pytest.raises(ConfigError) as err:
        check_files(cfg)
    assert str(err.value) == (f"teachers[0] ('mae'): checkpoint file not found: {dangling} "
                              f"(a link to {tmp_path / 'mnt' / 'imagenet'}, which does not exist)")


def test_a_random_teacher_warns_that_its_checkpoint_is_ignored():
    teacher = "{name: r, kind: random, arch: vit_tiny_patch16_224, checkpoint: /ckpt/mae.pth}"
    common = ["model.img_size=32", "teacher_runtime.dtype=float32"]
    warnings = []
    build_teachers(load_config(None, [f"teachers=[{teacher}]", *common]), torch.device("cpu"),
                   warn=warnings.append, shapes_only=True)
    assert any("/ckpt/mae.pth is ignored" in w for w in warnings), warnings
    warnings.clear()
    build_teachers(load_config(None, ["teachers=[{kind: random, arch: vit_tiny_patch16_224}]",
                                      *common]),
                   torch.device("cpu"), warn=warnings.append, shapes_only=True)
    assert len(warnings) == 1 and "ignored" not in warnings[0]


def test_every_teacher_checkpoint_that_does_not_load_is_named_at_once(tmp_path):
    """One round trip for the user: an unreadable file and a file of another model size,
    each with its teacher, the file and the reason, in one error."""
    import timm

    from dmt.errors import CheckpointError
    notes, small = tmp_path / "notes.pth", tmp_path / "vit_small.pth"
    notes.write_text("these are not weights\n")
    torch.save(timm.create_model("vit_small_patch16_224", img_size=32, num_classes=0).state_dict(),
               small)
    teachers = ", ".join(f"{{name: {n}, kind: timm, arch: vit_tiny_patch16_224, checkpoint: {f}}}"
                         for n, f in (("a", notes), ("b", small)))
    cfg = load_config(None, [f"teachers=[{teachers}]", "model.img_size=32"])
    with pytest.raises(CheckpointError) as err:
        build_teachers(cfg, torch.device("cpu"))
    message = str(err.value)
    assert f"teacher 'a' (teachers.0): cannot read checkpoint {notes}" in message
    assert (f"teacher 'b' (teachers.1): checkpoint {small} (kind 'timm', arch "
            "'vit_tiny_patch16_224') does not fit the encoder") in message
    assert "blocks.0.attn.qkv.weight: file (1152, 384) vs model (576, 192)" in message


@pytest.mark.parametrize("fusion", ["weighted", "sum"])
@pytest.mark.parametrize("index, value, shown", [(0, "-1", "-1"), (1, "-0.5", "-0.5"),
                                                 (2, ".nan", "nan"), (0, ".inf", "inf")])
def test_a_negative_or_non_finite_teacher_weight_is_named(fusion, index, value, shown):
    with pytest.raises(ConfigError, match=rf"^teachers\[{index}\]\.weight must be a finite "
                       rf"number >= 0, got {shown}$"):
        load_config(REPO / "configs" / "demo.yaml",
                    [f"method.fusion={fusion}", f"teachers.{index}.weight={value}"])


def test_weighted_fusion_needs_a_used_teacher_with_a_positive_weight():
    zero = [f"teachers.{i}.weight=0" for i in range(3)]
    with pytest.raises(ConfigError, match=r"method.fusion=weighted with every teacher the run "
                       r"uses \('teacher_a', 'teacher_b', 'teacher_c'\) at weight 0"):
        load_config(REPO / "configs" / "demo.yaml", ["method.fusion=weighted", *zero])
    # only the teachers that method.teachers picks count
    with pytest.raises(ConfigError, match=r"uses \('teacher_b'\) at weight 0"):
        load_config(REPO / "configs" / "demo.yaml", ["method.fusion=weighted", "teachers.1.weight=0",
                                                     "method.teachers=[teacher_b]"])
    picked = load_config(REPO / "configs" / "demo.yaml",
                         ["method.fusion=weighted", "teachers.0.weight=0", "teachers.2.weight=0",
                          "method.teachers=[teacher_a, teacher_b]"])
    assert [t["weight"] for t in picked["teachers"]] == [0, 1.0, 0]
    # A used teacher at weight 0 is legal but costs a forward pass for nothing: said so.
    import torch

    from dmt.build import build_teachers
    said = []
    build_teachers(picked, torch.device("cpu"), warn=said.append)
    assert [w for w in said if "weight 0" in w] == [
        "teacher 'teacher_a' has weight 0 with method.fusion=weighted: it runs every step and "
        "adds nothing to the target; leave it out of method.teachers to save its forward pass"]
    # sum and mean read no weights (README: weights count only with fusion weighted)
    assert [t["weight"] for t in load_config(REPO / "configs" / "demo.yaml",
                                             ["method.fusion=sum", *zero])["teachers"]] == [0] * 3


# --- batches -------------------------------------------------------------------

@pytest.mark.parametrize("global_batch, micro_batch, ranks", [
    (16, 32, 1), (32, 32, 2), (4096, 96, 8), (100, 32, 1), (4096, 96, 3)])
def test_batch_hint_suggests_distinct_numbers_that_work(global_batch, micro_batch, ranks):
    with pytest.raises(ConfigError) as err:
        batch_arithmetic(global_batch, micro_batch, ranks)
    hint = str(err.value).split("; ", 1)[1]
    globals_ = [int(g) for g in re.search(r"optim\.global_batch=([\d or]+)", hint)
                .group(1).split(" or ")]
    assert globals_ and len(set(globals_)) == len(globals_), hint
    for g in globals_:
        assert g > 0 and batch_arithmetic(g, micro_batch, ranks) >= 1
    micro = re.search(r"optim\.micro_batch=(\d+)", hint)
    if micro:
        assert batch_arithmetic(global_batch, int(micro.group(1)), ranks) >= 1
    else:  # no micro-batch fits: the global batch does not split over the ranks
        assert global_batch % ranks


def test_too_few_samples_names_the_micro_batch_and_the_keys_to_change():
    with pytest.raises(DataError) as err:
        ShardedEpochs(8, 32, world_size=1)
    message = str(err.value)
    assert "8 samples do not fill one micro-batch of 32 on each of 1 rank(s)" in message
    assert "optim.micro_batch" in message and "optim.global_batch" in message
    assert "one global batch of 32" not in message


# --- data files ----------------------------------------------------------------

def test_ffcv_given_a_folder_says_it_needs_a_beton(tmp_path):
    from dmt.data import build_loader

    with pytest.raises(DataError, match=r"is a folder.*launch/make_beton\.py"):
        build_loader("ffcv", tmp_path, 4)
    cfg = load_config(REPO / "configs" / "demo.yaml",
                      ["data.backend=ffcv", f"data.path={tmp_path}"])
    with pytest.raises(ConfigError, match=r"is a folder.*\.beton.*launch/make_beton\.py"):
        check_files(cfg)


def test_loader_benchmark_reports_a_data_error_in_one_line(tmp_path, capsys):
    bench = load_script("benchmarks/dataloader.py")
    missing = tmp_path / "nonexist"
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--backend", "torch", "--path", str(missing), "--out", str(tmp_path / "x.json")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err and str(missing) in err
    assert not (tmp_path / "x.json").exists()


# --- export --------------------------------------------------------------------

def test_export_names_the_path_it_was_given_not_resume(tmp_path, capsys):
    export = load_script("launch/export.py")
    (tmp_path / "plain").mkdir()
    for target, message in ((tmp_path / "nonexist", "does not exist"),
                            (tmp_path / "plain", "neither a run directory")):
        assert export.main([str(target), "--out", str(tmp_path / "x.pth")]) == 2
        err = capsys.readouterr().err
        assert str(target) in err and message in err and "--resume" not in err


def test_export_refuses_an_out_that_would_overwrite_the_checkpoint(tmp_path, capsys):
    """--out naming a file of the checkpoint it reads (or any path in RUN/checkpoints/)
    used to replace that file with the export: the checkpoint was lost."""
    export = load_script("launch/export.py")
    step = tmp_path / "run" / "checkpoints" / "step00000002"
    step.mkdir(parents=True)
    (tmp_path / "run" / "config.yaml").write_text("{}")  # a run's checkpoints/
    (step / "trainer_state.json").write_text("{}")
    model = step / "mp_rank_00_model_states.pt"
    model.write_bytes(b"the model")
    for out in (model, step.parent / "latest", step.parent / "student.pth"):
        assert export.main([str(step), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"--out {out} is inside {step.parent}" in err
    for out, message in (("", "names no file"), (str(tmp_path), "is a folder")):
        assert export.main([str(step), "--out", out]) == 2
        assert message in capsys.readouterr().err
    assert model.read_bytes() == b"the model" and not (step.parent / "latest").exists()


def test_export_beside_a_step_copied_into_another_checkpoints_folder(tmp_path, capsys):
    """Only a run's checkpoints/ is protected as a whole: a step copied into some other
    folder called checkpoints (where the README puts teacher weights) exports beside it."""
    export = load_script("launch/export.py")
    step = tmp_path / "checkpoints" / "step00000002"
    step.mkdir(parents=True)
    (step / "trainer_state.json").write_text("{}")
    out = tmp_path / "checkpoints" / "student.pth"
    export.main([str(step), "--out", str(out)])
    assert "is inside" not in capsys.readouterr().err
    assert export.main([str(step), "--out", str(step / "student.pth")]) == 2
    assert f"is inside {step}" in capsys.readouterr().err


def test_an_export_under_a_file_is_a_storage_error(tmp_path, monkeypatch):
    from dmt.engine import checkpoint as ckpt
    from dmt.errors import StorageError
    monkeypatch.setattr(ckpt, "consolidated_student_state",
                        lambda path: {"backbone.pos_embed": torch.zeros(1, 2, 3)})
    (tmp_path / "file").write_text("x")
    with pytest.raises(StorageError, match="cannot write the exported student"):
        ckpt.export_student(tmp_path / "ckpt", tmp_path / "file" / "student.pth")


def test_unreadable_teacher_checkpoints_say_so_without_unsafe_advice(tmp_path):
    import argparse

    import torch

    from dmt.errors import CheckpointError
    from dmt.models.checkpoints import read_checkpoint_file
    text = tmp_path / "notes.pth"
    text.write_text("these are not weights\n")
    with pytest.raises(CheckpointError, match="cannot read checkpoint .*notes.pth: (not a "
                       "PyTorch checkpoint|it pickles objects other than tensors)") as err:
        read_checkpoint_file(text)
    assert "weights_only" not in str(err.value)
    foreign = tmp_path / "foreign.pth"
    torch.save({"w": torch.ones(2), "f": tmp_path}, foreign)  # a Path: neither tensor nor Namespace
    with pytest.raises(CheckpointError, match="it pickles objects other than tensors") as err:
        read_checkpoint_file(foreign)
    assert "weights_only" not in str(err.value)
    torch.save({"w": torch.ones(2), "args": argparse.Namespace(lr=1)}, foreign)
    assert read_checkpoint_file(foreign)["args"].lr == 1  # what official checkpoints hold


def test_a_truncated_teacher_checkpoint_is_named_in_one_line(tmp_path):
    import torch

    from dmt.errors import CheckpointError
    from dmt.models.checkpoints import read_checkpoint_file
    whole = tmp_path / "whole.pth"
    torch.save({"w": torch.ones(64, 64)}, whole)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(whole.read_bytes()[:2000])
    with pytest.raises(CheckpointError, match=f"cannot read checkpoint {cut}: ") as err:
        read_checkpoint_file(cut)
    assert "\n" not in str(err.value)
    assert read_checkpoint_file(whole)["w"].sum().item() == 64 * 64


def test_every_config_choice_is_implemented():
    """dmt/choices.py is what the config accepts: each value is implemented, and where it
    computes something, computes what its name says (a name added without its code would
    otherwise pass the config check and do something else)."""
    import importlib.util

    from dmt import choices
    from dmt.build import DTYPES
    from dmt.data import BACKENDS
    from dmt.losses import DistillationLoss, fuse_teachers
    from dmt.methods import METHODS
    from dmt.models import CHECKPOINT_FORMATS
    from dmt.models.checkpoints import FORMAT_NORMALIZATION
    from dmt.models.fast import STACK_IS_FASTER, _resolve_stack
    from dmt.models.student import build_adapter
    from dmt.placement import build_placement

    assert set(BACKENDS) == set(choices.BACKENDS)
    for module, cls, _ in BACKENDS.values():  # found without importing DALI or FFCV
        source = importlib.util.find_spec(module).origin
        assert f"class {cls}(" in open(source).read(), (module, cls)
    assert set(METHODS) == set(choices.METHODS)
    assert {name: DTYPES[name] for name in choices.DTYPES} == {
        name: getattr(torch, name) for name in choices.DTYPES}
    assert set(CHECKPOINT_FORMATS) | {"random"} == set(choices.TEACHER_KINDS)
    assert set(FORMAT_NORMALIZATION) == set(CHECKPOINT_FORMATS)
    assert [_resolve_stack(s, "cpu") for s in choices.STACK] == [STACK_IS_FASTER["cpu"], True,
                                                                  False]  # auto, always, never
    a, b = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    expected = {"sum": a + b, "mean": (a + b) / 2, "weighted": 1.0 * a + 2.0 * b}
    for fusion in choices.FUSIONS:
        torch.testing.assert_close(fuse_teachers([a, b], fusion, [1.0, 2.0]), expected[fusion])
    with pytest.raises(ValueError, match="unknown fusion 'max'"):
        fuse_teachers([a, b], "max")
    for distance in choices.DISTANCES:
        for direction in choices.DIRECTIONS:
            loss = DistillationLoss(choices.LOSS_TERMS, distance, direction)
            assert torch.isfinite(loss(a, b)["loss"])
    for adapter in choices.ADAPTERS:
        assert build_adapter(adapter, 8, 8)(a).shape == (2, 5, 8)
    for placement in choices.PLACEMENTS:
        try:
            built = build_placement(placement, int(placement != "colocated"), method=object())
            assert built.kind == placement
        except ConfigError as err:  # dedicated needs a process group: known, just not here
            assert "unknown placement" not in str(err) and "initialised" in str(err)


@pytest.mark.parametrize("placement, teacher_ranks, world, expected", [
    ("colocated", 0, 4, 4),
    ("dedicated", 1, 2, 1),
    ("dedicated", 1, 3, 2),
    ("dedicated", 2, 4, 2),
    ("dedicated", 3, 4, "teacher_runtime.teacher_ranks=3 of world size 4 leaves 1"),
    ("dedicated", 0, 4, "needs teacher_runtime.teacher_ranks >= 1"),
    ("colocated", 1, 4, "teacher_ranks must be 0 with placement 'colocated'"),
])
def test_student_ranks_follow_the_placement_rule(placement, teacher_ranks, world, expected):
    from dmt.config import student_ranks
    cfg = load_config(None, [f"teacher_runtime.placement={placement}",
                             f"teacher_runtime.teacher_ranks={teacher_ranks}"])
    if isinstance(expected, int):
        assert student_ranks(cfg, world) == expected
    else:
        with pytest.raises(ConfigError, match=re.escape(expected)):
            student_ranks(cfg, world)


@pytest.mark.parametrize("overrides, message", [
    (["teachers=[{kind: random}, {kind: random}]"], r"teacher names must be unique, got "
     r"\['random', 'random'\]"),
    (["teachers=[{kind: random, name: a}]", "method.teachers=[a, b]"],
     r"method.teachers names \['b'\] not among the configured teachers \['a'\]"),
    (["teachers=[{kind: random, name: a}]", "method.teachers=[]"],
     r"method.teachers names \[\] not among"),
])
def test_teacher_names_are_checked_with_the_config(overrides, message):
    """No file is needed to see these: they fail at load time, before any other check."""
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_override_values_may_hold_an_equals_sign():
    from dmt.config import parse_override
    assert parse_override("data.path=/data/a=b") == ("data.path", "/data/a=b")


def test_a_crop_scale_of_whole_images_is_valid():
    assert load_config(None, ["data.crop_scale=[1.0, 1.0]"])["data"]["crop_scale"] == [1.0, 1.0]


def test_weighted_fusion_gives_each_chosen_teacher_its_own_weight():
    """method.teachers may leave out an earlier teacher: the weights follow the names."""
    from dmt.build import build_method, build_student, build_teachers
    cfg = load_config(None, ["teachers=[{kind: random, name: a, weight: 1.0, arch: "
                             "vit_tiny_patch16_224}, {kind: random, name: b, weight: 2.0, arch: "
                             "vit_tiny_patch16_224}, {kind: random, name: c, weight: 3.0, arch: "
                             "vit_tiny_patch16_224}]", "method.teachers=[c, b]",
                             "method.fusion=weighted", "model.img_size=32",
                             "model.arch=vit_tiny_patch16_224", "teacher_runtime.dtype=float32"])
    teachers = build_teachers(cfg, torch.device("cpu"), warn=lambda message: None)
    method = build_method(cfg, build_student(cfg, teachers.embed_dim), teachers)
    assert dict(zip(teachers.names, method.weights)) == {"b": 2.0, "c": 3.0}


def test_a_resume_with_other_teacher_weights_is_refused_only_where_they_count(tmp_path):
    from dmt.engine.checkpoint import check_compatible
    from dmt.errors import CheckpointError
    for fusion, refused in (("weighted", True), ("sum", False)):
        saved = load_config(None, ["teachers=[{kind: random, weight: 1.0}]",
                                   f"method.fusion={fusion}"])
        now = load_config(None, ["teachers=[{kind: random, weight: 2.0}]",
                                 f"method.fusion={fusion}"])
        if refused:
            with pytest.raises(CheckpointError, match=r"teachers \(name, kind, arch, weight\)"):
                check_compatible(saved, now, tmp_path)
        else:
            check_compatible(saved, now, tmp_path)
