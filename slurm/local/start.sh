#!/usr/bin/env bash
# Start a single-node SLURM cluster (munged + slurmctld + slurmd) on this machine. Idempotent.
#   sudo slurm/local/start.sh            # prints "slurm ready: <sinfo line>" on success
# Installs slurm-wlm/munge when missing (install.sh), renders slurm.conf.in into /etc/slurm/slurm.conf,
# starts the daemons detached (they outlive this script) and waits until the node is idle.
# When the daemons already run with the same config it only checks the node and prints the ready line.
# Environment (all optional):
#   HISTOKT_SLURM_MAX_ARRAY=1001         MaxArraySize (largest array index + 1)
#   HISTOKT_SLURM_CRED_EXPIRE=30         AuthInfo cred_expire = requeue hold in seconds (Slurm default 120)
#   HISTOKT_SLURM_SCHED_PARAMS=...       SchedulerParameters (default sched_interval=5,bf_interval=5)
#   HISTOKT_SLURM_CPUS / HISTOKT_SLURM_MEM_MB   node size (default: nproc, MemTotal minus 10% / 256 MB)
#   HISTOKT_SLURM_START_TIMEOUT=90       seconds to wait for the node to become idle
#   HISTOKT_SLURM_CONF=/etc/slurm/slurm.conf
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CONF=${HISTOKT_SLURM_CONF:-/etc/slurm/slurm.conf}
TEMPLATE=$HERE/slurm.conf.in
TIMEOUT=${HISTOKT_SLURM_START_TIMEOUT:-90}
NODE=localhost
LOGDIR=/var/log/slurm
CTLD_PID=/var/run/slurmctld.pid
SLURMD_PID=/var/run/slurmd.pid
MUNGE_SOCKET=/run/munge/munge.socket.2

log() { printf 'histokt-slurm start: %s\n' "$*"; }
show_logs() {
    local f
    for f in "$LOGDIR/slurmctld.log" "$LOGDIR/slurmd.log" /var/log/munge/munged.log; do
        if [ -f "$f" ]; then
            printf '\n----- last 25 lines of %s -----\n' "$f" >&2
            tail -n 25 "$f" >&2 || true
        else
            printf '\n----- %s: absent -----\n' "$f" >&2
        fi
    done
}
die() {
    printf 'histokt-slurm start: ERROR: %s\n' "$*" >&2
    show_logs
    exit 1
}

pid_alive() {  # pidfile name -> 0 if the pid in it runs a process called name
    local pidfile=$1 name=$2 pid
    [ -s "$pidfile" ] || return 1
    pid=$(cat "$pidfile" 2>/dev/null) || return 1
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ]
}

# ---------------------------------------------------------------- install
if ! command -v slurmctld >/dev/null 2>&1 || ! command -v munged >/dev/null 2>&1; then
    log "slurm-wlm/munge not installed: running install.sh"
    "$HERE/install.sh" || die "install.sh failed"
fi
[ "$(id -u)" -eq 0 ] || die "start.sh must run as root (it writes $CONF and starts system daemons)"
[ -f "$TEMPLATE" ] || die "template $TEMPLATE not found"

# ---------------------------------------------------------------- render slurm.conf
cpus=${HISTOKT_SLURM_CPUS:-$(nproc)}
if [ -n "${HISTOKT_SLURM_MEM_MB:-}" ]; then
    mem_mb=$HISTOKT_SLURM_MEM_MB
else
    total_mb=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
    margin=$(( total_mb / 10 )); [ "$margin" -ge 256 ] || margin=256
    mem_mb=$(( total_mb - margin )); [ "$mem_mb" -ge 1 ] || mem_mb=1
fi
max_array=${HISTOKT_SLURM_MAX_ARRAY:-1001}
cred_expire=${HISTOKT_SLURM_CRED_EXPIRE:-30}
sched_params=${HISTOKT_SLURM_SCHED_PARAMS:-sched_interval=5,bf_interval=5}
for v in cpus mem_mb max_array cred_expire; do
    [[ ${!v} =~ ^[0-9]+$ ]] || die "$v must be a positive integer, got '${!v}'"
done

rendered=$(mktemp /tmp/histokt-slurm.conf.XXXXXX)
trap 'rm -f "$rendered"' EXIT
# Substitute on setting lines only (comment lines keep the placeholder names as documentation).
sed -e "/^[[:space:]]*#/! {s|@CPUS@|$cpus|g; s|@REAL_MEMORY@|$mem_mb|g; s|@MAX_ARRAY_SIZE@|$max_array|g}" \
    -e "/^[[:space:]]*#/! {s|@CRED_EXPIRE@|$cred_expire|g; s|@SCHED_PARAMS@|$sched_params|g}" \
    "$TEMPLATE" >"$rendered"
if grep -v '^[[:space:]]*#' "$rendered" | grep -q '@[A-Z_]*@'; then
    die "unfilled placeholder in rendered config: $(grep -v '^[[:space:]]*#' "$rendered" | grep '@[A-Z_]*@')"
fi

same_conf=0
if [ -f "$CONF" ] && cmp -s "$rendered" "$CONF"; then same_conf=1; fi

node_state() { timeout 10 sinfo -h -n "$NODE" -o %T 2>/dev/null | head -n1 || true; }
ready_line() { timeout 10 sinfo -h 2>/dev/null | head -n1; }

if [ "$same_conf" -eq 1 ] && pid_alive "$CTLD_PID" slurmctld && pid_alive "$SLURMD_PID" slurmd \
   && [ -S "$MUNGE_SOCKET" ]; then
    state=$(node_state)
    case "$state" in
        idle|mixed|allocated|completing)
            log "already running with the same config ($CONF): nothing to do"
            echo "slurm ready: $(ready_line)"
            exit 0 ;;
    esac
    log "daemons run with the same config but the node is '${state:-no answer}': checking it"
fi

# ---------------------------------------------------------------- config changed: stop old daemons
if [ "$same_conf" -eq 0 ] && { pid_alive "$CTLD_PID" slurmctld || pid_alive "$SLURMD_PID" slurmd; }; then
    log "config differs from the running one: stopping slurmctld/slurmd to restart with the new config"
    HISTOKT_SLURM_KEEP_MUNGE=1 "$HERE/stop.sh" || die "stop.sh failed"
fi
if [ "$same_conf" -eq 0 ]; then
    mkdir -p "$(dirname "$CONF")"
    if [ -f "$CONF" ]; then cp -p "$CONF" "$CONF.histokt-prev"; fi
    install -m 0644 "$rendered" "$CONF"
    log "wrote $CONF (CPUs=$cpus RealMemory=$mem_mb MaxArraySize=$max_array cred_expire=$cred_expire SchedulerParameters=$sched_params)"
fi

# ---------------------------------------------------------------- directories
mkdir -p /var/spool/slurmctld /var/spool/slurmd "$LOGDIR"
chmod 0755 /var/spool/slurmctld /var/spool/slurmd "$LOGDIR"
install -d -o munge -g munge -m 0755 /run/munge
install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
chown munge:munge /etc/munge 2>/dev/null || true

# ---------------------------------------------------------------- munge
if [ ! -s /etc/munge/munge.key ]; then
    log "creating /etc/munge/munge.key"
    if command -v mungekey >/dev/null 2>&1; then mungekey --create --keyfile=/etc/munge/munge.key
    else dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none; fi
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key

if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    log "starting munged as user munge"
    if [ -S "$MUNGE_SOCKET" ]; then
        log "removing stale munge socket"
        rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
    fi
    setsid su -s /bin/sh munge -c munged </dev/null >/dev/null 2>&1 || die "munged failed to start"
    for _ in $(seq 1 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break
        sleep 0.2
    done
fi
munge -n | unmunge >/dev/null 2>&1 || die "munge check failed: 'munge -n | unmunge' does not decode"
log "munge ok (munge -n | unmunge)"

# ---------------------------------------------------------------- slurmctld, slurmd
if ! pid_alive "$CTLD_PID" slurmctld; then
    log "starting slurmctld"
    rm -f "$CTLD_PID"
    # -i: ignore unreadable state files instead of refusing to start. Daemonizes itself.
    setsid slurmctld -i -f "$CONF" </dev/null >>"$LOGDIR/slurmctld.stdout" 2>&1 || die "slurmctld failed to start"
fi
for _ in $(seq 1 50); do
    timeout 5 scontrol ping 2>/dev/null | grep -q 'is UP' && break
    sleep 0.2
done
timeout 5 scontrol ping 2>/dev/null | grep -q 'is UP' || die "slurmctld does not answer 'scontrol ping'"

slurmd_since=""   # set when this run starts slurmd: the node must then register anew
if ! pid_alive "$SLURMD_PID" slurmd; then
    log "starting slurmd"
    slurmd_since=$(date +%Y-%m-%dT%H:%M:%S)
    rm -f "$SLURMD_PID"
    # -N: the node is called localhost in slurm.conf whatever the hostname is.
    setsid slurmd -N "$NODE" -f "$CONF" </dev/null >>"$LOGDIR/slurmd.stdout" 2>&1 || die "slurmd failed to start"
fi

# ---------------------------------------------------------------- wait for idle
deadline=$(( $(date +%s) + TIMEOUT ))
resumed=0
while :; do
    state=$(node_state)
    if [ -n "$slurmd_since" ]; then
        # slurmctld may show the node idle from its saved state before the new slurmd registered.
        started=$(timeout 5 scontrol show node "$NODE" 2>/dev/null | grep -oE 'SlurmdStartTime=[^ ]+' | cut -d= -f2 || true)
        if [[ -z "$started" || "$started" < "$slurmd_since" ]]; then
            pid_alive "$SLURMD_PID" slurmd || [ "$(( $(date +%s) + TIMEOUT - deadline ))" -lt 3 ] \
                || die "slurmd exited right after start (see its log below)"
            state="${state:-unknown} (slurmd not registered yet)"
        fi
    fi
    case "$state" in
        idle|mixed|allocated|completing) break ;;
        inval|*invalid*)
            reason=$(timeout 5 scontrol show node "$NODE" 2>/dev/null | grep -oE 'Reason=.*' || true)
            die "node '$NODE' registered as INVALID: slurm.conf does not match the host ($reason). Set HISTOKT_SLURM_CPUS / HISTOKT_SLURM_MEM_MB or fix $TEMPLATE" ;;
        down|drain|drained|draining|fail|"down+drain"|"idle+drain")
            if [ "$resumed" -lt 3 ]; then
                log "node is '$state': scontrol update nodename=$NODE state=resume"
                scontrol update nodename="$NODE" state=resume 2>&1 || true
                resumed=$((resumed + 1))
            fi ;;
    esac
    if [ "$(date +%s)" -ge "$deadline" ]; then
        reason=$(timeout 5 scontrol show node "$NODE" 2>/dev/null | grep -E 'State=|Reason=' | tr -s ' ' || true)
        die "node '$NODE' not idle after ${TIMEOUT}s (state: '${state:-no answer}'). $reason"
    fi
    sleep 1
done
echo "slurm ready: $(ready_line)"
