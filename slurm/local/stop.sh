#!/usr/bin/env bash
# Stop the single-node SLURM started by start.sh: slurmd, slurmctld, then munged.
#   sudo slurm/local/stop.sh
# HISTOKT_SLURM_KEEP_MUNGE=1 leaves munged running. Jobs still running are killed with slurmd;
# slurmctld saves its state, so queued jobs are back after start.sh.
set -uo pipefail

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

stop_pidfile /var/run/slurmd.pid slurmd
stop_pidfile /var/run/slurmctld.pid slurmctld
if [ "${HISTOKT_SLURM_KEEP_MUNGE:-0}" = 1 ]; then
    log "leaving munged running (HISTOKT_SLURM_KEEP_MUNGE=1)"
else
    stop_pidfile /run/munge/munged.pid munged
fi
exit 0
