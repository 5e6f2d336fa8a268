"""Semantic segmentation: UperNet (mmseg's ``UPerHead``) and the auxiliary FCN head on a dense iTPN backbone.

As the published ADE20K configs (seg/configs/itpn, mmseg's ``upernet`` base): the decode head takes the four
levels of the ``segmentation`` layout (strides 4-32), runs a pyramid pooling module (scales 1, 2, 3, 6) on the
coarsest, fuses top-down as an FPN and predicts at stride 4 from the concatenation of all fused levels;
the auxiliary FCN head (one 3×3 conv, 256 channels) predicts from level ``aux_in_index`` = 2 (stride 16)
with loss weight 0.4. Every conv is conv (no bias) + BatchNorm + ReLU (mmcv's ``ConvModule`` with SyncBN in
the published runs), dropout 0.1 before each classifier, bilinear resizes with ``align_corners=False``.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from itpn_ds.models.dense import DenseTaskModel

IGNORE_INDEX = 255
AUX_LOSS_WEIGHT = 0.4


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    """Conv (same padding, no bias) -> BatchNorm -> ReLU; the conv kaiming-initialised (fan-out), as mmcv."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return nn.Sequential(conv, nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


def classifier(channels: int, num_classes: int) -> nn.Conv2d:
    """The 1×1 classification conv, normal(std 0.01) weights and zero bias, as mmseg's ``conv_seg``."""
    conv = nn.Conv2d(channels, num_classes, 1)
    nn.init.normal_(conv.weight, std=0.01)
    nn.init.zeros_(conv.bias)
    return conv


def resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def upsample_logits(logits: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Logits (B, K, h, w) -> (B, K, H, W) at the label size ``size`` = (H, W), bilinear."""
    return logits if tuple(logits.shape[-2:]) == tuple(size) else resize(logits, size)


class UPerHead(nn.Module):
    """Levels [(B, C_i, H/s_i, W/s_i)] finest first -> logits (B, num_classes, H/s_0, W/s_0)."""

    def __init__(self, in_channels: Sequence[int], channels: int = 768, num_classes: int = 150,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1):
        super().__init__()
        *finer, coarsest = in_channels
        self.psp_modules = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(scale), conv_bn_relu(coarsest, channels, 1)) for scale in pool_scales)
        self.psp_bottleneck = conv_bn_relu(coarsest + len(pool_scales) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList(conv_bn_relu(c, channels, 1) for c in finer)
        self.fpn_convs = nn.ModuleList(conv_bn_relu(channels, channels, 3) for _ in finer)
        self.fpn_bottleneck = conv_bn_relu(len(in_channels) * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = classifier(channels, num_classes)

    def pyramid_pooling(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, channels, h, w): x with its pooled-and-upsampled copies, fused by a 3×3 conv."""
        pooled = [resize(stage(x), x.shape[-2:]) for stage in self.psp_modules]
        return self.psp_bottleneck(torch.cat([x, *pooled], dim=1))

    def forward(self, levels: Sequence[torch.Tensor]) -> torch.Tensor:
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, levels[:-1])] + [self.pyramid_pooling(levels[-1])]
        for i in range(len(laterals) - 1, 0, -1):  # top-down
            laterals[i - 1] = laterals[i - 1] + resize(laterals[i], laterals[i - 1].shape[-2:])
        fused = [conv(x) for conv, x in zip(self.fpn_convs, laterals[:-1])] + [laterals[-1]]
        size = fused[0].shape[-2:]
        fused = torch.cat([fused[0], *(resize(x, size) for x in fused[1:])], dim=1)
        return self.conv_seg(self.dropout(self.fpn_bottleneck(fused)))


class FCNHead(nn.Module):
    """Auxiliary head: level ``in_index`` (B, C, h, w) -> ``num_convs`` 3×3 convs -> logits (B, K, h, w)."""

    def __init__(self, in_channels: int, channels: int = 256, num_classes: int = 150, num_convs: int = 1,
                 in_index: int = 2, dropout: float = 0.1):
        super().__init__()
        self.in_index = in_index
        self.convs = nn.Sequential(*(conv_bn_relu(in_channels if i == 0 else channels, channels, 3)
                                     for i in range(num_convs)))
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = classifier(channels, num_classes)

    def forward(self, levels: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.conv_seg(self.dropout(self.convs(levels[self.in_index])))


class SegmentationOutput(NamedTuple):
    logits: torch.Tensor                # (B, K, H/4, W/4)
    aux_logits: torch.Tensor | None     # (B, K, H/16, W/16) in training with an auxiliary head, else None


class SegmentationModel(DenseTaskModel, nn.Module):
    """Dense backbone -> decode head (+ auxiliary head in training).

    forward: images (B, 3, H, W), sides multiples of the backbone's coarsest stride -> ``SegmentationOutput``;
    ``upsample_logits`` brings logits to the label size, ``segmentation_loss`` is the published loss.
    """

    backbone_prefix = "backbone."

    def __init__(self, backbone: nn.Module, decode_head: nn.Module, aux_head: nn.Module | None = None):
        super().__init__()
        self.backbone = backbone
        self.decode_head = decode_head
        self.aux_head = aux_head

    def forward(self, images: torch.Tensor) -> SegmentationOutput:
        levels = self.backbone(images)
        aux = self.aux_head(levels) if self.training and self.aux_head is not None else None
        return SegmentationOutput(self.decode_head(levels), aux)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) -> class scores (B, K, H, W) at the input size (whole-image inference)."""
        return upsample_logits(self(images).logits, images.shape[-2:])


def segmentation_loss(output: SegmentationOutput, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                      aux_weight: float = AUX_LOSS_WEIGHT) -> torch.Tensor:
    """Cross-entropy of the decode logits, + ``aux_weight`` × that of the auxiliary logits when present, each
    upsampled to the labels (B, H, W) int64; pixels equal to ``ignore_index`` do not count."""
    def ce(logits: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(upsample_logits(logits, labels.shape[-2:]).float(), labels, ignore_index=ignore_index)

    loss = ce(output.logits)
    return loss if output.aux_logits is None else loss + aux_weight * ce(output.aux_logits)


def upernet(backbone: nn.Module, num_classes: int = 150, channels: int = 768, pool_scales: Sequence[int] = (1, 2, 3, 6),
            aux_channels: int = 256, aux_in_index: int = 2, dropout: float = 0.1) -> SegmentationModel:
    """UperNet + auxiliary FCN head on a dense backbone (its ``feature_info`` gives the input channels);
    ``aux_channels`` 0: no auxiliary head. Defaults: the published ADE20K configs."""
    in_channels = [info["num_chs"] for info in backbone.feature_info]
    decode = UPerHead(in_channels, channels, num_classes, pool_scales, dropout)
    aux = FCNHead(in_channels[aux_in_index], aux_channels, num_classes, in_index=aux_in_index,
                  dropout=dropout) if aux_channels else None
    return SegmentationModel(backbone, decode, aux)
