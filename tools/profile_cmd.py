"""`saturate profile SHARDS --out DIR`: the command-line layer over tools.profiler (only this file knows argparse).

    saturate profile shards/ --out prof/ --threads 4,8,16 --hw-decoder-load 0,0.65,1 --batch-size 256
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from pipeline.constants import HW_DECODER_LOAD
from tools.profiler import DEFAULT_DURATION, DEFAULT_WARMUP, DEFAULT_WINDOWS, MODES


def comma_list(convert: Callable[[str], Any], flag: str) -> Callable[[str], list]:
    """argparse type for `--flag a,b,c`: each item converted, the error naming the flag and the item."""
    def parse(text: str) -> list:
        items = [item.strip() for item in text.split(",") if item.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"{flag}: empty list")
        try:
            return [convert(item) for item in items]
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"{flag}: {text!r} is not a comma list of {convert.__name__}") from err
    return parse


def on_off(text: str) -> bool:
    """`--compile off,on`: on/off, true/false, 1/0."""
    value = text.lower()
    if value in ("on", "true", "1", "yes"):
        return True
    if value in ("off", "false", "0", "no"):
        return False
    raise ValueError(text)


on_off.__name__ = "on/off"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "profile",
        help="is the GPU starved? loader alone, model ceiling and end-to-end throughput side by side",
        description="Measure each data backend alone, the training step on synthetic data (the ceiling) and "
                    "the training step fed by each backend; every list flag is a sweep (comma list). "
                    "Writes report.json, report.md, report.png into --out and prints the table.",
    )
    parser.add_argument("shards", help="shard folder holding <split>.manifest.json and its shards")
    parser.add_argument("--out", required=True, help="folder for report.json, report.md and report.png")
    parser.add_argument("--modes", metavar="MODE[,MODE]", type=comma_list(str, "--modes"), default=list(MODES),
                        help="any of loader,model,e2e (default: all three)")
    parser.add_argument("--backends", metavar="BACKEND[,...]", type=comma_list(str, "--backends"),
                        help="data backends: dali-gpu,dali-cpu,pytorch (default: dali-gpu,pytorch; "
                             "dali-cpu,pytorch without a GPU)")
    parser.add_argument("--batch-size", metavar="N[,N...]", type=comma_list(int, "--batch-size"), default=[256],
                        help="images per step per GPU (default 256)")
    parser.add_argument("--image-size", metavar="PX[,PX...]", type=comma_list(int, "--image-size"), default=[224],
                        help="pixels (default 224)")
    parser.add_argument("--threads", metavar="N[,N...]", type=comma_list(int, "--threads"),
                        help="DALI CPU threads / pytorch DataLoader workers (default: CPU cores per GPU)")
    parser.add_argument("--hw-decoder-load", metavar="X[,X...]", type=comma_list(float, "--hw-decoder-load"),
                        default=[HW_DECODER_LOAD],
                        help=f"dali-gpu only: share of JPEGs for the hardware decoder, 0-1 (default {HW_DECODER_LOAD})")
    parser.add_argument("--precision", metavar="P[,P...]", type=comma_list(str, "--precision"), default=["bf16"],
                        help="bf16,fp16,fp32 (default bf16)")
    parser.add_argument("--compile", metavar="off[,on]", type=comma_list(on_off, "--compile"), default=[False],
                        help="torch.compile off,on (default off)")
    parser.add_argument("--arch", default="resnet50", help="torchvision model name (default resnet50)")
    parser.add_argument("--split", default="train", help="split to read: train (default) or val")
    bound = parser.add_mutually_exclusive_group()
    bound.add_argument("--duration", type=float, help=f"timed seconds per configuration (default {DEFAULT_DURATION:g})")
    bound.add_argument("--steps", type=int, help="timed steps per configuration instead of --duration")
    parser.add_argument("--warmup", type=int, default=DEFAULT_WARMUP,
                        help=f"untimed steps before timing (default {DEFAULT_WARMUP})")
    parser.add_argument("--windows", type=int, default=DEFAULT_WINDOWS,
                        help=f"timed windows per configuration; img/s is their median (default {DEFAULT_WINDOWS})")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tools.profiler import profile

    report = profile(
        args.shards, out_dir=args.out, modes=args.modes, backends=args.backends, batch_sizes=args.batch_size,
        image_sizes=args.image_size, threads=args.threads, hw_decoder_loads=args.hw_decoder_load,
        precisions=args.precision, compile_modes=args.compile, arch=args.arch, split=args.split, steps=args.steps,
        duration=args.duration, warmup=args.warmup, windows=args.windows, progress=not args.no_progress,
    )
    corpus, machine = report.corpus, report.machine
    print(f"corpus: {corpus['images']} images, {corpus['num_classes']} classes, mean {corpus['mean_jpeg_kb']:.0f} KB, "
          f"mean {corpus['mean_width_px']:.0f}x{corpus['mean_height_px']:.0f} px")
    print(f"machine: {machine['gpu'] or 'no GPU'}, {machine['cpu_usable']} CPU cores, torch {machine['torch']}, "
          f"DALI {machine['dali']}, Pillow {machine['pillow']}")
    for note in report.notes:
        print(f"note: {note}")
    print()
    print(report.table_markdown())
    failed = [row for row in report.rows if not row.ok]
    print(f"report: {args.out}/report.md, report.json, report.png"
          + (f" ({len(failed)} configuration(s) failed, see the ERROR rows)" if failed else ""))
    sys.stdout.flush()
    return 0
