#!/bin/bash
# GPT-3 XL 1.3B on 8-GPU nodes: data parallel over every GPU (tp 1, pp 1), bf16, ZeRO-1 (the model and its
# optimizer state fit one GPU; ZeRO-1 spreads Adam's state over dp). 1 node by default.
#
#   DATA=data/pile_text_document sbatch slurm/gpt3-1.3b.sh        # from the repository root
#   DATA=... sbatch --nodes=4 slurm/gpt3-1.3b.sh
#   DRY_RUN=1 SLURM_NTASKS=8 DATA=x bash slurm/gpt3-1.3b.sh       # validate on a laptop
#
# One srun task per GPU, as slurm/gpt3-175b.sh explains; preemption and the time limit: slurm/common.sh.
#
#SBATCH --job-name=gpt3-1.3b
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --mem=0
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --output=slurm-%x-%j.out
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@300
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
# shellcheck source=slurm/common.sh
source slurm/common.sh

: "${DATA:?set DATA to a dataset prefix from tools/preprocess_data.py, or a blend \"[0.7, a, 0.3, b]\"}"
RUN_DIR=${RUN_DIR:-runs/gpt3-1.3b}
mkdir -p "$RUN_DIR"
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# srun stopped inheriting sbatch's --cpus-per-task in Slurm 22.05: give each rank its cores explicitly.
export SRUN_CPUS_PER_TASK=${SLURM_CPUS_PER_TASK:-1}

megagpt_srun --config configs/gpt3-1.3b.yaml \
  parallel.tp=1 parallel.pp=1 parallel.zero=1 \
  data.path="$DATA" \
  checkpoint.dir="$RUN_DIR/checkpoints" checkpoint.load=auto checkpoint.save_interval=1000 \
  logging.dir="$RUN_DIR/logs" \
  "$@"
