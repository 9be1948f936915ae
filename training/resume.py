"""Where a run starts: a checkpoint found and checked against the config, and the position to continue from.

A checkpoint is refused (one line naming the flag) when continuing it would silently change the run: another
architecture or class count, or another global batch (the peak LR and the schedule's length follow it).
In `sample` order (the default) the position inside an epoch is the samples the whole job consumed, so it
continues on any process count, backend or loader thread count that keeps the global batch: the rest of the
epoch is exactly the samples not yet seen (pipeline.order). In `shard` order, and when the order itself changed,
the loader position is restored only when the loader that wrote it is the loader this epoch needs (same
process count, crop size, backend, loader threads, micro-batch and augmentation policy); otherwise the
epoch's data order restarts, and the run says so.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipeline.base import STATE_DEFAULTS
from training import checkpoint
from training.config import ConfigError, TrainConfig, flag


@dataclass(frozen=True)
class ResumePoint:
    """The position a run continues from (all zero for a fresh run)."""

    epoch: int  # the epoch in progress
    step: int  # optimizer steps already taken
    step_in_epoch: int  # steps already taken in `epoch`
    loader_seed: int  # seed of the train loader of `epoch`
    loader_state: dict | None  # the saved loader position to continue from, or None to start the epoch's order


def load_checkpoint(cfg: TrainConfig, run_dir: Path, *, world_size: int, say: Callable[[str], None]) -> dict | None:
    """The checkpoint `--resume` names (or the newest one for `auto`), checked against `cfg`; None to start."""
    path = checkpoint.resolve(cfg.resume, run_dir)
    if cfg.resume is None and not cfg.evaluate_only and checkpoint.list_checkpoints(run_dir):
        # a fresh run would rotate its own early checkpoints away behind the old run's newer ones, and a later
        # --resume auto would continue the old run
        raise ConfigError(f"--run-dir: {run_dir} holds checkpoints of an earlier run (newest "
                          f"{checkpoint.list_checkpoints(run_dir)[-1].name}); pass --resume auto to continue it, "
                          "or another --run-dir")
    if path is None:
        if cfg.resume == "auto":
            if cfg.evaluate_only and cfg.pretrained is None:
                raise ConfigError(f"--evaluate-only: --resume auto found no checkpoint in "
                                  f"{run_dir / checkpoint.CHECKPOINT_DIR}")
            say(f"--resume auto: no checkpoint in {run_dir / checkpoint.CHECKPOINT_DIR}, starting")
        return None
    ckpt = checkpoint.load(path)
    saved = ckpt.get("config", {})
    for name in ("arch", "num_classes"):
        if name in saved and saved[name] is not None and saved[name] != getattr(cfg, name) and (
            name != "num_classes" or cfg.num_classes is not None
        ):
            raise ConfigError(
                f"{flag(name)}: {path} was trained with {name}={saved[name]!r}, "
                f"not {getattr(cfg, name)!r}"
            )
    if not cfg.evaluate_only and "batch_size" in saved:
        # The peak LR and the steps per epoch follow the global batch; the scheduler's state holds both,
        # so continuing with another global batch would silently keep the old LR on a misplaced curve.
        old = saved.get("global_batch_size") or saved["batch_size"] * ckpt["world_size"] * saved.get(
            "grad_accum_steps", 1)
        new = cfg.global_batch(world_size)
        if old != new:
            raise ConfigError(
                f"--global-batch-size: {path} was trained with a global batch of {old} on "
                f"{ckpt['world_size']} process(es); this run's is {new}. Pass --global-batch-size {old} "
                "to continue its schedule"
            )
    say(f"resuming from {path} (epoch {ckpt['epoch']}, step {ckpt['step']})")
    return {**ckpt, "path": str(path)}


def resume_point(ckpt: dict | None, cfg: TrainConfig, *, rank: int, world_size: int,
                 say: Callable[[str], None]) -> ResumePoint:
    """Where to continue: the checkpoint's epoch and step, and its loader position when it can be used."""
    if ckpt is None:
        return ResumePoint(0, 0, 0, cfg.seed, None)
    epoch, step_in_epoch = ckpt["epoch"], ckpt["step_in_epoch"]
    states = ckpt["loader_states"]
    same_processes = ckpt["world_size"] == world_size
    saved_order = states[0].get("order", STATE_DEFAULTS["order"])
    if cfg.order == "sample" and saved_order == "sample":
        # the loader continues at the job's position, exactly when it is the loader that saved it (pipeline.base)
        return ResumePoint(epoch, ckpt["step"], step_in_epoch, ckpt["loader_seed"],
                           states[rank if same_processes else 0])
    state = states[rank] if same_processes else {}
    saved = ckpt.get("config", {})
    written = (ckpt["world_size"], ckpt["image_size"], saved.get("backend"), saved.get("num_threads"),
               state.get("batch_size"), state.get("augment", STATE_DEFAULTS["augment"]), saved_order)
    wanted = (world_size, cfg.image_size_at(epoch), cfg.backend, cfg.num_threads, cfg.per_process_batch(world_size),
              cfg.augment_policy().spec, cfg.order)
    if written == wanted:
        return ResumePoint(epoch, ckpt["step"], step_in_epoch, ckpt["loader_seed"], state)
    if step_in_epoch:
        names = ("processes", "crop size", "--backend", "--num-threads", "micro-batch", "--augment", "--order")
        changed = ", ".join(f"{n} {w} -> {x}" for n, w, x in zip(names, written, wanted, strict=True) if w != x)
        say(f"warning: {ckpt['path']}: {changed} since the checkpoint; the data order of epoch {epoch} restarts"
            + (" (--order sample continues mid-epoch on another topology)" if cfg.order == "shard" else ""))
    return ResumePoint(epoch, ckpt["step"], step_in_epoch, restart_seed(cfg, epoch, step_in_epoch), None)


def restart_seed(cfg: TrainConfig, epoch: int, step_in_epoch: int) -> int:
    """The seed of a loader whose epoch order restarts. At an epoch's start, the epoch's own seed (a later epoch's
    order is not epoch 0's). Mid-epoch, another one: the steps already taken stay taken, and the same seed would
    deal their batches again first (a restart at step 7 of epoch 0 trained 56 of 120 samples twice, 56 never)."""
    return cfg.seed + epoch + (1_000_003 * step_in_epoch if step_in_epoch else 0)


def restore_scaler(scaler, saved: dict, *, say: Callable[[str], None]) -> None:
    """Load a checkpoint's GradScaler state. A bf16/fp32 run's scaler is disabled and saves nothing: continued in
    fp16, its enabled scaler starts at the default loss scale instead of failing on the empty state."""
    if saved or not scaler.is_enabled():
        scaler.load_state_dict(saved)
    else:
        say("--precision fp16: the checkpoint has no loss-scaler state (it was not trained in fp16); the loss "
            "scale starts at its default")
