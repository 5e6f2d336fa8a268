"""Memory and throughput planning for iTPN pre-training at scale (``itpn-ds plan-scaling``, ``itpn-ds plan-cache``).

The planning layer sits above the engine: it reads the registered models, DeepSpeed's bucket rule and the
teacher cache's row format, and nothing below imports it.

- ``memory``: GPU presets and per-GPU model-state bytes under ZeRO stages 0-3;
- ``activations``: the analytic bytes saved for backward per block type, under a checkpoint policy;
- ``validate``: measures those bytes on a real (small) model, to check the analytic model;
- ``throughput``: FLOPs per step, the CLIP teacher's FLOPs, ZeRO communication volume;
- ``spec``: reads parameter counts, blocks and FLOPs off the real registered model on the meta device;
- ``plan`` / ``search``: one configuration's row, and the searches the docs show;
- ``cache_plan``: a teacher cache's bytes, files and read bandwidth before it is written;
- ``command``: the CLI.
"""
