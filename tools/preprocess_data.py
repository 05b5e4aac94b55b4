"""Tokenize raw text into a Megatron-compatible indexed dataset (PREFIX.bin / PREFIX.idx).

A thin script: the command lives in megagpt/cli/preprocess_data.py
(installed as `megagpt-preprocess-data`); run with --help for its usage.
"""

import sys

from megagpt.cli.preprocess_data import main

if __name__ == "__main__":
    sys.exit(main())
