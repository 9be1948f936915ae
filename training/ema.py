"""An exponential moving average of the model's weights, evaluated next to the model and checkpointed with it.

torch.optim.swa_utils.AveragedModel with get_ema_multi_avg_fn: parameters and buffers (BN running statistics,
as timm's and torchvision's EMA) are averaged on the device with one foreach lerp. The first update copies the
model; every later one does `ema = decay * ema + (1 - decay) * model`. Updates happen every `every` optimizer
steps, each with the same `decay`, so the average spans about every / (1 - decay) steps. The update counter
lives on the CPU (AveragedModel reads it on every update), so updating never waits for the GPU.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


class WeightEMA:
    """EMA of `model` (the bare module, not a DDP or compiled wrapper); `update()` after each optimizer step."""

    def __init__(self, model: nn.Module, *, decay: float, every: int = 1) -> None:
        self.source, self.decay, self.every = model, decay, every
        # deep copy on the model's device; n_averaged stays a CPU tensor because AveragedModel is not moved
        self.averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
        self.optimizer_steps = 0  # steps seen, updates happen on every `every`-th

    @property
    def module(self) -> nn.Module:
        """The averaged model, to evaluate (same architecture and memory format as the source)."""
        return self.averaged.module

    @torch.no_grad()
    def update(self) -> None:
        self.optimizer_steps += 1
        if self.optimizer_steps % self.every == 0:
            self.averaged.update_parameters(self.source)

    def state_dict(self) -> dict:
        return {"averaged": self.averaged.state_dict(), "optimizer_steps": self.optimizer_steps}

    def load_state_dict(self, state: dict) -> None:
        self.averaged.load_state_dict(state["averaged"])
        self.optimizer_steps = int(state["optimizer_steps"])


def ema_weights(state: dict) -> dict:
    """The averaged model's own state dict from a `WeightEMA.state_dict()` (e.g. a checkpoint's "ema")."""
    return {k.removeprefix("module."): v for k, v in state["averaged"].items() if k.startswith("module.")}
