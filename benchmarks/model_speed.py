"""Forward+backward images/s at 224 px on this machine: iTPN-B against timm's ViT-B/16 (similar FLOPs), and
fused SDPA attention against plain-math attention, all in one run.

    python benchmarks/model_speed.py [--batch 8] [--iters 3] [--out benchmarks/results/model_speed.json]

``attention_backends_ms``: one iTPN-B main-block attention with its relative-position bias under the SDPA and
FlexAttention backends (``attention_backend_ms``).
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
    result["attention_backends_ms"] = attention_backend_ms()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"{'model':40s} {'images/s':>10s}")
    for name, value in rows.items():
        print(f"{name:40s} {value:10.2f}")
    print(f"iTPN-B time/image relative to ViT-B: {result['itpn_b_time_per_image_vs_vit_b']:.3f} (goal <= 1.15)")
    print(f"SDPA speed-up over plain math: {result['sdpa_speedup_over_math']:.3f}")
    print(f"written to {args.out}")


def attention_backend_ms(iters: int = 20, batch: int = 8, grid: int = 14, dim: int = 512, heads: int = 8
                         ) -> dict[str, float]:
    """Milliseconds per call of one iTPN-B main-block ``Attention`` (N = grid² tokens, RPE bias, fp32):
    SDPA forward+backward, forward eager and compiled; flex forward eager (PyTorch's unfused reference) and compiled (the fused
    Inductor kernel, as under ``torch.compile`` of the block; first call compiles, untimed). Flex has no CPU
    backward in torch 2.14 (benchmarks/gpu_check.py times it on CUDA). Outputs are checked against SDPA."""
    torch.manual_seed(0)
    attn = layers.Attention(dim, heads, rpe_grid=grid)
    torch.nn.init.normal_(attn.relative_position_bias_table, std=0.02)
    index = layers.relative_position_index(grid).view(-1)
    x = torch.randn(batch, grid * grid, dim)
    compiled = torch.compile(attn, dynamic=False)

    def ms(step) -> float:
        step()  # warm-up (compiles)
        start = time.perf_counter()
        for _ in range(iters):
            step()
        return 1e3 * (time.perf_counter() - start) / iters

    def forward(module: torch.nn.Module, backend: str):
        attn.backend = backend
        with torch.no_grad():
            return module(x, index)

    def forward_backward(backend: str) -> None:
        attn.backend = backend
        attn.zero_grad(set_to_none=True)
        attn(x.detach().requires_grad_(), index).sum().backward()

    expected = forward(attn, "sdpa")
    for module in (attn, compiled):
        torch.testing.assert_close(forward(module, "flex"), expected, atol=1e-4, rtol=1e-4)
    rows = {"sdpa forward+backward": ms(lambda: forward_backward("sdpa")),
            "sdpa forward": ms(lambda: forward(attn, "sdpa")),
            "sdpa forward (compiled)": ms(lambda: forward(compiled, "sdpa")),
            "flex forward (eager)": ms(lambda: forward(attn, "flex")),
            "flex forward (compiled)": ms(lambda: forward(compiled, "flex"))}
    for name, value in rows.items():
        print(f"attention ({batch}x{grid * grid} tokens, {heads} heads, dim {dim}) {name:28s} {value:8.2f} ms")
    return rows


if __name__ == "__main__":
    main()
