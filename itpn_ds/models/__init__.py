"""The iTPN model zoo: HiViT backbones with iTPN's feature pyramid. On import the classifiers register with
timm; the pre-training and dense task models are ours (``create_model``, ``list_models``)."""
from itpn_ds.models.clip_distill import ClipDistillHeads, ITPNClipDistill
from itpn_ds.models.dense import LAYOUTS, DenseFastITPN, DenseITPN, DenseLayout
from itpn_ds.models.detection import ITPNMaskRCNN, PyramidBackbone, mask_rcnn
from itpn_ds.models.fast_clip_distill import FastITPNClipDistill
from itpn_ds.models.fast_itpn import FastITPN
from itpn_ds.models.itpn import ITPN
from itpn_ds.models.loading import CheckpointMismatchError, LoadReport, load_weights, read_checkpoint_file
from itpn_ds.models.pixel_mae import ITPNPixelMAE
from itpn_ds.models.registry import (CLASSIFIER_CONFIGS, DENSE_MODEL_CONFIGS, MODEL_CONFIGS, PRETRAIN_CONFIGS,
                                     build_dense_backbone, build_dense_model, build_model, create_model, list_models)
from itpn_ds.models.segmentation import FCNHead, SegmentationModel, UPerHead, segmentation_loss, upernet

__all__ = ["ITPN", "ITPNClipDistill", "ITPNPixelMAE", "FastITPN", "FastITPNClipDistill", "ClipDistillHeads",
           "DenseITPN", "DenseFastITPN", "DenseLayout", "LAYOUTS",
           "SegmentationModel", "UPerHead", "FCNHead", "segmentation_loss", "upernet",
           "ITPNMaskRCNN", "PyramidBackbone", "mask_rcnn",
           "load_weights", "read_checkpoint_file", "LoadReport", "CheckpointMismatchError",
           "MODEL_CONFIGS", "CLASSIFIER_CONFIGS", "PRETRAIN_CONFIGS", "DENSE_MODEL_CONFIGS", "build_model",
           "build_dense_backbone", "build_dense_model", "create_model", "list_models"]
