"""Exact top-1/top-5 over the whole validation split.

Each rank counts correct predictions on its share of the split (the val loader yields every sample exactly
once across ranks); the COUNTS are summed over ranks, never averaged percentages, so 1 and N processes report
the same numbers for the same weights. Several models (the model and its EMA) are evaluated on one pass over
the loader: each batch is read and decoded once and goes through every model.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from training import dist
from training.step import autocast


@torch.no_grad()
def evaluate_models(
    models: Mapping[str, nn.Module],
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    device: torch.device,
    precision: str = "bf16",
) -> dict[str, dict]:
    """{name: evaluate()'s result for that model}, all from ONE pass over `loader` (the val split is read and
    decoded once, not once per model). Pass bare models, not DDP wrappers (see `evaluate`)."""
    was_training = {name: model.training for name, model in models.items()}
    for model in models.values():
        model.eval()
    # Counts accumulate on the device; reading them once at the end is the only sync.
    # One row per model: correct1, correct5, total, loss sum.
    counts = torch.zeros(len(models), 4, dtype=torch.float64, device=device)
    for images, labels in loader:
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        if precision == "fp32":
            images = images.float()
        for row, model in zip(counts, models.values(), strict=True):
            with autocast(device, precision):
                logits = model(images)
            logits = logits.float()
            k = min(5, logits.shape[1])
            top = logits.topk(k, dim=1).indices  # (N, k), best first
            hits = top == labels[:, None]
            row[0] += hits[:, 0].sum()
            row[1] += hits.any(dim=1).sum()
            row[2] += labels.numel()
            row[3] += nn.functional.cross_entropy(logits, labels, reduction="sum")
    dist.all_reduce_sum(counts)
    results = {}
    for name, (correct1, correct5, total, loss_sum) in zip(models, counts.tolist(), strict=True):  # a sync point
        models[name].train(was_training[name])
        total = int(total)
        results[name] = {
            "correct1": int(correct1),
            "correct5": int(correct5),
            "total": total,
            "top1": 100.0 * correct1 / total if total else 0.0,
            "top5": 100.0 * correct5 / total if total else 0.0,
            "loss": loss_sum / total if total else 0.0,
        }
    return results


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
    return evaluate_models({"model": model}, loader, device=device, precision=precision)["model"]


def with_ema(results: dict[str, dict]) -> dict:
    """evaluate_models' {"model": ..., "ema": ...} as one flat record: the model's keys, then the EMA's
    prefixed `ema_` (its `total` is the model's)."""
    record = dict(results["model"])
    if "ema" in results:
        record.update({f"ema_{key}": value for key, value in results["ema"].items() if key != "total"})
    return record
