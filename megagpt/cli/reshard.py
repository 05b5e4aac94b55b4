"""Rewrite a checkpoint for another parallel layout, offline (no GPUs, no processes).

    python tools/reshard.py --load CKPT --out DIR --tp 1 --pp 1 [--vpp 1] [--dp 1] [--zero 0]

CKPT is a checkpoint folder (step_N) or a checkpoint.dir (its latest is taken). The model weights, Adam's moments
and the fp32 main weights are re-split for the new layout into DIR/step_N, and DIR/latest points to it; train
from it with checkpoint.load=DIR and the new parallel.* settings. (Training can also load the original directly:
resharding happens on load too. This tool does it once, ahead of time.)
"""

from __future__ import annotations

import argparse
import sys

from megagpt.cli import reports_user_errors
from megagpt.log import setup_logging


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", required=True, help="the checkpoint folder, or a checkpoint.dir")
    parser.add_argument("--out", required=True, help="the checkpoint.dir to write the resharded checkpoint into")
    parser.add_argument("--tp", type=int, required=True)
    parser.add_argument("--pp", type=int, required=True)
    parser.add_argument("--vpp", type=int, default=1)
    parser.add_argument("--dp", type=int, default=1)
    parser.add_argument("--zero", type=int, default=0)
    return parser.parse_args(argv)


@reports_user_errors
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    from megagpt.checkpoint.reshard import check_layout_args, reshard_checkpoint

    check_layout_args(args.tp, args.pp, args.vpp, args.dp, args.zero)
    reshard_checkpoint(args.load, args.out, args.tp, args.pp, args.vpp, args.dp, args.zero)
    return 0


if __name__ == "__main__":
    sys.exit(main())
