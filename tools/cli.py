"""`saturate`: one entry point, one sub-command per job.

Each sub-command lives in its own module with `register(subparsers)`; that module keeps heavy imports
(torch, DALI) inside its run function so `saturate synth --help` starts in milliseconds.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import NoReturn

#: sub-command -> module that registers it
COMMANDS = {
    "synth": "tools.synth_cmd",
    "shards": "tools.shards_cmd",
    "train": "tools.train_cmd",
    "profile": "tools.profile_cmd",
}


class OneLineErrors(argparse.ArgumentParser):
    """argparse's errors as one line, like every other user error: the usage it prints first (15 lines for
    `saturate profile`) buried the line that names the flag. Sub-command parsers inherit the class."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrors(
        prog="saturate",
        description="ImageNet-class training from plain JPEGs at the GPU's ceiling.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in COMMANDS.values():
        importlib.import_module(module_name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse, dispatch, and turn the errors a user can fix into one line and exit status 2."""
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what a sub-command re-launches (profile --nproc)
    try:
        return int(args.func(args) or 0)
    except (OSError, ValueError, RuntimeError) as err:
        if getattr(args, "traceback", False):
            raise
        print(f"saturate {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: what was complete stays (shards, checkpoints), the rest is a rerun
        print(f"saturate {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
