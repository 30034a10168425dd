"""Bad data: corrupt, truncated, zero-byte and non-image files are skipped and named;
greyscale, CMYK and RGBA images decode to RGB; empty or missing paths are one error."""
import importlib.util
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from dmt.data import build_loader, write_sample_images
from dmt.errors import ConfigError, DataError

# FFCV compiles its helpers with numba once per loader; numba's finaliser for those
# dispatchers raises a harmless KeyError at garbage collection (upstream noise).
pytestmark = pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <finalize object:pytest.PytestUnraisableExceptionWarning")

BAD = ("truncated.jpg", "garbled.jpg", "random.jpg", "empty.jpg", "text.png")
ODD_MODES = ("cmyk.jpg", "grey.jpg", "rgba.png")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A square RGB photo and a few good JPEGs."""
    folder = write_sample_images(tmp_path_factory.mktemp("src"), num_images=9, size=64, num_classes=1)
    files = sorted(folder.rglob("*.jpg"))
    square = Image.open(files[0]).convert("RGB").resize((48, 48), Image.BICUBIC)
    return square, files


def write_odd_modes(folder, square):
    square.convert("CMYK").save(folder / "cmyk.jpg", quality=95)
    square.convert("L").save(folder / "grey.jpg", quality=95)
    rgba = square.convert("RGBA")
    rgba.putalpha(Image.new("L", square.size, 40))  # mostly transparent: alpha must be dropped
    rgba.save(folder / "rgba.png")


@pytest.fixture(scope="module")
def messy(source, tmp_path_factory):
    """8 good JPEGs, 3 odd colour modes, 5 undecodable files and a text file."""
    square, files = source
    folder = tmp_path_factory.mktemp("messy")
    for i, f in enumerate(files[1:]):
        shutil.copy(f, folder / f"good{i}.jpg")
    data = files[0].read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    rng = np.random.default_rng(0)
    (folder / "garbled.jpg").write_bytes(data[:400] + rng.bytes(len(data) - 400))  # valid header
    (folder / "random.jpg").write_bytes(rng.bytes(3000))
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.png").write_text("not an image at all")
    (folder / "notes.txt").write_text("ignored: not an image extension")
    write_odd_modes(folder, square)
    return folder


@pytest.fixture(scope="module")
def messy_beton(messy, tmp_path_factory):
    pytest.importorskip("ffcv")
    from dmt.data.beton import write_beton
    return write_beton(messy, tmp_path_factory.mktemp("beton") / "messy.beton", quality=95,
                       num_workers=1)


def bad_paths(folder):
    return {str(folder / name) for name in BAD}


def test_torch_skips_counts_and_names_undecodable_files(messy, caplog):
    loader = build_loader("torch", messy, 4, image_size=32, num_workers=0, drop_last=False)
    assert loader.num_samples == 16  # decoded lazily: bad files are found at run time
    files = [str(f) for f in loader.folder.files]
    bad_index = {files.index(p) for p in bad_paths(messy)}
    with caplog.at_level(logging.WARNING, logger="dmt.data"):
        for _ in range(2):
            for batch in loader:
                assert batch["teacher"].shape == (4, 3, 32, 32)  # batch size kept
                assert not bad_index & set(batch["index"].tolist())  # slots filled by good ones
    assert loader.skipped == len(BAD)
    assert set(loader.skipped_files) == bad_paths(messy)
    for path in bad_paths(messy):  # warned once per file, over two epochs
        assert sum(path in r.getMessage() and "skipping" in r.getMessage() for r in caplog.records) == 1
    assert any("end of epoch 1" in r.getMessage() for r in caplog.records)


def test_dali_leaves_undecodable_files_out_up_front(messy):
    pytest.importorskip("nvidia.dali")
    loader = build_loader("dali", messy, 4, image_size=32, num_workers=1, drop_last=False)
    assert loader.num_samples == 11 and loader.skipped == len(BAD)
    assert set(loader.skipped_files) == bad_paths(messy)
    assert not bad_paths(messy) & set(loader.files)
    seen = torch.cat([b["index"] for b in loader]).tolist()
    assert set(seen) == set(range(11))


@pytest.mark.timeout(240, method="thread")
def test_beton_writer_reports_undecodable_files(messy, messy_beton):
    assert messy_beton.written == 11
    assert {p for p, _ in messy_beton.skipped} == bad_paths(messy)
    assert all(reason for _, reason in messy_beton.skipped)
    loader = build_loader("ffcv", messy_beton.path, 4, image_size=32, num_workers=1,
                          drop_last=False)
    assert loader.num_samples == 11 and len(list(loader)) == 3


@pytest.mark.timeout(240, method="thread")
@pytest.mark.parametrize("backend", ["torch", "dali", "ffcv"])
def test_grey_cmyk_and_rgba_images_decode_to_rgb(backend, source, messy, request):
    square, _ = source
    path = messy
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    if backend == "ffcv":
        path = request.getfixturevalue("messy_beton").path
    # Whole-image crops, no jitter, no normalisation: views are the images' pixels.
    loader = build_loader(backend, path, 4, image_size=48, crop_scale=(1.0, 1.0),
                          color_jitter=(0, 0, 0), num_workers=1 if backend != "torch" else 0,
                          drop_last=False, mean=(0, 0, 0), std=(1, 1, 1))
    # Index -> file: the folder's files in scan order, less (dali, ffcv) the rejected ones
    # (dot-files, such as DALI's probe cache, are never images of the folder).
    files = [str(f) for f in loader.folder.files] if backend == "torch" else \
        [str(f) for f in sorted(messy.iterdir()) if str(f) not in bad_paths(messy)
         and f.suffix != ".txt" and not f.name.startswith(".")]
    views = {}
    for batch in loader:
        for i, view in zip(batch["index"].tolist(), batch["teacher"]):
            views[os.path.basename(files[i])] = view
    assert set(ODD_MODES) <= set(views)
    rgb = torch.from_numpy(np.asarray(square, dtype=np.float32) / 255).permute(2, 0, 1)
    luma = (rgb * torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)).sum(0)
    # Per-channel means do not depend on the flip.
    assert torch.allclose(views["cmyk.jpg"].mean((1, 2)), rgb.mean((1, 2)), atol=0.03)
    assert torch.allclose(views["rgba.png"].mean((1, 2)), rgb.mean((1, 2)), atol=0.02)
    grey = views["grey.jpg"]
    assert torch.allclose(grey[0], grey[1], atol=2 / 255) and torch.allclose(grey[1], grey[2], atol=2 / 255)
    assert abs(grey.mean() - luma.mean()) < 0.02


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_missing_or_empty_folder_is_one_clear_error(backend, tmp_path):
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    with pytest.raises(DataError, match="does not exist") as err:
        build_loader(backend, tmp_path / "absent", 4)
    assert str(tmp_path / "absent") in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no image files") as err:
        build_loader(backend, tmp_path / "empty", 4)
    assert str(tmp_path / "empty") in str(err.value)


def test_dali_folder_with_nothing_decodable_is_an_error(tmp_path):
    pytest.importorskip("nvidia.dali")
    (tmp_path / "a.jpg").write_bytes(b"")
    (tmp_path / "b.jpg").write_bytes(os.urandom(100))
    with pytest.raises(DataError, match="none of its 2 image files"):
        build_loader("dali", tmp_path, 1)


def test_torch_batch_of_only_undecodable_files_gets_a_stand_in(tmp_path, source):
    # Micro-batch 1: every bad file is a batch without one decodable image. The next
    # decodable file of the folder stands in (the same one every run); no good file at all
    # is an error naming the file.
    _, files = source
    for name in ("a.jpg", "b.jpg", "d.jpg"):
        (tmp_path / name).write_bytes(b"")
    shutil.copy(files[0], tmp_path / "c.jpg")
    shutil.copy(files[1], tmp_path / "e.jpg")
    loader = build_loader("torch", tmp_path, 1, image_size=32, num_workers=0, drop_last=False)
    names = [p.name for p in loader.folder.files]
    assert names == ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg"]
    order = [names[i] for i in loader.plan.rank_batches(0).ravel()]
    served = [names[b["index"].item()] for b in loader]
    # a and b: c stands in; d: e (the next decodable file in folder order).
    assert served == [{"a.jpg": "c.jpg", "b.jpg": "c.jpg", "d.jpg": "e.jpg"}.get(n, n)
                      for n in order]
    assert loader.skipped == 3
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "a.jpg").write_bytes(b"")
    with pytest.raises(DataError, match="a.jpg"):
        next(iter(build_loader("torch", tmp_path / "only", 1, num_workers=0)))


def test_worker_data_error_reaches_the_user_in_its_own_words_and_the_process_exits(tmp_path):
    # Raised in a DataLoader worker, torch re-raises it wrapped in "Caught DataError in
    # DataLoader worker process 0 ... Original Traceback". In a child process: a persistent
    # worker left behind would hang its exit, which is part of what is checked.
    (tmp_path / "a.jpg").write_bytes(b"")
    script = (f"from dmt.data import build_loader\n"
              f"from dmt.errors import DataError\n"
              f"try:\n"
              f"    next(iter(build_loader('torch', {str(tmp_path)!r}, 1, num_workers=1)))\n"
              f"except DataError as err:\n"
              f"    print(err)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    expected = (f"every image of a batch is undecodable, and so are the files after "
                f"{tmp_path / 'a.jpg'} that could stand in for them")
    assert done.stdout.strip() == expected


@pytest.mark.parametrize("message, cause", [
    ("plain", None), ("two\nlines", None), ("chained", OSError("disk")),
    # The message may name the error's type itself: all of it is kept.
    ("the last one said dmt.errors.DataError: no files", None),
    ("quoting\ndmt.errors.DataError: no files", ValueError("x")),
])
def test_a_wrapped_worker_error_is_unwrapped_to_its_whole_message(message, cause):
    """What torch's own ExceptionWrapper makes of a worker's DataError comes back as the
    worker's message, whole."""
    from torch._utils import ExceptionWrapper

    from dmt.data.torch_backend import _in_own_words

    def worker():
        if cause is None:
            raise DataError(message)
        try:
            raise cause
        except Exception as inner:
            raise DataError(message) from inner
    try:
        worker()
    except DataError:  # as a DataLoader worker wraps it
        wrapper = ExceptionWrapper(where="in DataLoader worker process 0")

    def batches():
        yield 1
        wrapper.reraise()
    with pytest.raises(DataError) as caught:
        list(_in_own_words(batches()))
    assert str(caught.value) == message


@pytest.mark.timeout(240, method="thread")
def test_missing_beton_and_bad_arguments_are_clear_errors(tmp_path):
    pytest.importorskip("ffcv")
    from dmt.data.beton import write_beton
    with pytest.raises(DataError, match="does not exist") as err:
        build_loader("ffcv", tmp_path / "absent.beton", 4)
    assert str(tmp_path / "absent.beton") in str(err.value)
    (tmp_path / "junk.beton").write_bytes(b"\0" * 64)
    with pytest.raises(DataError, match="junk.beton"):
        build_loader("ffcv", tmp_path / "junk.beton", 4)
    with pytest.raises(DataError, match="sample count"):
        build_loader("synthetic", "not-a-number", 4)
    # A copy cut short still opens in FFCV, and would serve other bytes as images.
    whole = (tmp_path / "whole.beton")
    write_beton(write_sample_images(tmp_path / "src", num_images=6, size=32), whole,
                num_workers=1, probe_cache="off")
    assert build_loader("ffcv", whole, 2, num_workers=1).num_samples == 6
    for cut in (1, 30, 100):
        (tmp_path / "cut.beton").write_bytes(whole.read_bytes()[:-cut])
        with pytest.raises(DataError, match="cut.beton' is incomplete"):
            build_loader("ffcv", tmp_path / "cut.beton", 2, num_workers=1)
    with pytest.raises(ConfigError, match="unknown data backend"):
        build_loader("webdataset", tmp_path, 4)


@pytest.mark.timeout(240, method="thread")
@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_16_bit_greyscale_is_scaled_not_clipped(backend, tmp_path):
    # PIL's own convert("RGB") clips 16-bit values at 255: every such image came out white.
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    from dmt.data.images import open_rgb
    ramp = np.linspace(0, 65535, 48 * 48).reshape(48, 48).astype(np.uint16)
    (tmp_path / "c").mkdir()
    Image.fromarray(ramp).save(tmp_path / "c" / "grey16.png")
    assert Image.open(tmp_path / "c" / "grey16.png").mode.startswith("I")
    rgb = np.asarray(open_rgb(tmp_path / "c" / "grey16.png"))
    assert (rgb == np.round(ramp / 257).astype(np.uint8)[..., None]).all()
    loader = build_loader(backend, tmp_path, 1, image_size=48, crop_scale=(1.0, 1.0),
                          color_jitter=(0, 0, 0), num_workers=1 if backend != "torch" else 0,
                          drop_last=False, mean=(0, 0, 0), std=(1, 1, 1))
    view = next(iter(loader))["teacher"][0]
    assert abs(view.mean().item() - ramp.mean() / 65535) < 0.01


def test_big_endian_16_bit_greyscale_is_scaled_too():
    """16-bit greyscale comes big-endian too (TIFF, PNM: PIL mode I;16B): scaled to
    8 bits like the little-endian kind, not clipped white by PIL's own conversion."""
    from dmt.data.images import to_rgb
    ramp = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    image = Image.frombytes("I;16B", (32, 32), ramp.astype(">u2").tobytes())
    assert image.mode == "I;16B"
    rgb = np.asarray(to_rgb(image))
    assert rgb.shape == (32, 32, 3) and (rgb == np.round(ramp / 257).astype(np.uint8)[..., None]).all()


def test_a_16_bit_pgm_that_pil_opens_as_32_bit_is_scaled_not_refused(tmp_path):
    """PIL opens 16-bit PGM (and, before Pillow 10.3, 16-bit PNG) as mode I: 16-bit data,
    scaled like I;16, not refused as 32-bit."""
    from dmt.data.images import open_rgb, probe_image
    ramp = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "ramp.pgm")
    with Image.open(tmp_path / "ramp.pgm") as image:
        assert (image.mode, image.format) == ("I", "PPM")
    assert probe_image(tmp_path / "ramp.pgm") == (32, 32)
    rgb = np.asarray(open_rgb(tmp_path / "ramp.pgm"))
    assert (rgb == np.round(ramp / 257).astype(np.uint8)[..., None]).all()


def _png_with_a_broken_second_chunk(source_file) -> bytes:
    """A PNG whose header reads fine but whose image data breaks off into a chunk of no
    valid type: PIL raises SyntaxError ("broken PNG file") while decoding, not opening."""
    import io
    import struct
    import zlib
    buffer = io.BytesIO()
    Image.open(source_file).convert("RGB").save(buffer, "PNG")
    data = buffer.getvalue()
    at = data.index(b"IDAT")
    size = struct.unpack(">I", data[at - 4:at])[0]
    payload = data[at + 4:at + 4 + size]

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (data[:at - 4] + chunk(b"IDAT", payload[:size // 2]) + chunk(b"!!!!", payload[size // 2:])
            + data[at + 4 + size + 4:])


def test_files_pil_rejects_with_syntax_or_value_errors_are_skipped_and_named(tmp_path, source, caplog):
    """Not every bad file fails as an OSError: a broken PNG chunk raises SyntaxError, a
    PGM with a zero maxval or a word among its pixel values ValueError. Each is skipped
    and named like any other undecodable file, not a crash of the run."""
    from dmt.data.images import probe_one
    _, files = source
    for i, f in enumerate(files[:3]):
        shutil.copy(f, tmp_path / f"good{i}.jpg")
    broken = {"chunk.png": _png_with_a_broken_second_chunk(files[0]),
              "maxval.pgm": b"P5\n4 4\n0\n" + bytes(16),
              "word.pgm": b"P2\n2 2\n255\n1 2 x 4\n"}
    for name, blob in broken.items():
        (tmp_path / name).write_bytes(blob)
    reasons = {name: probe_one(tmp_path / name)[1] for name in broken}
    assert reasons["chunk.png"].startswith("SyntaxError: broken PNG file"), reasons
    assert reasons["maxval.pgm"].startswith("ValueError") and reasons["word.pgm"].startswith("ValueError")
    loader = build_loader("torch", tmp_path, 2, image_size=32, num_workers=0, drop_last=False)
    with caplog.at_level(logging.WARNING, logger="dmt.data"):
        served = torch.cat([batch["index"] for batch in loader]).tolist()
    names = [f.name for f in loader.folder.files]
    assert sorted(names[i] for i in set(served)) == ["good0.jpg", "good1.jpg", "good2.jpg"]
    assert set(loader.skipped_files) == {str(tmp_path / name) for name in broken}
    for name in broken:
        assert any(str(tmp_path / name) in r.getMessage() and "skipping" in r.getMessage()
                   for r in caplog.records), name


def test_content_in_a_format_dmt_does_not_read_is_skipped_by_every_backend(tmp_path, source, caplog):
    """A GIF or an icon saved under a .jpg/.png name decodes in PIL but stops a DALI
    pipeline mid-run: every backend skips it, naming its format. A JPEG named .png is
    read (the content decides, not the name)."""
    from dmt.data.images import probe_one
    square, files = source
    for i, f in enumerate(files[:3]):
        shutil.copy(f, tmp_path / f"good{i}.jpg")
    square.save(tmp_path / "photo.png", format="JPEG")
    square.save(tmp_path / "camera.jpg", format="MPO", save_all=True, append_images=[square])
    square.convert("P").save(tmp_path / "anim.jpg", format="GIF")
    square.save(tmp_path / "icon.png", format="ICO")
    refused = {"anim.jpg": "GIF", "icon.png": "ICO"}
    for name, kind in refused.items():
        assert probe_one(tmp_path / name)[1].startswith(f"ValueError: {kind} content"), name
    assert probe_one(tmp_path / "camera.jpg")[0] == square.size[::-1]
    readable = ["camera.jpg", "good0.jpg", "good1.jpg", "good2.jpg", "photo.png"]
    loader = build_loader("torch", tmp_path, 2, image_size=32, num_workers=0, drop_last=False)
    with caplog.at_level(logging.WARNING, logger="dmt.data"):
        served = {loader.folder.files[i].name for b in loader for i in b["index"].tolist()}
    assert sorted(served) == readable
    assert set(loader.skipped_files) == {str(tmp_path / name) for name in refused}
    if importlib.util.find_spec("nvidia.dali") is not None:  # its own test is the crash
        dali = build_loader("dali", tmp_path, 2, image_size=32, drop_last=False)
        assert sorted({dali.files[i].rsplit("/", 1)[1] for b in dali
                       for i in b["index"].tolist()}) == readable
        assert set(dali.skipped_files) == set(loader.skipped_files)


def _png_with_a_wrong_checksum(source_file, chunk: bytes) -> bytes:
    """A PNG whose pixels are intact but whose `chunk` (IDAT, or a tEXt added after the
    image data, where PIL does not look) has a wrong CRC."""
    import io
    import struct
    import zlib
    buffer = io.BytesIO()
    Image.open(source_file).convert("RGB").save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    if chunk == b"tEXt":
        body = b"Comment\0hello"
        crc = zlib.crc32(b"tEXt" + body) ^ 1
        at = data.index(b"IEND") - 4
        data[at:at] = struct.pack(">I", len(body)) + b"tEXt" + body + struct.pack(">I", crc)
    at = data.index(chunk)
    end = at + 4 + struct.unpack(">I", data[at - 4:at])[0]
    if chunk == b"IDAT":
        data[end] ^= 0xFF
    return bytes(data)


def test_a_png_failing_a_critical_checksum_is_skipped_by_every_backend(tmp_path, source):
    """PIL decodes a PNG whose IDAT fails its CRC, libpng (DALI) stops the pipeline on it:
    every backend skips it. A wrong CRC on an ancillary chunk (libpng ignores it) is fine."""
    from dmt.data.images import probe_one
    _, files = source
    for i, f in enumerate(files[:2]):
        shutil.copy(f, tmp_path / f"good{i}.jpg")
    (tmp_path / "idat.png").write_bytes(_png_with_a_wrong_checksum(files[0], b"IDAT"))
    (tmp_path / "text.png").write_bytes(_png_with_a_wrong_checksum(files[0], b"tEXt"))
    assert "PNG chunk IDAT at byte" in probe_one(tmp_path / "idat.png")[1]
    assert probe_one(tmp_path / "text.png")[1] is None
    loader = build_loader("torch", tmp_path, 1, image_size=32, num_workers=0, drop_last=False)
    served = {loader.folder.files[i].name for b in loader for i in b["index"].tolist()}
    assert served == {"good0.jpg", "good1.jpg", "text.png"}
    assert loader.skipped_files == [str(tmp_path / "idat.png")]
    if importlib.util.find_spec("nvidia.dali") is not None:  # its own test is the crash
        dali = build_loader("dali", tmp_path, 1, image_size=32, drop_last=False)
        assert len(list(dali)) == 3 and dali.skipped_files == loader.skipped_files


def test_a_png_cut_after_its_pixels_is_skipped_as_truncated(tmp_path, source):
    """PIL stops reading a PNG once its pixels are in: a file cut before IEND, or inside
    the last IDAT's CRC, decoded in PIL (libpng reads on and fails). Truncated: skipped,
    like a file cut inside its pixels; bytes after IEND are fine."""
    import io
    import struct
    from dmt.data.images import probe_one
    _, files = source
    buffer = io.BytesIO()
    Image.open(files[0]).convert("RGB").save(buffer, "PNG")
    data = buffer.getvalue()
    iend = data.index(b"IEND") - 4  # its length field
    assert struct.unpack(">I", data[iend - 4:iend])[0] != 0  # the last IDAT's CRC
    cut = {"no_iend.png": data[:iend], "half_iend.png": data[:iend + 6],
           "idat_crc_cut.png": data[:iend - 2]}
    shutil.copy(files[1], tmp_path / "good.jpg")
    (tmp_path / "trailing.png").write_bytes(data + b"\0" * 32)
    for name, content in cut.items():
        (tmp_path / name).write_bytes(content)
        Image.open(tmp_path / name).load()  # PIL alone has no complaint
        reason = probe_one(tmp_path / name)[1]
        assert reason == f"ValueError: PNG ends at byte {len(content)}, before its IEND " \
                         "chunk: the file is cut short", name
    assert probe_one(tmp_path / "trailing.png")[1] is None
    loader = build_loader("torch", tmp_path, 1, image_size=32, num_workers=0, drop_last=False)
    served = {loader.folder.files[i].name for b in loader for i in b["index"].tolist()}
    assert served == {"good.jpg", "trailing.png"}
    assert sorted(loader.skipped_files) == sorted(str(tmp_path / n) for n in cut)


@pytest.mark.timeout(60)
def test_linked_folders_are_read_once(tmp_path, caplog):
    from dmt.data.folder import scan_image_folder
    (tmp_path / "data" / "cls" / "sub").mkdir(parents=True)
    for name in ("cls/a.jpg", "cls/b.jpg", "cls/sub/c.jpg"):
        Image.new("RGB", (8, 8)).save(tmp_path / "data" / name)
    (tmp_path / "data" / "cls" / "sub" / "back").symlink_to("..")  # a loop
    (tmp_path / "data" / "cls" / "up").symlink_to(tmp_path / "data")  # a wider loop
    (tmp_path / "elsewhere").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "elsewhere" / "d.jpg")
    (tmp_path / "data" / "cls" / "linked").symlink_to(tmp_path / "elsewhere")  # followed
    with caplog.at_level(logging.WARNING, logger="dmt.data"):
        folder = scan_image_folder(tmp_path / "data")
    names = sorted(f.name for f in folder.files)
    assert names == ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]
    assert any("lead to a folder already read" in r.getMessage() for r in caplog.records)


@pytest.mark.timeout(120)
def test_file_names_that_are_not_utf8_are_read_probed_and_listed(tmp_path, source):
    """b'caf\\xe9.jpg' (Latin-1): Python holds such a name with surrogates, which
    str.encode() refuses. The torch loader reads and skips by it, the probe (DALI,
    make_beton) fingerprints and caches it, and the run's skipped_files.txt lists it
    as its bytes."""
    import torch.distributed as dist
    from engine_utils import free_port

    from dmt.data.probe import probe_image_folder
    from dmt.engine.trainer import _record_skipped
    _, files = source
    good, bad = os.fsdecode(b"caf\xe9.jpg"), os.fsdecode(b"cass\xe9.jpg")
    shutil.copy(files[0], tmp_path / good)
    (tmp_path / bad).write_bytes(b"not a jpeg")
    loader = build_loader("torch", tmp_path, 2, image_size=32, num_workers=0, drop_last=False)
    served = torch.cat([batch["index"] for batch in loader]).tolist()
    assert [loader.folder.files[i].name for i in set(served)] == [good]
    assert loader.skipped_files == [str(tmp_path / bad)]
    for probed in (2, 0):  # the second probe reads every verdict from its index
        folder, result = probe_image_folder(tmp_path, shard=False)
        assert result.probed == probed and [p for p, _ in result.bad] == [str(tmp_path / bad)]
        assert result.decodable.tolist() == [f.name == good for f in folder.files]

    class Info:
        is_main = True

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                            world_size=1)
    try:
        for _ in range(2):  # the second reads the list back
            assert _record_skipped(loader, tmp_path, Info(), None, log=None) == 1
    finally:
        dist.destroy_process_group()
    assert (tmp_path / "skipped_files.txt").read_bytes() == os.fsencode(tmp_path) + b"/cass\xe9.jpg\n"


@pytest.mark.timeout(240, method="thread")
@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_32_bit_pixels_are_refused_alike(backend, tmp_path, source):
    """Float (mode F) and 32-bit integer (mode I) TIFFs came out all black or all white
    (PIL clips) while DALI cannot decode them (32-bit values that fit in 16 bits
    included): every backend leaves them out as undecodable, naming why."""
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    _, files = source
    shutil.copy(files[0], tmp_path / "good.jpg")
    ramp = np.linspace(0, 1, 32 * 32).reshape(32, 32)
    Image.fromarray(ramp.astype(np.float32)).save(tmp_path / "float.tif")
    Image.fromarray((ramp * 2**31).astype(np.int32)).save(tmp_path / "int32.tif")
    Image.fromarray((ramp * 65535).astype(np.int32)).save(tmp_path / "int16in32.tif")
    assert {Image.open(tmp_path / n).mode for n in ("float.tif", "int32.tif", "int16in32.tif")} \
        == {"F", "I"}
    loader = build_loader(backend, tmp_path, 1, image_size=32, num_workers=0 if backend == "torch"
                          else 1, drop_last=False)
    for _ in loader:
        pass
    refused = {str(tmp_path / n) for n in ("float.tif", "int32.tif", "int16in32.tif")}
    assert set(loader.skipped_files) == refused
    assert all("unsupported pixel format: 32-bit" in loader._skipped[p] for p in refused)
