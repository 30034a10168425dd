"""dmt.flops: the analytic ViT count agrees with torch's FLOP counter; peaks are stated."""
import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from dmt.flops import (PEAK_TABLE, device_peak_flops, stated_peak, dmt_step_flops, shape_flops,
                       vit_forward_flops, vit_shape, vit_shape_of)


def _counted(arch: str, img: int, backward: bool = False) -> float:
    """FLOPs per image counted by torch on the meta device (no memory, no time). Explicit
    attention (fused_attn off): CPU's SDPA kernel has no FLOP formula in the counter."""
    with torch.device("meta"):
        model = timm.create_model(arch, num_classes=0, img_size=img)
        images = torch.randn(2, 3, img, img)
    for blk in model.blocks:
        blk.attn.fused_attn = False
    with FlopCounterMode(display=False) as counter:
        out = model.forward_features(images)
        if backward:
            out.sum().backward()
    return counter.get_total_flops() / 2


@pytest.mark.parametrize("arch,img", [("vit_base_patch16_224", 224),
                                      ("vit_small_patch16_224", 224),
                                      ("vit_tiny_patch16_224", 64)])
def test_forward_matches_flop_counter(arch, img):
    analytic = shape_flops(vit_shape(arch, img))
    assert analytic == pytest.approx(_counted(arch, img), rel=0.02)


def test_paper_numbers_and_training_step():
    # The figures: ViT-B forward 17.6 GMACs, ViT-S 4.6 GMACs at 224 px.
    assert shape_flops(vit_shape("vit_base_patch16_224")) / 2e9 == pytest.approx(17.6, rel=0.01)
    assert shape_flops(vit_shape("vit_small_patch16_224")) / 2e9 == pytest.approx(4.6, rel=0.01)
    # Backward ~ 2x forward (the counter skips the input gradient of the patch embedding).
    fwd = _counted("vit_tiny_patch16_224", 64)
    assert _counted("vit_tiny_patch16_224", 64, backward=True) / fwd == pytest.approx(3.0, rel=0.02)
    step = dmt_step_flops(vit_shape("vit_small_patch16_224"),
                          [vit_shape("vit_base_patch16_224")] * 3, adapter_dim=768)
    assert step["teachers"] / step["total"] == pytest.approx(0.79, abs=0.01)  # "about 80%"


def test_formula_terms_and_shape_of_a_model():
    # One block, 2 tokens (1 patch + class), width 4, mlp ratio 2, 1x1 patches of 3 channels.
    per_block = (8 + 4 * 2) * 2 * 16 + 4 * 4 * 4
    assert vit_forward_flops(1, 4, 2.0, 2, 1) == per_block + 2 * 1 * 3 * 4
    assert vit_forward_flops(1, 4, 2.0, 2, 1, adapter_dim=8) == per_block + 24 + 2 * 2 * 4 * 8
    with torch.device("meta"):
        model = timm.create_model("vit_small_patch16_224", num_classes=0, img_size=96)
    assert vit_shape_of(model) == vit_shape("vit_small_patch16_224", 96)
    assert vit_shape("vit_small_patch16_224", 96).tokens == 37


def test_device_peaks_are_stated():
    names = [name for name, _ in PEAK_TABLE]
    table = dict(PEAK_TABLE)
    assert table["H100"]["bf16"] == table["H200"]["bf16"] == 989e12
    assert table["A100"]["bf16"] == 312e12
    assert names.index("H100 PCIe") < names.index("H100")  # specific names match first
    # Names as torch.cuda.get_device_name reports them, against the data sheets' dense bf16.
    for gpu, tflops in [("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756),
                        ("NVIDIA H100 NVL", 835), ("NVIDIA H200", 989), ("NVIDIA H200 NVL", 835),
                        ("NVIDIA GH200 480GB", 989), ("NVIDIA A100-SXM4-80GB", 312)]:
        peak = stated_peak(gpu, "bf16")
        assert peak.flops == tflops * 1e12, (gpu, peak)
    assert stated_peak("NVIDIA A100-SXM4-80GB", "fp8").flops is None  # no FP8 tensor cores
    assert stated_peak("NVIDIA B200", "bf16").flops is None  # not listed: unknown, not a guess
    unknown = device_peak_flops("cpu", torch.float32)
    assert unknown.flops is None and "unknown" in unknown.source
    from dmt import flops
    measured = flops.device_peak_flops("cpu", torch.float32, measure_if_unknown=True)
    assert measured.flops > 1e8 and measured.source.startswith("measured")


def test_register_tokens_and_mixed_teachers_are_counted_as_such():
    # 5 tokens of which 4 prefix (class + 3 registers): one patch goes through the
    # patch embedding; every token through the blocks.
    per_block = (8 + 4 * 2) * 5 * 16 + 4 * 25 * 4
    assert vit_forward_flops(1, 4, 2.0, 5, 1, num_prefix_tokens=4) == per_block + 2 * 1 * 3 * 4
    small, base = vit_shape("vit_small_patch16_224"), vit_shape("vit_base_patch16_224")
    step = dmt_step_flops(small, [base, small])
    assert step["teachers"] == shape_flops(base) + shape_flops(small)
    assert step["student"] == 3 * shape_flops(small)


def test_measured_matmul_rate_is_two_flops_per_multiply_add(monkeypatch):
    """A size^3 multiply-adds matmul is 2 size^3 FLOPs; with a clock that advances 0.5 s
    per reading, each burst is one matmul in 0.5 s."""
    from dmt import flops
    clock = iter(range(10**6))
    monkeypatch.setattr(flops.time, "perf_counter", lambda: 0.5 * next(clock))
    rate, size = flops.measure_matmul_flops("cpu", torch.float32, size=64, repeats=2,
                                            min_seconds=0.1)
    assert (rate, size) == (2 * 64**3 / 0.5, 64)


def test_fp32_on_a_gpu_with_tf32_is_measured_against_the_tf32_peak(monkeypatch):
    from dmt import flops
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    matmul, before = torch.backends.cuda.matmul, torch.backends.cuda.matmul.allow_tf32
    try:  # a property of torch's cuBLAS module: monkeypatch cannot undo it
        h100 = dict(PEAK_TABLE)["H100"]
        for tf32, key in ((True, "tf32"), (False, "fp32")):
            matmul.allow_tf32 = tf32
            assert flops.device_peak_flops("cuda", torch.float32).flops == h100[key]
    finally:
        matmul.allow_tf32 = before
