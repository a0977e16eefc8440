#!/usr/bin/env bash
# Stop the local SLURM started by start.sh: every slurmd, slurmctld, then munged, and remove the test
# network of an N-node cluster (its namespaces, veth pairs, bridge and /etc/hosts lines).
#   sudo slurm/local/stop.sh
# HISTOKT_SLURM_KEEP_MUNGE=1 leaves munged running. Jobs still running are killed with slurmd;
# slurmctld saves its state, so queued jobs are back after start.sh.
set -uo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=slurm/local/network.sh
. "$HERE/network.sh"

log() { printf 'histokt-slurm stop: %s\n' "$*"; }

stop_pidfile() {  # pidfile name -> stop the process by its pid: TERM, wait, then KILL
    local pidfile=$1 name=$2 pid i
    [ -s "$pidfile" ] || { log "$name: no pid file ($pidfile), not running"; return 0; }
    pid=$(cat "$pidfile" 2>/dev/null)
    if [ -z "$pid" ] || ! kill -0 "$pid" 2>/dev/null || [ "$(cat "/proc/$pid/comm" 2>/dev/null)" != "$name" ]; then
        log "$name: not running (stale pid file removed)"
        rm -f "$pidfile"
        return 0
    fi
    kill -TERM "$pid" 2>/dev/null
    for i in $(seq 1 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.2
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "$name (pid $pid) ignored SIGTERM for 20 s: SIGKILL"
        kill -KILL "$pid" 2>/dev/null
        sleep 0.5
    fi
    rm -f "$pidfile"
    log "$name (pid $pid) stopped"
}

[ "$(id -u)" -eq 0 ] || { echo "histokt-slurm stop: ERROR: run as root" >&2; exit 1; }

for pidfile in /var/run/slurmd.pid /var/run/slurmd-*.pid; do  # slurmd.pid: a cluster started before %n
    [ -e "$pidfile" ] && stop_pidfile "$pidfile" slurmd
done
stop_pidfile /var/run/slurmctld.pid slurmctld
if [ "${HISTOKT_SLURM_KEEP_MUNGE:-0}" = 1 ]; then
    log "leaving munged running (HISTOKT_SLURM_KEEP_MUNGE=1)"
else
    stop_pidfile /run/munge/munged.pid munged
fi
# the nodes' task processes (slurmstepd) left in a namespace die with it only once they end: kill them
for ns in /var/run/netns/histokt-node*; do
    [ -e "$ns" ] || continue
    pids=$(ip netns pids "$(basename "$ns")" 2>/dev/null)
    [ -n "$pids" ] && kill -KILL $pids 2>/dev/null
done
network_stop
log "test network removed"
exit 0
