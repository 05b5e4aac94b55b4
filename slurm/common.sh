# shellcheck shell=bash
# Shared by the sbatch scripts in slurm/ (sourced, not run). Submit them from the repository root; their output
# goes to slurm-<job name>-<job id>.out there (Slurm does not create folders for it).
#
# megagpt_srun ARGS...   runs `python launcher/pretrain.py ARGS...` as one srun task per rank (the launcher
#                        reads its rank from SLURM_PROCID etc., megagpt/launch.py), and handles preemption:
#   - Slurm signals this batch shell before the time limit (#SBATCH --signal=B:USR1@...) or on preemption
#     (SIGTERM); the trap forwards SIGUSR1 to srun, which passes it to every rank;
#   - the ranks save a checkpoint at the end of the current step and exit cleanly;
#   - the job is requeued, and the next run resumes from the checkpoint (checkpoint.load=auto).
# With DRY_RUN=1 it only validates the config for SLURM_NTASKS ranks (launcher/pretrain.py --dry-run).

PYTHON=${PYTHON:-python}
# Extra srun options: an array set by a script, or a string from the environment ("--exclusive --mpi=pmix").
if [[ "$(declare -p SRUN_ARGS 2>/dev/null)" != "declare -a"* ]]; then
  read -ra SRUN_ARGS <<< "${SRUN_ARGS:-}"
fi

megagpt_srun() {
  if [[ -n "${DRY_RUN:-}" ]]; then  # check the config and layout for this job's ranks, start nothing
    "$PYTHON" launcher/pretrain.py --dry-run --world-size "${SLURM_NTASKS:?DRY_RUN needs SLURM_NTASKS}" "$@"
    return
  fi
  local requeue=0 status=0 srun_pid
  # shellcheck disable=SC2317  # reached through the trap
  on_stop_signal() {
    echo "$(date +%T) job ${SLURM_JOB_ID:-?}: stop signal, the ranks save a checkpoint and exit"
    requeue=1
    kill -USR1 "$srun_pid" 2>/dev/null || true
  }
  trap on_stop_signal USR1 TERM
  srun --kill-on-bad-exit=1 "${SRUN_ARGS[@]}" "$PYTHON" launcher/pretrain.py "$@" &
  srun_pid=$!
  # `wait` returns early when a trapped signal arrives: wait again until srun itself has exited.
  while true; do
    wait "$srun_pid" && status=0 || status=$?
    kill -0 "$srun_pid" 2>/dev/null || break
  done
  trap - USR1 TERM
  if (( requeue )); then
    echo "$(date +%T) job ${SLURM_JOB_ID:-?}: requeueing to resume from the checkpoint"
    scontrol requeue "${SLURM_JOB_ID}" || true
  fi
  return "$status"
}
