# Sourced by cluster/slurm/*.sbatch: where the project is, which Python, and the requeue protocol.
#
# Requeue protocol (preemption warning, time limit):
#   1. `#SBATCH --signal=B:USR1@180` makes SLURM send SIGUSR1 to this batch shell 180 s before the time limit
#      (or send it yourself: `scancel --batch --signal=USR1 JOBID`).
#   2. The trap asks the training ranks on every node (and only them) to stop: `python -m cluster.signal_ranks`.
#      The training loop saves a checkpoint at the next step boundary, writes checkpoints/latest, exits 0.
#   3. When the step has ended, the script runs `scontrol requeue $SLURM_JOB_ID`; the job waits in the queue
#      and starts again with the same arguments; resume=auto (the default) continues from checkpoints/latest.
#   `scontrol requeue JOBID` / preemption with PreemptMode=REQUEUE from outside send SIGTERM to every process of
#   the job instead: the ranks save at a step boundary reached within MT_STOP_GRACE_S (default 15 s) and exit
#   143 (SLURM waits KillWait seconds before SIGKILL; it requeues whatever the exit status) and the job restarts. A job stops requeueing itself after MT_MAX_RESTARTS restarts (default 50).
# shellcheck shell=bash

mt_log() { printf '[%s] %s: %s\n' "$(date '+%F %T')" "${SLURM_JOB_NAME:-job}" "$*"; }

# The repository: $MT_REPO, else the directory sbatch was called from (SLURM copies the script elsewhere).
MT_REPO=${MT_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
if [ ! -f "$MT_REPO/cluster/slurm/common.sh" ]; then
  echo "error: $MT_REPO is not the ManagerTower repository; submit from the repository root or export MT_REPO=/path/to/it" >&2
  exit 2
fi
if [ -z "${MT_PYTHON:-}" ]; then
  if [ -x "$MT_REPO/.venv/bin/python" ]; then MT_PYTHON=$MT_REPO/.venv/bin/python; else MT_PYTHON=$(command -v python3); fi
fi
export MT_REPO MT_PYTHON
export PATH="$(dirname "$MT_PYTHON"):$PATH"
export PYTHONPATH="$MT_REPO${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
export MT_LAUNCH_TAG=${SLURM_JOB_ID:-$$}
# A rank is a process with LOCAL_RANK (cluster.signal_ranks); this shell and srun must not look like one.
unset LOCAL_RANK RANK WORLD_SIZE LOCAL_WORLD_SIZE MT_TRAINER_PROCESS
MT_MAX_RESTARTS=${MT_MAX_RESTARTS:-50}

mt_job_banner() {
  mt_log "job ${SLURM_JOB_ID:-?}${SLURM_ARRAY_TASK_ID:+ array task $SLURM_ARRAY_TASK_ID} restart ${SLURM_RESTART_COUNT:-0}" \
         "on ${SLURM_JOB_NUM_NODES:-1} node(s): ${SLURM_JOB_NODELIST:-$(hostname)}; python $MT_PYTHON"
}

# Run on every node of the job, one process each (srun when the job has several nodes, here otherwise).
mt_on_every_node() {
  if [ "${SLURM_JOB_NUM_NODES:-1}" -gt 1 ]; then
    srun --overlap --nodes="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 --kill-on-bad-exit=0 "$@"
  else
    "$@"
  fi
}

_mt_stop_requested=0
_mt_terminated=0
_mt_on_usr1() {
  mt_log "SIGUSR1: asking the ranks to save a checkpoint and stop; the job will be requeued"
  _mt_stop_requested=1
  mt_on_every_node "$MT_PYTHON" -m cluster.signal_ranks --tag "$MT_LAUNCH_TAG" --signal USR1 || true
}
_mt_on_term() {
  # SLURM is cancelling or requeueing the job: it signals the ranks itself; keep waiting while they save.
  mt_log "SIGTERM: the ranks are saving a checkpoint before the job ends"
  _mt_terminated=1
}

# mt_run_requeueable CMD...: run CMD (an srun step) and requeue the job when it was asked to stop for a requeue.
mt_run_requeueable() {
  trap _mt_on_usr1 USR1
  trap _mt_on_term TERM
  "$@" &
  local step_pid=$! status
  # `wait` returns early when a trapped signal arrives; wait again until the step has really ended.
  while :; do
    wait "$step_pid"; status=$?
    kill -0 "$step_pid" 2>/dev/null || break
  done
  trap - USR1 TERM
  if [ "$_mt_stop_requested" = 1 ] && [ "$_mt_terminated" = 0 ]; then
    if [ "${SLURM_RESTART_COUNT:-0}" -ge "$MT_MAX_RESTARTS" ]; then
      mt_log "not requeueing: already restarted ${SLURM_RESTART_COUNT} times (MT_MAX_RESTARTS=$MT_MAX_RESTARTS)"
      return 1
    fi
    mt_log "step ended with status $status after SIGUSR1; requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    return 0
  fi
  mt_log "step ended with status $status"
  return "$status"
}
