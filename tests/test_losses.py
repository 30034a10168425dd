"""DMT's losses (paper eqs. 1-3) checked against independent computations.

The references below are written another way on purpose: explicit Python loops over
batch, tokens/positions and channels with math.exp / math.log, in float64.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from dmt.losses import DistillationLoss, fuse_teachers, sfd_loss, target_error, tfd_loss

# ---------------------------------------------------------------- loop references


def _softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    z = sum(e)
    return [v / z for v in e]


def _kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def ref_tfd(s, t, direction="student_teacher"):
    """Eq. 2: per token n (class token included), softmax over the D channels;
    1/T sum_n sum_j p^S log(p^S / p^T); then the mean over the batch."""
    s, t = s.double().tolist(), t.double().tolist()
    per_image = []
    for b in range(len(s)):
        T = len(s[b])
        acc = 0.0
        for n in range(T):
            ps, pt = _softmax(s[b][n]), _softmax(t[b][n])
            acc += _kl(ps, pt) if direction == "student_teacher" else _kl(pt, ps)
        per_image.append(acc / T)
    return sum(per_image) / len(per_image)


def ref_sfd(s, t, num_prefix_tokens=1, direction="student_teacher"):
    """Eq. 3: drop the prefix tokens; per channel c, softmax over the N positions;
    1/D sum_c sum_n q^S log(q^S / q^T); then the mean over the batch."""
    s, t = s.double().tolist(), t.double().tolist()
    per_image = []
    for b in range(len(s)):
        D = len(s[b][0])
        acc = 0.0
        for c in range(D):
            cs = [s[b][n][c] for n in range(num_prefix_tokens, len(s[b]))]
            ct = [t[b][n][c] for n in range(num_prefix_tokens, len(t[b]))]
            qs, qt = _softmax(cs), _softmax(ct)
            acc += _kl(qs, qt) if direction == "student_teacher" else _kl(qt, qs)
        per_image.append(acc / D)
    return sum(per_image) / len(per_image)


def ref_mse(s, t, first_token=0):
    """Mean squared difference of the raw tokens (the "MSE instead of KL" ablation)."""
    s, t = s.double().tolist(), t.double().tolist()
    acc, count = 0.0, 0
    for b in range(len(s)):
        for n in range(first_token, len(s[b])):
            for j in range(len(s[b][n])):
                acc += (s[b][n][j] - t[b][n][j]) ** 2
                count += 1
    return acc / count


def _tokens(*shape, seed, scale=2.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


# Losses are computed in fp32: against a float64 reference that leaves ~1e-6 relative.
REL = dict(rel=1e-5, abs=1e-6)

# ---------------------------------------------------------------- the formulas


@pytest.mark.parametrize("direction", ["student_teacher", "teacher_student"])
@pytest.mark.parametrize("shape", [(2, 5, 4), (3, 10, 7)])
def test_tfd_equals_loop_reference(direction, shape):
    s, t = _tokens(*shape, seed=1), _tokens(*shape, seed=2)
    got = tfd_loss(s, t, direction=direction)
    assert got.ndim == 0
    assert got.item() == pytest.approx(ref_tfd(s, t, direction), **REL)


@pytest.mark.parametrize("direction", ["student_teacher", "teacher_student"])
@pytest.mark.parametrize("num_prefix_tokens", [0, 1, 3])
def test_sfd_equals_loop_reference(direction, num_prefix_tokens):
    s, t = _tokens(2, 3 + 9, 5, seed=3), _tokens(2, 3 + 9, 5, seed=4)
    got = sfd_loss(s, t, num_prefix_tokens=num_prefix_tokens, direction=direction)
    assert got.ndim == 0
    assert got.item() == pytest.approx(ref_sfd(s, t, num_prefix_tokens, direction), **REL)


def test_directions_differ():
    """KL is asymmetric: the paper's direction and the reverse are really two losses."""
    s, t = _tokens(2, 5, 6, seed=5), _tokens(2, 5, 6, seed=6, scale=4.0)
    assert abs(tfd_loss(s, t, "student_teacher") - tfd_loss(s, t, "teacher_student")) > 1e-3
    assert abs(sfd_loss(s, t, 1, "student_teacher") - sfd_loss(s, t, 1, "teacher_student")) > 1e-3


def test_mse_variant_equals_loop_reference():
    s, t = _tokens(2, 5, 4, seed=7), _tokens(2, 5, 4, seed=8)
    assert tfd_loss(s, t, distance="mse").item() == pytest.approx(ref_mse(s, t), **REL)
    assert sfd_loss(s, t, 1, distance="mse").item() == pytest.approx(ref_mse(s, t, 1), **REL)


def test_distillation_loss_total_and_ablations():
    s, t = _tokens(2, 7, 6, seed=9), _tokens(2, 7, 6, seed=10)
    full = DistillationLoss()(s, t)
    assert set(full) == {"tfd", "sfd", "loss"}
    assert full["tfd"].item() == pytest.approx(ref_tfd(s, t), **REL)
    assert full["sfd"].item() == pytest.approx(ref_sfd(s, t), **REL)
    assert full["loss"].item() == pytest.approx(ref_tfd(s, t) + ref_sfd(s, t), **REL)

    tfd_only = DistillationLoss(terms=("tfd",))(s, t)
    assert set(tfd_only) == {"tfd", "loss"}
    assert tfd_only["loss"].item() == pytest.approx(ref_tfd(s, t), **REL)

    sfd_only = DistillationLoss(terms=("sfd",))(s, t)
    assert set(sfd_only) == {"sfd", "loss"}
    assert sfd_only["loss"].item() == pytest.approx(ref_sfd(s, t), **REL)

    mse = DistillationLoss(distance="mse")(s, t)
    assert mse["loss"].item() == pytest.approx(ref_mse(s, t) + ref_mse(s, t, 1), **REL)

    rev = DistillationLoss(direction="teacher_student")(s, t)
    assert rev["loss"].item() == pytest.approx(
        ref_tfd(s, t, "teacher_student") + ref_sfd(s, t, 1, "teacher_student"), **REL)

    regs = DistillationLoss(num_prefix_tokens=3)(s, t)
    assert regs["sfd"].item() == pytest.approx(ref_sfd(s, t, 3), **REL)


@pytest.mark.parametrize("kwargs", [dict(terms=()), dict(terms=("tfd", "kd")),
                                    dict(distance="l1"), dict(direction="both")])
def test_distillation_loss_rejects_bad_options(kwargs):
    with pytest.raises(ValueError):
        DistillationLoss(**kwargs)


def test_distillation_loss_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="shape"):
        DistillationLoss()(torch.zeros(2, 5, 4), torch.zeros(2, 5, 8))


def test_compiled_loss_equals_the_loop_reference_and_its_gradient_equals_eager():
    # model.compile runs the loss as a compiled graph (one graph, captured once): the same
    # terms as the float64 loop, and the same gradient for the student as eager.
    from torch._dynamo.utils import counters
    s, t = _tokens(2, 1 + 9, 6, seed=5).requires_grad_(), _tokens(2, 1 + 9, 6, seed=6)
    graphs = counters["stats"]["unique_graphs"]
    compiled = DistillationLoss(direction="teacher_student").compile()
    got = compiled(s, t)
    assert counters["stats"]["unique_graphs"] > graphs
    assert got["tfd"].item() == pytest.approx(ref_tfd(s, t, "teacher_student"), **REL)
    assert got["sfd"].item() == pytest.approx(ref_sfd(s, t, 1, "teacher_student"), **REL)
    eager = DistillationLoss(direction="teacher_student")(s, t)
    g_compiled, = torch.autograd.grad(got["loss"], s)
    g_eager, = torch.autograd.grad(eager["loss"], s)
    torch.testing.assert_close(g_compiled, g_eager)
    with pytest.raises(ValueError, match="shape"):  # the check stays outside the graph
        compiled(s, t[:, 1:])


# ---------------------------------------------------------------- zero / positive


def _fused_target():
    teachers = [_tokens(2, 1 + 16, 12, seed=20 + m) for m in range(3)]
    return fuse_teachers(teachers)


@pytest.mark.parametrize("distance,direction", [("kl", "student_teacher"),
                                                ("kl", "teacher_student"),
                                                ("mse", "student_teacher")])
def test_zero_when_student_equals_fused_teacher_positive_otherwise(distance, direction):
    target = _fused_target()
    same = DistillationLoss(distance=distance, direction=direction)(target.clone(), target)
    for key in ("tfd", "sfd", "loss"):
        assert abs(same[key].item()) < 1e-6, key

    student = target + _tokens(*target.shape, seed=30, scale=0.5)
    diff = DistillationLoss(distance=distance, direction=direction)(student, target)
    for key in ("tfd", "sfd", "loss"):
        assert diff[key].item() > 1e-3, key


def test_softmax_axes_through_shift_invariance():
    """TFD's softmax runs over channels: a per-token constant leaves it at zero, while SFD
    (softmax over positions) sees it. A per-channel constant is the other way round."""
    target = _fused_target()
    per_token = _tokens(2, 17, 1, seed=31)   # same shift for every channel of a token
    per_channel = _tokens(2, 1, 12, seed=32)  # same shift for every position of a channel
    shifted = target + per_token
    assert tfd_loss(shifted, target).item() < 1e-5
    assert sfd_loss(shifted, target).item() > 1e-3
    shifted = target + per_channel
    assert sfd_loss(shifted, target).item() < 1e-5
    assert tfd_loss(shifted, target).item() > 1e-3


@pytest.mark.parametrize("num_prefix_tokens", [1, 5])
def test_sfd_ignores_prefix_tokens(num_prefix_tokens):
    s, t = _tokens(2, num_prefix_tokens + 9, 6, seed=40), _tokens(2, num_prefix_tokens + 9, 6, seed=41)
    base = sfd_loss(s, t, num_prefix_tokens)
    s2, t2 = s.clone(), t.clone()
    s2[:, :num_prefix_tokens] = _tokens(2, num_prefix_tokens, 6, seed=42, scale=50.0)
    t2[:, :num_prefix_tokens] = _tokens(2, num_prefix_tokens, 6, seed=43, scale=50.0)
    assert torch.equal(sfd_loss(s2, t2, num_prefix_tokens), base)
    # ... while TFD, which includes the class token, does change,
    assert not torch.allclose(tfd_loss(s2, t2), tfd_loss(s, t))
    # ... and every patch token, the last one too, counts in SFD.
    for n in (num_prefix_tokens, s.shape[1] - 1):
        s3 = s.clone()
        s3[:, n] += 3.0
        assert not torch.allclose(sfd_loss(s3, t, num_prefix_tokens), base), n


# ---------------------------------------------------------------- fusion


def test_fuse_teachers_sum_mean_weighted():
    tokens = [_tokens(2, 5, 4, seed=50 + m, dtype=torch.bfloat16) for m in range(3)]
    ref = [t.double() for t in tokens]
    before = [t.clone() for t in tokens]

    fused = fuse_teachers(tokens)  # the paper's fusion: plain sum
    assert fused.dtype == torch.float32 and fused.shape == tokens[0].shape
    torch.testing.assert_close(fused.double(), ref[0] + ref[1] + ref[2], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fuse_teachers(tokens, "mean").double(),
                               (ref[0] + ref[1] + ref[2]) / 3, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fuse_teachers(tokens, "weighted", [0.5, 2.0, -1.0]).double(),
                               0.5 * ref[0] + 2.0 * ref[1] - ref[2], rtol=1e-6, atol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(tokens, before)), "inputs must not be modified"

    with pytest.raises(ValueError):
        fuse_teachers(tokens, "weighted")
    with pytest.raises(ValueError):
        fuse_teachers(tokens, "weighted", [1.0, 2.0])
    with pytest.raises(ValueError):
        fuse_teachers(tokens, "max")


def test_fuse_teachers_accepts_inference_tensors():
    with torch.inference_mode():
        tokens = [_tokens(2, 5, 4, seed=60), _tokens(2, 5, 4, seed=61)]
    fused = fuse_teachers(tokens)
    assert not fused.is_inference() and not fused.requires_grad
    torch.testing.assert_close(fused, tokens[0] + tokens[1])


# ---------------------------------------------------------------- precision


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("loss", ["tfd", "sfd"])
@pytest.mark.parametrize("distance", ["kl", "mse"])
def test_loss_is_computed_in_fp32_for_half_inputs(dtype, loss, distance):
    """Half inputs give an fp32 loss equal to the loss of the same values upcast first
    (the MSE ablation too: squared half differences would round, or overflow in fp16)."""
    fn = tfd_loss if loss == "tfd" else sfd_loss
    s, t = _tokens(2, 17, 64, seed=70, dtype=dtype), _tokens(2, 17, 64, seed=71, dtype=dtype)
    got = fn(s, t, distance=distance)
    assert got.dtype == torch.float32
    want = fn(s.float(), t.float(), distance=distance)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    # and that is the true value of the formula for those (rounded) inputs
    if distance == "mse":
        ref = ref_mse(s, t, 0 if loss == "tfd" else 1)
    else:
        ref = ref_tfd(s, t) if loss == "tfd" else ref_sfd(s, t)
    assert got.item() == pytest.approx(ref, **REL)


# Unit roundoff (half the spacing of representable numbers relative to the value).
UNIT_ROUNDOFF = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_targets_give_fp32_loss_within_tolerance(dtype):
    """Teacher targets rounded to bf16/fp16 change the loss by no more than a bound.

    Tolerance, and why: rounding moves each target logit by |dt_j| <= u * max|t|
    (u = unit roundoff: 2^-8 bf16, 2^-11 fp16). For one distribution,
    dKL(p_s || p_t)/dt_j = p_t,j - p_s,j, so to first order
    |dKL| <= sum_j |p_t,j - p_s,j| * u * max|t| <= 2 * u * max|t|; the mean over tokens,
    channels and batch keeps that bound. So |L(half targets) - L(fp32 targets)| <=
    2 * u * max|t| per term (~0.08 for bf16, ~0.01 for fp16 at max|t| ~ 10 here), with the
    second-order remainder well below it. The check also asserts that the difference is
    a small fraction of the loss itself.
    """
    u = UNIT_ROUNDOFF[dtype]
    student = _tokens(4, 1 + 49, 192, seed=80)
    target = _fused_target_like(student.shape)
    target_half = target.to(dtype)
    bound = 2 * u * target.abs().max().item()
    for fn in (tfd_loss, lambda a, b: sfd_loss(a, b, 1)):
        exact, rounded = fn(student, target).item(), fn(student, target_half).item()
        assert abs(rounded - exact) <= bound
        assert abs(rounded - exact) <= 0.02 * exact


def _fused_target_like(shape):
    return fuse_teachers([_tokens(*shape, seed=90 + m, scale=1.5) for m in range(3)])


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradient_reaches_student_not_teacher(dtype):
    student = _tokens(2, 5, 6, seed=100, dtype=dtype).requires_grad_(True)
    teacher = _tokens(2, 5, 6, seed=101, dtype=dtype)
    out = DistillationLoss()(student, teacher)
    out["loss"].backward()
    assert student.grad is not None and student.grad.dtype == dtype
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0
    assert teacher.grad is None and not teacher.requires_grad


def test_tfd_gradient_matches_closed_form():
    """d/ds_k of KL(p_s||p_t) for one token is p_s,k * (l_k - KL), l = log p_s - log p_t;
    the loss divides it by B * T."""
    B, T, D = 2, 5, 6
    s = _tokens(B, T, D, seed=110).double()
    t = _tokens(B, T, D, seed=111).double()
    student = s.float().requires_grad_(True)
    tfd_loss(student, t.float()).backward()
    want = torch.empty(B, T, D, dtype=torch.float64)
    for b in range(B):
        for n in range(T):
            ps, pt = _softmax(s[b, n].tolist()), _softmax(t[b, n].tolist())
            kl = _kl(ps, pt)
            for k in range(D):
                want[b, n, k] = ps[k] * (math.log(ps[k] / pt[k]) - kl) / (B * T)
    torch.testing.assert_close(student.grad.double(), want, rtol=1e-4, atol=1e-7)


def test_kl_matches_torch_kl_div():
    """A second, vectorised formulation through F.kl_div (log_target form)."""
    s, t = _tokens(3, 1 + 36, 48, seed=120), _tokens(3, 1 + 36, 48, seed=121)
    ls, lt = F.log_softmax(s.double(), -1), F.log_softmax(t.double(), -1)
    tfd = F.kl_div(lt, ls, log_target=True, reduction="none").sum(-1).mean()
    ls, lt = F.log_softmax(s[:, 1:].double(), 1), F.log_softmax(t[:, 1:].double(), 1)
    sfd = F.kl_div(lt, ls, log_target=True, reduction="none").sum(1).mean()
    assert tfd_loss(s, t).item() == pytest.approx(tfd.item(), **REL)
    assert sfd_loss(s, t).item() == pytest.approx(sfd.item(), **REL)


def test_target_error_against_a_float64_loop():
    """KL(reference || approx) per token over channels, averaged over tokens; and the
    relative Frobenius error, both computed element by element in float64."""
    torch.manual_seed(3)
    reference = torch.randn(2, 3, 5)
    approx = (reference + 0.3 * torch.randn(2, 3, 5)).to(torch.bfloat16)  # any dtype
    kls, diff2, ref2 = [], 0.0, 0.0
    for b in range(2):
        for t in range(3):
            r = [float(v) for v in reference[b, t]]
            a = [float(v) for v in approx[b, t]]
            zr, za = sum(math.exp(v) for v in r), sum(math.exp(v) for v in a)
            kls.append(sum(math.exp(x) / zr * ((x - math.log(zr)) - (y - math.log(za)))
                           for x, y in zip(r, a)))
            diff2 += sum((y - x) ** 2 for x, y in zip(r, a))
            ref2 += sum(x * x for x in r)
    got = target_error(reference, approx)
    assert got["target_kl"] == pytest.approx(sum(kls) / len(kls), rel=1e-4)
    assert got["target_rel_error"] == pytest.approx(math.sqrt(diff2 / ref2), rel=1e-4)
    assert target_error(reference, reference) == {"target_kl": 0.0, "target_rel_error": 0.0}
