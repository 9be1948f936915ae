"""Facts about this process that every layer needs, read in one place: where it sits in the job (rank, world size,
local rank, processes per node), how many CPU cores it may really use, and how it writes a file so that no
reader ever sees it half written; how it ends with the job (the kernel signals it when its parent dies); and
whether it was asked to stop (`request_stop`), which long waits such as the object store's retries honour.

Place in the job: torchrun (and Slurm through it) sets RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE; without
them this is one process alone. An initialised torch.distributed process group, when there is one, is the
authority (`job_place`), and values that are set but garbled are refused with the variable's name. The process
group itself (starting it, collectives) is training/dist.py's job.

CPU cores: `os.cpu_count()` is the machine's total, which is wrong in a container, under Slurm, or with `taskset`:
the affinity mask, a cgroup CPU quota (Docker `--cpus`, Kubernetes CPU limits) and Slurm's `SLURM_CPUS_PER_TASK`
each lower it, and oversubscribing cores makes loaders and OpenMP threads spin against each other.

Atomic writes: a reader, a resumed run or a second job sees either the old file or the whole new one, never a torn
file under the final name. Temporaries live beside the target (same file system, so `os.replace` is atomic) and
are named `.<name>.tmp-<host>-<pid>-<random>`: unique per process (J jobs may write the same manifest at once),
and a later run can tell a temporary whose writer was killed (`remove_stale_temporaries`) from one still being
written: the writer's identity is this module's other subject. Files are created with the permissions the
process's umask gives (like `open()` and the shard tars), not `mkstemp`'s 0600, so a dataset converted on shared
storage stays readable by the people it is shared with.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import math
import os
import secrets
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO


# --- place in the job ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class JobPlace:
    """Where this process sits in a (torchrun) job; (0, 1, 0, 1) for a process alone."""

    rank: int  # global rank
    world_size: int  # processes in the job
    local_rank: int  # rank on this node = the GPU index it drives
    local_world_size: int  # processes on this node, sharing its cores and GPUs

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes shared files and prints."""
        return self.rank == 0


_TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


def under_torchrun() -> bool:
    """Whether torchrun (or a launcher imitating it) started this process: its place variables are set."""
    return "RANK" in os.environ or "WORLD_SIZE" in os.environ


def environment_place() -> JobPlace:
    """The place torchrun's variables give (a process alone without them). A variable that is set but not a
    non-negative integer, only one of RANK/WORLD_SIZE, or a rank outside the world is a ValueError naming them:
    under torchrun a process that silently took itself for rank 0 of 1 would read the whole data set."""
    env = {name: os.environ.get(name) for name in _TORCHRUN_VARIABLES}
    if env["RANK"] is None and env["WORLD_SIZE"] is None:
        rank, world_size = 0, 1
    else:
        if not all((env[n] or "").isdigit() for n in ("RANK", "WORLD_SIZE")):
            raise ValueError(f"$RANK={env['RANK']!r} and $WORLD_SIZE={env['WORLD_SIZE']!r}: torchrun sets both to "
                             "integers; unset them, or set both")
        rank, world_size = int(env["RANK"]), int(env["WORLD_SIZE"])
        if world_size < 1 or rank >= world_size:
            raise ValueError(f"$RANK={rank} is not a rank of $WORLD_SIZE={world_size}")
    local = {}
    for name, default in (("LOCAL_RANK", 0), ("LOCAL_WORLD_SIZE", 1)):
        value = env[name]
        if value is not None and not value.isdigit():
            raise ValueError(f"${name}={value!r}: torchrun sets it to an integer; unset it")
        local[name] = int(value) if value is not None else default
    return JobPlace(rank, world_size, local["LOCAL_RANK"], max(1, local["LOCAL_WORLD_SIZE"]))


def job_place() -> tuple[JobPlace, str | None]:
    """(this process's place, where it was read: "the initialised process group", "$RANK/$WORLD_SIZE", or None
    for a process alone). The process group wins over the environment (a caller may have started one itself)."""
    place = environment_place()
    try:
        import torch.distributed as tdist

        grouped = tdist.is_available() and tdist.is_initialized()
    except ImportError:  # the converter's machines need no torch
        grouped = False
    if grouped:
        rank, world_size = tdist.get_rank(), tdist.get_world_size()
        local_world = place.local_world_size if place.world_size == world_size else 1
        return JobPlace(rank, world_size, place.local_rank, local_world), "the initialised process group"
    return place, "$RANK/$WORLD_SIZE" if under_torchrun() else None


def processes_per_node() -> int:
    """Training processes sharing this node's cores and GPUs: torchrun's $LOCAL_WORLD_SIZE, else 1."""
    return environment_place().local_world_size


# --- ending with the job -------------------------------------------------------------------------------------
#: This process's parent when this module was first imported (early in a rank's start): `end_with_parent` compares
#: it with the parent at the time of the request, to catch a parent that died in between.
STARTED_BY = os.getppid()


def end_with_parent(signum: int, *, parent: int | None = None) -> bool:
    """Ask the kernel to send this process `signum` when its parent dies (Linux PR_SET_PDEATHSIG), so a child is
    never left running as an orphan: the converter's pool workers (SIGKILL: their shards would be recorded by
    nobody) and the ranks torchrun starts (SIGTERM: a stop signal that kills torchrun, SIGUSR1 or a plain
    `kill`, still ends in the ranks' checkpoint; torchrun starts each rank in its own session, so a signal to
    torchrun's process group never reaches them). `parent`: the pid the caller was started by; when it is gone
    already (it died before the request took effect) the signal comes now. False where the request is not
    available (not Linux); the caller then ends some other way."""
    import ctypes

    try:
        if ctypes.CDLL(None, use_errno=True).prctl(1, int(signum)) != 0:  # 1 = PR_SET_PDEATHSIG
            return False
    except (OSError, AttributeError):
        return False
    if parent is not None and os.getppid() != parent:
        os.kill(os.getpid(), signum)
    return True


# --- stop requests: long waits give up when the process was asked to stop -------------------------------------
class StopRequested(BaseException):
    """Raised by a wait that honours stop requests (`check_stop`, `pause`, a blocking wait inside
    `stop_interrupts`) once `request_stop` was called: the caller (the trainer, on SIGTERM) checkpoints and exits
    instead of waiting out the object store's time bound. A BaseException, like KeyboardInterrupt: it is no
    error of the data, so the `except Exception` of readers and error handlers must not turn it into one."""


_STOP = threading.Event()
_STOP_REASON = [""]
_INTERRUPTING = [0]  # depth of stop_interrupts() blocks open in the main thread


def request_stop(reason: str) -> None:
    """Ask this process to stop waiting (safe in a signal handler: it sets a flag). From then on `check_stop` and
    `pause` raise StopRequested(reason) (the object store checks before each retry and during its waits);
    called in the main thread inside `stop_interrupts()`, it raises at once, which ends the blocking wait the
    signal interrupted (a socket read, a queue get)."""
    _STOP_REASON[0] = reason
    _STOP.set()
    if _INTERRUPTING[0] and threading.current_thread() is threading.main_thread():
        raise StopRequested(reason)


def stop_requested() -> bool:
    return _STOP.is_set()


def clear_stop() -> None:
    """Forget a stop request (a new run in the same process, tests)."""
    _STOP.clear()


def check_stop(what: object) -> None:
    """StopRequested naming `what` (the URL being read) when a stop was requested."""
    if _STOP.is_set():
        raise StopRequested(f"{what}: abandoned, {_STOP_REASON[0]}")


def pause(seconds: float, what: object) -> None:
    """Sleep `seconds` (a retry's backoff), ending early with StopRequested when a stop is requested."""
    if _STOP.wait(seconds):
        check_stop(what)


@contextlib.contextmanager
def stop_interrupts() -> Iterator[None]:
    """Within this block (main thread) `request_stop` from a signal handler raises StopRequested where the
    block is waiting; a stop requested before raises on entry. Put only a wait in it (`next(loader)`), and drop
    what it was waiting on afterwards: like KeyboardInterrupt, the exception can land anywhere in that code."""
    check_stop("waiting for data")
    main = threading.current_thread() is threading.main_thread()
    _INTERRUPTING[0] += main
    try:
        yield
    finally:
        _INTERRUPTING[0] -= main


# --- CPU cores -----------------------------------------------------------------------------------------------
def _affinity() -> int:
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def _cgroup_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs allowed by a cgroup v2 `cpu.max` or v1 `cpu.cfs_quota_us` quota; None when unlimited or unknown."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota_us / period_us if quota_us > 0 and period_us > 0 else None
    except (OSError, ValueError):
        return None


def usable_cpus() -> int:
    """Cores this process may use (>= 1): the affinity mask, capped by a cgroup quota (rounded up: 1.5 CPUs
    of quota still lets two threads make progress) and by $SLURM_CPUS_PER_TASK."""
    count = _affinity()
    quota = _cgroup_quota()
    if quota is not None:
        count = min(count, max(1, math.ceil(quota)))
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if slurm.isdigit() and int(slurm) > 0:
        count = min(count, int(slurm))
    return count


#: Worker processes `convert` and `verify` accept at most; more is a typo (and each one is forked at once).
MAX_WORKERS = 4096


def check_workers(workers: int | None) -> None:
    """A ValueError naming --workers unless it is None (the usable cores) or in 1..MAX_WORKERS."""
    if workers is not None and not 1 <= workers <= MAX_WORKERS:
        raise ValueError(f"--workers {workers} must be in 1..{MAX_WORKERS} (or leave it out: the usable CPU cores)")


def cpu_model() -> str | None:
    """The CPU's model name (/proc/cpuinfo), for telling machines apart in profiles and tune results."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


# --- atomic writes ------------------------------------------------------------------------------------------
TMP_MARK = ".tmp-"
#: A temporary from another host, or one whose writer cannot be checked, counts as stale after this long.
FOREIGN_STALE_AFTER = 24 * 3600.0  # seconds


def host_tag() -> str:
    """This host's name as temporaries carry it (no '-' or '.': the name parses as <host>-<pid>-<random>)."""
    return socket.gethostname().replace("-", "_").replace(".", "_") or "host"


def temporary_path(path: str | os.PathLike) -> Path:
    """`.<name>.tmp-<host>-<pid>-<random>` beside `path`."""
    path = Path(path)
    return path.with_name(f".{path.name}{TMP_MARK}{host_tag()}-{os.getpid()}-{secrets.token_hex(4)}")


class FolderBusy(RuntimeError):
    """Another live process holds the folder (claim_folder); the message names its host, pid and start."""


@contextlib.contextmanager
def claim_folder(folder: str | os.PathLike, *, what: str) -> Iterator[None]:
    """Hold `folder` for this process while the block runs: a POSIX record lock (lockf) on `FOLDER/.claim`,
    which also says who holds it (host, pid, start) for the message a second process gets (FolderBusy, at once,
    no waiting). The kernel drops the lock when its holder dies, even by kill -9, so a claim is never left behind;
    unlike flock, a record lock is not shared with children forked while it is held (DataLoader workers, which
    would keep a killed holder's claim until they notice). Network file systems lock through their lock
    manager; where there is none (ENOLCK, EOPNOTSUPP) the folder is not claimed, with no error: the claim guards
    against an operator's mistake, it must not stop a run where locks are unavailable."""
    path = Path(folder) / ".claim"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~current_umask())
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno in (errno.EAGAIN, errno.EACCES):
                holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "one that has not said who"
                raise FolderBusy(f"{folder} is in use by another {what}: {holder}") from None
            if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
        else:
            os.ftruncate(fd, 0)
            started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
            os.pwrite(fd, f"host {socket.gethostname()}, pid {os.getpid()}, since {started}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def current_umask() -> int:
    """The process umask, read without changing it (/proc on Linux; the set-and-restore fallback elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", *, fsync: bool = False) -> Iterator[IO]:
    """Open a temporary beside `path` for writing; on a clean exit it replaces `path`, on an error it is removed.

    `fsync=True` flushes the data to disk before the rename (checkpoints: a power loss must not leave a
    renamed but empty file). Permissions follow the umask (0666 & ~umask), as for a file made by `open()`.
    """
    if "w" not in mode:
        raise ValueError(f"atomic_open writes whole files; mode {mode!r} has no 'w'")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 & ~current_umask())
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike, data: str | bytes, *, fsync: bool = False) -> Path:
    """Write all of `data` (text is UTF-8) to `path` atomically; returns `path`."""
    with atomic_open(path, "wb" if isinstance(data, bytes) else "w", fsync=fsync) as f:
        f.write(data)
    return Path(path)


def _writer_alive(name: str) -> bool | None:
    """Whether the process that owns temporary `name` still runs: None when it ran on another host."""
    tail = name.rsplit(TMP_MARK, 1)[1]
    parts = tail.split("-")
    if len(parts) != 3 or not parts[1].isdigit():
        return None
    host, pid = parts[0], int(parts[1])
    if host != host_tag():
        return None
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def writer_gone(name: str, *, age: Callable[[], float], foreign_after: float) -> bool:
    """The one staleness rule for anything named with its writer's host and pid (`<...>.tmp-<host>-<pid>-<random>`:
    temporaries, private folders, the converter's claims): its writer is gone when it ran on this host and its
    process no longer exists, or when it ran on another host (which cannot be asked) and `age()`, the seconds
    since it last showed life, exceeds `foreign_after`."""
    alive = _writer_alive(name)
    return alive is False or (alive is None and age() > foreign_after)


def is_stale(entry: Path, *, foreign_after: float = FOREIGN_STALE_AFTER, now: float | None = None) -> bool:
    """Whether the temporary `entry` was left by a writer that no longer runs (`writer_gone`, its age read from
    the file's modification time). FileNotFoundError when it went meanwhile."""
    return writer_gone(entry.name, age=lambda: (time.time() if now is None else now) - entry.stat().st_mtime,
                       foreign_after=foreign_after)


def remove_stale_temporaries(directory: str | os.PathLike, *, foreign_after: float = FOREIGN_STALE_AFTER) -> list[Path]:
    """Remove temporaries left in `directory` by writers that were killed (kill -9, OOM, a node failure);
    returns what was removed. A temporary from another host is removed once it is `foreign_after` seconds old
    (its writer cannot be asked; a folder with a single writer, a run's checkpoints, can use a short time)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    now = time.time()
    for entry in directory.iterdir():
        if not entry.name.startswith(".") or TMP_MARK not in entry.name or not entry.is_file():
            continue
        try:
            if is_stale(entry, foreign_after=foreign_after, now=now):
                entry.unlink()
                removed.append(entry)
        except FileNotFoundError:  # its writer finished (or another cleaner was faster)
            continue
    return removed


def remove_stale_folders(parent: str | os.PathLike, name: str, *,
                         foreign_after: float = FOREIGN_STALE_AFTER) -> list[Path]:
    """Remove the private folders `<name>.tmp-<host>-<pid>-<random>` in `parent` whose writer no longer runs
    (the temporaries' rule, `is_stale`); returns what went."""
    removed = []
    for entry in Path(parent).glob(f"{name}{TMP_MARK}*"):
        try:
            if entry.is_dir() and is_stale(entry, foreign_after=foreign_after):
                shutil.rmtree(entry)
                removed.append(entry)
        except FileNotFoundError:  # another process removed it first
            continue
    return removed


def temporary_folder(parent: str | os.PathLike, name: str) -> Path:
    """A new private folder `<name>.tmp-<host>-<pid>-<random>` in `parent` (created), after removing the ones
    writers that were killed left there: a process killed with kill -9 leaves nothing for good."""
    Path(parent).mkdir(parents=True, exist_ok=True)
    remove_stale_folders(parent, name)
    # mkdtemp's random tail has no '-', so the name parses as <host>-<pid>-<random>
    return Path(tempfile.mkdtemp(prefix=f"{name}{TMP_MARK}{host_tag()}-{os.getpid()}-", dir=parent))
