"""Convert a megagpt checkpoint (any layout) into a Hugging Face transformers model folder.

A thin script: the command lives in megagpt/cli/convert_to_hf.py
(installed as `megagpt-convert-to-hf`); run with --help for its usage.
"""

import sys

from megagpt.cli.convert_to_hf import main

if __name__ == "__main__":
    sys.exit(main())
