"""Generate text from a megagpt checkpoint (any layout), with a key/value cache; under torchrun, tensor parallel.

A thin script: the command lives in megagpt/cli/generate.py
(installed as `megagpt-generate`); run with --help for its usage.
"""

import sys

from megagpt.cli.generate import main

if __name__ == "__main__":
    sys.exit(main())
