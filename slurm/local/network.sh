# The test network of a local N-node cluster, sourced by start.sh and stop.sh (not run on its own).
#
# Each node I (hk-nodeI) gets a network namespace histokt-nodeI holding one end of a veth pair (eth0, address
# PREFIX.(I+1)/24); the other end (hkvethI) sits on the bridge hkbr0 in the host's namespace, which holds
# PREFIX.1. So the nodes reach each other and slurmctld, and the host reaches them. The names resolve through
# a marked block of /etc/hosts. These addresses exist only on this bridge: nothing is routed elsewhere.

BRIDGE=hkbr0
HOSTS_BEGIN="# >>> histokt-slurm test nodes (slurm/local/network.sh)"
HOSTS_END="# <<< histokt-slurm test nodes"

node_names() {  # N -> the node names, one a line
    local n=$1 i
    if [ "$n" -eq 1 ]; then echo localhost; return; fi
    for i in $(seq 1 "$n"); do echo "hk-node$i"; done
}

node_address() { echo "$1.$(($2 + 1))"; }  # PREFIX I -> PREFIX.(I+1)
netns_of() { echo "histokt-${1#hk-}"; }    # hk-node1 -> histokt-node1
veth_of() { echo "hkveth${1#hk-node}"; }   # hk-node1 -> hkveth1

hosts_block() {  # PREFIX NAME... -> /etc/hosts lines of the nodes
    local prefix=$1 i=0 name
    shift
    echo "$HOSTS_BEGIN"
    for name in "$@"; do
        i=$((i + 1))
        echo "$(node_address "$prefix" "$i") $name"
    done
    echo "$HOSTS_END"
}

hosts_write() {  # the block (or nothing) in place of the old one; in place: /etc/hosts may be a bind mount
    local block=$1 kept
    kept=$(awk -v b="$HOSTS_BEGIN" -v e="$HOSTS_END" '$0 == b {skip = 1} !skip {print} $0 == e {skip = 0}' /etc/hosts)
    if [ -n "$block" ]; then printf '%s\n%s\n' "$kept" "$block" >/etc/hosts; else printf '%s\n' "$kept" >/etc/hosts; fi
}

network_up() {  # PREFIX NAME... -> 0 when every namespace, link and address is in place
    local prefix=$1 i=0 name ns
    shift
    ip -o addr show dev "$BRIDGE" 2>/dev/null | grep -q " $prefix.1/24 " || return 1
    for name in "$@"; do
        i=$((i + 1))
        ns=$(netns_of "$name")
        ip netns exec "$ns" ip -o addr show dev eth0 2>/dev/null | grep -q " $(node_address "$prefix" "$i")/24 " || return 1
        ip -o link show "$(veth_of "$name")" 2>/dev/null | grep -q "master $BRIDGE" || return 1
    done
    grep -qxF "$(node_address "$prefix" 1) $1" /etc/hosts
}

network_start() {  # PREFIX NAME... -> create what is missing (idempotent)
    local prefix=$1 i=0 name ns veth
    shift
    ip link show "$BRIDGE" >/dev/null 2>&1 || ip link add "$BRIDGE" type bridge || return 1
    ip -o addr show dev "$BRIDGE" | grep -q " $prefix.1/24 " || ip addr add "$prefix.1/24" dev "$BRIDGE" || return 1
    ip link set "$BRIDGE" up || return 1
    for name in "$@"; do
        i=$((i + 1))
        ns=$(netns_of "$name")
        veth=$(veth_of "$name")
        [ -e "/var/run/netns/$ns" ] || ip netns add "$ns" || return 1
        if ! ip link show "$veth" >/dev/null 2>&1; then
            ip link add "$veth" type veth peer name eth0 netns "$ns" || return 1
        fi
        ip link set "$veth" master "$BRIDGE" && ip link set "$veth" up || return 1
        ip netns exec "$ns" ip link set lo up || return 1
        ip netns exec "$ns" ip -o addr show dev eth0 | grep -q " $(node_address "$prefix" "$i")/24 " \
            || ip netns exec "$ns" ip addr add "$(node_address "$prefix" "$i")/24" dev eth0 || return 1
        ip netns exec "$ns" ip link set eth0 up || return 1
    done
    hosts_write "$(hosts_block "$prefix" "$@")"
}

network_stop() {  # remove every namespace, link and host line the script made
    local ns veth
    for ns in /var/run/netns/histokt-node*; do
        [ -e "$ns" ] && ip netns del "$(basename "$ns")"
    done
    for veth in $(ip -o link show 2>/dev/null | grep -oE 'hkveth[0-9]+' | sort -u); do
        ip link del "$veth" 2>/dev/null
    done
    ip link show "$BRIDGE" >/dev/null 2>&1 && ip link del "$BRIDGE"
    grep -qxF "$HOSTS_BEGIN" /etc/hosts && hosts_write ""
    return 0
}
