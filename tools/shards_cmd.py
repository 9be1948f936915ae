"""`saturate shards convert|verify|merge|cache`: the command-line layer over `shards/`."""

from __future__ import annotations

import argparse

from shards.images import DEFAULT_MAX_PIXELS


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("shards", help="pack ImageNet folders into WebDataset shards, verify them")
    sub = parser.add_subparsers(dest="shards_command", required=True, metavar="ACTION")

    conv = sub.add_parser("convert", help="convert one split (train or val) into OUT")
    conv.add_argument("src", help="split folder: SRC/<wnid>/<image> (ImageFolder) or flat with --labels")
    conv.add_argument("out", help="shard folder or s3://BUCKET/PREFIX (credentials and endpoint from the standard "
                                  "AWS environment/config); train and val go into the same OUT")
    conv.add_argument("--split", required=True, help="split name: train or val")
    conv.add_argument("--labels", metavar="CSV", help="flat SRC: LOC_val_solution.csv or 'file,wnid' rows")
    conv.add_argument("--classes", metavar="FILE",
                      help="pin class order: WNID list, LOC_synset_mapping.txt or a manifest "
                           "(default: sorted class folders; val reuses OUT/train.manifest.json)")
    conv.add_argument("--names", metavar="FILE", help="LOC_synset_mapping.txt for human-readable class names")
    size = conv.add_mutually_exclusive_group()
    size.add_argument("--shard-size", default="512MB", help="target bytes per shard (default 512MB)")
    size.add_argument("--samples-per-shard", type=int, help="fixed number of samples per shard instead")
    conv.add_argument("--seed", type=int, default=0, help="global shuffle seed (default 0)")
    conv.add_argument("--workers", type=int, help="processes (default: the cores this process may use)")
    conv.add_argument("--num-jobs", type=int, default=1, help="total jobs sharing this conversion")
    conv.add_argument("--job-index", type=int, default=0, help="this job's index in [0, num-jobs)")
    conv.add_argument("--max-size", type=int, metavar="PX", help="shrink images whose longer side exceeds PX")
    conv.add_argument("--quality", type=int, default=90, help="JPEG quality of re-encoded images (default 90)")
    conv.add_argument("--check", choices=("decode", "header"), default="decode",
                      help="decode (default): strictly decode every JPEG, rejecting corrupt data that decoders "
                           "would only warn about; header: trust well-formed headers (faster, for trusted sources)")
    conv.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, metavar="N",
                      help=f"reject images whose width x height exceeds N (decompression bombs; "
                           f"default {DEFAULT_MAX_PIXELS})")
    conv.add_argument("--strict", action="store_true", help="stop at the first bad file instead of rejecting it")
    conv.add_argument("--spool", metavar="DIR",
                      help="s3:// OUT: local folder for shards waiting to be uploaded, a few shards at a time "
                           "(default: the system's temporary folder)")
    conv.add_argument("--no-progress", action="store_true",
                      help="hide the progress bar (the summary and the rejected files are still printed)")
    conv.set_defaults(func=run_convert)

    ver = sub.add_parser("verify", help="re-check counts, sha256, indexes (and decode with --decode)")
    ver.add_argument("out", help="shard folder or s3://BUCKET/PREFIX")
    ver.add_argument("--split", action="append", help="only this split (repeatable; default: all manifests)")
    ver.add_argument("--decode", action="store_true",
                     help="strictly decode every image (libjpeg-turbo; a warning counts as damage)")
    ver.add_argument("--no-progress", action="store_true")
    ver.add_argument("--workers", type=int, help="processes (default: the cores this process may use)")
    ver.set_defaults(func=run_verify)

    merge = sub.add_parser("merge", help="write the manifest once every job of a split is done")
    merge.add_argument("out", help="shard folder or s3://BUCKET/PREFIX")
    merge.add_argument("--split", required=True)
    merge.set_defaults(func=run_merge)

    cache = sub.add_parser("cache", help="copy a split's shards from an object store into a node-local cache "
                                         "folder before a job (the --cache-dir of `saturate train`)")
    cache.add_argument("src", help="s3://BUCKET/PREFIX holding the shards")
    cache.add_argument("dir", help="the cache folder (the job's --cache-dir): shards land in DIR/BUCKET/PREFIX")
    cache.add_argument("--split", action="append", help="only this split (repeatable; default: all manifests)")
    cache.add_argument("--cache-limit", metavar="SIZE",
                       help="bytes DIR may hold, every data set cached there together (e.g. 200GB): shards that "
                       "do not fit are left in the store; other data sets' shards no job is reading are evicted first")
    cache.set_defaults(func=run_cache)


def run_convert(args: argparse.Namespace) -> int:
    from shards.convert import convert
    from shards.plan import parse_size

    convert(
        args.src, args.out, split=args.split, labels_csv=args.labels, classes_file=args.classes,
        names_file=args.names, shard_bytes=parse_size(args.shard_size), samples_per_shard=args.samples_per_shard,
        seed=args.seed, workers=args.workers, num_jobs=args.num_jobs, job_index=args.job_index,
        max_size=args.max_size, quality=args.quality, check=args.check, max_pixels=args.max_pixels,
        strict=args.strict, spool_dir=args.spool,
        progress=not args.no_progress,
    )
    return 0


def run_verify(args: argparse.Namespace) -> int:
    from shards.verify import verify

    problems, stats = verify(args.out, splits=args.split, decode=args.decode, workers=args.workers,
                             progress=not args.no_progress)
    for problem in problems:
        print(f"FAIL {problem}")
    line = (f"{stats['shards']} shards, {stats['samples']} of {stats['listed']} listed samples checked in "
            f"{stats['seconds']:.1f} s")
    if args.decode and stats["cpu_seconds"] > 0:
        line += (f"; decoded {stats['decoded']} images at "
                 f"{stats['decoded'] / stats['cpu_seconds']:.0f} images/s per core")
    # the count of problems first: the counts after it are of what was checked, not of what failed
    print((f"FAILED ({len(problems)} problem{'s' * (len(problems) != 1)}): " if problems else "OK: ") + line)
    return 1 if problems else 0


def run_merge(args: argparse.Namespace) -> int:
    from shards.publish import missing_shards, write_manifest

    manifest = write_manifest(args.out, args.split)
    if manifest is None:
        raise RuntimeError(missing_shards(args.out, args.split))
    print(f"{args.split}: manifest written, {manifest.num_samples} samples in {len(manifest.shards)} shards")
    return 0


def run_cache(args: argparse.Namespace) -> int:
    """Every shard of each split downloaded (or found and checked) in DIR, as a loader with --cache-dir DIR
    would: verified against the manifest, published atomically, the per-shard locks shared with any job
    already running on the node. One line per split."""
    import time

    from shards.cached_store import CachedStore
    from shards.plan import format_size, parse_size
    from shards.request_log import request_counts
    from shards.schema import check_split_name, load_manifest, splits_in
    from shards.store import open_store

    remote = open_store(args.src)
    if remote.local_dir is not None:
        raise ValueError(f"{args.src} is a folder; `shards cache` copies from an object store (s3://)")
    limit = parse_size(args.cache_limit, "--cache-limit") if args.cache_limit else None
    splits = [check_split_name(s) for s in args.split] if args.split else splits_in(remote)
    if not splits:
        raise FileNotFoundError(f"{args.src}: no <split>.manifest.json found")
    for split in splits:
        started, before = time.perf_counter(), request_counts()
        store = CachedStore(remote, args.dir, load_manifest(remote, split), limit=limit)
        try:
            store.start()
            while not store.wait_idle(timeout=1.0):
                if store.store_error is not None:  # boto3 has retried already; a person should look
                    raise store.store_error
        finally:
            store.close()
        cached, total = store.cached()
        stats, seconds = store.cache.stats, time.perf_counter() - started
        print(f"{split}: {cached}/{total} shards cached in {store.cache.folder} "
              f"({format_size(store.cache.usage(whole_dir=False)[0])} in the folder); {stats.downloaded} downloaded "
              f"({format_size(stats.downloaded_bytes)} in {seconds:.1f} s), {stats.rechecked} re-checked, "
              f"{stats.refetched} re-fetched, {stats.evicted} evicted; {(request_counts() - before).line()}")
        if cached < total and limit is None:
            return 1
    return 0
