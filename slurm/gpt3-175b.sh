#!/bin/bash
# GPT-3 175B on 8-GPU nodes: tensor parallel 8 inside each node, pipeline parallel 16 across nodes, data parallel
# over the rest (dp = nodes / 16: 128 nodes -> dp 8, 1024 GPUs), bf16, sequence parallelism, selective
# recomputation, ZeRO-1. tools/estimate.py gives the memory per GPU of this layout.
#
#   DATA=data/pile_text_document sbatch slurm/gpt3-175b.sh        # from the repository root
#   DATA=... sbatch --nodes=256 slurm/gpt3-175b.sh                # any multiple of 16 nodes
#   DRY_RUN=1 SLURM_NTASKS=1024 DATA=x bash slurm/gpt3-175b.sh    # validate the layout on a laptop
#
# One srun task per GPU (8 per node) runs launcher/pretrain.py, which reads its rank from Slurm (SLURM_PROCID,
# SLURM_LOCALID; master: the first node, port from the job id). Chosen over one torchrun per node because srun
# then owns every rank's process: it labels their output, delivers Slurm's signals to each of them, and kills
# the whole step when one rank fails (--kill-on-bad-exit). Preemption and the time limit: see slurm/common.sh.
#
#SBATCH --job-name=gpt3-175b
#SBATCH --nodes=128
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --mem=0
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --output=slurm-%x-%j.out
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@600
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
# shellcheck source=slurm/common.sh
source slurm/common.sh

: "${DATA:?set DATA to a dataset prefix from tools/preprocess_data.py, or a blend \"[0.7, a, 0.3, b]\"}"
RUN_DIR=${RUN_DIR:-runs/gpt3-175b}
TP=8
PP=16
NODES=${SLURM_JOB_NUM_NODES:-$(( ${SLURM_NTASKS:-1024} / 8 ))}
if (( NODES % PP != 0 )); then
  echo "gpt3-175b.sh: $NODES nodes; use a multiple of $PP (pipeline parallel $PP, one node per stage)" >&2
  exit 2
fi
mkdir -p "$RUN_DIR"

# One hardware work queue per GPU keeps each layer's tensor-parallel communication ahead of the compute that
# waits for it (Megatron's requirement with sequence parallelism).
export CUDA_DEVICE_MAX_CONNECTIONS=1
# A failed or timed-out collective aborts the job (and frees the nodes) instead of hanging it.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# srun stopped inheriting sbatch's --cpus-per-task in Slurm 22.05: give each rank its cores explicitly.
export SRUN_CPUS_PER_TASK=${SLURM_CPUS_PER_TASK:-1}
# Site-specific NCCL settings (NCCL_SOCKET_IFNAME, NCCL_IB_HCA, ...) are inherited from the submitting shell.

megagpt_srun --config configs/gpt3-175b.yaml \
  parallel.tp="$TP" parallel.pp="$PP" parallel.sequence_parallel=true parallel.recompute=selective parallel.zero=1 \
  data.path="$DATA" \
  checkpoint.dir="$RUN_DIR/checkpoints" checkpoint.load=auto checkpoint.save_interval=500 \
  logging.dir="$RUN_DIR/logs" \
  "$@"
