"""Offline data tools: demo images, shard writing and verification, teacher extraction (``itpn-ds`` subcommands)."""
