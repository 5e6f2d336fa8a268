"""Why the tiny CPU recipes train in fp32: seconds per forward+backward of the tiny models in bf16 and in fp32 on
this CPU, side by side in one run, on one intra-op thread as the test ranks run.

    python benchmarks/cpu_precision.py [--iters 3] [--out benchmarks/results/cpu_precision.json]

``pretrain``: ``tiny_pretrain_cpu``'s CLIP-distillation model, 8 images of 64 px with half the tokens masked,
weights and inputs in bf16 (DeepSpeed's ``precision: bf16``) against fp32.
``detect``: ``tiny_detect_cpu``'s Mask R-CNN on two images of 128 x 160 and 144 x 112 px, the backbone under
bf16 autocast (the published detection recipes' ``backbone_autocast: bf16``) against fp32.
``cpu_bf16_units``: the CPU flags that give bf16 a hardware path (AVX512-BF16, AMX-BF16); where both are
missing, torch runs bf16 matrix products through conversions to fp32.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from itpn_ds.config import load_config
from itpn_ds.engine.model import build_model

BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_bf16_units() -> list[str]:
    """The flags of ``BF16_FLAGS`` that /proc/cpuinfo lists (empty where it lists none or does not exist)."""
    cpuinfo = Path("/proc/cpuinfo")
    flags = set(cpuinfo.read_text().split()) if cpuinfo.exists() else set()
    return [flag for flag in BF16_FLAGS if flag in flags]


def seconds_per_step(step: Callable[[], torch.Tensor], iters: int) -> float:
    """Mean seconds of ``iters`` forward+backward calls after one warm-up call."""
    step().backward()
    start = time.perf_counter()
    for _ in range(iters):
        step().backward()
    return (time.perf_counter() - start) / iters


def pretrain_steps() -> dict[str, Callable[[], torch.Tensor]]:
    """The tiny CLIP-distillation model's loss, in bf16 and in fp32 weights."""
    torch.manual_seed(0)
    model = build_model(load_config("tiny_pretrain_cpu")).train()
    images = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(8, 16, dtype=torch.bool)
    mask[:, ::2] = True

    def step_of(dtype: torch.dtype) -> Callable[[], torch.Tensor]:
        net, x = copy.deepcopy(model).to(dtype), images.to(dtype)
        return lambda: sum(out.float().square().mean() for out in net(x, mask))

    return {"bf16": step_of(torch.bfloat16), "fp32": step_of(torch.float32)}


def detect_steps() -> dict[str, Callable[[], torch.Tensor]]:
    """The tiny Mask R-CNN's summed losses, its backbone under bf16 autocast and in fp32."""
    images = [torch.rand(3, 128, 160), torch.rand(3, 144, 112)]
    targets = []
    for image, box in zip(images, ([10, 10, 60, 70], [20, 15, 80, 90])):
        masks = torch.zeros(1, *image.shape[-2:], dtype=torch.uint8)
        masks[0, box[1]:box[3], box[0]:box[2]] = 1
        targets.append(dict(boxes=torch.tensor([box], dtype=torch.float32), labels=torch.tensor([1]), masks=masks))

    def step_of(autocast: str) -> Callable[[], torch.Tensor]:
        torch.manual_seed(0)
        net: nn.Module = build_model(load_config("tiny_detect_cpu", [f"model.kwargs.backbone_autocast={autocast}"]))
        net.train()
        return lambda: sum(net(images, targets).values())

    return {"bf16": step_of("bf16"), "fp32": step_of("null")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/cpu_precision.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    result: dict[str, object] = {"cpu_bf16_units": cpu_bf16_units(), "threads": 1}
    for name, steps in (("pretrain", pretrain_steps()), ("detect", detect_steps())):
        seconds = {precision: seconds_per_step(step, args.iters) for precision, step in steps.items()}
        result[name] = {**{f"{p}_s_per_step": round(s, 4) for p, s in seconds.items()},
                        "bf16_over_fp32": round(seconds["bf16"] / seconds["fp32"], 2)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
