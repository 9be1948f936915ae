"""What operators do to a run: preempt it (SIGTERM / SIGUSR1), kill it mid-checkpoint, start it under torchrun
without telling the loader, or start it with flags that cannot work. Each test failed before its fix."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from pipeline import build_loader
from shards.process import TMP_MARK, atomic_write, host_tag, remove_stale_temporaries
from tools.cli import main as cli
from training import checkpoint

ROOT = Path(__file__).parents[1]


def train_argv(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "tools.cli", "train", "--data", str(shards), "--backend", "pytorch",
            "--num-threads", "2",
            "--arch", "resnet18", "--image-size", "32", "--crop-area", "0.35", "1.0", "--precision", "fp32",
            "--batch-size", "4", "--base-lr", "0.4", "--warmup-epochs", "1", "--epochs", "2", "--log-every", "1",
            "--throughput-warmup-steps", "0", "--checkpoint-minutes", "0", "--keep-last", "50", "--deterministic",
            "--no-progress", "--run-dir", str(run_dir), *extra]


def run(argv: list[str], timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, **kwargs)


def dead_pid() -> int:
    pid = 4_000_000
    while psutil.pid_exists(pid):
        pid -= 1
    return pid


# --- 7. preemption -----------------------------------------------------------------------------------------
def test_sigterm_checkpoints_exits_143_and_resume_auto_continues_exactly(tiny_shards, tmp_path):
    whole = run(train_argv(tiny_shards, tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr

    run_dir = tmp_path / "preempted"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(train_argv(tiny_shards, run_dir), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and metrics.read_text().count('"kind": "train"') >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "slow"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGTERM)  # like Kubernetes: every process of the pod, loader workers included
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    stopped = checkpoint.load(checkpoint.list_checkpoints(run_dir)[-1])
    assert f"stopped by SIGTERM at step {stopped['step']} after writing checkpoint" in err
    assert 2 <= stopped["step"] < 30 and "Traceback" not in err
    # a checkpoint write killed half-way leaves a temporary; the next start removes it
    stale = run_dir / "checkpoints" / f".step-99999999.pt{TMP_MARK}{host_tag()}-{dead_pid()}-0000"
    stale.write_bytes(b"half a checkpoint")

    resumed = run(train_argv(tiny_shards, run_dir, "--resume", "auto"))
    assert resumed.returncode == 0, resumed.stderr
    assert not stale.exists() and f"removed {stale}" in resumed.stdout
    a = checkpoint.load(checkpoint.list_checkpoints(tmp_path / "whole")[-1])
    b = checkpoint.load(checkpoint.list_checkpoints(run_dir)[-1])
    assert a["step"] == b["step"] == 30  # 2 epochs of 60 // 4 batches (sample order, whatever the workers)
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name


def test_sigusr1_stops_with_status_138(tmp_path):
    argv = [sys.executable, "-m", "tools.cli", "train", "--backend", "synthetic", "--arch", "resnet18",
            "--precision", "fp32",
            "--batch-size", "2", "--image-size", "32", "--synthetic-samples", "4000", "--synthetic-val-samples", "4",
            "--num-classes", "3", "--epochs", "1", "--log-every", "1000", "--no-progress", "--run-dir",
            str(tmp_path / "run")]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while "training resnet18" not in proc.stdout.readline():
        assert proc.poll() is None
    time.sleep(1.0)
    proc.send_signal(signal.SIGUSR1)  # Slurm's --signal=USR1@<seconds>
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGUSR1, err
    assert "stopped by SIGUSR1" in err and checkpoint.list_checkpoints(tmp_path / "run")


@pytest.mark.parametrize("signum, forwarded, stopped_by", [
    (signal.SIGUSR1, "", "SIGTERM"),  # torchrun dies of it; the kernel sends each rank SIGTERM
    (signal.SIGKILL, "", "SIGTERM"),
    (signal.SIGUSR1, "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", "SIGUSR1"),  # what train.sbatch sets: forwarded
])
def test_a_stop_signal_to_torchrun_ends_in_one_checkpoint_and_no_process_left(tiny_shards, tmp_path, signum,
                                                                             forwarded, stopped_by):
    """`kill -USR1 <torchrun pid>` killed torchrun at once and left both ranks and their DataLoader workers running
    as orphans under PID 1 (torchrun starts each rank in its own session and handles only SIGTERM, SIGINT,
    SIGHUP and SIGQUIT). Each rank now has the kernel send it SIGTERM when torchrun dies: one checkpoint,
    then every process ends."""
    run_dir = tmp_path / "run"
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            *train_argv(tiny_shards, run_dir, "--epochs", "40")[1:]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("PET_SIGNALS_TO_HANDLE", None)
    if forwarded:  # torchrun --signals-to-handle, as an environment variable
        env["PET_SIGNALS_TO_HANDLE"] = forwarded
    with open(tmp_path / "out.txt", "w") as out:  # files, not pipes: orphans would hold a pipe open
        torchrun = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    job, processes = psutil.Process(torchrun.pid), []
    try:
        metrics = run_dir / "metrics.jsonl"
        deadline = time.monotonic() + 180
        while not (metrics.is_file() and metrics.read_text().count('"kind": "train"') >= 3):
            assert torchrun.poll() is None and time.monotonic() < deadline, (tmp_path / "out.txt").read_text()
            time.sleep(0.05)
        processes = job.children(recursive=True)  # 2 ranks, 2 DataLoader workers each
        assert len(processes) >= 4
        torchrun.send_signal(signum)
        torchrun.wait(timeout=60)
        gone, alive = psutil.wait_procs(processes, timeout=90)
        assert alive == [], (tmp_path / "out.txt").read_text()
    finally:  # whatever happened, this test leaves nothing running
        for process in [*processes, *(job.children(recursive=True) if torchrun.poll() is None else [])]:
            with contextlib.suppress(psutil.Error):
                process.kill()
        torchrun.kill()
    log = (tmp_path / "out.txt").read_text()
    stopped = checkpoint.load(checkpoint.list_checkpoints(run_dir)[-1])
    assert 3 <= stopped["step"] < 40 * 7 and stopped["world_size"] == 2
    assert log.count(f"stopped by {stopped_by}") == 2, log  # both ranks, at the same step, after rank 0's checkpoint
    assert f"stopped by {stopped_by} at step {stopped['step']} after writing checkpoint" in log, log


def test_stale_temporaries_of_dead_writers_only_are_removed(tmp_path):
    mine = tmp_path / f".a.pt{TMP_MARK}{host_tag()}-{os.getpid()}-0001"
    dead = tmp_path / f".b.pt{TMP_MARK}{host_tag()}-{dead_pid()}-0002"
    foreign = tmp_path / f".c.pt{TMP_MARK}otherhost-12-0003"
    for path in (mine, dead, foreign):
        path.write_bytes(b"x")
    atomic_write(tmp_path / "kept.json", "{}")
    assert remove_stale_temporaries(tmp_path) == [dead]
    assert mine.exists() and foreign.exists() and (tmp_path / "kept.json").read_text() == "{}"
    old = time.time() - 2 * 86400
    os.utime(foreign, (old, old))
    assert remove_stale_temporaries(tmp_path) == [foreign]


# --- 8. distributed defaults ---------------------------------------------------------------------------------
def test_loader_defaults_to_torchrun_rank_and_refuses_a_mismatch(tiny_shards, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    loader = build_loader(tiny_shards, "val", train=False, batch_size=4, image_size=32, backend="dali-cpu",
                          num_threads=1)
    assert (loader.rank, loader.world_size, loader.num_samples) == (1, 2, 25 - 25 // 2)
    with pytest.raises(ValueError, match=r"rank=0, world_size=1 disagree with \$RANK/\$WORLD_SIZE \(rank 1 of 2\)"):
        build_loader(tiny_shards, "val", train=False, batch_size=4, backend="pytorch", rank=0, world_size=1)


# --- 10. a bad start writes nothing ------------------------------------------------------------------------------
@pytest.mark.parametrize("make_data, flags, message", [
    (lambda shards, tmp: tmp, [], "val.manifest.json not found: convert the val split first"),
    (lambda shards, tmp: shards, ["--batch-size", "100000"], "too few for world_size=1 x batch_size=100000"),
    (lambda shards, tmp: shards, ["--val-split", "../val"], "--val-split: must be letters, digits and '_'"),
])
def test_train_that_cannot_start_prints_one_line_and_writes_nothing(tiny_shards, tmp_path, capsys, make_data,
                                                                     flags, message):
    run_dir = tmp_path / "run"
    argv = ["train", "--data", str(make_data(tiny_shards, tmp_path)), "--backend", "dali-cpu", "--precision", "fp32",
            "--arch", "resnet18", "--num-threads", "1", "--run-dir", str(run_dir), *flags]
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not run_dir.exists()


def test_train_evaluates_any_split_name(tiny_imagenet, tiny_shards, tmp_path):
    from shards.convert import convert
    from training.config import build_config
    from training.train import train

    data = tmp_path / "data"
    data.mkdir()
    for path in tiny_shards.glob("train*"):
        (data / path.name).write_bytes(path.read_bytes())
    convert(tiny_imagenet / "val", data, split="minival", samples_per_shard=10, workers=1, progress=False)
    summary = train(build_config(overrides=dict(
        data=str(data), val_split="minival", backend="dali-cpu", arch="resnet18", image_size=32, precision="fp32",
        batch_size=8, epochs=1, max_steps=2, num_threads=1, run_dir=str(tmp_path / "run"), progress=False,
    )))
    assert summary["final_eval"]["total"] == 25
    assert json.loads((tmp_path / "run" / "config.json").read_text())["val_split"] == "minival"


def start_sbatch(tmp_path: Path, on_term: str) -> subprocess.Popen:
    """training/slurm/train.sbatch with stand-ins for srun (a 'torchrun' that runs `on_term` on SIGTERM, then exits
    like the trainer) and scontrol (requeue records the job id), once its 'ranks' are running."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(
        "#!/bin/bash\n"
        f"trap '{on_term} > {tmp_path}/ranks-stopped; exit 143' TERM\n"
        "echo started > " + str(tmp_path / "ranks-started") + "\n"
        "while :; do sleep 0.05; done\n")
    (bin_dir / "scontrol").write_text(
        "#!/bin/bash\n"
        f"if [ \"$1\" = requeue ]; then echo \"$2\" > {tmp_path}/requeued; else echo node01; fi\n")
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "42",
           "SLURM_JOB_NODELIST": "node01", "SLURM_JOB_NUM_NODES": "1"}
    env.pop("PET_SIGNALS_TO_HANDLE", None)
    proc = subprocess.Popen(["bash", str(ROOT / "training" / "slurm" / "train.sbatch"), "--data", "/shards"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not (tmp_path / "ranks-started").exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    return proc


def test_sbatch_script_stops_the_ranks_and_requeues_on_usr1(tmp_path):
    """Slurm's --signal=B:USR1 reaches the batch shell, which must pass SIGTERM on to the ranks, wait for them,
    then requeue the job."""
    proc = start_sbatch(tmp_path, 'echo "$*"')
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    stopped_args = (tmp_path / "ranks-stopped").read_text()
    assert "-m tools.cli train --resume auto --checkpoint-minutes 20 --data /shards" in stopped_args
    assert (tmp_path / "requeued").read_text().strip() == "42"


def test_sbatch_script_passes_sigterm_on_to_the_ranks_without_requeueing(tmp_path):
    """scancel and a preemption send SIGTERM to the batch shell too: it used to die at once, leaving srun to its
    fate; it now passes the stop on, waits for the ranks' checkpoint, and leaves requeueing to Slurm."""
    proc = start_sbatch(tmp_path, 'echo "$PET_SIGNALS_TO_HANDLE"')
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 143, err
    # torchrun is told to forward SIGUSR1 too (a plain --signal=USR1 reaches it)
    assert (tmp_path / "ranks-stopped").read_text().strip() == "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
    assert not (tmp_path / "requeued").exists()


# --- risks of the GPU path that can be checked here -----------------------------------------------------------
def test_bf16_checkpoint_continues_in_fp16_with_a_fresh_loss_scale():
    from training.resume import restore_scaler

    said = []
    bf16 = torch.amp.GradScaler("cpu", enabled=False)
    fp16 = torch.amp.GradScaler("cpu", enabled=True)
    restore_scaler(fp16, bf16.state_dict(), say=said.append)  # used to raise "The source state dict is empty"
    assert fp16.get_scale() == 65536.0 and "starts at its default" in said[0]
    restore_scaler(bf16, fp16.state_dict(), say=said.append)  # fp16 -> bf16: the disabled scaler ignores it
    assert len(said) == 1


def test_rng_state_holds_one_cuda_state_per_rank_and_reads_old_lists():
    from training.checkpoint import rng_state, set_rng_state

    state = rng_state()
    assert not isinstance(state["cuda"], list)  # this device's state only (None without a GPU)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    old_format = {**rng_state(), "cuda": []}  # written before: every visible GPU's state
    torch.rand(3)
    set_rng_state(old_format)
    assert torch.equal(torch.rand(3), expected)


def test_an_evaluation_a_stop_signal_postponed_runs_first_on_resume(tiny_shards, tmp_path, monkeypatch):
    """A SIGTERM that lands on an epoch's last step: the checkpoint says the epoch's evaluation is owed, and the
    resumed run runs it before training on (it used to be lost: metrics and best.pt skipped that epoch)."""
    from test_train_loop import tiny_config

    from training.preempt import Preempted
    from training.train import train
    from training.trainer import Trainer

    whole = train(tiny_config(tiny_shards, tmp_path / "whole", epochs=2))
    real_log_window = Trainer.log_window

    def signal_at_the_epoch_end(self, *args, **kwargs):
        if self.step == self.steps_per_epoch:  # the last step of epoch 0: SIGTERM arrives now
            self.stop.signum = signal.SIGTERM
        return real_log_window(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "log_window", signal_at_the_epoch_end)
    with pytest.raises(Preempted):
        train(tiny_config(tiny_shards, tmp_path / "run", epochs=2))
    monkeypatch.setattr(Trainer, "log_window", real_log_window)
    stopped = checkpoint.load(checkpoint.list_checkpoints(tmp_path / "run")[-1])
    assert (stopped["epoch"], stopped["step_in_epoch"], stopped["pending_eval"]) == (1, 0, 1)
    resumed = train(tiny_config(tiny_shards, tmp_path / "run", epochs=2, resume="auto"))
    evals = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "eval"]
    reference = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()
                 if json.loads(line)["kind"] == "eval"]
    assert [(e["epoch"], e["correct1"]) for e in evals] == [(e["epoch"], e["correct1"]) for e in reference]
    assert resumed["best_top1"] == whole["best_top1"]


def test_a_fresh_run_into_a_run_dir_with_checkpoints_is_refused(tiny_shards, tmp_path, capsys):
    argv = ["train", "--data", str(tiny_shards), "--backend", "dali-cpu", "--precision", "fp32", "--arch", "resnet18",
            "--image-size", "32", "--batch-size", "8", "--num-threads", "1", "--max-steps", "2", "--no-progress",
            "--run-dir", str(tmp_path / "run")]
    assert cli(argv) == 0
    assert cli(argv) == 2  # would rotate its checkpoints behind the old run's; --resume auto would pick the old run
    err = capsys.readouterr().err
    assert "holds checkpoints of an earlier run (newest step-00000002.pt); pass --resume auto" in err
    assert cli([*argv, "--num-classes", "3", "--run-dir", str(tmp_path / "other")]) == 2
    assert "--num-classes: 3, but the shards have 5 classes" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()


def test_resume_drops_the_metrics_a_kill_left_after_the_checkpoint(tiny_shards, tmp_path):
    from test_train_loop import tiny_config

    from training.train import train

    train(tiny_config(tiny_shards, tmp_path / "run", max_steps=4, log_every=1))
    metrics = tmp_path / "run" / "metrics.jsonl"
    ghost = {"kind": "train", "step": 5, "loss": 9.0}  # logged, then kill -9 before the next checkpoint
    metrics.write_text(metrics.read_text() + json.dumps(ghost) + "\n")
    train(tiny_config(tiny_shards, tmp_path / "run", max_steps=6, log_every=1, resume="auto"))
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("env", [{"RANK": "x", "WORLD_SIZE": "2"}, {"WORLD_SIZE": "2"}])
def test_a_half_or_garbled_torchrun_environment_is_named(tiny_shards, monkeypatch, env):
    monkeypatch.delenv("RANK", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=r"\$RANK=.* and \$WORLD_SIZE='2': torchrun sets both"):
        build_loader(tiny_shards, "val", train=False, batch_size=4, backend="dali-cpu")


def test_train_and_val_with_shifted_class_lists_are_refused(tiny_imagenet, tmp_path, capsys):
    """Same number of classes, other WNIDs: every val label would be scored against another class."""
    import shutil

    from shards.convert import convert

    src = tmp_path / "src"
    shutil.copytree(tiny_imagenet, src)
    (src / "train" / "n00000005").rename(src / "train" / "zz_renamed")
    data = tmp_path / "data"
    convert(src / "val", data, split="val", samples_per_shard=10, workers=1, progress=False)  # val first
    convert(src / "train", data, split="train", samples_per_shard=10, workers=1, progress=False)
    argv = ["train", "--data", str(data), "--backend", "dali-cpu", "--precision", "fp32", "--arch", "resnet18",
            "--image-size", "32", "--batch-size", "8", "--num-threads", "1", "--run-dir", str(tmp_path / "run")]
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert "class 4 is zz_renamed in train but n00000005 in val" in err and not (tmp_path / "run").exists()


# --- issue 19: an evaluation that fails costs no epoch; a crash before the first checkpoint logs nothing twice ----
def synthetic_run(run_dir: Path, **overrides):
    from training.config import build_config

    return build_config(overrides={**dict(
        backend="synthetic", arch="resnet18", image_size=32, precision="fp32", batch_size=4, synthetic_samples=16,
        synthetic_val_samples=8, num_classes=3, epochs=2, log_every=1, throughput_warmup_steps=0,
        checkpoint_minutes=0, progress=False, run_dir=str(run_dir)), **overrides})


def test_an_epoch_is_checkpointed_before_its_evaluation(tmp_path, monkeypatch):
    """The evaluation at an epoch's end fails (its store went away): the epoch's steps are already in a
    checkpoint that says the evaluation is owed, and the resumed run evaluates first, then goes on."""
    import training.trainer as trainer_module
    from training.train import train

    real = trainer_module.evaluate_models

    def store_gone(*args, **kwargs):
        raise OSError("s3://bucket/val-000000.tar: reading stopped at byte 0 after 4 attempts")

    monkeypatch.setattr(trainer_module, "evaluate_models", store_gone)
    with pytest.raises(OSError, match="reading stopped"):
        train(synthetic_run(tmp_path / "run"))
    saved = checkpoint.load(checkpoint.list_checkpoints(tmp_path / "run")[-1])
    assert (saved["step"], saved["epoch"], saved["step_in_epoch"], saved["pending_eval"]) == (4, 1, 0, 1)
    monkeypatch.setattr(trainer_module, "evaluate_models", real)
    summary = train(synthetic_run(tmp_path / "run", resume="auto"))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in records if r["kind"] == "eval"] == [("eval", 4), ("eval", 8)]
    assert summary["steps"] == 8 and checkpoint.load(checkpoint.list_checkpoints(tmp_path / "run")[-1])[
        "pending_eval"] is None


def test_a_kill_between_an_eval_record_and_its_checkpoint_leaves_the_eval_logged_once(tmp_path, monkeypatch):
    """The epoch's checkpoint says its evaluation is owed; the evaluation ran and was logged, and the process
    died before the next checkpoint marked it done: the resumed run evaluates again, and the log holds that
    evaluation once (the re-run drill of a SIGKILL just after "val step 15" found it twice)."""
    import training.trainer as trainer_module
    from training.train import train

    class Killed(BaseException):
        pass

    def killed_after_the_record(*args):
        raise Killed

    monkeypatch.setattr(trainer_module, "eval_line", killed_after_the_record)
    with pytest.raises(Killed):
        train(synthetic_run(tmp_path / "run"))
    monkeypatch.undo()
    metrics = tmp_path / "run" / "metrics.jsonl"
    assert [json.loads(line)["kind"] for line in metrics.read_text().splitlines()][-1] == "eval"
    train(synthetic_run(tmp_path / "run", resume="auto"))
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in records if r["kind"] == "eval"] == [("eval", 4), ("eval", 8)]


def test_a_crash_before_the_first_checkpoint_leaves_no_records_twice(tmp_path):
    """A run killed after some log lines but before its first checkpoint: the rerun with --resume auto starts
    from step 0 and its metrics.jsonl holds each step once (the old records used to stay, and curves.png
    plotted both)."""
    from training.train import train

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    left = [{"kind": "train", "epoch": 0, "step": s, "loss": 9.0} for s in (1, 2, 3)] + [
        {"kind": "eval", "epoch": 1, "step": 3, "top1": 1.0}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in left))
    train(synthetic_run(run_dir, resume="auto", epochs=1))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if r["kind"] == "train"]
    assert steps == [1, 2, 3, 4] and 9.0 not in [r.get("loss") for r in records]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [4]


def test_a_stop_during_a_stalled_evaluation_ends_at_once_with_the_epoch_saved(tmp_path, monkeypatch):
    """The issue's drill: the val store stops answering, then SIGTERM. The evaluation (here one that waits for a
    store that never answers) is abandoned at once; the epoch's checkpoint, written before it, says it is owed."""
    import signal
    import time

    import training.trainer as trainer_module
    from training.preempt import Preempted
    from training.train import train

    def stalled(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # the scheduler's signal arrives while the evaluation waits
        time.sleep(120)  # a read that would only end at the store's time bound
        raise AssertionError("the wait was not interrupted")

    monkeypatch.setattr(trainer_module, "evaluate_models", stalled)
    started = time.monotonic()
    with pytest.raises(Preempted) as stopped:
        train(synthetic_run(tmp_path / "run"))
    assert time.monotonic() - started < 60 and stopped.value.exit_status == 143
    assert stopped.value.checkpoint and stopped.value.step == 4
    saved = checkpoint.load(checkpoint.list_checkpoints(tmp_path / "run")[-1])
    assert (saved["step"], saved["pending_eval"]) == (4, 1)


def test_a_stop_during_a_healthy_wait_mid_group_still_checkpoints(tmp_path, monkeypatch):
    """One process with --grad-accum-steps 4: SIGTERM lands while the loop waits (milliseconds) for the 2nd
    micro-batch of a step. The wait ends well within the grace, the step is finished and checkpointed; it used to
    be taken for a stall and the run ended without a checkpoint."""
    import signal
    import time

    import training.trainer as trainer_module
    from training.preempt import Preempted
    from training.train import train

    real, fetched = trainer_module.make_loader, [0]

    class SignalOnTheSixth:
        def __init__(self, loader):
            self.loader = loader

        def __getattr__(self, name):
            return getattr(self.loader, name)

        def __iter__(self):
            for batch in self.loader:
                fetched[0] += 1
                if fetched[0] == 6:  # the 2nd micro-batch of step 2
                    os.kill(os.getpid(), signal.SIGTERM)
                    time.sleep(0.05)  # still waiting for the batch when the signal is handled
                yield batch

    monkeypatch.setattr(trainer_module, "make_loader", lambda *a, **k: SignalOnTheSixth(real(*a, **k)))
    with pytest.raises(Preempted) as stopped:
        train(synthetic_run(tmp_path / "run", synthetic_samples=64, grad_accum_steps=4, epochs=1))
    assert stopped.value.checkpoint and stopped.value.step == 2
    saved = checkpoint.load(checkpoint.list_checkpoints(tmp_path / "run")[-1])
    assert (saved["step"], saved["loader_states"][0]["batch_in_epoch"]) == (2, 8)


def test_a_script_that_leaves_pytorch_passes_open_exits_with_their_workers(tiny_shards):
    """A pass left open at the end of a script, and one whose loader sat in a reference cycle that the garbage
    collector ended: the workers ignore SIGTERM (left to the trainer), and torch falls back to SIGTERM in both
    cases, so the exit waited for minutes for workers that no one would stop."""
    script = """if True:
        import gc, sys
        from pipeline import build_loader

        def open_pass():
            ldr = build_loader(sys.argv[1], 'train', train=True, batch_size=4, image_size=32, backend='pytorch',
                               num_threads=2)
            next(iter(ldr))
            return ldr

        def in_a_cycle():
            ldr = open_pass()
            try:
                raise ValueError
            except ValueError as err:
                return err  # its traceback holds this frame, which holds ldr and err

        in_a_cycle()
        gc.collect()
        kept = open_pass()
        print('left', flush=True)
    """
    done = run([sys.executable, "-c", script, str(tiny_shards)], timeout=60)
    assert (done.returncode, done.stdout) == (0, "left\n"), done.stderr


def test_a_second_run_into_a_busy_run_dir_is_refused_until_the_first_is_killed(tiny_shards, tmp_path, capsys):
    """Two trainers in one RUN_DIR would interleave their checkpoints and logs: the second stops with one line
    naming the first's host and pid. Once the first is killed -9 its claim is gone with it."""
    argv = ["train", "--data", str(tiny_shards), "--backend", "pytorch", "--num-threads", "2", "--arch",
            "resnet18", "--image-size", "32", "--precision", "fp32", "--batch-size", "4", "--log-every", "1",
            "--checkpoint-minutes", "0", "--no-progress", "--run-dir", str(tmp_path / "run")]
    first = subprocess.Popen([sys.executable, "-m", "tools.cli", *argv, "--epochs", "1000"], cwd=ROOT,
                             env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "run" / "metrics.jsonl").exists():  # its loader's workers are running
            assert first.poll() is None and time.monotonic() < deadline, "the first run did not start"
            time.sleep(0.2)
        assert cli([*argv, "--epochs", "1", "--resume", "auto"]) == 2
        err = capsys.readouterr().err
        assert f"is in use by another training run: host {socket.gethostname()}, pid {first.pid}, since" in err
        assert "pick another --run-dir" in err
    finally:
        first.kill()
        first.wait()
    assert cli([*argv, "--epochs", "1", "--resume", "auto", "--max-steps", "1"]) == 0
