"""dmt.models.fast: same tokens as the plain ensemble, no autograd state, stacking rules."""
import pytest
import torch

from dmt.errors import ConfigError
from dmt.losses import fuse_teachers
from dmt.methods.dmt import DMT
from dmt.models import FrozenTeacher, Student, TeacherEnsemble, create_encoder
from dmt.models.checkpoints import IMAGENET_MEAN, IMAGENET_STD
from dmt.models.fast import FastTeachers, StackedViT, optimize_teachers, stack_blocker

IMG = 32  # 2x2 patches + class token: shapes stay tiny, every code path still runs
DEPTH = 2  # two blocks exercise everything a block does; timm builds them in a blink


def _randomise(encoder: torch.nn.Module, seed: int) -> None:
    """timm initialises LayerNorm to (1, 0) and biases to 0, which would hide a wrong
    folding of the LayerNorm affine into the next linear: give everything random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in encoder.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        for name, module in encoder.named_modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.copy_(1 + 0.2 * torch.randn(module.weight.shape, generator=g))
                module.bias.copy_(0.2 * torch.randn(module.bias.shape, generator=g))


def _teachers(archs, dtype=torch.float32, **kwargs) -> list[FrozenTeacher]:
    """Even teachers keep timm's input statistics for the arch (0.5/0.5: they re-normalise
    ImageNet-normalised batches), odd ones use ImageNet's (no re-normalisation)."""
    out = []
    for i, arch in enumerate(archs):
        torch.manual_seed(i)
        enc = create_encoder(arch, IMG, depth=DEPTH, **kwargs)
        _randomise(enc, seed=100 + i)
        stats = {} if i % 2 == 0 else {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}
        out.append(FrozenTeacher(enc, f"t{i}", dtype, **stats))
    return out


def _clone(teachers: list[FrozenTeacher], dtype=None) -> TeacherEnsemble:
    import copy
    return TeacherEnsemble([FrozenTeacher(copy.deepcopy(t.encoder), t.name, dtype or t.dtype,
                                          mean=t.mean, std=t.std) for t in teachers])


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, IMG, IMG, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kwargs", [{}, {"init_values": 0.5}], ids=["plain", "layerscale"])
def test_stacked_equals_loop_fp32(images, kwargs):
    teachers = _teachers(["vit_tiny_patch16_224"] * 3, **kwargs)
    with torch.inference_mode():
        reference = _clone(teachers)(images)
    loop = optimize_teachers(_clone(teachers), torch.float32, stack="never")
    stacked = optimize_teachers(_clone(teachers), torch.float32, stack="always")
    assert isinstance(stacked.runners[0], StackedViT) and not loop.stacked
    assert [t.renormalise for t in teachers] == [True, False, True]  # both input paths
    for ref, a, b in zip(reference, loop(images), stacked(images)):
        assert a.shape == b.shape == ref.shape == (3, 5, 192)
        torch.testing.assert_close(a, ref, rtol=0, atol=0)  # loop = stock modules, bit for bit
        torch.testing.assert_close(b, ref, rtol=1e-4, atol=1e-4)


def test_stacked_bf16_as_accurate_as_loop_bf16(images):
    teachers = _teachers(["vit_tiny_patch16_224"] * 2)
    with torch.inference_mode():
        exact = _clone(teachers)(images)
    loop = optimize_teachers(_clone(teachers), torch.bfloat16, stack="never")(images)
    stacked = optimize_teachers(_clone(teachers), torch.bfloat16, stack="always")(images)
    for ref, a, b in zip(exact, loop, stacked):
        assert a.dtype == b.dtype == torch.bfloat16
        err_loop = (a.float() - ref).abs().mean()
        err_stacked = (b.float() - ref).abs().mean()
        # Folding the LayerNorm affine moves rounding, it must not add error.
        assert err_stacked <= 1.5 * err_loop + 1e-3, (err_stacked, err_loop)


def test_mixed_architectures_keep_order_and_group(images):
    teachers = _teachers(["vit_tiny_patch16_224"] * 3)
    teachers[1] = _teachers(["vit_tiny_patch16_224"], qk_norm=True)[0]  # same width, other arch
    teachers[1].name = "t1"
    assert stack_blocker(teachers[1].encoder) is not None  # qk-norm: not a plain ViT
    with torch.inference_mode():
        reference = _clone(teachers)(images)
    fast = optimize_teachers(_clone(teachers), torch.float32, stack="always")
    kinds = sorted(type(r).__name__ for r in fast.runners)
    assert kinds == ["LoopTeacher", "StackedViT"]
    assert fast.names == ["t0", "t1", "t2"] and fast.num_tokens == 5 and fast.embed_dim == 192
    assert fast.teachers[1].name == "t1" and fast.teachers[0].mean == teachers[0].mean
    for ref, out in zip(reference, fast(images)):
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_teacher_path_keeps_no_graph_and_no_activations(images):
    """Nothing may be saved for backward, even if the input asks for gradients."""
    saved = []

    def pack(t):
        saved.append(t.shape)
        return t

    teachers = _teachers(["vit_tiny_patch16_224"] * 2)
    student = Student("vit_tiny_patch16_224", teacher_dim=192, img_size=IMG)  # ~1 s to build
    x = images.clone().requires_grad_(True)
    for stack in ("never", "always"):
        fast = optimize_teachers(_clone(teachers), torch.float32, stack=stack)
        method = DMT(student, fast)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            tokens = fast(x)
            targets = method.teacher_targets(x)
        assert saved == [], f"{stack}: autograd saved {len(saved)} tensors"
        for t in [*tokens, targets]:
            assert t.grad_fn is None and not t.requires_grad
        assert targets.dtype == torch.float32 and not targets.is_inference()
        # The student still trains against these targets.
        out = method({"teacher": images, "student": images}, targets=targets)
        out["loss"].backward()
        assert student.adapter.weight.grad is not None
        student.zero_grad()
    assert not any(p.requires_grad for p in fast.parameters())


def test_optimize_keeps_fusion_result(images):
    teachers = _teachers(["vit_tiny_patch16_224"] * 3)
    with torch.inference_mode():
        ref = fuse_teachers(_clone(teachers)(images))
    fast = optimize_teachers(_clone(teachers), torch.float32, stack="always")
    torch.testing.assert_close(fuse_teachers(fast(images)), ref, rtol=1e-4, atol=1e-4)
    assert isinstance(fast, FastTeachers) and fast.training is False
    fast.train()
    assert fast.training is False


def test_fused_attention_forced_and_bad_options():
    teachers = _teachers(["vit_tiny_patch16_224"])
    for blk in teachers[0].encoder.blocks:
        blk.attn.fused_attn = False
    fast = optimize_teachers(_clone(teachers), torch.float32, stack="never")
    assert all(blk.attn.fused_attn for blk in fast.runners[0].teacher.encoder.blocks)
    with pytest.raises(ConfigError):
        optimize_teachers(_clone(teachers), torch.float32, stack="sometimes")
    with pytest.raises(ConfigError):
        optimize_teachers(_clone(teachers), torch.int8)
    with pytest.raises(ConfigError):
        optimize_teachers(_clone(teachers), torch.float32, compile=3)


def test_compile_wraps_the_whole_teacher_pass_once(images, monkeypatch):
    # With CUDA graphs each call of a compiled function frees the previous call's outputs,
    # so one compiled function per teacher would lose the earlier teachers' tokens: the
    # pass must be a single compiled call.
    compiled = []

    def spy(fn, **kwargs):
        compiled.append(kwargs.get("mode"))
        return fn

    monkeypatch.setattr(torch, "compile", spy)
    teachers = _teachers(["vit_tiny_patch16_224"] * 3)
    with torch.inference_mode():
        reference = _clone(teachers)(images)
    fast = optimize_teachers(_clone(teachers), torch.float32, compile="reduce-overhead",
                             stack="never")
    assert compiled == ["reduce-overhead"] and len(fast.runners) == 3
    for ref, tokens in zip(reference, fast(images)):
        torch.testing.assert_close(tokens, ref, rtol=0, atol=0)


def _set_eps(encoder, eps, final: bool):
    """LayerNorm eps of every block (final=False) or of the final norm alone (final=True)."""
    norms = [encoder.norm] if final else [m for blk in encoder.blocks
                                          for m in (blk.norm1, blk.norm2)]
    for norm in norms:
        norm.eps = eps


@pytest.mark.parametrize("differ", ["block_eps", "final_eps", "layer_scale"])
def test_teachers_differing_only_in_norm_eps_or_layer_scale_are_not_stacked_together(images, differ):
    """A stack runs every teacher with the first one's eps and layer-scale setting: a
    teacher that differs there (eps 1.0, not timm's 1e-6; LayerScale or none) runs on its
    own, and every teacher's tokens are still its own encoder's."""
    teachers = _teachers(["vit_tiny_patch16_224"] * 3)
    if differ == "layer_scale":
        odd = _teachers(["vit_tiny_patch16_224"] * 2, init_values=0.5)[1]
        odd.name = "t1"
        teachers[1] = odd
    else:
        _set_eps(teachers[1].encoder, 1.0, final=(differ == "final_eps"))
    assert stack_blocker(teachers[1].encoder) is None  # stackable, just not with the others
    with torch.inference_mode():
        reference = _clone(teachers)(images)
        unchanged = _clone(_teachers(["vit_tiny_patch16_224"] * 3))(images)
    assert (reference[1] - unchanged[1]).abs().max() > 1e-2  # the difference shows
    fast = optimize_teachers(_clone(teachers), torch.float32, stack="always")
    groups = sorted((type(r).__name__, tuple(idx)) for idx, r in zip(fast.slots, fast.runners))
    assert groups == [("LoopTeacher", (1,)), ("StackedViT", (0, 2))]
    for ref, out in zip(reference, fast(images)):
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_a_non_gelu_mlp_is_named_as_what_blocks_stacking():
    """The stacked MLP hard-codes GELU: a SiLU teacher must not be stacked, and the
    reason given says which block and what."""
    import torch.nn as nn
    encoder = create_encoder("vit_tiny_patch16_224", IMG, depth=DEPTH, act_layer=nn.SiLU)
    reason = stack_blocker(encoder)
    assert reason is not None and "block 0" in reason and "GELU" in reason
