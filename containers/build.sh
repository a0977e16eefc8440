#!/usr/bin/env bash
# Build histokt.sif on this machine (no container registry needed): containers/histokt.def on the local
# Debian base (containers/debian.def), with every pinned package from a wheelhouse, so the build needs no
# package index (the same recipe works on an air-gapped login node with a wheelhouse carried in).
#
#     bash containers/build.sh [OUT]          # OUT (default ./histokt.sif): a symlink to the cached image
#
# Everything is cached outside the clone, in $HISTOKT_CACHE (default ~/.cache/histokt), keyed by what it is
# built from, so a fresh clone (CI) rebuilds only when the definitions, setup.cfg or the sources change:
#     images/debian-<key>.sif     the base              (containers/debian.def, the Debian archive)
#     wheelhouse-<key>/           the pinned wheels      (setup.cfg's install_requires)
#     images/histokt-<key>.sif    the image              (both definitions, setup.cfg, setup.py, histokt/)
# Needs Apptainer (as root here: bash containers/install-apptainer.sh) and debootstrap.
# MIRROR=URL: the Debian archive (default: the one this machine's apt sources name).
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=${HISTOKT_CACHE:-$HOME/.cache/histokt}
OUT=${1:-histokt.sif}
log() { echo "histokt-image: $*" >&2; }
die() { log "error: $*"; exit 2; }
command -v apptainer >/dev/null || die "apptainer not found: install it (bash containers/install-apptainer.sh, as root) or load your site's module"
PY=${PYTHON:-python3}
mirror=${MIRROR:-$( { cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '/^URIs:/{print $2}';
    cat /etc/apt/sources.list 2>/dev/null | awk '$1=="deb"{print $2}'; } | head -n1 || true)}
[ -n "$mirror" ] || die "no Debian archive in this machine's apt sources: set MIRROR=URL"

key() { sha256sum | cut -c1-16; }
# README.md is copied in (setup.cfg's long_description) but not part of the key: a README edit alone does not
# rebuild a 3 GB image (the image's package description may lag behind it)
sources_key=$( { cat containers/debian.def containers/histokt.def setup.cfg setup.py;
    find histokt -type f ! -path '*/__pycache__/*' ! -name '*.pyc' -print0 | sort -z | xargs -0 cat; } | key)
base_key=$( { cat containers/debian.def; echo "$mirror"; } | key)
wheels_key=$( { cat setup.cfg; "$PY" -c 'import sys; print(sys.version_info[:2])'; } | key)
mkdir -p "$CACHE/images"
image=$CACHE/images/histokt-$sources_key.sif
base=$CACHE/images/debian-$base_key.sif
wheels=$CACHE/wheelhouse-$wheels_key

if [ -f "$image" ]; then
    log "cached: $image"
else
    t0=$(date +%s)
    if [ ! -f "$base" ]; then
        command -v debootstrap >/dev/null ||
            die "debootstrap not found (apt-get install debootstrap): the local base is bootstrapped from Debian's archive"
        log "building the Debian base from $mirror"
        apptainer build --force --build-arg "MIRROR=$mirror" "$base.tmp" containers/debian.def >&2
        mv "$base.tmp" "$base"
    fi
    if [ ! -d "$wheels" ]; then
        log "downloading the pinned wheels into $wheels"
        reqs=$("$PY" -c 'import configparser; c = configparser.ConfigParser(); c.read("setup.cfg");
print(" ".join(r.strip() for r in c["options"]["install_requires"].splitlines() if r.strip()))')
        rm -rf "$wheels.tmp"
        # shellcheck disable=SC2086  # one argument per requirement
        "$PY" -m pip download --quiet --only-binary=:all: -d "$wheels.tmp" $reqs setuptools wheel >&2
        mv "$wheels.tmp" "$wheels"
    fi
    log "building $image (base $base, wheels $wheels)"
    apptainer build --force --bind "$wheels:/mnt" --build-arg BOOTSTRAP=localimage --build-arg "BASE=$base" \
        "$image.tmp" containers/histokt.def >&2
    mv "$image.tmp" "$image"
    # older images of this cache: superseded (each is ~3 GB)
    find "$CACHE/images" -name 'histokt-*.sif' ! -path "$image" -delete
    log "built in $(( $(date +%s) - t0 )) s, $(du -h "$image" | cut -f1)"
fi
ln -sfn "$image" "$OUT"
echo "$OUT"
