"""PNG figures of training runs: curves from metrics.jsonl (one run or several overlaid) and a profiled step's
pipeline timeline.

A thin script: the command lives in megagpt/cli/plot.py (installed as `megagpt-plot`); run with --help for its usage.
"""

import sys

from megagpt.cli.plot import main

if __name__ == "__main__":
    sys.exit(main())
