"""The iTPN model zoo: HiViT backbones with iTPN's feature pyramid, registered with timm on import."""
from itpn_ds.models.clip_distill import ClipDistillHeads, ITPNClipDistill
from itpn_ds.models.fast_clip_distill import FastITPNClipDistill
from itpn_ds.models.fast_itpn import FastITPN
from itpn_ds.models.itpn import ITPN
from itpn_ds.models.loading import CheckpointMismatchError, LoadReport, load_weights, read_checkpoint_file
from itpn_ds.models.pixel_mae import ITPNPixelMAE
from itpn_ds.models.registry import MODEL_CONFIGS, build_model

__all__ = ["ITPN", "ITPNClipDistill", "ITPNPixelMAE", "FastITPN", "FastITPNClipDistill", "ClipDistillHeads",
           "load_weights", "read_checkpoint_file", "LoadReport", "CheckpointMismatchError",
           "MODEL_CONFIGS", "build_model"]
