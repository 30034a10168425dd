"""The per-batch data path never makes the host wait for the GPU: constants are made once,
per-batch host arrays go through pinned memory with non_blocking copies. The CUDA tests
turn any synchronising call into an error; the CPU tests cover the same code paths."""
import contextlib
from collections import deque

import numpy as np
import pytest
import torch

from dmt.data import augment
from dmt.data.augment import IMAGENET_MEAN, IMAGENET_STD, ViewSpec, make_views, normalize
from dmt.data.synthetic_backend import SyntheticLoader
from dmt.placement.dedicated import PAD, DedicatedStudent, DedicatedTeacher, _Wire
from dmt.transfer import to_device

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA GPU: host-device synchronisation only exists there")

SPEC = ViewSpec(image_size=32, seed=5)


@contextlib.contextmanager
def no_host_sync():
    """Any call that synchronises the host with the GPU raises inside this block."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


class _Done:
    def wait(self):
        pass


def _teacher(wire: _Wire, device) -> DedicatedTeacher:
    """The packing half of a teacher rank, without a process group."""
    teacher = DedicatedTeacher.__new__(DedicatedTeacher)
    teacher.wire, teacher.comm_device = wire, torch.device(device)
    return teacher


def _student(wire: _Wire, device, bufs) -> DedicatedStudent:
    """The receiving half of a student rank, fed `bufs` as if received."""
    student = DedicatedStudent.__new__(DedicatedStudent)
    student.rank, student.teacher, student.wire = 0, 1, wire
    student.device = student.comm_device = torch.device(device)
    student.check_every, student._received = 100, 0
    student._mismatch = torch.zeros((), dtype=torch.int64, device=device)
    student._pending = deque((buf, _Done()) for buf in bufs)
    student._post = lambda: None
    return student


def _roundtrip(device):
    """Teacher packs 3 of 4 slots, student checks indices and unpacks; the index
    tensors stay on the host as the loaders yield them."""
    wire = _Wire(batch=4, tokens=2, dim=3, dtype=torch.float32)
    tokens = torch.arange(18, dtype=torch.float32, device=device).view(3, 2, 3)
    index = torch.tensor([7, 3, 9])
    buf = _teacher(wire, device)._pack(tokens, index)
    student = _student(wire, device, [buf])
    got = student.targets({"student": torch.zeros(3, device=device), "index": index})
    return wire, buf, student, tokens, got


# --- CPU: the caches and the dedicated index transfer ---

def test_constants_are_made_once_per_values_device_and_dtype():
    first = augment._constant(augment._LUMA, torch.device("cpu"), torch.float32)
    assert augment._constant(augment._LUMA, torch.device("cpu"), torch.float32) is first
    assert first.dtype == torch.float32 and first.device.type == "cpu"
    assert first.tolist() == torch.tensor(augment._LUMA, dtype=torch.float32).tolist()
    double = augment._constant(augment._LUMA, torch.device("cpu"), torch.float64)
    assert double is not first and double.dtype == torch.float64


def test_normalize_caches_its_affine_and_accepts_lists():
    x = torch.rand(2, 3, 4, 4)
    mean, std = list(IMAGENET_MEAN), list(IMAGENET_STD)  # lists: not hashable as given
    out = normalize(x, mean, std)
    scale, shift = augment._normalize_affine(IMAGENET_MEAN, IMAGENET_STD, x.device, x.dtype)
    assert augment._normalize_affine(IMAGENET_MEAN, IMAGENET_STD, x.device, x.dtype)[0] is scale
    assert scale.shape == shift.shape == (1, 3, 1, 1) and scale.dtype == torch.float32
    expected = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(out, expected)


def test_to_device_on_cpu_keeps_values_and_dtype():
    array = np.array([[1.5, -2.0]], dtype=np.float32)
    moved = to_device(array, torch.device("cpu"))
    assert moved.dtype == torch.float32 and moved.device.type == "cpu"
    assert moved.tolist() == array.tolist()
    assert to_device(np.array([4, 2]), "cpu").dtype == torch.int64


class FakePinnedMemory:
    """Pinned memory and host-to-CUDA copies, imitated on the CPU (this build cannot pin):
    pin_memory() of a pinned tensor returns that tensor, as on CUDA; `.to("cuda")` records
    what it read and whether non_blocking."""

    def __init__(self, monkeypatch):
        self.pinned, self.copies = set(), []  # pinned storages; (source, non_blocking)
        real_to, real_empty_like = torch.Tensor.to, torch.empty_like

        def is_pinned(t):
            return t.untyped_storage().data_ptr() in self.pinned

        def pin_memory(t):
            return t if is_pinned(t) else self.pin(t.clone())

        def empty_like(t, *, pin_memory=False, **kwargs):
            out = real_empty_like(t, **kwargs)
            return self.pin(out) if pin_memory else out

        def to(t, device, *args, non_blocking=False, **kwargs):
            if torch.device(device).type != "cuda":
                return real_to(t, device, *args, non_blocking=non_blocking, **kwargs)
            self.copies.append((t, non_blocking))
            return t.clone()

        self.is_pinned = is_pinned
        monkeypatch.setattr(torch.Tensor, "is_pinned", is_pinned)
        monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
        monkeypatch.setattr(torch.Tensor, "to", to)
        monkeypatch.setattr(torch, "empty_like", empty_like)

    def pin(self, t):
        self.pinned.add(t.untyped_storage().data_ptr())
        return t


@pytest.mark.parametrize("caller_pinned", [False, True], ids=["pageable", "pinned"])
def test_host_to_cuda_copies_read_a_pinned_buffer_of_their_own(monkeypatch, caller_pinned):
    """The CUDA branch without a GPU: the async copy must read pinned memory (else the host
    waits for the GPU queue) that is not the caller's (which it may reuse at once)."""
    memory = FakePinnedMemory(monkeypatch)
    source = torch.arange(6, dtype=torch.float32).view(2, 3)
    if caller_pinned:
        source = source.pin_memory()
        assert source.is_pinned()
    moved = to_device(source, torch.device("cuda"))
    assert len(memory.copies) == 1
    read, non_blocking = memory.copies[0]
    assert non_blocking and memory.is_pinned(read)
    assert read.untyped_storage().data_ptr() != source.untyped_storage().data_ptr()
    assert torch.equal(read, source) and torch.equal(moved, source)


def test_dedicated_index_transfer_round_trip_on_cpu():
    wire, buf, student, tokens, got = _roundtrip("cpu")
    assert wire.indices(buf).tolist() == [7, 3, 9, PAD]
    torch.testing.assert_close(got, tokens)
    assert int(student._mismatch) == 0
    # A batch whose indices differ from the ones sent is counted as a mismatch.
    student._pending.append((buf, _Done()))
    student.targets({"student": torch.zeros(3), "index": torch.tensor([7, 3, 8])})
    assert int(student._mismatch) == 1


# --- CUDA: no host sync in the per-batch path ---

@needs_cuda
def test_make_views_does_not_sync():
    crops = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    indices = np.arange(16)
    on_gpu = crops.cuda()
    make_views(on_gpu, SPEC, 0, indices)  # warm-up: constants are made once
    with no_host_sync():
        teacher, student = make_views(on_gpu, SPEC, 1, indices)
    ref_teacher, ref_student = make_views(crops, SPEC, 1, indices)
    torch.testing.assert_close(teacher.cpu(), ref_teacher, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(student.cpu(), ref_student, rtol=1e-4, atol=1e-4)


@needs_cuda
def test_synthetic_batches_do_not_sync():
    batches = iter(SyntheticLoader(64, 8, spec=SPEC, device="cuda"))
    next(batches)  # warm-up
    with no_host_sync():
        batch = next(batches)
    assert batch["teacher"].is_cuda and batch["student"].is_cuda


@needs_cuda
def test_dedicated_index_transfer_does_not_sync():
    _roundtrip("cuda")  # warm-up
    with no_host_sync():
        wire, buf, student, tokens, got = _roundtrip("cuda")
    assert wire.indices(buf).tolist() == [7, 3, 9, PAD]
    torch.testing.assert_close(got, tokens)
    assert int(student._mismatch) == 0


def _engine_sync_worker(rank, port, out_dir):
    """Counts the accelerator synchronisations DeepSpeed makes in training steps of an
    engine built from the trainer's own DeepSpeed config (on CPU they do nothing, so they
    are counted, not felt)."""
    import json
    import os

    import deepspeed
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    from dmt.config import load_config
    from dmt.engine.ds_config import REPO_ROOT, deepspeed_config
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    # DeepSpeed puts the engine on the GPU where there is one: count there, as it trains.
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    accelerator, calls = get_accelerator(), []
    synchronize = accelerator.synchronize
    accelerator.synchronize = lambda *a, **k: (calls.append(1), synchronize(*a, **k))[1]
    counts = {}
    for ds_file in ("cpu_fp32", "zero2_bf16"):
        cfg = load_config(REPO_ROOT / "configs" / "demo.yaml",
                          [f"deepspeed.config=ds_configs/{ds_file}.json",
                           "optim.global_batch=8", "optim.micro_batch=4"])
        model = torch.nn.Linear(4, 4)
        optimizer = torch.optim.AdamW(model.parameters(), fused=True)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer,
                                          config=deepspeed_config(cfg, accum=2))
        dtype = next(engine.module.parameters()).dtype
        x = torch.randn(4, 4).to(engine.device, dtype)
        calls.clear()
        for _ in range(4 * 2):  # 4 steps of 2 micro-batches
            loss = engine(x).float().square().mean()
            engine.backward(loss)
            engine.step()
        counts[ds_file] = len(calls)
        engine.destroy()
    with open(f"{out_dir}/syncs.json", "w") as f:
        json.dump(counts, f)
    dist.destroy_process_group()


def test_deepspeed_engine_steps_do_not_synchronise(tmp_path):
    """DeepSpeed's throughput timer (on by default) synchronises the device twice per
    micro-batch, and ZeRO-1/2 with overlap_comm once per backward; the trainer's DeepSpeed
    config turns both off (overlap_comm where one rank has nothing to reduce)."""
    import json

    import torch.multiprocessing as mp

    from engine_utils import free_port
    mp.start_processes(_engine_sync_worker, args=(free_port(), str(tmp_path)), nprocs=1,
                       start_method="spawn", join=True)
    assert json.loads((tmp_path / "syncs.json").read_text()) == {"cpu_fp32": 0, "zero2_bf16": 0}


def test_close_reports_a_mismatch_of_the_last_unchecked_batches():
    """On GPUs the indices are compared every 100 batches: the last few are checked when
    the stream closes, or a mismatch there would never be reported."""
    from dmt.placement.dedicated import END, TargetsMismatchError
    wire = _Wire(batch=2, tokens=1, dim=1, dtype=torch.float32)
    teacher = _teacher(wire, "cpu")
    sent = teacher._pack(torch.zeros(2, 1, 1), torch.tensor([1, 2]))
    end = wire.empty(torch.device("cpu"))
    wire.indices(end).fill_(PAD)
    wire.indices(end)[0] = END
    student = _student(wire, "cpu", [sent, end])  # checks every 100 batches
    student._ended = False
    student.targets({"student": torch.zeros(2), "index": torch.tensor([1, 5])})  # not checked
    with pytest.raises(TargetsMismatchError, match="belong to other images"):
        student.close()
