#!/usr/bin/env bash
# Prepare a Debian 12 (bookworm) host for rfs, as root. Idempotent and fast when already done:
#   - Debian packages: Docker, Podman, busybox-static, mmdebstrap, e2fsprogs >= 1.47.1 (backports)
#   - arm64 emulation: qemu-user-static and binfmt-support, binfmt_misc mounted, the aarch64
#     handler registered; arm64 as a foreign dpkg architecture (the arm64 test base's package)
#   - arm64 boots: qemu-system-arm (qemu-system-aarch64) and Debian's linux-image-cloud-arm64
#     kernel with an initrd in /var/cache/rfs/boot/arm64 (scripts/arm64-kernel.sh)
#   - /etc/containers/containers.conf for Podman (only if missing)
#   - dockerd and the Podman API socket, started in the background if not answering
#   - rfs, editable with its dev extras, in a venv made from Debian's own /usr/bin/python3
#     (3.11.2 on Debian 12: the interpreter a Debian user has), linked as /usr/local/bin/rfs
# Environment: RFS_VENV (default /opt/rfs/venv), PYTHON (interpreter the venv is made from;
# default /usr/bin/python3), RFS_EXTRA_PACKAGES (more Debian packages), RFS_ENGINE_WAIT_S
# (default 60).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DOCKER=/usr/bin/docker            # /usr/local/bin/docker may be another client: never rely on PATH
PODMAN_SOCK=/run/podman/podman.sock
DOCKERD_LOG=/var/log/rfs-dockerd.log
PODMAN_LOG=/var/log/rfs-podman-service.log
WAIT_S=${RFS_ENGINE_WAIT_S:-60}
E2FS_MIN=1.47.1                   # first e2fsprogs whose mke2fs -d reads a tarball / stdin

export DEBIAN_FRONTEND=noninteractive NEEDRESTART_MODE=a
export PIP_NO_INPUT=1 PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
VENV=${RFS_VENV:-/opt/rfs/venv}
PYTHON=${PYTHON:-/usr/bin/python3}

log() { printf '[setup-host] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (sudo bash scripts/setup-host.sh)"
[ -r /etc/os-release ] && . /etc/os-release
[ "${VERSION_CODENAME:-}" = bookworm ] || log "warning: written for Debian 12 (bookworm), found ${PRETTY_NAME:-unknown}"

# Packages rfs, its tests and its examples need. Append here (or use RFS_EXTRA_PACKAGES).
PACKAGES=(docker.io podman busybox-static mmdebstrap squashfs-tools-ng ca-certificates git)
# Every image type's mkfs and checker (fakeroot hands staged owners to mkfs.erofs/mkfs.btrfs),
# and QEMU with Debian's cloud kernel for `rfs boot` and the boot test.
PACKAGES+=(btrfs-progs xfsprogs squashfs-tools erofs-utils dosfstools mtools fakeroot)
PACKAGES+=(qemu-system-x86 linux-image-cloud-amd64)
# `rfs boot` of arm64 images: qemu-system-aarch64 (its kernel: scripts/arm64-kernel.sh, below;
# cpio makes that kernel's initrd).
PACKAGES+=(qemu-system-arm cpio)
# Commands of other architectures (container.platform = "linux/arm64") run under QEMU's user
# mode emulation, registered with binfmt_misc (the F flag: it works inside containers).
PACKAGES+=(qemu-user-static binfmt-support)
# The remote cache servers of cache/, which the integration tests start (never as services).
PACKAGES+=(nginx docker-registry)
# rfs graph's svg/png (Graphviz); the tests of the live display and of shell completion.
PACKAGES+=(graphviz tmux zsh fish)
# Debian's Python and its venv module (ensurepip lives in python3-venv on Debian).
PACKAGES+=(python3 python3-venv)
# shellcheck disable=SC2206
PACKAGES+=(${RFS_EXTRA_PACKAGES:-})

# --- Debian packages ---------------------------------------------------------------------------
installed() { [ "$(dpkg-query -W -f='${db:Status-Abbrev}' "$1" 2>/dev/null)" = "ii " ]; }
e2fs_ok() {
    local v; v=$(dpkg-query -W -f='${Version}' e2fsprogs 2>/dev/null) || return 1
    dpkg --compare-versions "$v" ge "$E2FS_MIN"
}
missing=()
for p in "${PACKAGES[@]}"; do installed "$p" || missing+=("$p"); done
# scripts/make-base-images.sh downloads busybox-static:arm64 for the arm64 test base.
foreign_arch=
dpkg --print-foreign-architectures | grep -qx arm64 || foreign_arch=1

if [ ${#missing[@]} -gt 0 ] || [ -n "$foreign_arch" ] || ! e2fs_ok; then
    if [ -n "$foreign_arch" ]; then
        log "dpkg --add-architecture arm64"
        dpkg --add-architecture arm64
    fi
    # bookworm-backports carries e2fsprogs 1.47.2; add it once, on the mirror the host already uses.
    if ! grep -rqs --include='*.sources' --include='*.list' 'bookworm-backports' \
            /etc/apt/sources.list /etc/apt/sources.list.d/; then
        mirror=$(awk '/^URIs:/ && $2 ~ /\/debian\/?$/ {print $2; exit}' \
                 /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
        mirror=${mirror:-http://deb.debian.org/debian}
        log "adding bookworm-backports ($mirror)"
        cat > /etc/apt/sources.list.d/bookworm-backports.sources <<EOF
Types: deb
URIs: $mirror
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    fi
    # No init system starts services in containers/CI VMs; keep apt from trying (we start them).
    created_policy=
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d
        created_policy=1
    fi
    trap '[ -n "${created_policy:-}" ] && rm -f /usr/sbin/policy-rc.d' EXIT
    log "apt-get install ${missing[*]:-} e2fsprogs(bookworm-backports)"
    apt-get update -q
    [ ${#missing[@]} -eq 0 ] || apt-get install -y -q "${missing[@]}"
    e2fs_ok || apt-get install -y -q -t bookworm-backports e2fsprogs
    [ -n "$created_policy" ] && rm -f /usr/sbin/policy-rc.d
    created_policy=
    e2fs_ok || die "e2fsprogs >= $E2FS_MIN still missing"
else
    log "Debian packages present (e2fsprogs $(dpkg-query -W -f='${Version}' e2fsprogs))"
fi

# --- arm64 emulation --------------------------------------------------------------------------
# Installing qemu-user-static registers its handlers only where binfmt_misc is mounted and
# systemd-binfmt or update-binfmts ran; in containers and CI VMs without systemd, neither may
# have happened: mount it, and register the aarch64 handler from Debian's own definition.
BINFMT=/proc/sys/fs/binfmt_misc
if [ ! -e "$BINFMT/register" ]; then
    log "mounting binfmt_misc at $BINFMT"
    mount -t binfmt_misc binfmt_misc "$BINFMT" || die "cannot mount binfmt_misc at $BINFMT"
fi
aarch64_enabled() { [ "$(head -n1 "$BINFMT/qemu-aarch64" 2>/dev/null)" = enabled ]; }
if aarch64_enabled; then
    log "the aarch64 binfmt handler is registered"
else
    log "registering the aarch64 binfmt handler (qemu-user-static)"
    if [ -e "$BINFMT/qemu-aarch64" ]; then
        echo 1 > "$BINFMT/qemu-aarch64"   # registered, but disabled
    else
        update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || true
    fi
    aarch64_enabled || cat /usr/lib/binfmt.d/qemu-aarch64.conf > "$BINFMT/register"
    aarch64_enabled || die "the aarch64 binfmt handler is not registered ($BINFMT/qemu-aarch64)"
fi

# --- the arm64 kernel of `rfs boot` --------------------------------------------------------------
# Debian's linux-image-cloud-arm64, downloaded (never installed: this is not an arm64 host) with
# an initrd for its virtio_blk module; nothing is done when the current version is there.
bash "$ROOT/scripts/arm64-kernel.sh"

# --- Podman configuration ----------------------------------------------------------------------
if [ ! -e /etc/containers/containers.conf ]; then
    log "writing /etc/containers/containers.conf"
    mkdir -p /etc/containers
    cat > /etc/containers/containers.conf <<'EOF'
# Written by rfs scripts/setup-host.sh: Podman 4.3 on Debian 12 without systemd.
[containers]
default_ulimits = []

[engine]
runtime = "runc"
EOF
fi

# --- the rfs package: a venv of Debian's Python -------------------------------------------------
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11, 2))' \
    || die "$PYTHON is $("$PYTHON" --version 2>&1); rfs needs Python >= 3.11.2 (pyproject.toml)"
# A venv keeps rfs's dependencies away from Debian's "externally managed" python3 and follows
# its interpreter: made again only when missing or made from another interpreter.
if [ ! -x "$VENV/bin/python" ] \
        || [ "$(readlink -f "$VENV/bin/python")" != "$(readlink -f "$PYTHON")" ]; then
    log "creating the venv $VENV from $PYTHON ($("$PYTHON" --version))"
    rm -rf "$VENV"
    mkdir -p "$(dirname "$VENV")"
    "$PYTHON" -m venv "$VENV"
fi
VPY=$VENV/bin/python
# Installed (editable) from this clone with everything the tests import? Asked from / so that
# the working directory's rfs/ cannot answer for the installed one.
installed_here() {
    (cd / && "$VPY" -c 'import sys, pathlib, rfs, pytest, hypothesis, jsonschema
sys.exit(pathlib.Path(rfs.__file__).resolve().parent != pathlib.Path(sys.argv[1], "rfs"))' \
        "$ROOT") 2>/dev/null
}
stamp="$VENV/rfs-setup.stamp"   # the pyproject.toml it was installed from: dependencies change
want="$ROOT $(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && installed_here; then
    log "rfs already installed in $VENV"
else
    log "pip install -e '.[dev]' into $VENV"
    (cd "$ROOT" && "$VPY" -m pip install -q -e '.[dev]')
    installed_here || die "rfs in $VENV does not import from $ROOT"
    printf '%s\n' "$want" > "$stamp"
fi
# An editable install is not byte-compiled, and with PYTHONDONTWRITEBYTECODE set Python never
# caches it: every rfs command would compile the package again (about 0.1 s).
"$VPY" -m compileall -q "$ROOT/rfs" >/dev/null
ln -sfn "$VENV/bin/rfs" /usr/local/bin/rfs

# --- engines -----------------------------------------------------------------------------------
wait_for() {  # wait_for DESCRIPTION LOGFILE PID COMMAND...: poll up to WAIT_S s while PID lives
    local what=$1 logfile=$2 pid=$3 i; shift 3
    for ((i = 0; i < WAIT_S * 4; i++)); do
        "$@" >/dev/null 2>&1 && return 0
        kill -0 "$pid" 2>/dev/null || { log "$what exited"; break; }
        sleep 0.25
    done
    log "$what did not come up (limit ${WAIT_S}s); last lines of $logfile:"
    tail -n 20 "$logfile" >&2 || true
    return 1
}

if "$DOCKER" info >/dev/null 2>&1; then
    log "dockerd is running"
else
    log "starting dockerd (log: $DOCKERD_LOG)"
    # own session: outlives this script and its terminal
    setsid dockerd </dev/null >>"$DOCKERD_LOG" 2>&1 &
    wait_for dockerd "$DOCKERD_LOG" $! "$DOCKER" info || die "dockerd failed to start"
fi

podman_up() { podman --remote --url "unix://$PODMAN_SOCK" version; }
if podman_up >/dev/null 2>&1; then
    log "podman API socket is up ($PODMAN_SOCK)"
else
    log "starting podman system service at $PODMAN_SOCK (log: $PODMAN_LOG)"
    mkdir -p "$(dirname "$PODMAN_SOCK")"
    rm -f "$PODMAN_SOCK"   # stale socket of a dead service
    setsid podman system service --time=0 "unix://$PODMAN_SOCK" </dev/null >>"$PODMAN_LOG" 2>&1 &
    wait_for "podman API socket" "$PODMAN_LOG" $! podman_up || die "podman service failed to start"
fi

log "done: docker $("$DOCKER" version -f '{{.Server.Version}}'), $(podman --version)," \
    "mke2fs $(dpkg-query -W -f='${Version}' e2fsprogs), $("$VPY" --version) in $VENV"
