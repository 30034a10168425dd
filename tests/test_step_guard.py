"""StepGuard: non-finite optimizer steps are called off on the device, bit-exactly, on
every rank, without the host reading a device value."""
import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dmt.engine.step_guard import (FINITE, NONFINITE_GRADIENTS, NONFINITE_LOSS,
                                   NONFINITE_TOKENS, StepGuard, nonfinite_verdict)
from engine_utils import free_port


def _out(loss=1.0, token=0.5):
    tokens = torch.full((2, 3, 4), 0.5)
    tokens[1, 2, 3] = token
    return {"loss": torch.tensor(loss), "student_tokens": tokens}


def test_verdicts_and_the_worst_of_a_step_wins():
    assert FINITE < NONFINITE_GRADIENTS < NONFINITE_LOSS < NONFINITE_TOKENS
    assert nonfinite_verdict(_out()).item() == FINITE
    assert nonfinite_verdict(_out(loss=float("nan"))).item() == NONFINITE_LOSS
    assert nonfinite_verdict(_out(loss=float("inf"), token=float("-inf"))).item() == NONFINITE_TOKENS
    guard = StepGuard(torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))], fused=True), "cpu")
    for out in (_out(), _out(token=float("nan")), _out(loss=float("nan"))):
        guard.observe(out)
    assert guard.decide().item() == NONFINITE_TOKENS and guard.skip.item() == 1.0
    guard.observe(_out())  # a fresh step starts from 0
    assert guard.decide().item() == 0 and guard.skip.item() == 0.0


def _model_and_guard(seed=0, check_gradients=False):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.GELU(), torch.nn.Linear(4, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05, fused=True)
    checked = list(model.parameters()) if check_gradients else None
    return model, optimizer, StepGuard(optimizer, "cpu", check_gradients=checked)


def _nan_gradient_loss(y):
    """A finite loss whose gradients are NaN: sqrt at 0 has an infinite slope, times 0."""
    return y.square().mean() + 0.0 * torch.sqrt(y - y.detach()).sum()


def _step(model, optimizer, guard, x, poison=False):
    y = model(x)
    if poison == "gradients":
        loss = _nan_gradient_loss(y)
    else:
        loss = (y * float("nan")).sum() if poison else y.square().mean()
    guard.observe({"loss": loss, "student_tokens": y})
    loss.backward()
    guard.decide()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def test_a_called_off_step_is_as_if_it_never_happened():
    """Against an independent run that never saw the bad step: identical to the bit,
    weights and AdamW state (lr 0 instead would have decayed the moments)."""
    xs = [torch.randn(8, 5, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    model, optimizer, guard = _model_and_guard()
    _step(model, optimizer, guard, xs[0])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _step(model, optimizer, guard, xs[1], poison=True)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    for x in xs[2:]:
        _step(model, optimizer, guard, x)

    twin, twin_optimizer, twin_guard = _model_and_guard()
    for x in (xs[0], *xs[2:]):
        _step(twin, twin_optimizer, twin_guard, x)
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(a, b), name
    for p, q in zip(model.parameters(), twin.parameters()):
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(optimizer.state[p][key], twin_optimizer.state[q][key]), key
    assert optimizer.state[next(model.parameters())]["step"].item() == 3


def test_gradients_that_go_non_finite_under_a_finite_loss_are_caught():
    """Where DeepSpeed checks no gradient (no ZeRO, fp32) the guard does: the step is
    called off bit-exactly as above. Unchecked, the same step would poison the weights."""
    xs = [torch.randn(8, 5, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    model, optimizer, guard = _model_and_guard(check_gradients=True)
    _step(model, optimizer, guard, xs[0])
    y = model(xs[1])
    loss = _nan_gradient_loss(y)
    assert torch.isfinite(loss)
    guard.observe({"loss": loss, "student_tokens": y})
    loss.backward()
    assert guard.decide().item() == NONFINITE_GRADIENTS and guard.skip.item() == 1.0
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    _step(model, optimizer, guard, xs[2])
    twin, twin_optimizer, twin_guard = _model_and_guard(check_gradients=True)
    for x in (xs[0], xs[2]):
        _step(twin, twin_optimizer, twin_guard, x)
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(a, b), name

    unchecked, unchecked_optimizer, unchecked_guard = _model_and_guard()
    _step(unchecked, unchecked_optimizer, unchecked_guard, xs[0])
    _step(unchecked, unchecked_optimizer, unchecked_guard, xs[1], poison="gradients")
    assert unchecked_guard.skip.item() == 0.0
    assert not all(torch.isfinite(p).all() for p in unchecked.parameters())


def _engine_worker(rank, port, out_dir):
    """Every DeepSpeed set-up dmt allows catches a NaN gradient under a finite loss: ZeRO
    and DeepSpeed's bf16 optimizer through their own norm check, no-ZeRO fp32 through the
    guard (StepGuard.for_engine asks for the gradients exactly there)."""
    import os

    import deepspeed
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    # DeepSpeed puts the engine on the GPU where there is one: run there, as the trainer does.
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    results = {}
    for stage in (0, 2):
        for bf16 in (False, True):
            torch.manual_seed(0)
            model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.GELU(), torch.nn.Linear(8, 2))
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
            config = {"train_batch_size": 4, "train_micro_batch_size_per_gpu": 4,
                      "zero_optimization": {"stage": stage}, "bf16": {"enabled": bf16},
                      "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 9}
            engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
            guard = StepGuard.for_engine(engine, optimizer, engine.device)
            weights = []
            for step in range(3):
                x = torch.randn(4, 6, generator=torch.Generator().manual_seed(step))
                x = x.to(engine.device, torch.bfloat16 if bf16 else torch.float32)
                y = engine(x)
                loss = _nan_gradient_loss(y) if step == 1 else y.float().square().mean()
                guard.observe({"loss": loss, "student_tokens": y})
                engine.backward(loss)
                guard.decide()
                engine.step()
                weights.append([p.detach().float().flatten().tolist() for p in model.parameters()])
            results[f"{stage}-{bf16}"] = {"guard_checks": guard.check_gradients is not None,
                                          "weights": weights}
    with open(f"{out_dir}/result.json", "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


def test_every_deepspeed_setup_catches_non_finite_gradients(tmp_path):
    mp.start_processes(_engine_worker, args=(free_port(), str(tmp_path)), nprocs=1,
                       start_method="spawn", join=True)
    results = json.loads((tmp_path / "result.json").read_text())
    for setup, r in results.items():
        after_1, after_2, after_3 = r["weights"]
        assert after_2 == after_1, setup  # the poisoned step changed nothing
        assert after_3 != after_2 and all(v == v for p in after_3 for v in p), setup  # trains on
    assert {setup for setup, r in results.items() if r["guard_checks"]} == {"0-False"}


def test_refuses_an_optimizer_that_cannot_skip_on_the_device():
    param = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="fused"):
        StepGuard(torch.optim.AdamW([param], fused=False), "cpu")


def test_the_host_never_reads_a_device_value(monkeypatch):
    """The decision stays on the device: observe and decide never turn a tensor into a
    Python value (on a GPU each such read waits for the queue to drain)."""
    model, optimizer, guard = _model_and_guard()
    y = model(torch.randn(8, 5))
    out = {"loss": y.square().mean(), "student_tokens": y}

    def forbidden(*args, **kwargs):
        raise AssertionError("the host read a device value")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    guard.observe(out)
    guard.decide()
    monkeypatch.undo()
    assert guard.skip.item() == 0.0


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA GPU: host-device synchronisation only exists there")
def test_guarded_step_does_not_sync_on_cuda():
    model = torch.nn.Linear(16, 16).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), fused=True)
    guard = StepGuard(optimizer, torch.device("cuda"))
    x = torch.randn(4, 16, device="cuda")
    for poison in (False, True):  # the first step creates the optimizer state
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            y = model(x)
            loss = y.sum() * (float("nan") if poison else 1.0)
            guard.observe({"loss": loss, "student_tokens": y})
            loss.backward()
            guard.decide()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert guard.skip.item() == 1.0


def _rank_worker(rank, world, port, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        model, optimizer, guard = _model_and_guard()
        verdicts = []
        for step in range(3):  # rank 1 alone goes non-finite at step 1
            x = torch.randn(8, 5, generator=torch.Generator().manual_seed(10 * step + rank))
            _step(model, optimizer, guard, x, poison=(rank == 1 and step == 1))
            verdicts.append(guard.skip.item())
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump({"skips": verdicts,
                       "step": optimizer.state[next(model.parameters())]["step"].item()}, f)
        dist.barrier()  # gloo aborts a rank torn down while its peer still talks to it
    finally:
        dist.destroy_process_group()


def test_every_rank_calls_off_the_same_steps(tmp_path):
    mp.start_processes(_rank_worker, args=(2, free_port(), str(tmp_path)), nprocs=2,
                       start_method="spawn", join=True)
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result == {"skips": [0.0, 1.0, 0.0], "step": 2.0}, rank


def _guard_with_gradients(*grads):
    """A guard checking parameters whose gradients are set by hand (None: no gradient)."""
    params = [torch.nn.Parameter(torch.zeros(3)) for _ in grads]
    for p, g in zip(params, grads):
        p.grad = g
    optimizer = torch.optim.AdamW(params, fused=True)
    return StepGuard(optimizer, "cpu", check_gradients=params)


def test_huge_but_finite_gradients_are_not_called_off():
    """The check must not overflow where the gradients do not: 1e25 is finite in fp32, but
    its square (what an L2 norm sums) is not, and would call off a good step."""
    guard = _guard_with_gradients(torch.full((3,), 1e25), torch.full((3,), -2e25))
    assert guard.decide().item() == FINITE and guard.skip.item() == 0.0


def test_a_checked_parameter_without_a_gradient_is_fine():
    """A parameter unused in this step has no gradient: it is passed over, not an error,
    while the others are still checked."""
    guard = _guard_with_gradients(torch.ones(3), None)
    assert guard.decide().item() == FINITE and guard.skip.item() == 0.0
    guard = _guard_with_gradients(torch.tensor([1.0, float("inf"), 0.0]), None)
    assert guard.decide().item() == NONFINITE_GRADIENTS and guard.skip.item() == 1.0


def test_grad_norm_is_the_l2_norm_of_the_checked_gradients():
    """The logged gradient norm: the L2 norm over all checked gradients together,
    against a float64 sum of squares."""
    grads = [torch.randn(3, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    guard = _guard_with_gradients(*grads, None)
    guard.decide()
    expected = sum(float(v) ** 2 for g in grads for v in g.double()) ** 0.5
    assert guard.grad_norm.item() == pytest.approx(expected, rel=1e-6)
