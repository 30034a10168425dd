"""The recipe's pieces checked against independent expectations: schedule, decay groups, configs."""

import pytest

from dmt.config import batch_arithmetic, check_files, load_config
from dmt.engine.optim import lr_at, param_groups, peak_lr
from dmt.errors import ConfigError
from dmt.models import Student
from engine_utils import REPO


def test_lr_schedule_warmup_then_cosine():
    total, warm, peak = 100, 10, 2.0
    lrs = [lr_at(s, total, warm, peak, 0.0) for s in range(total)]
    assert lrs[:warm] == pytest.approx([peak * (s + 1) / warm for s in range(warm)])
    assert max(lrs) == pytest.approx(peak)
    # halfway through the cosine part the lr is half the peak; it decays monotonically to ~0
    assert lr_at(warm + (total - warm) // 2, total, warm, peak, 0.0) == pytest.approx(peak / 2)
    assert all(a >= b for a, b in zip(lrs[warm:], lrs[warm + 1:]))
    assert lr_at(total, total, warm, peak, 0.1) == pytest.approx(0.1)


def test_peak_lr_scales_with_batch_like_mae():
    cfg = load_config(REPO / "configs" / "dmt_vit_small.yaml")["optim"]
    assert peak_lr(cfg) == pytest.approx(1.5e-4 * 4096 / 256)
    assert peak_lr({**cfg, "lr": 3e-4}) == 3e-4


def test_weight_decay_only_on_weight_matrices():
    student = Student("vit_tiny_patch16_224", 384, img_size=32)
    decay, no_decay = param_groups(student, 0.05)
    names = {id(p): n for n, p in student.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    exempt = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    for n in ("backbone.pos_embed", "backbone.cls_token", "backbone.norm.weight",
              "backbone.blocks.0.attn.qkv.bias", "adapter.bias"):
        assert n in exempt
    for n in ("backbone.blocks.0.attn.qkv.weight", "backbone.patch_embed.proj.weight",
              "adapter.weight"):
        assert n in decayed
    assert len(decayed) + len(exempt) == len(list(student.parameters()))


@pytest.mark.parametrize("size", ["tiny", "small", "base"])
def test_paper_configs_hold_the_recipe(size):
    cfg = load_config(REPO / "configs" / f"dmt_vit_{size}.yaml")
    assert cfg["model"]["arch"] == f"vit_{size}_patch16_224"
    assert [t["kind"] for t in cfg["teachers"]] == ["mae", "mocov3", "ibot"]
    assert {t["arch"] for t in cfg["teachers"]} == {"vit_base_patch16_224"}
    o = cfg["optim"]
    assert (o["global_batch"], o["base_lr"], o["weight_decay"], o["betas"], o["warmup_epochs"]) == \
        (4096, 1.5e-4, 0.05, [0.9, 0.95], 15)
    assert cfg["run"]["epochs"] == 300 and cfg["method"]["fusion"] == "sum"
    # The checkpoints are not shipped: the check names the first missing file.
    with pytest.raises(ConfigError, match="mae_pretrain_vit_base.pth"):
        check_files(cfg)


def test_batch_arithmetic():
    assert batch_arithmetic(4096, 128, 8) == 4
    assert batch_arithmetic(4096, 256, 16) == 1
    with pytest.raises(ConfigError, match="not a multiple"):
        batch_arithmetic(4096, 96, 8)
    with pytest.raises(ConfigError, match="must be positive"):
        batch_arithmetic(4096, 0, 8)


def test_overrides_types_and_lists(tmp_path):
    cfg = load_config(REPO / "configs" / "demo.yaml",
                      ["optim.lr=0.001", "teachers.1.weight=2", "method.teachers=[teacher_a]",
                       "data.color_jitter=[0, 0, 0]"])
    assert cfg["optim"]["lr"] == 0.001 and cfg["teachers"][1]["weight"] == 2
    assert cfg["method"]["teachers"] == ["teacher_a"]
    with pytest.raises(ConfigError, match="teachers.5"):
        load_config(REPO / "configs" / "demo.yaml", ["teachers.5.weight=1"])
    with pytest.raises(ConfigError, match="must be one of"):
        load_config(REPO / "configs" / "demo.yaml", ["method.distance=l1"])
    with pytest.raises(ConfigError, match="list of 3 finite numbers"):
        load_config(REPO / "configs" / "demo.yaml", ["data.color_jitter=[0.4]"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  arhc: vit_tiny_patch16_224\n")
    with pytest.raises(ConfigError, match=r"model.arhc.*did you mean 'model.arch'"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"teachers\[0\].chekpoint"):
        load_config(None, ["teachers=[{kind: mae, chekpoint: x}]"])


def test_deepspeed_config_takes_batch_arithmetic_and_clipping_from_the_yaml(tmp_path):
    from dmt.engine.ds_config import deepspeed_config

    cfg = load_config(REPO / "configs" / "dmt_vit_small.yaml", ["optim.clip_grad=3.0"])
    ds = deepspeed_config(cfg, accum=2)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"],
            ds["gradient_accumulation_steps"]) == (4096, 256, 2)
    assert ds["gradient_clipping"] == 3.0 and ds["bf16"]["enabled"]
    assert deepspeed_config(load_config(REPO / "configs" / "dmt_vit_small.yaml"), 1)["gradient_clipping"] == 0.0
    own = tmp_path / "with_optimizer.json"
    own.write_text('{"optimizer": {"type": "AdamW"}}')
    cfg["deepspeed"]["config"] = str(own)
    with pytest.raises(ConfigError, match="remove the 'optimizer' section"):
        deepspeed_config(cfg, accum=2)
    for section, key in [('"torch_autocast": {"enabled": true}', "torch_autocast.enabled"),
                         ('"zero_optimization": {"stage": 2, "offload_optimizer": '
                          '{"device": "cpu"}}', "zero_optimization.offload_optimizer"),
                         ('"bf16": {"enabled": true, "check_grad_overflow": false}',
                          "bf16.check_grad_overflow=false"),
                         ('"zero_optimization": {"stage": 2, "compute_grad_norm": false}',
                          "zero_optimization.compute_grad_norm=false")]:
        own.write_text("{" + section + "}")
        with pytest.raises(ConfigError, match=f"does not support {key}"):
            deepspeed_config(cfg, accum=2)
    cfg["deepspeed"]["config"] = str(tmp_path / "missing.json")
    with pytest.raises(ConfigError, match=f"deepspeed.config file not found: {tmp_path}/missing"):
        deepspeed_config(cfg, accum=2)
    cfg["deepspeed"]["config"] = str(own)
    own.write_text('{"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "none"}}}')
    assert deepspeed_config(cfg, accum=2)["zero_optimization"]["stage"] == 2
    for broken, message in [('{"train_batch_size": ', "is not valid JSON"),
                            ("[1, 2]", "must hold a JSON object")]:
        own.write_text(broken)
        with pytest.raises(ConfigError, match=message):
            deepspeed_config(cfg, accum=2)


def test_deepspeed_config_values_deepspeed_refuses_are_named_before_start_up(tmp_path):
    """A section that is not an object was an AttributeError traceback; a value DeepSpeed
    refuses (ZeRO stage 7) a pydantic traceback at engine start, after the teachers."""
    from dmt.engine.ds_config import deepspeed_config

    cfg = load_config(REPO / "configs" / "dmt_vit_small.yaml")
    own = tmp_path / "own.json"
    cfg["deepspeed"]["config"] = str(own)
    for text, message in [('{"zero_optimization": "yes"}',
                           "'zero_optimization' must be a JSON object, got 'yes'"),
                          ('{"zero_optimization": {"stage": 7}}',
                           "DeepSpeed refuses it: .*DeepSpeedZeroConfig stage"),
                          ('{"bf16": {"enabled": "maybe"}}',
                           "DeepSpeed refuses it: .*DeepSpeedBF16Config enabled"),
                          ('{"checkpoint": {"tag_validation": "Strict"}}',  # its own error
                           "DeepSpeed refuses it: .*invalid tag_validation value of STRICT")]:
        own.write_text(text)
        with pytest.raises(ConfigError, match=rf"own.json: {message}"):
            deepspeed_config(cfg, accum=2)


def test_deepspeed_config_refuses_what_contradicts_the_yaml(tmp_path, monkeypatch):
    from dmt.engine.ds_config import deepspeed_config

    cfg = load_config(REPO / "configs" / "dmt_vit_small.yaml")  # 4096 = 256 x 2 x 8 ranks
    own = tmp_path / "own.json"
    cfg["deepspeed"]["config"] = str(own)
    for key, value, source in [("gradient_clipping", 1.0, r"optim.clip_grad \(0.0\)"),
                               ("train_batch_size", 1024, r"optim.global_batch \(4096\)"),
                               ("train_micro_batch_size_per_gpu", 64, r"optim.micro_batch \(256\)"),
                               ("gradient_accumulation_steps", 4, r"the batch arithmetic \(2\)")]:
        own.write_text(f'{{"{key}": {value}}}')
        with pytest.raises(ConfigError, match=rf"own.json: {key}={value} disagrees with {source}"):
            deepspeed_config(cfg, accum=2)
    own.write_text('{"train_batch_size": 4096, "gradient_clipping": 0.0}')  # agreeing: kept
    assert deepspeed_config(cfg, accum=2)["train_batch_size"] == 4096
    cfg["deepspeed"]["config"] = "ds_configs/zero2_fp16.json"
    with pytest.raises(ConfigError, match="zero2_fp16.json: fp16 training needs a GPU"):
        deepspeed_config(cfg, accum=2)


@pytest.mark.parametrize("global_batch, accum, cuda, overlap", [
    (4096, 2, True, True),     # 8 GPU ranks: reductions to overlap with the backward
    (512, 2, True, False),     # one GPU rank: nothing to reduce, only a sync per backward
    (4096, 2, False, False),   # CPU: no stream to overlap with
])
def test_overlap_comm_only_with_several_gpu_ranks(global_batch, accum, cuda, overlap,
                                                  monkeypatch):
    from dmt.engine import ds_config

    monkeypatch.setattr(ds_config.torch.cuda, "is_available", lambda: cuda)
    cfg = load_config(REPO / "configs" / "dmt_vit_small.yaml",
                      [f"optim.global_batch={global_batch}"])  # micro-batch 256
    ds = ds_config.deepspeed_config(cfg, accum=accum)
    assert ds["zero_optimization"]["overlap_comm"] is overlap


@pytest.mark.parametrize("override, message", [
    ("run.seed={a: 1}", "'run.seed' must be a single value"),
    ("optim=5", "section 'optim' must be a mapping"),
    ("run.checkpoint_every=0", "'run.checkpoint_every' must be at least 1"),
    ("run.max_nonfinite=0", "'run.max_nonfinite' must be at least 1"),
    ("teachers.0.weight=abc", r"teachers\[0\].weight must be float or int"),
    ("teachers.0.checkpoint=5", r"teachers\[0\].checkpoint must be str"),
    ("teacher_runtime.compile=reduce_overhead",
     r"'teacher_runtime.compile' must be true, false or a torch.compile mode .*'reduce-overhead'"),
])
def test_bad_values_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(REPO / "configs" / "demo.yaml", [override])

