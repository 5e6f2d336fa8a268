"""Step time from FLOPs at an assumed utilization, and ZeRO communication at an assumed network bandwidth.

FLOPs count matrix multiplies only (2 FLOPs per multiply-add); norms, softmax and activations are a few
percent and left out, as in the usual MFU accounting. A training step executes, per image,
``3 x forward`` (backward = 2 x forward) plus one more forward of every activation-checkpointed block
(recompute), plus the teacher forward when the teacher runs online. The utilization is applied to those
executed FLOPs (hardware FLOPs), so recompute costs time; ``model_flops_utilization`` reports the usual MFU
(model FLOPs only) for comparison.

Communication: ring collectives, where each rank sends ``(N-1)/N`` of the buffer for a reduce-scatter or an
all-gather and twice that for an all-reduce, over one NIC per GPU at ``efficiency x line rate``.
"""
from __future__ import annotations

from dataclasses import dataclass

from itpn_ds.scaling.memory import BF16_BYTES


@dataclass(frozen=True)
class ViTSpec:
    """A plain ViT (the CLIP teacher): input size (px), patch (px), width, depth, MLP width, output projection."""

    image_size: int
    patch_size: int
    width: int
    depth: int
    mlp_dim: int
    out_dim: int
    in_chans: int = 3
    class_token: bool = True

    @property
    def patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def tokens(self) -> int:
        return self.patches + int(self.class_token)


# CLIP ViT-L/14 as the iTPN recipe runs it: 196 px input -> 14 x 14 patches + class token.
CLIP_L14_196 = ViTSpec(image_size=196, patch_size=14, width=1024, depth=24, mlp_dim=4096, out_dim=768)
# CLIP ViT-B/16 at its native 224 px: 14 x 14 patches + class token.
CLIP_B16_224 = ViTSpec(image_size=224, patch_size=16, width=768, depth=12, mlp_dim=3072, out_dim=512)


def vit_forward_flops(spec: ViTSpec) -> float:
    """Forward FLOPs of one image through a ViT: patch-embed conv, per block qkv + q@k^T + attn@v + proj + MLP,
    and the output projection of the patch tokens."""
    s, d = spec.tokens, spec.width
    patch_embed = 2 * spec.patches * spec.in_chans * spec.patch_size**2 * d
    per_block = 2 * s * d * (3 * d + d + 2 * spec.mlp_dim) + 2 * 2 * s * s * d
    head = 2 * spec.patches * d * spec.out_dim
    return patch_embed + spec.depth * per_block + head


@dataclass(frozen=True)
class StepFlops:
    """FLOPs per image of one training step, split by where they are spent."""

    student_forward: float
    recompute: float
    teacher_forward: float

    @property
    def model(self) -> float:
        """Model FLOPs (forward + backward of the student), the MFU numerator."""
        return 3 * self.student_forward

    @property
    def executed(self) -> float:
        """FLOPs the GPU executes: the model FLOPs plus recompute plus the online teacher."""
        return self.model + self.recompute + self.teacher_forward


def collective_bytes_per_step(n_params: int, stage: int, world: int, accum_steps: int) -> float:
    """Bytes one rank sends per optimizer step for DeepSpeed's bf16 gradient/parameter collectives.

    Stage 0/1: one all-reduce (stage 0) or reduce-scatter + all-gather (stage 1) of the bf16 gradients at the
    accumulation boundary. Stage 2: a reduce-scatter every micro-step and an all-gather of the updated
    parameters. Stage 3: every micro-step all-gathers the parameters for forward and again for backward
    and reduce-scatters the gradients.
    """
    if world == 1:
        return 0.0
    one_pass = (world - 1) / world * BF16_BYTES * n_params
    if stage in (0, 1):
        return 2 * one_pass
    if stage == 2:
        return (accum_steps + 1) * one_pass
    return 3 * accum_steps * one_pass


def model_flops_utilization(step_flops: StepFlops, images_per_s_per_gpu: float, peak_flops: float) -> float:
    """The usual MFU: student model FLOPs per second over the peak."""
    return step_flops.model * images_per_s_per_gpu / peak_flops
