"""Who is writing a split: a running converter claims `OUT/<split>` in OUT itself, so a second converter of the
same split stops at once with "another converter (host, pid) is writing OUT/train" instead of racing the first
over the same `.partial` files (the loser died with `[Errno 2] No such file or directory: '...tar.partial'`).

    with claim_split(store, split, plan_digest=..., num_jobs=J, job_index=I):   SplitBusy while a claim conflicts
        publish_plan(...); write_shards(...); write_manifest(...)

A claim is `.parts/.<split>.claim.tmp-<host>-<pid>-<random>` (shards.schema.claim_name, tagged with its writer as
shards.process tags temporaries) holding its writer's host, pid, plan digest, `--num-jobs`, `--job-index` and
when it last refreshed it. The jobs of one conversion (same plan and `--num-jobs`, distinct `--job-index`) write
disjoint shards and run side by side, as a Slurm array does; any other pair conflicts: the same job twice (both
would write the same files), or another plan (it replaces the shards and removes the manifest the first is
building).

Live or stale: the converter rewrites its claim every CLAIM_REFRESH seconds and removes it when it ends, however
it ends short of a kill. A claim left behind is stale by shards.process's rule (`writer_gone`): at once when its
writer ran on this host and its pid is gone; after CLAIM_STALE_AFTER seconds without a refresh when it ran on
another host, which cannot be asked (a node lost, a `kill -9` there). A stale claim is removed by the next
converter.

The same code runs on a folder and on `s3://`, with no compare-and-swap (which not every S3 store offers): each
converter writes its own claim first and lists the others after (S3 lists what was written before it, strongly
consistent since 2020), so of two converters starting together at least one sees the other. One that sees an
older conflicting claim stops at once; one that sees a younger one waits up to CLAIM_SETTLE seconds for it to
go (its converter saw this claim and stopped) and stops too if it stays (its converter never saw this claim and
runs). So one goes on, and never two. Between hosts (a shared file system, S3) a killed converter's claim is
told from a live one by its refresh time and the hosts' clocks (NTP keeps them far closer than
CLAIM_STALE_AFTER).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import PurePosixPath

from shards.process import TMP_MARK, temporary_path, writer_gone
from shards.schema import PARTS_DIR, claim_name
from shards.store import Store

CLAIM_REFRESH = 60.0  # seconds between two rewrites of a live claim
CLAIM_STALE_AFTER = 300.0  # seconds without a refresh after which another host's claim counts as abandoned
CLAIM_SETTLE = 10.0  # seconds the first of two converters that started together waits for the other to stop


class SplitBusy(RuntimeError):
    """Another converter is writing the split; the message names its host, pid and claim."""


def _describe(claim: dict, *, same_plan: bool) -> str:
    job = f"job {claim.get('job_index', '?')} of {claim.get('num_jobs', '?')}"
    return job + ("" if same_plan else " of another conversion (other source, seed or options)")


def _others(store: Store, split: str, mine: str) -> Iterator[tuple[str, dict]]:
    """(name, content) of every other claim on `split`; stale ones are removed on the way."""
    prefix = PurePosixPath(claim_name(split)).name
    for entry in sorted(store.sizes(PARTS_DIR)):
        name = f"{PARTS_DIR}/{entry}"
        if not entry.startswith(f".{prefix}{TMP_MARK}") or name == mine:
            continue
        try:
            claim = json.loads(store.read_text(name))
        except FileNotFoundError:  # its converter finished meanwhile
            continue
        except ValueError:  # not a claim this code wrote: judged by its name and the listing alone
            claim = {}
        refreshed = float(claim.get("refreshed", 0.0))
        if writer_gone(entry, age=lambda since=refreshed: time.time() - since, foreign_after=CLAIM_STALE_AFTER):
            store.delete(name)
            continue
        yield name, claim


def _conflicts(store: Store, split: str, mine: str, body: dict) -> list[tuple[str, dict]]:
    """The live claims on `split` this converter may not run beside, oldest first: any but the other jobs of
    this very conversion (same plan and --num-jobs, another --job-index: disjoint shards)."""
    found = []
    for name, other in _others(store, split, mine):
        same_plan = other.get("plan_digest") == body["plan_digest"] and other.get("num_jobs") == body["num_jobs"]
        if not (same_plan and other.get("job_index") != body["job_index"]):
            found.append((name, other))
    return sorted(found, key=_age_order)


def _age_order(claim: tuple[str, dict]) -> tuple[float, str]:
    """Who started first (the same order for every converter that sees both claims, whatever the clocks)."""
    name, body = claim
    return float(body.get("started", 0.0)), name


@contextlib.contextmanager
def claim_split(store: Store, split: str, *, plan_digest: str, num_jobs: int, job_index: int) -> Iterator[str]:
    """Hold a claim on `split` in `store` for the duration of the block (see the module docstring); SplitBusy
    before anything is written when a live claim conflicts. Yields the claim's name."""
    mine = temporary_path(PurePosixPath(claim_name(split))).as_posix()
    body = {"host": socket.gethostname(), "pid": os.getpid(), "plan_digest": plan_digest, "num_jobs": num_jobs,
            "job_index": job_index, "started": time.time()}
    stop, writing = threading.Event(), threading.Lock()

    def refresh() -> None:
        with writing:  # never after the claim was removed: that would leave it behind
            if not stop.is_set():
                store.put_bytes(mine, json.dumps({**body, "refreshed": time.time()}, sort_keys=True))

    store.prepare()
    try:
        refresh()
    except OSError as err:  # the claim is the first write into OUT: a read-only or foreign folder is said here
        if err.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise
        raise OSError(err.errno, f"cannot write into {store} ({err.strerror}): converting needs OUT writable "
                                 "(an identical conversion already complete there needs nothing)") from err
    try:
        conflicts = _conflicts(store, split, mine, body)
        if conflicts and _age_order((mine, body)) < _age_order(conflicts[0]):
            # this converter started first: one that started later stops when it sees this claim (it lists after
            # writing its own), so wait for those claims to go; one still there never saw this claim and runs
            deadline = time.monotonic() + CLAIM_SETTLE
            while conflicts and time.monotonic() < deadline:
                time.sleep(0.2)
                conflicts = _conflicts(store, split, mine, body)
        if conflicts:
            name, other = conflicts[0]
            same_plan = other.get("plan_digest") == plan_digest and other.get("num_jobs") == num_jobs
            raise SplitBusy(
                f"another converter (host {other.get('host', '?')}, pid {other.get('pid', '?')}) is writing "
                f"{store.url(split)} ({_describe(other, same_plan=same_plan)}); wait for it to end or stop it. Its "
                f"claim {store.url(name)} is ignored once that converter is gone (at once on its own host, "
                f"{CLAIM_STALE_AFTER:.0f} s after its last refresh from another)")
        keeper = threading.Thread(target=_keep_fresh, args=(refresh, stop), name="claim", daemon=True)
        keeper.start()
        yield mine
    finally:
        stop.set()
        with writing, contextlib.suppress(OSError):  # a claim that cannot be removed goes stale by itself
            store.delete(mine)


def _keep_fresh(refresh, stop: threading.Event) -> None:
    while not stop.wait(CLAIM_REFRESH):
        with contextlib.suppress(OSError):  # one failed refresh is retried at the next; the claim goes stale only
            refresh()  # after CLAIM_STALE_AFTER without any
