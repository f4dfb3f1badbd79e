#!/usr/bin/env bash
# A single-node SLURM cluster on localhost for the launch tests: `cluster.sh start|stop|status`.
#
# Everything lives in a private state directory ($BIGNLP_SLURM_DIR, default /tmp/bignlp-slurm):
# slurm.conf, a munge key and socket, spool, logs, pid files. Daemons listen on unusual ports, so
# a real SLURM or munge on the same machine is left alone. Clients find the cluster through
# `SLURM_CONF=$BIGNLP_SLURM_DIR/slurm.conf` (the pytest fixture sets it).
#
# Needs root (slurmd runs jobs as their owner; SlurmUser=root keeps it simple). Installs Debian's
# `slurm-wlm` and `munge` with apt-get when `sbatch` is missing. Exit codes: 0 ok, 3 cannot run
# here (not root, no apt-get, install failed) so callers can skip with the printed reason, 1 the
# cluster did not come up.
set -euo pipefail

DIR="${BIGNLP_SLURM_DIR:-/tmp/bignlp-slurm}"
CTLD_PORT="${BIGNLP_SLURMCTLD_PORT:-16817}"
SLURMD_PORT="${BIGNLP_SLURMD_PORT:-16818}"
CONF="$DIR/slurm.conf"

cannot() { echo "cluster.sh: cannot run SLURM here: $*" >&2; exit 3; }

install_slurm() {
  command -v sbatch >/dev/null && command -v slurmctld >/dev/null && command -v munged >/dev/null \
    && return 0
  [ "$(id -u)" = 0 ] || cannot "sbatch is not installed and we are not root to apt-get install it"
  command -v apt-get >/dev/null || cannot "sbatch is not installed and apt-get is not available"
  echo "cluster.sh: installing slurm-wlm and munge with apt-get" >&2
  export DEBIAN_FRONTEND=noninteractive
  # policy-rc.d keeps the packages' own service units from starting daemons on a default config.
  apt-get update -q >&2 && apt-get install -y -q --no-install-recommends slurm-wlm munge >&2 \
    || cannot "apt-get install slurm-wlm munge failed (see the output above)"
}

write_config() {
  local host cpus mem_mb
  host="$(hostname -s)"
  # Declare at least 4 CPUs so multi-task test jobs fit on a 2-core CI machine; slurmd accepts
  # the larger count thanks to SlurmdParameters=config_overrides.
  cpus="$(nproc)"; [ "$cpus" -ge 4 ] || cpus=4
  mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))
  mkdir -p "$DIR"/{state,spool,log,munge}
  chmod 700 "$DIR/munge"
  cat >"$CONF" <<EOF
# Written by tests/slurm/cluster.sh: a one-node cluster for the bignlp_jax launch tests.
ClusterName=bignlp
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: how long a revoked job credential blocks a requeued job from starting again
# (default 120 s; SLURM holds requeued jobs that long). Shorter here so the requeue test is quick,
# and the schedulers look at pending jobs every second or two (defaults: backfill every 30 s, the
# main loop every 60 s), so the requeued job starts when its hold ends, not up to 30 s later.
AuthInfo=socket=$DIR/munge/munge.socket,cred_expire=10
SchedulerParameters=bf_interval=1,sched_interval=2
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
JobRequeue=1
# Keep finished jobs visible to scontrol for the tests (no accounting database here).
MinJobAge=600
KillWait=20
InactiveLimit=0
# The node is called "localhost" (slurmd -N localhost) so that jobs see a node list that
# resolves on any machine: bignlp-jax uses the first node's name as the JAX coordinator.
NodeName=localhost NodeHostname=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
}

stop() {
  local name pid
  for name in slurmd slurmctld munged; do
    if [ -f "$DIR/$name.pid" ]; then
      pid="$(cat "$DIR/$name.pid")"
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
      rm -f "$DIR/$name.pid"
    fi
  done
}

start() {
  [ "$(id -u)" = 0 ] || cannot "the local cluster needs root (SlurmUser=root, munged --force)"
  install_slurm
  stop
  rm -rf "$DIR/state" "$DIR/spool"
  write_config
  [ -f "$DIR/munge/munge.key" ] || dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1 count=1024 2>/dev/null
  chmod 600 "$DIR/munge/munge.key"
  munged --force --socket="$DIR/munge/munge.socket" --key-file="$DIR/munge/munge.key" \
    --pid-file="$DIR/munged.pid" --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/seed"
  export SLURM_CONF="$CONF"
  slurmctld -f "$CONF"
  slurmd -f "$CONF" -N localhost
  # Wait for the node to register and become idle.
  local state=""
  for _ in $(seq 120); do
    state="$(sinfo -h -o %T 2>/dev/null | head -1 || true)"
    [ "$state" = idle ] && break
    sleep 0.5
  done
  if [ "$state" != idle ]; then
    echo "cluster.sh: node state is '${state:-unknown}' after 60 s; logs in $DIR/log" >&2
    tail -n 20 "$DIR"/log/*.log >&2 || true
    exit 1
  fi
  echo "cluster.sh: SLURM is up; export SLURM_CONF=$CONF"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) SLURM_CONF="$CONF" sinfo ;;
  *) echo "usage: $0 start|stop|status   (state in \$BIGNLP_SLURM_DIR, default /tmp/bignlp-slurm)" >&2
     exit 2 ;;
esac
