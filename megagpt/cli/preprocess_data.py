"""Tokenize raw text into a Megatron-compatible indexed dataset (PREFIX.bin / PREFIX.idx).

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus --workers 8
    python tools/preprocess_data.py --input a.txt --input b.txt --output-prefix data/ab

.jsonl: one JSON object per line, the text under --json-key (default "text"), one document per line.
.txt:   the whole file is one document.
Each document gets the GPT-2 end-of-document token (50256) appended unless --no-append-eod. Token ids are stored
as uint16, readable by Megatron-LM's IndexedDataset. Nothing is written unless every document succeeds.

By default the tokens are Megatron's (tools/preprocess_data.py of Megatron-LM, without --split-sentences): a
literal "<|endoftext|>" in the text is the end-of-text token, and an empty text is a document with no tokens
and no sequence. --no-megatron-compat keeps megagpt's earlier rule: the literal string is ordinary text, and an
empty text is one sequence holding only the end-of-document token.
"""

from __future__ import annotations

import argparse
import sys

from megagpt.cli import reports_user_errors
from megagpt.data.preprocess import preprocess


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--input", action="append", required=True, metavar="FILE", help=".jsonl or .txt; repeat for several files"
    )
    parser.add_argument("--output-prefix", required=True, metavar="P", help="writes P.bin and P.idx")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes (default 1)")
    parser.add_argument("--json-key", default="text", help="field of each .jsonl object holding the text")
    parser.add_argument(
        "--append-eod",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="append <|endoftext|> (50256) to every document (default on)",
    )
    parser.add_argument(
        "--megatron-compat",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Megatron's tokens for a literal <|endoftext|> and for empty texts (default on; see above)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser.parse_args(argv)


@reports_user_errors
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.workers < 1:
        print("error: --workers must be at least 1.", file=sys.stderr)
        return 2
    summary = preprocess(
        args.input,
        args.output_prefix,
        workers=args.workers,
        json_key=args.json_key,
        append_eod=args.append_eod,
        progress=not args.no_progress,
        megatron_compat=args.megatron_compat,
    )
    print(f"documents: {summary.documents}")
    print(f"tokens:    {summary.tokens}")
    print(f"seconds:   {summary.seconds:.2f}")
    print(f"output:    {summary.prefix}.bin, {summary.prefix}.idx")
    return 0


if __name__ == "__main__":
    sys.exit(main())
