#!/usr/bin/env bash
# A real single-host SLURM cluster for development and CI: `launch/slurm_cluster.sh up|down|status`.
#
#   SLURM_NNODES=N   fake nodes c1..cN on this host, each its own slurmd on its own port (Debian's slurm-wlm
#                    is built with multiple-slurmd support); 1 = one node named after the host.
#   SLURM_PREFIX=DIR where config, state, spool, logs and pid files go (default /tmp/itpn-ds-slurm).
#
# Needs root (the daemons run as root, without systemd) and Debian's `slurm-wlm` + `munge` packages
# (.ci/run installs them). `up` is idempotent: it starts only what is not running and reconfigures when the
# node count changed. `down` stops, by pid file, only what `up` started. After `up`, export the printed
# SLURM_CONF (plain sbatch/srun also find it through /etc/slurm/slurm.conf unless a real config is there).
set -euo pipefail

PREFIX=${SLURM_PREFIX:-/tmp/itpn-ds-slurm}
NNODES=${SLURM_NNODES:-1}
CONF=$PREFIX/etc/slurm.conf
MUNGE_PID=/run/munge/munged.pid  # where munged writes its pid
export SLURM_CONF=$CONF

die() { echo "slurm_cluster: $*" >&2; exit 1; }
alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
# The pid file first: `scontrol ping` retries for about a minute when no slurmctld is listening.
controller_up() { alive "$PREFIX/run/slurmctld.pid" && scontrol ping 2>/dev/null | grep -q 'is UP'; }

node_names() {
  if [ "$NNODES" -gt 1 ]; then seq -f "c%g" 1 "$NNODES"; else hostname -s; fi
}

node_spec() {  # the NodeName expression and its ports
  if [ "$NNODES" -gt 1 ]; then echo "c[1-$NNODES] [6818-$((6817 + NNODES))]"; else echo "$(hostname -s) 6818"; fi
}

check_prerequisites() {
  [ "$(id -u)" = 0 ] || die "must run as root (slurmd/slurmctld/munged are started directly, no systemd)"
  [[ "$NNODES" =~ ^[1-9][0-9]*$ ]] || die "SLURM_NNODES must be a positive integer, got '$NNODES'"
  local missing=""
  for tool in slurmctld slurmd scontrol sinfo munged munge unmunge; do
    command -v "$tool" >/dev/null || missing="$missing $tool"
  done
  [ -z "$missing" ] || die "missing:$missing -- install Debian's packages: apt-get install -y slurm-wlm munge"
}

munge_works() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {  # the package's postinst creates no running daemon without systemd
  install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
  install -d -o munge -g munge -m 0755 /run/munge
  [ -s /etc/munge/munge.key ] || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  chown munge:munge /etc/munge/munge.key
  chmod 0400 /etc/munge/munge.key
  munge_works && return 0
  runuser -u munge -- munged
  for _ in $(seq 50); do
    if munge_works; then mkdir -p "$PREFIX/run"; cp "$MUNGE_PID" "$PREFIX/run/munged.pid"; return 0; fi
    sleep 0.2
  done
  die "munged did not come up (see /var/log/munge/munged.log)"
}

write_config() {  # prints 1 when the configuration changed
  local host geometry memory spec ports probe
  host=$(hostname -s)
  probe=$(slurmd -C | head -1)  # NodeName=... CPUs=... Boards=... ... RealMemory=...
  geometry=$(sed -e 's/^NodeName=[^ ]* //' -e 's/ RealMemory=.*//' <<<"$probe")
  memory=$(( $(sed 's/.*RealMemory=\([0-9]*\).*/\1/' <<<"$probe") * 9 / 10 / NNODES ))
  read -r spec ports <<<"$(node_spec)"
  mkdir -p "$PREFIX"/{etc,state,spool,log,run}
  cat >"$CONF.new" <<EOF
# written by launch/slurm_cluster.sh: $NNODES node(s) on $host
ClusterName=itpn-ds-local
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
# Credential lifetime; also how long a requeued job waits before it runs again (SLURM's default 120 s;
# 5 s is the least slurmctld accepts: below it, it warns and takes the default).
AuthInfo=cred_expire=${SLURM_CRED_EXPIRE:-5}
StateSaveLocation=$PREFIX/state
SlurmdSpoolDir=$PREFIX/spool/slurmd-%n
SlurmctldPidFile=$PREFIX/run/slurmctld.pid
SlurmdPidFile=$PREFIX/run/slurmd-%n.pid
SlurmctldLogFile=$PREFIX/log/slurmctld.log
SlurmdLogFile=$PREFIX/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SelectType=select/cons_tres
# A test cluster of a few jobs: schedule at once. SLURM's defaults hold a submitted batch job 3 s
# (batch_sched_delay) and look again at pending jobs, such as a requeued one whose credential has just
# expired, every 60 s (main loop) or 30 s (backfill).
SchedulerParameters=batch_sched_delay=0,sched_interval=1,bf_interval=1
SelectTypeParameters=CR_Core
ReturnToService=2
MailProg=/bin/true
InactiveLimit=0
KillWait=10
MinJobAge=300
NodeName=$spec NodeHostname=$host NodeAddr=127.0.0.1 Port=$ports $geometry RealMemory=$memory State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  if cmp -s "$CONF.new" "$CONF"; then rm -f "$CONF.new"; echo 0; else mv "$CONF.new" "$CONF"; echo 1; fi
}

link_default_config() {  # only when /etc/slurm has no real configuration of its own
  mkdir -p /etc/slurm
  if [ ! -e /etc/slurm/slurm.conf ] || [ -L /etc/slurm/slurm.conf ]; then ln -sfn "$CONF" /etc/slurm/slurm.conf; fi
}

nodes_ready() {
  local spec states
  read -r spec _ <<<"$(node_spec)"
  states=$(sinfo -h -N -n "$spec" -o %t 2>/dev/null) || return 1
  [ -n "$states" ] && ! grep -qvE '^(idle|mix|alloc)$' <<<"$states"
}

resume_down_nodes() {
  local spec
  read -r spec _ <<<"$(node_spec)"
  sinfo -h -N -n "$spec" -o '%N %t' | awk '$2 ~ /^(down|drain)/ {print $1}' |
    while read -r node; do scontrol update nodename="$node" state=resume 2>/dev/null || true; done
}

up() {
  check_prerequisites
  start_munge
  local changed
  changed=$(write_config)
  for node in $(node_names); do mkdir -p "$PREFIX/spool/slurmd-$node"; done
  link_default_config
  if ! alive "$PREFIX/run/slurmctld.pid"; then slurmctld -f "$CONF"
  elif [ "$changed" = 1 ]; then scontrol reconfigure || true; fi
  for _ in $(seq 60); do controller_up && break; sleep 0.5; done
  controller_up || { tail -30 "$PREFIX/log/slurmctld.log" >&2; die "slurmctld did not come up"; }
  for node in $(node_names); do alive "$PREFIX/run/slurmd-$node.pid" || slurmd -f "$CONF" -N "$node"; done
  for _ in $(seq 60); do
    nodes_ready && break
    resume_down_nodes
    sleep 0.5
  done
  if ! nodes_ready; then
    for node in $(node_names); do tail -20 "$PREFIX/log/slurmd-$node.log" >&2 || true; done
    sinfo -N >&2 || true
    die "nodes did not become idle"
  fi
  sinfo -N
  echo "SLURM is up with $NNODES node(s): export SLURM_CONF=$CONF"
}

stop_pidfile() {  # TERM, wait up to 10 s, then KILL; only the process named in the pid file
  [ -s "$1" ] || return 0
  local pid
  pid=$(cat "$1")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
  fi
  rm -f "$1"
}

down() {
  if [ -e "$CONF" ] && controller_up; then  # slurmstepd outlives slurmd: cancel jobs first
    scancel --partition=debug 2>/dev/null || true
    for _ in $(seq 30); do [ -z "$(squeue -h -t R,CG 2>/dev/null)" ] && break; sleep 0.5; done
  fi
  for pidfile in "$PREFIX"/run/slurmd-*.pid; do stop_pidfile "$pidfile"; done
  stop_pidfile "$PREFIX/run/slurmctld.pid"
  stop_pidfile "$PREFIX/run/munged.pid"  # only a munged that `up` started
  if [ -L /etc/slurm/slurm.conf ] && [ "$(readlink /etc/slurm/slurm.conf)" = "$CONF" ]; then
    rm -f /etc/slurm/slurm.conf
  fi
  echo "SLURM stopped"
}

status() {
  controller_up && sinfo -N && exit 0
  echo "SLURM is not running (prefix $PREFIX)"
  exit 1
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 up|down|status   (env: SLURM_NNODES, SLURM_PREFIX)" >&2; exit 2 ;;
esac
