"""Which files of an image folder decode, and their sizes: probed once, shared, remembered.

The DALI backend needs this before its pipeline runs (dmt.data.images.probe_one: header +
a 1/8-scale decode). On ImageNet that is 1.28 M files; probed by every rank at every
launch it cost minutes and W times the IO. So the probe is

- sharded: with torch.distributed initialised and more than one rank, rank r probes
  files r, r + W, r + 2W, ... of the scan order, and all_gather_object hands every rank
  the whole, identical result. The first probe of a folder in a process is therefore a
  collective over the default group, made by every rank: the trainer builds its loaders
  on every rank, student and teacher alike. Later probes of that folder in the process
  reuse the result without a collective, because a dedicated teacher rank builds one
  loader per student it serves while a student builds one (a second collective there
  would deadlock). `shard=False` opts out, for loaders built on some ranks only.
  A rank that fails (probe_image_folder: its scan too, e.g. the folder is missing on its
  node) still joins the gather with its error, so every rank raises the same DataError
  naming it, rather than the others waiting until the process group's timeout.
- cached: the result is kept in a JSON index keyed by each file's path relative to the
  folder, its size in bytes and its mtime (ns). A later launch probes only new or changed
  files and drops removed ones. Global rank 0 writes it, atomically (temp file +
  os.replace); a corrupt or unreadable index is ignored with a warning.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch.distributed as dist

from dmt.data import images
from dmt.data.folder import ImageFolder, scan_image_folder
from dmt.errors import ConfigError, DataError

log = logging.getLogger(__name__)

CACHE_NAME = ".dmt_probe_cache.json"  # a dot-file: scan_image_folder never lists it
_FORMAT, _VERSION = "dmt-probe-cache", 3  # 2: READABLE_FORMATS; 3: PNGs cut before IEND
_OFF = ("off", "none", "null", "false", "")
_COLUMNS = ("bytes", "mtime_ns", "height", "width")
_CHUNK = 64  # files per thread-pool task

# folder root -> (fingerprint of its file list, ProbeResult) of this process's collective probe
_SHARED: dict = {}


@dataclass(frozen=True)
class ProbeResult:
    heights: np.ndarray  # int64 [N], the folder's file order; 0 for an undecodable file
    widths: np.ndarray   # int64 [N]
    bad: list            # [(path, reason)] of the undecodable files, in file order
    probed: int          # files decoded by this call, all ranks together (others: cache)

    @property
    def decodable(self) -> np.ndarray:
        return self.heights > 0


def cache_path(root, setting="auto") -> Path | None:
    """The probe index file for folder `root`; None when caching is off.

    "auto" (or true): <root>/.dmt_probe_cache.json when root is writable, else
    $XDG_CACHE_HOME/dmt/ (~/.cache/dmt/) under a name made from root's absolute path
    (also used when writing in root fails after all, see _cache_paths).
    null, false, "off": no cache. Any other string: that file.
    """
    if setting is None or setting is False:
        return None
    if setting is not True and not isinstance(setting, (str, os.PathLike)):
        raise ConfigError(f"probe_cache must be 'auto', 'off' or a file path, got {setting!r}")
    if isinstance(setting, str) and setting.strip().lower() in _OFF:
        return None
    root = Path(root).expanduser()
    if _is_auto(setting):
        return root / CACHE_NAME if os.access(root, os.W_OK) else _user_cache_path(root)
    return Path(setting).expanduser()


def _is_auto(setting) -> bool:
    return setting is True or (isinstance(setting, str) and setting.strip().lower() == "auto")


def _user_cache_path(root: Path) -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "dmt"
    digest = hashlib.sha1(os.fsencode(root.resolve())).hexdigest()[:16]
    return base / f"probe_{root.name}_{digest}.json"


def _cache_paths(root: Path, setting) -> tuple:
    """(the index to read and write, where to write it instead if that fails).

    Under "auto", os.access can call a folder writable that is not (root-squashed NFS).
    The index then goes to the user's cache dir, and later launches read it from there
    rather than failing, and warning, at every launch.
    """
    path = cache_path(root, setting)
    if not _is_auto(setting) or path != root / CACHE_NAME:
        return path, None
    fallback = _user_cache_path(root)
    if not path.exists() and fallback.exists():
        return fallback, None
    return path, fallback


class _Index:
    """A loaded probe index: relative path -> its row of (bytes, mtime_ns, height, width)."""

    def __init__(self, files=(), table=None, reasons=None):
        self.rows = {rel: i for i, rel in enumerate(files)}
        self.table = table if table is not None else np.zeros((0, 4), np.int64)
        self.reasons = reasons or {}  # row -> why that file does not decode

    def __len__(self):
        return len(self.rows)

    def lookup(self, rel: str, size: int, mtime_ns: int):
        """(height, width, reason) when the file is indexed with this size and mtime."""
        row = self.rows.get(rel)
        if row is None:
            return None
        nbytes, mtime, height, width = self.table[row].tolist()
        if nbytes != size or mtime != mtime_ns:
            return None
        return height, width, self.reasons.get(row)

    @classmethod
    def from_json(cls, data) -> _Index:
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            raise ValueError("not a dmt probe cache")
        if data.get("version") != _VERSION:
            raise ValueError(f"version {data.get('version')!r}, this dmt writes {_VERSION}")
        files = data["files"]
        if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
            raise ValueError("'files' is not a list of paths")
        table = np.stack([np.asarray(data[c], dtype=np.int64).reshape(-1) for c in _COLUMNS], 1) \
            if files else np.zeros((0, 4), np.int64)
        if len(table) != len(files) or any(len(data[c]) != len(files) for c in _COLUMNS):
            raise ValueError("columns of different lengths")
        reasons = {int(row): str(why) for row, why in data["reasons"].items()}
        if any(not 0 <= row < len(files) for row in reasons):
            raise ValueError("a reason for a row that does not exist")
        return cls(files, table, reasons)


def _load_index(path: Path | None) -> _Index:
    if path is None or not path.exists():
        return _Index()
    try:
        with open(path, encoding="utf-8") as f:
            return _Index.from_json(json.load(f))
    except Exception as error:  # noqa: BLE001  (any damage: re-probe, never a crash)
        log.warning("ignoring the probe cache %s (%s: %s); probing the files again", path,
                    type(error).__name__, error)
        return _Index()


def _write_index(path: Path, rels: list, table: np.ndarray, keep: np.ndarray,
                 reasons: dict) -> None:
    """Atomically: readers see the old index or the new one, never half of one."""
    rows = np.flatnonzero(keep)
    data = {"format": _FORMAT, "version": _VERSION, "files": [rels[i] for i in rows],
            **{c: table[rows, k].tolist() for k, c in enumerate(_COLUMNS)},
            "reasons": {str(j): reasons[i][0] for j, i in enumerate(rows.tolist()) if i in reasons}}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    # Mode 0o666 minus the umask, as for any new file: other jobs on the folder read it
    # too (mkstemp would make it private).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, separators=(",", ":"))
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _relative_paths(folder: ImageFolder) -> list:
    prefix = str(folder.root).rstrip(os.sep) + os.sep
    return [s[len(prefix):] if s.startswith(prefix) else os.path.relpath(s, folder.root)
            for s in map(str, folder.files)]


def _fingerprint(rels: list) -> str:
    # os.fsencode: a name that is not valid UTF-8 (Python holds its bytes as surrogates)
    # hashes as the bytes it is; .encode() would raise on it.
    return hashlib.sha1(b"\n".join(map(os.fsencode, rels))).hexdigest()


class _Probed(NamedTuple):
    """One file's outcome."""
    nbytes: int        # -1: the file could not even be stat'ed
    mtime_ns: int
    height: int        # 0 (and width 0) when it does not decode
    width: int
    reason: str | None  # why it does not decode
    lasting: bool      # the outcome may be cached (not an OS-level read failure)
    decoded: bool      # probed now, not taken from the index


def _probe_file(path, rel: str, index: _Index) -> _Probed:
    try:
        st = os.stat(path)
    except OSError as error:
        return _Probed(-1, -1, 0, 0, f"{type(error).__name__}: {error}", False, False)
    hit = index.lookup(rel, st.st_size, st.st_mtime_ns)
    if hit is not None:
        height, width, reason = hit
        return _Probed(st.st_size, st.st_mtime_ns, height, width, reason, True, False)
    size, reason, lasting = images.probe_one(path)
    height, width = size or (0, 0)
    return _Probed(st.st_size, st.st_mtime_ns, height, width, reason, lasting, True)


def _probe_shard(folder: ImageFolder, rels: list, rows: list, index: _Index,
                 num_threads: int) -> dict:
    """This rank's rows, probed (threads: stat latency and PIL both release the GIL).

    Rows go to the threads in chunks: one future per file would cost ~1 KB each on
    ImageNet-sized folders.
    """
    def probe_chunk(chunk):
        return [_probe_file(folder.files[i], rels[i], index) for i in chunk]

    chunks = [rows[i:i + _CHUNK] for i in range(0, len(rows), _CHUNK)]
    with ThreadPoolExecutor(max(1, num_threads)) as pool:
        out = [o for done in pool.map(probe_chunk, chunks) for o in done]
    table = np.array([(o.nbytes, o.mtime_ns, o.height, o.width) for o in out],
                     dtype=np.int64).reshape(-1, 4)
    reasons = {i: (o.reason, o.lasting) for i, o in zip(rows, out) if o.reason is not None}
    return {"table": table, "reasons": reasons, "decoded": sum(o.decoded for o in out)}


def _gather(part: dict, distributed: bool) -> list:
    if not distributed:
        return [part]
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, part)
    return parts


def _check_parts(parts: list, root) -> None:
    """The same verdict on every rank: each sees every rank's error and fingerprint."""
    for rank, part in enumerate(parts):
        if "error" in part:
            raise DataError(f"probing image folder {str(root)!r} failed on rank {rank}: "
                            f"{part['error']}")
    counts = {(p["fingerprint"], p["files"]) for p in parts}
    if len(counts) > 1:
        raise DataError(f"ranks list different files in image folder {str(root)!r} (file "
                        f"counts {[p['files'] for p in parts]}): is it being written to? "
                        "Every rank must see the same folder.")


def _assemble(parts: list, n: int) -> tuple:
    world = len(parts)
    table, reasons = np.zeros((n, 4), np.int64), {}
    for rank, part in enumerate(parts):
        table[rank::world] = part["table"]  # rank r probed rows r, r + W, ...
        reasons.update(part["reasons"])
    return table, reasons, sum(p["decoded"] for p in parts)


def _is_writer() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _save(path: Path | None, fallback: Path | None, index: _Index, rels: list,
          table: np.ndarray, reasons: dict, decoded: int) -> None:
    keep = table[:, 0] >= 0
    for row, (_, lasting) in reasons.items():
        keep[row] &= lasting
    # Unchanged when nothing was decoded and no indexed file went away: keep the file.
    if path is None or not _is_writer() or (decoded == 0 and len(index) == int(keep.sum())):
        return
    try:
        _write_index(path, rels, table, keep, reasons)
        return
    except OSError as error:
        failed = error
    if fallback is not None:
        try:
            _write_index(fallback, rels, table, keep, reasons)
            log.info("could not write the probe cache %s (%s); wrote %s, which later launches "
                     "read instead", path, failed, fallback)
            return
        except OSError as error:
            path, failed = fallback, error
    log.warning("could not write the probe cache %s (%s); the next launch probes again",
                path, failed)


def probe_folder(folder: ImageFolder, cache="auto", num_threads: int = 8,
                 shard: bool = True) -> ProbeResult:
    """Sizes of the folder's files and the undecodable ones, identical on every rank.

    cache: see cache_path. shard: split the probe across the ranks of the default
    process group (a collective: every rank must call this, see the module docstring).
    """
    return _probe(lambda: folder, str(folder.root), cache, num_threads, shard)[1]


def probe_image_folder(path, cache="auto", num_threads: int = 8,
                       shard: bool = True) -> tuple[ImageFolder, ProbeResult]:
    """scan_image_folder(path) and probe_folder of it, the scan inside the collective: a
    rank whose scan fails (the folder missing on its node, say) still joins the exchange,
    so every rank raises the same DataError rather than the others waiting for it until
    the process group's timeout."""
    root = str(Path(path).expanduser())  # scan_image_folder's root: the key of _SHARED
    return _probe(lambda: scan_image_folder(path), root, cache, num_threads, shard)


def _probe(scan, root: str, cache, num_threads: int, shard: bool) -> tuple:
    start = time.perf_counter()
    distributed = (shard and dist.is_available() and dist.is_initialized()
                   and dist.get_world_size() > 1)
    shared = _SHARED.get(root) if distributed else None
    if shared is not None:
        # Probed together earlier in this process (e.g. a dedicated teacher rank's next
        # loader): the other ranks make no second collective, so neither does this one.
        distributed = False
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    # Anything that can fail on one rank only runs here: the others wait in the gather.
    try:
        folder = scan()
        rels = _relative_paths(folder)
        fingerprint = _fingerprint(rels)
        if shared is not None and shared[0] == fingerprint:
            return folder, shared[1]
        # (a changed folder is probed here alone, as no other rank does)
        path, fallback = _cache_paths(folder.root, cache)
        index = _load_index(path)
        part = _probe_shard(folder, rels, list(range(rank, len(rels), world)), index,
                            num_threads)
        part.update(fingerprint=fingerprint, files=len(rels))
    except Exception as error:  # noqa: BLE001  (the other ranks wait in the collective)
        if not distributed:
            raise
        part = {"error": f"{type(error).__name__}: {error}"}
    parts = _gather(part, distributed)
    _check_parts(parts, root)  # raises on every rank if any failed: the names below exist
    table, reasons, decoded = _assemble(parts, len(rels))
    _save(path, fallback, index, rels, table, reasons, decoded)
    result = ProbeResult(heights=table[:, 2].copy(), widths=table[:, 3].copy(),
                         bad=[(str(folder.files[i]), reasons[i][0]) for i in sorted(reasons)],
                         probed=decoded)
    if distributed:
        _SHARED[root] = (fingerprint, result)
    log.info("%s: probed %d of %d file(s) on %d rank(s), %d from the cache %s, in %.1f s",
             root, decoded, len(rels), world, len(rels) - decoded, path or "(off)",
             time.perf_counter() - start)
    return folder, result
