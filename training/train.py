"""The training loop: `train(config)`; `python -m training.train` / `torchrun ... -m training.train` / `saturate
train` parse the command line in tools/train_cmd.py and call it.

Per epoch: (maybe rebuild the loader for progressive resizing) -> steps -> full validation -> checkpoint.
The step itself is training/step.py; everything here runs around it on log steps, epoch ends and checkpoints.
"""

from __future__ import annotations

import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from shards.cpus import usable_cpus
from training import checkpoint, dist
from training.config import ConfigError, TrainConfig, validate_environment
from training.evaluate import evaluate
from training.metrics import MetricsLog, ThroughputMeter, Window, plot_curves, read_metrics, write_json
from training.model import build_model
from training.optim import build_optimizer, build_scheduler, lr_factor
from training.step import TrainStep


def train(config: TrainConfig) -> dict:
    """Train (or, with `evaluate_only`, evaluate) as `config` says; returns the summary (same on every rank)."""
    info = dist.init()
    # process-wide torch settings this run changes, restored so that a caller (a test, a notebook) gets back
    # what it had
    torch_threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        validate_environment(config, world_size=info.world_size, cuda=info.device.type == "cuda")
        if info.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(cpu_model_threads(config.num_threads, info))
        return _Run(config, info).execute()
    finally:
        torch.set_num_threads(torch_threads)
        torch.use_deterministic_algorithms(deterministic)
        dist.shutdown()


def cpu_model_threads(loader_threads: int, info: dist.DistInfo) -> int:
    """Intra-op threads for the model when training on the CPU: this process's share of the cores minus the
    loader's threads. Oversubscribed OpenMP threads spin against the loader's and can make a step 5-10x slower."""
    cores = usable_cpus()
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return max(1, cores // local_processes - loader_threads)


class _Run:
    """State of one run; methods are the phases of `train`, kept apart so each reads in one screen."""

    def __init__(self, config: TrainConfig, info: dist.DistInfo) -> None:
        self.cfg = config
        self.info = info
        self.device = info.device
        self.run_dir = Path(config.run_dir)
        self.is_main = info.is_main
        self.batch = config.per_process_batch(info.world_size)  # images per process per step
        self.meter = ThroughputMeter(world_size=info.world_size, warmup_steps=config.throughput_warmup_steps)
        self.best = {"top1": -1.0, "top5": -1.0}
        self.last_eval: dict | None = None
        self.train_image_size: int | None = None

    # --- setup ------------------------------------------------------------------------------------------
    def say(self, text: str) -> None:
        if self.is_main:
            tqdm.write(text, file=sys.stdout)

    def seed_and_backends(self) -> None:
        cfg = self.cfg
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)  # same on every rank: identical initial weights (DDP also broadcasts)
        torch.backends.cudnn.benchmark = not cfg.deterministic  # autotune conv algorithms per input shape
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls/convs on tensor cores (Ampere+)
        torch.backends.cudnn.allow_tf32 = True

    def build_loader(self, split: str, *, image_size: int, seed: int, state: dict | None = None):
        from pipeline import build_loader  # imports DALI; kept out of module import time

        cfg = self.cfg
        options: dict = {}
        if cfg.backend == "dali-gpu":
            options["hw_decoder_load"] = cfg.hw_decoder_load
        if cfg.backend == "synthetic":
            options["num_classes"] = cfg.num_classes or 1000
            options["num_samples"] = cfg.synthetic_samples if split == "train" else cfg.synthetic_val_samples
        return build_loader(
            cfg.data if cfg.backend != "synthetic" else None,
            split,
            batch_size=self.batch,
            image_size=image_size,
            backend=cfg.backend,
            rank=self.info.rank,
            world_size=self.info.world_size,
            num_threads=cfg.num_threads,
            seed=seed,
            device_id=self.info.local_rank if self.device.type == "cuda" else None,
            state=state,
            crop_area=tuple(cfg.crop_area),
            **options,
        )

    def load_checkpoint(self) -> dict | None:
        path = checkpoint.resolve(self.cfg.resume, self.run_dir)
        if path is None:
            if self.cfg.resume == "auto":
                if self.cfg.evaluate_only and self.cfg.pretrained is None:
                    raise ConfigError(f"--evaluate-only: --resume auto found no checkpoint in "
                                      f"{self.run_dir / checkpoint.CHECKPOINT_DIR}")
                self.say(f"--resume auto: no checkpoint in {self.run_dir / checkpoint.CHECKPOINT_DIR}, starting")
            return None
        ckpt = checkpoint.load(path)
        saved = ckpt.get("config", {})
        for name in ("arch", "num_classes"):
            if name in saved and saved[name] is not None and saved[name] != getattr(self.cfg, name) and (
                name != "num_classes" or self.cfg.num_classes is not None
            ):
                raise ConfigError(
                    f"--{name.replace('_', '-')}: {path} was trained with {name}={saved[name]!r}, "
                    f"not {getattr(self.cfg, name)!r}"
                )
        if not self.cfg.evaluate_only and "batch_size" in saved:
            # The peak LR and the steps per epoch follow the global batch; the scheduler's state holds both,
            # so continuing with another global batch would silently keep the old LR on a misplaced curve.
            old = saved.get("global_batch_size") or saved["batch_size"] * ckpt["world_size"]
            new = self.cfg.global_batch(self.info.world_size)
            if old != new:
                raise ConfigError(
                    f"--global-batch-size: {path} was trained with a global batch of {old} on "
                    f"{ckpt['world_size']} process(es); this run's is {new}. Pass --global-batch-size {old} "
                    "to continue its schedule"
                )
        self.say(f"resuming from {path} (epoch {ckpt['epoch']}, step {ckpt['step']})")
        return {**ckpt, "path": str(path)}

    def build_model(self, num_classes: int, ckpt: dict | None) -> torch.nn.Module:
        cfg = self.cfg
        model = build_model(
            cfg.arch,
            num_classes=num_classes,
            pretrained=cfg.pretrained if ckpt is None else None,
            channels_last=cfg.channels_last,
            zero_init_residual=cfg.zero_init_residual,
        )
        if ckpt is not None:
            model.load_state_dict(ckpt["model"])
        return model.to(self.device)

    # --- phases -----------------------------------------------------------------------------------------
    def execute(self) -> dict:
        cfg = self.cfg
        self.seed_and_backends()
        ckpt = self.load_checkpoint()
        self.log = MetricsLog(self.run_dir, enabled=self.is_main)  # creates RUN_DIR on rank 0
        if self.is_main:
            (self.run_dir / "config.json").write_text(cfg.to_json() + "\n")
            self.say(f"config ({self.info.world_size} process(es), {self.device.type}):\n{cfg.to_json()}")
        self.val_loader = self.build_loader("val", image_size=cfg.eval_image_size, seed=cfg.seed)
        try:
            if cfg.evaluate_only:
                return self.evaluate_only(ckpt)
            return self.fit(ckpt)
        finally:
            self.val_loader.close()
            self.log.close()

    def evaluate_only(self, ckpt: dict | None) -> dict:
        num_classes = self.cfg.num_classes or self.val_loader.num_classes
        model = self.build_model(num_classes, ckpt)
        start = time.perf_counter()
        result = evaluate(model, self.val_loader, device=self.device, precision=self.cfg.precision)
        result = {
            "kind": "eval",
            "checkpoint": ckpt["path"] if ckpt else None,
            "pretrained": self.cfg.pretrained if ckpt is None else None,
            "epoch": ckpt["epoch"] if ckpt else None,
            "step": ckpt["step"] if ckpt else 0,
            "world_size": self.info.world_size,
            "wall_time_s": time.perf_counter() - start,
            **result,
        }
        self.log.write(result)
        if self.is_main:
            write_json({**result, "config": self.cfg.to_dict()}, self.run_dir / "eval.json")
        self.say(self.eval_line(result))
        return result

    def fit(self, ckpt: dict | None) -> dict:
        cfg, info = self.cfg, self.info
        start_time = time.perf_counter()
        epoch = ckpt["epoch"] if ckpt else 0
        self.step = ckpt["step"] if ckpt else 0
        step_in_epoch = ckpt["step_in_epoch"] if ckpt else 0
        # The loader position is restored when the checkpoint's loader matches the one this epoch needs (same
        # process count, crop size, backend and loader threads); otherwise the epoch's data order restarts.
        loader_state, self.train_loader_seed = None, cfg.seed + epoch
        saved = ckpt.get("config", {}) if ckpt else {}
        same_loader = ckpt and (ckpt["world_size"], ckpt["image_size"], saved.get("backend"),
                                saved.get("num_threads")) == (info.world_size, cfg.image_size_at(epoch),
                                                              cfg.backend, cfg.num_threads)
        if same_loader:
            loader_state, self.train_loader_seed = ckpt["loader_states"][info.rank], ckpt["loader_seed"]
        elif ckpt and step_in_epoch:
            self.say(f"warning: {ckpt['path']} was written by {ckpt['world_size']} process(es) at crop size "
                     f"{ckpt['image_size']} with --backend {saved.get('backend')} --num-threads "
                     f"{saved.get('num_threads')}; the data order of epoch {epoch} restarts")
        self.train_image_size = cfg.image_size_at(epoch)
        self.train_loader = self.build_loader(
            "train", image_size=self.train_image_size, seed=self.train_loader_seed, state=loader_state
        )
        num_classes = cfg.num_classes or self.train_loader.num_classes
        if cfg.num_classes is None and self.val_loader.num_classes != num_classes:
            raise ConfigError(f"--data: train has {num_classes} classes but val has "
                              f"{self.val_loader.num_classes}; convert both splits with the same class list")
        # len() of a loader resumed mid-epoch counts only the batches left in that epoch; the checkpoint
        # remembers the full length (it sets the LR schedule, so it must not change on resume).
        self.steps_per_epoch = ckpt["steps_per_epoch"] if loader_state else len(self.train_loader)
        if self.steps_per_epoch == 0:
            raise ConfigError(f"--batch-size: {self.batch} per process is larger than this rank's "
                              f"{self.train_loader.num_samples} training samples")
        total_steps = cfg.epochs * self.steps_per_epoch
        max_steps = min(cfg.max_steps or total_steps, total_steps)

        self.raw_model = self.build_model(num_classes, ckpt)
        model = self.raw_model
        if info.world_size > 1:
            model = torch.nn.parallel.DistributedDataParallel(
                model,
                device_ids=[info.local_rank] if self.device.type == "cuda" else None,
                gradient_as_bucket_view=True,  # grads alias the all-reduce buckets: one copy less
            )
        self.peak_lr = cfg.peak_lr(info.world_size)
        optimizer = build_optimizer(self.raw_model, lr=self.peak_lr, momentum=cfg.momentum,
                                    nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
        self.schedule = dict(steps_per_epoch=self.steps_per_epoch, epochs=cfg.epochs,
                             warmup_epochs=cfg.warmup_epochs, schedule=cfg.lr_schedule,
                             milestones=tuple(cfg.lr_milestones), gamma=cfg.lr_gamma)
        scheduler = build_scheduler(optimizer, **self.schedule)
        self.train_step = TrainStep(model, optimizer, precision=cfg.precision, compile=cfg.compile,
                                    label_smoothing=cfg.label_smoothing, scheduler=scheduler)
        if ckpt:
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            self.train_step.scaler.load_state_dict(ckpt["scaler"])
            if ckpt["world_size"] == info.world_size:
                checkpoint.set_rng_state(ckpt["rng"][info.rank])
            self.best = ckpt["best"]
            self.last_eval = ckpt["last_eval"]
        self.say(
            f"training {cfg.arch} on {info.world_size} process(es): global batch "
            f"{cfg.global_batch(info.world_size)}, peak lr {self.peak_lr:.4g}, {self.steps_per_epoch} steps/epoch,"
            f" {cfg.epochs} epochs, stopping at step {max_steps}"
        )
        self.last_checkpoint_time = time.monotonic()
        try:
            while self.step < max_steps and epoch < cfg.epochs:
                finished, step_in_epoch = self.train_epoch(epoch, step_in_epoch, max_steps)
                if finished:
                    epoch, step_in_epoch = epoch + 1, 0
                last = self.step >= max_steps or epoch >= cfg.epochs
                if last or (finished and epoch % cfg.eval_every == 0):
                    self.run_eval(epoch if finished else epoch + step_in_epoch / self.steps_per_epoch)
                self.save(epoch, step_in_epoch)
        finally:
            self.train_loader.close()
        return self.finish(time.perf_counter() - start_time, epoch)

    def train_epoch(self, epoch: int, step_in_epoch: int, max_steps: int) -> tuple[bool, int]:
        """Steps of one epoch from `step_in_epoch`; (ran to the epoch's end, steps done in the epoch)."""
        cfg = self.cfg
        size = cfg.image_size_at(epoch)
        if size != self.train_image_size:  # progressive resizing: a new loader at the new crop size
            self.train_loader.close()
            self.train_image_size, self.train_loader_seed = size, cfg.seed + epoch
            self.train_loader = self.build_loader("train", image_size=size, seed=self.train_loader_seed)
            self.meter.reset_warmup()  # cudnn.benchmark re-tunes, torch.compile may recompile
            self.say(f"epoch {epoch}: training crop {size} px")
        bar = tqdm(total=self.steps_per_epoch, initial=step_in_epoch, desc=f"epoch {epoch}", unit="step",
                   disable=not (self.is_main and cfg.progress), leave=False, dynamic_ncols=True)
        batches = iter(self.train_loader)
        window_start, window_steps, data_wait = time.perf_counter(), 0, 0.0
        loss_sum = torch.zeros((), device=self.device)
        while step_in_epoch < self.steps_per_epoch and self.step < max_steps:
            # Data wait = host time blocked in next(): no batch was ready. On a GPU the host runs ahead of
            # the device, so while the loader keeps up this is ~0 even though kernels are still queued;
            # when it does not, the GPU drains its queue and idles for about this long. Summed over the
            # window and divided by the window's wall time (which ends at the sync below) it is the share
            # of training time lost to input.
            t = time.perf_counter()
            batch = next(batches, None)
            data_wait += time.perf_counter() - t
            if batch is None:  # the loader ended its epoch early (not expected: train drops only the tail)
                self.say(f"warning: the train loader ended epoch {epoch} after {step_in_epoch} of "
                         f"{self.steps_per_epoch} batches")
                step_in_epoch = self.steps_per_epoch
                break
            images = batch[0].to(self.device, non_blocking=True)  # no-op when the loader is on-device
            labels = batch[1].to(self.device, non_blocking=True)
            loss_sum += self.train_step(images, labels)  # stays on the device: no sync
            self.step += 1
            step_in_epoch += 1
            window_steps += 1
            bar.update(1)
            if self.step % cfg.log_every == 0 or step_in_epoch == self.steps_per_epoch or self.step == max_steps:
                if self.device.type == "cuda":
                    # Logging steps only: the window ends when the GPU has finished its steps, not when the
                    # host queued them (the host runs a few steps ahead, which would inflate images/s).
                    torch.cuda.synchronize(self.device)
                save_now = self.log_window(epoch, window_steps, loss_sum, data_wait,
                                           time.perf_counter() - window_start, bar)
                window_start, window_steps, data_wait = time.perf_counter(), 0, 0.0
                loss_sum = torch.zeros((), device=self.device)
                if save_now and step_in_epoch < self.steps_per_epoch:
                    self.save(epoch, step_in_epoch)
        bar.close()
        finished = step_in_epoch >= self.steps_per_epoch
        if finished:
            next(batches, None)  # let the loader see the end of its epoch so its state points at the next
        return finished, step_in_epoch

    def log_window(self, epoch: int, steps: int, loss_sum: torch.Tensor, data_wait: float, wall: float,
                   bar: tqdm) -> bool:
        """Log one window (the sync point of the loop); returns rank 0's "time for a checkpoint" decision."""
        cfg, world = self.cfg, self.info.world_size
        due = cfg.checkpoint_minutes > 0 and time.monotonic() - self.last_checkpoint_time >= 60 * cfg.checkpoint_minutes
        stats = torch.stack([loss_sum.double(), *(torch.tensor(x, dtype=torch.float64, device=self.device)
                                                   for x in (data_wait, wall, float(due and self.is_main)))])
        dist.all_reduce_sum(stats)  # every rank: loss, wait and wall summed; rank 0's checkpoint flag
        loss, data_wait, wall, save_flag = stats.tolist()  # .tolist() is a sync point: waits for the GPU
        loss, data_wait, wall = loss / (world * steps), data_wait / world, wall / world
        self.meter.add(Window(steps=steps, images=steps * self.batch, wall_s=wall, data_wait_s=data_wait))
        record = {
            "kind": "train",
            "epoch": epoch,
            "step": self.step,
            "loss": loss,
            "lr": self.peak_lr * lr_factor(self.step - 1, **self.schedule),  # LR of the last step taken
            "images_per_sec_per_gpu": steps * self.batch / wall,  # images/s per GPU (per process)
            "images_per_sec": steps * self.batch * world / wall,  # images/s over all processes
            "step_time_ms": 1000 * wall / steps,
            "data_wait_share": data_wait / wall,
            "image_size": self.train_image_size,
        }
        self.log.write(record)
        if not math.isfinite(loss):
            raise RuntimeError(f"loss is {loss} at step {self.step}: lower --base-lr or use --precision bf16")
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{record['lr']:.3g}")
        self.say(
            f"epoch {epoch} step {self.step} | loss {loss:.4f} | lr {record['lr']:.4g} | "
            f"{record['images_per_sec_per_gpu']:.0f} img/s/gpu {record['images_per_sec']:.0f} img/s | "
            f"step {record['step_time_ms']:.1f} ms | data wait {100 * record['data_wait_share']:.1f}%"
        )
        return save_flag > 0

    def run_eval(self, epoch: float) -> dict:
        result = evaluate(self.raw_model, self.val_loader, device=self.device, precision=self.cfg.precision)
        result = {"kind": "eval", "epoch": epoch, "step": self.step, **result}
        self.log.write(result)
        self.say(self.eval_line(result))
        self.is_best = result["top1"] > self.best["top1"]
        if self.is_best:
            self.best = {"top1": result["top1"], "top5": result["top5"], "step": self.step}
        self.last_eval = result
        return result

    @staticmethod
    def eval_line(r: dict) -> str:
        return (f"val step {r['step']}: top-1 {r['top1']:.2f}% ({r['correct1']}/{r['total']}) "
                f"top-5 {r['top5']:.2f}% ({r['correct5']}/{r['total']}) loss {r['loss']:.4f}")

    def save(self, epoch: int, step_in_epoch: int) -> None:
        """Checkpoint (collective: every rank hands in its loader position and RNG; rank 0 writes)."""
        loader_states = dist.all_gather_object(self.train_loader.state_dict())
        rng_states = dist.all_gather_object(checkpoint.rng_state())
        if self.is_main:
            state = {
                "model": self.raw_model.state_dict(),
                "optimizer": self.train_step.optimizer.state_dict(),
                "scheduler": self.train_step.scheduler.state_dict(),
                "scaler": self.train_step.scaler.state_dict(),
                "epoch": epoch,  # the epoch in progress (== completed epochs when step_in_epoch is 0)
                "step": self.step,  # optimizer steps taken
                "step_in_epoch": step_in_epoch,
                "steps_per_epoch": self.steps_per_epoch,
                "image_size": self.train_image_size,  # of the loader whose positions are saved
                "loader_seed": self.train_loader_seed,
                "world_size": self.info.world_size,
                "loader_states": loader_states,  # per rank, plain types
                "rng": rng_states,  # per rank
                "best": self.best,
                "last_eval": self.last_eval,
                "config": self.cfg.to_dict(),
            }
            is_best = getattr(self, "is_best", False)
            path = checkpoint.save(state, self.run_dir, step=self.step, keep_last=self.cfg.keep_last,
                                   is_best=is_best)
            self.say(f"checkpoint {path}" + (" (best)" if is_best else ""))
        self.is_best = False
        self.last_checkpoint_time = time.monotonic()
        dist.barrier()

    def finish(self, wall_time: float, epoch: int) -> dict:
        summary = {
            "final_top1": self.last_eval["top1"] if self.last_eval else None,
            "final_top5": self.last_eval["top5"] if self.last_eval else None,
            "best_top1": self.best["top1"] if self.best["top1"] >= 0 else None,
            "best_top5": self.best["top5"] if self.best["top1"] >= 0 else None,
            "final_eval": self.last_eval,
            "images_per_sec_per_gpu": self.meter.images_per_sec_per_gpu,
            "images_per_sec": self.meter.images_per_sec,
            "data_wait_share": self.meter.data_wait_share,
            "throughput_steps": self.meter.counted.steps,  # steps the averages cover (warm-up excluded)
            "wall_time_s": wall_time,
            "steps": self.step,
            "epochs_completed": epoch,
            "world_size": self.info.world_size,
            "global_batch": self.cfg.global_batch(self.info.world_size),
            "peak_lr": self.peak_lr,
            "config": self.cfg.to_dict(),
        }
        if self.is_main:
            write_json(summary, self.run_dir / "summary.json")
            if self.log.path.is_file():  # the whole run's records, earlier sessions of a resumed run too
                plot_curves(read_metrics(self.log.path), self.run_dir / "curves.png")
            per_gpu = summary["images_per_sec_per_gpu"]
            throughput = (f"{per_gpu:.0f} img/s/gpu, data wait {100 * summary['data_wait_share']:.1f}% "
                          f"(warm-up excluded)" if per_gpu is not None else
                          "no throughput average: every log window fell in --throughput-warmup-steps")
            final = f"{summary['final_top1']:.2f}%" if summary["final_top1"] is not None else "n/a"
            best = f"{summary['best_top1']:.2f}%" if summary["best_top1"] is not None else "n/a"
            self.say(f"done: {self.step} steps in {wall_time:.0f} s; val top-1 final {final}, best {best}; "
                     f"{throughput}; summary in {self.run_dir / 'summary.json'}")
        return summary


def main(argv: list[str] | None = None) -> int:
    """`python -m training.train`: the same flags as `saturate train` (parsed in tools/train_cmd.py)."""
    from tools.train_cmd import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
