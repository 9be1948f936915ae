"""Loader images/s and requests per image from an object store: without a cache, through a cold and a warm
node-local shard cache, and from local disk; same corpus, same settings, one run (docs/benchmarks.md).

    python -m tools.local_s3 SHARDS -- python -m tools.bench_cache {url} SHARDS --backends dali-cpu,pytorch

For each backend: one epoch straight from the store; one epoch through an empty cache folder (cold: the
downloader fills it while the epoch reads, what is not cached yet comes from the store); then the warm cache
(the same loader) and the local folder, alternating epoch by epoch and which of them goes first, so both meet
the same machine load; their figures are the median epoch. Every request on the wire is counted on a relay in
front of the store's http:// endpoint (tools/request_relay.py, started before anything reads the store, so
DALI's own AWS client is counted too). Building a loader (the manifest, a listing, the indexes) is counted
apart from its epochs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any


def epoch(loader: Any, requests: Any, backend: str) -> dict:
    """One pass: images, seconds, images/s, requests sent during it."""
    sent, started, images = requests.count(backend), time.perf_counter(), 0
    for batch in loader:
        images += int(batch[1].shape[0])
    seconds = time.perf_counter() - started
    sent = requests.count(backend) - sent
    return {"images": images, "seconds": seconds, "images_per_sec": images / seconds, "requests": sent,
            "requests_per_image": sent / images}


def built(requests: Any, backend: str, make: Any) -> tuple[Any, int]:
    """(the loader `make()` builds, requests its building sent)."""
    sent = requests.count(backend)
    loader = make()
    return loader, requests.count(backend) - sent


def stage(url: str, requests: Any) -> dict:
    """What `saturate shards cache URL DIR` does for the train split, into an empty folder: requests, seconds."""
    from shards.cached_store import CachedStore
    from shards.schema import load_manifest
    from shards.store import open_store

    manifest = load_manifest(url, "train")
    sent, started = requests.count("store"), time.perf_counter()
    folder = tempfile.mkdtemp(prefix="saturate-bench-stage-")
    store = CachedStore(open_store(url), folder, manifest, limit=None)
    store.start()
    store.wait_idle()
    store.close()
    shutil.rmtree(folder)
    seconds, sent = time.perf_counter() - started, requests.count("store") - sent
    return {"requests": sent, "seconds": seconds, "images": manifest.num_samples,
            "requests_per_image": sent / manifest.num_samples, "bytes": store.cache.stats.downloaded_bytes}


def bench(url: str, folder: str, *, backend: str, requests: Any, epochs: int, **settings: Any) -> dict:
    from pipeline import build_loader

    def make(location: str, **extra: Any) -> Any:
        return build_loader(location, "train", train=True, backend=backend, **settings, **extra)

    out: dict[str, Any] = {}
    store, out["store_build_requests"] = built(requests, backend, lambda: make(url))
    with store:
        out["store"] = epoch(store, requests, backend)
    cache_dir = tempfile.mkdtemp(prefix="saturate-bench-cache-")
    cached, out["cache_build_requests"] = built(requests, backend, lambda: make(url, cache_dir=cache_dir))
    with cached:
        out["cold"] = epoch(cached, requests, backend)  # the local loader is built after: the cache stays cold
        with make(folder) as local:
            out["warm_epochs"], out["disk_epochs"] = [], []
            for turn in range(epochs):  # which goes first alternates too: neither always follows the other
                pair = (("warm", cached), ("disk", local)) if turn % 2 == 0 else (("disk", local), ("warm", cached))
                for name, loader in pair:
                    out[f"{name}_epochs"].append(epoch(loader, requests, backend))
        out["cache"] = {"downloaded": cached.store.cache.stats.downloaded}
    shutil.rmtree(cache_dir)
    for name in ("warm", "disk"):
        runs = out[f"{name}_epochs"]
        out[name] = {"images_per_sec": statistics.median(r["images_per_sec"] for r in runs),
                     "requests_per_image": sum(r["requests"] for r in runs) / sum(r["images"] for r in runs)}
    out["warm_vs_disk"] = out["warm"]["images_per_sec"] / out["disk"]["images_per_sec"]
    return out


def table(results: dict[str, dict]) -> str:
    lines = ["| backend | from | img/s | requests/image | note |", "|---|---|---|---|---|"]
    for backend, r in results.items():
        if backend == "stage":
            lines.append(f"| - | staging the split (`saturate shards cache`) | - | {r['requests_per_image']:.4f} | "
                         f"{r['requests']} requests, {r['bytes'] / 1e6:.0f} MB in {r['seconds']:.1f} s |")
            continue
        warm = ", ".join(f"{e['images_per_sec']:.0f}" for e in r["warm_epochs"])
        disk = ", ".join(f"{e['images_per_sec']:.0f}" for e in r["disk_epochs"])
        lines += [
            f"| {backend} | store, no cache | {r['store']['images_per_sec']:.0f} | "
            f"{r['store']['requests_per_image']:.3f} | one epoch; building the loader: {r['store_build_requests']} |",
            f"| {backend} | cold cache | {r['cold']['images_per_sec']:.0f} | {r['cold']['requests_per_image']:.3f} "
            f"| first epoch, the downloader filling the cache; building: {r['cache_build_requests']} |",
            f"| {backend} | warm cache | {r['warm']['images_per_sec']:.0f} | {r['warm']['requests_per_image']:.3f} "
            f"| median of epochs {warm}; {r['warm_vs_disk']:.2f}x local disk |",
            f"| {backend} | local disk | {r['disk']['images_per_sec']:.0f} | - | median of epochs {disk} |",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench_cache", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url", help="s3://BUCKET/PREFIX with the train split (AWS_ENDPOINT_URL: a plain http:// one)")
    parser.add_argument("folder", help="the same shards in a local folder")
    parser.add_argument("--backends", default="dali-cpu,pytorch")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--epochs", type=int, default=3, help="warm-cache and local-disk epochs, alternating")
    parser.add_argument("--json", metavar="FILE", help="also write every figure here")
    args = parser.parse_args(argv)
    from tools.profiler.sweep import counting_relay

    requests, stop = counting_relay(args.url)  # before anything reads the store: DALI keeps its first endpoint
    if requests.relay_log is None:
        print("bench_cache: error: AWS_ENDPOINT_URL must be a plain http:// endpoint (the requests are counted on "
              "a relay in front of it)", file=sys.stderr)
        return 2
    try:
        results = {backend: bench(args.url, args.folder, backend=backend, requests=requests, epochs=args.epochs,
                                  num_threads=args.threads, batch_size=args.batch_size, image_size=args.image_size)
                   for backend in args.backends.split(",")}
        results["stage"] = stage(args.url, requests)
    finally:
        stop()
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
