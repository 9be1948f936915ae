"""SGD or AdamW with the ImageNet recipes' parameter groups, and the per-step LR schedule (warm-up, then cosine,
linear or step decay).

No LAMB: torch has none, and the well-kept implementations are timm's (a dependency of its own with
huggingface_hub and safetensors, for one optimizer) and apex's FusedLAMB (a CUDA extension built from source).
LAMB pays off at global batches of 16k and more; up to there SGD and AdamW with warm-up are what DLE, FFCV,
torchvision and ConvNeXt train ImageNet with.
"""

from __future__ import annotations

import math

import torch
from torch import nn

#: Parameters that get no weight decay whatever their shape, by the last part of their name: torchvision's
#: ConvNeXt keeps each block's layer scale as a (dim, 1, 1) tensor where ConvNeXt's own code has a 1-D `gamma`,
#: which its optim_factory (1-D parameters and biases get no decay) exempts.
NO_DECAY_NAMES: tuple[str, ...] = ("layer_scale",)


def parameter_groups(model: nn.Module, *, weight_decay: float) -> list[dict]:
    """Two groups: conv/linear weights get `weight_decay`; every tensor with fewer than 2 dims (BN/LayerNorm
    parameters, biases) and the parameters named in NO_DECAY_NAMES get none (decaying BN scales hurts
    accuracy). This is ConvNeXt's and timm's rule. DLE and FFCV exempt the parameters whose name contains
    "bn" instead, so on a ResNet they also decay the downsample BNs and the fc bias (the recipes say so)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            exempt = param.ndim <= 1 or name.rsplit(".", 1)[-1] in NO_DECAY_NAMES
            (no_decay if exempt else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(
    model: nn.Module,
    *,
    lr: float,
    name: str = "sgd",
    momentum: float = 0.9,
    nesterov: bool = True,
    weight_decay: float = 5e-5,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.Optimizer:
    """`name` "sgd" (momentum, optionally Nesterov; L2 decay) or "adamw" (`betas`, `eps`; decoupled decay).
    Fused on CUDA (one kernel for all parameters; the GradScaler's overflow check stays on the device),
    foreach on CPU. `lr` is the peak LR already scaled with the global batch (see TrainConfig.peak_lr)."""
    on_cuda = next(model.parameters()).is_cuda
    groups = parameter_groups(model, weight_decay=weight_decay)
    fast = dict(fused=on_cuda or None, foreach=None if on_cuda else True)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0, **fast)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, **fast)
    raise ValueError(f"--optimizer: unknown optimizer {name!r}; choose sgd or adamw")


def lr_factor(
    step: int,
    *,
    steps_per_epoch: int,
    epochs: int,
    warmup_epochs: float,
    schedule: str = "cosine",
    milestones: tuple[int, ...] = (30, 60, 80),
    gamma: float = 0.1,
) -> float:
    """Multiplier of the peak LR for optimizer step `step` (0-based).

    Linear warm-up from 1/warmup_steps to 1 over `warmup_epochs` (Goyal et al. 2017), then cosine to 0 at
    the end of `epochs`, linear to 0 there (FFCV's schedule), or a step decay by `gamma` at each milestone epoch.
    """
    warmup_steps = round(warmup_epochs * steps_per_epoch)
    total_steps = epochs * steps_per_epoch
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "linear":
        return 1.0 - progress
    epoch = step // steps_per_epoch
    return gamma ** sum(epoch >= m for m in milestones)


def build_scheduler(optimizer: torch.optim.Optimizer, **schedule) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR stepped once per optimizer step; `schedule` are lr_factor's keyword arguments."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, **schedule))
