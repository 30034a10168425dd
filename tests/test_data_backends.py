"""Every backend that runs on a CPU (torch, DALI CPU pipeline, FFCV, synthetic) through
dmt.data.build_loader, on real JPEG files: format, view semantics, determinism,
sharding and resume. FFCV runs under a hard timeout (known hang, ENVIRONMENT.md)."""
import pytest
import torch

from dmt.data import IMAGENET_MEAN, IMAGENET_STD, build_loader, write_sample_images

# FFCV compiles its helpers with numba once per loader; numba's finaliser for those
# dispatchers raises a harmless KeyError at garbage collection (upstream noise).
pytestmark = pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <finalize object:pytest.PytestUnraisableExceptionWarning")

NUM_IMAGES, BATCH, SIZE = 48, 8, 32
FFCV = pytest.param("ffcv", marks=pytest.mark.timeout(240, method="thread"))
ALL = ["torch", "dali", FFCV, "synthetic"]
WORKERS = {"torch": 0, "dali": 1, "ffcv": 1, "synthetic": None}
OTHER_WORKERS = {"torch": 2, "dali": 2, "ffcv": 2, "synthetic": None}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_sample_images(tmp_path_factory.mktemp("images"), num_images=NUM_IMAGES,
                               size=64, num_classes=4)


@pytest.fixture(scope="module")
def beton(folder, tmp_path_factory):
    pytest.importorskip("ffcv")
    from dmt.data.beton import write_beton
    out = tmp_path_factory.mktemp("beton") / "images.beton"
    write_beton(folder, out, num_workers=1)
    return out


@pytest.fixture
def make(request, folder):
    def make(backend, **kwargs):
        if backend == "dali":
            pytest.importorskip("nvidia.dali")
        path = {"torch": folder, "dali": folder, "synthetic": NUM_IMAGES}.get(backend)
        if backend == "ffcv":
            path = request.getfixturevalue("beton")
        kwargs.setdefault("num_workers", WORKERS[backend])
        return build_loader(backend, path, BATCH, image_size=SIZE, **kwargs)
    return make


def collect(loader):
    return [{k: v.clone() if torch.is_tensor(v) else v for k, v in b.items()} for b in loader]


def pixels(view):
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return view * std + mean


@pytest.mark.parametrize("backend", ALL)
def test_batches_are_normalised_dual_views(make, backend):
    loader = make(backend, color_jitter=(0, 0, 0))
    batches = collect(loader)
    assert len(batches) == len(loader) == NUM_IMAGES // BATCH
    assert loader.num_samples == NUM_IMAGES
    for b in batches:
        for view in ("teacher", "student"):
            assert b[view].shape == (BATCH, 3, SIZE, SIZE)
            assert b[view].dtype == torch.float32 and b[view].device.type == "cpu"
        assert b["index"].dtype == torch.int64 and b["index"].shape == (BATCH,)
        assert torch.equal(b["teacher"], b["student"])  # no jitter: identical views
    x = pixels(torch.cat([b["teacher"] for b in batches]))
    assert x.min() >= -1e-4 and x.max() <= 1 + 1e-4  # ImageNet mean/std were applied
    assert 0.1 < x.mean() < 0.9 and x.std() > 0.05
    seen = torch.cat([b["index"] for b in batches]).tolist()
    assert sorted(seen) == list(range(NUM_IMAGES))  # one epoch visits every sample once


def _luma_correlation(a, b):
    la = (pixels(a) * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1).flatten(1)
    lb = (pixels(b) * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1).flatten(1)
    la, lb = la - la.mean(1, keepdim=True), lb - lb.mean(1, keepdim=True)
    return (la * lb).sum(1) / (la.norm(dim=1) * lb.norm(dim=1) + 1e-8)


@pytest.mark.parametrize("backend", ALL)
def test_jitter_changes_colour_but_not_geometry(make, backend):
    batches = collect(make(backend))
    teacher = torch.cat([b["teacher"] for b in batches])
    student = torch.cat([b["student"] for b in batches])
    assert (teacher - student).abs().mean() > 0.05  # the student view is jittered
    aligned = _luma_correlation(teacher, student).median()
    shifted = _luma_correlation(teacher, student.roll(SIZE // 4, dims=-1)).median()
    mirrored = _luma_correlation(teacher, student.flip(-1)).median()
    assert aligned > 0.9, aligned  # same crop and flip: per-pixel luminance still agrees
    assert aligned > max(shifted, mirrored) + 0.15, (aligned, shifted, mirrored)


@pytest.mark.parametrize("backend", ALL)
def test_same_seed_gives_the_same_batches(make, backend):
    first, again = collect(make(backend, seed=3)), collect(make(backend, seed=3))
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a["index"], b["index"])
        assert torch.equal(a["teacher"], b["teacher"]) and torch.equal(a["student"], b["student"])
    other = collect(make(backend, seed=4))
    assert not torch.equal(first[0]["index"], other[0]["index"])


@pytest.mark.parametrize("backend", ALL)
def test_two_ranks_cover_an_epoch_exactly_once(make, backend):
    ranks = [make(backend, rank=r, world_size=2) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == NUM_IMAGES // (2 * BATCH)
    seen = [torch.cat([b["index"] for b in collect(r)]).tolist() for r in ranks]
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(NUM_IMAGES))


@pytest.mark.parametrize("backend", ALL)
def test_resume_yields_the_remaining_batches_of_the_epoch(make, backend):
    loader = make(backend)
    epoch0, epoch1 = collect(loader), collect(loader)  # no set_epoch: epochs advance
    assert not torch.equal(torch.cat([b["index"] for b in epoch0]),
                           torch.cat([b["index"] for b in epoch1]))

    # A fresh loader (other worker count) resumed at batch 2 of epoch 1.
    resumed = make(backend, num_workers=OTHER_WORKERS[backend])
    resumed.set_epoch(1, start_batch=2)
    rest = collect(resumed)
    assert len(rest) == len(epoch1) - 2
    for a, b in zip(epoch1[2:], rest, strict=True):
        assert torch.equal(a["index"], b["index"])
        assert torch.equal(a["teacher"], b["teacher"]) and torch.equal(a["student"], b["student"])

    # Leaving an epoch half-way does not disturb the next one.
    partial = iter(loader)
    next(partial)
    del partial
    loader.set_epoch(1, start_batch=4)
    tail = collect(loader)
    assert [b["index"].tolist() for b in tail] == [b["index"].tolist() for b in epoch1[4:]]
    assert torch.equal(tail[0]["student"], epoch1[4]["student"])


def test_a_resume_position_applies_to_one_epoch_only(make):
    """set_epoch(e, start_batch=k) shortens epoch e alone: the iteration after it runs
    epoch e + 1 whole, as a loader that never resumed would (the epoch order and the
    resume bookkeeping are shared by every backend: the synthetic one stands for all)."""
    reference = make("synthetic")
    epochs = [[b["index"].tolist() for b in collect(reference)] for _ in range(3)]
    loader = make("synthetic")
    loader.set_epoch(1, start_batch=2)
    assert [b["index"].tolist() for b in collect(loader)] == epochs[1][2:]
    assert [b["index"].tolist() for b in collect(loader)] == epochs[2]


def test_resume_positions_at_and_beyond_the_ends_of_an_epoch(make):
    """start_batch = len(loader): a checkpoint taken at an epoch's last step resumes into
    an empty rest of that epoch, then the next; a negative position is refused up front."""
    reference = make("synthetic")
    epochs = [[b["index"].tolist() for b in collect(reference)] for _ in range(2)]
    loader = make("synthetic")
    loader.set_epoch(0, start_batch=len(loader))
    assert collect(loader) == []
    assert [b["index"].tolist() for b in collect(loader)] == epochs[1]
    for bad in (-1, len(loader) + 1):
        with pytest.raises(ValueError, match="start_batch"):
            loader.set_epoch(0, start_batch=bad)


@pytest.mark.timeout(240, method="thread")
def test_file_backends_cut_the_same_crop(make):
    """Crops are a function of (seed, epoch, index): the decoders agree up to resampling."""
    reference = collect(make("torch", color_jitter=(0, 0, 0)))[0]
    for backend in ("dali", "ffcv"):
        if backend == "ffcv":
            pytest.importorskip("ffcv")
        batch = collect(make(backend, color_jitter=(0, 0, 0)))[0]
        assert torch.equal(batch["index"], reference["index"])
        same = (batch["teacher"] - reference["teacher"]).abs().mean()
        mirrored = (batch["teacher"].flip(-1) - reference["teacher"]).abs().mean()
        assert same < 0.1 and mirrored > 3 * same, (backend, same, mirrored)


def test_torch_workers_end_with_close_and_at_exit(make, folder, tmp_path):
    """The workers ignore SIGTERM (a scheduler's stop is the trainer's to handle), which
    multiprocessing's exit handler relies on: a loader still alive at exit must not hang
    the process (here a script's loop left half-way, as a traceback would leave it), nor
    may a forked child's exit stop its parent's workers."""
    import multiprocessing
    import subprocess
    import sys

    from dmt.errors import DataError
    from engine_utils import REPO, clean_env
    before = set(multiprocessing.active_children())
    loader = make("torch", num_workers=2)
    epoch = iter(loader)
    first = next(epoch)
    assert len(set(multiprocessing.active_children()) - before) == 2
    loader.close()
    assert set(multiprocessing.active_children()) <= before
    with pytest.raises(DataError, match="closed while it was being iterated"):
        list(epoch)  # not an epoch quietly cut short
    loader.set_epoch(0)
    assert torch.equal(next(iter(loader))["student"], first["student"])  # new workers
    loader.close()

    script = tmp_path / "half_an_epoch.py"
    script.write_text(
        "import os, sys\n"
        "import dmt\n"
        "from dmt.data import build_loader\n"
        f"loader = build_loader('torch', {str(folder)!r}, 4, image_size=32, num_workers=2)\n"
        "for batch in loader:\n"
        "    break\n"
        "child = os.fork()\n"
        "if child == 0:\n"
        "    sys.exit(0)  # runs the exit handlers, as a forked helper process would\n"
        "os.waitpid(child, 0)\n"
        "loader.set_epoch(0)\n"
        "print(sum(1 for _ in loader), 'of', len(loader), flush=True)\n"
        "for batch in loader:\n"
        "    break\n")
    done = subprocess.run([sys.executable, str(script)], cwd=REPO, env=clean_env(),
                          capture_output=True, text=True, timeout=120)  # hung before the fix
    assert done.returncode == 0 and done.stdout == "12 of 12\n", done.stdout + done.stderr
