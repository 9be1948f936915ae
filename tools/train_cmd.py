"""`saturate train`: registers the trainer's own command line (training/cli.py) as a sub-command."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    from training.cli import EPILOG, configure

    parser = subparsers.add_parser(
        "train",
        help="train a torchvision classifier on shards (DDP under torchrun)",
        description="Flags -> TrainConfig -> training.train; every TrainConfig field is a flag of the same name.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    configure(parser)
