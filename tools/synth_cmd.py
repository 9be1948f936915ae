"""`saturate synth`: the command-line layer over `tools.synth` (kept apart so `saturate` starts without numpy)."""

from __future__ import annotations

import argparse


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not 0 < value <= 8:
        raise argparse.ArgumentTypeError(f"must be in (0, 8], got {text}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "synth", help="write a synthetic ImageNet-shaped JPEG tree (train/, val/, LOC_*.txt/csv)",
        description="Write OUT/train/<wnid>/<wnid>_<n>.JPEG and OUT/val/... with ImageNet's image sizes, "
                    "file sizes and (with --quirks) its odd files; byte-identical for the same arguments.",
    )
    parser.add_argument("out", help="output directory (must be empty, or an earlier synth tree with --overwrite)")
    parser.add_argument("--classes", type=_positive_int, required=True, help="number of classes")
    parser.add_argument("--train-per-class", type=_positive_int, required=True, help="train images per class")
    parser.add_argument("--val-per-class", type=_non_negative_int, required=True, help="val images per class")
    parser.add_argument("--quirks", action="store_true",
                        help="~1%% per kind (at least one) CMYK, grayscale, PNG-named-.JPEG, progressive, "
                             "EXIF-rotated files")
    parser.add_argument("--kaggle-val", action="store_true",
                        help="flat val/ILSVRC2012_val_%%08d.JPEG + LOC_val_solution.csv instead of val/<wnid>/")
    parser.add_argument("--seed", type=_non_negative_int, default=0, help="seed of everything (default 0)")
    parser.add_argument("--workers", type=_positive_int, default=None, help="processes (default: all cores)")
    parser.add_argument("--scale", type=_positive_float, default=1.0,
                        help="multiply image width and height (default 1: ImageNet-like ~400x350)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier synth tree in OUT")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tools.synth import generate

    summary = generate(
        args.out, classes=args.classes, train_per_class=args.train_per_class, val_per_class=args.val_per_class,
        quirks=args.quirks, kaggle_val=args.kaggle_val, seed=args.seed, workers=args.workers, scale=args.scale,
        overwrite=args.overwrite, progress=not args.no_progress,
    )
    print(f"synth: {summary['images']} images ({summary['train_images']} train, {summary['val_images']} val, "
          f"{summary['classes']} classes) in {args.out}, mean {summary['mean_bytes'] / 1000:.1f} KB, "
          f"mean {summary['mean_width']:.0f}x{summary['mean_height']:.0f} px, {summary['seconds']:.1f} s "
          f"({summary['images_per_sec']:.0f} images/s on {summary['workers']} workers)")
    return 0
