"""An exponential moving average of the model's weights, evaluated next to the model and checkpointed with it.

The average starts as a copy of the model (timm's ModelEma) and, every `every` optimizer steps, becomes
`decay * ema + (1 - decay) * model` for every parameter and floating-point buffer (BN running statistics, as in
timm's and torchvision's EMA); integer buffers (BN's batch counter) are copied. The update is torch's own
foreach EMA (torch.optim.swa_utils.get_ema_multi_avg_fn: one lerp kernel for all tensors) on the model's device.
Not AveragedModel itself: its update counter is a tensor it reads and moves to the device on every update, a
host sync each step on a GPU. With `every` > 1 each update uses the same `decay`, so the average spans about
every / (1 - decay) optimizer steps.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.optim.swa_utils import get_ema_multi_avg_fn


def _tensors(model: nn.Module) -> list[torch.Tensor]:
    return [*model.parameters(), *model.buffers()]


class WeightEMA:
    """EMA of `model` (the bare module, not a DDP or compiled wrapper); `update()` after each optimizer step."""

    def __init__(self, model: nn.Module, *, decay: float, every: int = 1) -> None:
        self.decay, self.every = decay, every
        self.module = copy.deepcopy(model).requires_grad_(False)  # same device and memory format as the model
        self.optimizer_steps = 0  # steps seen; updates happen on every `every`-th
        pairs = list(zip(_tensors(self.module), _tensors(model), strict=True))
        self._floats = ([e for e, s in pairs if e.is_floating_point()], [s for e, s in pairs if e.is_floating_point()])
        self._counters = [(e, s) for e, s in pairs if not e.is_floating_point()]
        self._lerp = get_ema_multi_avg_fn(decay)

    @torch.no_grad()
    def update(self) -> None:
        self.optimizer_steps += 1
        if self.optimizer_steps % self.every == 0:
            self._lerp(*self._floats, None)  # ema += (1 - decay) * (model - ema), on the device
            for ema, source in self._counters:
                ema.copy_(source)

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "optimizer_steps": self.optimizer_steps}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.optimizer_steps = int(state["optimizer_steps"])


def ema_weights(state: dict) -> dict:
    """The averaged model's state dict from a `WeightEMA.state_dict()` (e.g. a checkpoint's "ema")."""
    return state["module"]
