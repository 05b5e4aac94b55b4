"""Train a GPT: `torchrun --nproc_per_node N launcher/pretrain.py --config configs/X.yaml [section.key=value ...]`.

A thin script: the launcher lives in megagpt/cli/train.py (installed as `megagpt-pretrain`); run with --help for
its usage. Runs as one process with plain python, or under torchrun, srun or mpirun.
"""

from megagpt.cli.train import cli

if __name__ == "__main__":
    cli()
