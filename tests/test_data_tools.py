"""Sample images, launch/make_beton.py and benchmarks/dataloader.py."""
import importlib.util
import json
import os
from pathlib import Path

import pytest
from PIL import Image

from dmt.data import write_sample_images

# FFCV compiles its helpers with numba once per loader; numba's finaliser for those
# dispatchers raises a harmless KeyError at garbage collection (upstream noise).
pytestmark = pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <finalize object:pytest.PytestUnraisableExceptionWarning")

ROOT = Path(__file__).resolve().parents[1]


def load_script(relative):
    spec = importlib.util.spec_from_file_location(Path(relative).stem, ROOT / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sample_images_are_deterministic_jpeg_photos(tmp_path):
    a = write_sample_images(tmp_path / "a", num_images=20, size=80, seed=1, num_classes=3)
    b = write_sample_images(tmp_path / "b", num_images=20, size=80, seed=1, num_classes=3)
    files = sorted(a.rglob("*"))
    files = [f for f in files if f.is_file()]
    assert len(files) == 20 and sorted(d.name for d in a.iterdir()) == ["class_0", "class_1", "class_2"]
    for f in files:
        twin = b / f.relative_to(a)
        assert f.read_bytes() == twin.read_bytes()
        with Image.open(f) as image:
            assert image.format == "JPEG" and image.mode == "RGB"
            assert 72 <= max(image.size) <= 88  # longer side 80 +- 10%
            assert image.convert("L").getextrema()[1] - image.convert("L").getextrema()[0] > 50
    c = write_sample_images(tmp_path / "c", num_images=20, size=80, seed=2, num_classes=3)
    assert (c / "class_0" / "img_00000.jpg").read_bytes() != (a / "class_0" / "img_00000.jpg").read_bytes()


@pytest.mark.timeout(240, method="thread")
def test_make_beton_reports_skipped_files(tmp_path, capsys):
    pytest.importorskip("ffcv")
    folder = write_sample_images(tmp_path / "src", num_images=10, size=64, num_classes=2)
    (folder / "class_1" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    make_beton = load_script("launch/make_beton.py")
    out = tmp_path / "out" / "data.beton"
    assert make_beton.main([str(folder), str(out), "--max-side", "48", "--quality", "85"]) == 0
    printed = capsys.readouterr().out
    assert "wrote 10 images (2 classes)" in printed
    assert "skipped 1 unreadable file" in printed and "broken.jpg" in printed
    assert "probed 11 of 11 file(s) (0 known from the probe cache)" in printed
    # Again: every verdict, the broken file's too, comes from the probe index it wrote.
    assert make_beton.main([str(folder), str(tmp_path / "again.beton"), "--max-side", "48"]) == 0
    printed = capsys.readouterr().out
    assert "probed 0 of 11 file(s) (11 known from the probe cache)" in printed
    assert "skipped 1 unreadable file" in printed and "broken.jpg" in printed
    from ffcv.reader import Reader
    reader = Reader(str(out))
    assert reader.num_samples == 10
    assert reader.metadata["f0"]["width"].max() <= 48 and reader.metadata["f0"]["height"].max() <= 48
    assert sorted(set(reader.metadata["f1"].tolist())) == [0, 1]

    (tmp_path / "empty").mkdir()
    assert make_beton.main([str(tmp_path / "empty"), str(tmp_path / "e.beton")]) == 2
    assert str(tmp_path / "empty") in capsys.readouterr().err
    for flags, message in ((["--max-side", "0"], "--max-side must be a positive"),
                           (["--quality", "500"], "--quality must be in 1..100"),
                           (["--workers", "0"], "--workers must be at least 1")):
        with pytest.raises(SystemExit):  # a usage error, before any image is read
            make_beton.main([str(folder), str(out), *flags])
        assert message in capsys.readouterr().err


def test_a_failed_beton_write_leaves_the_old_file_and_no_partial_one(tmp_path, monkeypatch):
    # The FFCV writer dies half-way (here: writes some bytes, exits 1).
    import subprocess
    from dmt.data import beton
    from dmt.errors import DataError
    folder = write_sample_images(tmp_path / "src", num_images=4, size=32, num_classes=1)
    out = tmp_path / "data.beton"
    out.write_bytes(b"the previous, complete file")

    def dying_writer(cmd, input, **kwargs):
        Path(json.loads(input)["out"]).write_bytes(b"half a beton")
        return subprocess.CompletedProcess(cmd, 1)

    monkeypatch.setattr(beton.subprocess, "run", dying_writer)
    with pytest.raises(DataError, match="was left as it was"):
        beton.write_beton(folder, out, num_workers=1, probe_cache="off")
    assert out.read_bytes() == b"the previous, complete file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.beton", "src"]


def test_make_beton_refuses_to_write_over_a_source_image(tmp_path, capsys):
    """An output naming one of the images it converts used to replace that image."""
    folder = write_sample_images(tmp_path / "src", num_images=2, size=32, num_classes=1)
    image = next(folder.rglob("*.jpg"))
    before = image.read_bytes()
    make_beton = load_script("launch/make_beton.py")
    assert make_beton.main([str(folder), str(image), "--probe-cache", "off"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "would replace a source image" in err and str(image) in err
    assert image.read_bytes() == before


def test_make_beton_refuses_a_source_image_in_a_linked_class_folder(tmp_path, capsys):
    """A class folder may be a link to images elsewhere (the scan follows it): an output
    naming one of its images replaced that image. A refused output makes no folder."""
    elsewhere = write_sample_images(tmp_path / "elsewhere", num_images=2, size=32,
                                    num_classes=1)
    src = tmp_path / "src"
    src.mkdir()
    (src / "linked").symlink_to(next(elsewhere.iterdir()), target_is_directory=True)
    image = sorted((src / "linked").iterdir())[0]
    before = image.read_bytes()
    make_beton = load_script("launch/make_beton.py")
    for out in (image, image.resolve(), src / "new" / "x.jpg"):
        assert make_beton.main([str(src), str(out), "--probe-cache", "off"]) == 2
        assert "would replace a source image" in capsys.readouterr().err
    assert image.read_bytes() == before and not (src / "new").exists()


def test_loader_benchmark_refuses_bad_flags_and_outputs_before_measuring(tmp_path, capsys):
    """Each was a traceback: a device torch does not know, negative workers, and (after the
    whole measurement) an --out that is a folder or lies under a file."""
    bench = load_script("benchmarks/dataloader.py")
    (tmp_path / "file").write_text("x")
    (tmp_path / "folder").mkdir()
    base = ["--backend", "synthetic", "--path", "64", "--out", str(tmp_path / "r.json")]
    for flags, message in ((["--device", "gpu"], "--device gpu: expected cpu, cuda"),
                           (["--num-workers", "-1"], "--num-workers must be at least 0"),
                           (["--out", str(tmp_path / "folder"), "--overwrite"], "is a folder"),
                           (["--out", str(tmp_path / "file" / "r.json")],
                            f"cannot write in {tmp_path / 'file'} (a file, not a folder)")):
        with pytest.raises(SystemExit) as exit_:
            bench.main(base + flags)
        assert exit_.value.code != 0
        said = f"{exit_.value.code}" if isinstance(exit_.value.code, str) else ""
        assert message in said + capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_loader_benchmark_writes_json(tmp_path):
    bench = load_script("benchmarks/dataloader.py")
    out = tmp_path / "torch.json"
    result = bench.main(["--backend", "torch", "--num-images", "24", "--image-side", "64",
                         "--batch-size", "4", "--image-size", "32", "--num-workers", "0",
                         "--warmup", "1", "--batches", "3", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(result))
    assert saved["images_per_s"] > 0 and saved["cpu_cores_used"] >= 0
    assert saved["machine"]["cpu"] and saved["machine"]["versions"]["torch"]
    assert "--backend torch" in saved["command"] and saved["dataset"]["images"] == 24


def test_loader_benchmark_keeps_an_earlier_result_unless_told_to_replace_it(tmp_path, capsys):
    bench = load_script("benchmarks/dataloader.py")
    out = tmp_path / "torch.json"
    out.write_text('{"benchmark": "dataloader", "date": "2026-01-02T03:04:05"}')
    args = ["--backend", "torch", "--num-images", "8", "--image-side", "48", "--batch-size", "4",
            "--image-size", "32", "--num-workers", "0", "--warmup", "0", "--batches", "1",
            "--out", str(out)]
    with pytest.raises(SystemExit, match=rf"{out} holds an earlier run's results "
                                         r"\(2026-01-02T03:04:05\): pass --overwrite"):
        bench.main(args)
    assert json.loads(out.read_text())["date"] == "2026-01-02T03:04:05"
    result = bench.main(args + ["--overwrite"])
    assert json.loads(out.read_text())["date"] == result["date"] != "2026-01-02T03:04:05"


def test_loader_benchmark_needs_cuda_for_gpu_decoding(tmp_path, capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    bench = load_script("benchmarks/dataloader.py")
    with pytest.raises(SystemExit):
        bench.main(["--backend", "torchvision-nvjpeg", "--device", "cuda", "--out", str(tmp_path / "x.json")])
    assert "CUDA is not available" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--batches", "0"], "--batches must be at least 1"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    # was a ValueError traceback from the .beton writer, which needs a worker
    (["--backend", "ffcv", "--num-workers", "0"], "ffcv decodes in worker threads")])
def test_loader_benchmark_refuses_empty_measurements(flags, message, capsys):
    bench = load_script("benchmarks/dataloader.py")
    with pytest.raises(SystemExit):
        bench.main(["--backend", "torch", *flags])
    assert message in capsys.readouterr().err


@pytest.mark.timeout(300, method="thread")
def test_make_beton_survives_thin_images_files_that_fail_in_the_writer_and_odd_names(
        tmp_path, capsys, monkeypatch):
    """--max-side 64 rounded a 4000x50 image to 64x0: OpenCV raised in an FFCV worker and
    the writer waited forever. A file that fails only in the writer (here: replaced after
    its probe, at the same size and mtime, so the probe index still calls it good) is a
    counted skip, named. A name that is not UTF-8 is printed escaped. '~' is expanded in
    the output too."""
    pytest.importorskip("ffcv")
    import numpy as np
    src = write_sample_images(tmp_path / "src", num_images=3, size=64, num_classes=1) / "class_0"
    Image.fromarray(np.full((50, 4000, 3), 200, np.uint8)).save(src / "wide.png")
    (src / os.fsdecode(b"caf\xe9.jpg")).write_bytes(b"not a jpeg")
    make_beton = load_script("launch/make_beton.py")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert make_beton.main([str(src), "~/first.beton", "--max-side", "64", "--workers", "1"]) == 0
    assert "wrote 4 images" in capsys.readouterr().out
    liar = sorted(src.glob("img_*.jpg"))[0]
    info = liar.stat()
    liar.write_bytes(b"\xff\xd8" + bytes(info.st_size - 2))
    os.utime(liar, ns=(info.st_atime_ns, info.st_mtime_ns))
    out = tmp_path / "home" / "again.beton"
    assert make_beton.main([str(src), "~/again.beton", "--max-side", "64", "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    assert "wrote 3 images" in printed and "probed 0 of 5 file(s)" in printed
    assert f"skipped {liar}: " in printed and "caf\\xe9.jpg: UnidentifiedImageError" in printed
    from ffcv.reader import Reader
    sizes = Reader(str(out)).metadata["f0"]
    assert (64, 1) in zip(sizes["width"].tolist(), sizes["height"].tolist())  # the 4000x50
    assert sorted(p.name for p in out.parent.iterdir()) == ["again.beton", "first.beton"]


def test_make_beton_checks_the_output_path_before_probing(tmp_path, capsys):
    """An output that is a folder, or whose folder cannot be made, is said at once, not
    after a whole probe and write (whose data the folder case then deleted)."""
    src = write_sample_images(tmp_path / "src", num_images=2, size=32, num_classes=1)
    (tmp_path / "a_file").write_text("x")
    make_beton = load_script("launch/make_beton.py")
    for out, message in ((tmp_path, f"the output {str(tmp_path)!r} is a folder"),
                         (tmp_path / "a_file" / "x.beton",
                          f"cannot make the output's folder {str(tmp_path / 'a_file')!r}")):
        assert make_beton.main([str(src), str(out)]) == 2
        assert message in capsys.readouterr().err
    assert not list(src.rglob(".dmt_probe_cache.json"))  # nothing was probed


@pytest.mark.timeout(120)
def test_the_beton_writer_ends_when_a_worker_is_killed_outright(tmp_path):
    # FFCV's writer waits forever for a worker that died; one killed by the OOM killer
    # writes no failure file, so the watcher must see its exit code.
    import subprocess
    import sys
    script = (
        "import multiprocessing, os, signal, sys, time\n"
        "from dmt.data.beton import _end_when_a_worker_fails\n"
        "from dmt.data.beton import _tracked\n"
        "started = []\n"
        f"_end_when_a_worker_fails({str(tmp_path / 'failed')!r}, started)\n"
        "Process = _tracked(multiprocessing.Process, started)\n"
        "Process(target=time.sleep, args=(60,)).start()  # a worker still busy\n"
        "Process(target=lambda: os.kill(os.getpid(), signal.SIGKILL)).start()\n"
        "time.sleep(60)  # FFCV's endless wait\n"
        "sys.exit(0)\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, timeout=100,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert done.returncode == 3
    assert not (tmp_path / "failed").exists()
