#!/usr/bin/env bash
# Build the local base images that rfs's examples and tests use; no container registry needed.
#   rfs-test/busybox:1                      busybox-static + applet symlinks, /etc/passwd, /etc/group,
#                                           /tmp 1777; NO default command (on purpose: rfs must cope)
#   rfs-test/busybox-arm64:1                the same for linux/arm64/v8, from Debian's
#                                           busybox-static:arm64 (apt-get download; arm64 is a
#                                           foreign dpkg architecture, scripts/setup-host.sh),
#                                           loaded with its platform in the image config
#   rfs-test/debian-arm64:1                 with --arm64-debian only (110 s; the slow arm64 boot
#                                           test alone uses it): a bootable arm64 Debian:
#                                           mmdebstrap --arch=arm64 --variant=minbase with
#                                           systemd-sysv and udev (a getty on the serial
#                                           console), its packages' scripts run under
#                                           qemu-user-static; loaded with its platform like
#                                           busybox-arm64
#   docker.io/library/debian:bookworm-slim  stand-in for the official image that
#                                           examples/debian/build.toml names: mmdebstrap minbase,
#                                           CMD ["bash"] like the official one
# An image is (re)built only if it is missing or was not made by this recipe (label
# org.rfs.base-recipe); a debian:bookworm-slim without the label (a real pulled one) is kept.
# All are copied into Podman (docker save | podman load: same image IDs) when podman exists.
# Needs root (mmdebstrap, Docker). Environment: FORCE=1 rebuilds both.
#   bash scripts/make-base-images.sh [--arm64-debian]
set -euo pipefail

WITH_DEBIAN_ARM64=0
for arg in "$@"; do
    case $arg in
        --arm64-debian) WITH_DEBIAN_ARM64=1 ;;
        *) printf '[make-base-images] unknown argument %s (known: --arm64-debian)\n' "$arg" >&2; exit 2 ;;
    esac
done

DOCKER=/usr/bin/docker            # /usr/local/bin/docker may be another client
LABEL=org.rfs.base-recipe
BUSYBOX_IMAGE=rfs-test/busybox:1
BUSYBOX_RECIPE=busybox-v1
ARM64_IMAGE=rfs-test/busybox-arm64:1
ARM64_RECIPE=busybox-arm64-v1
DEBIAN_ARM64_IMAGE=rfs-test/debian-arm64:1
DEBIAN_ARM64_RECIPE=debian-arm64-systemd-v1
DEBIAN_IMAGE=docker.io/library/debian:bookworm-slim
DEBIAN_RECIPE=debian-minbase-v1
SUITE=bookworm
EPOCH=1704067200                  # fixed mtime (2024-01-01) for the busybox tree

CLEANUP=()
trap 'rm -rf "${CLEANUP[@]}"' EXIT

log() { printf '[make-base-images] %s\n' "$*" >&2; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1fs", b - a }'; }

# recipe label of an image in an engine, "" if the image has none, exit 1 if it is missing
label_of() {  # label_of docker|podman IMAGE
    local engine=$1 image=$2
    if [ "$engine" = docker ]; then
        "$DOCKER" image inspect -f "{{index .Config.Labels \"$LABEL\"}}" "$image" 2>/dev/null
    else
        podman image inspect -f "{{index .Labels \"$LABEL\"}}" "$image" 2>/dev/null
    fi | sed 's/^<no value>$//'
}

# needs_build ENGINE IMAGE RECIPE KEEP_FOREIGN: true if missing, or not ours (unless KEEP_FOREIGN)
needs_build() {
    local got
    [ "${FORCE:-0}" = 1 ] && return 0
    got=$(label_of "$1" "$2") || return 0
    [ "$got" = "$3" ] && return 1
    [ "$4" = 1 ] && [ -z "$got" ] && return 1   # someone else's image under that name: keep it
    return 0
}

make_busybox() {
    local tree bb=/bin/busybox
    [ -x "$bb" ] || { log "missing $bb: install busybox-static (scripts/setup-host.sh)"; exit 1; }
    tree=$(mktemp -d /tmp/rfs-busybox.XXXXXX)
    CLEANUP+=("$tree")
    busybox_tree "$tree" "$bb"
    tar -C "$tree" --sort=name --mtime="@$EPOCH" --owner=0 --group=0 --numeric-owner -cf - . |
        "$DOCKER" import --change "LABEL $LABEL=$BUSYBOX_RECIPE" \
            --message "rfs base: busybox-static $(dpkg-query -W -f='${Version}' busybox-static)" \
            - "$BUSYBOX_IMAGE" >/dev/null
}

# busybox_tree DIR BUSYBOX: the busybox base's tree (applets, passwd, group) in DIR
busybox_tree() {
    local tree=$1 bb=$2 path
    install -d -m 0755 "$tree"/{bin,sbin,usr/bin,usr/sbin,etc,root,dev,proc,sys,run}
    install -d -m 1777 "$tree/tmp"
    install -m 0755 "$bb" "$tree/bin/busybox"
    # every applet at its usual place (sbin/init, bin/sh, usr/bin/env, ...); the host's busybox
    # lists them (busybox-static of the same Debian release has the same applets on every arch)
    for path in $(/bin/busybox --list-full); do
        [ "$path" = bin/busybox ] || ln -s /bin/busybox "$tree/$path"
    done
    printf '%s\n' 'root:x:0:0:root:/root:/bin/sh' \
        'nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin' > "$tree/etc/passwd"
    printf '%s\n' 'root:x:0:' 'nogroup:x:65534:' > "$tree/etc/group"
    chmod 0700 "$tree/root"
}

make_busybox_arm64() {
    local work deb
    work=$(mktemp -d /tmp/rfs-busybox-arm64.XXXXXX)
    CLEANUP+=("$work")
    dpkg --print-foreign-architectures | grep -qx arm64 \
        || { log "arm64 is not a dpkg architecture here: run scripts/setup-host.sh"; exit 1; }
    chmod 0777 "$work"   # apt-get download drops privileges to _apt to write here
    (cd "$work" && apt-get download -q busybox-static:arm64 >/dev/null)
    deb=$(ls "$work"/busybox-static_*_arm64.deb)
    dpkg-deb -x "$deb" "$work/pkg"
    busybox_tree "$work/tree" "$work/pkg/bin/busybox"
    tar -C "$work/tree" --sort=name --mtime="@$EPOCH" --owner=0 --group=0 --numeric-owner \
        -cf "$work/layer.tar" .
    load_arm64 "$work" "$ARM64_IMAGE" "$ARM64_RECIPE" \
        "rfs base: busybox-static:arm64 $(dpkg-deb -f "$deb" Version)"
}

# load_arm64 DIR IMAGE RECIPE COMMENT: load DIR/layer.tar into Docker as a linux/arm64/v8 IMAGE.
# `docker import --platform` is ignored by Docker 20.10 (the image says amd64): write a
# `docker save` tarball whose config names the platform, and load it.
load_arm64() {
    local work=$1
    python3 - "$work" "$2" "$LABEL=$3" "$4" <<'PY'
import hashlib, json, sys, tarfile
work, image, label, comment = sys.argv[1:5]
key, value = label.split("=", 1)
digest = hashlib.sha256()
with open(f"{work}/layer.tar", "rb") as f:
    while chunk := f.read(1 << 20):
        digest.update(chunk)
diff_id = "sha256:" + digest.hexdigest()
config = json.dumps({
    "architecture": "arm64", "variant": "v8", "os": "linux",
    "created": "2024-01-01T00:00:00Z",
    "config": {"Labels": {key: value}},
    "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    "history": [{"created": "2024-01-01T00:00:00Z",
                 "comment": comment}],
}, sort_keys=True).encode()
name = hashlib.sha256(config).hexdigest() + ".json"
manifest = json.dumps([{"Config": name, "RepoTags": [image], "Layers": ["layer.tar"]}]).encode()
with open(f"{work}/config.json", "wb") as f:
    f.write(config)
with open(f"{work}/manifest.json", "wb") as f:
    f.write(manifest)
with tarfile.open(f"{work}/image.tar", "w") as out:
    out.add(f"{work}/config.json", arcname=name)
    out.add(f"{work}/manifest.json", arcname="manifest.json")
    out.add(f"{work}/layer.tar", arcname="layer.tar")
PY
    "$DOCKER" load -q -i "$work/image.tar" >/dev/null
}

make_debian_arm64() {
    local work
    command -v mmdebstrap >/dev/null || { log "missing mmdebstrap (scripts/setup-host.sh)"; exit 1; }
    [ "$(head -n1 /proc/sys/fs/binfmt_misc/qemu-aarch64 2>/dev/null)" = enabled ] \
        || { log "no aarch64 binfmt handler: run scripts/setup-host.sh"; exit 1; }
    work=$(mktemp -d /tmp/rfs-debian-arm64.XXXXXX)
    CLEANUP+=("$work")
    # udev: without it systemd sees no /dev/ttyAMA0 device and the serial getty never starts.
    mmdebstrap --quiet --arch=arm64 --variant=minbase --include=systemd-sysv,udev \
        "$SUITE" "$work/layer.tar"
    load_arm64 "$work" "$DEBIAN_ARM64_IMAGE" "$DEBIAN_ARM64_RECIPE" \
        "rfs base: mmdebstrap --arch=arm64 --variant=minbase --include=systemd-sysv,udev $SUITE"
}

make_debian() {
    command -v mmdebstrap >/dev/null || { log "missing mmdebstrap (scripts/setup-host.sh)"; exit 1; }
    # mmdebstrap writes sources for $SUITE, -updates and -security; it fetches from deb.debian.org.
    mmdebstrap --quiet --variant=minbase "$SUITE" - |
        "$DOCKER" import --change "LABEL $LABEL=$DEBIAN_RECIPE" --change 'CMD ["bash"]' \
            --message "rfs base: mmdebstrap --variant=minbase $SUITE" - "$DEBIAN_IMAGE" >/dev/null
}

build() {  # build IMAGE RECIPE KEEP_FOREIGN FUNCTION
    local t; t=$(now)
    if needs_build docker "$1" "$2" "$3"; then
        log "docker: building $1 ..."
        "$4"
        log "docker: built $1 in $(since "$t")"
    else
        log "docker: $1 present"
    fi
}

to_podman() {  # to_podman IMAGE: make podman hold the same image (same ID) as docker
    local t id; t=$(now)
    id=$("$DOCKER" image inspect -f '{{.Id}}' "$1")
    if [ "$(podman image inspect -f '{{.Id}}' "$1" 2>/dev/null)" = "${id#sha256:}" ]; then
        log "podman: $1 present"
        return
    fi
    "$DOCKER" save "$1" | podman load -q >/dev/null
    # podman names a loaded short name docker.io/...; give it the exact name too when it differs
    podman image exists "$1" || podman tag "${id#sha256:}" "$1"
    log "podman: loaded $1 in $(since "$t")"
}

[ "$(id -u)" -eq 0 ] || { log "run as root"; exit 1; }
"$DOCKER" info >/dev/null 2>&1 || { log "Docker is not answering: run scripts/setup-host.sh"; exit 1; }

build "$BUSYBOX_IMAGE" "$BUSYBOX_RECIPE" 0 make_busybox
build "$ARM64_IMAGE" "$ARM64_RECIPE" 0 make_busybox_arm64
if [ "$WITH_DEBIAN_ARM64" = 1 ]; then
    build "$DEBIAN_ARM64_IMAGE" "$DEBIAN_ARM64_RECIPE" 0 make_debian_arm64
fi
build "$DEBIAN_IMAGE" "$DEBIAN_RECIPE" 1 make_debian
if command -v podman >/dev/null; then
    to_podman "$BUSYBOX_IMAGE"
    to_podman "$ARM64_IMAGE"
    if [ "$WITH_DEBIAN_ARM64" = 1 ]; then
        to_podman "$DEBIAN_ARM64_IMAGE"
    fi
    to_podman "$DEBIAN_IMAGE"
fi
"$DOCKER" images --format '{{.Repository}}:{{.Tag}} {{.ID}} {{.Size}}' |
    grep -E '^(rfs-test/busybox:1|rfs-test/busybox-arm64:1|rfs-test/debian-arm64:1|debian:bookworm-slim) ' >&2 || true
