"""Exponential moving average of the weights for fine-tuning (``finetune.ema_decay``).

After every applied optimizer step ``ema = decay * ema + (1 - decay) * w``, in fp32, for the weights as this
rank stores them: the full tensors under ZeRO stages 0-2 (the same on every rank), this rank's partition
(``ds_tensor``) under ZeRO-3 (parameters ZeRO-3 keeps whole, ``ds_persist``, are averaged whole). So the
average costs one fp32 copy of what the rank holds, and no communication.

``applied()`` swaps the averaged weights into the model for an evaluation or an export and swaps the
trained ones back. The state goes into each rank's checkpoint file; a checkpoint resumed under another
world size keeps it when the shapes still match (stages 0-2) and otherwise restarts it from the weights.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

from itpn_ds.engine.memory import local_weight

log = logging.getLogger(__name__)


class WeightEma:
    """EMA of ``module``'s trainable parameters (names as in ``module.named_parameters()``)."""

    def __init__(self, module: nn.Module, decay: float) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.params = {name: p for name, p in module.named_parameters() if p.requires_grad}
        self.shadow = self._copy_weights()
        self.updates = 0

    def _copy_weights(self) -> dict[str, torch.Tensor]:
        return {name: local_weight(p).detach().float().clone() for name, p in self.params.items()}

    @torch.no_grad()
    def update(self) -> None:
        """Fold the current weights in (call after each applied optimizer step)."""
        for name, param in self.params.items():
            self.shadow[name].lerp_(local_weight(param).float(), 1 - self.decay)
        self.updates += 1

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The averaged weights in the model inside the block; the trained ones restored after it."""
        trained = {name: local_weight(p).detach().clone() for name, p in self.params.items()}
        with torch.no_grad():
            for name, param in self.params.items():
                local_weight(param).copy_(self.shadow[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, param in self.params.items():
                    local_weight(param).copy_(trained[name])

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load a saved average; one whose tensors no longer match this rank's restarts from the weights."""
        shadow = state["shadow"]
        mine = {name: tuple(t.shape) for name, t in self.shadow.items()}
        if {name: tuple(t.shape) for name, t in shadow.items()} != mine:
            log.warning("weight EMA of the checkpoint does not match this rank's parameters (another ZeRO-3 "
                        "partitioning): the average restarts from the current weights")
            self.shadow, self.updates = self._copy_weights(), 0
            return
        self.shadow = {name: t.float().clone() for name, t in shadow.items()}
        self.updates = int(state["updates"])
