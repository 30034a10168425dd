"""Teacher loading: every official checkpoint layout round-trips, bad files give named errors.

Checkpoints are fabricated from randomly initialised timm models in each project's own
layout (including the decoder / head / predictor / momentum-encoder / mask keys that a
real file carries), saved with torch.save or safetensors, loaded with load_teacher and
compared, in fp32, with the original model's forward_features.
"""
import argparse

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed
from torch import nn

from dmt.errors import CheckpointError, ConfigError, DMTError
from dmt.models import FrozenTeacher, TeacherEnsemble, load_teacher

ARCH = "vit_tiny_patch16_224"
IMG = 32  # 2 x 2 patches: tiny and fast; every code path is the same as at 224
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _perturbed_vit(arch=ARCH, img_size=IMG, seed=0, num_classes=1000):
    """A timm ViT whose every parameter is random (LayerNorm and biases included), so a
    loader that skips, swaps or re-initialises any tensor changes the output."""
    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False, img_size=img_size, num_classes=num_classes)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def _noise_like(state, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: v + torch.randn(v.shape, generator=g) for k, v in state.items()}


@pytest.fixture(scope="module")
def source():
    return _perturbed_vit(seed=0)


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))


def _encoder_state(model):
    return {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("head.")}


def _mae_file(enc):
    d, dd = enc["cls_token"].shape[-1], 32
    tokens = enc["pos_embed"].shape[1]
    decoder = {
        "mask_token": torch.randn(1, 1, dd),
        "decoder_embed.weight": torch.randn(dd, d), "decoder_embed.bias": torch.randn(dd),
        "decoder_pos_embed": torch.randn(1, tokens, dd),
        "decoder_blocks.0.norm1.weight": torch.randn(dd),
        "decoder_blocks.0.attn.qkv.weight": torch.randn(3 * dd, dd),
        "decoder_blocks.0.mlp.fc1.weight": torch.randn(4 * dd, dd),
        "decoder_norm.weight": torch.randn(dd), "decoder_norm.bias": torch.randn(dd),
        "decoder_pred.weight": torch.randn(16 * 16 * 3, dd), "decoder_pred.bias": torch.randn(768),
    }
    return {"model": {**enc, **decoder}, "optimizer": {"state": {}, "param_groups": []},
            "epoch": 299, "scaler": {"scale": 65536.0},
            "args": argparse.Namespace(model="mae_vit_base_patch16", mask_ratio=0.75)}


def _mocov3_file(enc):
    d = enc["cls_token"].shape[-1]
    base = {**enc, "head.0.weight": torch.randn(64, d), "head.1.weight": torch.randn(64),
            "head.3.weight": torch.randn(32, 64)}
    momentum = _noise_like(base, seed=7)  # a different network: must not be picked
    predictor = {"0.weight": torch.randn(64, 32), "1.running_mean": torch.randn(64),
                 "3.weight": torch.randn(32, 64)}
    state = {**{f"module.base_encoder.{k}": v for k, v in base.items()},
             **{f"module.momentum_encoder.{k}": v for k, v in momentum.items()},
             **{f"module.predictor.{k}": v for k, v in predictor.items()}}
    return {"epoch": 300, "arch": "vit_base", "state_dict": state,
            "optimizer": {"state": {}, "param_groups": []}, "scaler": {}}


def _ibot_head(d):
    return {"head.mlp.0.weight": torch.randn(64, d), "head.last_layer.weight_g": torch.randn(8, 1),
            "head.last_layer2.weight_v": torch.randn(8, 64)}


def _ibot_file(enc, prefix):
    d = enc["cls_token"].shape[-1]
    backbone = {**enc, "masked_embed": torch.randn(1, d)}
    head_prefix = "module." if prefix.startswith("module.") else ""
    return {"state_dict": {**{prefix + k: v for k, v in backbone.items()},
                           **{head_prefix + k: v for k, v in _ibot_head(d).items()}}}


def _ibot_full_training_file(enc):
    d = enc["cls_token"].shape[-1]
    teacher = {**enc, "masked_embed": torch.randn(1, d)}
    student = _noise_like(teacher, seed=8)  # the student must not be picked
    wrap = lambda bb: {**{f"module.backbone.{k}": v for k, v in bb.items()},  # noqa: E731
                       **{f"module.{k}": v for k, v in _ibot_head(d).items()}}
    return {"student": wrap(student), "teacher": wrap(teacher),
            "optimizer": {"state": {}, "param_groups": []}, "epoch": 800,
            "args": argparse.Namespace(arch="vit_base", patch_size=16), "ibot_loss": {}}


def _renormalised(x, mean, std):
    """ImageNet-normalised images re-expressed with other statistics, step by step."""
    view = lambda v: torch.tensor(v).view(1, 3, 1, 1)  # noqa: E731
    raw = x * view(IMAGENET[1]) + view(IMAGENET[0])
    return (raw - view(mean)) / view(std)


def _write(tmp_path, name, obj):
    path = tmp_path / name
    if name.endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in obj.items()}, str(path))
    else:
        torch.save(obj, path)
    return path


def _official(kind, model):
    """(kind for load_teacher, file name, file content) in the project's official layout."""
    enc = _encoder_state(model)
    return {
        "mae": ("mae", "mae_pretrain.pth", lambda: _mae_file(enc)),
        "mocov3": ("mocov3", "mocov3_300ep.pth.tar", lambda: _mocov3_file(enc)),
        "ibot": ("ibot", "ibot_teacher.pth", lambda: _ibot_file(enc, "")),
        "ibot-backbone": ("ibot", "ibot_bb.pth", lambda: _ibot_file(enc, "backbone.")),
        "ibot-module": ("ibot", "ibot_mod.pth", lambda: _ibot_file(enc, "module.backbone.")),
        "ibot-full": ("ibot", "checkpoint.pth", lambda: _ibot_full_training_file(enc)),
        "dino": ("dino", "dino_vitbase16_pretrain.pth", lambda: dict(enc)),
        "timm": ("timm", "vit.pth", lambda: dict(model.state_dict())),
        "timm-safetensors": ("timm", "model.safetensors", lambda: dict(model.state_dict())),
    }[kind]


FORMATS = ["mae", "mocov3", "ibot", "ibot-backbone", "ibot-module", "ibot-full", "dino",
           "timm", "timm-safetensors"]

# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("fmt", FORMATS)
def test_checkpoint_format_round_trips(fmt, source, images, tmp_path):
    kind, name, content = _official(fmt, source)
    path = _write(tmp_path, name, content())
    teacher = load_teacher(kind, path, arch=ARCH, img_size=IMG, dtype=torch.float32)
    assert isinstance(teacher, FrozenTeacher)
    if kind == "timm":
        # Batches arrive normalised with ImageNet statistics; a timm checkpoint was trained
        # with its arch's statistics (0.5 / 0.5 for this name), so the teacher converts.
        mean, std = source.pretrained_cfg["mean"], source.pretrained_cfg["std"]
        assert (teacher.mean, teacher.std) == (tuple(mean), tuple(std))
        own = _renormalised(images, mean, std)
        tol = 1e-5  # the conversion itself rounds differently
    else:  # the official SSL recipes all normalise with ImageNet statistics
        assert (teacher.mean, teacher.std) == IMAGENET
        own, tol = images, 1e-6
    with torch.no_grad():
        want = source.forward_features(own)
    got = teacher(images)
    assert got.shape == (2, 1 + (IMG // 16) ** 2, 192)
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def test_default_arguments_vit_base_bf16(tmp_path):
    """The defaults (ViT-B/16, 224, bf16) on an MAE file: one test at full size."""
    model = _perturbed_vit("vit_base_patch16_224", img_size=224, seed=3)
    enc = {k: v.half() for k, v in _encoder_state(model).items()}  # halves the file
    model.load_state_dict({**model.state_dict(), **enc})  # reference = the stored values
    path = _write(tmp_path, "mae_pretrain_vit_base.pth", _mae_file(enc))
    teacher = load_teacher("mae", path)
    assert teacher.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in teacher.parameters())
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    got = teacher(x)
    assert got.shape == (1, 197, 768) and got.dtype == torch.bfloat16
    with torch.no_grad():
        want = model.forward_features(x)
    # Tolerance, and why: bf16 keeps 8 significant bits (relative rounding 2^-9 ~ 0.2 %)
    # and the error compounds through 12 blocks of weights and activations, so tokens agree
    # with fp32 to ~1 % on average with rare outliers of a few %. Measured here: mean error
    # 1.3 % of the mean |token|, worst element 5 % of (1 + |value|), per-token cosine
    # 0.9999. Limits, ~3x those: a wrongly loaded tensor gives errors of order 100 %.
    err = (got.float() - want).abs()
    assert err.mean() < 0.03 * want.abs().mean()
    assert (err / (1 + want.abs())).max() < 0.15
    assert torch.nn.functional.cosine_similarity(got.float(), want, dim=-1).min() > 0.999


def test_img_size_resamples_position_embedding(tmp_path, images):
    model224 = _perturbed_vit(img_size=224, seed=4)
    path = _write(tmp_path, "dino.pth", _encoder_state(model224))
    teacher = load_teacher("dino", path, arch=ARCH, img_size=64, dtype=torch.float32)

    pos224 = model224.pos_embed.detach()
    pos64 = teacher.encoder.pos_embed
    assert pos64.shape == (1, 1 + 4 * 4, 192)
    torch.testing.assert_close(pos64[:, :1], pos224[:, :1], rtol=0, atol=0)  # class token
    want = resample_abs_pos_embed(pos224, new_size=[4, 4], num_prefix_tokens=1)
    torch.testing.assert_close(pos64, want, rtol=1e-6, atol=1e-6)

    # Everything else unchanged: the 224 model's weights with that position embedding.
    ref = timm.create_model(ARCH, pretrained=False, img_size=64, num_classes=0).eval()
    ref.load_state_dict({**_encoder_state(model224), "pos_embed": want}, strict=True)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), ref.forward_features(x), rtol=1e-6, atol=1e-6)
    assert teacher(x).shape == (2, 17, 192)


# ---------------------------------------------------------------- frozen


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_teacher_is_frozen_without_graph(dtype, source, images, tmp_path):
    kind, name, content = _official("mae", source)
    teacher = load_teacher(kind, _write(tmp_path, name, content()), arch=ARCH, img_size=IMG,
                           dtype=dtype)
    teacher.train()  # asking for train mode must not bring dropout or drop-path back
    assert not teacher.training
    assert all(not m.training for m in teacher.modules())
    assert all(not p.requires_grad and p.dtype == dtype for p in teacher.parameters())
    for m in teacher.modules():
        if isinstance(m, nn.Dropout):
            assert m.p == 0.0
        if type(m).__name__ == "DropPath":
            assert m.drop_prob == 0.0

    x = images.clone().requires_grad_(True)
    with torch.enable_grad():
        a, b = teacher(x), teacher(x)
    assert a.dtype == dtype
    assert not a.requires_grad and a.grad_fn is None and a.is_inference()
    assert torch.equal(a, b)


# ---------------------------------------------------------------- bad checkpoints


def _message(excinfo):
    return str(excinfo.value)


def test_missing_file_names_path(tmp_path):
    path = tmp_path / "no" / "such" / "mae_pretrain_vit_base.pth"
    with pytest.raises(CheckpointError) as excinfo:
        load_teacher("mae", path, arch=ARCH, img_size=IMG)
    assert str(path) in _message(excinfo)
    assert isinstance(excinfo.value, DMTError)


def _official_content(fmt: str, enc: dict):
    """An encoder state dict wrapped in the container of the given official layout."""
    wrap = {"mae": _mae_file, "mocov3": _mocov3_file, "ibot-full": _ibot_full_training_file}
    return wrap[fmt](enc) if fmt in wrap else enc  # dino and timm files are bare state dicts


@pytest.mark.parametrize("fmt", ["mae", "mocov3", "ibot-full", "dino", "timm"])
def test_missing_keys_named(fmt, source, tmp_path):
    kind, name, _ = _official(fmt, source)
    enc = _encoder_state(source)
    gone = ["blocks.1.mlp.fc1.weight", "norm.bias"]
    for k in gone:
        del enc[k]
    content = _official_content(fmt, enc)
    path = _write(tmp_path, name, content)
    with pytest.raises(CheckpointError) as excinfo:
        load_teacher(kind, path, arch=ARCH, img_size=IMG)
    msg = _message(excinfo)
    assert str(path) in msg and "missing" in msg
    for k in gone:
        assert k in msg
    assert "looks like" not in msg  # the right kind, a damaged file: no other kind to suggest


@pytest.mark.parametrize("fmt", ["mae", "mocov3", "ibot-full", "dino", "timm-safetensors"])
def test_unexpected_keys_named(fmt, source, tmp_path):
    kind, name, _ = _official(fmt, source)
    enc = _encoder_state(source)
    extra = {"blocks.0.attn.gamma": torch.ones(192), "fc_norm.weight": torch.ones(192)}
    enc.update(extra)
    content = _official_content(fmt, enc)
    path = _write(tmp_path, name, content)
    with pytest.raises(CheckpointError) as excinfo:
        load_teacher(kind, path, arch=ARCH, img_size=IMG)
    msg = _message(excinfo)
    assert str(path) in msg and "unexpected" in msg
    for k in extra:
        assert k in msg
    assert "missing" not in msg


def test_a_file_of_another_kind_is_named_with_the_kind_it_looks_like(source, tmp_path):
    """Every official layout tried as every other kind: each load that fails says which
    kind the file looks like (a bare state dict: dino or timm); the right kind loads."""
    true_kinds = {"mae": "'mae'", "mocov3": "'mocov3'", "ibot-backbone": "'ibot'",
                  "ibot-full": "'ibot'", "dino": "'dino' or 'timm'"}
    refused = 0
    for fmt, looks in true_kinds.items():
        kind, name, content = _official(fmt, source)
        path = _write(tmp_path, name, content())
        load_teacher(kind, path, arch=ARCH, img_size=IMG)
        for other in ("mae", "mocov3", "ibot", "dino", "timm"):
            if other == kind or (kind, other) == ("dino", "timm"):
                continue
            try:
                load_teacher(other, path, arch=ARCH, img_size=IMG)
            except CheckpointError as err:
                refused += 1
                assert f"the file looks like a {looks} checkpoint, not '{other}'" in str(err), err
    assert refused >= 12  # most pairs cannot load (a bare file fits mae and ibot too)


def test_a_timm_file_with_a_distillation_head_loads(source, images, tmp_path):
    """DeiT-style timm files carry a second classifier, head_dist.*: it is a head, not
    part of the encoder, and is dropped like head.* (not an unexpected key)."""
    d = source.embed_dim
    state = {**source.state_dict(), "head_dist.weight": torch.randn(1000, d),
             "head_dist.bias": torch.randn(1000)}
    path = _write(tmp_path, "deit.pth", state)
    teacher = load_teacher("timm", path, arch=ARCH, img_size=IMG, dtype=torch.float32)
    mean, std = source.pretrained_cfg["mean"], source.pretrained_cfg["std"]
    with torch.no_grad():
        want = source.forward_features(_renormalised(images, mean, std))
    torch.testing.assert_close(teacher(images), want, rtol=1e-5, atol=1e-5)


def test_a_mocov3_file_without_the_module_prefix_is_recognised(source, tmp_path):
    """MoCo v3 files saved without DistributedDataParallel have bare base_encoder.* keys:
    they load as mocov3, and tried as another kind the error says they look like one."""
    obj = _mocov3_file(_encoder_state(source))
    obj["state_dict"] = {k[len("module."):]: v for k, v in obj["state_dict"].items()}
    assert all(not k.startswith("module.") for k in obj["state_dict"])
    path = _write(tmp_path, "moco_bare.pth.tar", obj)
    load_teacher("mocov3", path, arch=ARCH, img_size=IMG)
    with pytest.raises(CheckpointError) as excinfo:
        load_teacher("ibot", path, arch=ARCH, img_size=IMG)
    assert "the file looks like a 'mocov3' checkpoint, not 'ibot'" in _message(excinfo)


def test_vit_small_file_into_vit_base_arch_names_shapes(tmp_path):
    small = _perturbed_vit("vit_small_patch16_224", img_size=IMG, seed=6)
    path = _write(tmp_path, "dino_vits16.pth", _encoder_state(small))
    with pytest.raises(CheckpointError) as excinfo:
        load_teacher("dino", path, arch="vit_base_patch16_224", img_size=IMG)
    msg = _message(excinfo)
    assert str(path) in msg and "vit_base_patch16_224" in msg
    with torch.device("meta"):  # shapes only: no weights initialised
        base = timm.create_model("vit_base_patch16_224", img_size=IMG, num_classes=0).state_dict()
    wrong = [k for k, v in small.state_dict().items() if k in base and base[k].shape != v.shape]
    assert len(wrong) > 100 and f"shape mismatches ({len(wrong)})" in msg
    assert "blocks.0.attn.qkv.weight: file (1152, 384) vs model (2304, 768)" in msg
    assert "missing" not in msg and "unexpected" not in msg


def test_mocov3_wrong_container_key(source, tmp_path):
    obj = _mocov3_file(_encoder_state(source))
    obj["model"] = obj.pop("state_dict")  # an MAE-style container
    path = _write(tmp_path, "moco.pth.tar", obj)
    with pytest.raises(CheckpointError) as excinfo:
        load_teacher("mocov3", path, arch=ARCH, img_size=IMG)
    msg = _message(excinfo)
    assert str(path) in msg and "'state_dict'" in msg and "model" in msg


def test_mocov3_without_base_encoder(source, tmp_path):
    obj = _mocov3_file(_encoder_state(source))
    obj["state_dict"] = {k: v for k, v in obj["state_dict"].items()
                         if not k.startswith("module.base_encoder.")}
    path = _write(tmp_path, "moco.pth.tar", obj)
    with pytest.raises(CheckpointError) as excinfo:
        load_teacher("mocov3", path, arch=ARCH, img_size=IMG)
    assert str(path) in _message(excinfo) and "base_encoder" in _message(excinfo)


@pytest.mark.parametrize("name", ["broken.pth", "broken.safetensors"])
def test_unreadable_file_names_path(name, tmp_path):
    path = tmp_path / name
    path.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError) as excinfo:
        load_teacher("timm", path, arch=ARCH, img_size=IMG)
    assert str(path) in _message(excinfo)


def test_bad_kind_arch_or_no_file():
    with pytest.raises(ConfigError, match="mae"):
        load_teacher("mae3", "x.pth", arch=ARCH)
    with pytest.raises(ConfigError, match="checkpoint"):
        load_teacher("mae", None, arch=ARCH)
    with pytest.raises(ConfigError, match="vit_tinyy"):
        load_teacher("random", None, arch="vit_tinyy_patch16_224")


# ---------------------------------------------------------------- ensembles


def _random(name, arch=ARCH, seed=0, img_size=IMG):
    return load_teacher("random", None, arch=arch, img_size=img_size, dtype=torch.float32,
                        name=name, seed=seed)


def test_random_teachers_are_reproducible(images):
    a, b, c = _random("a", seed=1), _random("b", seed=1), _random("c", seed=2)
    assert torch.equal(a(images), b(images))
    assert not torch.equal(a(images), c(images))


def test_a_random_teacher_leaves_the_global_random_state_alone():
    """Building a random teacher (seeded by its own `seed`) must not reset torch's global
    generator: the student's initialisation and the run's dropout draw from it next."""
    torch.manual_seed(1234)
    expected = torch.rand(4)  # what the next draw is without the teacher
    torch.manual_seed(1234)
    _random("a", seed=0)
    assert torch.equal(torch.rand(4), expected)


def test_a_random_teacher_leaves_the_gpu_random_state_alone(monkeypatch):
    """torch.manual_seed would also reseed every GPU's generator (drop-path draws from it on
    a GPU), which fork_rng(devices=[]) does not restore: with it, the GPU stream depended on
    which random teachers a rank built. Seen without a GPU by recording the reseeding."""
    reseeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", reseeded.append)
    _random("a", seed=3)
    assert reseeded == []


def test_ensemble_width_mismatch_is_config_error():
    tiny, small = _random("mae"), _random("ibot", arch="vit_small_patch16_224")
    with pytest.raises(ConfigError) as excinfo:
        TeacherEnsemble([tiny, small])
    msg = _message(excinfo)
    assert "192" in msg and "384" in msg and "mae" in msg and "ibot" in msg


def test_ensemble_checks():
    with pytest.raises(ConfigError):
        TeacherEnsemble([])
    with pytest.raises(ConfigError, match="unique"):
        TeacherEnsemble([_random("mae"), _random("mae", seed=1)])
    with pytest.raises(ConfigError, match="token"):
        TeacherEnsemble([_random("mae"), _random("ibot", img_size=64)])
    ens = TeacherEnsemble([_random("mae"), _random("ibot", seed=1)])
    assert ens.names == ["mae", "ibot"] and ens.embed_dim == 192 and ens.num_tokens == 5
    with pytest.raises(ConfigError, match="dino"):
        ens.subset(["dino"])


def test_ensemble_runs_every_teacher_without_graph(images):
    teachers = [_random(n, seed=i) for i, n in enumerate(["mae", "mocov3", "ibot"])]
    ens = TeacherEnsemble(teachers)
    ens.train()
    assert all(not m.training for m in ens.modules() if m is not ens and m is not ens.teachers)
    outs = ens(images.clone().requires_grad_(True))
    assert len(outs) == 3
    for t, o in zip(teachers, outs):
        assert o.grad_fn is None and not o.requires_grad
        with torch.no_grad():
            torch.testing.assert_close(o, t.encoder.forward_features(images), rtol=0, atol=0)
    sub = ens.subset(["ibot", "mae"])
    assert sorted(sub.names) == ["ibot", "mae"]


def test_teacher_built_on_a_device_keeps_everything_there():
    """An encoder moved to a device before it is wrapped (as the throughput benchmark does)
    gives a teacher whose input re-normalisation is on that device too; the meta device
    stands in for a GPU, where a CPU buffer would meet GPU images."""
    from dmt.models import create_encoder
    from dmt.models.fast import optimize_teachers
    meta = torch.device("meta")
    encoders = [create_encoder("vit_tiny_patch16_224", 32).to(meta) for _ in range(2)]
    teachers = [FrozenTeacher(e, f"t{i}", torch.float32) for i, e in enumerate(encoders)]
    assert teachers[0].renormalise  # timm's ViT-T statistics differ from ImageNet's
    assert {t.device for t in teachers[0].buffers()} == {meta}
    for stack in ("never", "always"):
        fast = optimize_teachers(TeacherEnsemble(teachers), torch.float32, compile=False,
                                 stack=stack)
        tokens = fast(torch.zeros(2, 3, 32, 32, device=meta))
        assert [t.shape for t in tokens] == [(2, 5, 192)] * 2


def test_a_checkpoint_teacher_leaves_the_global_random_state_alone(tmp_path):
    """The encoder's initialisation is overwritten by the checkpoint; drawing it from the
    global generator would make the student built next start differently with each teacher
    set (a 1-, 2- or 3-teacher ablation would not share its student's initialisation)."""
    path = tmp_path / "t.pth"
    torch.save(_perturbed_vit().state_dict(), path)
    torch.manual_seed(1234)
    expected = torch.rand(4)
    torch.manual_seed(1234)
    load_teacher("timm", path, arch=ARCH, img_size=IMG, dtype=torch.float32)
    assert torch.equal(torch.rand(4), expected)


def test_the_student_starts_the_same_whichever_teachers_the_run_builds(tmp_path):
    """The trainer seeds, builds the teachers, then the student: the student's weights must
    not depend on how many teachers load, nor on a dedicated student rank building them as
    shapes only."""
    from dmt.build import build_student, build_teachers
    from dmt.config import load_config

    path = tmp_path / "t.pth"
    torch.save(_perturbed_vit().state_dict(), path)
    entry = f"{{kind: timm, arch: {ARCH}, checkpoint: {path}}}"
    common = [f"model.img_size={IMG}", f"model.arch={ARCH}", "teacher_runtime.dtype=float32",
              f"teachers=[{entry[:-1]}, name: a}}, {entry[:-1]}, name: b}}]"]

    def student(*overrides, shapes_only=False):
        cfg = load_config(None, [*common, *overrides])
        torch.manual_seed(0)
        teachers = build_teachers(cfg, torch.device("cpu"), warn=lambda _: None,
                                  shapes_only=shapes_only)
        return build_student(cfg, teachers.embed_dim).state_dict()

    both = student()
    for other in (student("method.teachers=[a]"), student(shapes_only=True)):
        assert all(torch.equal(both[k], other[k]) for k in both)
