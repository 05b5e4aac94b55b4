"""Rewrite a checkpoint for another parallel layout, offline (no GPUs, no processes).

A thin script: the command lives in megagpt/cli/reshard.py
(installed as `megagpt-reshard`); run with --help for its usage.
"""

import sys

from megagpt.cli.reshard import main

if __name__ == "__main__":
    sys.exit(main())
