#!/usr/bin/env bash
# Install a single-node SLURM (Debian 12: slurm-wlm 22.05 + munge). Idempotent.
#   sudo slurm/local/install.sh
# Exits 0 at once when slurmctld, slurmd, sinfo and munged are already installed.
set -euo pipefail

log() { printf 'histokt-slurm install: %s\n' "$*"; }
die() { printf 'histokt-slurm install: ERROR: %s\n' "$*" >&2; exit 1; }

have_all() {
    local b
    for b in slurmctld slurmd sinfo sbatch scontrol munged munge unmunge; do
        command -v "$b" >/dev/null 2>&1 || [ -x "/usr/sbin/$b" ] || return 1
    done
    dpkg-query -W -f='${Status}' slurm-wlm 2>/dev/null | grep -q 'install ok installed' \
        && dpkg-query -W -f='${Status}' munge 2>/dev/null | grep -q 'install ok installed'
}

if have_all; then
    log "slurm-wlm and munge already installed ($(dpkg-query -W -f='${Version}' slurm-wlm)); nothing to do"
    exit 0
fi

[ "$(id -u)" -eq 0 ] || die "slurm-wlm/munge are missing and installing them needs root (run: sudo $0)"
command -v apt-get >/dev/null 2>&1 || die "apt-get not found: this script supports Debian/Ubuntu only (Debian 12 is tested)"

export DEBIAN_FRONTEND=noninteractive

# apt-get update only when the package lists do not know slurm-wlm/munge yet.
need_update=0
for p in slurm-wlm munge; do
    cand=$(apt-cache policy "$p" 2>/dev/null | awk '/Candidate:/ {print $2}')
    if [ -z "$cand" ] || [ "$cand" = "(none)" ]; then need_update=1; fi
done
if [ "$need_update" -eq 1 ]; then
    log "package lists lack slurm-wlm or munge: running apt-get update"
    apt-get update -q || die "apt-get update failed"
else
    log "package lists already know slurm-wlm and munge: skipping apt-get update"
fi

# Keep the package scripts from starting daemons (no systemd here; start.sh starts them with our config).
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    created_policy=1
fi
cleanup() { if [ "$created_policy" -eq 1 ]; then rm -f "$policy"; fi; }
trap cleanup EXIT

log "installing slurm-wlm and munge (apt-get install -y)"
apt-get install -y -q -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
    slurm-wlm munge || die "apt-get install -y slurm-wlm munge failed"

have_all || die "install finished but a SLURM/munge binary is still missing"
[ -s /etc/munge/munge.key ] || log "warning: /etc/munge/munge.key missing (start.sh will create one)"
log "installed slurm-wlm $(dpkg-query -W -f='${Version}' slurm-wlm), munge $(dpkg-query -W -f='${Version}' munge)"
