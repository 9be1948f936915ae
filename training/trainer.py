"""One training run from its resume point: `Trainer(...)` builds everything (and writes nothing), `fit()` runs
epochs of steps with logging, evaluation and checkpoints, and returns the summary.

The step itself is training/step.py; everything here runs around it on log steps, epoch ends and checkpoints.
Host syncs happen only on log steps (`log_window`), at evaluation and at checkpoints.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from pipeline.base import StateMismatch
from shards.process import StopRequested
from training import checkpoint, dist
from training.config import ConfigError, TrainConfig
from training.data import StoreLog, make_loader
from training.ema import WeightEMA
from training.evaluate import evaluate_models, with_ema
from training.metrics import (
    MetricsLog,
    SampleKeyLog,
    ThroughputMeter,
    Window,
    eval_line,
    plot_curves,
    read_metrics,
    write_json,
)
from training.mix import BatchMix
from training.model import build_model
from training.optim import build_optimizer, build_scheduler, lr_factor
from training.preempt import STALL_GRACE, STALL_GRACE_ALONE, Preempted, StopRequest
from training.resume import ResumePoint, restart_seed, restore_scaler
from training.step import TrainStep


def model_for_run(cfg: TrainConfig, num_classes: int, ckpt: dict | None, device: torch.device, *,
                  pretrained: bool = True) -> torch.nn.Module:
    """The run's model on `device`: the checkpoint's weights, else --pretrained's (unless `pretrained` is False:
    weights that will be replaced need not be read), else a fresh init."""
    model = build_model(cfg.arch, num_classes=num_classes,
                        pretrained=cfg.pretrained if ckpt is None and pretrained else None,
                        channels_last=cfg.channels_last, zero_init_residual=cfg.zero_init_residual)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
    return model.to(device)


class Trainer:
    """Loaders, model, optimizer, schedule and bookkeeping of one run; `fit()` trains."""

    def __init__(self, cfg: TrainConfig, info: dist.DistInfo, *, point: ResumePoint, val_loader, log: MetricsLog,
                 run_dir: Path, say: Callable[[str], None]) -> None:
        """Build everything for a run that starts at `point` (training.resume.resume_point; all zero for a fresh
        run): the train loader at its position, the model (fresh or --pretrained), DDP, optimizer, schedule, EMA
        and mixing, the step. Nothing is read from a checkpoint here (`restore` does that) and nothing is
        written."""
        self.cfg, self.info, self.device, self.is_main = cfg, info, info.device, info.is_main
        self.val_loader, self.log, self.run_dir, self.say = val_loader, log, run_dir, say
        self.batch = cfg.per_process_batch(info.world_size)  # images per process per micro-batch
        self.accum = cfg.grad_accum_steps  # micro-batches per optimizer step
        self.epoch, self.step, self.step_in_epoch = point.epoch, point.step, point.step_in_epoch
        self.train_image_size = cfg.image_size_at(point.epoch)
        self.train_loader_seed = point.loader_seed
        try:
            self.train_loader = make_loader(cfg, info, train=True, image_size=self.train_image_size,
                                            seed=self.train_loader_seed, state=point.loader_state)
        except StateMismatch as err:  # the split was re-converted, --order-chunk changed: no position to keep
            say(f"warning: the data order of epoch {point.epoch} restarts: {err}")
            self.train_loader_seed = restart_seed(cfg, point.epoch, point.step_in_epoch)
            self.train_loader = make_loader(cfg, info, train=True, image_size=self.train_image_size,
                                            seed=self.train_loader_seed)
        try:
            num_classes = cfg.num_classes or self.train_loader.num_classes
            if num_classes < max(self.train_loader.num_classes, val_loader.num_classes):
                raise ConfigError(f"--num-classes: {num_classes}, but the shards have "
                                  f"{max(self.train_loader.num_classes, val_loader.num_classes)} classes (labels up to "
                                  "that index); leave it out to take the manifest's")
            train_wnids, val_wnids = self.train_loader.wnids, val_loader.wnids
            if train_wnids is not None and val_wnids is not None and train_wnids != val_wnids:
                # the same count is not enough: index i must be the same class in both splits
                pairs = zip(train_wnids, val_wnids, strict=False)  # the shorter list ends the comparison
                index = next((i for i, (a, b) in enumerate(pairs) if a != b),
                             min(len(train_wnids), len(val_wnids)))
                got = [w[index] if index < len(w) else "none" for w in (train_wnids, val_wnids)]
                raise ConfigError(f"--data: class {index} is {got[0]} in {cfg.train_split} but {got[1]} in "
                                  f"{cfg.val_split} ({len(train_wnids)} and {len(val_wnids)} classes); convert "
                                  f"{cfg.val_split} with --classes {cfg.train_split}.manifest.json")
            # Optimizer steps: the loader's micro-batches of a whole epoch (also after a resume mid-epoch, when len()
            # counts only those left) in groups of --grad-accum-steps (a remainder is read and not trained on, like
            # the partial batch a train loader drops). In sample order that is len(split) // global batch on any
            # number of processes, so the LR schedule does not move on a resume elsewhere.
            self.steps_per_epoch = self.train_loader.batches_per_epoch // self.accum
            if self.steps_per_epoch == 0:
                raise ConfigError(f"--batch-size: {self.batch} per process x --grad-accum-steps {self.accum} is "
                                  f"larger than this rank's {self.train_loader.num_samples} training samples")
            self.max_steps = min(cfg.max_steps or cfg.epochs * self.steps_per_epoch, cfg.epochs * self.steps_per_epoch)
            # a resumed run takes its weights from the checkpoint (restore): --pretrained is not read then
            self.raw_model = model_for_run(cfg, num_classes, None, self.device, pretrained=point.step == 0)
            model = self.raw_model
            if info.world_size > 1:
                model = torch.nn.parallel.DistributedDataParallel(
                    model,
                    device_ids=[info.local_rank] if self.device.type == "cuda" else None,
                    gradient_as_bucket_view=True,  # grads alias the all-reduce buckets: one copy less
                )
            self.peak_lr = cfg.peak_lr(info.world_size)
            optimizer = build_optimizer(self.raw_model, lr=self.peak_lr, name=cfg.optimizer, momentum=cfg.momentum,
                                        nesterov=cfg.nesterov, weight_decay=cfg.weight_decay,
                                        betas=tuple(cfg.adam_betas), eps=cfg.adam_eps)
            self.schedule = dict(steps_per_epoch=self.steps_per_epoch, epochs=cfg.epochs,
                                 warmup_epochs=cfg.warmup_epochs, schedule=cfg.lr_schedule,
                                 milestones=tuple(cfg.lr_milestones), gamma=cfg.lr_gamma)
            self.scheduler = build_scheduler(optimizer, **self.schedule)
            self.ema = (WeightEMA(self.raw_model, decay=cfg.ema_decay, every=cfg.ema_every)
                        if cfg.ema_decay is not None else None)
            mix = (BatchMix(num_classes=num_classes, mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix,
                            switch_prob=cfg.mixup_switch_prob, seed=cfg.seed, rank=info.rank)
                   if cfg.mixup > 0 or cfg.cutmix > 0 else None)
            self.train_step = TrainStep(model, optimizer, precision=cfg.precision, compile=cfg.compile,
                                        label_smoothing=cfg.label_smoothing, scheduler=self.scheduler,
                                        grad_accum_steps=self.accum, clip_grad_norm=cfg.clip_grad_norm, mix=mix,
                                        ema=self.ema, micro_steps=point.step * self.accum)
        except BaseException:
            self.train_loader.close()
            raise
        self.meter = ThroughputMeter(world_size=info.world_size, warmup_steps=cfg.throughput_warmup_steps)
        self.best = {"top1": -1.0, "top5": -1.0}
        self.best_ema = {"top1": -1.0, "top5": -1.0}
        self.last_eval: dict | None = None
        self.is_best = False  # the last evaluation beat every earlier one: the next checkpoint is best.pt
        self.stop = StopRequest(stall_grace=STALL_GRACE if info.world_size > 1 else STALL_GRACE_ALONE)
        self.stalled: tuple[str, int] | None = None  # a stop interrupted a data wait: (why, micro-batch of the step)
        self.stop_agreed = False  # every rank knows a stop signal arrived: save and exit
        #: an evaluation that was due when a stop signal ended the run (fractional epoch); the resumed run runs it
        #: first, with the same weights, so no epoch's result is lost to a preemption
        self.pending_eval: float | None = None
        self.last_checkpoint_time = time.monotonic()
        self.sample_keys = SampleKeyLog(run_dir, rank=info.rank) if cfg.log_sample_keys else None
        self.store_log = StoreLog(cfg)  # requests to an object store (and its cache) once an epoch

    def restore(self, ckpt: dict) -> None:
        """Continue `ckpt` (checked by training.resume.load_checkpoint): weights, optimizer, schedule, loss scale,
        this rank's RNG (when the process count is the checkpoint's), best results, the EMA and a pending
        evaluation. The loader's position came with the ResumePoint the trainer was built from."""
        self.raw_model.load_state_dict(ckpt["model"])
        self.train_step.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        restore_scaler(self.train_step.scaler, ckpt["scaler"], say=self.say)
        if ckpt["world_size"] == self.info.world_size:
            checkpoint.set_rng_state(ckpt["rng"][self.info.rank])
        self.best = ckpt["best"]
        self.best_ema = ckpt.get("best_ema", self.best_ema)
        self.last_eval = ckpt["last_eval"]
        self.pending_eval = ckpt.get("pending_eval")
        if self.ema is not None:
            if ckpt.get("ema") is not None:
                self.ema.load_state_dict(ckpt["ema"])
            else:  # built from the weights before they were restored: start from the checkpoint's instead
                self.ema.module.load_state_dict(self.raw_model.state_dict())
                self.say(f"--ema-decay: {ckpt['path']} holds no EMA; the average starts from its weights")
        elif ckpt.get("ema") is not None:
            saved = ckpt.get("config", {}).get("ema_decay")
            self.say(f"warning: {ckpt['path']} holds an EMA of the weights but --ema-decay is not set: this run "
                     f"drops it (pass --ema-decay {saved} to keep averaging)")
        self.last_checkpoint_time = time.monotonic()

    # --- the loop -------------------------------------------------------------------------------------------
    def fit(self) -> dict:
        """Train to --epochs / --max-steps; on a stop signal, checkpoint and raise Preempted."""
        cfg, world = self.cfg, self.info.world_size
        start_time = time.perf_counter()
        self.say(f"training {cfg.arch} on {world} process(es): global batch {cfg.global_batch(world)}"
                 + (f" ({self.accum} micro-batches of {self.batch} per process)" if self.accum > 1 else "")
                 + f", peak lr {self.peak_lr:.4g}, {self.steps_per_epoch} steps/epoch, {cfg.epochs} epochs, "
                 f"stopping at step {self.max_steps}; augment {cfg.augment_policy().spec}")
        unused = self.train_loader.batches_per_epoch % self.accum
        if unused:
            self.say(f"note: {unused} micro-batch(es) per epoch are left over after groups of --grad-accum-steps "
                     f"{self.accum} and are not trained on")
        with self.stop:
            try:
                if self.pending_eval is not None:  # the evaluation a stop signal (or a failure) left owed
                    self.owed_eval(None)
                    self.save()
                while self.step < self.max_steps and self.epoch < cfg.epochs:
                    finished = self.train_epoch()
                    if (line := self.store_log.line(self.train_loader)) is not None:
                        self.say(f"epoch {self.epoch}: {line}")
                    if self.stalled is not None:
                        self.stop_during_stall()
                    if finished:
                        self.epoch, self.step_in_epoch = self.epoch + 1, 0
                    last = self.step >= self.max_steps or self.epoch >= cfg.epochs
                    due = last or (finished and self.epoch % cfg.eval_every == 0)
                    if due:  # the checkpoint below says it is owed until it has run
                        self.pending_eval = self.epoch if finished else (
                            self.epoch + self.step_in_epoch / self.steps_per_epoch)
                    # written before the evaluation: an evaluation that fails (a store gone away) cannot cost the
                    # epoch's steps; the resumed run evaluates first
                    path = self.save()
                    if due and not self.stop_agreed:  # a stop leaves it owed: no time for it now
                        self.owed_eval(path)
                        path = self.save()  # again, with the result (best.pt follows it)
                    if self.stop_agreed:
                        raise Preempted(self.stop.signum or 15, str(path) if path else None, self.step)
            finally:
                self.train_loader.close()
                if self.sample_keys is not None:
                    self.sample_keys.close()
        return self.finish(time.perf_counter() - start_time)

    def train_epoch(self) -> bool:
        """Steps of the current epoch from `step_in_epoch`; True when the epoch ran to its end."""
        cfg, epoch = self.cfg, self.epoch
        size = cfg.image_size_at(epoch)
        if size != self.train_image_size:  # progressive resizing: a new loader at the new crop size
            # sample order: the new loader continues the old one's epochs (its state, at this epoch's start);
            # shard order cannot start a later epoch, so its loader gets a seed of its own
            state = self.train_loader.state_dict() if cfg.order == "sample" else None
            self.train_loader.close()
            self.train_image_size = size
            self.train_loader_seed = self.train_loader_seed if state is not None else cfg.seed + epoch
            self.train_loader = make_loader(cfg, self.info, train=True, image_size=size, seed=self.train_loader_seed,
                                            state=state)
            self.meter.reset_warmup()  # cudnn.benchmark re-tunes, torch.compile may recompile
            self.say(f"epoch {epoch}: training crop {size} px")
        bar = tqdm(total=self.steps_per_epoch, initial=self.step_in_epoch, desc=f"epoch {epoch}", unit="step",
                   disable=not (self.is_main and cfg.progress), leave=False, dynamic_ncols=True)
        batches = iter(self.train_loader)
        window_start, window_steps, data_wait = time.perf_counter(), 0, 0.0
        loss_sum = torch.zeros((), device=self.device)
        while self.step_in_epoch < self.steps_per_epoch and self.step < self.max_steps:
            for micro in range(self.accum):  # micro-batches; the last one also steps the optimizer
                # Data wait = host time blocked in next(): no batch was ready. On a GPU the host runs ahead of
                # the device, so while the loader keeps up this is ~0 even though kernels are still queued;
                # when it does not, the GPU drains its queue and idles for about this long. Summed over the
                # window and divided by the window's wall time (which ends at the sync below) it is the share
                # of training time lost to input.
                t = time.perf_counter()
                try:
                    with self.stop.waiting():  # a stop signal during a stall interrupts the wait
                        batch = next(batches, None)
                except StopRequested as stop:
                    self.stalled = (str(stop), micro)
                    bar.close()
                    return False
                data_wait += time.perf_counter() - t
                if batch is None:
                    break
                images = batch[0].to(self.device, non_blocking=True)  # no-op when the loader is on-device
                labels = batch[1].to(self.device, non_blocking=True)
                loss_sum += self.train_step(images, labels)  # stays on the device: no sync
                if self.sample_keys is not None and len(batch) > 2:  # --log-sample-keys: keys are host strings
                    self.sample_keys.write(epoch=epoch, step=self.step + 1, micro=micro, keys=batch[2])
            if batch is None:  # the loader ended its epoch early (not expected: train drops only the tail)
                self.say(f"warning: the train loader ended epoch {epoch} after {self.step_in_epoch} of "
                         f"{self.steps_per_epoch} steps")
                self.step_in_epoch = self.steps_per_epoch
                break
            self.step += 1
            self.step_in_epoch += 1
            window_steps += 1
            bar.update(1)
            end_of_window = (self.step % cfg.log_every == 0 or self.step_in_epoch == self.steps_per_epoch
                             or self.step == self.max_steps)
            if end_of_window:
                if self.device.type == "cuda":
                    # Logging steps only: the window ends when the GPU has finished its steps, not when the
                    # host queued them (the host runs a few steps ahead, which would inflate images/s).
                    torch.cuda.synchronize(self.device)
                save_now, self.stop_agreed = self.log_window(window_steps, loss_sum, data_wait,
                                                             time.perf_counter() - window_start, bar)
                window_start, window_steps, data_wait = time.perf_counter(), 0, 0.0
                loss_sum = torch.zeros((), device=self.device)
                if save_now and not self.stop_agreed and self.step_in_epoch < self.steps_per_epoch:
                    self.save()
            elif self.info.world_size == 1 and self.stop.signum is not None:
                self.stop_agreed = True  # one process: nobody to agree with, stop after this step
            if self.stop_agreed:
                break
        bar.close()
        finished = self.step_in_epoch >= self.steps_per_epoch
        if finished:
            for _ in batches:  # micro-batches left over by --grad-accum-steps, then the loader's end of epoch,
                pass  # so its state points at the next epoch
        return finished

    def log_window(self, steps: int, loss_sum: torch.Tensor, data_wait: float, wall: float,
                   bar: tqdm) -> tuple[bool, bool]:
        """Log one window (the sync point of the loop); returns (rank 0 says "checkpoint now", some rank
        received a stop signal), the same on every rank."""
        cfg, world = self.cfg, self.info.world_size
        due = cfg.checkpoint_minutes > 0 and time.monotonic() - self.last_checkpoint_time >= 60 * cfg.checkpoint_minutes
        flags = (data_wait, wall, float(due and self.is_main), float(self.stop.signum is not None))
        stats = torch.stack([loss_sum.double(), *(torch.tensor(x, dtype=torch.float64, device=self.device)
                                                   for x in flags)])
        dist.all_reduce_sum(stats)  # every rank: loss, wait and wall summed; rank 0's checkpoint flag; stops
        loss, data_wait, wall, save_flag, stop_flag = stats.tolist()  # .tolist() is a sync point
        loss, data_wait, wall = loss / (world * steps * self.accum), data_wait / world, wall / world
        images = steps * self.batch * self.accum  # per process
        self.meter.add(Window(steps=steps, images=images, wall_s=wall, data_wait_s=data_wait))
        record = {
            "kind": "train",
            "epoch": self.epoch,
            "step": self.step,
            "loss": loss,
            "lr": self.peak_lr * lr_factor(self.step - 1, **self.schedule),  # LR of the last step taken
            "images_per_sec_per_gpu": images / wall,  # images/s per GPU (per process)
            "images_per_sec": images * world / wall,  # images/s over all processes
            "step_time_ms": 1000 * wall / steps,
            "data_wait_share": data_wait / wall,
            "image_size": self.train_image_size,
        }
        self.log.write(record)
        if not math.isfinite(loss):
            raise RuntimeError(f"loss is {loss} at step {self.step}: lower --base-lr or use --precision bf16")
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{record['lr']:.3g}")
        self.say(
            f"epoch {self.epoch} step {self.step} | loss {loss:.4f} | lr {record['lr']:.4g} | "
            f"{record['images_per_sec_per_gpu']:.0f} img/s/gpu {record['images_per_sec']:.0f} img/s | "
            f"step {record['step_time_ms']:.1f} ms | data wait {100 * record['data_wait_share']:.1f}%"
        )
        return save_flag > 0, stop_flag > 0

    def owed_eval(self, saved: Path | None) -> None:
        """Run the evaluation the last checkpoint (`saved`) says is owed. A stop signal during it (a val store that
        stopped answering, or just a preemption) ends the run at once: the checkpoint already holds the epoch,
        and the resumed run evaluates first."""
        at = self.pending_eval
        try:
            with self.stop.waiting():
                self.run_eval(at)
        except StopRequested:
            raise Preempted(self.stop.signum or 15, str(saved) if saved else None, self.step) from None

    def stop_during_stall(self) -> None:
        """A stop signal interrupted a wait for data (training.preempt): a process alone checkpoints at the last
        step it finished, when it is not half-way through a group of --grad-accum-steps micro-batches (the
        loader's position would be inside the step); else the run ends without one."""
        why, micro = self.stalled
        self.say(f"{why}: the loader did not deliver (step {self.step + 1} of epoch {self.epoch})")
        signum = self.stop.signum or 15
        if self.info.world_size > 1:
            raise Preempted(signum, None, self.step, why_none="the other ranks may wait in a collective this rank "
                            "cannot join")
        if micro > 0:
            raise Preempted(signum, None, self.step, why_none=f"{micro} of the step's --grad-accum-steps "
                            "micro-batches were already read")
        path = self.save()  # the loader's position is the step's start: the wait gave it nothing
        raise Preempted(signum, str(path) if path else None, self.step)

    def run_eval(self, epoch: float) -> dict:
        """The model on the whole val split, and its EMA when there is one (keys prefixed `ema_`), in one pass
        over the val loader; best.pt follows the model's top-1."""
        self.pending_eval = None
        models = {"model": self.raw_model, **({"ema": self.ema.module} if self.ema is not None else {})}
        results = evaluate_models(models, self.val_loader, device=self.device, precision=self.cfg.precision)
        if "ema" in results and results["ema"]["top1"] > self.best_ema["top1"]:
            ema = results["ema"]
            self.best_ema = {"top1": ema["top1"], "top5": ema["top5"], "step": self.step}
        result = {"kind": "eval", "epoch": epoch, "step": self.step, **with_ema(results)}
        self.log.write(result)
        self.say(eval_line(result))
        self.is_best = result["top1"] > self.best["top1"]
        if self.is_best:
            self.best = {"top1": result["top1"], "top5": result["top5"], "step": self.step}
        self.last_eval = result
        return result

    def save(self) -> Path | None:
        """Checkpoint (collective: every rank hands in its loader position and RNG; rank 0 writes and gets the
        path)."""
        loader_states = dist.all_gather_object(self.train_loader.state_dict())
        rng_states = dist.all_gather_object(checkpoint.rng_state())
        path = None
        if self.is_main:
            state = {
                "model": self.raw_model.state_dict(),
                "optimizer": self.train_step.optimizer.state_dict(),
                "scheduler": self.train_step.scheduler.state_dict(),
                "scaler": self.train_step.scaler.state_dict(),
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "epoch": self.epoch,  # the epoch in progress (== completed epochs when step_in_epoch is 0)
                "step": self.step,  # optimizer steps taken
                "step_in_epoch": self.step_in_epoch,
                "steps_per_epoch": self.steps_per_epoch,
                "image_size": self.train_image_size,  # of the loader whose positions are saved
                "loader_seed": self.train_loader_seed,
                "world_size": self.info.world_size,
                "loader_states": loader_states,  # per rank, plain types
                "rng": rng_states,  # per rank
                "best": self.best,
                "best_ema": self.best_ema,
                "last_eval": self.last_eval,
                "pending_eval": self.pending_eval,
                "config": self.cfg.to_dict(),
            }
            path = checkpoint.save(state, self.run_dir, step=self.step, keep_last=self.cfg.keep_last,
                                   is_best=self.is_best)
            self.say(f"checkpoint {path}" + (" (best)" if self.is_best else ""))
        self.is_best = False
        self.last_checkpoint_time = time.monotonic()
        dist.barrier()
        return path

    def finish(self, wall_time: float) -> dict:
        summary = {
            "final_top1": self.last_eval["top1"] if self.last_eval else None,
            "final_top5": self.last_eval["top5"] if self.last_eval else None,
            "best_top1": self.best["top1"] if self.best["top1"] >= 0 else None,
            "best_top5": self.best["top5"] if self.best["top1"] >= 0 else None,
            "final_ema_top1": self.last_eval.get("ema_top1") if self.last_eval else None,
            "final_ema_top5": self.last_eval.get("ema_top5") if self.last_eval else None,
            "best_ema_top1": self.best_ema["top1"] if self.best_ema["top1"] >= 0 else None,
            "best_ema_top5": self.best_ema["top5"] if self.best_ema["top1"] >= 0 else None,
            "final_eval": self.last_eval,
            "images_per_sec_per_gpu": self.meter.images_per_sec_per_gpu,
            "images_per_sec": self.meter.images_per_sec,
            "data_wait_share": self.meter.data_wait_share,
            "throughput_steps": self.meter.counted.steps,  # steps the averages cover (warm-up excluded)
            "wall_time_s": wall_time,
            "steps": self.step,
            "epochs_completed": self.epoch,
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
            if summary["final_ema_top1"] is not None:
                best += f" (EMA final {summary['final_ema_top1']:.2f}%, best {summary['best_ema_top1']:.2f}%)"
            self.say(f"done: {self.step} steps in {wall_time:.0f} s; val top-1 final {final}, best {best}; "
                     f"{throughput}; summary in {self.run_dir / 'summary.json'}")
        return summary
