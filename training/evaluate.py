"""Exact top-1/top-5 over the whole validation split.

Each rank counts correct predictions on its share of the split (the val loader yields every sample exactly
once across ranks); the COUNTS are summed over ranks, never averaged percentages, so 1 and N processes report
the same numbers for the same weights.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from training import dist
from training.step import autocast


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    device: torch.device,
    precision: str = "bf16",
) -> dict:
    """{"correct1", "correct5", "total", "top1", "top5" (percent), "loss" (mean cross-entropy, no smoothing)}.

    Pass the bare model, not the DDP wrapper: ranks may hold different numbers of val batches, and DDP's
    forward would wait for a buffer broadcast from ranks that have already finished.
    """
    was_training = model.training
    model.eval()
    # Counts accumulate on the device; reading them once at the end is the only sync.
    counts = torch.zeros(4, dtype=torch.float64, device=device)  # correct1, correct5, total, loss sum
    for images, labels in loader:
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        if precision == "fp32":
            images = images.float()
        with autocast(device, precision):
            logits = model(images)
        logits = logits.float()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices  # (N, k), best first
        hits = top == labels[:, None]
        counts[0] += hits[:, 0].sum()
        counts[1] += hits.any(dim=1).sum()
        counts[2] += labels.numel()
        counts[3] += nn.functional.cross_entropy(logits, labels, reduction="sum")
    dist.all_reduce_sum(counts)
    correct1, correct5, total, loss_sum = counts.tolist()  # .tolist() is a sync point
    model.train(was_training)
    total = int(total)
    return {
        "correct1": int(correct1),
        "correct5": int(correct5),
        "total": total,
        "top1": 100.0 * correct1 / total if total else 0.0,
        "top5": 100.0 * correct5 / total if total else 0.0,
        "loss": loss_sum / total if total else 0.0,
    }
