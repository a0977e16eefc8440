#!/usr/bin/env bash
# Apptainer on this machine, for `make image` and the container tests (CI runs it; as root). Clusters have
# their own Apptainer (>= 1.1; a module or the site's package): there, skip this.
#
# Debian bookworm ships no Apptainer. HISTOKT_APPTAINER_INSTALLER names an installer that puts sid's 1.4.5
# into /opt/apptainer with a private glibc (.ci/run names the one beside CI's checkout). Its .debs are kept
# in $HISTOKT_CACHE/apptainer-debs (default ~/.cache/histokt), so later installs need nothing from sid and a
# newer Apptainer in Debian's archive cannot change what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."
if command -v apptainer >/dev/null 2>&1; then
    echo "install-apptainer: $(apptainer --version) is installed" >&2
    exit 0
fi
installer=${HISTOKT_APPTAINER_INSTALLER:-}
if [ -z "$installer" ] || [ ! -f "$installer" ]; then
    echo "install-apptainer: error: no installer (HISTOKT_APPTAINER_INSTALLER=${installer:-unset}): install Apptainer >= 1.1 (apptainer.org, or your site's module)" >&2
    exit 2
fi
if [ "$(id -u)" != 0 ]; then
    echo "install-apptainer: error: run it as root (sudo bash containers/install-apptainer.sh)" >&2
    exit 2
fi
DEB_DIR=${DEB_DIR:-${HISTOKT_CACHE:-$HOME/.cache/histokt}/apptainer-debs} bash "$installer"
