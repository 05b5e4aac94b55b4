"""Compare a run's final validation loss with the demo corpus's unigram entropy (what `make demo` prints last).

A model that only learned token frequencies would score the unigram entropy; a language model that uses
context scores well below it. Exits with status 1 when the run did not get below.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run", required=True, help="the run's logging.dir (holds metrics.jsonl)")
    parser.add_argument("--data", required=True, help="the folder tools/prepare_demo_data.py wrote")
    args = parser.parse_args(argv)

    metrics = Path(args.run) / "metrics.jsonl"
    stats = Path(args.data) / "shakespeare.stats.json"
    for path in (metrics, stats):
        if not path.is_file():
            print(f"error: {path} does not exist; run `make demo` from the start", file=sys.stderr)
            return 2
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    evals = [row for row in rows if "val_loss" in row]
    if not evals:
        print(f"error: {metrics} has no validation loss; set train.eval_iters above 0", file=sys.stderr)
        return 2
    val_loss = evals[-1]["val_loss"]
    entropy = json.loads(stats.read_text())["unigram_entropy_nats"]
    print(
        f"demo: final validation loss {val_loss:.3f} nats/token (perplexity {math.exp(val_loss):.0f}) after "
        f"{evals[-1]['step']} steps; unigram entropy of the corpus {entropy:.3f} nats/token "
        f"(perplexity {math.exp(entropy):.0f}); the model is {entropy - val_loss:.3f} nats/token below it"
    )
    return 0 if val_loss < entropy else 1


if __name__ == "__main__":
    sys.exit(main())
