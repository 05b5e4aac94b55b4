"""Loss and perplexity of a megagpt checkpoint (any layout) on a split of a dataset; under torchrun, tensor parallel.

A thin script: the command lives in megagpt/cli/evaluate.py
(installed as `megagpt-evaluate`); run with --help for its usage.
"""

import sys

from megagpt.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
