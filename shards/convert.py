"""ImageNet folders -> WebDataset shards, one split: discover -> plan -> write -> index -> manifest.

    sources, rejected, folders = discover(src, ...)    shards.sources: every regular, non-hidden file, its WNID
    classes = resolve_classes(sources, ...)            shards.sources: ImageFolder order (sorted WNIDs) or --classes
    plan = plan_shards(sources, options)               shards.plan: keys, one seeded global shuffle, cut into shards
    finished_manifest(store, split, ...)               shards.publish: this very conversion is complete? then
                                                       nothing below runs and nothing is written
    claim_split(store, split, ...)                     shards.claim: no other converter is writing this split
    publish_plan(store, split, ...)                    shards.publish: another plan's manifest removed, plan written
    write_shards(plan[job_index::num_jobs], ...)       shards.write: tar + DALI index per shard, in a process pool,
                                                       each published as it completes (`.idx`, tar, its record)
    manifest = write_manifest(store, split)            shards.publish: once every planned shard is in OUT

OUT is a folder or an object store prefix (`s3://bucket/prefix`, shards.store): shards are written to local
disk (the folder itself, or a bounded spool) and the sink uploads each as it completes, `.idx` and tar first,
the shard's record under OUT/.parts last; plans, records and manifests are read and written through the store.

The plan depends only on the sources, the seed and the options that shape the output, so J jobs (or machines)
that each write `plan[job_index::num_jobs]` produce exactly the shards one job would, and a rerun after a
crash skips every shard whose record and sha256 still match.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from shards.claim import claim_split
from shards.images import DEFAULT_MAX_PIXELS
from shards.plan import DEFAULT_SHARD_BYTES, WriteOptions, plan_digest, plan_shards, split_digest, tool_version
from shards.process import check_workers, usable_cpus
from shards.publish import ShardSink, finished_manifest, missing_shards, publish_plan, write_manifest
from shards.schema import Manifest, check_split_name, load_manifest, manifest_name
from shards.sources import check_hidden_class_folders, discover, resolve_classes
from shards.store import Store, open_store
from shards.write import write_shards


def convert(
    src: str | os.PathLike, out: str | os.PathLike, *, split: str,
    labels_csv: str | os.PathLike | None = None, classes_file: str | os.PathLike | None = None,
    names_file: str | os.PathLike | None = None, shard_bytes: int | None = DEFAULT_SHARD_BYTES,
    samples_per_shard: int | None = None, seed: int = 0, workers: int | None = None, num_jobs: int = 1,
    job_index: int = 0, max_size: int | None = None, quality: int = 90, check: str = "decode",
    max_pixels: int = DEFAULT_MAX_PIXELS, strict: bool = False, progress: bool = True,
    spool_dir: str | os.PathLike | None = None, say: Callable[[str], None] | None = print,
) -> Manifest | None:
    """Convert one split into OUT (a folder or an `s3://bucket/prefix` URL); returns the manifest, or None when
    other jobs' shards are still missing.

    `classes_file` pins the class list (a WNID list, LOC_synset_mapping.txt, or a manifest JSON); without it a
    non-train split reuses `OUT/train.manifest.json`'s classes when that exists, so val gets train's indices.
    `spool_dir`: where shards bound for an object store are written before upload (default: the system's
    temporary folder); it holds at most `workers` + shards.publish.UPLOADS_IN_FLIGHT shards at a time.
    `progress` shows the progress bar (stderr) and nothing else; `say` gets the summary, the rejected files and
    the notes (stdout by default, None: silent), with or without the bar, so a batch job's log shows them.
    """
    src, store = Path(src), open_store(out)
    check_split_name(split)
    if num_jobs < 1:
        raise ValueError(f"--num-jobs {num_jobs} must be >= 1")
    if not 0 <= job_index < num_jobs:
        raise ValueError(f"--job-index {job_index} must be in [0, --num-jobs {num_jobs})")
    options = WriteOptions(split, seed, None if samples_per_shard else shard_bytes, samples_per_shard,
                           max_size, quality, check, max_pixels)
    check_workers(workers)

    reference = None if classes_file is not None else train_classes(store, split, say=say)
    sources, discovery_rejected, folders = discover(src, labels_csv=Path(labels_csv) if labels_csv else None)
    if labels_csv is None and classes_file is None and reference is None:
        check_hidden_class_folders(src)
    if strict and discovery_rejected:
        first = discovery_rejected[0]
        raise ValueError(f"{src / first['path']}: {first['reason']} (--strict)")
    classes = resolve_classes(sources, folders=folders, classes_file=Path(classes_file) if classes_file else None,
                              names_file=Path(names_file) if names_file else None, reference=reference,
                              reference_path=store.url(manifest_name("train")))

    plan = plan_shards(sources, options)
    digests = {s.index: plan_digest(s, options, classes) for s in plan}
    digest = split_digest(plan, options, classes)
    manifest = finished_manifest(store, split, split_digest=digest, digests=digests)
    stats, mine = None, plan[job_index::num_jobs]
    if manifest is None:  # else this very conversion is complete: nothing to write (OUT may even be read-only)
        with claim_split(store, split, plan_digest=digest, num_jobs=num_jobs, job_index=job_index):
            publish_plan(store, split, digests=[digests[s.index] for s in plan], split_digest=digest,
                         discovered=len(sources) + len(discovery_rejected), discovery_rejected=discovery_rejected,
                         classes=classes, options=asdict(options), tool_version=tool_version(), num_jobs=num_jobs,
                         say=say)
            with ShardSink(store, spool_dir=spool_dir) as sink:
                stats = write_shards(mine, digests, src=src, sink=sink, options=options, label_of=label_of(classes),
                                     strict=strict, workers=workers or usable_cpus(), progress=progress)
            manifest = write_manifest(store, split)
    if say is not None:
        _print_summary(split, stats, manifest, job_index, num_jobs, len(mine), say=say,
                       missing=missing_shards(store, split) if manifest is None else None,
                       where=store.url(manifest_name(split)), planned_all=len(plan))
    if strict and manifest is not None and manifest.rejected:  # rejections of an earlier run without --strict
        first = manifest.rejected[0]
        raise ValueError(f"{src / first['path']}: {first['reason']} (--strict; listed in "
                         f"{store.url(manifest_name(split))})")
    if manifest is not None:
        warn_empty_classes(manifest)
    return manifest


def label_of(classes: list[dict]) -> dict[str, int]:
    """WNID -> class index."""
    return {c["wnid"]: c["index"] for c in classes}


def train_classes(store: Store, split: str, *, say=None) -> Manifest | None:
    """The train manifest already in OUT, whose class list a non-train split reuses (so val gets train's
    indices); None for train itself or when there is none."""
    if split == "train" or not store.exists(manifest_name("train")):
        return None
    reference = load_manifest(store, "train")
    if say is not None:
        say(f"{split}: using class indices from {store.url(manifest_name('train'))}")
    return reference


def warn_empty_classes(manifest: Manifest) -> None:
    """Say which classes have no sample: their indices are kept (labels match torchvision's ImageFolder with
    allow_empty=True), but a class that is never seen cannot be learned or evaluated."""
    empty = [c for c in manifest.classes if c.get("num_samples") == 0]
    if empty:
        shown = ", ".join(f"{c['wnid']} (index {c['index']})" for c in empty[:5])
        more = f" and {len(empty) - 5} more" if len(empty) > 5 else ""
        print(f"warning: {manifest.split}: {len(empty)} of {manifest.num_classes} classes have no samples: "
              f"{shown}{more}; their indices are kept", file=sys.stderr)


def _print_summary(split, stats, manifest, job_index, num_jobs, planned, *, say: Callable[[str], None],
                   missing: str | None, where: object, planned_all: int) -> None:
    if stats is None:
        say(f"{split}: nothing to do: {where} describes this conversion and "
            + (f"its {planned_all} shards are complete" if planned_all != 1 else "its shard is complete"))
    else:
        secs = max(stats["seconds"], 1e-9)
        say(f"{split}: job {job_index + 1}/{num_jobs} wrote {stats['shards_written']} of {planned} shards "
          f"({stats['shards_skipped']} already complete), {stats['images']} images read in {secs:.1f} s "
            f"= {stats['images'] / secs:.0f} img/s, {stats['bytes'] / 1e6 / secs:.0f} MB/s")
    if manifest is None:
        say(f"{split}: other jobs' shards are still missing (the job that completes the plan writes the "
            f"manifest): {missing}")
    else:
        say(f"{split}: {manifest.num_samples} samples in {len(manifest.shards)} shards, "
              f"{manifest.converted} converted, {len(manifest.rejected)} rejected of {manifest.discovered} "
              f"discovered, {manifest.num_classes} classes")
        for item in manifest.rejected[:10]:
            say(f"  rejected {item['path']}: {item['reason']}")
        if len(manifest.rejected) > 10:
            say(f"  ... {len(manifest.rejected) - 10} more in {manifest_name(split)}")
