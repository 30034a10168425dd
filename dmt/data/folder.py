"""Scan an image folder: class subfolders (ImageNet layout) or a flat folder.

Files are kept by extension only; whether they decode is checked elsewhere
(dmt.data.images), because that costs a read of every file.
"""
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from dmt.errors import DataError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


@dataclass(frozen=True)
class ImageFolder:
    root: Path
    # [Path], the same order on every machine: class by class; in a folder its own files
    # by name, then its subfolders by name (a walk, not a sort of the relative paths)
    files: list
    labels: list   # [int], index into `classes` (0 everywhere for a flat folder)
    classes: list  # [str], sorted subfolder names; [""] for a flat folder

    def __len__(self):
        return len(self.files)


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _images_under(directory: Path) -> list:
    """Linked folders are followed, each real folder once: a link back up the tree would
    otherwise list its images again and again, or never end."""
    found, seen, revisits = [], set(), []
    for dirpath, dirnames, filenames in os.walk(directory, followlinks=True):
        info = os.stat(dirpath)
        if (info.st_dev, info.st_ino) in seen:
            revisits.append(dirpath)
            dirnames[:] = []
            continue
        seen.add((info.st_dev, info.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [Path(dirpath) / f for f in sorted(filenames) if _is_image(f)]
    if revisits:
        log.warning("%s: %d linked folder(s) lead to a folder already read, e.g. %s: read once",
                    directory, len(revisits), revisits[0])
    return found


def scan_image_folder(path) -> ImageFolder:
    """Every image under `path`; immediate subfolders holding images are classes.

    Raises DataError naming the path when it is missing, not a folder, or holds no
    image files.
    """
    root = Path(path).expanduser()
    if not root.exists():
        raise DataError(f"image folder {str(root)!r} does not exist")
    if not root.is_dir():
        raise DataError(f"{str(root)!r} is not a folder of images")
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    per_class = [(d.name, _images_under(d)) for d in subdirs]
    per_class = [(name, files) for name, files in per_class if files]
    loose = sorted(p for p in root.iterdir() if p.is_file() and _is_image(p.name))

    if per_class:
        if loose:
            log.warning("%s: ignoring %d image(s) beside the class subfolders, e.g. %s",
                        root, len(loose), loose[0].name)
        classes = [name for name, _ in per_class]
        files = [f for _, fs in per_class for f in fs]
        labels = [c for c, (_, fs) in enumerate(per_class) for _ in fs]
    else:
        classes, files, labels = [""], loose, [0] * len(loose)
    if not files:
        raise DataError(f"image folder {str(root)!r} holds no image files "
                        f"(looked for {', '.join(IMAGE_EXTENSIONS)})")
    return ImageFolder(root=root, files=files, labels=labels, classes=classes)
