"""Forward+backward images/s at 224 px on this machine, eager and compiled, all in one run: iTPN-B against
timm's ViT-B/16 (similar FLOPs), the CLIP-distillation model with its mask, and fused SDPA attention against
plain-math attention.

    python benchmarks/model_speed.py [--batch 8] [--iters 3] [--out benchmarks/results/model_speed.json]

``eager_vs_compiled``: per model, eager and regionally compiled (``model.compile=on``: each repeated block
compiled in place by ``itpn_ds.models.compile``; ViT-B's ``blocks`` the same way) images/s, and the compile
time (the first compiled step less one steady step), apart from the step time.
``load_average``: the 1-minute load average before and after the run (other jobs on the machine skew the
absolute figures; the side-by-side ratios less).
``attention_backends_ms``: one iTPN-B main-block attention with its relative-position bias under the SDPA and
FlexAttention backends (``attention_backend_ms``).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import time
from pathlib import Path
from typing import Callable, Iterator

import timm
import torch
from torch import nn

import itpn_ds.models  # noqa: F401  (registers the iTPN names)
from itpn_ds.data.masking import BlockMaskGenerator
from itpn_ds.models import create_model, layers
from itpn_ds.models.compile import compile_forward, compile_repeated_blocks
from itpn_ds.models.flops import forward_flops

IMG_SIZE = 224
Inputs = tuple[torch.Tensor, ...]


def train_step(model: nn.Module, inputs: Inputs) -> None:
    """One forward+backward; the loss is the mean of every output (a tensor or a tuple of them)."""
    model.zero_grad(set_to_none=True)
    out = model(*inputs)
    sum(o.float().mean() for o in (out if isinstance(out, tuple) else (out,))).backward()


def seconds_per_step(model: nn.Module, inputs: Inputs, iters: int) -> tuple[float, float]:
    """(first step s, mean s of ``iters`` further steps): the first one warms up (and compiles)."""
    model.train()
    start = time.perf_counter()
    train_step(model, inputs)
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(iters):
        train_step(model, inputs)
    return first, (time.perf_counter() - start) / iters


def compile_vit_blocks(model: nn.Module) -> None:
    """timm ViT's ``blocks`` compiled in place, as ``compile_repeated_blocks`` does ours (their ``forward``)."""
    for block in model.blocks:
        compile_forward(block)


def eager_and_compiled(build: Callable[[], nn.Module], compile_model: Callable[[nn.Module], object],
                       inputs: Inputs, iters: int) -> dict[str, float]:
    """Eager and compiled images/s of two identically initialised models, and the compile time in s."""
    batch = inputs[0].shape[0]
    torch.manual_seed(0)
    _, eager_s = seconds_per_step(build(), inputs, iters)
    torch.manual_seed(0)
    compiled = build()
    compile_model(compiled)
    first_s, compiled_s = seconds_per_step(compiled, inputs, iters)
    return {"eager_images_per_s": batch / eager_s, "compiled_images_per_s": batch / compiled_s,
            "compile_s": first_s - compiled_s, "compiled_speedup": eager_s / compiled_s}


def benchmarked_models(batch: int) -> dict[str, tuple[Callable[[], nn.Module], Callable[[nn.Module], object], Inputs]]:
    """name -> (builder, regional compilation, inputs): the iTPN-B classifier, the CLIP-distillation iTPN-B
    with block masks of 75 of 196 patches, timm's ViT-B/16."""
    images = torch.randn(batch, 3, IMG_SIZE, IMG_SIZE)
    mask = BlockMaskGenerator(IMG_SIZE // 16, IMG_SIZE // 16).batch(seed=0, epoch=0, indices=list(range(batch)))
    return {
        "itpn_base": (lambda: create_model("itpn_base_3324_patch16_224", num_classes=1000),
                      compile_repeated_blocks, (images,)),
        "clip_tpn_base_3324_patch16_224 (mask)": (lambda: create_model("clip_tpn_base_3324_patch16_224"),
                                                  compile_repeated_blocks, (images, mask)),
        "vit_base_patch16_224": (lambda: timm.create_model("vit_base_patch16_224", num_classes=1000),
                                 compile_vit_blocks, (images,)),
    }


def plain_math_sdpa(self, q, k, v, rpe_index, token_grid=None):
    """``Attention.sdpa`` computed as the explicit softmax(q·kᵀ + bias)·v (``layers.attention_math``)."""
    return layers.attention_math(q, k, v, self.position_bias(rpe_index, q.shape[2], token_grid))


@contextlib.contextmanager
def plain_math_attention() -> Iterator[None]:
    """Within the block every ``layers.Attention`` on the SDPA backend runs ``plain_math_sdpa`` instead."""
    sdpa = layers.Attention.sdpa
    layers.Attention.sdpa = plain_math_sdpa
    try:
        yield
    finally:
        layers.Attention.sdpa = sdpa


def plain_math_images_per_second(batch: int, iters: int) -> float:
    """Eager iTPN-B images/s with plain-math attention (``plain_math_attention``) in place of SDPA."""
    torch.manual_seed(0)
    itpn = create_model("itpn_base_3324_patch16_224", num_classes=1000)
    with plain_math_attention():
        return batch / seconds_per_step(itpn, (torch.randn(batch, 3, IMG_SIZE, IMG_SIZE),), iters)[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/model_speed.json")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    compared = {name: eager_and_compiled(build, compile_model, inputs, args.iters)
                for name, (build, compile_model, inputs) in benchmarked_models(args.batch).items()}
    itpn, vit = compared["itpn_base"], compared["vit_base_patch16_224"]
    rows = {"itpn_base (SDPA)": itpn["eager_images_per_s"], "vit_base_patch16_224": vit["eager_images_per_s"],
            "itpn_base (plain-math attention)": plain_math_images_per_second(args.batch, args.iters)}
    result = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
                   f"cuda={torch.cuda.is_available()}",
        "batch": args.batch, "iters": args.iters,
        "images_per_s": rows,
        "eager_vs_compiled": compared,
        "itpn_b_time_per_image_vs_vit_b": vit["eager_images_per_s"] / itpn["eager_images_per_s"],
        "itpn_b_time_per_image_vs_vit_b_compiled": vit["compiled_images_per_s"] / itpn["compiled_images_per_s"],
        "sdpa_speedup_over_math": rows["itpn_base (SDPA)"] / rows["itpn_base (plain-math attention)"],
        "forward_gflops_per_image": {"itpn_base": forward_flops(
            create_model("itpn_base_3324_patch16_224", num_classes=1000)) / 1e9},
        "load_average": {"before": load_before, "after": os.getloadavg()[0], "cpus": os.cpu_count()},
    }
    result["attention_backends_ms"] = attention_backend_ms()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print_table(result)
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


def print_table(result: dict) -> None:
    print(f"{'model':40s} {'eager img/s':>12s} {'compiled img/s':>15s} {'speed-up':>9s} {'compile s':>10s}")
    for name, row in result["eager_vs_compiled"].items():
        print(f"{name:40s} {row['eager_images_per_s']:12.2f} {row['compiled_images_per_s']:15.2f} "
              f"{row['compiled_speedup']:9.2f} {row['compile_s']:10.1f}")
    print(f"{'itpn_base (plain-math attention)':40s} {result['images_per_s']['itpn_base (plain-math attention)']:12.2f}")
    print(f"iTPN-B time/image relative to ViT-B: eager {result['itpn_b_time_per_image_vs_vit_b']:.3f}, compiled "
          f"{result['itpn_b_time_per_image_vs_vit_b_compiled']:.3f} (goal <= 1.15)")
    print(f"SDPA speed-up over plain math: {result['sdpa_speedup_over_math']:.3f}")
    load = result["load_average"]
    print(f"load average (1 min) before {load['before']:.2f}, after {load['after']:.2f}, on {load['cpus']} CPUs")


if __name__ == "__main__":
    main()
