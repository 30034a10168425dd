"""FP8 teacher matmuls (dmt.models.fp8): exact scaling arithmetic, a rigorous error bound,
and targets accurate enough that the distillation loss stays within batch-to-batch noise.

torch._scaled_mm runs on CPU in recent PyTorch builds (slowly); on GPUs it needs FP8
tensor cores, and there the kernel differs (CUTLASS, fast accumulation): the numeric tests
run on every device here that supports it. Where none does, they skip and say so."""
import copy

import pytest
import torch

from dmt.config import load_config
from dmt.errors import ConfigError
from dmt.losses import DistillationLoss, fuse_teachers
from dmt.models import FrozenTeacher, TeacherEnsemble, create_encoder
from dmt.models.fast import optimize_teachers
from dmt.models.fp8 import Float8Linear, convert_to_fp8, fp8_unsupported, probe_in_child
from engine_utils import REPO, check, metrics, run_pretrain, tiny_config

# Each device is probed on its own: a torch build whose CPU kernel lacks rowwise scales
# must still run the CUDA tests on a GPU machine, not skip the whole module.
CPU_UNSUPPORTED = fp8_unsupported(torch.device("cpu"))
CUDA_UNSUPPORTED = (fp8_unsupported(torch.device("cuda")) if torch.cuda.is_available()
                    else "no CUDA device")
DEVICES = [pytest.param("cpu", marks=pytest.mark.skipif(
               CPU_UNSUPPORTED is not None,
               reason=f"no FP8 matmul on this CPU build: {CPU_UNSUPPORTED}")),
           pytest.param("cuda", marks=pytest.mark.skipif(
               CUDA_UNSUPPORTED is not None, reason=f"no FP8 matmul on CUDA: {CUDA_UNSUPPORTED}"))]
# The tests below that convert or run teachers on the CPU need its kernel.
needs_cpu_fp8 = pytest.mark.skipif(CPU_UNSUPPORTED is not None,
                                   reason=f"no FP8 matmul on this CPU build: {CPU_UNSUPPORTED}")


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


@pytest.mark.parametrize("device", DEVICES)
def test_float8_linear_is_the_scaled_e4m3_matmul(device):
    layer = _linear().to(device)
    x = _inputs().to(device)
    fp8 = Float8Linear(layer)
    with torch.inference_mode():
        y = fp8(x)
    assert y.dtype == torch.bfloat16 and y.shape == (2, 5, 48)
    expected = _by_hand(layer.weight.detach(), layer.bias.detach(), x)
    torch.testing.assert_close(y.double(), expected, rtol=2 ** -7, atol=1e-3)
    # A module-wide dtype cast (as users do to whole models) leaves the e4m3 path intact.
    fp8.to(torch.bfloat16)
    assert fp8.weight_fp8.dtype == torch.float8_e4m3fn and fp8.weight_scale.dtype == torch.float32
    with torch.inference_mode():
        torch.testing.assert_close(fp8(x), y, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_float8_linear_error_is_within_the_e4m3_bound(device):
    # e4m3 keeps 3 mantissa bits: each normal operand is off by at most 2^-4 relative, so a
    # product by at most (1 + 2^-4)^2 - 1; the bf16 output adds 2^-8 relative. (Per-row
    # scales keep every value here far above e4m3's subnormal range.)
    layer = _linear(seed=3).to(device)
    x = _inputs(seed=4).to(device)
    with torch.inference_mode():
        y = Float8Linear(layer)(x).double()
    xd, w, b = x.double(), layer.weight.detach().double(), layer.bias.detach().double()
    exact = xd @ w.t() + b
    bound = ((1 + 2 ** -4) ** 2 - 1) * (xd.abs() @ w.abs().t()) + 2 ** -8 * exact.abs() + 1e-6
    assert ((y - exact).abs() <= bound).all()


def _teachers(n=3, img=32, depth=4):
    encoders = []
    for i in range(n):
        torch.manual_seed(10 + i)
        encoders.append(create_encoder("vit_tiny_patch16_224", img, depth=depth))
    return encoders


def _ensemble(encoders):
    return TeacherEnsemble([FrozenTeacher(copy.deepcopy(e), f"t{i}", torch.float32)
                            for i, e in enumerate(encoders)])


@pytest.mark.parametrize("device", DEVICES)
def test_fp8_targets_move_the_loss_less_than_batch_noise(device):
    encoders = _teachers()
    exact = optimize_teachers(_ensemble(encoders).to(device), torch.float32)
    fp8 = optimize_teachers(_ensemble(encoders).to(device), torch.bfloat16, fp8=True)
    assert fp8.describe()["fp8"] is True
    swapped = [m for m in fp8.modules() if isinstance(m, Float8Linear)]
    assert len(swapped) == 3 * 4 * 4  # 3 teachers x 4 blocks x (qkv, proj, fc1, fc2)

    loss = DistillationLoss()
    g = torch.Generator().manual_seed(0)
    losses_exact, shifts, kls = [], [], []
    for _ in range(4):
        images = torch.randn(8, 3, 32, 32, generator=g).to(device)
        target = fuse_teachers(exact(images)).float()
        approx = fuse_teachers(fp8(images)).float()
        student = target.mean() + target.std() * torch.randn(target.shape, generator=g).to(device)
        l_exact, l_fp8 = loss(student, target)["loss"], loss(student, approx)["loss"]
        losses_exact.append(l_exact)
        shifts.append((l_fp8 - l_exact).abs())
        p, q = target.log_softmax(-1), approx.log_softmax(-1)
        kls.append((p.exp() * (p - q)).sum(-1).mean())
    noise = torch.stack(losses_exact).std()
    assert torch.stack(shifts).max() < 0.5 * noise, (shifts, noise)
    assert max(kls) < 0.01, kls  # nats per token, against TFD losses of ~1-3 nats


@needs_cpu_fp8
def test_fp8_teachers_hold_one_byte_per_block_weight():
    # The bf16 Linear weights must be gone once converted, not kept beside the e4m3 copy.
    encoder = _teachers(n=1, depth=2)[0]
    block_weights = sum(m.weight.numel() for m in encoder.blocks.modules()
                        if isinstance(m, torch.nn.Linear))
    fast = optimize_teachers(_ensemble([encoder]), torch.bfloat16, fp8=True)
    blocks = fast.runners[0].teacher.encoder.blocks
    assert not [m for m in blocks.modules() if type(m) is torch.nn.Linear]
    held = sum(t.numel() * t.element_size() for m in blocks.modules()
               if isinstance(m, Float8Linear) for t in (m.weight_fp8,))
    assert held == block_weights  # 1 byte each


@needs_cpu_fp8
def test_fp8_refuses_encoders_whose_attention_reads_qkv_weight():
    beit = create_encoder("beit_base_patch16_224", 32, depth=1)
    ensemble = TeacherEnsemble([FrozenTeacher(beit, "beit", torch.float32)])
    with pytest.raises(ConfigError, match="Beit is not a plain timm VisionTransformer"):
        optimize_teachers(ensemble, torch.bfloat16, fp8=True)


def test_fp8_refuses_other_dtypes_and_stacking():
    with pytest.raises(ConfigError, match="bfloat16"):
        optimize_teachers(_ensemble(_teachers(n=1, depth=1)), torch.float16, fp8=True)
    with pytest.raises(ConfigError, match="per teacher"):
        optimize_teachers(_ensemble(_teachers(n=2, depth=1)), torch.bfloat16, stack="always",
                          fp8=True)
    with pytest.raises(ConfigError, match="teacher_runtime.fp8"):
        load_config(REPO / "configs" / "demo.yaml", ["teacher_runtime.fp8=true"])  # fp32 demo
    with pytest.raises(ConfigError, match="teacher_runtime.fp8"):
        load_config(REPO / "configs" / "demo.yaml", ["teacher_runtime.fp8=true",
                                                     "teacher_runtime.dtype=bfloat16",
                                                     "teacher_runtime.stack=always"])


def test_convert_skips_misaligned_linears():
    # _scaled_mm on GPUs needs both matrix sizes to be multiples of 16: a ViT with
    # 8 heads of 3 channels (width 24) keeps qkv (24 -> 72) and proj in bf16, while its
    # MLP (24 -> 96 -> 24) is not aligned either; width 32 converts all four.
    narrow = create_encoder("vit_tiny_patch16_224", 32, depth=1, embed_dim=24, num_heads=8)
    assert convert_to_fp8(narrow) == 0
    wide = create_encoder("vit_tiny_patch16_224", 32, depth=1, embed_dim=32, num_heads=2)
    assert convert_to_fp8(wide) == 4 and isinstance(wide.blocks[0].mlp.fc2, Float8Linear)


@needs_cpu_fp8
def test_the_probe_runs_in_a_fresh_interpreter_and_reports_its_failure(monkeypatch):
    # A GPU probe runs in a child process (a kernel fault would poison this one's CUDA
    # context). On the CPU the child must import this dmt and pass like the in-process try;
    # a device the child cannot use, or a child that dies, comes back as a reason.
    import dmt.models.fp8 as fp8
    failed = "torch._scaled_mm with rowwise scales failed on {} (probe process): "
    assert probe_in_child("cpu") is None
    if not torch.cuda.is_available():
        assert probe_in_child("cuda").startswith(failed.format("cuda"))
    # What an illegal memory access that takes the process down looks like from here.
    monkeypatch.setattr(fp8, "_CHILD", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    reason = probe_in_child.__wrapped__("cpu")  # uncached
    assert reason.startswith(failed.format("cpu") + "exit status -11"), reason


@needs_cpu_fp8
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


@needs_cpu_fp8
def test_check_fp8_tool_reports_target_error_on_the_configured_data(tmp_path, capsys):
    import json
    import sys
    sys.path.insert(0, str(REPO / "launch"))
    from check_fp8 import main
    from dmt.losses import target_error
    from dmt.data import write_sample_images

    same = torch.randn(2, 5, 16)
    assert target_error(same, same) == {"target_kl": 0.0, "target_rel_error": 0.0}
    images = write_sample_images(tmp_path / "images", num_images=8, size=48, seed=0,
                                 num_classes=2)
    cfg = tiny_config(tmp_path, images, data={"num_workers": 0})
    out = tmp_path / "fp8.json"
    assert main(["--config", str(cfg), "--batches", "2", "--device", "cpu", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [b["batch"] for b in report["batches"]] == [0, 1]
    for b in report["batches"]:
        assert 0 < b["target_kl"] < 0.05 and 0.005 < b["target_rel_error"] < 0.2
        assert abs(b["loss_fp8"] - b["loss_bf16"]) < 0.05 * b["loss_bf16"]
    missing = tiny_config(tmp_path, images, name="missing",
                          teachers=[{"name": "t", "kind": "mae", "checkpoint": "nope.pth",
                                     "arch": "vit_tiny_patch16_224"}])
    assert main(["--config", str(missing)]) == 2
    assert "nope.pth" in capsys.readouterr().err


def test_the_in_process_probe_leaves_the_global_random_state_alone():
    """fp8 is a teacher runtime setting: turning it on must not change the student's
    initialisation, which the trainer draws from the global generator after the teachers."""
    torch.manual_seed(1234)
    expected = torch.rand(4)
    torch.manual_seed(1234)
    fp8_unsupported(torch.device("cpu"))
    assert torch.equal(torch.rand(4), expected)


def test_check_fp8_refuses_bad_flags_before_building_anything(tmp_path, capsys):
    """Were tracebacks (a device torch does not know, CUDA on a CPU machine, an --out
    folder after the whole check) or a message blaming the data (--batches 0)."""
    import sys
    sys.path.insert(0, str(REPO / "launch"))
    from check_fp8 import main
    config = str(REPO / "configs" / "demo.yaml")
    cases = [(["--device", "gpu"], "--device gpu: expected cpu, cuda or cuda:N"),
             (["--batches", "0"], "--batches must be at least 1, got 0"),
             (["--out", str(tmp_path)], f"--out {tmp_path}: not a file in an existing folder")]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "CUDA is not available on this machine"))
    for flags, message in cases:
        with pytest.raises(SystemExit) as exit_:
            main(["--config", config, *flags])
        assert exit_.value.code == 2 and message in capsys.readouterr().err
