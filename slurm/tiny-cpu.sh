#!/bin/bash
# The tiny model on CPU: 4 ranks (tensor parallel 2 x pipeline parallel 2, gloo) as 4 srun tasks on one node, the
# same path the GPU scripts take. Used by tests/slurm on a one-node test cluster.
#
#   sbatch slurm/tiny-cpu.sh                        # from the repository root
#   sbatch --export=ALL,PYTHON=.venv/bin/python,ITERS=40 slurm/tiny-cpu.sh
#
#SBATCH --job-name=megagpt-tiny-cpu
#SBATCH --nodes=1
#SBATCH --ntasks=4
#SBATCH --overcommit
#SBATCH --time=00:30:00
#SBATCH --output=slurm-%x-%j.out
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@60
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
# shellcheck source=slurm/common.sh
source slurm/common.sh

RUN_DIR=${RUN_DIR:-runs/tiny-cpu-slurm}
megagpt_srun --config configs/tiny-cpu.yaml \
  parallel.tp=2 parallel.pp=2 train.device=cpu train.iters="${ITERS:-20}" \
  logging.dir="$RUN_DIR/logs" logging.tensorboard=false \
  checkpoint.dir="$RUN_DIR/checkpoints" checkpoint.load=auto checkpoint.save_interval=10 \
  "$@"
