"""Compare a run's final validation loss with the demo corpus's unigram entropy (what `make demo` prints last).

A thin script: the command lives in megagpt/cli/demo_report.py
(installed as `megagpt-demo-report`); run with --help for its usage.
"""

import sys

from megagpt.cli.demo_report import main

if __name__ == "__main__":
    sys.exit(main())
