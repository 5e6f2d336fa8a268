"""itpn-ds: iTPN (HiViT + feature pyramid, CLIP-target masked image modeling) on DeepSpeed + DALI.

Data flow: shards (``itpn_ds.data``) -> DALI pipeline -> (teacher cache, ``itpn_ds.teacher``)
-> model (``itpn_ds.models``) -> engine (``itpn_ds.engine``) -> checkpoints / tracking
(``itpn_ds.tracking``).

Importing the package registers the iTPN models with timm (``timm.create_model("itpn_base_...")``).
"""
from itpn_ds import models  # noqa: F401  (registers the timm model names)

__version__ = "0.1.0"
