"""Decoding with PIL: anything decodable becomes RGB; anything else is 'undecodable'.

Used by the torch backend at run time, and up front by the DALI backend (through
dmt.data.probe: sharded across ranks, cached) and the .beton writer, which cannot skip
a file once their pipelines run.
"""

import struct
import zlib

import numpy as np
from PIL import Image

# What a bad file can raise inside PIL: UnidentifiedImageError and truncation are
# OSErrors; broken headers give SyntaxError/ValueError; odd encoders others.
UNDECODABLE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError,
                      KeyError, Image.DecompressionBombError)


# Formats that hold at most 16 bits per sample, though PIL opens them as mode I (32-bit):
# 16-bit PGM/PPM, and 16-bit PNG on Pillow < 10.3.
_SIXTEEN_BIT_AS_I = ("PNG", "PPM")


def _is_16_bit(image: Image.Image) -> bool:
    return image.mode.startswith("I;16") or (image.mode == "I"
                                             and image.format in _SIXTEEN_BIT_AS_I)


# What the content of a file may be, whatever its name says: the formats of the listed
# extensions (dmt.data.folder) that DALI decodes too, plus the JPEG variants MPO (camera
# multi-picture JPEG) and JPEG 2000. A GIF, ICO or TGA saved as .jpg decodes in PIL but
# stops a DALI pipeline mid-run: refused by every backend, so they all serve the same files.
READABLE_FORMATS = ("JPEG", "MPO", "PNG", "BMP", "TIFF", "WEBP", "PPM", "JPEG2000")


def check_readable(image: Image.Image) -> None:
    """Raises ValueError for a file whose content is not one of READABLE_FORMATS or whose
    pixels are 32-bit (check_pixel_format)."""
    if image.format not in READABLE_FORMATS:
        raise ValueError(f"{image.format or 'unknown'} content, whatever the file name says: "
                         f"dmt reads {', '.join(READABLE_FORMATS)}; convert the file")
    check_pixel_format(image)


def check_png_checksums(path) -> None:
    """Raises ValueError when a critical chunk of a PNG (IHDR, PLTE, IDAT, IEND) fails its
    CRC, or the file ends before its IEND chunk: PIL decodes such a file without checking,
    libpng (DALI) stops the pipeline on it. (A file cut inside its image data never gets
    here: PIL's decode fails on it.)"""
    with open(path, "rb") as f:
        data = memoryview(f.read())
    at = 8  # after the signature
    while at + 12 <= len(data):
        size, kind = struct.unpack(">I4s", data[at:at + 8])
        end = at + 8 + size
        if end + 4 > len(data):
            break
        critical = not kind[0] & 0x20  # an upper-case first letter
        if critical and zlib.crc32(data[at + 4:end]) != struct.unpack(">I", data[end:end + 4])[0]:
            raise ValueError(f"PNG chunk {kind.decode('latin-1')} at byte {at} fails its CRC "
                             "check: the file is corrupt")
        if kind == b"IEND":
            return
        at = end + 4
    # PIL stops reading once the pixels are in, so a file cut after them, or inside the
    # last IDAT's CRC, decodes in PIL; libpng reads that CRC (and, in png_read_end, on to
    # IEND) and fails. Truncated, as a file cut in its pixels: left out on every backend.
    raise ValueError(f"PNG ends at byte {len(data)}, before its IEND chunk: the file is cut "
                     "short")


def check_pixel_format(image: Image.Image) -> None:
    """Raises ValueError for 32-bit float (mode F) or integer (mode I) pixels. PIL's
    conversion clips them (all black or all white) and DALI cannot decode 32-bit TIFFs:
    refused here, every backend leaves such a file out as undecodable, saying why."""
    if image.mode in ("F", "I") and not _is_16_bit(image):
        kind = "floating-point" if image.mode == "F" else "integer"
        raise ValueError(f"unsupported pixel format: 32-bit {kind} (PIL mode {image.mode}); "
                         "convert such images to 8 or 16 bits")


def to_rgb(image: Image.Image) -> Image.Image:
    """Greyscale, CMYK, palette and alpha images -> RGB (alpha is dropped, not blended).
    16-bit greyscale (PNG, TIFF) is scaled to 8 bits, as DALI does; PIL's own conversion
    clips it, which turns such an image white. 32-bit pixels raise ValueError."""
    if image.mode == "RGB":
        return image
    check_pixel_format(image)
    if _is_16_bit(image):
        wide = np.asarray(image).astype(np.float32)
        image = Image.fromarray((wide / 257.0 + 0.5).astype(np.uint8), "L")
    if image.mode in ("P", "PA") and "transparency" in image.info:
        image = image.convert("RGBA")  # avoids PIL's palette-transparency warning
    return image.convert("RGB")


def open_rgb(path) -> Image.Image:
    """Fully decoded RGB image; raises one of UNDECODABLE_ERRORS for a bad file."""
    with Image.open(path) as image:
        check_readable(image)
        image.load()
        if image.format == "PNG":
            check_png_checksums(path)
        return to_rgb(image)


def probe_image(path) -> tuple:
    """(height, width) of a decodable image, else raises one of UNDECODABLE_ERRORS.

    Why a decode and not just the header: a truncated JPEG has a valid header. JPEGs
    are decoded at 1/8 scale (DCT scaling), which still reads every entropy-coded
    byte but skips most of the arithmetic, so the check costs a fraction of a decode.
    """
    with Image.open(path) as image:
        check_readable(image)
        width, height = image.size
        if image.format in ("JPEG", "MPO"):  # MPO: a camera's JPEG with extra frames
            image.draft("RGB", (max(1, width // 8), max(1, height // 8)))
        image.load()
        if image.format == "PNG":
            check_png_checksums(path)
    if width < 1 or height < 1:
        raise ValueError("image has no pixels")
    return height, width


def probe_one(path) -> tuple:
    """(size, None, True) for a decodable image, else (None, reason, lasting).

    lasting is False for an OS-level failure to read the file (permissions, an I/O
    error, a file that vanished: errors carrying an errno), which a later attempt may
    not repeat; PIL's own verdicts (unidentified, truncated, broken) carry no errno.
    """
    try:
        return probe_image(path), None, True
    except UNDECODABLE_ERRORS as error:
        lasting = not (isinstance(error, OSError) and error.errno is not None)
        return None, f"{type(error).__name__}: {error}", lasting
