"""FP8 teacher matmuls (dmt.models.fp8): exact scaling arithmetic, a rigorous error bound,
and targets accurate enough that the distillation loss stays within batch-to-batch noise.

torch._scaled_mm runs on CPU in recent PyTorch builds (slowly); on GPUs it needs FP8
tensor cores. Where this torch cannot run it at all, the tests skip and say so."""
import copy

import pytest
import torch

from dmt.config import load_config
from dmt.errors import ConfigError
from dmt.losses import DistillationLoss, fuse_teachers
from dmt.models import FrozenTeacher, TeacherEnsemble, create_encoder
from dmt.models.fast import optimize_teachers
from dmt.models.fp8 import Float8Linear, convert_to_fp8, fp8_unsupported
from engine_utils import REPO, check, metrics, run_pretrain, tiny_config

UNSUPPORTED = fp8_unsupported(torch.device("cpu"))
pytestmark = pytest.mark.skipif(UNSUPPORTED is not None,
                                reason=f"no FP8 matmul on this CPU build: {UNSUPPORTED}")


def _linear(k=64, n=48, seed=0):
    torch.manual_seed(seed)
    layer = torch.nn.Linear(k, n)
    with torch.no_grad():
        layer.weight.mul_(torch.logspace(-1, 1, n)[:, None])  # rows of very different scales
    return layer


def _inputs(rows=10, k=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, rows // 2, k, generator=g)
    x[0, 0] *= 100.0  # one outlier token: per-row scales keep it from crushing the others
    return x.to(torch.bfloat16)


def _by_hand(weight, bias, x):
    """The scaled matmul written out in float64: per-row e4m3 quantisation of both sides."""
    def quantise(t):
        t = t.double()
        scale = t.abs().amax(dim=1, keepdim=True) / 448.0
        return (t / scale).float().to(torch.float8_e4m3fn).double() * scale
    rows = x.reshape(-1, x.shape[-1])
    return (quantise(rows) @ quantise(weight).t() + bias.double()).view(*x.shape[:-1], -1)


def test_float8_linear_is_the_scaled_e4m3_matmul():
    layer = _linear()
    x = _inputs()
    fp8 = Float8Linear(layer)
    with torch.inference_mode():
        y = fp8(x)
    assert y.dtype == torch.bfloat16 and y.shape == (2, 5, 48)
    expected = _by_hand(layer.weight.detach(), layer.bias.detach(), x)
    torch.testing.assert_close(y.double(), expected, rtol=2 ** -7, atol=1e-3)


def test_float8_linear_error_is_within_the_e4m3_bound():
    # e4m3 keeps 3 mantissa bits: each operand is off by at most 2^-4 relative, so a product
    # by at most (1 + 2^-4)^2 - 1; the bf16 output adds 2^-8 relative.
    layer = _linear(seed=3)
    x = _inputs(seed=4)
    with torch.inference_mode():
        y = Float8Linear(layer)(x).double()
    xd, w, b = x.double(), layer.weight.detach().double(), layer.bias.detach().double()
    exact = xd @ w.t() + b
    bound = ((1 + 2 ** -4) ** 2 - 1) * (xd.abs() @ w.abs().t()) + 2 ** -8 * exact.abs() + 1e-6
    assert ((y - exact).abs() <= bound).all()
    # ...and it is an approximation that actually loses something (the test can fail).
    assert (y - exact).abs().max() > 0


def _teachers(n=3, img=32, depth=4):
    encoders = []
    for i in range(n):
        torch.manual_seed(10 + i)
        encoders.append(create_encoder("vit_tiny_patch16_224", img, depth=depth))
    return encoders


def _ensemble(encoders):
    return TeacherEnsemble([FrozenTeacher(copy.deepcopy(e), f"t{i}", torch.float32)
                            for i, e in enumerate(encoders)])


def test_fp8_targets_move_the_loss_less_than_batch_noise():
    encoders = _teachers()
    exact = optimize_teachers(_ensemble(encoders), torch.float32)
    fp8 = optimize_teachers(_ensemble(encoders), torch.bfloat16, fp8=True)
    assert fp8.describe()["fp8"] is True
    swapped = [m for m in fp8.modules() if isinstance(m, Float8Linear)]
    assert len(swapped) == 3 * 4 * 4  # 3 teachers x 4 blocks x (qkv, proj, fc1, fc2)

    loss = DistillationLoss()
    g = torch.Generator().manual_seed(0)
    losses_exact, shifts, kls = [], [], []
    for _ in range(4):
        images = torch.randn(8, 3, 32, 32, generator=g)
        target = fuse_teachers(exact(images)).float()
        approx = fuse_teachers(fp8(images)).float()
        student = target.mean() + target.std() * torch.randn(target.shape, generator=g)
        l_exact, l_fp8 = loss(student, target)["loss"], loss(student, approx)["loss"]
        losses_exact.append(l_exact)
        shifts.append((l_fp8 - l_exact).abs())
        p, q = target.log_softmax(-1), approx.log_softmax(-1)
        kls.append((p.exp() * (p - q)).sum(-1).mean())
    noise = torch.stack(losses_exact).std()
    assert torch.stack(shifts).max() < 0.5 * noise, (shifts, noise)
    assert max(kls) < 0.01, kls  # nats per token, against TFD losses of ~1-3 nats


def test_fp8_teachers_keep_no_graph_and_no_weights_in_state_dict():
    fast = optimize_teachers(_ensemble(_teachers(n=1, depth=2)), torch.bfloat16, fp8=True)
    images = torch.randn(2, 3, 32, 32, requires_grad=True)
    tokens = fast(images)[0]
    assert not tokens.requires_grad and tokens.grad_fn is None
    assert not any(k.endswith(("weight_fp8", "weight_scale")) for k in fast.state_dict())


def test_fp8_refuses_other_dtypes_and_stacking():
    with pytest.raises(ConfigError, match="bfloat16"):
        optimize_teachers(_ensemble(_teachers(n=1, depth=1)), torch.float16, fp8=True)
    with pytest.raises(ConfigError, match="per teacher"):
        optimize_teachers(_ensemble(_teachers(n=2, depth=1)), torch.bfloat16, stack="always",
                          fp8=True)
    with pytest.raises(ConfigError, match="teacher_runtime.fp8"):
        load_config(REPO / "configs" / "demo.yaml", ["teacher_runtime.fp8=true"])  # fp32 demo


def test_convert_skips_misaligned_linears():
    # _scaled_mm on GPUs needs both matrix sizes to be multiples of 16.
    block = torch.nn.Sequential(torch.nn.Linear(32, 24), torch.nn.Linear(24, 16))
    holder = torch.nn.Module()
    holder.blocks = torch.nn.ModuleList([block])
    assert convert_to_fp8(holder) == 0
    block.append(torch.nn.Linear(16, 32))
    assert convert_to_fp8(holder) == 1 and isinstance(block[2], Float8Linear)


@pytest.mark.slow
def test_trainer_runs_with_fp8_teachers(tmp_path):
    from dmt.data import write_sample_images
    images = write_sample_images(tmp_path / "images", num_images=8, size=48, seed=0,
                                 num_classes=2)
    cfg = tiny_config(tmp_path, images, name="fp8", run={"epochs": 1},
                      teacher_runtime={"dtype": "bfloat16", "fp8": True})
    result = check(run_pretrain(cfg))
    rows = metrics(tmp_path / "runs" / "fp8")
    assert len(rows) == 1 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert "'fp8': True" in result.stdout + result.stderr
