"""What the plan needs to know about a model, read off the real modules.

``student_spec`` builds the registered timm model on the meta device (no memory, no init cost), counts its
parameters, and runs one meta-device forward with hooks on every residual block to learn each block's
token count, width, MLP width, heads and FLOPs. ``teacher_spec`` does the same for the online CLIP teacher
(open_clip's module for the parameters, ``vit_forward_flops`` for the FLOPs).
"""
from __future__ import annotations

import fnmatch

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from itpn_ds.scaling.activations import BlockShape, CheckpointPolicy, OtherActivations
from itpn_ds.scaling.memory import BF16_BYTES
from itpn_ds.scaling.throughput import CLIP_L14_196, ViTSpec, vit_forward_flops


@dataclass(frozen=True)
class TeacherSpec:
    """A frozen teacher run online under ``torch.no_grad`` next to the student."""

    name: str
    n_params: int
    vit: ViTSpec

    @property
    def forward_flops(self) -> float:
        return vit_forward_flops(self.vit)

    def transient_bytes(self, micro_batch: int) -> int:
        """Peak bf16 bytes of a no-grad forward (the residual stream, one block's widest intermediate and
        the MLP input) plus the targets it hands to the loss."""
        per_image = self.vit.tokens * (2 * self.vit.width + self.vit.mlp_dim) + self.vit.patches * self.vit.out_dim
        return micro_batch * per_image * BF16_BYTES


@dataclass(frozen=True)
class ModelSpec:
    """The student as the plan sees it: parameter counts, blocks in forward order, FLOPs per image."""

    name: str
    n_params: int
    forward_flops: float
    blocks: tuple[BlockShape, ...]
    other: OtherActivations
    teacher: TeacherSpec | None = field(default=None)

    @property
    def largest_block_params(self) -> int:
        return max((block.params for block in self.blocks), default=0)

    def recompute_flops(self, policy: CheckpointPolicy) -> float:
        """Forward FLOPs per image spent again in backward on the checkpointed blocks."""
        return sum(block.forward_flops for index, block in enumerate(self.blocks) if policy.checkpoints(index))


def teacher_spec(name: str = "ViT-L-14", vit: ViTSpec = CLIP_L14_196) -> TeacherSpec:
    """CLIP's vision tower as built by open_clip at the teacher's input size, counted on the meta device."""
    import open_clip

    model = open_clip.create_model(name, pretrained=None, device="meta", force_image_size=vit.image_size)
    n_params = sum(p.numel() for p in model.visual.parameters())
    return TeacherSpec(name=f"CLIP {name} @ {vit.image_size} px", n_params=n_params, vit=vit)


def build_meta(name: str, **kwargs) -> nn.Module:
    """The registered model ``name`` (ours or timm's) on the meta device (shapes only: no memory, no
    initialization)."""
    import timm

    from itpn_ds.models.registry import create_model, is_model, list_models

    if not is_model(name):
        pattern = f"*{name.split('_')[0]}*"
        close = [*timm.list_models(pattern), *(n for n in list_models() if fnmatch.fnmatch(n, pattern))][:10]
        raise ValueError(f"unknown model {name!r}" + (f"; similar registered names: {', '.join(close)}" if close else ""))
    with torch.device("meta"):
        return create_model(name, **kwargs)


def find_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Residual blocks in registration order: modules with an ``mlp`` child, outermost only."""
    blocks: list[tuple[str, nn.Module]] = []
    for path, module in model.named_modules():
        inside = any(path.startswith(f"{outer}.") for outer, _ in blocks)
        if not inside and isinstance(getattr(module, "mlp", None), nn.Module):
            blocks.append((path, module))
    return blocks


def student_spec(
    name: str,
    image_size: int = 224,
    teacher: TeacherSpec | None = None,
    **model_kwargs,
) -> ModelSpec:
    """Parameter count, blocks (forward order) and FLOPs of the registered model ``name``, read off one
    meta-device forward of one ``image_size`` image."""
    model = build_meta(name, **model_kwargs)
    blocks, other, flops = trace(model, example_forward(model, image_size))
    return ModelSpec(
        name=name,
        n_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        forward_flops=flops,
        blocks=blocks,
        other=other,
        teacher=teacher,
    )


def example_forward(model: nn.Module, image_size: int, batch: int = 1) -> Callable[[], torch.Tensor]:
    """A training forward of ``batch`` images on the model's device, returning the tensor backward starts from."""
    from itpn_ds.models.flops import example_inputs

    args, kwargs = example_inputs(model, image_size)  # with the mask / kept-patch ids a family needs
    batched = lambda t: t.repeat(batch, *[1] * (t.ndim - 1))  # noqa: E731  (real tensors, not stride-0 views)
    args, kwargs = tuple(map(batched, args)), {k: batched(v) for k, v in kwargs.items()}

    def forward() -> torch.Tensor:
        out = model(*args, **kwargs)
        if isinstance(out, tuple):  # (main, aux) of CLIP distillation; (loss, pred, mask) of the pixel model
            return sum(o.float().sum() for o in out if o.requires_grad)
        return out
    return forward


def trace(model: nn.Module, forward: Callable[[], torch.Tensor]) -> tuple[tuple[BlockShape, ...], OtherActivations, float]:
    """Run ``forward`` once (batch 1) and read off the blocks in call order, the saved tensors of the leaf
    modules outside the blocks, and the forward FLOPs (matrix multiplies, counted by torch's FlopCounterMode)."""
    blocks = find_blocks(model)
    inputs: dict[str, torch.Size] = {}
    order: list[str] = []
    glue = _GlueCounter()

    def record(path: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            order.append(path)
            inputs[path] = args[0].shape
        return hook

    handles = [module.register_forward_pre_hook(record(path)) for path, module in blocks]
    block_paths = [path for path, _ in blocks]
    for path, module in model.named_modules():
        if not any(path == b or path.startswith(f"{b}.") for b in block_paths) and isinstance(module, _GLUE_TYPES):
            handles.append(module.register_forward_pre_hook(glue.hook))
    try:
        with FlopCounterMode(display=False) as counter:
            forward()
    finally:
        for handle in handles:
            handle.remove()
    flops_by_module = counter.get_flop_counts()
    root = type(model).__name__
    modules = dict(blocks)
    shapes = tuple(
        block_shape(path, modules[path], inputs[path], sum(flops_by_module.get(f"{root}.{path}", {}).values()))
        for path in order
    )
    return shapes, glue.result(), float(counter.get_total_flops())


def block_shape(path: str, block: nn.Module, input_shape: torch.Size, flops: float) -> BlockShape:
    """A block's activation-model shape from its modules and the shape of its input (batch 1)."""
    fc1 = getattr(block.mlp, "fc1", None)
    if not isinstance(fc1, nn.Linear):
        raise ValueError(f"the activation model covers blocks with a Linear MLP (ViT, iTPN); {path} is a "
                         f"{type(block).__name__} with a {type(block.mlp).__name__} (Fast-iTPN's conv / SwiGLU "
                         "blocks are not modelled yet)")
    dim = input_shape[-1]
    attn = getattr(block, "attn", None)
    names = [name for name, _ in block.named_parameters()]
    return BlockShape(
        name=path,
        kind="attention" if attn is not None else "mlp",
        tokens=math.prod(input_shape[1:-1]),
        dim=dim,
        hidden=fc1.out_features,
        heads=getattr(attn, "num_heads", 0),
        layer_scale=any("gamma" in name for name in names),
        relative_position_bias=any("relative_position_bias" in name for name in names),
        params=sum(p.numel() for p in block.parameters()),
        forward_flops=flops,
    )


_GLUE_TYPES = (nn.Linear, nn.Conv2d, nn.LayerNorm, nn.GELU)


class _GlueCounter:
    """Saved elements of the leaf modules outside the blocks: Linear/Conv2d/GELU keep their input,
    LayerNorm its input plus a fp32 mean and rstd per row."""

    def __init__(self) -> None:
        self.elements = 0
        self.fp32_elements = 0

    def hook(self, module: nn.Module, args: tuple) -> None:
        x = args[0]
        self.elements += x.numel()
        if isinstance(module, nn.LayerNorm):
            self.fp32_elements += 2 * x.numel() // math.prod(module.normalized_shape)

    def result(self) -> OtherActivations:
        return OtherActivations(per_image_elements=self.elements, per_image_fp32_elements=self.fp32_elements)
