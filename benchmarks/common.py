"""What every benchmark result carries: the machine, the software, the command, the time.

A figure without its machine is not a result. Used by benchmarks/throughput.py and
benchmarks/dataloader.py.
"""
from __future__ import annotations

import contextlib
import ctypes
import datetime
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import threading
import time
from importlib import metadata
from pathlib import Path

import torch

from dmt.engine.runlock import ExclusiveLock, LockBusy
from dmt.flops import cpu_model_name

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _memory_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _cpu_flags() -> list[str]:
    """The flags that decide CPU matmul speed per dtype (AVX-512 BF16/FP16, AMX)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    return sorted(f for f in flags if f.startswith(("avx", "amx", "fma")))
    except OSError:
        pass
    return []


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT,
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_description(device: torch.device | str = "cpu") -> dict:
    device = torch.device(device)
    info = {
        "device_type": device.type,
        "cpu": cpu_model_name(),
        "cpu_cores": os.cpu_count(),
        "cpu_flags": _cpu_flags(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": _memory_gib(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {p: _version(p) for p in ("torch", "torchvision", "deepspeed", "timm",
                                               "numpy", "pillow", "nvidia-dali-cuda130", "ffcv")},
        "torch_cuda": torch.version.cuda,
        "git_commit": git_commit(),
    }
    if hasattr(os, "getloadavg"):
        # Other processes on a shared machine skew timings: say how busy it was.
        info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update({
            "gpu": props.name,
            "gpu_count": torch.cuda.device_count(),
            "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "gpu_capability": f"{props.major}.{props.minor}",
            "cudnn": torch.backends.cudnn.version(),
        })
    return info


def command_line(argv: list[str] | None = None, script: str | None = None) -> str:
    """The exact command that produced a result, runnable from the repository root."""
    script = script or os.path.relpath(os.path.abspath(sys.argv[0]), REPO_ROOT)
    return shlex.join(["python", script, *(sys.argv[1:] if argv is None else argv)])


def timestamp() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def write_json(path: Path | str, payload: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # one per writer
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)  # never leave a half-written result behind
    return path


def partial_path(out: Path) -> Path:
    """Where a run keeps what it has measured until it completes."""
    return out.with_name(out.name + ".partial")


def refuse_to_replace(out: Path, overwrite: bool) -> None:
    """A rerun does not silently replace measured results: neither a finished run's OUT nor
    an interrupted run's OUT.partial, unless --overwrite says so."""
    _check_writable(out)
    if overwrite:
        return
    for path, what in ((out, "an earlier run's results"),
                       (partial_path(out), "an interrupted run's results")):
        if path.exists():
            raise SystemExit(f"{path} holds {what} ({_describe_result(path)}): pass "
                             "--overwrite to replace them, or --out another path")


def _check_writable(out: Path) -> None:
    """An output that cannot be written is refused before the measurement, not after it."""
    if out.is_dir():
        raise SystemExit(f"--out {out} is a folder: name the result file (.json)")
    folder = next(p for p in (out.parent, *out.parent.parents) if p.exists() or p == p.parent)
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise SystemExit(f"--out {out}: cannot write in {folder}"
                         + (" (a file, not a folder)" if not folder.is_dir() else ""))


def _describe_result(path: Path) -> str:
    try:
        payload = json.loads(path.read_text())
        when = payload.get("timestamp") or payload.get("date") or "undated"
        rows = payload.get("rows")
        return f"{len(rows)} rows, {when}" if isinstance(rows, list) else when
    except (OSError, ValueError, AttributeError):
        return "unreadable"


@contextlib.contextmanager
def exclusive_output(path: Path):
    """One benchmark at a time per result file: a second run with the same output would
    overwrite the first one's rows and share its .partial file."""
    _check_writable(path)  # (the lock lives beside it)
    try:
        lock = ExclusiveLock(path.with_name(f".{path.name}.lock")).acquire()
    except LockBusy as busy:
        raise SystemExit(f"{path} is being written by another benchmark ({busy}): wait for "
                         "it, or pass another --out") from None
    if lock.unsupported:
        print(f"warning: no lock on {path} ({lock.unsupported}): make sure no other "
              "benchmark writes it", file=sys.stderr)
    try:
        yield
    finally:
        lock.release()


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def _live_heap_reader():
    """glibc's count of bytes currently allocated (heap + mmapped chunks), or None."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
    except (OSError, AttributeError):
        return None

    def read() -> int:
        info = libc.mallinfo2()
        return info.uordblks + info.hblkhd
    return read


class MemorySampler:
    """Peak host memory of this process while active, sampled every few ms: the CPU
    stand-in for torch.cuda.max_memory_allocated.

    With glibc it reads the bytes currently allocated (mallinfo2: tensors, Python objects,
    libraries), which fall when tensors are freed; process RSS does not (the allocator
    keeps freed pages), so RSS is only the fallback. Compare rows, not absolute values.
    """

    def __init__(self, interval_s: float = 0.002):
        self.interval_s = interval_s
        self.peak = 0
        self._read = _live_heap_reader()
        self.kind = ("peak allocated host bytes (glibc mallinfo2, sampled every "
                     f"{interval_s * 1e3:g} ms; includes Python and libraries)"
                     if self._read else "peak process RSS (sampled)")
        if self._read is None:
            self._read = self._rss
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def _rss(self) -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * self._page
        except OSError:
            return 0

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._read())
            time.sleep(self.interval_s)

    def __enter__(self):
        self.peak = self._read()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, self._read())
        return False


def jpeg_folder(folder, images: int, side: int, quality: int = 90) -> Path:
    """`folder` holding >= `images` ImageNet-like JPEGs (photos cut from images shipped in
    packages, longer side `side`): up to 1024 unique ones, then copies (the same decode
    cost, quicker to make). Grows a folder it made before."""
    from dmt.data import write_sample_images
    folder = Path(folder)
    unique = [f for f in sorted(folder.rglob("*.jpg")) if not f.name.startswith("copy")]
    if not unique:
        write_sample_images(folder, num_images=min(images, 1024), size=side, num_classes=8,
                            quality=quality)
        unique = sorted(folder.rglob("*.jpg"))
    for n in range(len(list(folder.rglob("*.jpg"))), images):
        src = unique[n % len(unique)]
        shutil.copyfile(src, src.with_name(f"copy{n:06d}_{src.name}"))
    return folder


def same_machine_error(a: dict, b: dict) -> str | None:
    """How two results' machines differ (None when they are the same machine)."""
    for field in ("gpu", "cpu", "device_type"):
        if a.get(field) != b.get(field):
            return f"{field} {a.get(field)!r} vs {b.get(field)!r}"
    return None
