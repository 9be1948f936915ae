"""`python -m training` / `torchrun ... -m training`: the trainer's command line (training/cli.py)."""

import sys

from training.cli import main

sys.exit(main())
