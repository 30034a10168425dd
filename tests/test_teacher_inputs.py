"""Teachers trained with other input statistics convert ImageNet-normalised batches themselves."""
import timm
import torch

from dmt.models.teachers import IMAGENET_MEAN, IMAGENET_STD, FrozenTeacher, load_teacher


def _imagenet_normalised(raw):
    return (raw - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def test_teacher_with_other_statistics_sees_its_own_normalisation():
    torch.manual_seed(0)
    encoder = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=0)
    teacher = FrozenTeacher(encoder, "half", torch.float32, mean=(0.5,) * 3, std=(0.5,) * 3)
    raw = torch.rand(2, 3, 32, 32)
    expected = encoder.forward_features((raw - 0.5) / 0.5)  # what it was trained to see
    torch.testing.assert_close(teacher(_imagenet_normalised(raw)), expected, rtol=1e-4, atol=1e-4)


def test_official_ssl_teachers_take_imagenet_batches_unchanged(tmp_path):
    encoder = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=0)
    torch.save({"model": encoder.state_dict()}, tmp_path / "mae.pth")
    teacher = load_teacher("mae", tmp_path / "mae.pth", arch="vit_tiny_patch16_224", img_size=32,
                           dtype=torch.float32)
    assert not teacher.renormalise
    x = _imagenet_normalised(torch.rand(2, 3, 32, 32))
    torch.testing.assert_close(teacher(x), encoder.eval().forward_features(x))
