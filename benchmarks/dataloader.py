"""Dual-view loader throughput: images/s after warm-up, CPU cores used, GPU memory.

    python benchmarks/dataloader.py --backend torch                  # CPU, generated JPEGs
    python benchmarks/dataloader.py --backend dali --device cuda --path /data/imagenet/train
    python benchmarks/dataloader.py --backend torchvision-nvjpeg --device cuda

Without --path, ImageNet-like JPEGs (longer side ~500 px, quality 90) are generated
into a temporary folder with dmt.data.write_sample_images (and converted to a .beton
for ffcv). One "image" is one sample delivered as both views. The timed batches are
split into --windows windows; images_per_s is the best window (least disturbed by
other work on the machine), each window's rate is saved too. Writes JSON to
benchmarks/results/dataloader_<backend>_<device>.json with the machine description.

torchvision-nvjpeg is a reference point, not a dmt backend: torchvision.io.decode_jpeg
on the GPU (nvJPEG), then the same crops (bicubic, antialiased) and views.
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dmt  # noqa: E402  (patches torchvision on CPU torch before it is imported)
import numpy as np  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import (RESULTS_DIR, command_line, jpeg_folder, machine_description,  # noqa: E402
                               refuse_to_replace, timestamp, write_json)
from dmt.data import build_loader  # noqa: E402
from dmt.data.augment import ViewSpec, crop_boxes, make_views  # noqa: E402
from dmt.data.folder import scan_image_folder  # noqa: E402
from dmt.data.sampling import ShardedEpochs  # noqa: E402
from dmt.errors import DMTError  # noqa: E402



class NvjpegLoader:
    """torchvision.io.decode_jpeg(device="cuda") + per-image crop/resize on the GPU."""

    def __init__(self, path, batch_size, image_size, device, seed=0):
        import torchvision.io as tio
        self.tio = tio
        self.files = [str(f) for f in scan_image_folder(path).files]
        self.plan = ShardedEpochs(len(self.files), batch_size, seed)
        self.spec = ViewSpec(image_size=image_size, seed=seed)
        self.device, self.epoch = torch.device(device), 0

    def __iter__(self):
        epoch, self.epoch = self.epoch, self.epoch + 1
        size = self.spec.image_size
        for row in self.plan.rank_batches(epoch):
            encoded = [self.tio.read_file(self.files[i]) for i in row]
            images = self.tio.decode_jpeg(encoded, mode=self.tio.ImageReadMode.RGB, device=self.device)
            heights = [im.shape[1] for im in images]
            widths = [im.shape[2] for im in images]
            boxes = crop_boxes(self.spec, epoch, row, heights, widths)
            crops = torch.cat([
                torch.nn.functional.interpolate(im[None, :, t:t + h, l:l + w].float(), size=(size, size),
                                                mode="bicubic", antialias=True, align_corners=False)
                for im, (t, l, h, w) in zip(images, boxes.tolist())]).clamp_(0, 255).div_(255)
            teacher, student = make_views(crops, self.spec, epoch, row)
            yield {"teacher": teacher, "student": student, "index": torch.from_numpy(row.copy())}


def cpu_seconds() -> float:
    """CPU time of this process and its live children (DataLoader workers, writers)."""
    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.NoSuchProcess:
            pass
    return total


def endless(loader):
    while True:
        yield from loader


def prepare_dataset(args, workdir: Path):
    """Returns (path to pass to the loader, description of the data)."""
    if args.backend == "synthetic":
        return args.path, {"kind": "synthetic", "samples": args.path or "ImageNet-1k size"}
    if args.path:
        return args.path, {"kind": "given", "path": str(args.path)}
    folder = jpeg_folder(workdir / "images", args.num_images, args.image_side, quality=90)
    unique = min(args.num_images, 1024)
    sizes = [os.path.getsize(f) for f in folder.rglob("*.jpg")]
    description = {"kind": "generated JPEGs (dmt.data.write_sample_images)", "images": args.num_images,
                   "unique_images": unique, "longer_side_px": f"{args.image_side} +-10%",
                   "jpeg_quality": 90, "mean_file_kib": round(float(np.mean(sizes)) / 1024, 1)}
    if args.backend != "ffcv":
        return folder, description
    from dmt.data.beton import write_beton
    beton = workdir / "images.beton"
    write_beton(folder, beton, quality=90, num_workers=args.num_workers)
    description["beton"] = "jpg mode, quality 90, original sizes"
    return beton, description


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", required=True,
                        choices=("torch", "dali", "ffcv", "synthetic", "torchvision-nvjpeg"))
    parser.add_argument("--path", default=None, help="folder, .beton or sample count (default: generate)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=None, help="default 32 on CPU, 256 on CUDA")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--num-workers", type=int, default=None, help="default: the backend's")
    parser.add_argument("--warmup", type=int, default=5, help="batches not timed")
    parser.add_argument("--batches", type=int, default=60, help="batches timed")
    parser.add_argument("--windows", type=int, default=3,
                        help="timed windows; images_per_s is the best one")
    parser.add_argument("--num-images", type=int, default=1024, help="generated images")
    parser.add_argument("--image-side", type=int, default=500, help="longer side of generated images")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/...)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the result already at --out; without it such a run is "
                             "refused")
    args = parser.parse_args(argv)
    for flag, least in (("batches", 1), ("windows", 1), ("warmup", 0), ("batch_size", 1),
                        ("image_size", 16), ("num_images", 1), ("num_workers", 0),
                        ("image_side", 16)):
        value = getattr(args, flag)
        if value is not None and value < least:
            parser.error(f"--{flag.replace('_', '-')} must be at least {least}, got {value}")
    if args.num_workers == 0 and args.backend in ("ffcv", "dali"):  # (0: torch's in-process)
        parser.error(f"--num-workers 0: {args.backend} decodes in worker threads; give at "
                     "least 1, or leave it out for the backend's default")

    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device {args.device}: expected cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available on this machine")
    if args.backend == "torchvision-nvjpeg" and device.type != "cuda":
        parser.error("torchvision-nvjpeg decodes on the GPU: pass --device cuda")
    out = Path(args.out) if args.out else RESULTS_DIR / f"dataloader_{args.backend}_{device.type}.json"
    refuse_to_replace(out, args.overwrite)  # before minutes of measuring, not after
    try:
        return measure(args, device, out, argv)
    except DMTError as err:  # a diagnosis, not a crash: one line, as the launch/ scripts do
        parser.exit(2, f"benchmarks/dataloader.py: error: {err}\n")


def measure(args, device: torch.device, out: Path, argv=None) -> dict:
    batch_size = args.batch_size or (256 if device.type == "cuda" else 32)
    machine = machine_description(device)

    with tempfile.TemporaryDirectory(prefix="dmt_loader_bench_") as tmp:
        path, dataset = prepare_dataset(args, Path(tmp))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            free0, total = torch.cuda.mem_get_info(device)
        start = time.perf_counter()
        if args.backend == "torchvision-nvjpeg":
            loader = NvjpegLoader(path, batch_size, args.image_size, device)
        else:
            loader = build_loader(args.backend, path, batch_size, image_size=args.image_size,
                                  device=device, num_workers=args.num_workers)
        build_s = time.perf_counter() - start
        batches = endless(loader)
        for _ in range(args.warmup):
            next(batches)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        # Timed in windows: on a shared machine the best window is the least disturbed.
        rates, cpu0, t0 = [], cpu_seconds(), time.perf_counter()
        per_window = max(1, args.batches // args.windows)
        for _ in range(args.windows):
            start = time.perf_counter()
            for _ in range(per_window):
                batch = next(batches)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            rates.append(per_window * batch_size / (time.perf_counter() - start))
        elapsed, cpu_used = time.perf_counter() - t0, cpu_seconds() - cpu0
        assert batch["teacher"].shape == (batch_size, 3, args.image_size, args.image_size)

        result = {
            "benchmark": "dataloader",
            "backend": args.backend, "device": str(device), "batch_size": batch_size,
            "image_size": args.image_size, "num_workers": args.num_workers,
            "warmup_batches": args.warmup, "timed_batches": per_window * args.windows,
            "images_per_s": round(max(rates), 1),
            "images_per_s_windows": [round(r, 1) for r in rates],
            "images_per_s_overall": round(per_window * args.windows * batch_size / elapsed, 1),
            "seconds_timed": round(elapsed, 3), "build_s": round(build_s, 2),
            "cpu_cores_used": round(cpu_used / elapsed, 2),
            "dataset": dataset, "machine": machine,
            "command": command_line(argv, script="benchmarks/dataloader.py"),
            "date": timestamp(),
        }
        if device.type == "cuda":
            free1, _ = torch.cuda.mem_get_info(device)
            result["gpu_memory"] = {
                "torch_peak_allocated_mib": round(torch.cuda.max_memory_allocated(device) / 2**20, 1),
                "device_used_increase_mib": round((free0 - free1) / 2**20, 1),  # includes DALI/nvJPEG pools
                "device_total_mib": round(total / 2**20, 1)}
        result["machine"]["load_average_at_end"] = list(os.getloadavg())
        del batches, loader

    write_json(out, result)
    gpu = f", GPU memory {result['gpu_memory']}" if "gpu_memory" in result else ""
    print(f"{args.backend} on {device}: {result['images_per_s']} dual-view images/s, "
          f"{result['cpu_cores_used']} CPU cores{gpu} -> {out}")
    return result


if __name__ == "__main__":
    main()
