"""What a config costs on a layout, without running it: parameters (total and per rank), memory per GPU

A thin script: the command lives in megagpt/cli/estimate.py
(installed as `megagpt-estimate`); run with --help for its usage.
"""

import sys

from megagpt.cli.estimate import main

if __name__ == "__main__":
    sys.exit(main())
