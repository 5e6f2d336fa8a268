"""Forward+backward images/s at 224 px on this machine: iTPN-B against timm's ViT-B/16 (similar FLOPs), and
fused SDPA attention against plain-math attention, all in one run.

    python benchmarks/model_speed.py [--batch 8] [--iters 3] [--out benchmarks/results/model_speed.json]
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import timm
import torch

import itpn_ds  # noqa: F401  (registers the iTPN names)
from itpn_ds.models import layers
from itpn_ds.models.flops import forward_flops


def images_per_second(model: torch.nn.Module, batch: int, iters: int, img_size: int = 224) -> float:
    """Images per second over ``iters`` timed forward+backward steps, after one warm-up step."""
    x = torch.randn(batch, 3, img_size, img_size)
    model.train()
    model(x).float().mean().backward()  # warm-up
    start = time.perf_counter()
    for _ in range(iters):
        model.zero_grad(set_to_none=True)
        model(x).float().mean().backward()
    return batch * iters / (time.perf_counter() - start)


def plain_math_forward(self, x, rpe_index=None):
    """Attention.forward with the explicit softmax(q·kᵀ + bias)·v instead of SDPA."""
    B, N, C = x.shape
    q, k, v = self.qkv_heads(x)
    out = layers.attention_math(q, k, v, self.position_bias(rpe_index))
    return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, C)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/model_speed.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    itpn = timm.create_model("itpn_base_3324_patch16_224", num_classes=1000)
    vit = timm.create_model("vit_base_patch16_224", num_classes=1000)
    rows = {
        "itpn_base (SDPA)": images_per_second(itpn, args.batch, args.iters),
        "vit_base_patch16_224": images_per_second(vit, args.batch, args.iters),
    }
    sdpa_forward = layers.Attention.forward
    layers.Attention.forward = plain_math_forward
    try:
        rows["itpn_base (plain-math attention)"] = images_per_second(itpn, args.batch, args.iters)
    finally:
        layers.Attention.forward = sdpa_forward
    result = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
                   f"cuda={torch.cuda.is_available()}",
        "batch": args.batch, "iters": args.iters,
        "images_per_s": rows,
        "itpn_b_time_per_image_vs_vit_b": rows["vit_base_patch16_224"] / rows["itpn_base (SDPA)"],
        "sdpa_speedup_over_math": rows["itpn_base (SDPA)"] / rows["itpn_base (plain-math attention)"],
        "forward_gflops_per_image": {"itpn_base": forward_flops(itpn) / 1e9},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"{'model':40s} {'images/s':>10s}")
    for name, value in rows.items():
        print(f"{name:40s} {value:10.2f}")
    print(f"iTPN-B time/image relative to ViT-B: {result['itpn_b_time_per_image_vs_vit_b']:.3f} (goal <= 1.15)")
    print(f"SDPA speed-up over plain math: {result['sdpa_speedup_over_math']:.3f}")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
