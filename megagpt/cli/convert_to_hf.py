"""Convert a megagpt checkpoint (any layout) into a Hugging Face transformers model folder.

    python tools/convert_to_hf.py --load runs/ck --out hf/my-gpt [--dtype fp32|bf16|fp16]

All-dense models become GPT2LMHeadModel, models with local layers GPTNeoForCausalLM (attention_types and
window_size set so its local layers see what ours see). Writes config.json, model.safetensors,
generation_config.json and, for GPT-2's vocabulary, the GPT-2 tokenizer files. What is mapped, and the one thing
refused (a non-zero query bias in a model with local layers), is described in megagpt/hf.py.
"""

from __future__ import annotations

import argparse
import sys

from megagpt.cli import reports_user_errors

DTYPES = ("fp32", "bf16", "fp16")


@reports_user_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", required=True, help="a checkpoint folder (step_N) or a checkpoint.dir")
    parser.add_argument("--out", required=True, help="the transformers model folder to write")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32", help="dtype of the saved weights")
    args = parser.parse_args(argv)
    from megagpt.hf import checkpoint_to_hf_folder
    from megagpt.model.facts import COMPUTE_DTYPES

    out = checkpoint_to_hf_folder(args.load, args.out, COMPUTE_DTYPES[args.dtype])
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
