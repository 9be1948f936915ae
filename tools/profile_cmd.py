"""`saturate profile SHARDS --out DIR`: the command-line layer over tools.profiler (only this file knows argparse).

    saturate profile shards/ --out prof/ --threads 4,8,16 --hw-decoder-load 0,0.65,1 --batch-size 256
    saturate profile shards/ --out prof/ --nproc 8                  # every GPU of the node at once
    saturate profile shards/ --out prof/ --tune --arch resnet50 --batch-size 256 --precision bf16
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from shards.process import environment_place, under_torchrun
from tools.profiler.measure import DEFAULT_DURATION, DEFAULT_MAX_WARMUP, DEFAULT_WARMUP, DEFAULT_WINDOWS
from tools.profiler.plan import AXES, LOADER_AXES, STEP_AXES
from tools.profiler.tune import DEFAULT_MAX_TRIALS, DEFAULT_TIME_BUDGET, TARGET


def comma_list(convert: Callable[[str], Any]) -> Callable[[str], list]:
    """argparse type for `--flag a,b,c`: each item converted; argparse puts the flag before the error."""
    def parse(text: str) -> list:
        items = [item.strip() for item in text.split(",") if item.strip()]
        if not items:
            raise argparse.ArgumentTypeError("empty list")
        try:
            return [convert(item) for item in items]
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma list of {convert.__name__}") from err
    return parse


def add_axis_flags(parser: argparse.ArgumentParser, names: tuple[str, ...]) -> None:
    """One comma-list flag per axis (tools/profiler/plan.py), into `args.<its Sweep field>`."""
    for name in names:
        a = AXES[name]
        parser.add_argument(a.flag, dest=a.sweep, metavar=a.metavar, type=comma_list(a.parse),
                            default=None if a.default is None else list(a.default), help=a.help)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "profile",
        help="is the GPU starved? loader alone, model ceiling and end-to-end throughput side by side",
        description="Measure each data backend alone, the training step on synthetic data (the ceiling) and "
                    "the training step fed by each backend; every list flag is a sweep (comma list). "
                    "Writes report.json, report.md, report.png into --out and prints the table. With --tune, "
                    "finds the cheapest loader setting that feeds the ceiling and writes tune.json instead.",
    )
    parser.add_argument("shards", help="shard folder or s3://BUCKET/PREFIX holding <split>.manifest.json and its "
                                       "shards")
    parser.add_argument("--out", required=True, help="folder for report.json/.md/.png (or tune.json with --tune)")
    # the sweep's axes: the frame (modes, backends, batch and image size), the loader's, then the step's
    add_axis_flags(parser, tuple(name for name, a in AXES.items() if a.scope is None) + LOADER_AXES)
    parser.add_argument("--randaugment-n", type=int, metavar="N", help="--augment randaugment: ops per image")
    parser.add_argument("--randaugment-m", type=int, metavar="M", help="--augment randaugment: magnitude bin")
    parser.add_argument("--random-erasing", type=float, default=0.0, metavar="P",
                        help="probability of erasing a box per image, on top of every --augment policy")
    add_axis_flags(parser, STEP_AXES)
    parser.add_argument("--arch", default="resnet50", help="torchvision model name (default resnet50)")
    parser.add_argument("--split", default="train", help="split to read (default train)")
    parser.add_argument("--cache-dir", metavar="DIR", help="s3:// shards: every data row reads through a node-local "
                        "shard cache in DIR (as `saturate train --cache-dir`); pre-stage it with `saturate shards "
                        "cache` to measure it warm from the first row")
    parser.add_argument("--cache-limit", metavar="SIZE", help="bytes --cache-dir may hold, e.g. 200GB: every data "
                        "set cached there together (other data sets' shards no job is reading are evicted first)")
    bound = parser.add_mutually_exclusive_group()
    bound.add_argument("--duration", type=float, help=f"timed seconds per configuration (default {DEFAULT_DURATION:g})")
    bound.add_argument("--steps", type=int, help="timed steps per configuration instead of --duration")
    parser.add_argument("--warmup", type=int, default=DEFAULT_WARMUP,
                        help=f"untimed steps before the steady check (default {DEFAULT_WARMUP})")
    parser.add_argument("--max-warmup", type=float, default=DEFAULT_MAX_WARMUP, metavar="SECONDS",
                        help="warm up until two windows agree on the step time, for at most this long; a row that "
                             f"never settles is marked unstable; 0: no check (default {DEFAULT_MAX_WARMUP:g})")
    parser.add_argument("--windows", type=int, default=DEFAULT_WINDOWS,
                        help=f"timed windows per configuration; img/s is their median (default {DEFAULT_WINDOWS})")
    parser.add_argument("--nproc", type=int, metavar="N",
                        help="run N processes on this node under torchrun (one per GPU), all measuring at once")
    tune = parser.add_argument_group("--tune: the cheapest loader setting that feeds the ceiling")
    tune.add_argument("--tune", action="store_true", help="search instead of sweeping; writes OUT/tune.json and "
                      "SHARDS/tune.json (read by saturate train --num-threads auto)")
    tune.add_argument("--target", type=float, default=TARGET, help=f"e2e / ceiling to reach (default {TARGET})")
    tune.add_argument("--max-trials", type=int, default=DEFAULT_MAX_TRIALS,
                      help=f"loader settings measured at most (default {DEFAULT_MAX_TRIALS})")
    tune.add_argument("--time-budget", type=float, default=DEFAULT_TIME_BUDGET, metavar="SECONDS",
                      help=f"search time at most (default {DEFAULT_TIME_BUDGET:g})")
    tune.add_argument("--max-threads", type=int, help="most loader threads per GPU to try (default: cores per GPU)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.nproc is not None and args.nproc < 1:
        raise ValueError(f"--nproc: an integer >= 1, got {args.nproc}")
    if args.nproc and args.nproc > 1 and not under_torchrun():
        from tools.profiler.report import Report
        from tools.profiler.sweep import launch
        from tools.profiler.tune import check_tune_files

        # Here, before any rank starts: raised in rank 0 alone, the others would wait in a collective for it
        Report.prepare(args.out)
        if args.tune:
            check_tune_files(out_dir=args.out, shards_dir=args.shards)
        return launch(args.nproc, _without_nproc(args.argv))
    main = environment_place().is_main
    if args.tune:
        return run_tune(args, main=main)
    from tools.profiler import profile

    report = profile(
        args.shards, out_dir=args.out, **{a.sweep: getattr(args, a.sweep) for a in AXES.values()},
        randaugment_n=args.randaugment_n, randaugment_m=args.randaugment_m, random_erasing=args.random_erasing,
        arch=args.arch, split=args.split, steps=args.steps, duration=args.duration, warmup=args.warmup,
        max_warmup=args.max_warmup, windows=args.windows, progress=not args.no_progress, cache_dir=args.cache_dir,
        cache_limit=args.cache_limit,
    )
    if not main:
        return 0
    corpus, machine = report.corpus, report.machine
    print(f"corpus: {corpus['images']} images, {corpus['num_classes']} classes, mean {corpus['mean_jpeg_kb']:.0f} KB, "
          f"mean {corpus['mean_width_px']:.0f}x{corpus['mean_height_px']:.0f} px")
    print(f"machine: {machine['gpu'] or 'no GPU'}, {machine['cpu_usable']} CPU cores, torch {machine['torch']}, "
          f"DALI {machine['dali']}, Pillow {machine['pillow']}")
    for note in report.notes:
        print(f"note: {note}")
    print()
    print(report.table_markdown())
    if report.ranks > 1:
        print(report.rank_table_markdown())
    failed = [row for row in report.rows if not row.ok]
    unstable = [row for row in report.rows if row.ok and row.unstable]
    print(f"report: {args.out}/report.md, report.json, report.png"
          + (f" ({len(failed)} configuration(s) failed, see the ERROR rows)" if failed else "")
          + (f" ({len(unstable)} unstable row(s) in parentheses: not results, see their notes)" if unstable else ""))
    sys.stdout.flush()
    return 0


def run_tune(args: argparse.Namespace, *, main: bool) -> int:
    """--tune: one configuration (each list flag one value), the search, tune.json, the flags to train with."""
    from tools.profiler.measure import Timing
    from tools.profiler.report import Report
    from tools.profiler.sweep import default_backends
    from tools.profiler.tune import check_tune_files, tune, write_entry

    def one(flag: str, values: list) -> Any:
        if len(values) != 1:
            raise ValueError(f"{flag}: --tune tunes one configuration, got {values}")
        return values[0]

    if args.cache_dir is not None or args.cache_limit is not None:
        raise ValueError("--cache-dir: --tune measures the loader without a cache; tune on a folder, or profile "
                         "the cache without --tune")
    backend = one("--backends", args.backends or [default_backends()[0][0]])
    settings = dict(arch=args.arch, batch_size=one("--batch-size", args.batch_sizes),
                    image_size=one("--image-size", args.image_sizes), precision=one("--precision", args.precisions),
                    compile=one("--compile", args.compile_modes), augment=one("--augment", args.augments) or "rrc-flip",
                    randaugment_n=args.randaugment_n, randaugment_m=args.randaugment_m,
                    random_erasing=args.random_erasing)
    for flag, given in (("--threads", args.threads is not None), ("--prefetch", args.prefetch_depths != [None])):
        if given:  # the search picks these; a value here was silently ignored
            raise ValueError(f"{flag}: --tune searches the loader threads and prefetch depth itself "
                             "(bound the threads with --max-threads)")
    # --steps and --duration exclude each other (argparse); neither: the profile's default duration
    duration = DEFAULT_DURATION if args.steps is None and args.duration is None else args.duration
    timing = Timing(args.steps, duration, args.windows, args.warmup, args.max_warmup)

    def ready() -> None:  # the flags are valid: is there somewhere to write? Now, not after the minutes of the tune
        if main:
            Report.prepare(args.out)
            check_tune_files(out_dir=args.out, shards_dir=args.shards)

    entry = tune(args.shards, backend=backend, split=args.split, timing=timing, max_threads=args.max_threads,
                 max_trials=args.max_trials, time_budget=args.time_budget, target=args.target,
                 progress=not args.no_progress, before_measuring=ready, **settings)
    if not main:
        return 0
    print()
    print("| threads | prefetch | hw_load | img/s/GPU | of ceiling | s | note |\n|---|---|---|---|---|---|---|")
    for t in entry["trials"]:
        figure = f"{t['images_per_sec_per_gpu']:.0f}" if t["images_per_sec_per_gpu"] else "n/a"
        share = f"{t['fraction']:.2f}" if t["fraction"] else "n/a"
        note = t["error"] or ("UNSTABLE: " + "; ".join(t["unstable"]) if t["unstable"] else "")
        load = "-" if t["hw_decoder_load"] is None else f"{t['hw_decoder_load']:g}"
        print(f"| {t['threads']} | {t['prefetch']} | {load} | {figure} | {share} | {t['seconds']:.0f} | {note} |")
    print()
    verdict = ("the cheapest setting reaching" if entry["reached_target"] else "no setting tried reached")
    print(f"tune: {verdict} {entry['target']:.2f} of the ceiling ({entry['ceiling_images_per_sec_per_gpu']:.0f} "
          f"img/s/GPU): {entry['flags']} gives {entry['fraction_of_ceiling']:.2f}"
          + ("" if entry["reached_target"] else " (the best reachable)")
          + (f"; search stopped: {entry['stopped']}" if entry["stopped"] else ""))
    for note in entry["notes"]:
        print(f"note: {note}")
    for line in write_entry(entry, out_dir=args.out, shards_dir=args.shards):
        print(line)
    model = f"--arch {args.arch} --batch-size {settings['batch_size']} --image-size {settings['image_size']} " \
            f"--precision {settings['precision']}" + (" --compile" if settings["compile"] else "")
    per_node = entry["match"]["processes_per_node"]  # the setting is for this many processes per node
    train = "saturate train" if per_node == 1 else f"torchrun --nproc-per-node {per_node} -m tools.cli train"
    print(f"train with: {train} --data {args.shards} {model} {entry['flags']}")
    print(f"        or: {train} --data {args.shards} {model} --backend {backend} --num-threads auto"
          + (" --hw-decoder-load auto" if backend == "dali-gpu" else ""))
    sys.stdout.flush()
    return 0


def _without_nproc(argv: list[str]) -> list[str]:
    """The command line a launched rank runs: the same, less `--nproc N` (it would launch again)."""
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == "--nproc":
            skip = True
        elif not item.startswith("--nproc="):
            out.append(item)
    return out
