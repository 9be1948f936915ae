"""The training loop end to end on tiny_shards through the dali-cpu loader: exact resume, rank-correct
evaluation with 2 gloo processes, evaluate-only, and the run directory's files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from training import checkpoint
from training.config import build_config
from training.train import train

TINY_TRAIN, TINY_VAL = 60, 25  # samples in tiny_shards (tests/conftest.py)


def tiny_config(shards: Path, run_dir: Path, **overrides):
    return build_config(overrides={**dict(
        data=str(shards), backend="dali-cpu", arch="resnet18", image_size=32, crop_area=(0.35, 1.0),
        precision="fp32", batch_size=8, base_lr=0.8, warmup_epochs=1, epochs=3, num_threads=1,
        log_every=3, throughput_warmup_steps=2, run_dir=str(run_dir), progress=False,
        checkpoint_minutes=0, keep_last=10, deterministic=True,
    ), **overrides})


def final_checkpoint(run_dir: Path) -> dict:
    return checkpoint.load(checkpoint.list_checkpoints(run_dir)[-1])


def test_resume_mid_epoch_matches_an_uninterrupted_run(tiny_shards, tmp_path):
    steps_per_epoch = TINY_TRAIN // 8  # 7
    whole = train(tiny_config(tiny_shards, tmp_path / "whole", max_steps=10))
    assert whole["steps"] == 10

    first = train(tiny_config(tiny_shards, tmp_path / "split", max_steps=4))  # stops mid-epoch 0
    assert first["steps"] == 4
    stopped = final_checkpoint(tmp_path / "split")
    assert (stopped["step"], stopped["epoch"], stopped["step_in_epoch"]) == (4, 0, 4)
    assert stopped["loader_states"][0]["batch_in_epoch"] == 4
    second = train(tiny_config(tiny_shards, tmp_path / "split", max_steps=10, resume="auto"))
    assert second["steps"] == 10

    a, b = final_checkpoint(tmp_path / "whole"), final_checkpoint(tmp_path / "split")
    assert (a["step"], a["epoch"], a["step_in_epoch"]) == (b["step"], b["epoch"], b["step_in_epoch"]) == (
        10, 1, 10 - steps_per_epoch)
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == 10
    assert a["optimizer"]["param_groups"][0]["lr"] == b["optimizer"]["param_groups"][0]["lr"]
    for key in ("epoch", "batch_in_epoch"):
        assert a["loader_states"][0][key] == b["loader_states"][0][key]
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name  # same samples, same order, same weights
    momentum_a = [s["momentum_buffer"] for s in a["optimizer"]["state"].values()]
    momentum_b = [s["momentum_buffer"] for s in b["optimizer"]["state"].values()]
    assert all(torch.equal(x, y) for x, y in zip(momentum_a, momentum_b, strict=True))
    assert whole["final_eval"]["correct1"] == second["final_eval"]["correct1"]

    # the run directory a user reads: metrics of both sessions, summary, curves, config
    records = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if r["kind"] == "train"]
    assert train_steps == [3, 4, 6, 7, 9, 10]  # every 3 steps, at the epoch end (7) and at each stop
    for r in records:
        if r["kind"] == "train":
            assert r["images_per_sec"] == pytest.approx(r["images_per_sec_per_gpu"])  # one process
            assert 0 <= r["data_wait_share"] <= 1 and r["step_time_ms"] > 0 and r["image_size"] == 32
        else:
            assert r["total"] == TINY_VAL
    summary = json.loads((tmp_path / "split" / "summary.json").read_text())
    assert summary["steps"] == 10 and summary["config"]["max_steps"] == 10
    assert summary["images_per_sec_per_gpu"] > 0 and 0 <= summary["data_wait_share"] <= 1
    assert (tmp_path / "split" / "curves.png").stat().st_size > 0
    assert json.loads((tmp_path / "split" / "config.json").read_text())["resume"] == "auto"
    assert b["config"]["resume"] == "auto" and stopped["config"]["max_steps"] == 4


def test_resume_with_policy_mixup_and_ema_is_exact(tiny_shards, tmp_path):
    """Everything that draws random numbers or keeps state beside the weights, on at once: TrivialAugment and
    random erasing in the DALI graph (conditionals in the DALI checkpoint), mixup/cutmix seeded per micro-batch,
    the EMA and its update counter, AdamW with clipping, two micro-batches per step. Stopped mid-epoch and
    resumed, the run ends bit-identical to an uninterrupted one, across the epoch boundary."""
    regularised = dict(augment="trivialaugment", random_erasing=0.5, mixup=0.2, cutmix=1.0, ema_decay=0.8,
                       ema_every=2, optimizer="adamw", base_lr=0.01, clip_grad_norm=1.0, batch_size=4,
                       grad_accum_steps=2)
    whole = train(tiny_config(tiny_shards, tmp_path / "whole", max_steps=9, **regularised))
    train(tiny_config(tiny_shards, tmp_path / "split", max_steps=3, **regularised))
    stopped = final_checkpoint(tmp_path / "split")
    assert (stopped["step"], stopped["step_in_epoch"], stopped["loader_states"][0]["batch_in_epoch"]) == (3, 3, 6)
    assert stopped["loader_states"][0]["augment"] == "trivialaugment+random_erasing(0.5)"
    second = train(tiny_config(tiny_shards, tmp_path / "split", max_steps=9, resume="auto", **regularised))

    a, b = final_checkpoint(tmp_path / "whole"), final_checkpoint(tmp_path / "split")
    assert (a["step"], a["epoch"], a["step_in_epoch"]) == (b["step"], b["epoch"], b["step_in_epoch"]) == (9, 1, 2)
    assert a["steps_per_epoch"] == 7  # 15 micro-batches of 4 in pairs; the 15th is read and not trained on
    assert a["ema"]["optimizer_steps"] == b["ema"]["optimizer_steps"] == 9
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    for name in a["ema"]["module"]:
        assert torch.equal(a["ema"]["module"][name], b["ema"]["module"][name]), name
    for key, state in a["optimizer"]["state"].items():
        assert all(torch.equal(state[k], b["optimizer"]["state"][key][k]) for k in ("exp_avg", "exp_avg_sq"))
    assert not torch.equal(a["ema"]["module"]["fc.weight"], a["model"]["fc.weight"])
    final = whole["final_eval"]
    for key in ("correct1", "correct5", "ema_correct1", "ema_correct5"):
        assert final[key] == second["final_eval"][key], key
    summary = json.loads((tmp_path / "split" / "summary.json").read_text())
    assert summary["final_ema_top1"] == final["ema_top1"] and summary["best_ema_top1"] is not None
    evals = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in evals if r["kind"] == "eval" and "ema_top1" in r] == [3, 7, 9]


def test_ema_evaluation_reads_the_val_split_once(tmp_path, monkeypatch, capsys):
    """Each evaluation of a run with --ema-decay (and --evaluate-only of its checkpoint) is one pass over the
    val loader, which serves the model and its EMA; resuming that run without --ema-decay says that the EMA is
    dropped, in one line."""
    import training.train

    passes: list[int] = []

    class CountingLoader:
        def __init__(self, loader):
            self.loader = loader

        def __iter__(self):
            passes[-1] += 1
            return iter(self.loader)

        def __getattr__(self, name):
            return getattr(self.loader, name)

    real_make_loader = training.train.make_loader

    def make_loader(cfg, info, *, train, **kwargs):  # the val loader of each run, counted
        loader = real_make_loader(cfg, info, train=train, **kwargs)
        if train:
            return loader
        passes.append(0)
        return CountingLoader(loader)

    monkeypatch.setattr(training.train, "make_loader", make_loader)
    synthetic = dict(backend="synthetic", arch="resnet18", image_size=32, precision="fp32", batch_size=4,
                     synthetic_samples=8, synthetic_val_samples=6, num_classes=3, log_every=2, progress=False,
                     checkpoint_minutes=0, run_dir=str(tmp_path / "run"))
    summary = train(build_config(overrides=dict(synthetic, epochs=2, ema_decay=0.5)))
    evals = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if r["kind"] == "eval"]
    assert len(evals) == 2 and passes == [2]  # two evaluations of model + EMA, one val pass each
    assert all(r["total"] == 6 and r["ema_correct1"] <= r["ema_correct5"] <= 6 for r in evals)
    assert summary["final_ema_top1"] == evals[-1]["ema_top1"]

    result = train(build_config(overrides=dict(synthetic, evaluate_only=True, resume="auto")))
    assert passes == [2, 1] and result["ema_correct5"] == evals[-1]["ema_correct5"]
    capsys.readouterr()
    train(build_config(overrides=dict(synthetic, epochs=3, resume="auto")))
    warned = [line for line in capsys.readouterr().out.splitlines() if "holds an EMA" in line]
    assert warned == [f"warning: {tmp_path / 'run' / 'checkpoints' / 'step-00000004.pt'} holds an EMA of the "
                      "weights but --ema-decay is not set: this run drops it (pass --ema-decay 0.5 to keep "
                      "averaging)"]


def _torchrun(args: list[str], nproc: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "tools.cli", "train", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def _flags(config) -> list[str]:
    flags = []
    for key, value in config.to_dict().items():
        if value is None:
            continue
        if isinstance(value, bool):
            flags.append(f"--{key.replace('_', '-')}" if value else f"--no-{key.replace('_', '-')}")
        elif isinstance(value, list):
            flags += [f"--{key.replace('_', '-')}", *map(str, value)]
        else:
            flags += [f"--{key.replace('_', '-')}", str(value)]
    return flags


def test_resume_with_another_global_batch_is_refused(tiny_shards, tmp_path):
    """The scheduler's state holds the peak LR of the checkpoint's global batch: continuing with another batch
    would keep the wrong LR, so the resume stops and says which value keeps the schedule."""
    train(tiny_config(tiny_shards, tmp_path, max_steps=2))
    from training.config import ConfigError

    with pytest.raises(ConfigError, match="--global-batch-size: .* global batch of 8 on 1 process.*this run's is 4"):
        train(tiny_config(tiny_shards, tmp_path, max_steps=4, batch_size=4, resume="auto"))
    resumed = train(tiny_config(tiny_shards, tmp_path, max_steps=4, batch_size=4, global_batch_size=8,
                                resume="auto"))
    assert resumed["steps"] == 4


def test_two_gloo_processes_train_and_count_like_one(tiny_shards, tmp_path):
    """2 processes (torchrun, gloo, each reading its own share of the shards) train 3 steps of global batch
    8; their val counts, summed over ranks, equal one process's on the same checkpoint."""
    config = tiny_config(tiny_shards, tmp_path / "ddp", batch_size=4, max_steps=3, deterministic=False)
    done = _torchrun(_flags(config), nproc=2)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert (summary["world_size"], summary["global_batch"], summary["steps"]) == (2, 8, 3)
    assert summary["peak_lr"] == pytest.approx(0.8 * 8 / 256)
    ddp_eval = summary["final_eval"]
    assert ddp_eval["total"] == TINY_VAL
    ckpt = final_checkpoint(tmp_path / "ddp")
    assert ckpt["world_size"] == 2 and len(ckpt["loader_states"]) == 2
    assert [s["rank"] for s in ckpt["loader_states"]] == [0, 1]
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == [  # .claim: rank 0's hold on the run dir
        ".claim", "checkpoints", "config.json", "curves.png", "metrics.jsonl", "summary.json"]

    path = checkpoint.list_checkpoints(tmp_path / "ddp")[-1]
    single = train(tiny_config(tiny_shards, tmp_path / "eval1", evaluate_only=True, resume=str(path)))
    for key in ("correct1", "correct5", "total"):
        assert single[key] == ddp_eval[key], (single, ddp_eval)
    assert json.loads((tmp_path / "eval1" / "eval.json").read_text())["correct1"] == ddp_eval["correct1"]


def test_evaluate_only_from_a_torchvision_state_dict(tiny_shards, tmp_path):
    from training.model import build_model

    torch.manual_seed(1)
    weights = tmp_path / "resnet18-1000.pth"
    torch.save(build_model("resnet18", num_classes=1000, channels_last=False).state_dict(), weights)
    result = train(tiny_config(tiny_shards, tmp_path / "run", evaluate_only=True, pretrained=str(weights)))
    assert result["total"] == TINY_VAL and 0 <= result["correct1"] <= result["correct5"] <= TINY_VAL
    assert result["pretrained"] == str(weights)


def test_cli_synthetic_run_with_progressive_resizing(tmp_path, capsys):
    """`saturate train --backend synthetic` end to end: --epochs and --max-steps, the loader rebuilt at the
    epoch where the crop grows (32 -> 64 px), evaluation at each epoch end and at the stop."""
    from tools.train_cmd import main

    run = tmp_path / "run"
    argv = ["--backend", "synthetic", "--arch", "resnet18", "--precision", "fp32", "--batch-size", "4",
            "--synthetic-samples", "16", "--synthetic-val-samples", "10", "--num-classes", "10",
            "--min-res", "32", "--image-size", "64", "--start-ramp", "0", "--end-ramp", "1",
            "--epochs", "3", "--max-steps", "6", "--log-every", "2", "--no-progress", "--run-dir", str(run)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "epoch 1: training crop 64 px" in out
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_records = [(r["step"], r["image_size"]) for r in records if r["kind"] == "train"]
    assert train_records == [(2, 32), (4, 32), (6, 64)]
    evals = [(r["epoch"], r["step"], r["total"]) for r in records if r["kind"] == "eval"]
    assert evals == [(1, 4, 10), (1.5, 6, 10)]
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["steps"], summary["epochs_completed"], summary["global_batch"]) == (6, 1, 4)
    assert [p.name for p in checkpoint.list_checkpoints(run)] == ["step-00000004.pt", "step-00000006.pt"]
    assert checkpoint.load(run / "checkpoints" / "step-00000006.pt")["image_size"] == 64


@pytest.mark.gpu
@pytest.mark.parametrize(("backend", "compile_model"), [("dali-gpu", False), ("synthetic", True)])
def test_gpu_bf16_training(tiny_shards, tmp_path, backend, compile_model):
    """On a GPU: DALI GPU batches (or synthetic device tensors) into the bf16 channels_last step, NCCL-free
    single process, optional torch.compile; the loop, evaluation and checkpoint run on the device."""
    config = tiny_config(tiny_shards, tmp_path / "run", backend=backend, precision="bf16", deterministic=False,
                         compile=compile_model, max_steps=4, num_classes=5 if backend == "synthetic" else None,
                         synthetic_samples=32, synthetic_val_samples=25)
    summary = train(config)
    assert summary["steps"] == 4 and summary["final_eval"]["total"] == TINY_VAL
    ckpt = final_checkpoint(tmp_path / "run")
    assert all(t.device.type == "cpu" for t in ckpt["model"].values())  # loaded with map_location="cpu"


def test_time_based_checkpoints_mid_epoch(tmp_path):
    """--checkpoint-minutes: rank 0's clock decides at log steps; the checkpoint lands mid-epoch with the
    loader position, and `saturate train` dispatches to the same code."""
    from tools.cli import main

    run = tmp_path / "run"
    argv = ["train", "--backend", "synthetic", "--arch", "resnet18", "--precision", "fp32", "--batch-size", "2",
            "--image-size", "32", "--synthetic-samples", "8", "--synthetic-val-samples", "4", "--num-classes",
            "3", "--epochs", "1", "--max-steps", "3", "--log-every", "1", "--checkpoint-minutes", "1e-9",
            "--keep-last", "5", "--no-progress", "--run-dir", str(run)]
    assert main(argv) == 0
    assert [p.name for p in checkpoint.list_checkpoints(run)] == [
        "step-00000001.pt", "step-00000002.pt", "step-00000003.pt"]
    mid = checkpoint.load(run / "checkpoints" / "step-00000002.pt")
    assert (mid["epoch"], mid["step_in_epoch"], mid["loader_states"][0]["batch_in_epoch"]) == (0, 2, 2)
