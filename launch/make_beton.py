#!/usr/bin/env python
"""Convert an image folder (class subfolders or flat) into an FFCV .beton.

    python launch/make_beton.py /data/imagenet/train /data/imagenet_train.beton --max-side 512

Undecodable files (corrupt, truncated, empty, not images) are left out and listed;
greyscale, CMYK and RGBA images are stored as RGB. Prints a summary. Exits 2, as dmt's
other tools do, with one line naming the culprit when the folder is missing, empty or
holds nothing decodable, or the output cannot be written.
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dmt  # noqa: E402  (patches torchvision on CPU torch before anything imports it)
from dmt.data.beton import write_beton  # noqa: E402
from dmt.errors import DMTError  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", help="image folder (class subfolders or flat)")
    parser.add_argument("out", help="output .beton path")
    parser.add_argument("--max-side", type=int, default=None,
                        help="shrink images whose longer side exceeds this (default: keep)")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality of stored images")
    parser.add_argument("--write-mode", choices=("jpg", "raw", "smart"), default="jpg",
                        help="FFCV storage: re-encoded JPEG (default), raw pixels, or smart")
    parser.add_argument("--workers", type=int, default=None, help="writer processes (default: all cores)")
    parser.add_argument("--probe-cache", default="auto",
                        help="probe index shared with the DALI backend: auto (default: "
                             "<src>/.dmt_probe_cache.json, else ~/.cache/dmt/), a file, or off")
    args = parser.parse_args(argv)
    if args.max_side is not None and args.max_side < 1:
        parser.error(f"--max-side must be a positive number of pixels, got {args.max_side}")
    if not 1 <= args.quality <= 100:
        parser.error(f"--quality must be in 1..100, got {args.quality}")
    if args.workers is not None and args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}")

    start = time.time()
    try:
        report = write_beton(args.src, args.out, max_side=args.max_side, quality=args.quality,
                             write_mode=args.write_mode, num_workers=args.workers,
                             probe_cache=args.probe_cache)
    except DMTError as error:
        print(f"make_beton: error: {error}", file=sys.stderr)
        return 2
    size_mb = report.path.stat().st_size / 2**20
    classes = f"{len(report.classes)} class" + ("es" if len(report.classes) != 1 else "")
    print(f"wrote {report.written} images ({classes}) to {_printable(str(report.path))} "
          f"({size_mb:.1f} MiB) in {time.time() - start:.1f}s")
    total = report.written + len(report.skipped)
    print(f"probed {report.probed} of {total} file(s) ({total - report.probed} known from "
          "the probe cache)")
    print(f"skipped {len(report.skipped)} unreadable file(s)")
    for path, reason in report.skipped:
        print(f"  skipped {_printable(path)}: {_printable(reason)}")
    return 0


def _printable(text: str) -> str:
    """A file name that is not valid UTF-8 (its bytes held as surrogates) as \\xNN
    escapes: printed as it is, it would stop a UTF-8 terminal's print."""
    return text.encode(errors="surrogateescape").decode(errors="backslashreplace")


if __name__ == "__main__":
    sys.exit(main())
