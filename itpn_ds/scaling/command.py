"""``itpn-ds plan-scaling``: print (and optionally write as JSON) the memory and throughput plan.

Example, the iTPN-L / CLIP-L table of docs/scaling.md::

    itpn-ds plan-scaling --model clip_tpn_large_2240_patch16_224 --gpus 64 128 256 512 1024 --show best
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from itpn_ds.data.shards import ShardError, ShardLayout
from itpn_ds.scaling.activations import CheckpointPolicy
from itpn_ds.scaling.memory import GIB, GPU, GPUS, ZERO_STAGES, DeepSpeedBuffers
from itpn_ds.scaling.plan import IMAGENET_1K_TRAIN_IMAGES, Assumptions, Config, Row
from itpn_ds.scaling.search import Grid, all_rows, best_rows, largest_micro_batch
from itpn_ds.scaling.spec import ModelSpec, student_spec, teacher_spec
from itpn_ds.scaling.cache_plan import IMAGENET_1K_LAYOUT, cache_reads, plan_for_teacher

DEFAULT_MODEL = "clip_tpn_large_2240_patch16_224"
SHOW = ("all", "best", "largest")


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help="registered timm name of an iTPN model")
    parser.add_argument("--image-size", type=int, default=224, help="student input size in pixels")
    parser.add_argument("--gpus", type=int, nargs="+", default=[64, 128, 256, 512, 1024], help="GPU counts")
    parser.add_argument("--gpu", choices=sorted(GPUS), default="h100-80gb", help="GPU preset")
    parser.add_argument("--gpu-memory-gib", type=float, help="override the preset's memory (GiB)")
    parser.add_argument("--peak-tflops", type=float, help="override the preset's dense bf16 peak (TFLOP/s)")
    parser.add_argument("--nic-gbps", type=float, help="override the per-GPU InfiniBand NIC line rate (Gbit/s)")
    parser.add_argument("--zero", type=int, nargs="+", default=list(ZERO_STAGES), choices=ZERO_STAGES,
                        help="ZeRO stages")
    parser.add_argument("--checkpoint", nargs="+", default=["none", "every-2", "every"],
                        help="activation checkpointing: none, every (block) or every-K (every K-th block)")
    parser.add_argument("--micro-batch", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128],
                        help="micro-batch sizes per GPU")
    parser.add_argument("--global-batch", type=int, default=2048, help="images per optimizer step")
    parser.add_argument("--utilization", type=float, default=0.40,
                        help="assumed fraction of peak achieved on the executed FLOPs (recompute and online "
                             "teacher included); the resulting MFU is reported")
    parser.add_argument("--teacher", choices=("cached", "online"), default="cached",
                        help="targets from the teacher cache, or CLIP-L run online on every GPU")
    parser.add_argument("--grad-accum-dtype", choices=("bf16", "fp32"), default="bf16",
                        help="DeepSpeed data_types.grad_accum_dtype")
    parser.add_argument("--reserve-gib", type=float, default=6.0,
                        help="memory kept for the CUDA context, NCCL and allocator fragmentation (GiB)")
    parser.add_argument("--reduce-bucket", type=float, default=5e8, help="DeepSpeed reduce_bucket_size (elements)")
    parser.add_argument("--overlap-comm", action="store_true", help="DeepSpeed overlap_comm (two reduce buckets)")
    parser.add_argument("--network-efficiency", type=float, default=0.8,
                        help="achieved collective bus bandwidth / link bandwidth")
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--train-images", type=int, default=None,
                        help=f"images per epoch (default ImageNet-1K, {IMAGENET_1K_TRAIN_IMAGES:,})")
    parser.add_argument("--shards", type=Path, help="a make-shards output directory: its manifest gives the images "
                                                    "per epoch and the shard layout the cache and read figures use")
    parser.add_argument("--show", choices=SHOW, default="all",
                        help="all: every configuration; best: fastest fitting one per GPU count; largest: the "
                             "largest micro-batch that fits per GPU count, ZeRO stage and checkpoint policy")
    parser.add_argument("--json", type=Path, help="also write the rows shown as JSON here")


def main(args: argparse.Namespace) -> int:
    try:
        layout = _shard_layout(args)
        gpu = _gpu(args)
        assumptions = _assumptions(args, layout)
        grid = Grid(
            gpus=args.gpus,
            zero_stages=args.zero,
            checkpoints=[CheckpointPolicy.parse(text) for text in args.checkpoint],
            micro_batches=args.micro_batch,
            global_batch=args.global_batch,
            online_teacher=args.teacher == "online",
        )
        grid.check()
        spec = student_spec(args.model, args.image_size, teacher=teacher_spec() if grid.online_teacher else None)
        rows = _rows(args.show, spec, gpu, grid, assumptions)
    except (ValueError, ShardError) as error:
        print(f"itpn-ds plan-scaling: error: {error}", file=sys.stderr)
        return 2
    print(header(spec, gpu, assumptions, args.global_batch, args.teacher))
    print(table(rows))
    if args.teacher == "cached":
        source = f"{args.shards}" if args.shards else "ImageNet-1K in make-shards' default 1 GiB shards, assumed"
        print(f"\nTeacher cache reads and shard reads at these rates ({layout.images:,} images in {layout.shards} shards "
              f"of {layout.bytes_per_image / 1e3:.0f} KB per image: {source}; ViT-L-14 targets, one view per image) "
              "and the teacher compute they save:\n")
        print(cache_read_table(rows, gpu, assumptions, layout))
    if args.json:
        payload = {"model": spec.name, "params": spec.n_params, "gpu": gpu.name, "rows": [r.to_dict() for r in rows]}
        args.json.write_text(json.dumps(payload, indent=2))
    return 0


def _gpu(args: argparse.Namespace) -> GPU:
    preset = GPUS[args.gpu]
    memory = preset.memory_bytes if args.gpu_memory_gib is None else int(args.gpu_memory_gib * GIB)
    peak = preset.peak_bf16_flops if args.peak_tflops is None else args.peak_tflops * 1e12
    nic = preset.nic_bits_per_s if args.nic_gbps is None else args.nic_gbps * 1e9
    if memory <= 0 or peak <= 0 or nic <= 0:
        raise ValueError("GPU memory, peak FLOP/s and NIC rate must be positive")
    return replace(preset, memory_bytes=memory, peak_bf16_flops=peak, nic_bits_per_s=nic)


def _shard_layout(args: argparse.Namespace) -> ShardLayout:
    """``--shards``' manifest, or the ImageNet-1K assumption (with ``--train-images`` as its image count)."""
    if args.shards is None:
        if args.train_images is None:
            return IMAGENET_1K_LAYOUT
        return replace(IMAGENET_1K_LAYOUT, images=args.train_images,
                       bytes=round(args.train_images * IMAGENET_1K_LAYOUT.bytes_per_image))
    if args.train_images is not None:
        raise ValueError(f"--shards {args.shards} gives the images per epoch: drop --train-images")
    return ShardLayout.of(args.shards)


def _assumptions(args: argparse.Namespace, layout: ShardLayout) -> Assumptions:
    if args.epochs < 1 or layout.images < 1 or args.global_batch < 1:
        raise ValueError("epochs, training images and global batch must be >= 1")
    return Assumptions(
        hfu=args.utilization,
        network_efficiency=args.network_efficiency,
        reserve_bytes=int(args.reserve_gib * GIB),
        grad_bytes=4 if args.grad_accum_dtype == "fp32" else 2,
        buffers=DeepSpeedBuffers(reduce_bucket_elements=int(args.reduce_bucket), overlap_comm=args.overlap_comm),
        epochs=args.epochs,
        train_images=layout.images,
    )


def _rows(show: str, spec: ModelSpec, gpu: GPU, grid: Grid, assumptions: Assumptions) -> list[Row]:
    if show == "all":
        return all_rows(spec, gpu, grid, assumptions)
    if show == "best":
        return best_rows(all_rows(spec, gpu, grid, assumptions))
    rows = []
    for gpus in grid.gpus:
        for stage in grid.zero_stages:
            for policy in grid.checkpoints:
                config = Config(gpus, stage, policy, 1, gpus, grid.online_teacher)
                row = largest_micro_batch(spec, gpu, config, assumptions)
                if row is not None:
                    rows.append(row)
    return rows


def header(spec: ModelSpec, gpu: GPU, assumptions: Assumptions, global_batch: int, teacher: str) -> str:
    teacher_text = f"online ({spec.teacher.name}, {spec.teacher.n_params:,} params)" if spec.teacher else teacher
    return (
        f"model {spec.name}: {spec.n_params:,} params, {spec.forward_flops / 1e9:.1f} GFLOPs forward per image; "
        f"teacher {teacher_text}\n"
        f"GPU {gpu.name}: {gpu.memory_bytes / GIB:.1f} GiB, {gpu.peak_bf16_flops / 1e12:.0f} TFLOP/s bf16 dense, "
        f"NVLink {gpu.nvlink_bytes_per_s / 1e9:.0f} GB/s, {gpu.gpus_per_node} x {gpu.nic_bits_per_s / 1e9:.0f} Gbit/s NICs per node; "
        f"utilization {assumptions.hfu:.0%} of peak, "
        f"network {assumptions.network_efficiency:.0%} of link bandwidth, reserve {assumptions.reserve_bytes / GIB:.1f} GiB; "
        f"global batch {global_batch}, {assumptions.epochs} epochs of {assumptions.train_images:,} images\n"
    )


COLUMNS = (
    "GPUs", "ZeRO", "ckpt", "micro", "accum", "params", "grads", "optim", "buffers", "acts", "teacher", "total GiB",
    "fits", "img/s", "compute ms", "comm ms", "MFU", "hours",
)


def table(rows: Sequence[Row]) -> str:
    """A markdown table, memory in GiB per GPU, time per optimizer step."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        c = row.config
        gib = lambda n: f"{n / GIB:.2f}"  # noqa: E731
        cells = (
            c.gpus, c.zero_stage, c.checkpoint, c.micro_batch, c.accum_steps,
            gib(row.states.params), gib(row.states.grads), gib(row.states.optimizer), gib(row.states.comm_buffers),
            gib(row.activations.peak), gib(row.teacher_weights), gib(row.total_bytes), "yes" if row.fits else "no",
            f"{row.images_per_s:,.0f}", f"{row.compute_s * 1e3:.1f}", f"{row.comm_s * 1e3:.1f}",
            f"{row.mfu:.1%}", f"{row.hours:.1f}",
        )
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


CACHE_COLUMNS = ("GPUs", "nodes", "img/s per node", "shards GB/s per node", "fp16 GB/s per node", "int8 GB/s per node",
                 "fp16 GB/s cluster", "int8 GB/s cluster", "teacher TFLOP/s saved per GPU", "GPUs' time saved")


def cache_read_table(rows: Sequence[Row], gpu: GPU, assumptions: Assumptions, layout: ShardLayout) -> str:
    """Per row: the shards' read bandwidth per node (``layout``'s bytes per image at the row's rate), the
    ViT-L-14 cache's (fp16 and int8) per node and for the cluster, and the teacher forward FLOP/s it replaces
    (per GPU, and as the share of the GPUs' time at the plan's utilization that running the teacher online
    would take)."""
    lines = ["| " + " | ".join(CACHE_COLUMNS) + " |", "|" + "---|" * len(CACHE_COLUMNS)]
    plans = {dtype: plan_for_teacher("ViT-L-14", layout, dtype=dtype) for dtype in ("fp16", "int8")}
    for row in rows:
        gpus = row.config.gpus
        per_node = row.images_per_s / gpus * min(gpus, gpu.gpus_per_node)
        nodes = -(-gpus // gpu.gpus_per_node)
        fp16, int8 = (cache_reads(plans[d], per_node, nodes, "ViT-L-14") for d in ("fp16", "int8"))
        teacher_per_gpu = fp16.teacher_flops_per_image * row.images_per_s / gpus
        cells = (gpus, nodes, f"{per_node:,.0f}", f"{per_node * layout.bytes_per_image / 1e9:.2f}",
                 f"{fp16.node_bytes_per_s / 1e9:.2f}",
                 f"{int8.node_bytes_per_s / 1e9:.2f}", f"{fp16.cluster_bytes_per_s / 1e9:.1f}",
                 f"{int8.cluster_bytes_per_s / 1e9:.1f}", f"{teacher_per_gpu / 1e12:.0f}",
                 f"{teacher_per_gpu / (gpu.peak_bf16_flops * assumptions.hfu):.0%}")
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)
