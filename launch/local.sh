#!/usr/bin/env bash
# Run an itpn-ds command (or a .py script) under torchrun or the DeepSpeed launcher, without SLURM.
#
#   launch/local.sh torchrun  [-n NPROC] -- pretrain --config CONFIG --run-dir RUN_DIR
#   launch/local.sh deepspeed [-n NPROC] [-H HOSTFILE] -- finetune --config CONFIG --run-dir RUN_DIR
#   launch/local.sh torchrun -n 2 -- launch/allreduce_check.py       (a path ending in .py runs that script)
#
# -n NPROC      processes per node (one per GPU; default 1).
# -H HOSTFILE   deepspeed only: a DeepSpeed hostfile (`host slots=G` per line) for several nodes; the
#               launcher reaches the other hosts over ssh (pdsh by default; DS_LAUNCHER picks another).
# Several nodes with torchrun: run this on every node with NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT set.
# Both launchers export RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT, which
# itpn_ds.distributed.detect() reads. ITPN_DS_PYTHON picks the interpreter (default: python3).
set -euo pipefail

usage() { sed -n '2,13p' "$0" >&2; exit 2; }

[ $# -ge 1 ] || usage
LAUNCHER=$1
shift
NPROC=1
HOSTFILE=""
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
  case "$1" in
    -n) NPROC=$2; shift 2 ;;
    -H) HOSTFILE=$2; shift 2 ;;
    *) usage ;;
  esac
done
[ "${1:-}" = "--" ] && [ $# -ge 2 ] || usage
shift
PY=${ITPN_DS_PYTHON:-python3}
export PYTHONUNBUFFERED=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

if [[ "$1" == *.py ]]; then PROGRAM=("$@"); MODULE_FLAG=()
else PROGRAM=(itpn_ds.cli "$@"); MODULE_FLAG=(--module); fi

case "$LAUNCHER" in
  torchrun)
    [ -z "$HOSTFILE" ] || { echo "local.sh: -H is for the deepspeed launcher" >&2; exit 2; }
    nodes=(--nnodes "${NNODES:-1}" --node-rank "${NODE_RANK:-0}"
           --master-addr "${MASTER_ADDR:-127.0.0.1}" --master-port "${MASTER_PORT:-29500}")
    if [ "${#MODULE_FLAG[@]}" -gt 0 ]; then MODULE_FLAG=(-m); fi
    exec "$PY" -m itpn_ds.torchrun --nproc-per-node "$NPROC" "${nodes[@]}" "${MODULE_FLAG[@]}" "${PROGRAM[@]}"
    ;;
  deepspeed)
    hosts=()
    if [ -n "$HOSTFILE" ]; then hosts=(--hostfile "$HOSTFILE"); else hosts=(--num_gpus "$NPROC"); fi
    exec "$PY" -m deepspeed.launcher.runner "${hosts[@]}" --master_port "${MASTER_PORT:-29500}" \
      --no_local_rank "${MODULE_FLAG[@]}" "${PROGRAM[@]}"
    ;;
  *) usage ;;
esac
