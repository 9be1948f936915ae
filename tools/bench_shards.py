"""Benchmark of the converter on this machine: throughput with the default strict decode check (`--check
decode`) and with the header check (`--check header`) beside `tar -cf` of the same tree in the same run, peak
RSS of the whole process tree for a small and a 10x larger input, and `verify --decode` images/s per core.
Prints a markdown block for docs/benchmarks.md.

    python -m tools.bench_shards --images 2000 --work /tmp/bench

Both tar and the converter read a tree that was just written, so both read from the page cache; each is run
twice, alternating, and the faster run of each is reported (the slower one is printed too).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

from shards.process import usable_cpus


def run_measured(cmd: list[str]) -> tuple[float, int]:
    """Run `cmd`; return (wall seconds, peak RSS in bytes summed over the process and all its children)."""
    peak = 0
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        root = psutil.Process(proc.pid)
        while not stop.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in procs))
            except psutil.Error:
                pass
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, err = proc.communicate()
    wall = time.perf_counter() - start
    stop.set()
    sampler.join()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{err.decode()[-2000:]}")
    return wall, peak


def tree_stats(root: Path) -> tuple[int, int]:
    files = [p for p in root.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000, help="images in the small input (the large is 10x)")
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--work", default="/tmp/saturate-bench-shards")
    parser.add_argument("--workers", type=int, default=usable_cpus())
    parser.add_argument("--shard-size", default="64MB",
                        help="small enough that both inputs span several shards per worker, as ImageNet's ~280 "
                             "shards of 512 MB do; then both runs use the same processes and RSS compares")
    args = parser.parse_args(argv)

    from tools.synth import generate

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    saturate = [sys.executable, "-m", "tools.cli"]
    rows = []
    for scale in (1, 10):
        n = args.images * scale
        src = work / f"synth-{n}"
        generate(src, classes=args.classes, train_per_class=n // args.classes, val_per_class=0, seed=0,
                 workers=args.workers, progress=False)
        files, nbytes = tree_stats(src / "train")
        tar = ["tar", "-cf", str(work / f"tree-{n}.tar"), "-C", str(src), "train"]
        times: dict[str, list[float]] = {"tar": [], "decode": [], "header": []}
        peaks = []
        for _ in range(2):
            times["tar"].append(run_measured(tar)[0])
            for check in ("decode", "header"):
                shutil.rmtree(work / f"out-{n}", ignore_errors=True)
                wall, peak = run_measured([*saturate, "shards", "convert", str(src / "train"), str(work / f"out-{n}"),
                                           "--split", "train", "--workers", str(args.workers), "--shard-size",
                                           args.shard_size, "--check", check, "--no-progress"])
                times[check].append(wall)
                peaks.append(peak)
        verify_out = subprocess.run([*saturate, "shards", "verify", str(work / f"out-{n}"), "--decode",
                                     "--workers", str(args.workers)], capture_output=True, text=True, check=True)
        rows.append({"images": files, "mb": nbytes / 1e6, **times, "peak_rss_mb": max(peaks) / 1e6,
                     "verify": verify_out.stdout.strip().splitlines()[-1]})
        (work / f"tree-{n}.tar").unlink()

    print(f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}; converter --workers {args.workers} --shard-size {args.shard_size}\n")
    print("| input | tar -cf (best / other) | convert --check decode (best / other) | / tar "
          "| convert --check header (best / other) | / tar | peak RSS (tree) |")
    print("|---|---|---|---|---|---|---|")

    def rate(r: dict, key: str) -> str:
        best, other = min(r[key]), max(r[key])
        return (f"{r['mb'] / best:.0f} MB/s ({r['images'] / best:.0f} img/s) / {r['mb'] / other:.0f} MB/s")

    for r in rows:
        best_tar = min(r["tar"])
        print(f"| {r['images']} images, {r['mb']:.0f} MB | {rate(r, 'tar')} | {rate(r, 'decode')} | "
              f"{best_tar / min(r['decode']):.2f}x | {rate(r, 'header')} | {best_tar / min(r['header']):.2f}x | "
              f"{r['peak_rss_mb']:.0f} MB |")
    print()
    for r in rows:
        print(f"- verify --decode, {r['images']} images: {r['verify']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
