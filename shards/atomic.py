"""Atomic file writes, the one implementation the converter (plans, shard records, manifests), the trainer
(config, summaries, checkpoints) and the profiler use.

A reader, a resumed run or a second job sees either the old file or the whole new one, never a torn file under
the final name. Temporaries live beside the target (same file system, so `os.replace` is atomic) and are named
`.<name>.tmp-<host>-<pid>-<random>`: unique per process (J jobs may write the same manifest at once), and a
later run can tell a temporary whose writer was killed (`remove_stale_temporaries`) from one still being written.

Files are created with the permissions the process's umask gives (like `open()` and the shard tars), not
`mkstemp`'s 0600, so a dataset converted on shared storage stays readable by the people it is shared with.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

TMP_MARK = ".tmp-"
#: A temporary from another host, or one whose writer cannot be checked, counts as stale after this long.
FOREIGN_STALE_AFTER = 24 * 3600.0  # seconds


def _host() -> str:
    return socket.gethostname().replace("-", "_").replace(".", "_") or "host"


def temporary_path(path: str | os.PathLike) -> Path:
    """`.<name>.tmp-<host>-<pid>-<random>` beside `path`."""
    path = Path(path)
    return path.with_name(f".{path.name}{TMP_MARK}{_host()}-{os.getpid()}-{secrets.token_hex(4)}")


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
    if host != _host():
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


def is_stale(entry: Path, *, foreign_after: float = FOREIGN_STALE_AFTER, now: float | None = None) -> bool:
    """Whether the temporary `entry` (named with its writer's host and pid) was left by a writer that no longer
    runs: one of this host whose process is gone, or one of another host (which cannot be asked) once it is
    `foreign_after` seconds old. FileNotFoundError when it went meanwhile."""
    alive = _writer_alive(entry.name)
    return alive is False or (alive is None and (time.time() if now is None else now) - entry.stat().st_mtime
                              > foreign_after)


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
