"""Images/s, CPU time per image and peak memory of the input pipelines on the same shards: our DALI CPU
loader (and, for comparison, the same loader with DALI's resize instead of torch's: ``torch_resize=False``),
our PIL fallback (``backend="torch"``), a torchvision ImageFolder-style DataLoader with worker
processes (PIL decode and transforms: the baseline) and the same DataLoader with ``decode_jpeg`` and
``transforms.v2`` on uint8 tensors (torch's resize kernels, which our CPU loader also uses).

Suite ``loaders`` (default): all of them do the fine-tuning train transform without RandAugment/erasing:
RandomResizedCrop 224 bicubic + flip + normalize, batches of ``--batch``, on ``--threads`` CPU threads /
workers. Suites ``jitter`` (DALI CPU) and ``jitter_pil`` (PIL fallback): the cost of the pre-training
colour jitter, our pre-training loader (student view 224 bicubic, block masks) with
``SampledViews(color_jitter=0)`` against 0.4. Suite ``checksums``: the cost of the per-sample CRC32 check on
every read, the DALI CPU fine-tuning loader with the manifest's checksums against the same loader with them
dropped (unchecked, as manifests written before them).

The images are the demo set (scikit-image photos cropped and rescaled, sides ``--min-side``..``--max-side``),
written as shards once under ``--work``. Each measurement runs in a fresh process, so peak RSS is its own;
the pipelines take turns, ``--repeats`` rounds, and the table reports each one's median. The CPU time counts
every thread of the process and of its worker processes, so it shows the cost of an image independently of
other load on the machine; images/s needs an idle machine (the 1-minute load average before each run is
recorded).

    python benchmarks/data_pipeline.py [--images 2400] [--threads 2] [--repeats 3]
                                       [--out benchmarks/results/data_pipeline.json]
    python benchmarks/data_pipeline.py --suite jitter --images 800   # about a minute and a half on 2 cores
    python benchmarks/data_pipeline.py --suite checksums --images 800
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil

SUITES = {"loaders": ("dali_cpu", "dali_cpu_dali_resize", "pil_threads", "torchvision_dataloader",
                       "torchvision_v2_tensors"),
          "jitter": ("pretrain_dali_cpu", "pretrain_dali_cpu_jitter"),
          "jitter_pil": ("pretrain_pil", "pretrain_pil_jitter"),
          "checksums": ("dali_cpu_unchecked", "dali_cpu")}
PIPELINES = tuple(name for names in SUITES.values() for name in names)
JITTER = 0.4  # the ``_jitter`` pipelines' strength (the published recipe's)


class ShardImages:
    """Map-style dataset over a shard directory with torchvision's transforms.

    tensors=False (the baseline, ImageFolder-style): PIL decode, ``transforms`` RandomResizedCrop bicubic
    (PIL's resize), flip, ToTensor, Normalize. tensors=True: ``torchvision.io.decode_jpeg`` and the same
    transform from ``transforms.v2`` on uint8 tensors (torch's antialiased resize kernels)."""

    def __init__(self, shards: Path, img_size: int, tensors: bool = False) -> None:
        import torch
        from torchvision import transforms
        from torchvision.transforms import v2

        from itpn_ds.data.shard_loader import IMAGENET_MEAN, IMAGENET_STD
        from itpn_ds.data.shards import ShardReader

        self.reader = ShardReader(shards)
        self.tensors = tensors
        if tensors:
            self.transform = v2.Compose([
                v2.RandomResizedCrop(img_size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
                v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        else:
            self.transform = transforms.Compose([
                transforms.RandomResizedCrop(img_size, interpolation=transforms.InterpolationMode.BICUBIC),
                transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, index: int):
        import torch
        from PIL import Image
        from torchvision.io import decode_jpeg

        sample = self.reader.sample(index)
        if self.tensors:
            encoded = torch.frombuffer(bytearray(sample.data), dtype=torch.uint8)
            return self.transform(decode_jpeg(encoded)), sample.label
        return self.transform(Image.open(io.BytesIO(sample.data)).convert("RGB")), sample.label


def batches_of(name: str, shards: Path, batch: int, threads: int, img_size: int):
    if name.startswith("torchvision"):
        import torch

        dataset = ShardImages(shards, img_size, tensors=name == "torchvision_v2_tensors")
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=threads,
                                             persistent_workers=False, prefetch_factor=2)
        return loader, lambda b: len(b[0])
    backend = "torch" if "pil" in name else "dali"
    if name.startswith("pretrain"):
        from itpn_ds.data import build_pretrain_loader
        from itpn_ds.data.views import SampledViews

        views = SampledViews(seed=0, color_jitter=JITTER if name.endswith("_jitter") else 0.0)
        loader = build_pretrain_loader(shards, views=views, img_size=img_size, micro_batch=batch, num_threads=threads,
                                       device="cpu", backend=backend)
        return loader, lambda b: int(b.valid.sum())
    from itpn_ds.data import build_finetune_loader

    loader = build_finetune_loader(shards, img_size=img_size, micro_batch=batch, num_threads=threads, device="cpu",
                                   backend=backend, rand_augment_ops=0, reprob=0.0,
                                   torch_resize=name != "dali_cpu_dali_resize")
    if name == "dali_cpu_unchecked":
        loader.reader.manifest.crc32 = []  # the reader then skips the per-sample CRC32 check
    return loader, lambda b: int(b.valid.sum())


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its live descendants (DataLoader workers)."""
    processes = [psutil.Process()] + psutil.Process().children(recursive=True)
    return sum(sum(p.cpu_times()[:2]) for p in processes)


def measure(name: str, shards: Path, batch: int, threads: int, img_size: int, warmup: int) -> dict:
    """One epoch after ``warmup`` batches: images/s, CPU ms per image (all threads and workers; read after
    each batch, while the workers live), and peak RSS of this process and its largest child."""
    loader, count = batches_of(name, shards, batch, threads, img_size)
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    images, start, cpu_start = 0, time.perf_counter(), cpu_seconds()
    for b in it:
        images += count(b)
        cpu_end = cpu_seconds()
    seconds = time.perf_counter() - start
    return {"pipeline": name, "images": images, "seconds": seconds, "images_per_s": images / seconds,
            "cpu_ms_per_image": 1e3 * (cpu_end - cpu_start) / images,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_child_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, "workers": threads}


def median_row(runs: list[dict]) -> dict:
    """A pipeline's runs -> its median images/s and CPU ms per image, largest RSS, and the runs."""
    return {"pipeline": runs[0]["pipeline"], "images_per_s": statistics.median(r["images_per_s"] for r in runs),
            "cpu_ms_per_image": statistics.median(r["cpu_ms_per_image"] for r in runs),
            "peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
            "peak_child_rss_mib": max(r["peak_child_rss_mib"] for r in runs), "runs": runs}


def prepare(work: Path, images: int, min_side: int, max_side: int) -> Path:
    from data_tools.demo_images import SOURCE_PHOTOS, make_demo_image_folder
    from itpn_ds.data.shards import MANIFEST_NAME, write_shards
    from itpn_ds.data.sources import image_folder_items, shuffled

    shards = work / f"shards-{images}-{min_side}-{max_side}"
    if not (shards / MANIFEST_NAME).is_file():
        folder = make_demo_image_folder(work / f"images-{images}-{min_side}-{max_side}",
                                        -(-images // len(SOURCE_PHOTOS)), min_side=min_side, max_side=max_side)
        items, classes = image_folder_items(folder)
        write_shards(shuffled(items, 0), shards, classes, str(folder), target_shard_bytes=64 << 20, progress=False)
    return shards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2400)
    parser.add_argument("--min-side", type=int, default=300)
    parser.add_argument("--max-side", type=int, default=500)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="rounds over all pipelines (median reported)")
    parser.add_argument("--suite", choices=SUITES, default="loaders",
                        help="loaders: ours against torchvision; jitter, jitter_pil: pre-training loader (DALI CPU, "
                             "PIL), colour jitter off/on")
    parser.add_argument("--work", type=Path, default=Path("/tmp/itpn_ds_bench_data"))
    parser.add_argument("--out", default=None, help="default benchmarks/results/data_pipeline[_jitter].json")
    parser.add_argument("--single", choices=PIPELINES, help=argparse.SUPPRESS)  # child process mode
    args = parser.parse_args()
    shards = prepare(args.work, args.images, args.min_side, args.max_side)
    if args.single:
        print(json.dumps(measure(args.single, shards, args.batch, args.threads, args.img_size, args.warmup)))
        return
    pipelines = SUITES[args.suite]
    runs: dict[str, list[dict]] = {name: [] for name in pipelines}
    for round_ in range(args.repeats):
        for name in pipelines:
            load = os.getloadavg()[0]
            child = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--single", name], check=True,
                                   capture_output=True, text=True)
            runs[name].append({**json.loads(child.stdout.strip().splitlines()[-1]), "load_1min": load})
            print(f"round {round_}: {name:<26} {runs[name][-1]['images_per_s']:6.0f} images/s (load {load:.2f})",
                  flush=True)
    rows = [median_row(runs[name]) for name in pipelines]
    print(f"{'pipeline (median)':<26} {'images/s':>9} {'CPU ms/img':>11} {'peak RSS MiB':>13} "
          f"{'largest worker MiB':>19}")
    for r in rows:
        print(f"{r['pipeline']:<26} {r['images_per_s']:>9.0f} {r['cpu_ms_per_image']:>11.2f} "
              f"{r['peak_rss_mib']:>13.0f} {r['peak_child_rss_mib']:>19.0f}")
    by_name = {r["pipeline"]: r for r in rows}
    summaries = {"loaders": lambda: loaders_summary(by_name), "checksums": lambda: checksum_summary(*rows)}
    summary = summaries.get(args.suite, lambda: jitter_summary(*rows))()
    suffix = "" if args.suite == "loaders" else f"_{args.suite}"
    out = Path(args.out or f"benchmarks/results/data_pipeline{suffix}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                               "suite": args.suite, "images": args.images, "sides": [args.min_side, args.max_side],
                               "batch": args.batch, "threads": args.threads, "repeats": args.repeats, **summary,
                               "rows": rows}, indent=1))


def loaders_summary(by_name: dict[str, dict]) -> dict:
    """Our DALI CPU loader against the torchvision DataLoaders (median images/s ratios), printed."""
    speedup = by_name["dali_cpu"]["images_per_s"] / by_name["torchvision_dataloader"]["images_per_s"]
    versus_v2 = by_name["dali_cpu"]["images_per_s"] / by_name["torchvision_v2_tensors"]["images_per_s"]
    print(f"DALI CPU / torchvision DataLoader: {speedup:.2f}x images/s (medians); "
          f"/ torchvision v2 on tensors: {versus_v2:.2f}x")
    return {"dali_vs_torchvision": speedup, "dali_vs_torchvision_v2": versus_v2}


def jitter_summary(off: dict, on: dict) -> dict:
    """The jitter's extra CPU ms per image and the images/s with it over without (median rows), printed."""
    extra = on["cpu_ms_per_image"] - off["cpu_ms_per_image"]
    ratio = on["images_per_s"] / off["images_per_s"]
    print(f"colour jitter {JITTER} on {off['pipeline']}: +{extra:.2f} CPU ms per image, {ratio:.2f}x images/s")
    return {"jitter_extra_cpu_ms_per_image": extra, "jitter_images_per_s_ratio": ratio}


def checksum_summary(unchecked: dict, checked: dict) -> dict:
    """The CRC32 check's extra CPU ms per image and images/s with it over without (median rows), printed."""
    extra = checked["cpu_ms_per_image"] - unchecked["cpu_ms_per_image"]
    ratio = checked["images_per_s"] / unchecked["images_per_s"]
    print(f"per-sample CRC32 on read: +{extra:.3f} CPU ms per image ({100 * extra / unchecked['cpu_ms_per_image']:.1f} % "
          f"of the loader's), {ratio:.3f}x images/s")
    return {"crc32_extra_cpu_ms_per_image": extra, "crc32_images_per_s_ratio": ratio}


if __name__ == "__main__":
    main()
