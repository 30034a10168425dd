"""Backend-independent pieces of dmt.data: random numbers, epoch plans, folder scan, views."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dmt.data.augment import (IMAGENET_MEAN, IMAGENET_STD, JITTER_ORDERS, ViewSpec, color_jitter,
                              crop_boxes, flips, jitter_factors, jitter_orders, make_views,
                              normalize)
from dmt.data.folder import scan_image_folder
from dmt.data.rng import hash64, uniform
from dmt.data.sampling import ShardedEpochs
from dmt.errors import DataError

# Garbage collection here can finalise numba dispatchers left by FFCV loaders of other
# test modules; numba's finaliser then raises a harmless KeyError (upstream noise).
pytestmark = pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <finalize object:pytest.PytestUnraisableExceptionWarning")


# --- rng ---------------------------------------------------------------------------

def test_uniform_is_a_pure_function_of_its_coordinates():
    a = uniform(3, 1, np.arange(1000), 7)
    assert np.array_equal(a, uniform(3, 1, np.arange(1000), 7))
    assert np.array_equal(a[500:], uniform(3, 1, np.arange(500, 1000), 7))  # no hidden state
    assert not np.array_equal(a, uniform(3, 2, np.arange(1000), 7))
    assert ((a >= 0) & (a < 1)).all()
    assert abs(a.mean() - 0.5) < 0.03 and abs(a.var() - 1 / 12) < 0.01


def test_hash_separates_key_order_and_negative_keys():
    assert hash64(1, 2) != hash64(2, 1)
    assert hash64(-1, 0) != hash64(1, 0)


# --- sampling ----------------------------------------------------------------------

def test_epoch_order_is_a_seeded_permutation():
    plan = ShardedEpochs(100, 10, seed=5)
    order = plan.epoch_order(0)
    assert sorted(order.tolist()) == list(range(100))
    assert np.array_equal(order, ShardedEpochs(100, 10, seed=5).epoch_order(0))
    assert not np.array_equal(order, plan.epoch_order(1))
    assert not np.array_equal(order, ShardedEpochs(100, 10, seed=6).epoch_order(0))


@pytest.mark.parametrize("num_samples", [96, 103])
def test_ranks_split_an_epoch_without_overlap(num_samples):
    ranks = [ShardedEpochs(num_samples, 8, seed=1, rank=r, world_size=3, drop_last=True)
             for r in range(3)]
    per_rank = [p.rank_batches(4) for p in ranks]
    assert all(b.shape == (num_samples // 24, 8) for b in per_rank)  # same step count
    seen = np.concatenate([b.ravel() for b in per_rank])
    assert len(set(seen.tolist())) == len(seen) == 24 * (num_samples // 24)
    if num_samples % 24 == 0:
        assert sorted(seen.tolist()) == list(range(num_samples))


def test_padding_wraps_around_when_not_dropping_last():
    ranks = [ShardedEpochs(21, 4, seed=0, rank=r, world_size=2, drop_last=False) for r in range(2)]
    batches = [p.rank_batches(0) for p in ranks]
    assert all(b.shape == (3, 4) for b in batches)  # ceil(21 / 8) full batches per rank
    seen = np.concatenate([b.ravel() for b in batches]).tolist()
    assert set(seen) == set(range(21)) and len(seen) == 24
    order = ranks[0].epoch_order(0)
    # The 3 extra slots repeat the first samples of the epoch's permutation.
    assert sorted(seen) == sorted(list(range(21)) + order[:3].tolist())


def test_resume_position_slices_the_same_epoch():
    plan = ShardedEpochs(50, 5, seed=2, rank=1, world_size=2)
    full = plan.rank_batches(3)
    assert np.array_equal(plan.rank_batches(3, start_batch=2), full[2:])
    assert plan.rank_batches(3, start_batch=len(full)).shape == (0, 5)
    with pytest.raises(DataError):
        plan.rank_batches(3, start_batch=len(full) + 1)


def test_dataset_smaller_than_a_global_batch_is_an_error():
    with pytest.raises(DataError, match="global batch"):
        ShardedEpochs(10, 8, world_size=2, drop_last=True)
    assert ShardedEpochs(10, 8, world_size=2, drop_last=False).num_batches == 1


# --- folder ------------------------------------------------------------------------

def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")


def test_scan_class_subfolders(tmp_path):
    for name in ["b/2.jpg", "b/1.PNG", "a/x/deep.jpeg", "a/notes.txt", "c/.hidden.jpg", "empty/"]:
        (tmp_path / name).mkdir(parents=True) if name.endswith("/") else _touch(tmp_path / name)
    folder = scan_image_folder(tmp_path)
    rel = [f.relative_to(tmp_path).as_posix() for f in folder.files]
    assert rel == ["a/x/deep.jpeg", "b/1.PNG", "b/2.jpg"]
    assert folder.classes == ["a", "b"] and folder.labels == [0, 1, 1]


def test_scan_flat_folder(tmp_path):
    for name in ["z.jpg", "a.webp", "readme.md"]:
        _touch(tmp_path / name)
    folder = scan_image_folder(tmp_path)
    assert [f.name for f in folder.files] == ["a.webp", "z.jpg"] and folder.labels == [0, 0]


def test_missing_or_empty_folder_is_one_clear_error(tmp_path):
    with pytest.raises(DataError, match="does not exist") as err:
        scan_image_folder(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(err.value)
    (tmp_path / "cls").mkdir()
    _touch(tmp_path / "cls" / "notes.txt")
    with pytest.raises(DataError, match="no image files") as err:
        scan_image_folder(tmp_path)
    assert str(tmp_path) in str(err.value)


def test_scan_order_does_not_follow_the_filesystem(tmp_path):
    """The file order (and so every sample index) is the same on every machine: files
    created in a scrambled order (not sorted, not reversed: directory listings often
    return one or the other) come out class by class, folder by folder, by name."""
    expected = ["a/1.jpg", "a/4.jpg", "a/7.jpg", "a/m/2.jpg", "a/m/5.jpg", "a/m/8.jpg",
                "a/q/0.jpg", "a/q/3.jpg", "a/q/6.jpg", "b/2.jpg", "b/5.jpg", "b/9.jpg",
                "c/k/1.jpg", "c/k/3.jpg", "c/x/0.jpg", "c/x/2.jpg"]
    order = [7, 2, 12, 0, 15, 9, 4, 13, 1, 10, 6, 14, 3, 11, 8, 5]
    assert sorted(order) == list(range(len(expected)))
    for i in order:
        _touch(tmp_path / expected[i])
    flat_names = [f"{i:02d}.png" for i in range(12)]
    for i in [5, 11, 0, 7, 2, 9, 4, 10, 1, 6, 3, 8]:
        _touch(tmp_path / "flat" / flat_names[i])
    folder = scan_image_folder(tmp_path)
    assert [f.relative_to(tmp_path).as_posix() for f in folder.files if "flat" not in f.parts] == expected
    assert folder.classes == ["a", "b", "c", "flat"]
    assert folder.labels == [0] * 9 + [1] * 3 + [2] * 4 + [3] * 12
    flat = scan_image_folder(tmp_path / "flat")
    assert [f.name for f in flat.files] == flat_names


def test_hidden_folders_are_neither_read_nor_classes(tmp_path):
    """Tool folders (.ipynb_checkpoints copies, a .trash) hold duplicates or deleted
    images: they are skipped inside a class and are no class of their own."""
    for name in ["cls/a.jpg", "cls/.ipynb_checkpoints/a.jpg", "cls/sub/.cache/b.jpg",
                 ".trash/x.jpg", "other/b.jpg"]:
        _touch(tmp_path / name)
    folder = scan_image_folder(tmp_path)
    assert [f.relative_to(tmp_path).as_posix() for f in folder.files] == ["cls/a.jpg", "other/b.jpg"]
    assert folder.classes == ["cls", "other"]


def test_a_home_relative_path_is_expanded(tmp_path, monkeypatch):
    """data.path: ~/images, as users write it in configs."""
    monkeypatch.setenv("HOME", str(tmp_path))
    _touch(tmp_path / "images" / "cls" / "a.jpg")
    folder = scan_image_folder("~/images")
    assert folder.root == tmp_path / "images"
    assert folder.files == [tmp_path / "images" / "cls" / "a.jpg"]


# --- augment -----------------------------------------------------------------------

def test_crop_boxes_follow_random_resized_crop():
    spec = ViewSpec(crop_scale=(0.2, 1.0))
    n = 2000
    H, W = np.full(n, 375), np.full(n, 500)
    boxes = crop_boxes(spec, 0, np.arange(n), H, W)
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= H).all() and (left + w <= W).all()
    area = h * w / (H * W)
    aspect = w / h
    # Rounding to whole pixels moves area and aspect a little beyond the drawn range.
    assert area.min() >= 0.2 - 0.01 and area.max() <= 1.0
    assert aspect.min() >= 0.75 - 0.02 and aspect.max() <= 4 / 3 + 0.02
    # Same distribution as torchvision's own sampler (rejections skew it to small areas).
    from torchvision.transforms import RandomResizedCrop
    torch.manual_seed(0)
    reference = np.array([RandomResizedCrop.get_params(torch.empty(3, 375, 500), [0.2, 1.0], [3 / 4, 4 / 3])
                          for _ in range(n)])
    ref_area = reference[:, 2] * reference[:, 3] / (375 * 500)
    for q in (0.1, 0.5, 0.9):
        assert abs(np.quantile(area, q) - np.quantile(ref_area, q)) < 0.04
        assert abs(np.quantile(aspect, q) - np.quantile(reference[:, 3] / reference[:, 2], q)) < 0.04
    # A sample's box does not depend on the rest of the batch or on the call.
    assert np.array_equal(crop_boxes(spec, 0, [17], [375], [500])[0], boxes[17])
    assert not np.array_equal(crop_boxes(spec, 1, np.arange(n), H, W), boxes)


def test_crop_falls_back_to_a_centred_crop_for_extreme_aspect():
    spec = ViewSpec(crop_scale=(0.9, 1.0))
    top, left, h, w = crop_boxes(spec, 0, [0], [10], [1000])[0]
    assert (h, w) == (10, round(10 * 4 / 3)) and top == 0 and left == (1000 - w) // 2


def test_jitter_factors_ranges():
    f = jitter_factors(ViewSpec(color_jitter=(0.4, 0.0, 1.5)), 0, np.arange(4000))
    assert f[:, 0].min() >= 0.6 and f[:, 0].max() <= 1.4 and f[:, 0].std() > 0.2
    assert (f[:, 1] == 1).all()
    assert f[:, 2].min() >= 0.0 and f[:, 2].max() <= 2.5
    assert 0.45 < flips(ViewSpec(), 0, np.arange(4000)).mean() < 0.55


def test_color_jitter_matches_torchvision_in_each_images_order():
    import torchvision.transforms.v2.functional as TF
    adjust = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)
    x = torch.rand(12, 3, 20, 24)
    factors = 0.6 + 0.8 * torch.rand(12, 3)
    factors[2] = 1.0
    factors[5, 2] = 0.0  # fully grey
    orders = np.array([0, 5, 3, 1, 1, 4, 2, 0, 5, 3, 4, 2])
    expected = []
    for img, f, k in zip(x, factors.tolist(), orders):
        for op in JITTER_ORDERS[k]:
            img = adjust[op](img, f[op])
        expected.append(img)
    got = color_jitter(x.clone(), factors, orders)
    assert torch.allclose(got, torch.stack(expected), atol=1e-5)
    # The order matters (else the test above could not tell): brightness 1.4 clips
    # before contrast 0.6 pulls to the mean, and not after.
    bright_first = color_jitter(x[:1].clone(), torch.tensor([[1.4, 0.6, 1.0]]), np.array([0]))
    contrast_first = color_jitter(x[:1].clone(), torch.tensor([[1.4, 0.6, 1.0]]),
                                  np.array([JITTER_ORDERS.index((1, 0, 2))]))
    assert (bright_first - contrast_first).abs().max() > 0.05


def test_jitter_orders_are_drawn_uniformly_and_independently():
    """torchvision's ColorJitter shuffles the three operations per image: each of the
    six orders about equally often, and not tied to the factors."""
    spec, idx = ViewSpec(), np.arange(6000)
    orders = jitter_orders(spec, 0, idx)
    counts = np.bincount(orders, minlength=len(JITTER_ORDERS))
    assert len(counts) == 6 and counts.min() > 850 and counts.max() < 1150, counts
    factors = jitter_factors(spec, 0, idx)
    assert max(abs(np.corrcoef(orders, factors[:, k])[0, 1]) for k in range(3)) < 0.1
    assert np.mean(orders == jitter_orders(spec, 1, idx)) < 0.25  # new every epoch


def test_make_views_flip_both_views_and_normalise():
    crops = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8)
    spec = ViewSpec(image_size=8, color_jitter=(0, 0, 0))
    teacher, student = make_views(crops, spec, 0, np.arange(64))
    assert torch.equal(teacher, student) and teacher.dtype == torch.float32
    mirrored = torch.from_numpy(flips(spec, 0, np.arange(64)))
    expected = torch.where(mirrored[:, None, None, None], crops.flip(-1), crops).float() / 255
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    assert torch.allclose(teacher, (expected - mean) / std, atol=1e-5)
    assert torch.allclose(normalize(expected, (0, 0, 0), (1, 1, 1)), expected)
    assert 0 < mirrored.sum() < 64


# --- augmentation parameters: (seed, epoch, index), independent streams ---------------

def test_flips_and_jitter_change_from_epoch_to_epoch():
    """DESIGN: every random parameter is a function of (seed, epoch, index); a sample
    seen again in another epoch gets a new flip and new colour factors."""
    spec, idx = ViewSpec(), np.arange(2000)
    assert 0.4 < np.mean(flips(spec, 0, idx) != flips(spec, 1, idx)) < 0.6  # ~half differ
    a, b = jitter_factors(spec, 0, idx), jitter_factors(spec, 1, idx)
    assert np.mean(a == b) < 0.001


def test_brightness_contrast_and_saturation_are_drawn_independently():
    factors = jitter_factors(ViewSpec(), 0, np.arange(4000))
    corr = np.corrcoef(factors.T)
    assert np.abs(corr[np.triu_indices(3, 1)]).max() < 0.1, corr


def test_crop_positions_reach_every_edge_and_the_fallback_is_centred():
    """torchvision draws top in [0, H - h] inclusive; the fallback of a very tall image
    (no try fits its aspect range) is centred vertically, as torchvision's."""
    spec = ViewSpec(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))
    boxes = crop_boxes(spec, 0, np.arange(400), [11] * 400, [10] * 400)  # 10 x 10 crops
    assert set(boxes[:, 0]) == {0, 1} and set(boxes[:, 2]) == {10}
    tall = crop_boxes(ViewSpec(), 0, [0, 1, 2], [1000] * 3, [10] * 3)
    assert (tall[:, 0] == (1000 - tall[:, 2]) // 2).all() and (tall[:, 0] > 0).all()


# --- sharding: a global step holds the same samples on any number of ranks ------------

@pytest.mark.parametrize("epoch", [0, 3])
def test_a_global_step_holds_the_same_samples_whatever_the_rank_count(epoch):
    """A run without ZeRO may resume on another number of ranks: step k must consume the
    same samples, split otherwise (rank r takes every world_size-th of the order)."""
    global_batch = 8

    def step_samples(world):
        plans = [ShardedEpochs(96, global_batch // world, seed=5, rank=r, world_size=world)
                 for r in range(world)]
        return [sorted(np.concatenate([p.rank_batches(epoch)[k] for p in plans]).tolist())
                for k in range(plans[0].num_batches)]

    assert step_samples(1) == step_samples(2) == step_samples(4)


# --- folder: links, special files, unreadable folders --------------------------------

def test_a_link_into_another_class_or_up_to_the_root_lists_no_image_twice(tmp_path, caplog):
    """Each real folder is read once in the whole scan: a link in class a back up to the
    root must not list b's images again, labelled a."""
    for cls in "ab":
        for i in range(8):
            _touch(tmp_path / cls / f"{i}.jpg")
    (tmp_path / "a" / "loop").symlink_to(tmp_path)
    (tmp_path / "a" / "to_b").symlink_to(tmp_path / "b")
    with caplog.at_level("WARNING", logger="dmt.data"):
        folder = scan_image_folder(tmp_path)
    rel = [f.relative_to(tmp_path).as_posix() for f in folder.files]
    assert rel == [f"{c}/{i}.jpg" for c in "ab" for i in range(8)]
    assert folder.labels == [0] * 8 + [1] * 8
    assert "2 linked folder(s) lead to a folder already read" in caplog.text


def test_fifos_are_not_listed_and_broken_links_are_listed_to_be_counted(tmp_path, caplog):
    """Opening a FIFO blocks forever (a hung worker); a broken link is listed wherever it
    is, so that reading it is a counted, named skip (it used to vanish at the root)."""
    for name in ("cls/a.jpg", "flat/a.jpg"):
        _touch(tmp_path / name)
    for folder in ("cls", "flat"):
        os.mkfifo(tmp_path / folder / "pipe.jpg")
        (tmp_path / folder / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    with caplog.at_level("WARNING", logger="dmt.data"):
        classes = scan_image_folder(tmp_path)
        flat = scan_image_folder(tmp_path / "flat")
    assert [f.relative_to(tmp_path).as_posix() for f in classes.files] == [
        "cls/a.jpg", "cls/gone.jpg", "flat/a.jpg", "flat/gone.jpg"]
    assert [f.name for f in flat.files] == ["a.jpg", "gone.jpg"]
    assert "2 image-named entries are not files" in caplog.text and "pipe.jpg" in caplog.text


def _scan_as_a_user(path) -> subprocess.CompletedProcess:
    """scan_image_folder(path) in a process without root's permission override (DAC)."""
    code = ("import json, logging, sys; logging.basicConfig(level=logging.WARNING);"
            "from dmt.data.folder import scan_image_folder;"
            "print(json.dumps([str(f) for f in scan_image_folder(sys.argv[1]).files]))")
    prefix = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: permissions do not apply")
        prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search",
                  "--inh-caps=-dac_override,-dac_read_search"]
    root = str(Path(__file__).resolve().parents[1])
    return subprocess.run([*prefix, sys.executable, "-c", code, str(path)], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": root}, timeout=60)


def test_unlistable_folders_are_named_and_an_unlistable_root_is_one_data_error(tmp_path):
    for name in ("a/0.jpg", "a/locked_sub/1.jpg", "b/0.jpg", "c/0.jpg"):
        _touch(tmp_path / "data" / name)
    os.chmod(tmp_path / "data" / "a" / "locked_sub", 0)
    os.chmod(tmp_path / "data" / "c", 0o311)  # can be entered, not listed
    try:
        done = _scan_as_a_user(tmp_path / "data")
        assert done.returncode == 0, done.stderr
        assert [Path(f).relative_to(tmp_path / "data").as_posix()
                for f in json.loads(done.stdout)] == ["a/0.jpg", "b/0.jpg"]
        assert "2 folder(s) cannot be listed" in done.stderr
        assert "locked_sub' (Permission denied)" in done.stderr and "/c' (" in done.stderr
        os.chmod(tmp_path / "data", 0)
        done = _scan_as_a_user(tmp_path / "data")
        assert done.returncode == 1 and "Traceback" in done.stderr
        last = done.stderr.strip().splitlines()[-1]
        assert last == (f"dmt.errors.DataError: image folder {str(tmp_path / 'data')!r} "
                        "cannot be listed: Permission denied")
    finally:
        for folder in ("data", "data/a/locked_sub", "data/c"):
            os.chmod(tmp_path / folder, 0o755)
