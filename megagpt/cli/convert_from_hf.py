"""Convert a Hugging Face GPT-2 or GPT-Neo model folder into a megagpt checkpoint for any layout.

    python tools/convert_from_hf.py --hf hf/gpt2 --out runs/gpt2 [--tp 2 --pp 2 --vpp 1 --dp 1 --zero 0]
    torchrun --nproc_per_node 4 launcher/pretrain.py --config runs/gpt2/config.yaml checkpoint.load=runs/gpt2 \\
        checkpoint.dir=runs/gpt2-tuned data.path=...          # continue training it

Writes runs/gpt2/step_00000000 (weights only: Adam starts from zero moments) and runs/gpt2/config.yaml with the
model section (and the parallel layout) to train it with. Nothing is downloaded: --hf is a local folder.
"""

from __future__ import annotations

import argparse
import sys

from megagpt.cli import reports_user_errors


@reports_user_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf", required=True, help="a transformers model folder (config.json + weights)")
    parser.add_argument("--out", required=True, help="the checkpoint.dir to write")
    for name, default in (("tp", 1), ("pp", 1), ("vpp", 1), ("dp", 1), ("zero", 0)):
        parser.add_argument(f"--{name}", type=int, default=default)
    args = parser.parse_args(argv)
    from megagpt.checkpoint.reshard import check_layout_args
    from megagpt.hf import hf_folder_to_checkpoint
    from megagpt.log import setup_logging

    setup_logging()
    check_layout_args(args.tp, args.pp, args.vpp, args.dp, args.zero)
    folder = hf_folder_to_checkpoint(args.hf, args.out, args.tp, args.pp, args.vpp, args.dp, args.zero)
    print(f"wrote {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
