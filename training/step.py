"""One optimizer step, short enough to read at once. The profiler imports it so both time the same code."""

from __future__ import annotations

import torch
from torch import nn

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def autocast(device: torch.device, precision: str) -> torch.autocast:
    """The one mixed-precision path: autocast always, disabled (a no-op) for fp32."""
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision], enabled=precision != "fp32")


class TrainStep:
    """forward + loss + backward + optimizer step, with no host sync.

    `model` may be DDP-wrapped; `compile=True` wraps it in torch.compile (the first calls compile).
    The GradScaler exists for every precision so checkpoints have one shape, but is enabled only for fp16:
    bf16 has fp32's exponent range and needs no loss scaling.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        precision: str = "bf16",
        compile: bool = False,
        label_smoothing: float = 0.1,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    ) -> None:
        self.device = next(model.parameters()).device
        self.model = torch.compile(model) if compile else model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.precision = precision
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=precision == "fp16")

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One step on one batch; returns the detached loss on the device (reading it is a sync point)."""
        if self.precision == "fp32":
            # The loader hands fp16; fp32 runs without autocast, so cast here (memory format is kept).
            images = images.float()
        with autocast(self.device, self.precision):
            loss = self.criterion(self.model(images), labels)
        self.scaler.scale(loss).backward()  # DDP all-reduces gradients during backward
        # fp16: skips the step if a gradient overflowed. Fused SGD (CUDA) reads the scale and the overflow
        # flag on the device; other optimizers make the scaler read the flag with .item(), a sync point.
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)  # frees the grads instead of writing zeros
        if self.scheduler is not None:
            self.scheduler.step()  # per-step schedule: warm-up is linear in steps, not epochs
        return loss.detach()
