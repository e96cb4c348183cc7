#!/usr/bin/env bash
# A one-node SLURM cluster (munged + slurmctld + slurmd of Debian's slurm-wlm) for tests/test_slurm_cluster.py.
#
#   eval "$(bash .ci/slurm.sh up DIR)"    # install slurm-wlm + munge when missing (apt-get, as root), write
#                                         # DIR/slurm.conf, start the three daemons; prints `export SLURM_CONF=...`
#   bash .ci/slurm.sh down DIR            # stop the daemons started by `up DIR` (by the PIDs in DIR/*.pid)
#
# Everything lives in DIR: config, munge key and socket, state, spool, logs, PID files; the ports are free ones
# chosen at start. So the cluster neither needs nor touches /etc/slurm, /etc/munge or a system munged, and two of
# them on one machine do not meet. The daemons run as the calling user (root in CI: slurmd starts jobs as their
# submitter). Nothing is killed by name.
set -euo pipefail

usage() { echo "usage: bash .ci/slurm.sh up|down DIR" >&2; exit 2; }
[[ $# -eq 2 ]] || usage
action=$1
dir=$2

stop() {
    local name pid
    for name in slurmd slurmctld munged; do
        [[ -f "$dir/$name.pid" ]] || continue
        pid="$(cat "$dir/$name.pid")"
        if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
            kill "$pid"
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        fi
        rm -f "$dir/$name.pid"
    done
}

install_missing() {
    local -a need=()
    command -v slurmctld >/dev/null || need+=(slurm-wlm)
    command -v munged >/dev/null || need+=(munge)
    [[ ${#need[@]} -eq 0 ]] && return 0
    if [[ $(id -u) != 0 ]]; then
        echo "slurm.sh: ${need[*]} missing; install them (apt-get install -y ${need[*]}) or run as root" >&2
        exit 2
    fi
    echo "slurm.sh: installing ${need[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq "${need[@]}" >&2
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

wait_for() {  # SECONDS DESCRIPTION COMMAND...
    local seconds=$1 what=$2
    shift 2
    for _ in $(seq $((seconds * 5))); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    echo "slurm.sh: $what did not come up; logs in $dir" >&2
    tail -n 20 "$dir"/*.log >&2 || true
    stop
    exit 1
}

up() {
    install_missing
    mkdir -p "$dir"
    dir="$(cd "$dir" && pwd)"
    chmod 700 "$dir"  # munged refuses key and socket directories that others can write
    mkdir -p "$dir/state" "$dir/spool" "$dir/munge"
    chmod 700 "$dir/munge"
    [[ -f "$dir/munge/munge.key" ]] || { head -c 1024 /dev/urandom >"$dir/munge/munge.key"; chmod 400 "$dir/munge/munge.key"; }
    munged --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.sock" --pid-file="$dir/munged.pid" \
        --log-file="$dir/munged.log" --seed-file="$dir/munge/munge.seed" --force
    wait_for 10 munged munge -n -S "$dir/munge/munge.sock"

    local host node ctld_port slurmd_port
    host="$(hostname -s)"
    # slurmd -C describes this machine (CPUs, sockets, cores, memory) as slurm.conf wants it
    node="$(slurmd -C | sed -n 1p)"
    ctld_port="$(free_port)"
    slurmd_port="$(free_port)"
    cat >"$dir/slurm.conf" <<EOF
ClusterName=r1moe-test
SlurmctldHost=$host(127.0.0.1)
SlurmUser=$(id -un)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.sock
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MinJobAge=600
$node NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=cpu Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
    export SLURM_CONF="$dir/slurm.conf"
    slurmctld -i
    wait_for 20 slurmctld scontrol ping
    slurmd
    wait_for 30 "slurmd (node idle)" bash -c "sinfo -h -o %T | grep -qx idle"
    echo "export SLURM_CONF=$dir/slurm.conf"
}

case "$action" in
    up) up ;;
    down) stop ;;
    *) usage ;;
esac
