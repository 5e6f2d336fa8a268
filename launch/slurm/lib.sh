# shellcheck shell=bash
# Sourced by the sbatch scripts of this folder. Two entry points:
#
#   itpn_command COMMAND ARGS...   `itpn-ds COMMAND ARGS...` as the job's step (refused with several tasks
#                                  for the commands that run as one process)
#   itpn_job PYTHON_ARGS...        any Python entry, e.g. itpn_job launch/allreduce_check.py --steps 40
#
# 1. environment: interpreter, thread counts, NCCL defaults, the rendezvous (MASTER_ADDR/PORT computed once
#    per job by `python -m itpn_ds.distributed --export` unless both are set or the job has one task), and a
#    check of one task per GPU;
# 2. the step: `srun python PYTHON_ARGS...` in the background (SLURM_PROCID/LOCALID/NTASKS give each task
#    its rank); a USR1 sent to this batch shell (`#SBATCH --signal=B:USR1@GRACE`, or
#    `scancel --batch --signal=USR1 JOB`) is forwarded to srun, which forwards it to every task;
# 3. the end: status 0 ends the job; status 2 (an input error, reported on one line by the CLI) ends it
#    with 2; any other status requeues the job (`scontrol requeue`, needs `--requeue`): after USR1 the
#    program saved a checkpoint (or had none to save), otherwise a rank or a node died. The requeued job runs
#    the same command, which resumes from its newest complete checkpoint. At most ITPN_DS_MAX_REQUEUES
#    restarts (SLURM_RESTART_COUNT) whatever their cause, and at most ITPN_DS_MAX_FAILURES of them after a
#    failed step (not after USR1: a crash that repeats is a bug or a bad node, which a restart does not
#    mend), counted in the job's Comment (`itpn-ds-failures=N`, the rest of the comment kept); past either
#    the job ends with the step's status.
#
# Errors of this layer are one line (`[itpn-ds launch ...] what, and what to do`) and exit status 2.
# Environment knobs (see docs/launch.md): ITPN_DS_PYTHON, ITPN_DS_MAX_REQUEUES, ITPN_DS_MAX_FAILURES,
# ITPN_DS_STEP_WAIT_S, ITPN_DS_SRUN_ARGS and the usual OMP_NUM_THREADS, NCCL_*, DS_ACCELERATOR,
# MASTER_ADDR/MASTER_PORT (both set: they override the rendezvous).

ITPN_INPUT_ERROR_STATUS=2  # the CLI's exit status for bad input (USER_ERROR_EXIT_CODE, itpn_ds/errors.py)
# commands that run as one process (their own --workers); every other command runs one rank per task
ITPN_ONE_PROCESS_COMMANDS="make-shards verify-shards make-dense-shapes export plan-cache plan-scaling"
ITPN_STEP_PID=""
ITPN_USR1_RECEIVED=0

itpn_log() { echo "[itpn-ds launch $(date +%H:%M:%S) job ${SLURM_JOB_ID:-?}] $*" >&2; }

itpn_fail() { itpn_log "$*"; exit "$ITPN_INPUT_ERROR_STATUS"; }  # one line: what is wrong and what to do

itpn_on_usr1() {
  ITPN_USR1_RECEIVED=1
  if [ -n "$ITPN_STEP_PID" ]; then
    itpn_log "USR1: forwarding to the step (srun pid $ITPN_STEP_PID): checkpoint at the next step, then stop"
    kill -USR1 "$ITPN_STEP_PID" 2>/dev/null || true
  else
    itpn_log "USR1 before the step started: the job will requeue without running"
  fi
}

itpn_rendezvous() {  # MASTER_ADDR/MASTER_PORT: the environment's when both are set, else derived for the job
  if [ -n "${MASTER_ADDR:-}" ] && [ -n "${MASTER_PORT:-}" ]; then return; fi
  [ "${SLURM_NTASKS:-1}" != 1 ] || return 0  # a single task derives its own: no Python start here
  local exports errors
  errors=$(mktemp)
  if exports=$("$PY" -m itpn_ds.distributed --export 2>"$errors"); then
    rm -f "$errors"
    eval "$exports"
    return
  fi
  local reason
  reason=$(grep -v '^\s*$' "$errors" | tail -1)
  rm -f "$errors"
  itpn_fail "cannot derive the rendezvous (${reason:-no message}): set MASTER_ADDR and MASTER_PORT"
}

itpn_setup_env() {
  PY=${ITPN_DS_PYTHON:-python3}
  command -v "$PY" >/dev/null || itpn_fail "python '$PY' not found: set ITPN_DS_PYTHON or activate the venv"
  export PYTHONUNBUFFERED=1
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
  export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
  export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
  [[ "${ITPN_DS_MAX_REQUEUES:-20}" =~ ^[0-9]+$ ]] ||
    itpn_fail "ITPN_DS_MAX_REQUEUES='$ITPN_DS_MAX_REQUEUES': set a whole number of restarts (default 20)"
  [[ "${ITPN_DS_MAX_FAILURES:-3}" =~ ^[0-9]+$ ]] ||
    itpn_fail "ITPN_DS_MAX_FAILURES='$ITPN_DS_MAX_FAILURES': set a whole number of restarts (default 3)"
  if [ -n "${SLURM_GPUS_ON_NODE:-}" ] && [ -n "${SLURM_NTASKS_PER_NODE:-}" ] &&
     [ "$SLURM_GPUS_ON_NODE" != "$SLURM_NTASKS_PER_NODE" ]; then
    itpn_fail "--ntasks-per-node=$SLURM_NTASKS_PER_NODE but $SLURM_GPUS_ON_NODE GPUs per node: submit one task per GPU"
  fi
  itpn_rendezvous
  itpn_log "nodes $SLURM_JOB_NODELIST, $SLURM_NTASKS tasks, master ${MASTER_ADDR:-derived by the task}${MASTER_PORT:+:$MASTER_PORT}, restart ${SLURM_RESTART_COUNT:-0}"
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

itpn_requeue() {  # $1: why, $2: the job's status if it is not requeued; never returns
  local restarts=${SLURM_RESTART_COUNT:-0} limit=${ITPN_DS_MAX_REQUEUES:-20}
  if [ "$restarts" -ge "$limit" ]; then
    itpn_log "$1; not requeued: $restarts restarts reached ITPN_DS_MAX_REQUEUES=$limit (raise it to allow more)"
    exit "$2"
  fi
  # Said before the requeue: slurmctld may end this batch script as soon as the job is requeued.
  itpn_log "$1: requeueing job $SLURM_JOB_ID (restart $((restarts + 1)) of at most $limit); it resumes from its newest checkpoint"
  if ! scontrol requeue "$SLURM_JOB_ID"; then
    itpn_log "scontrol requeue failed: submit the job with --requeue (the scripts' #SBATCH --requeue)"
    exit "$2"
  fi
  exit 0
}

itpn_count_failure() {  # prints the job's failed steps, this one included, kept in its Comment across requeues
  local comment before count
  comment=$(scontrol show job "$SLURM_JOB_ID" | sed -n 's/^ *Comment=\(.*[^ ]\) *$/\1/p' | head -1)
  [ "$comment" = "(null)" ] && comment=""
  before=$(sed -n 's/.*itpn-ds-failures=\([0-9]*\).*/\1/p' <<<"$comment")
  count=$(( ${before:-0} + 1 ))
  if [ -n "$before" ]; then
    comment=${comment/itpn-ds-failures=$before/itpn-ds-failures=$count}
  else
    comment="${comment:+$comment }itpn-ds-failures=$count"
  fi
  scontrol update JobId="$SLURM_JOB_ID" Comment="$comment" >&2 ||
    itpn_log "cannot record the failure in the job's Comment: only ITPN_DS_MAX_REQUEUES bounds the restarts"
  echo "$count"
}

itpn_requeue_failure() {  # $1: why, $2: the step's status; never returns
  local failures limit=${ITPN_DS_MAX_FAILURES:-3}
  failures=$(itpn_count_failure)
  if [ "$failures" -gt "$limit" ]; then
    itpn_log "$1; not requeued: failed step $failures, past ITPN_DS_MAX_FAILURES=$limit" \
      "(a crash that repeats is a bug or a bad node: see above; raise it to allow more)"
    exit "$2"
  fi
  itpn_requeue "$1 (the job's failed step $failures; requeued after at most $limit)" "$2"
}

itpn_job() {
  trap itpn_on_usr1 USR1
  itpn_setup_env
  [ "$ITPN_USR1_RECEIVED" = 1 ] && itpn_requeue "USR1 before the step started" 1
  local rc
  itpn_run_step "$PY" "$@"
  rc=$?
  if [ "$rc" = 0 ]; then
    itpn_log "step finished with exit status 0"
    exit 0
  fi
  if [ "$rc" = "$ITPN_INPUT_ERROR_STATUS" ]; then
    itpn_log "step stopped on an input error (exit status $rc, the message above): not requeued"
    exit "$rc"
  fi
  [ "$ITPN_USR1_RECEIVED" = 1 ] && itpn_requeue "the step stopped after USR1 with status $rc" "$rc"
  itpn_requeue_failure "the step failed with status $rc (a rank or a node died, or a bug: see above)" "$rc"
}

itpn_command() {  # COMMAND ARGS...: `itpn-ds COMMAND ARGS...` as the job's step
  [ $# -ge 1 ] || itpn_fail "no itpn-ds command: sbatch [OPTIONS] SCRIPT COMMAND [ARGS...] (itpn-ds --help lists them)"
  if [[ " $ITPN_ONE_PROCESS_COMMANDS " == *" $1 "* ]] && [ "${SLURM_NTASKS:-1}" != 1 ]; then
    itpn_fail "itpn-ds $1 runs as one process, the job has $SLURM_NTASKS tasks: submit it with -n 1 (--cpus-per-task for its workers)"
  fi
  itpn_job -m itpn_ds.cli "$@"
}
