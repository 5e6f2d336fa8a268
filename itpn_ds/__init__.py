"""itpn-ds: iTPN (HiViT + feature pyramid, CLIP-target masked image modeling) on DeepSpeed + DALI.

Data flow: shards (``itpn_ds.data``) -> DALI pipeline -> (teacher cache, ``itpn_ds.teacher``)
-> model (``itpn_ds.models``) -> engine (``itpn_ds.engine``) -> checkpoints / tracking
(``itpn_ds.tracking``).

``import itpn_ds.models`` registers the iTPN classifiers with timm (``timm.create_model("itpn_base_...")``).
The package itself imports nothing: a launcher helper (``itpn_ds.torchrun``, ``itpn_ds.distributed``) or a data
tool starts without torch, timm and the model zoo.
"""
__version__ = "0.1.0"
