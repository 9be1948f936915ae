"""One optimizer step, short enough to read at once. The profiler imports it so both time the same code."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from training.ema import WeightEMA
    from training.mix import BatchMix

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def autocast(device: torch.device, precision: str) -> torch.autocast:
    """The one mixed-precision path: autocast always, disabled (a no-op) for fp32."""
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision], enabled=precision != "fp32")


class TrainStep:
    """forward + loss + backward of one micro-batch; every `grad_accum_steps`-th call also clips, steps the
    optimizer, the LR schedule and the EMA. No host sync.

    `model` may be DDP-wrapped; `compile=True` wraps it in torch.compile (the first calls compile).
    The GradScaler exists for every precision so checkpoints have one shape, but is enabled only for fp16:
    bf16 has fp32's exponent range and needs no loss scaling.
    `mix` (training.mix.BatchMix) turns labels into mixed soft targets; the loss takes class indices or
    probabilities, with label smoothing either way. `ema` (training.ema.WeightEMA) is updated after each
    optimizer step. `micro_steps` counts the micro-batches trained on (a resumed run passes its count): it
    marks the accumulation boundary and seeds the mix.
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
        grad_accum_steps: int = 1,
        clip_grad_norm: float | None = None,
        mix: BatchMix | None = None,
        ema: WeightEMA | None = None,
        micro_steps: int = 0,
    ) -> None:
        self.device = next(model.parameters()).device
        self.ddp = model if isinstance(model, nn.parallel.DistributedDataParallel) else None
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.model = torch.compile(model) if compile else model
        self.optimizer, self.scheduler, self.precision = optimizer, scheduler, precision
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=precision == "fp16")
        self.grad_accum_steps, self.clip_grad_norm = grad_accum_steps, clip_grad_norm
        self.mix, self.ema, self.micro_steps = mix, ema, micro_steps

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Train on one micro-batch; returns its detached loss on the device (reading it is a sync point)."""
        if self.precision == "fp32":
            # The loader hands fp16; fp32 runs without autocast, so cast here (memory format is kept).
            images = images.float()
        targets = labels
        if self.mix is not None:
            images, targets = self.mix(images, labels, index=self.micro_steps)  # on the device
        self.micro_steps += 1
        last = self.micro_steps % self.grad_accum_steps == 0
        # DDP all-reduces gradients during backward; the micro-batches before the last only accumulate them.
        with contextlib.nullcontext() if last or self.ddp is None else self.ddp.no_sync():
            with autocast(self.device, self.precision):
                loss = self.criterion(self.model(images), targets)
            self.scaler.scale(loss / self.grad_accum_steps).backward()
        if last:
            self.optimizer_step()
        return loss.detach()

    def optimizer_step(self) -> None:
        if self.clip_grad_norm is not None:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the loss-scaled ones (fp16)
            nn.utils.clip_grad_norm_(self.params, self.clip_grad_norm)  # foreach; the norm stays on the device
        # fp16: skips the step if a gradient overflowed. Fused SGD/AdamW (CUDA) read the scale and the overflow
        # flag on the device; other optimizers make the scaler read the flag with .item(), a sync point.
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)  # frees the grads instead of writing zeros
        if self.scheduler is not None:
            self.scheduler.step()  # per-step schedule: warm-up is linear in steps, not epochs
        if self.ema is not None:
            self.ema.update()
