"""Size of a teacher cache before writing it: bytes and files for (images, K, dtype, teacher).

Byte model per row (one view of one sample): the targets (T*D x 2 bytes fp16, or T*D x 1 + T x 4 bytes of
scales int8), the key (its UTF-8 bytes + a 4-byte offset), view (2), box (16), flip (1 bit) and the
colour-jitter factors (3 x 4) and the row's CRC32 (4). Arrow adds a little per record batch and per file;
``tests/test_cache_plan.py`` checks the model against a written file.

Read bandwidth: training reads one view (one row) per image it trains on, so a node consuming ``r``
images/s reads ``r x bytes_per_view`` bytes/s of targets (random rows within each file), and the cluster
``nodes`` times that. What those bytes save is the teacher's forward pass on every image
(``vit_forward_flops`` of the teacher, FLOP/s = FLOPs per image x images/s).
"""
from __future__ import annotations

from dataclasses import dataclass

from itpn_ds.data.shards import ShardLayout
from itpn_ds.scaling.throughput import CLIP_B16_224, CLIP_L14_196, ViTSpec, vit_forward_flops
from itpn_ds.teacher.cache_format import DTYPES, JITTER_FIELDS

# The teachers at their default resolution (ViT-L/14 at 196 px, ViT-B/16 at 224 px), and the (tokens, dim)
# of their targets: the patch tokens (class token dropped) x the projection width.
TEACHER_VITS: dict[str, ViTSpec] = {"ViT-L-14": CLIP_L14_196, "ViT-B-16": CLIP_B16_224}
TEACHER_SHAPES = {name: (vit.patches, vit.out_dim) for name, vit in TEACHER_VITS.items()}
# The scaling plan's iTPN-L (clip_tpn_large_2240_patch16_224) rate with cached targets: 60,980 images/s on
# 64 H100s at 40 % utilization (docs/scaling.md), 953 per GPU: 60,980 / 8 per node of 8 GPUs.
PLANNED_IMAGES_PER_S_PER_NODE = 7_622
IMAGENET_1K_IMAGES = 1_281_167
# Assumed when no shard directory is given: ImageNet-1K's train split (ILSVRC2012_img_train.tar, 147,897,477,120
# bytes of JPEGs) through make-shards' default 1 GiB shards, which cut it into about 138.
IMAGENET_1K_LAYOUT = ShardLayout(images=IMAGENET_1K_IMAGES, shards=138, bytes=147_897_477_120)
FILE_OVERHEAD_BYTES = 4096      # schema + metadata + footer, generous
BATCH_OVERHEAD_BYTES = 1024     # record-batch message header + buffer padding, generous
SAMPLES_PER_BATCH = 64          # CacheFileWriter's default


@dataclass(frozen=True)
class CachePlan:
    """bytes_per_view: one row; total_bytes: the whole cache; read_bytes_per_epoch: one view per image."""

    num_images: int
    num_views: int
    dtype: str
    num_tokens: int
    dim: int
    files: int
    bytes_per_view: int
    total_bytes: int

    @property
    def read_bytes_per_epoch(self) -> int:
        return self.num_images * self.bytes_per_view


def row_bytes(num_tokens: int, dim: int, dtype: str, key_bytes: float) -> float:
    """Bytes of one row of a cache file (see the module docstring)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    targets = num_tokens * dim * 2 if dtype == "fp16" else num_tokens * dim + 4 * num_tokens
    return targets + key_bytes + 4 + 2 + 16 + 1 / 8 + 4 * JITTER_FIELDS + 4  # the last 4: the row's CRC32


def plan_cache(num_images: int, num_views: int, dtype: str, num_tokens: int, dim: int, files: int,
               key_bytes: int = 24) -> CachePlan:
    """Bytes of a cache of ``num_images`` x ``num_views`` rows over ``files`` files (one per shard)."""
    per_row = row_bytes(num_tokens, dim, dtype, key_bytes)
    batches = files * (-(-num_images // files) // SAMPLES_PER_BATCH + 1)
    total = num_images * num_views * per_row + batches * BATCH_OVERHEAD_BYTES + files * FILE_OVERHEAD_BYTES
    return CachePlan(num_images, num_views, dtype, num_tokens, dim, files, round(per_row), round(total))


def plan_for_teacher(arch: str, layout: ShardLayout = IMAGENET_1K_LAYOUT, num_views: int = 8,
                     dtype: str = "fp16") -> CachePlan:
    """``plan_cache`` over ``layout``'s images and shards (one cache file per shard) with a named teacher's
    (tokens, dim) from ``TEACHER_SHAPES``."""
    if arch not in TEACHER_SHAPES:
        raise ValueError(f"unknown teacher {arch!r}; known: {sorted(TEACHER_SHAPES)} (or call plan_cache)")
    tokens, dim = TEACHER_SHAPES[arch]
    return plan_cache(layout.images, num_views, dtype, tokens, dim, layout.shards)


@dataclass(frozen=True)
class CacheReads:
    """The cache's read bandwidth at a training rate, and the teacher compute the reads replace.

    bytes_per_view: one row (``CachePlan.bytes_per_view``); images_per_s_per_node: the node's training rate;
    teacher_flops_per_image: the teacher's forward FLOPs per image (0 when unknown)."""

    bytes_per_view: int
    images_per_s_per_node: float
    nodes: int
    teacher_flops_per_image: float = 0.0

    @property
    def node_bytes_per_s(self) -> float:
        return self.images_per_s_per_node * self.bytes_per_view

    @property
    def cluster_bytes_per_s(self) -> float:
        return self.nodes * self.node_bytes_per_s

    @property
    def node_teacher_flops_per_s(self) -> float:
        """Teacher FLOP/s one node would spend computing the targets online."""
        return self.images_per_s_per_node * self.teacher_flops_per_image


def cache_reads(plan: CachePlan, images_per_s_per_node: float, nodes: int, arch: str | None = None) -> CacheReads:
    """``plan``'s read bandwidth at ``images_per_s_per_node`` on ``nodes`` nodes; ``arch`` (a key of
    ``TEACHER_VITS``) adds the teacher FLOP/s the cache saves."""
    if images_per_s_per_node <= 0 or nodes < 1:
        raise ValueError(f"need a positive rate and >= 1 node, got {images_per_s_per_node} images/s, {nodes} nodes")
    flops = vit_forward_flops(TEACHER_VITS[arch]) if arch in TEACHER_VITS else 0.0
    return CacheReads(plan.bytes_per_view, images_per_s_per_node, nodes, flops)
