"""Convert a Hugging Face GPT-2 or GPT-Neo model folder into a megagpt checkpoint for any layout.

A thin script: the command lives in megagpt/cli/convert_from_hf.py
(installed as `megagpt-convert-from-hf`); run with --help for its usage.
"""

import sys

from megagpt.cli.convert_from_hf import main

if __name__ == "__main__":
    sys.exit(main())
