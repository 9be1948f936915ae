"""`train(config)`: set the process up, find where to start, build the loaders, then evaluate or fit.

    info    = dist.init()                      rank, world size, device; the process group under torchrun
    ckpt    = resume.load_checkpoint(...)      --resume, checked against the config
    val     = data.make_loader(train=False)    the val loader (also what --evaluate-only needs)
    trainer = trainer.Trainer(...)             train loader, model, optimizer, schedule: nothing written yet
    RUN_DIR/config.json, then trainer.fit()    the loop (training/trainer.py), the summary

Nothing is written to RUN_DIR until every loader and the model were built, so a bad flag, a missing manifest or
an impossible batch size fails with one line and leaves no run directory behind. `saturate train` (and
`torchrun ... -m tools.cli train`) parses the command line in tools/train_cmd.py and calls `train`.
"""

from __future__ import annotations

import contextlib
import copy
import os
import random
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from shards.process import FolderBusy, claim_folder, processes_per_node, remove_stale_temporaries, usable_cpus
from training import checkpoint, dist
from training.config import ConfigError, TrainConfig, validate_environment
from training.data import make_loader
from training.ema import ema_weights
from training.evaluate import evaluate_models, with_ema
from training.metrics import MetricsLog, SampleKeyLog, eval_line, say_on_main, write_json
from training.resume import load_checkpoint, resume_point
from training.trainer import Trainer, model_for_run
from training.tuning import resolve_auto


def train(config: TrainConfig, *, run_tune: Callable[[TrainConfig], dict] | None = None) -> dict:
    """Train (or, with `evaluate_only`, evaluate) as `config` says; returns the summary (same on every rank).

    run_tune: what `--num-threads auto` runs when no tune result matches (the command line passes the
    profiler's short tune; without it, a missing match is a ConfigError saying what to run).
    Raises training.preempt.Preempted after checkpointing when SIGTERM/SIGUSR1 asked the run to stop.
    """
    info = dist.init()
    # process-wide torch settings this run changes, restored so that a caller (a test, a notebook) gets back
    # what it had
    torch_threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        validate_environment(config, world_size=info.world_size, cuda=info.device.type == "cuda")
        config = resolve_auto(config, world_size=info.world_size, is_main=info.is_main, say=say_on_main(info),
                              run_tune=run_tune)
        if info.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(cpu_model_threads(config.num_threads))
        return _run(config, info)
    finally:
        torch.set_num_threads(torch_threads)
        torch.use_deterministic_algorithms(deterministic)
        dist.shutdown()


def cpu_model_threads(loader_threads: int) -> int:
    """Intra-op threads for the model when training on the CPU: this process's share of the cores minus the
    loader's threads. Oversubscribed OpenMP threads spin against the loader's and can make a step 5-10x slower.
    The profiler uses it too, so its CPU ceiling and e2e rows split the cores as training does."""
    return max(1, usable_cpus() // processes_per_node() - loader_threads)


def seed_and_backends(cfg: TrainConfig) -> None:
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # same on every rank: identical initial weights (DDP also broadcasts)
    torch.backends.cudnn.benchmark = not cfg.deterministic  # autotune conv algorithms per input shape
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls/convs on tensor cores (Ampere+)
    torch.backends.cudnn.allow_tf32 = True


def _run(cfg: TrainConfig, info: dist.DistInfo) -> dict:
    say = say_on_main(info)
    run_dir = Path(cfg.run_dir)
    seed_and_backends(cfg)
    with contextlib.ExitStack() as claim:
        # an existing RUN_DIR is claimed before its checkpoints are read (a live holder may write a newer one); a
        # new one once it is made, after everything was built
        claimed = info.is_main and run_dir.is_dir() and claim_run_dir(run_dir, claim)
        return _run_claimed(cfg, info, say=say, run_dir=run_dir, claim=claim, claimed=claimed)


def _run_claimed(cfg: TrainConfig, info: dist.DistInfo, *, say, run_dir: Path, claim: contextlib.ExitStack,
                 claimed: bool) -> dict:
    ckpt = load_checkpoint(cfg, run_dir, world_size=info.world_size, say=say)
    log = MetricsLog(run_dir, enabled=info.is_main)  # creates RUN_DIR at its first record, not here
    val_loader = make_loader(cfg, info, train=False, image_size=cfg.eval_image_size, seed=cfg.seed)
    try:
        trainer = None
        if not cfg.evaluate_only:
            point = resume_point(ckpt, cfg, rank=info.rank, world_size=info.world_size, say=say)
            trainer = Trainer(cfg, info, point=point, val_loader=val_loader, log=log, run_dir=run_dir, say=say)
            if ckpt is not None:
                trainer.restore(ckpt)
        # everything was built: the run directory may now be written
        if info.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            if not claimed:
                claim_run_dir(run_dir, claim)
            # rank 0 is the only writer of checkpoints/: a temporary older than a slow write is a killed one,
            # also when a requeued job's rank 0 runs on another node
            for stale in remove_stale_temporaries(run_dir / checkpoint.CHECKPOINT_DIR, foreign_after=600):
                say(f"removed {stale}, left by a checkpoint write that was killed")
            if not cfg.evaluate_only:
                # records after the step this run starts from were left by a run that died before (or after) its
                # last checkpoint: they are trained and logged again now. Also for a start from step 0 (a crash
                # before the first checkpoint), else the log would hold the same steps twice.
                start = ckpt["step"] if ckpt is not None else 0
                owed = ckpt is not None and ckpt.get("pending_eval") is not None  # its eval runs again first
                for name, dropped in (("metrics.jsonl", log.drop_after(start, eval_owed=owed)),
                                      (SampleKeyLog.FOLDER, SampleKeyLog.drop_after(run_dir, start))):
                    if dropped:
                        say(f"{name}: dropped {dropped} record(s) after step {start} left by an earlier run; "
                            "they are logged again now")
            write_json(cfg.to_dict(), run_dir / "config.json")
            say(f"config ({info.world_size} process(es), {info.device.type}):\n{cfg.to_json()}")
        if trainer is None:
            return evaluate_only(cfg, info, ckpt=ckpt, val_loader=val_loader, log=log, run_dir=run_dir, say=say)
        dist.barrier()  # rank 0 has cleaned RUN_DIR's logs before any rank appends to them
        return trainer.fit()
    finally:
        val_loader.close()
        log.close()


def claim_run_dir(run_dir: Path, stack: contextlib.ExitStack) -> bool:
    """RUN_DIR belongs to one run at a time (rank 0 holds it): a second `saturate train` into it, started by
    mistake or by a scheduler that requeued a job still running, would interleave checkpoints and logs with the
    first's. It stops with one line naming the holder; a holder killed by any means releases it (shards.process).
    """
    try:
        stack.enter_context(claim_folder(run_dir, what="training run"))
        return True
    except FolderBusy as busy:
        raise ConfigError(f"--run-dir: {busy}; wait for it to end, or pick another --run-dir") from None


def evaluate_only(cfg: TrainConfig, info: dist.DistInfo, *, ckpt: dict | None, val_loader, log: MetricsLog,
                  run_dir: Path, say) -> dict:
    """Top-1/top-5 of the --resume or --pretrained weights on the val split (and of the checkpoint's EMA
    weights, `ema_*`, when it holds them); writes RUN_DIR/eval.json."""
    model = model_for_run(cfg, cfg.num_classes or val_loader.num_classes, ckpt, info.device)
    models = {"model": model}
    if ckpt is not None and ckpt.get("ema") is not None:  # the checkpoint's EMA weights too, in the same pass
        models["ema"] = copy.deepcopy(model)
        models["ema"].load_state_dict(ema_weights(ckpt["ema"]))
    start = time.perf_counter()
    result = with_ema(evaluate_models(models, val_loader, device=info.device, precision=cfg.precision))
    result = {
        "kind": "eval",
        "checkpoint": ckpt["path"] if ckpt else None,
        "pretrained": cfg.pretrained if ckpt is None else None,
        "epoch": ckpt["epoch"] if ckpt else None,
        "step": ckpt["step"] if ckpt else 0,
        "world_size": info.world_size,
        "wall_time_s": time.perf_counter() - start,
        **result,
    }
    log.write(result)
    if info.is_main:
        write_json({**result, "config": cfg.to_dict()}, run_dir / "eval.json")
    say(eval_line(result))
    return result


__all__ = ["ConfigError", "train"]
