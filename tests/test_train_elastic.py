"""Elastic resume, end to end: a run on 2 processes stopped mid-epoch by SIGTERM continues on 1, 3 or 4 processes
with the same global batches, step for step, as a run that never stopped (torchrun, gloo, CPU).

Every run logs the sample keys of each micro-batch (--log-sample-keys); a step's global batch is the union of
what all ranks logged for it. The order does not depend on the backend either, so the dali-cpu runs are
compared with the pytorch run that never stopped.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY_CLASSES, TINY_TRAIN_PER_CLASS

from training import checkpoint

ROOT = Path(__file__).parents[1]
GLOBAL = 12  # samples per optimizer step: 1, 2, 3 and 4 processes keep it
STEPS = len(TINY_CLASSES) * TINY_TRAIN_PER_CLASS // GLOBAL  # 5 steps per epoch
EPOCHS = 3
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def command(shards: Path, run_dir: Path, backend: str, nproc: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "tools.cli", "train", "--data", str(shards), "--backend", backend, "--num-threads", "1",
            "--arch", "resnet18", "--image-size", "32", "--precision", "fp32", "--global-batch-size", str(GLOBAL),
            "--epochs", str(EPOCHS), "--warmup-epochs", "1", "--log-every", "1", "--throughput-warmup-steps", "0",
            "--checkpoint-minutes", "0", "--log-sample-keys", "--no-progress", "--run-dir", str(run_dir), *extra]


def global_batches(run_dir: Path) -> dict[int, list[str]]:
    """Step -> the sorted sample keys every rank trained on in it."""
    steps: dict[int, list[str]] = {}
    for path in sorted((run_dir / "sample_keys").glob("rank-*.jsonl")):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            steps.setdefault(record["step"], []).extend(record["keys"])
    return {step: sorted(keys) for step, keys in sorted(steps.items())}


def train(shards: Path, run_dir: Path, backend: str, nproc: int, *extra: str) -> subprocess.CompletedProcess:
    done = subprocess.run(command(shards, run_dir, backend, nproc, *extra), cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def stopped_mid_epoch(shards: Path, run_dir: Path, backend: str) -> int:
    """Train on 2 processes, SIGTERM every process once step 7 (epoch 1) is logged; returns the checkpoint's step."""
    proc = subprocess.Popen(command(shards, run_dir, backend, 2), cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    metrics, deadline = run_dir / "metrics.jsonl", time.monotonic() + 300
    while not (metrics.is_file() and any(json.loads(line).get("step", 0) >= STEPS + 2 and
                                         json.loads(line)["kind"] == "train"
                                         for line in metrics.read_text().splitlines())):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGTERM)  # every process of the job, as a scheduler does
    _, err = proc.communicate(timeout=300)
    assert "stopped by SIGTERM" in err, err[-3000:]
    stop = checkpoint.load(checkpoint.list_checkpoints(run_dir)[-1])
    assert stop["world_size"] == 2 and stop["step_in_epoch"] > 0, "the stop must land mid-epoch"
    return stop["step"]


@pytest.mark.slow
def test_a_run_stopped_on_2_processes_continues_on_1_3_and_4_with_the_same_global_batches(tiny_shards, tmp_path):
    whole = tmp_path / "whole"
    train(tiny_shards, whole, "pytorch", 2)
    reference = global_batches(whole)
    assert list(reference) == list(range(1, EPOCHS * STEPS + 1))
    epochs = [[k for step in range(e * STEPS + 1, (e + 1) * STEPS + 1) for k in reference[step]]
              for e in range(EPOCHS)]
    for keys in epochs:  # every sample once per epoch, a different order every epoch
        assert len(keys) == len(set(keys)) == STEPS * GLOBAL
    assert epochs[0] != epochs[1] != epochs[2]

    stopped = tmp_path / "stopped"
    stop = stopped_mid_epoch(tiny_shards, stopped, "pytorch")
    for nproc in (1, 3, 4):
        run_dir = tmp_path / f"resumed-on-{nproc}"
        shutil.copytree(stopped, run_dir)
        done = train(tiny_shards, run_dir, "pytorch", nproc, "--resume", "auto")
        assert "the data order of epoch" not in done.stdout  # nothing restarts
        got = global_batches(run_dir)
        assert got == reference, f"resumed on {nproc} after step {stop}"
        epoch = (stop - 1) // STEPS  # the interrupted epoch: each of its samples exactly once over both runs
        keys = [k for step in range(epoch * STEPS + 1, (epoch + 1) * STEPS + 1) for k in got[step]]
        assert len(keys) == len(set(keys)) == STEPS * GLOBAL


@pytest.mark.slow
def test_dali_cpu_stopped_on_2_processes_continues_on_3_in_the_same_order_as_pytorch(tiny_shards, tmp_path):
    """The order is the backend's neither: dali-cpu's global batches equal the pytorch run's, also across a stop
    on 2 processes and a resume on 3."""
    whole = tmp_path / "whole"
    train(tiny_shards, whole, "pytorch", 1)
    stopped = tmp_path / "stopped"
    stop = stopped_mid_epoch(tiny_shards, stopped, "dali-cpu")
    train(tiny_shards, stopped, "dali-cpu", 3, "--resume", "auto")
    assert global_batches(stopped) == global_batches(whole), f"after step {stop}"
