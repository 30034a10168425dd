"""StepGuard: non-finite optimizer steps are called off on the device, bit-exactly, on
every rank, without the host reading a device value."""
import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dmt.engine.step_guard import StepGuard, nonfinite_verdict
from engine_utils import free_port


def _out(loss=1.0, token=0.5):
    tokens = torch.full((2, 3, 4), 0.5)
    tokens[1, 2, 3] = token
    return {"loss": torch.tensor(loss), "student_tokens": tokens}


def test_verdicts_and_the_worst_of_a_step_wins():
    assert nonfinite_verdict(_out()).item() == 0
    assert nonfinite_verdict(_out(loss=float("nan"))).item() == 1
    assert nonfinite_verdict(_out(loss=float("inf"), token=float("-inf"))).item() == 2
    guard = StepGuard(torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))], fused=True), "cpu")
    for out in (_out(), _out(token=float("nan")), _out(loss=float("nan"))):
        guard.observe(out)
    assert guard.decide().item() == 2 and guard.skip.item() == 1.0
    guard.observe(_out())  # a fresh step starts from 0
    assert guard.decide().item() == 0 and guard.skip.item() == 0.0


def _model_and_guard(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.GELU(), torch.nn.Linear(4, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05, fused=True)
    return model, optimizer, StepGuard(optimizer, "cpu")


def _step(model, optimizer, guard, x, poison=False):
    y = model(x)
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
    finally:
        dist.destroy_process_group()


def test_every_rank_calls_off_the_same_steps(tmp_path):
    mp.start_processes(_rank_worker, args=(2, free_port(), str(tmp_path)), nprocs=2,
                       start_method="spawn", join=True)
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result == {"skips": [0.0, 1.0, 0.0], "step": 2.0}, rank
