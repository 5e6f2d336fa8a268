"""Regional compilation: ``torch.compile`` of each repeated block, the way torchtitan's ``apply_compile`` does it.

Every model family keeps its repeated blocks in a few module lists: the backbone's ``blocks`` (MLP-only and
attention blocks of HiViT, ConvMLP and main blocks of Fast-iTPN), the pyramid's ``fpn_modules``,
``block_16to8`` and ``block_8to4``, the CLIP heads' auxiliary ``cls_pt_layers`` and the pixel decoder's
``decoder_blocks``. The ``forward`` of each ``Block`` / ``ConvMlpBlock`` of those lists is compiled in place
(``block.forward = torch.compile(block.forward)``); the merges (one per stage, each of its own shape) and
everything between the lists (embeddings, masking, heads, losses) stay eager.

Why per block and not the whole model: the blocks of one type share one compiled graph (dynamo inlines the
modules and takes their parameters as graph inputs, so a block of the same type and input shape reuses the
code compiled for the first one), which bounds compile time by the number of block types (about 3 for a
classifier, 7 for a CLIP-distillation model) instead of the depth, and leaves the Python between the blocks
(mask checks, the pyramid's bookkeeping) outside any graph.

Why in place and not ``torch.compile(block)``: the block keeps its class, its parameter names (no
``_orig_mod.`` prefix) and its place in the module tree, so checkpoints, weight loading, the EMA, layer-wise
lr decay and ZeRO-3's per-module hooks see the same model as without compilation.

Why ``forward`` and not the whole call (``nn.Module.compile``, which compiles ``_call_impl``): the block's own
hooks stay outside the graph. ZeRO-3 gathers a block's parameters in a forward pre-hook; traced, DeepSpeed's
hooks break the graph and recompile it at every layer (350 recompilations in two steps of the tiny model on
2 ranks, 3.0 s per step against 0.4 s with the hooks outside). The engine makes each compiled block a ZeRO-3 leaf module
(``itpn_ds.engine.runtime.gather_compiled_blocks_whole``), so its layers carry no hooks either.

Composition with activation checkpointing: the model's ``GradCheckpointing.run_block`` decides per block
index at run time and calls ``checkpoint(block, ...)`` around the compiled block. The non-reentrant
checkpoint stores the compiled graph's saved tensors through its pack hooks (that is, drops them) and reruns
the compiled forward in backward, so one compiled graph serves checkpointed and plain blocks alike and
``every_k`` needs no second graph.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch._dynamo
from torch import nn

from itpn_ds.models.layers import Block, ConvMlpBlock

BLOCK_LISTS = ("blocks", "fpn_modules", "block_16to8", "block_8to4", "cls_pt_layers", "decoder_blocks")
REPEATED_BLOCK_TYPES = (Block, ConvMlpBlock)


def repeated_blocks(model: nn.Module) -> Iterator[nn.Module]:
    """The ``Block`` / ``ConvMlpBlock`` entries of the model's block lists (``BLOCK_LISTS``), in order; for a
    dense task model (``DenseTaskModel``: UperNet, Mask R-CNN) those of its backbone (the heads stay eager)."""
    owner = getattr(model, "dense_backbone", model)
    for name in BLOCK_LISTS:
        for block in getattr(owner, name, None) or ():
            if isinstance(block, REPEATED_BLOCK_TYPES):
                yield block


def compile_repeated_blocks(model: nn.Module) -> int:
    """Compile each repeated block of ``model`` in place (static shapes, inductor); returns how many.

    Every graph of every ``Block`` (block type x input shape x train/eval) is a cache entry on the one code
    object of ``Block.forward``; dynamo's default limit of 8 entries per code object would leave the blocks
    beyond it eager (a CLIP-distillation model has 7, a second model in the same process more). The limit is
    raised to twice the number of blocks, which bounds it by the model and still stops runaway recompiles.

    Raises ``ValueError`` for a model without any (it is not one of ours: there would be nothing to compile).
    """
    blocks = list(repeated_blocks(model))
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no repeated blocks in {', '.join(BLOCK_LISTS)} to compile")
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 2 * len(blocks))
    for block in blocks:
        compile_forward(block)
    return len(blocks)


def compile_forward(block: nn.Module) -> None:
    """Compile ``block``'s ``forward`` in place (static shapes, inductor); its hooks stay outside the graph."""
    block.forward = torch.compile(block.forward, dynamic=False)


def compile_report() -> str:
    """This process's compilation so far, from dynamo's counters: graphs compiled, graph breaks (0 for our
    blocks: a break means something untraceable ran inside one), and Inductor's FX graph cache hits and misses
    (``TORCHINDUCTOR_CACHE_DIR``)."""
    from torch._dynamo.utils import counters

    graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    hits, misses = counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"]
    return f"{graphs} graphs, {breaks} graph breaks, Inductor cache {hits} hits {misses} misses"
