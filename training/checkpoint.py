"""Checkpoints: written atomically, readable with `torch.load(weights_only=True)`, last-N kept plus best.

A checkpoint holds model, optimizer, scheduler and scaler state, epoch and step, the RNG states, every rank's
loader position and the config, all as tensors or plain Python types, so loading one runs no pickled code.
Files: RUN_DIR/checkpoints/step-00012345.pt (rotated, newest `keep_last` kept) and best.pt.
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path

import numpy as np
import torch

from shards.process import atomic_open, temporary_path

CHECKPOINT_DIR = "checkpoints"
BEST_NAME = "best.pt"
_STEP_NAME = re.compile(r"^step-(\d+)\.pt$")


def step_name(step: int) -> str:
    return f"step-{step:08d}.pt"


def rng_state() -> dict:
    """Python, NumPy, torch CPU and this process's CUDA generator states as tensors/plain types.

    Only the current device's CUDA state: a rank drives one GPU, and saving every visible GPU's state made a
    resume with fewer visible GPUs (same world size, e.g. CUDA_VISIBLE_DEVICES set per rank) fail."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if isinstance(cuda, list):  # checkpoints written before one state per rank: every visible GPU's
        cuda = cuda[torch.cuda.current_device()] if torch.cuda.is_available() and cuda else None
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda)


def atomic_save(obj: object, path: str | os.PathLike) -> Path:
    """torch.save through shards.process with fsync: a reader (or a resume after a crash) sees the old file or
    the complete new one, never a partial file under the final name."""
    with atomic_open(path, "wb", fsync=True) as f:
        torch.save(obj, f)
    return Path(path)


def save(state: dict, run_dir: str | os.PathLike, *, step: int, keep_last: int, is_best: bool) -> Path:
    """Write `state` as step-<step>.pt, refresh best.pt if `is_best`, and drop step files beyond `keep_last`."""
    directory = Path(run_dir) / CHECKPOINT_DIR
    path = atomic_save(state, directory / step_name(step))
    if is_best:
        # A hard link costs no second write; replacing through a temporary name keeps best.pt atomic too.
        tmp = temporary_path(directory / BEST_NAME)
        try:
            os.link(path, tmp)
            os.replace(tmp, directory / BEST_NAME)
        except OSError:  # file systems without hard links
            tmp.unlink(missing_ok=True)
            atomic_save(state, directory / BEST_NAME)
    for old in list_checkpoints(run_dir)[:-keep_last]:
        old.unlink(missing_ok=True)
    return path


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """step-*.pt files of a run, oldest first."""
    directory = Path(run_dir) / CHECKPOINT_DIR
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _STEP_NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def resolve(resume: str | None, run_dir: str | os.PathLike) -> Path | None:
    """`--resume auto` -> the newest checkpoint of `run_dir` (None: start fresh); a path -> that path."""
    if resume is None:
        return None
    if resume == "auto":
        found = list_checkpoints(run_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not path.is_file():
        raise FileNotFoundError(f"--resume: checkpoint {path} does not exist")
    return path


def load(path: str | os.PathLike) -> dict:
    """Read a checkpoint on the CPU without executing pickled code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # many unpickling error types; the person needs the file name
        raise ValueError(f"--resume: cannot read checkpoint {path} ({err})") from err
