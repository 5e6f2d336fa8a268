"""Activation memory: the bytes autograd keeps for backward, per block type, under a checkpoint policy.

Counted per image in elements of the activation dtype (bf16 on GPU), from what each op saves:

- ``LayerNorm`` saves its input and, in fp32, a mean and a reciprocal std per row;
- ``Linear`` saves its input; ``GELU`` saves its input (so an MLP keeps its hidden tensor twice: the
  ``fc1`` output that GELU saved and the GELU output that ``fc2`` saved);
- layer scale (``gamma * x``) saves the branch output ``x``; a residual add and dropout/drop-path with a
  per-sample mask save nothing of activation size.
- attention, with the fused kernels used on GPU (``scaled_dot_product_attention`` -> flash or
  memory-efficient): the qkv projection output (one storage that q, k and v view), the attention output
  (which ``proj`` saves as a view of it) and a fp32 log-sum-exp per head and query; no ``s x s`` matrix.
  The relative position bias is one ``(heads, s, s)`` tensor per block shared by the whole batch.
  ``kernel`` names the path: ``cuda`` (flash / memory-efficient; the output is laid out (B, s, heads,
  head_dim), so ``proj`` saves a view of it), ``cpu`` (CPU flash: the output is (B, heads, s, head_dim), so
  ``proj`` saves a contiguous copy as well) and ``math`` (the path taken on the CPU with a bias that needs a
  gradient: copies of q, k, v instead of the qkv storage, the ``(heads, s, s)`` probabilities instead of
  the log-sum-exp and the bias, and the output copy). The tests measure the ``cpu`` and ``math`` paths;
  ``cuda`` differs from ``cpu`` by the copy only.

A checkpointed block keeps only its input (the recompute source). Backward then needs, besides what is
saved, a working set: the gradients of one block's tensors, and with checkpointing that block's
recomputed activations as well; both are taken as one block's full saved set (an estimate, not measured).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

AttentionKernel = Literal["cuda", "cpu", "math"]
FP32_BYTES = 4
INDEX_BYTES = 8  # int64 gather index of the relative position bias


@dataclass(frozen=True)
class BlockShape:
    """One residual block as the activation model sees it; token counts and FLOPs are per image.

    ``kind`` is ``"mlp"`` (HiViT MLP-only block: norm -> MLP) or ``"attention"`` (norm -> attention -> norm
    -> MLP). ``tokens`` counts every position the block runs on (3136 for 4 x 4 sub-tokens of 196 patches).
    """

    name: str
    kind: Literal["mlp", "attention"]
    tokens: int
    dim: int
    hidden: int
    heads: int = 0
    layer_scale: bool = False
    relative_position_bias: bool = False
    params: int = 0
    forward_flops: float = 0.0


@dataclass(frozen=True)
class OtherActivations:
    """Saved tensors outside the blocks (patch embed, merges, pyramid glue, heads, loss).

    ``per_image_elements`` scales with the batch; ``fixed_bytes`` does not.
    """

    per_image_elements: int
    per_image_fp32_elements: int = 0
    fixed_bytes: int = 0


@dataclass(frozen=True)
class CheckpointPolicy:
    """Which blocks are activation-checkpointed: none (``every = 0``), all (``1``) or every k-th (``k``),
    counting blocks in forward order from 0 (block 0 is checkpointed when any is)."""

    every: int = 0

    def __post_init__(self) -> None:
        if self.every < 0:
            raise ValueError(f"checkpoint interval must be >= 0, got {self.every}")

    def checkpoints(self, index: int) -> bool:
        return self.every > 0 and index % self.every == 0

    def __str__(self) -> str:
        return {0: "none", 1: "every"}.get(self.every, f"every-{self.every}")

    @classmethod
    def parse(cls, text: str) -> "CheckpointPolicy":
        """``none``, ``every`` or ``every-K`` (K >= 1)."""
        if text == "none":
            return cls(0)
        if text == "every":
            return cls(1)
        prefix = "every-"
        if text.startswith(prefix) and text[len(prefix):].isdigit() and int(text[len(prefix):]) >= 1:
            return cls(int(text[len(prefix):]))
        raise ValueError(f"checkpoint policy must be 'none', 'every' or 'every-K' with K >= 1, got {text!r}")


@dataclass(frozen=True)
class ActivationBytes:
    """Per-GPU activation bytes for one micro-batch."""

    saved: int  # kept from forward to backward
    working: int  # gradients of one block's tensors during its backward
    recompute: int  # one checkpointed block's activations, rebuilt in backward

    @property
    def peak(self) -> int:
        return self.saved + self.working + self.recompute


def block_saved(block: BlockShape, kernel: AttentionKernel, dtype_bytes: int) -> tuple[int, int]:
    """(bytes per image, batch-independent bytes) that one un-checkpointed block saves for backward."""
    s, c, h = block.tokens, block.dim, block.hidden
    ls = int(block.layer_scale)
    mlp_branch = (2 + ls) * c + 2 * h  # norm input, norm output, fc1 output, GELU output, gamma input
    elements = s * mlp_branch
    fp32 = 2 * s  # norm statistics
    fixed = 0
    if block.kind == "attention":
        # norm in/out, gamma input; then q, k, v (one qkv storage, or the math path's three copies) and the
        # attention output that proj saves
        elements += s * ((2 + ls) * c + 3 * c + c)
        fp32 += 2 * s + _logsumexp_elements(s, block.heads, kernel)
        if kernel == "cpu":
            elements += s * c  # CPU flash keeps its (B, heads, s, hd) output and proj a contiguous copy
        if kernel == "math":
            elements += block.heads * s * s  # the probabilities
        if block.relative_position_bias:
            fixed += s * s * INDEX_BYTES  # the gather index into the bias table
            if kernel != "math":
                fixed += block.heads * s * s * dtype_bytes  # the bias, an input the fused kernel saves
    return elements * dtype_bytes + fp32 * FP32_BYTES, fixed


def _logsumexp_elements(tokens: int, heads: int, kernel: AttentionKernel) -> int:
    """The fp32 log-sum-exp that fused attention saves per head and query (padded to 32 queries by the
    memory-efficient CUDA kernel); the math path saves the probabilities instead."""
    if kernel == "math":
        return 0
    if kernel == "cpu":
        return heads * tokens
    return heads * math.ceil(tokens / 32) * 32


def activation_bytes(
    blocks: Sequence[BlockShape],
    other: OtherActivations,
    micro_batch: int,
    policy: CheckpointPolicy,
    *,
    dtype_bytes: int = 2,
    kernel: AttentionKernel = "cuda",
) -> ActivationBytes:
    """Bytes saved for backward by ``micro_batch`` images, and the backward working set, under ``policy``."""
    saved = micro_batch * (other.per_image_elements * dtype_bytes + other.per_image_fp32_elements * FP32_BYTES)
    saved += other.fixed_bytes
    largest_block = 0
    largest_checkpointed = 0
    for index, block in enumerate(blocks):
        per_image, fixed = block_saved(block, kernel, dtype_bytes)
        full = micro_batch * per_image + fixed
        largest_block = max(largest_block, full)
        if policy.checkpoints(index):
            saved += micro_batch * block.tokens * block.dim * dtype_bytes  # the block input
            largest_checkpointed = max(largest_checkpointed, full)
        else:
            saved += full
    return ActivationBytes(saved=saved, working=largest_block, recompute=largest_checkpointed)
