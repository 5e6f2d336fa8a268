"""The DeepSpeed training engine: one loop, one checkpoint format for pre-training and fine-tuning.

Commands live in ``itpn_ds.engine.commands``; each task (its config section, checks, loaders, loss and evaluation)
is a module of ``itpn_ds.engine.tasks``, registered by name; the modules follow the data flow of a step (model and
loaders -> task -> trainer -> checkpoint / export / telemetry). See docs/engine.md.
"""
