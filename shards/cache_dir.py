"""The folders of a --cache-dir DIR (shards.cache): where a store's shards are kept, and which folders are caches,
so that the cache never reads, evicts or re-fetches over files that are not its own.

A cache folder DIR/<bucket>/<prefix>/ holds the marker `.saturate-cache`, a line of JSON saying which store
location it mirrors and who made it (host, pid, time, and whether an older cache was adopted), for a person
looking. The cache works only in marked folders, and `--cache-limit` counts the bytes of all the marked folders
under DIR together (shards.cache). Claiming its folder at start:

    missing, or holding no file              made and marked
    marked                                   used as it is
    `.verified/`, no marker                  a cache from before the marker: adopted (marked)
    files, none of the above                 refused and left exactly as it is (CacheError naming it and the flag)

Adoption: every earlier version of the cache made both bookkeeping folders when it opened its folder, and a copy
of a data set (a converter's output, a sync of the bucket) has neither, so they identify a cache's own folder;
its shard files are checked as always (a shard without a valid stamp is hashed before it is trusted). Folders
inside a cache folder are never read or changed by it (another data set's cache folder may sit there:
s3://b/ds/sub inside s3://b/ds's), so a folder holding only folders is not refused.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
from pathlib import Path

from shards.process import TMP_MARK, atomic_write, current_umask, remove_stale_temporaries

LOCKS, STAMPS = ".locks", ".verified"  # a cache folder's flock(2) files and verification stamps (shards.cache)
MARKER = ".saturate-cache"  # the file that makes a folder a cache folder
SHOWN = 3  # names of foreign files a refusal quotes


class CacheError(OSError):
    """The cache folder cannot be used (a full disk, permissions, files that are not the cache's), or a
    downloaded shard is not the one the manifest describes; the message names the folder or the shard and what
    to do."""


def cache_folder(cache_dir: str | os.PathLike, remote: object) -> Path:
    """Where `remote`'s shards are kept under `cache_dir`: DIR/<bucket>/<prefix> for s3://bucket/prefix."""
    _, _, rest = str(remote).partition("://")
    parts = [part for part in rest.split("/") if part]
    if not parts or any(part in (".", "..") for part in parts):
        raise ValueError(f"{remote}: cannot be cached under {cache_dir} (no bucket, or '.' or '..' in its prefix)")
    return Path(cache_dir, *parts)


def claim_folder(folder: Path, *, cache_dir: str | os.PathLike, mirrors: str) -> None:
    """Make `folder` a marked cache folder of store location `mirrors` (see the module docstring); CacheError,
    with nothing changed, when it holds files that are not a cache's. OSError when the disk refuses."""
    marker = folder / MARKER
    if marker.is_file():
        return
    folder.mkdir(parents=True, exist_ok=True)
    with os.scandir(folder) as entries:
        folders = {entry.name: entry.is_dir(follow_symlinks=False) for entry in entries}
    # a cache from before the marker always has its stamps folder; `.locks/` alone is no proof: DIR's own
    # `.locks/space` put one into a shard folder that was given as --cache-dir by mistake
    adopted = folders.get(STAMPS, False)
    foreign = sorted(name for name, is_folder in folders.items() if not is_folder and name != MARKER
                     and not name.startswith(f".{MARKER}{TMP_MARK}"))  # another process marking it now
    if foreign and not adopted:
        shown = ", ".join(foreign[:SHOWN]) + (f" and {len(foreign) - SHOWN:,} more" if len(foreign) > SHOWN else "")
        raise CacheError(f"--cache-dir {cache_dir}: {folder}, where the cache would keep the shards of {mirrors}, "
                         f"holds files that are not a shard cache's ({shown}) and no {MARKER} marker; the cache "
                         "removes files it cannot trust, so it leaves this folder as it is: give --cache-dir a "
                         "folder of its own")
    record = {"mirrors": mirrors, "host": socket.gethostname(), "pid": os.getpid(),
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "adopted": adopted}
    atomic_write(marker, json.dumps(record) + "\n", fsync=True)


def open_folder(folder: Path, *, cache_dir: str | os.PathLike, mirrors: str) -> None:
    """Claim `folder` (claim_folder), make its lock and stamp folders and DIR's lock folder, check that a lock
    file can be made (a read-only disk fails here, at start, not in a reader), and remove what killed processes
    left (downloads, stamps). CacheError naming the folder and --cache-dir when it cannot be used."""
    try:
        top = Path(cache_dir)
        files = sorted(e.name for e in os.scandir(top) if e.is_file() and not e.name.startswith(".")) \
            if top.is_dir() else []
        if files:  # DIR holds data sets' folders and its lock folder; files there mean it is someone's folder
            raise CacheError(f"--cache-dir {cache_dir} holds files ({', '.join(files[:SHOWN])}"
                             f"{' ...' if len(files) > SHOWN else ''}), so it is not a cache folder: the cache would "
                             "add its folders there; give --cache-dir a folder of its own")
        claim_folder(folder, cache_dir=cache_dir, mirrors=mirrors)  # before anything is changed
        for sub in (folder / LOCKS, folder / STAMPS, Path(cache_dir) / LOCKS):
            sub.mkdir(exist_ok=True)
        os.close(os.open(Path(cache_dir, LOCKS, "space"), os.O_RDWR | os.O_CREAT, 0o666 & ~current_umask()))
        for sub in (folder, folder / STAMPS):
            remove_stale_temporaries(sub)
    except CacheError:
        raise
    except OSError as err:
        raise disk_error(folder, err, "opening the cache folder") from None


def disk_error(folder: Path, err: OSError, doing: str) -> CacheError:
    """`err` from the disk of cache folder `folder` while `doing`, as one line saying what to do."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "no space left: free space on that disk, or set --cache-limit below its free space"
    elif err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        fix = (f"{err.strerror} ({errno.errorcode[err.errno]}): the cache needs a folder it can write on a local "
               "disk, it keeps lock files next to the shards (a cache staged on a read-only mount: copy it to a "
               "local disk, or give --cache-dir a writable folder)")
    else:
        fix = f"{err.strerror or err} ({errno.errorcode.get(err.errno or 0, 'error')})"
    error = CacheError(f"--cache-dir {folder}: {doing} failed: {fix}")
    error.errno = err.errno
    return error


def cache_folders(cache_dir: str | os.PathLike) -> list[Path]:
    """Every cache folder under `cache_dir` (the marked ones: each data set cached there), looked for afresh at
    each call (a job on another data set may start at any time); lock and stamp folders are not searched. Every
    download under a limit walks DIR once: give the cache a DIR of its own, not a big tree of other files."""
    found = []
    for top, folders, files in os.walk(cache_dir):
        if MARKER in files:
            found.append(Path(top))
        folders[:] = sorted(name for name in folders if name not in (LOCKS, STAMPS))
    return found


__all__ = ["LOCKS", "MARKER", "STAMPS", "CacheError", "cache_folder", "cache_folders", "claim_folder", "disk_error",
           "open_folder"]
