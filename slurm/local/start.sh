#!/usr/bin/env bash
# Start a local SLURM cluster (munged + slurmctld + N slurmd) on this machine. Idempotent.
#   sudo slurm/local/start.sh                        # one node, "localhost"
#   sudo HISTOKT_SLURM_NODES=2 slurm/local/start.sh  # two nodes, hk-node1 and hk-node2
# prints "slurm ready: <sinfo line>" on success.
# Installs slurm-wlm/munge when missing (install.sh), renders slurm.conf.in into /etc/slurm/slurm.conf,
# starts the daemons detached (they outlive this script) and waits until every node is idle.
# With N > 1 nodes each slurmd runs in a network namespace of its own (histokt-nodeI: a veth pair on the
# bridge hkbr0, its own address PREFIX.(I+1) and its own host name hk-nodeI, listed in /etc/hosts), so
# `srun -N2` places tasks on two hosts whose processes talk over that network; slurmctld and munged stay on
# the host (slurmctld listens on the bridge's PREFIX.1; munge's socket is a file, shared by all).
# When the daemons already run with the same config it only checks the nodes and prints the ready line.
# Environment (all optional):
#   HISTOKT_SLURM_NODES=1                number of nodes (1: the single node "localhost", no namespaces)
#   HISTOKT_SLURM_SUBNET=10.77.0         the test network's /24 prefix (N > 1): host .1, node I .(I+1)
#   HISTOKT_SLURM_MAX_ARRAY=1001         MaxArraySize (largest array index + 1)
#   HISTOKT_SLURM_CRED_EXPIRE=30         AuthInfo cred_expire = requeue hold in seconds (Slurm default 120)
#   HISTOKT_SLURM_SCHED_PARAMS=...       SchedulerParameters (default sched_interval=5,bf_interval=5)
#   HISTOKT_SLURM_CPUS / HISTOKT_SLURM_MEM_MB   size of each node (default: nproc CPUs each, so N nodes
#                                        oversubscribe the machine N times; MemTotal minus 10% / 256 MB,
#                                        shared out between the nodes)
#   HISTOKT_SLURM_START_TIMEOUT=90       seconds to wait for the nodes to become idle
#   HISTOKT_SLURM_CONF=/etc/slurm/slurm.conf
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CONF=${HISTOKT_SLURM_CONF:-/etc/slurm/slurm.conf}
TEMPLATE=$HERE/slurm.conf.in
TIMEOUT=${HISTOKT_SLURM_START_TIMEOUT:-90}
NODES=${HISTOKT_SLURM_NODES:-1}
SUBNET=${HISTOKT_SLURM_SUBNET:-10.77.0}
LOGDIR=/var/log/slurm
CTLD_PID=/var/run/slurmctld.pid
MUNGE_SOCKET=/run/munge/munge.socket.2
# shellcheck source=slurm/local/network.sh
. "$HERE/network.sh"

log() { printf 'histokt-slurm start: %s\n' "$*"; }
show_logs() {
    local f
    for f in "$LOGDIR/slurmctld.log" "${SLURMD_LOGS[@]}" /var/log/munge/munged.log; do
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

[[ $NODES =~ ^[1-9][0-9]*$ ]] && [ "$NODES" -le 200 ] || die "HISTOKT_SLURM_NODES must be 1..200, got '$NODES'"
[[ $SUBNET =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]] || die "HISTOKT_SLURM_SUBNET must be a /24 prefix like 10.77.0, got '$SUBNET'"
mapfile -t NODE_NAMES < <(node_names "$NODES")
SLURMD_LOGS=("${NODE_NAMES[@]/#/$LOGDIR/slurmd-}"); SLURMD_LOGS=("${SLURMD_LOGS[@]/%/.log}")
slurmd_pid() { echo "/var/run/slurmd-$1.pid"; }

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
    mem_mb=$(( (total_mb - margin) / NODES )); [ "$mem_mb" -ge 1 ] || mem_mb=1
fi
max_array=${HISTOKT_SLURM_MAX_ARRAY:-1001}
cred_expire=${HISTOKT_SLURM_CRED_EXPIRE:-30}
sched_params=${HISTOKT_SLURM_SCHED_PARAMS:-sched_interval=5,bf_interval=5}
for v in cpus mem_mb max_array cred_expire; do
    [[ ${!v} =~ ^[0-9]+$ ]] || die "$v must be a positive integer, got '${!v}'"
done

if [ "$NODES" -eq 1 ]; then
    control=localhost
    node_lines="NodeName=localhost CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN"
else
    # slurmctld accepts its own short host name; the nodes reach it on the bridge's address
    control="$(hostname -s)($SUBNET.1)"
    node_lines=""
    for i in $(seq 1 "$NODES"); do
        name=${NODE_NAMES[$((i - 1))]}
        node_lines+="NodeName=$name NodeAddr=$(node_address "$SUBNET" "$i") NodeHostname=$name CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN"$'\n'
    done
    node_lines=${node_lines%$'\n'}
fi
node_list=$(IFS=,; echo "${NODE_NAMES[*]}")

rendered=$(mktemp /tmp/histokt-slurm.conf.XXXXXX)
trap 'rm -f "$rendered"' EXIT
# Substitute on setting lines only (comment lines keep the placeholder names as documentation).
sed -e "/^[[:space:]]*#/! {s|@MAX_ARRAY_SIZE@|$max_array|g; s|@NODE_LIST@|$node_list|g; s|@CONTROL@|$control|g}" \
    -e "/^[[:space:]]*#/! {s|@CRED_EXPIRE@|$cred_expire|g; s|@SCHED_PARAMS@|$sched_params|g}" \
    "$TEMPLATE" | awk -v lines="$node_lines" '$0 == "@NODE_LINES@" {print lines; next} {print}' >"$rendered"
if grep -v '^[[:space:]]*#' "$rendered" | grep -q '@[A-Z_]*@'; then
    die "unfilled placeholder in rendered config: $(grep -v '^[[:space:]]*#' "$rendered" | grep '@[A-Z_]*@')"
fi

same_conf=0
if [ -f "$CONF" ] && cmp -s "$rendered" "$CONF"; then same_conf=1; fi

node_states() { timeout 10 sinfo -h -N -o '%N %T' 2>/dev/null || true; }
ready_line() { timeout 10 sinfo -h 2>/dev/null | head -n1; }
all_slurmd_alive() {
    local n
    for n in "${NODE_NAMES[@]}"; do pid_alive "$(slurmd_pid "$n")" slurmd || return 1; done
}
all_usable() {  # every node of the config idle/mixed/allocated/completing
    local states n st
    states=$(node_states)
    for n in "${NODE_NAMES[@]}"; do
        st=$(awk -v n="$n" '$1 == n {print $2; exit}' <<<"$states")
        case "$st" in idle|mixed|allocated|completing) ;; *) return 1 ;; esac
    done
}

if [ "$same_conf" -eq 1 ] && pid_alive "$CTLD_PID" slurmctld && all_slurmd_alive && [ -S "$MUNGE_SOCKET" ] \
   && { [ "$NODES" -eq 1 ] || network_up "$SUBNET" "${NODE_NAMES[@]}"; }; then
    if all_usable; then
        log "already running with the same config ($CONF): nothing to do"
        echo "slurm ready: $(ready_line)"
        exit 0
    fi
    log "daemons run with the same config but a node is not usable ($(node_states | tr '\n' ' ')): checking"
fi

# ---------------------------------------------------------------- config changed: stop old daemons
if [ "$same_conf" -eq 0 ] && { pid_alive "$CTLD_PID" slurmctld || compgen -G '/var/run/slurmd*.pid' >/dev/null; }; then
    log "config differs from the running one: stopping slurmctld/slurmd to restart with the new config"
    HISTOKT_SLURM_KEEP_MUNGE=1 "$HERE/stop.sh" || die "stop.sh failed"
fi
if [ "$same_conf" -eq 0 ]; then
    mkdir -p "$(dirname "$CONF")"
    if [ -f "$CONF" ]; then cp -p "$CONF" "$CONF.histokt-prev"; fi
    install -m 0644 "$rendered" "$CONF"
    log "wrote $CONF (nodes=$node_list CPUs=$cpus RealMemory=$mem_mb each, MaxArraySize=$max_array cred_expire=$cred_expire SchedulerParameters=$sched_params)"
fi

# ---------------------------------------------------------------- directories
mkdir -p /var/spool/slurmctld "$LOGDIR"
for n in "${NODE_NAMES[@]}"; do mkdir -p "/var/spool/slurmd/$n"; done
chmod 0755 /var/spool/slurmctld /var/spool/slurmd "$LOGDIR"
install -d -o munge -g munge -m 0755 /run/munge
install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
chown munge:munge /etc/munge 2>/dev/null || true

# ---------------------------------------------------------------- the test network (N > 1)
if [ "$NODES" -gt 1 ]; then
    network_start "$SUBNET" "${NODE_NAMES[@]}" || die "could not create the test network (needs root with CAP_NET_ADMIN: ip netns, veth, bridge)"
    log "test network up: bridge $BRIDGE $SUBNET.1, $(for i in $(seq 1 "$NODES"); do printf '%s=%s ' "${NODE_NAMES[$((i - 1))]}" "$(node_address "$SUBNET" "$i")"; done)"
fi

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

slurmd_since=""   # set when this run starts a slurmd: the node must then register anew
for n in "${NODE_NAMES[@]}"; do
    pidfile=$(slurmd_pid "$n")
    pid_alive "$pidfile" slurmd && continue
    log "starting slurmd $n"
    slurmd_since=$(date +%Y-%m-%dT%H:%M:%S)
    rm -f "$pidfile"
    if [ "$NODES" -eq 1 ]; then
        # -N: the node is called localhost in slurm.conf whatever the hostname is.
        setsid slurmd -N "$n" -f "$CONF" </dev/null >>"$LOGDIR/slurmd-$n.stdout" 2>&1 || die "slurmd failed to start"
    else
        # in the node's network namespace, under its own host name (a UTS namespace of its own): the tasks
        # it starts see that network and that name. nsenter, not `ip netns exec`: that one also remounts
        # /sys for the namespace, without the cgroup mounts slurmd needs
        setsid nsenter --net="/var/run/netns/$(netns_of "$n")" unshare --uts sh -c 'hostname "$1" && exec slurmd -N "$1" -f "$2"' \
            sh "$n" "$CONF" </dev/null >>"$LOGDIR/slurmd-$n.stdout" 2>&1 || die "slurmd $n failed to start"
    fi
done

# ---------------------------------------------------------------- wait for idle
deadline=$(( $(date +%s) + TIMEOUT ))
resumed=0
while :; do
    states=$(node_states)
    waiting=()
    for n in "${NODE_NAMES[@]}"; do
        state=$(awk -v n="$n" '$1 == n {print $2; exit}' <<<"$states")
        if [ -n "$slurmd_since" ]; then
            # slurmctld may show the node idle from its saved state before the new slurmd registered.
            started=$(timeout 5 scontrol show node "$n" 2>/dev/null | grep -oE 'SlurmdStartTime=[^ ]+' | cut -d= -f2 || true)
            if [[ -z "$started" || "$started" < "$slurmd_since" ]]; then
                pid_alive "$(slurmd_pid "$n")" slurmd || [ "$(( $(date +%s) + TIMEOUT - deadline ))" -lt 3 ] \
                    || die "slurmd $n exited right after start (see its log below)"
                state="${state:-unknown} (slurmd not registered yet)"
            fi
        fi
        case "$state" in
            idle|mixed|allocated|completing) continue ;;
            inval|*invalid*)
                reason=$(timeout 5 scontrol show node "$n" 2>/dev/null | grep -oE 'Reason=.*' || true)
                die "node '$n' registered as INVALID: slurm.conf does not match the host ($reason). Set HISTOKT_SLURM_CPUS / HISTOKT_SLURM_MEM_MB or fix $TEMPLATE" ;;
            down*|drain*|fail*|idle+drain*)
                if [ "$resumed" -lt $(( 3 * NODES )) ]; then
                    log "node $n is '$state': scontrol update nodename=$n state=resume"
                    scontrol update nodename="$n" state=resume 2>&1 || true
                    resumed=$((resumed + 1))
                fi ;;
        esac
        waiting+=("$n: ${state:-no answer}")
    done
    [ "${#waiting[@]}" -eq 0 ] && break
    if [ "$(date +%s)" -ge "$deadline" ]; then
        reason=$(for n in "${NODE_NAMES[@]}"; do timeout 5 scontrol show node "$n" 2>/dev/null | grep -E 'NodeName=|State=|Reason=' | tr -s ' '; done || true)
        die "nodes not idle after ${TIMEOUT}s (${waiting[*]}). $reason"
    fi
    sleep 1
done
echo "slurm ready: $(ready_line)"
