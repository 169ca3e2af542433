#!/usr/bin/env bash
# Install and start a single-node Slurm cluster on this machine, so CI exercises the real
# `--launcher slurm` path (sbatch job arrays through submitit) instead of a mock.
#
# Debian bookworm, run as root, no systemd: the daemons are started directly. Idempotent: a
# second run finds the node up and returns at once; a run after the daemons died (a fresh boot,
# a reused machine) restarts them. Exits non-zero with the Slurm logs when the node never
# comes up, so a broken setup fails CI loudly instead of skipping the Slurm tests.
set -euo pipefail

CONF_DIR=/etc/slurm
CONF="$CONF_DIR/slurm.conf"
SPOOL=/var/spool/slurm
LOGDIR=/var/log/slurm
RUNDIR=/run/slurm
WAIT_S="${SLURM_SETUP_WAIT_S:-60}"

log() { echo "slurm-setup: $*"; }

if [ "$(id -u)" -ne 0 ]; then
  echo "slurm-setup: must run as root" >&2
  exit 1
fi

node_state() {
  # The state of our node as sinfo reports it ("idle", "mixed", "down*", ...), empty if unreachable.
  timeout 10 sinfo -h -N -n "$NODE" -o "%T" 2>/dev/null | head -n1 || true
}

node_usable() {
  case "$(node_state)" in
    idle | mixed | allocated | completing) return 0 ;;
    *) return 1 ;;
  esac
}

NODE="$(hostname -s)"

running() {
  # Is the daemon whose pid file is $1 alive and really that daemon ($2)?
  local pid
  [ -s "$1" ] || return 1
  pid="$(cat "$1")"
  [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm")" = "$2" ]
}

# --- packages ----------------------------------------------------------------------------
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
  || ! command -v munged >/dev/null; then
  log "installing slurm-wlm and munge"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # The packages' postinst scripts try to start services; without systemd that only warns.
  apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
fi

# --- munge -------------------------------------------------------------------------------
install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
install -d -o munge -g munge -m 0755 /run/munge
if [ ! -s /etc/munge/munge.key ]; then
  log "creating munge key"
  if command -v mungekey >/dev/null; then
    mungekey --create --force --keyfile=/etc/munge/munge.key
  else
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
  fi
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  log "starting munged"
  # A munged that died leaves its pid/socket lock behind; --force starts over them.
  runuser -u munge -- /usr/sbin/munged --force
  for _ in $(seq 1 20); do
    munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break
    sleep 0.5
  done
  if ! munge -n | unmunge >/dev/null; then
    echo "slurm-setup: munged does not answer" >&2
    tail -n 30 /var/log/munge/munged.log >&2 || true
    exit 1
  fi
fi

# --- slurm.conf --------------------------------------------------------------------------
CPUS="$(nproc)"
MEM_TOTAL_MB=$(($(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024))
# Declare a bit less than the machine has: slurmd drains a node reporting less than RealMemory.
REAL_MEM_MB=$((MEM_TOTAL_MB * 9 / 10))
install -d -m 0755 "$CONF_DIR" "$SPOOL" "$SPOOL/ctld" "$SPOOL/d" "$LOGDIR" "$RUNDIR"

NEW_CONF="$(mktemp)"
cat >"$NEW_CONF" <<EOF
# Written by petlbench .ci/slurm-setup.sh: one node on this machine, for CI.
ClusterName=petlbench
SlurmctldHost=${NODE}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
# A requeued job (preemption, submitit's checkpoint) may restart after cred_expire seconds
# (120 by default): keep CI's requeue test short.
AuthInfo=cred_expire=10
# Trust this file over what slurmd detects (containers report the host's sockets/cores).
SlurmdParameters=config_overrides
StateSaveLocation=${SPOOL}/ctld
SlurmdSpoolDir=${SPOOL}/d
SlurmctldPidFile=${RUNDIR}/slurmctld.pid
SlurmdPidFile=${RUNDIR}/slurmd.pid
SlurmctldLogFile=${LOGDIR}/slurmctld.log
SlurmdLogFile=${LOGDIR}/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=10
Waittime=0
NodeName=${NODE} NodeAddr=127.0.0.1 CPUs=${CPUS} RealMemory=${REAL_MEM_MB} State=UNKNOWN
PartitionName=debug Nodes=${NODE} Default=YES MaxTime=INFINITE State=UP
EOF
conf_changed=0
if ! cmp -s "$NEW_CONF" "$CONF"; then
  log "writing $CONF (node $NODE, $CPUS CPUs, ${REAL_MEM_MB} MB)"
  install -m 0644 "$NEW_CONF" "$CONF"
  conf_changed=1
fi
rm -f "$NEW_CONF"

if [ "$conf_changed" -eq 0 ] && running "$RUNDIR/slurmctld.pid" slurmctld && running "$RUNDIR/slurmd.pid" slurmd \
  && node_usable; then
  log "node $NODE already up ($(node_state)); nothing to do"
  exit 0
fi

# --- daemons -----------------------------------------------------------------------------
stop() {
  local pid
  if running "$1" "$2"; then
    pid="$(cat "$1")"
    log "stopping $2 (pid $pid) to apply the configuration"
    kill "$pid" || true
    for _ in $(seq 1 40); do
      [ -d "/proc/$pid" ] || break
      sleep 0.25
    done
  fi
}

# Whatever runs now could not bring the node up (or predates this configuration): restart both.
stop "$RUNDIR/slurmd.pid" slurmd
stop "$RUNDIR/slurmctld.pid" slurmctld

log "starting slurmctld"
# -c: start with a clean state (no jobs carried over from a previous machine or boot).
slurmctld -c
log "starting slurmd"
slurmd

deadline=$((SECONDS + WAIT_S))
resumed=0
while [ "$SECONDS" -lt "$deadline" ]; do
  if node_usable; then
    log "node $NODE is $(node_state); partitions:"
    sinfo
    exit 0
  fi
  state="$(node_state)"
  # A node that slurmctld remembers as down/drained (e.g. after an unclean stop) is ready once
  # slurmd registered; tell slurmctld so once.
  case "$state" in
    down | drained | drain | down~ | drained~)
      if [ "$resumed" -eq 0 ]; then
        log "node state '$state': resuming"
        scontrol update NodeName="$NODE" State=RESUME || true
        resumed=1
      fi
      ;;
  esac
  sleep 1
done

echo "slurm-setup: node $NODE did not become idle within ${WAIT_S}s (state: '$(node_state)')" >&2
sinfo -N -l >&2 || true
scontrol show node "$NODE" >&2 || true
echo "--- $LOGDIR/slurmctld.log (tail)" >&2
tail -n 40 "$LOGDIR/slurmctld.log" >&2 || true
echo "--- $LOGDIR/slurmd.log (tail)" >&2
tail -n 40 "$LOGDIR/slurmd.log" >&2 || true
exit 1
