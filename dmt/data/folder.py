"""Scan an image folder: class subfolders (ImageNet layout) or a flat folder.

Files are kept by extension only; whether they decode is checked elsewhere
(dmt.data.images), because that costs a read of every file.
"""
import logging
import os
import stat
from dataclasses import dataclass, field
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


@dataclass
class _Scan:
    """What one scan shares across all its folders: each real folder is read once in the
    whole scan (a link from one class into another, or back up to the root, must not list
    those images again under another label), and what it left out is reported once."""
    seen: set = field(default_factory=set)         # (st_dev, st_ino) of folders read
    revisits: list = field(default_factory=list)   # linked folders leading to one of those
    unreadable: list = field(default_factory=list)  # (folder, why) that could not be listed
    special: list = field(default_factory=list)    # image-named FIFOs, sockets, devices

    def first_visit(self, folder: str) -> bool:
        try:
            info = os.stat(folder)
        except OSError as error:
            self.unreadable.append((folder, error.strerror or str(error)))
            return False
        key = (info.st_dev, info.st_ino)
        if key in self.seen:
            self.revisits.append(folder)
            return False
        self.seen.add(key)
        return True

    def report(self, root: Path) -> None:
        if self.revisits:
            log.warning("%s: %d linked folder(s) lead to a folder already read in this scan, "
                        "e.g. %r: its images are listed once", root, len(self.revisits),
                        self.revisits[0])
        if self.unreadable:
            log.warning("%s: %d folder(s) cannot be listed and are left out: %s", root,
                        len(self.unreadable), _some(f"{f!r} ({why})" for f, why in self.unreadable))
        if self.special:
            log.warning("%s: %d image-named entries are not files (FIFOs, sockets, devices) "
                        "and are left out: %s", root, len(self.special),
                        _some(repr(p) for p in self.special))


def _some(names, limit=5) -> str:
    names = list(names)
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


# What a folder entry is, links followed.
_DIR, _FILE, _BROKEN, _SPECIAL = "dir", "file", "broken", "special"


def _entry_kind(entry: os.DirEntry) -> str:
    try:
        if entry.is_dir():
            return _DIR
        if entry.is_file():
            return _FILE
        os.stat(entry.path)
        return _SPECIAL  # exists, yet neither: opening a FIFO would block forever
    except OSError:  # a broken link, a link loop: listed, so that reading it is a counted skip
        return _BROKEN


def _list(folder: str, scan: _Scan) -> tuple:
    """(image files, subfolders) of one folder, each by name; hidden entries left out.
    Raises OSError when the folder cannot be listed."""
    with os.scandir(folder) as listing:
        entries = sorted(listing, key=lambda e: e.name)
    files, subdirs = [], []
    for entry in entries:
        if entry.name.startswith("."):
            continue
        kind = _entry_kind(entry)
        if kind == _DIR:
            subdirs.append(entry.path)
        elif _is_image(entry.name):
            if kind == _SPECIAL:
                scan.special.append(entry.path)
            else:
                files.append(Path(entry.path))
    return files, subdirs


def _images_under(directory: str, scan: _Scan) -> list:
    """A folder's images, then each subfolder's (by name, depth first), links followed."""
    found, stack = [], [directory]
    while stack:
        folder = stack.pop()
        try:
            files, subdirs = _list(folder, scan)
        except OSError as error:  # os.walk would drop it silently
            scan.unreadable.append((folder, error.strerror or str(error)))
            continue
        found += files
        # Marked as read when found: a link deeper down to a sibling yields to the sibling.
        stack += reversed([d for d in subdirs if scan.first_visit(d)])
    return found


def _check_root(root: Path) -> None:
    try:
        info = os.stat(root)
    except (FileNotFoundError, NotADirectoryError):
        raise DataError(f"image folder {str(root)!r} does not exist") from None
    except OSError as error:
        raise DataError(f"image folder {str(root)!r} cannot be reached: {error.strerror}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise DataError(f"{str(root)!r} is not a folder of images")


def scan_image_folder(path) -> ImageFolder:
    """Every image under `path`; immediate subfolders holding images are classes.

    Raises DataError naming the path when it is missing, not a folder, cannot be listed,
    or holds no image files. Subfolders that cannot be listed are left out with a warning.
    """
    root = Path(path).expanduser()
    _check_root(root)
    scan = _Scan()
    try:
        loose, subdirs = _list(str(root), scan)
    except OSError as error:
        raise DataError(f"image folder {str(root)!r} cannot be listed: {error.strerror}") from None
    scan.first_visit(str(root))
    # Classes first: a link inside one class to another class's folder is that class's.
    classes = [d for d in subdirs if scan.first_visit(d)]
    per_class = [(os.path.basename(d), _images_under(d, scan)) for d in classes]
    per_class = [(name, files) for name, files in per_class if files]
    scan.report(root)

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
