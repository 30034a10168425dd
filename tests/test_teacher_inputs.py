"""Teachers trained with other input statistics convert ImageNet-normalised batches themselves."""
import pytest
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


@pytest.mark.parametrize("mean, std", [(IMAGENET_MEAN, (0.5, 0.25, 0.2)),
                                       ((0.5, 0.5, 0.5), IMAGENET_STD)],
                         ids=["other_std", "other_mean"])
def test_one_statistic_differing_from_imagenet_is_enough_to_renormalise(mean, std):
    """ImageNet's mean with another std (or the reverse) is still another normalisation:
    the teacher must see (raw - mean) / std with its own pair, not the batch unchanged."""
    torch.manual_seed(0)
    encoder = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=0).eval()
    teacher = FrozenTeacher(encoder, "own", torch.float32, mean=mean, std=std)
    raw = torch.rand(2, 3, 32, 32)
    own = (raw - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = encoder.forward_features(own)
        unchanged = encoder.forward_features(_imagenet_normalised(raw))
    assert not torch.allclose(expected, unchanged, atol=1e-3)  # the statistics matter here
    torch.testing.assert_close(teacher(_imagenet_normalised(raw)), expected, rtol=1e-4, atol=1e-4)
