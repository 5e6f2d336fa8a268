# shellcheck shell=bash
# Sourced by the sbatch scripts of this folder. One function does the job:
#
#   itpn_job PYTHON_ARGS...   e.g.  itpn_job -m itpn_ds.cli pretrain --config c.yaml --run-dir runs/x
#
# 1. environment: interpreter, thread counts, NCCL defaults, the rendezvous (MASTER_ADDR/PORT computed once
#    per job by `python -m itpn_ds.distributed --export`), and a check of one task per GPU;
# 2. the step: `srun python PYTHON_ARGS...` in the background (SLURM_PROCID/LOCALID/NTASKS give each task
#    its rank); a USR1 sent to this batch shell (`#SBATCH --signal=B:USR1@GRACE`, or
#    `scancel --batch --signal=USR1 JOB`) is forwarded to srun, which forwards it to every task;
# 3. the end: if the step exits with the engine's preemption code (a checkpoint was saved), the job
#    requeues itself (`scontrol requeue`, needs `--requeue`); the requeued job runs the same command,
#    which resumes from the run directory. Any other code is the job's exit code.
#
# Environment knobs (see docs/launch.md): ITPN_DS_PYTHON, ITPN_DS_MAX_REQUEUES, ITPN_DS_STEP_WAIT_S,
# ITPN_DS_SRUN_ARGS, ITPN_DS_REQUEUE_EXIT_CODE (for a program other than the engine), and the usual
# OMP_NUM_THREADS, NCCL_*, DS_ACCELERATOR, MASTER_ADDR/MASTER_PORT (these two override the rendezvous).

ITPN_STEP_PID=""
ITPN_USR1_PENDING=0

itpn_log() { echo "[itpn-ds launch $(date +%H:%M:%S) job ${SLURM_JOB_ID:-?}] $*" >&2; }

itpn_on_usr1() {
  if [ -n "$ITPN_STEP_PID" ]; then
    itpn_log "USR1: forwarding to the step (srun pid $ITPN_STEP_PID): checkpoint at the next step, then stop"
    kill -USR1 "$ITPN_STEP_PID" 2>/dev/null || true
  else
    itpn_log "USR1 before the step started: the job will requeue without running"
    ITPN_USR1_PENDING=1
  fi
}

itpn_setup_env() {
  PY=${ITPN_DS_PYTHON:-python3}
  command -v "$PY" >/dev/null || { itpn_log "python '$PY' not found: set ITPN_DS_PYTHON or activate the venv"; exit 2; }
  export PYTHONUNBUFFERED=1
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
  export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
  export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
  local rendezvous
  rendezvous=$("$PY" -m itpn_ds.distributed --export) || { itpn_log "cannot derive the rendezvous"; exit 2; }
  eval "$rendezvous"
  if [ -n "${SLURM_GPUS_ON_NODE:-}" ] && [ -n "${SLURM_NTASKS_PER_NODE:-}" ] &&
     [ "$SLURM_GPUS_ON_NODE" != "$SLURM_NTASKS_PER_NODE" ]; then
    itpn_log "one task per GPU expected: --ntasks-per-node=$SLURM_NTASKS_PER_NODE but $SLURM_GPUS_ON_NODE GPUs per node"
    exit 2
  fi
  itpn_log "nodes $SLURM_JOB_NODELIST, $SLURM_NTASKS tasks, master $MASTER_ADDR:$MASTER_PORT, restart ${SLURM_RESTART_COUNT:-0}"
}

itpn_requeue_exit_code() {  # the engine's documented "checkpoint saved, please requeue" exit status
  if [ -n "${ITPN_DS_REQUEUE_EXIT_CODE:-}" ]; then echo "$ITPN_DS_REQUEUE_EXIT_CODE"; return; fi
  "$PY" -c 'from itpn_ds.engine.preemption import PREEMPTED_EXIT_CODE; print(PREEMPTED_EXIT_CODE)'
}

itpn_run_step() {  # srun "$@" with USR1 forwarding; returns the step's exit status
  # Not --kill-on-bad-exit: it would kill the ranks still exiting after the first one returned the
  # preemption code, and srun would report their SIGTERM instead. With --wait, the step's status is the
  # highest task status, and a rank left hanging after another one crashed is killed after the wait.
  # shellcheck disable=SC2086  # ITPN_DS_SRUN_ARGS is a list of extra srun options
  srun --wait="${ITPN_DS_STEP_WAIT_S:-120}" ${ITPN_DS_SRUN_ARGS:-} "$@" &
  ITPN_STEP_PID=$!
  local rc
  while :; do
    wait "$ITPN_STEP_PID"
    rc=$?
    kill -0 "$ITPN_STEP_PID" 2>/dev/null || break  # still running: the wait was cut short by a signal
  done
  ITPN_STEP_PID=""
  return "$rc"
}

itpn_requeue() {
  local restarts=${SLURM_RESTART_COUNT:-0} limit=${ITPN_DS_MAX_REQUEUES:-20}
  if [ "$restarts" -ge "$limit" ]; then
    itpn_log "not requeueing: $restarts restarts reached ITPN_DS_MAX_REQUEUES=$limit"
    exit 3
  fi
  itpn_log "requeueing job $SLURM_JOB_ID (restart $((restarts + 1))); it resumes from its last checkpoint"
  scontrol requeue "$SLURM_JOB_ID" || { itpn_log "scontrol requeue failed (was the job submitted with --requeue?)"; exit 3; }
  exit 0
}

itpn_step_was_preempted() {  # $1 = the step's exit status
  [ "$1" != 0 ] || return 1
  local code
  code=$(itpn_requeue_exit_code) || { itpn_log "cannot read the engine's preemption exit code; not requeueing"; return 1; }
  [ "$1" = "$code" ]
}

itpn_job() {
  trap itpn_on_usr1 USR1
  itpn_setup_env
  [ "$ITPN_USR1_PENDING" = 1 ] && itpn_requeue
  local rc
  itpn_run_step "$PY" "$@"
  rc=$?
  itpn_step_was_preempted "$rc" && itpn_requeue
  itpn_log "step finished with exit status $rc"
  exit "$rc"
}
