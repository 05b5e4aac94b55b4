"""Generate text from a megagpt checkpoint (any layout), with a key/value cache; under torchrun, tensor parallel.

    python tools/generate.py --load runs/ck --prompt "To be, or not to be" --max-new-tokens 40 --top-k 40 --seed 1
    python tools/generate.py --load runs/ck --prompt-ids 464,2068 --max-new-tokens 20 --greedy --output-ids
    torchrun --nproc_per_node 2 tools/generate.py --load runs/ck --prompt "Hello" --max-new-tokens 20 --greedy

Sampling (the default) draws from softmax(logits / temperature), cut to the top_k most likely tokens and to the
smallest set reaching top_p; --greedy takes the argmax. Generation stops after --max-new-tokens, or at the
end-of-text token (50256) when the model has GPT-2's vocabulary, unless --ignore-eos. --prompt needs GPT-2's
vocabulary (the model's vocab_size 50257); --prompt-ids works with any. Rank 0 prints the text, or with
--output-ids the prompt and new token ids as one JSON list.
"""

from __future__ import annotations

import argparse
import json
import sys

from megagpt.cli import reports_user_errors
from megagpt.errors import UserError

EOT = 50256


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", required=True, help="a checkpoint folder (step_N) or a checkpoint.dir")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="text, tokenized with GPT-2's BPE")
    prompt.add_argument("--prompt-ids", help="comma-separated token ids")
    parser.add_argument("--max-new-tokens", type=int, required=True)
    parser.add_argument("--greedy", action="store_true", help="take the most likely token (no sampling)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    parser.add_argument("--top-p", type=float, default=1.0, help="sample among the most likely tokens up to this mass")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-ids", action="store_true", help="print the token ids as a JSON list")
    parser.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-text token")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    return parser.parse_args(argv)


def prompt_ids(args, vocab_size: int) -> list[int]:
    if args.prompt_ids is not None:
        try:
            ids = [int(t) for t in args.prompt_ids.split(",") if t.strip()]
        except ValueError:
            raise UserError(f"--prompt-ids {args.prompt_ids!r} must be comma-separated integers") from None
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if not ids or bad:
            raise UserError(f"--prompt-ids needs at least one id in [0, {vocab_size}); got {ids}")
        return ids
    if vocab_size != 50257:
        raise UserError(f"--prompt needs GPT-2's vocabulary, but the model has {vocab_size} tokens; use --prompt-ids")
    from megagpt.data.tokenizer import get_tokenizer

    ids = get_tokenizer().encode_ordinary(args.prompt)
    if not ids:
        raise UserError("--prompt is empty; give some text to continue")
    return ids


@reports_user_errors
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from megagpt.inference import inference_context, load_for_inference
    from megagpt.model.generation import generate

    if args.max_new_tokens < 0 or not 0 < args.top_p <= 1 or args.top_k < 0:
        raise UserError("--max-new-tokens and --top-k must be >= 0 and --top-p in (0, 1]")
    with inference_context(args.device) as ctx:
        model, cfg = load_for_inference(args.load, ctx, args.precision)
        prompt = torch.tensor([prompt_ids(args, cfg.model.vocab_size)], device=ctx.device)
        eos = None if args.ignore_eos or cfg.model.vocab_size != 50257 else EOT  # GPT-2's vocabulary only
        ids = generate(
            model, prompt, args.max_new_tokens, greedy=args.greedy, temperature=args.temperature,
            top_k=args.top_k, top_p=args.top_p, seed=args.seed, eos_id=eos,
        )[0].tolist()  # fmt: skip
        if ctx.rank == 0:
            if args.output_ids or cfg.model.vocab_size != 50257:
                print(json.dumps(ids))
            else:
                from megagpt.data.tokenizer import get_tokenizer

                print(get_tokenizer().decode(ids))
    return 0


if __name__ == "__main__":
    sys.exit(main())
