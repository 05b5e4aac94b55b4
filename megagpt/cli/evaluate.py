"""Loss and perplexity of a megagpt checkpoint (any layout) on a split of a dataset; under torchrun, tensor parallel.

    python tools/evaluate.py --load runs/ck --data data/shakespeare/shakespeare [--split valid]
                             [--split-weights 969,30,1] [--micro-batch 4] [--max-samples N]

The split is cut as the checkpoint's run cut it: by its data.split (or --split-weights) and by the rules it
trained with (data.megatron_compat, recorded in the checkpoint), and scored once over in windows of the model's
sequence length. Prints one JSON object: loss (mean nats per token), perplexity,
tokens, samples.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from megagpt.cli import reports_user_errors
from megagpt.errors import UserError

SPLITS = ("train", "valid", "test")


@reports_user_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", required=True, help="a checkpoint folder (step_N) or a checkpoint.dir")
    parser.add_argument("--data", required=True, help="dataset prefix (PREFIX.bin / PREFIX.idx)")
    parser.add_argument("--split", choices=SPLITS, default="valid")
    parser.add_argument(
        "--split-weights",
        default=None,
        help="train,valid,test shares (default: the data.split the checkpoint's run trained with)",
    )
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--max-samples", type=int, default=None, help="score at most this many windows")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    args = parser.parse_args(argv)
    import numpy as np

    from megagpt.checkpoint.paths import open_checkpoint
    from megagpt.data.gpt_dataset import GPTDataset, split_documents
    from megagpt.data.indexed_dataset import IndexedDataset
    from megagpt.inference import inference_context, load_for_inference, mean_loss

    if args.micro_batch < 1 or (args.max_samples is not None and args.max_samples < 1):
        raise UserError("--micro-batch and --max-samples must be at least 1")
    with inference_context(args.device) as ctx:
        model, cfg = load_for_inference(args.load, ctx)
        indexed = IndexedDataset(args.data)
        # The split the run trained with, by the rules it trained with (recorded in the checkpoint): Megatron's
        # (sequences, cumulative rounding) or megagpt's earlier ones (documents), so valid is what it validated on.
        trained = open_checkpoint(args.load).meta.trained_data_rules()
        compat, split_weights = trained["megatron_compat"], args.split_weights or trained["split"]
        unit = "sequence" if compat else "document"
        offsets = indexed.sequence_token_offsets() if compat else indexed.document_token_offsets()
        documents = split_documents(len(offsets) - 1, split_weights, compat)[SPLITS.index(args.split)]
        split_tokens = int(np.int64(offsets[documents[1]]) - np.int64(offsets[documents[0]]))
        samples = (split_tokens - 1) // cfg.model.seq_length  # one pass over the split
        if samples < 1:
            raise UserError(
                f"the {args.split} split of {args.data} holds {split_tokens} tokens, fewer than one window of "
                f"{cfg.model.seq_length + 1}; choose another --split or --split-weights"
            )
        dataset = GPTDataset(
            indexed, documents, samples, cfg.model.seq_length, cfg.train.seed, name=args.split, unit=unit
        )
        loss, tokens = mean_loss(model, dataset, args.micro_batch, args.max_samples)
        if ctx.rank == 0:
            result = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": tokens,
                      "samples": math.ceil(tokens / cfg.model.seq_length), "split": args.split}  # fmt: skip
            print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
