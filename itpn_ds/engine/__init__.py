"""The DeepSpeed training engine: one loop, one checkpoint format for pre-training and fine-tuning.

Commands live in ``itpn_ds.engine.commands``; the modules follow the data flow of a step (components ->
tasks -> trainer -> checkpoint / export / telemetry). See docs/engine.md.
"""
