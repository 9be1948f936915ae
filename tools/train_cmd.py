"""`saturate train`: the trainer's command line, flags -> TrainConfig -> training.train.train.

Every field of training.config.TrainConfig is a flag of the same name (`base_lr` -> `--base-lr`); a
`--config FILE` (YAML/TOML/JSON) sets fields first and flags given on the command line override it.

Under torchrun the same command line is `torchrun --nproc-per-node N -m tools.cli train ...` (the one module
path; `saturate train` is `python -m tools.cli train`). This layer is also where `--num-threads auto` gets the
profiler's short tune, handed to `train()`, so `training/` never imports `tools/`.
"""

from __future__ import annotations

import argparse
import sys
import typing

EPILOG = """examples:
  saturate train --data /shards/imagenet                                   # 1 GPU, ResNet-50 recipe
  torchrun --nproc-per-node 8 -m tools.cli train --data /shards/imagenet   # 8 GPUs, DDP
  saturate train --backend synthetic --max-steps 300 --compile             # model ceiling, no data
  saturate train --data D --evaluate-only --resume runs/train/checkpoints/best.pt
see docs/training.md for multi-node and Slurm, training/RECIPE.md for the recipe."""


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field; defaults are SUPPRESSed so only flags actually given override."""
    from training.config import FIELD_TYPES, FIELDS, flag

    group = parser.add_argument_group("training options (defaults in training/config.py)")
    for name, spec in FIELDS.items():
        hint = FIELD_TYPES[name]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        base = args[0] if len(args) == 1 else hint
        default = spec.default
        text = f"{spec.metadata['help']} (default: {default})"
        if base is bool:
            group.add_argument(flag(name), dest=name, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=text)
        elif typing.get_origin(base) is tuple:
            group.add_argument(flag(name), dest=name, nargs="+", metavar="X", default=argparse.SUPPRESS,
                               help=text)
        else:
            # strings here; TrainConfig's coercion gives one error format (naming the flag) for file and CLI
            group.add_argument(flag(name), dest=name, metavar=name.upper(), default=argparse.SUPPRESS,
                               help=text)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="YAML/TOML/JSON file of option: value pairs")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config and exit (--data, --resume, --pretrained need not exist)")
    parser.add_argument("--traceback", action="store_true", help="show the full traceback on errors")
    add_config_flags(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Build the config and train; a run stopped by SIGTERM/SIGUSR1 (after its checkpoint) exits 128 + signal."""
    from training.config import FIELDS, build_config

    overrides = {name: getattr(args, name) for name in FIELDS if hasattr(args, name)}
    # printing needs no data: what exists only at run time (--data, --resume, --pretrained) is checked by a run
    config = build_config(file=args.config, overrides=overrides, check_paths=not args.print_config)
    if args.print_config:
        print(config.to_json())
        return 0
    from training.preempt import Preempted
    from training.train import train
    from training.tuning import needs_tune

    run_tune = None
    if needs_tune(config):
        # 'auto' with no matching tune.json entry runs the profiler's short tune first: handed to train() from
        # here, the command-line layer, so training never imports tools
        from tools.profiler.tune import short_tune as run_tune
    try:
        train(config, run_tune=run_tune)
    except Preempted as stop:
        print(f"train: {stop}", file=sys.stderr)
        return stop.exit_status
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a torchvision classifier on shards (DDP under torchrun)",
        description="Flags -> TrainConfig -> training.train; every TrainConfig field is a flag of the same name.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    configure(parser)


def main(argv: list[str]) -> int:
    """`saturate train ARGV...` in this process (tests and notebooks): same parser, same one-line errors."""
    from tools.cli import main as saturate

    return saturate(["train", *argv])
