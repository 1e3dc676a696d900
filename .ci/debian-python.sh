#!/usr/bin/env bash
# Runs a command in this checkout under Debian 13's Python 3.13, in a virtual environment of its own.
#
#   .ci/debian-python.sh VENV "PIP ARGS" -- COMMAND...
#
# VENV names a virtual environment inside the root filesystem; "PIP ARGS" is what pip installs
# into it (e.g. '-e .[test] jax==0.11.2'). The root
# filesystem (debootstrap, trixie, minbase) and the venvs are cached under $GENESIS_DEBIAN_ROOT
# (default /var/cache/genesis-jax/trixie) between runs; a venv is rebuilt when its PIP ARGS or
# pyproject.toml change. The checkout is bind-mounted at /src;
# the command runs there with a clean environment. Needs root and debootstrap.
set -euo pipefail

if [ $# -lt 4 ] || [ "$3" != "--" ]; then
    echo "usage: $0 VENV \"PIP ARGS\" -- COMMAND..." >&2
    exit 2
fi
venv=$1 pip_args=$2
shift 3
root=${GENESIS_DEBIAN_ROOT:-/var/cache/genesis-jax/trixie}
src=$(cd "$(dirname "$0")/.." && pwd)

[ "$(id -u)" = 0 ] || { echo "$0: needs root (debootstrap, chroot and mounts); run it as root" >&2; exit 3; }
command -v debootstrap >/dev/null || {
    echo "$0: debootstrap is not installed (apt-get install debootstrap)" >&2; exit 3; }

mirror() {  # the Debian mirror this machine's own apt sources use
    local uri
    uri=$(grep -hsE '^(URIs:|deb )' /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null \
          | grep -v security | head -n 1 | sed -E 's/^URIs:[[:space:]]*//; s/^deb[[:space:]]+(\[[^]]*\][[:space:]]+)?//' \
          | awk '{print $1}')
    echo "${uri:-http://deb.debian.org/debian}"
}

mkdir -p "$(dirname "$root")"
exec 9>"$root.lock"
flock 9  # one run at a time: runs share the root filesystem and its mount points

unmount_under() {  # a failed debootstrap can leave its /proc mounted: never delete through a mount
    { grep -F " $1/" /proc/mounts || true; } | awk '{print $2}' | sort -r | xargs -r -n 1 umount -l
}
if [ ! -x "$root/usr/bin/python3" ]; then
    echo "debian-python: bootstrapping Debian 13 into $root" >&2
    unmount_under "$root.partial"
    rm -rf --one-file-system "$root.partial"
    if ! debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
            trixie "$root.partial" "$(mirror)" >"$root.log" 2>&1; then
        unmount_under "$root.partial"
        echo "$0: debootstrap failed; its log: $root.log ($(tail -n 1 "$root.log"))" >&2
        exit 3
    fi
    mv "$root.partial" "$root"
fi
cp /etc/resolv.conf /etc/hosts "$root/etc/"
cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/host-ca-bundle.crt"

mounted=()
cleanup() {
    local i
    for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do umount -l "${mounted[$i]}" 2>/dev/null || true; done
}
trap cleanup EXIT
mount_in() {  # mount_in TARGET MOUNT-ARGS...
    local target=$root$1
    shift
    mkdir -p "$target"
    mount "$@" "$target"
    mounted+=("$target")
}
mount_in /proc -t proc proc
mount_in /sys --bind /sys || echo "$0: /sys not mounted: glibc will not see the huge page mode" >&2  # glibc reads it there
mount_in /dev --bind /dev
mount_in /dev/shm --bind /dev/shm
mount_in /src --bind "$src"

in_root() {
    chroot "$root" /usr/bin/env -i HOME=/root LANG=C.UTF-8 PATH=/opt/venvs/$venv/bin:/usr/bin:/bin \
        PIP_CERT=/etc/ssl/certs/host-ca-bundle.crt PIP_DISABLE_PIP_VERSION_CHECK=1 \
        CI="${CI:-}" GENESIS_ENV="debian-python3.13/$venv" "$@"
}

stamp=$root/opt/venvs/$venv.installed
want="$pip_args $(sha256sum "$src/pyproject.toml" | cut -c1-16)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "debian-python: installing into venv '$venv': $pip_args" >&2
    rm -rf "$root/opt/venvs/$venv" "$stamp"
    in_root /usr/bin/python3 -m venv "/opt/venvs/$venv"
    # shellcheck disable=SC2086  # the PIP ARGS are words on purpose
    in_root /bin/sh -c "cd /src && python -m pip install -q $pip_args"
    printf '%s' "$want" >"$stamp"
fi
in_root /bin/sh -c 'cd /src && exec "$@"' sh "$@"
