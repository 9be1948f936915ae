"""Publishing a conversion into OUT: the plan first, each finished shard then its record, the manifest last.

    publish_plan(store, split, ...)    OUT ready, a manifest of another plan removed, `.parts/<split>.plan.json`
    ShardSink.publish / publish_shard  `.idx` and tar into the store, then `.parts/<split>-NNNNNN.json`
    is_complete(store, split, ...)     a rerun skips a shard whose record, sizes and sha256 still match
    write_manifest(out, split)         `<split>.manifest.json` from the plan and the records, once all are in;
                                       then the shard files it does not list are removed

A shard is written whole on local disk first (the tar writer needs a seekable, renamable file), into the
store's own folder when the store is one (nothing moves), else into a private spool. `publish` then uploads
the `.idx` and the tar (multipart above `shards.store.MULTIPART_BYTES`, several shards at once) and writes the
shard's record last, so a record exists only for a shard wholly in the store; a killed run leaves at most
shards without records, which the next run rewrites. The manifest is written last, so its presence means
every shard it lists is in OUT.

Spool disk stays bounded: `publish` blocks while `uploads` shards wait for their upload, and the converter
keeps at most `workers` shards being written, so the spool never holds more than `workers + uploads` shards.
A private spool is named `saturate-spool.tmp-<host>-<pid>-<random>` (shards.process's temporary naming), so the
next converter run removes the spool of one that was killed (`kill -9`, OOM) instead of leaving its shards,
up to `workers + uploads` of them at 512 MB each, in the temporary folder for good.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from shards.process import remove_stale_temporaries, temporary_folder
from shards.schema import (
    LABEL_ENCODING,
    PARTS_DIR,
    Manifest,
    ShardFormatError,
    ShardRecord,
    check_split_name,
    manifest_name,
    plan_name,
    record_name,
    record_number,
    shard_name,
    unlisted_shard_files,
)
from shards.store import Store, open_store

UPLOADS_IN_FLIGHT = 4  # shards uploading at once (each in up to shards.store.UPLOAD_THREADS parts)
MISSING_SHOWN = 10  # shard names a "not written yet" message lists
SPOOL_NAME = "saturate-spool"


# --- the sink: shards into the store ----------------------------------------------------------------------
class ShardSink:
    """Where the converter's finished shards go (see the module docstring). Use as a context manager: leaving
    it waits for every upload and re-raises the first failure."""

    def __init__(self, store: Store, *, spool_dir: str | Path | None = None, uploads: int = UPLOADS_IN_FLIGHT):
        self.store = store
        self._own_spool = store.local_dir is None
        if self._own_spool:
            # a spool of a converter that was killed goes first (shards.process's rule for temporaries)
            self.spool = temporary_folder(spool_dir if spool_dir is not None else tempfile.gettempdir(), SPOOL_NAME)
        else:
            self.spool = store.local_dir
        self._slots = threading.BoundedSemaphore(uploads)
        self._pool = ThreadPoolExecutor(max_workers=uploads, thread_name_prefix="upload")
        self._futures: list[Future] = []

    def publish(self, files: list[tuple[str, str | None]], record: tuple[str, str]) -> None:
        """Put `files` ((name in the spool, sha256 or None), in order) into the store, then write `record`
        (name, text). Returns once the upload is queued; blocks while `uploads` are already waiting."""
        self._raise_failed()
        self._slots.acquire()
        try:
            self._futures.append(self._pool.submit(self._upload, files, record))
        except BaseException:
            self._slots.release()
            raise

    def _upload(self, files: list[tuple[str, str | None]], record: tuple[str, str]) -> None:
        try:
            for name, sha256 in files:
                self.store.put_file(self.spool / name, name, sha256=sha256)
            if self._own_spool:
                for name, _ in files:
                    (self.spool / name).unlink(missing_ok=True)
            self.store.put_bytes(*record)
        finally:
            self._slots.release()

    def _raise_failed(self) -> None:
        for future in [f for f in self._futures if f.done()]:
            self._futures.remove(future)
            future.result()  # an upload's error (access denied, endpoint gone), naming the URL

    def close(self, *, cancel: bool = False) -> None:
        """Wait for every queued upload (or drop the queued ones with `cancel`), re-raise the first failure,
        and remove a private spool."""
        try:
            self._pool.shutdown(wait=True, cancel_futures=cancel)
            if not cancel:
                for future in self._futures:
                    future.result()
        finally:
            self._futures.clear()
            if self._own_spool:
                shutil.rmtree(self.spool, ignore_errors=True)

    def __enter__(self) -> ShardSink:
        return self

    def __exit__(self, exc_type, *rest: object) -> None:
        self.close(cancel=exc_type is not None)


# --- the plan and the shard records: what the manifest is built from, what a rerun may skip ---------------
@dataclass
class ShardResult:
    """What writing one shard produced; its JSON is the shard's record (`.parts/<split>-NNNNNN.json`), which
    `is_complete` checks on a rerun and `write_manifest` adds up."""

    index: int
    plan_digest: str
    record: dict | None  # ShardRecord fields; None when every source of the shard was rejected
    converted: list[dict] = field(default_factory=list)  # [{"path", "reason"}]
    rejected: list[dict] = field(default_factory=list)  # [{"path", "reason"}]
    class_counts: dict[str, int] = field(default_factory=dict)  # wnid -> samples packed in this shard
    index_sha256: str | None = None  # of the .idx written with the tar: a rerun checks both belong together


def publish_plan(
    store: Store, split: str, *, digests: list[str], split_digest: str, discovered: int,
    discovery_rejected: list[dict], classes: list[dict], options: dict, tool_version: str, num_jobs: int = 1,
    say=None,
) -> None:
    """Before any shard is written: make OUT ready (remove the temporaries of converter runs that were killed),
    remove a manifest of another plan (invalidate_other_manifest), and write the split's plan, from which
    `write_manifest` builds the manifest once every shard has its record. `num_jobs` is kept beside the plan
    (not in its digests: any job count writes the same shards) so that `missing_shards` can name the jobs."""
    store.prepare()
    if store.local_dir is not None:  # plan, record and manifest temporaries of converter runs that were killed
        for folder in (store.local_dir, store.local_dir / PARTS_DIR):
            remove_stale_temporaries(folder)
    invalidate_other_manifest(store, split, split_digest, say=say)
    store.put_bytes(plan_name(split), json.dumps({
        "digests": digests, "plan_digest": split_digest, "discovered": discovered,
        "discovery_rejected": discovery_rejected, "classes": classes, "options": options,
        "tool_version": tool_version, "num_jobs": num_jobs,
    }, sort_keys=True))


def publish_shard(result: ShardResult, *, sink: ShardSink, split: str) -> None:
    """Hand a written shard to the sink: index, then tar (with its sha256 as object metadata), then its record."""
    record = result.record
    files = [(record["index"], None), (record["name"], record["sha256"])] if record else []
    sink.publish(files, (record_name(split, result.index), json.dumps(asdict(result), sort_keys=True)))


def read_record(store: Store, split: str, index: int) -> dict | None:
    """The record of shard `index` (ShardResult's fields, as publish_shard wrote them); None while it has none."""
    try:
        return json.loads(store.read_text(record_name(split, index)))
    except FileNotFoundError:
        return None


def is_complete(store: Store, split: str, index: int, digest: str, sizes: dict[str, int]) -> bool:
    """A shard is skipped on rerun only if its record matches the plan, tar and index are in the store
    (`sizes`: one listing) with the recorded size, and the tar's sha256 matches the record (hashed in a
    folder; the sha256 stored with the object at upload in an object store)."""
    result = read_record(store, split, index)
    if result is None or result["plan_digest"] != digest:
        return False
    record = result["record"]
    if record is None:
        return True
    if record["index"] not in sizes or sizes.get(record["name"]) != record["bytes"]:
        return False
    # the index too: a kill between the renames of index and tar can leave another plan's index beside the tar
    if result.get("index_sha256") != index_digest(store.read_text(record["index"])):
        return False
    return store.sha256(record["name"]) == record["sha256"]


def index_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# --- manifest ---------------------------------------------------------------------------------------------
def invalidate_other_manifest(store: Store, split: str, split_digest: str, *, say=None) -> None:
    """Remove `<split>.manifest.json` unless it describes exactly this plan, before any shard is touched: a
    re-conversion (another seed, source or option) replaces shards one by one, and a manifest left in place
    would describe a mix of old and new shards to every loader until the last job rewrites it."""
    path = store.url(manifest_name(split))
    try:
        text = store.read_text(manifest_name(split))
    except FileNotFoundError:
        return
    try:
        current = Manifest.from_json(text, path).plan_digest == split_digest
    except ShardFormatError:
        current = False
    if not current:
        store.delete(manifest_name(split))
        if say is not None:
            say(f"{split}: removed {path}: it describes another conversion, whose shards this one replaces")


def finished_manifest(store: Store, split: str, *, split_digest: str, digests: dict[int, str]) -> Manifest | None:
    """The split's manifest when it was written for exactly this plan and every planned shard is still complete
    (`is_complete`: record, sizes, sha256); else None. A rerun of a finished conversion then writes nothing at
    all, not even its plan, so it succeeds on a read-only OUT and never touches what readers use."""
    try:
        text = store.read_text(manifest_name(split))
    except FileNotFoundError:
        return None
    try:
        manifest = Manifest.from_json(text, store.url(manifest_name(split)))
    except ShardFormatError:
        return None
    if manifest.plan_digest != split_digest:
        return None
    sizes = store.sizes()
    return manifest if all(is_complete(store, split, i, d, sizes) for i, d in digests.items()) else None


def remove_unlisted_shards(store: Store, split: str, manifest: Manifest, *, planned: int) -> list[Path | str]:
    """Delete `<split>-NNNNNN.tar/.idx` files (and their `.partial`s, and the records of shard indices at or
    above `planned`, the plan's shard count) the new manifest does not list: shards of an older, larger plan,
    or of a shard index whose samples this plan all rejected."""
    removed = []
    for name in unlisted_shard_files(store.sizes(), manifest, partials=True):
        store.delete(name)
        removed.append(store.url(name))
    for name in sorted(store.sizes(PARTS_DIR)):
        if (index := record_number(split, name)) is not None and index >= planned:
            store.delete(f"{PARTS_DIR}/{name}")
    return removed


def read_plan(store: Store, split: str) -> dict:
    """The split's plan as publish_plan wrote it; FileNotFoundError saying what to run when there is none."""
    try:
        return json.loads(store.read_text(plan_name(split)))
    except FileNotFoundError:
        raise FileNotFoundError(f"{store.url(plan_name(split))} not found: run `saturate shards convert` for "
                                f"{split} into {store} first") from None


def missing_shards(out: str | os.PathLike | Store, split: str) -> str | None:
    """None when every planned shard of `split` has its record; else one line naming the shards not written yet
    and the jobs (`--job-index`) that write them: job I of J writes shards I, I+J, I+2J, ..."""
    store = open_store(out)
    plan = read_plan(store, split)
    recorded = {record_number(split, name) for name in store.sizes(PARTS_DIR)}
    missing = [index for index in range(len(plan["digests"])) if index not in recorded]
    if not missing:
        return None
    names = ", ".join(shard_name(split, index) for index in missing[:MISSING_SHOWN])
    more = f" and {len(missing) - MISSING_SHOWN} more" if len(missing) > MISSING_SHOWN else ""
    line = f"{len(missing)} of {len(plan['digests'])} {split} shards are not written yet ({names}{more}): "
    num_jobs = plan.get("num_jobs")
    if num_jobs is None:  # a plan written before the job count was kept
        return line + "rerun the conversion, then merge"
    jobs = ", ".join(str(job) for job in sorted({index % num_jobs for index in missing}))
    return (line + f"run job{'s' if ',' in jobs else ''} {jobs} of --num-jobs {num_jobs} (the same "
            f"`saturate shards convert` with --job-index {jobs}), then merge")


def write_manifest(out: str | os.PathLike | Store, split: str) -> Manifest | None:
    """Build `<split>.manifest.json` in OUT (a folder or a store URL) from the plan and the per-shard records;
    None while shards are missing. Written last: its presence means every shard it lists is in OUT."""
    store = open_store(out)
    check_split_name(split)
    plan = read_plan(store, split)
    results = []
    for index, digest in enumerate(plan["digests"]):
        result = read_record(store, split, index)
        if result is None:
            return None
        if result["plan_digest"] != digest:
            raise ValueError(f"{store.url(record_name(split, index))} was written for another plan (other source "
                             "or options); rerun convert")
        results.append(result)
    records = [ShardRecord(**r["record"]) for r in results if r["record"] is not None]
    counts: dict[str, int] = {}
    for r in results:
        for wnid, n in r.get("class_counts", {}).items():
            counts[wnid] = counts.get(wnid, 0) + n
    classes = [{**c, "num_samples": counts.get(c["wnid"], 0)} for c in plan["classes"]]
    rejected = sorted(plan["discovery_rejected"] + [x for r in results for x in r["rejected"]],
                      key=lambda x: x["path"])
    num_samples = sum(r.num_samples for r in records)
    manifest = Manifest(
        split=split, num_samples=num_samples, discovered=plan["discovered"],
        converted=sum(len(r["converted"]) for r in results), rejected=rejected, classes=classes,
        label_encoding=dict(LABEL_ENCODING), shards=records, seed=plan["options"]["seed"],
        options=plan["options"], tool_version=plan["tool_version"], plan_digest=plan["plan_digest"],
    )
    if manifest.discovered != num_samples + len(rejected):
        raise RuntimeError(f"{split}: discovered {manifest.discovered} != packed {num_samples} + rejected "
                           f"{len(rejected)}; a shard record is inconsistent, rerun convert")
    store.put_bytes(manifest_name(split), manifest.to_json())
    remove_unlisted_shards(store, split, manifest, planned=len(plan["digests"]))
    return manifest
