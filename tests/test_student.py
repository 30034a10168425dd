"""The student: a timm ViT with its final LayerNorm, an adapter to the teacher width, and
an export of the backbone alone that timm loads strictly."""
import subprocess
import sys

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from dmt.errors import ConfigError
from dmt.models import Student, backbone_state_dict, build_adapter, load_teacher

IMG = 32


def _images(n=2, size=IMG, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _randomise_(module, seed=0):
    """Every parameter random (LayerNorm weights too), so that dropping a layer shows."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return module


def _manual_tokens(vit, images):
    """The ViT forward written out by hand from its weights, final LayerNorm included."""
    x = vit.patch_embed(images)  # [B, N, D'] (conv stem is not what is tested here)
    x = torch.cat([vit.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + vit.pos_embed
    for blk in vit.blocks:
        x = x + blk.attn(blk.norm1(x))
        x = x + blk.mlp(blk.norm2(x))
    return F.layer_norm(x, x.shape[-1:], vit.norm.weight, vit.norm.bias, eps=vit.norm.eps)


@pytest.mark.parametrize("arch,width", [("vit_tiny_patch16_224", 192),
                                        ("vit_small_patch16_224", 384),
                                        ("vit_base_patch16_224", 768)])
def test_student_shapes_for_tiny_small_base(arch, width):
    student = Student(arch, teacher_dim=768, img_size=IMG)
    assert student.backbone.embed_dim == width
    assert isinstance(student.backbone.norm, nn.LayerNorm)  # final LayerNorm kept
    assert isinstance(student.adapter, nn.Linear)
    assert (student.adapter.in_features, student.adapter.out_features) == (width, 768)
    assert student.num_tokens == 1 + (IMG // 16) ** 2
    with torch.no_grad():
        out = student(_images())
    assert out.shape == (2, student.num_tokens, 768)


def test_linear_adapter_on_final_layernorm_tokens():
    student = _randomise_(Student("vit_tiny_patch16_224", teacher_dim=384, img_size=IMG)).eval()
    x = _images()
    with torch.no_grad():
        tokens = _manual_tokens(student.backbone, x)
        want = tokens @ student.adapter.weight.T + student.adapter.bias
        got = student(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # Without the final LayerNorm the result would be different (the check has teeth).
    with torch.no_grad():
        pre_norm = student.backbone.norm
        student.backbone.norm = nn.Identity()
        assert not torch.allclose(student(x), got, atol=1e-3)
        student.backbone.norm = pre_norm


def test_identity_adapter_needs_equal_widths():
    student = Student("vit_tiny_patch16_224", teacher_dim=192, adapter="identity", img_size=IMG)
    assert isinstance(student.adapter, nn.Identity)
    assert not any(k.startswith("adapter.") for k in student.state_dict())
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(student(x), student.backbone.forward_features(x), rtol=0, atol=0)
    with pytest.raises(ConfigError, match="identity"):
        Student("vit_tiny_patch16_224", teacher_dim=768, adapter="identity", img_size=IMG)


def test_mlp_adapter():
    student = _randomise_(Student("vit_tiny_patch16_224", teacher_dim=384, adapter="mlp",
                                  img_size=IMG)).eval()
    x = _images()
    a = student.adapter
    with torch.no_grad():
        tokens = student.backbone.forward_features(x)
        hidden = F.gelu(tokens @ a[0].weight.T + a[0].bias)
        want = hidden @ a[2].weight.T + a[2].bias
        torch.testing.assert_close(student(x), want, rtol=1e-5, atol=1e-5)
    assert want.shape == (2, 5, 384)


def test_bad_adapter_or_arch_is_config_error():
    with pytest.raises(ConfigError, match="conv"):
        build_adapter("conv", 192, 768)
    with pytest.raises(ConfigError, match="vit_huge_patch99"):
        Student("vit_huge_patch99", teacher_dim=768, img_size=IMG)


def test_gradients_reach_backbone_and_adapter():
    student = Student("vit_tiny_patch16_224", teacher_dim=384, img_size=IMG, drop_path_rate=0.1)
    student.train()
    out = student(_images())
    (out.float() ** 2).mean().backward()
    for name, p in student.named_parameters():
        assert p.requires_grad, name
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert student.adapter.weight.grad.abs().sum() > 0
    assert student.backbone.patch_embed.proj.weight.grad.abs().sum() > 0
    assert student.backbone.norm.weight.grad.abs().sum() > 0


def test_backbone_export_loads_into_timm_strictly(tmp_path):
    """After a training step, the exported backbone is timm's own state dict: it loads
    into timm.create_model(arch, num_classes=0) with strict=True and gives identical
    forward_features; it also loads back as a dmt teacher of kind "timm"."""
    arch = "vit_tiny_patch16_224"
    student = Student(arch, teacher_dim=384)  # default img_size 224, as timm's default
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    x = _images(1, 224)
    (student(x) ** 2).mean().backward()
    opt.step()

    exported = backbone_state_dict(student.state_dict())
    assert not any("adapter" in k for k in exported)
    model = timm.create_model(arch, pretrained=False, num_classes=0).eval()
    assert set(exported) == set(model.state_dict())
    model.load_state_dict(exported, strict=True)
    student.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), student.backbone.forward_features(x),
                                   rtol=0, atol=0)

    # ... and as a dmt teacher of kind "timm". Such a teacher takes ImageNet-normalised
    # batches and converts them to its arch's statistics (timm's config: 0.5 / 0.5).
    path = tmp_path / "student_backbone.pth"
    torch.save(exported, path)
    teacher = load_teacher("timm", path, arch=arch, dtype=torch.float32)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (teacher.mean, teacher.std))
    imnet_mean = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
    imnet_std = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
    x_imagenet = (x * std + mean - imnet_mean) / imnet_std  # same pixels, ImageNet statistics
    with torch.no_grad():
        torch.testing.assert_close(teacher(x_imagenet), student.backbone.forward_features(x),
                                   rtol=1e-5, atol=1e-5)


def test_backbone_export_rejects_other_state_dicts():
    with pytest.raises(ConfigError, match="backbone"):
        backbone_state_dict({"blocks.0.norm1.weight": torch.ones(3)})


def test_a_script_may_import_timm_before_dmt():
    """On a CPU torch, the registry's torchvision (a CUDA build) fails to import unless a
    module is stubbed first; setup_env.sh installs a .pth that does it at start-up, so a
    user's own script (say, loading an export) need not import dmt first."""
    script = ("import timm, torch\n"
              "model = timm.create_model('vit_tiny_patch16_224', num_classes=0, img_size=32)\n"
              "print(tuple(model(torch.zeros(1, 3, 32, 32)).shape))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "(1, 192)"
