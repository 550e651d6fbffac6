#!/usr/bin/env bash
# Fetch the kernel `rfs boot` uses for arm64 images: Debian's linux-image-cloud-arm64 (the
# package the meta-package points at, `apt-get download` from the host's Debian mirror; arm64
# is a foreign dpkg architecture, scripts/setup-host.sh), unpacked into $RFS_ARM64_BOOT_DIR
# (default /var/cache/rfs/boot/arm64) as vmlinuz-VERSION, with an initrd made here:
# installing the package would run Debian's mkinitramfs, which needs an arm64 userland. Debian's
# cloud kernel has virtio, virtio_blk and every filesystem but ext4 as modules: the initrd holds
# busybox-static:arm64, those modules (and what they depend on) and an /init that loads
# virtio_blk and the root filesystem's module (rootfstype=), mounts root= and switch_roots to
# init= (default /sbin/init). Idempotent: nothing is done when that version is there already.
# Needs root (mknod /dev/console in the initrd). Environment: RFS_ARM64_BOOT_DIR, FORCE=1.
set -euo pipefail

OUT=${RFS_ARM64_BOOT_DIR:-/var/cache/rfs/boot/arm64}
META=linux-image-cloud-arm64:arm64
# The root filesystems rfs makes (ext4 is built in) and the virtio transports of `-M virt`.
MODULES=(virtio_pci virtio_mmio virtio_blk squashfs erofs btrfs xfs vfat nls_cp437 nls_utf8)

log() { printf '[arm64-kernel] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root"
dpkg --print-foreign-architectures | grep -qx arm64 \
    || die "arm64 is not a dpkg architecture here: run scripts/setup-host.sh"

# The versioned package the meta-package depends on (linux-image-6.1.0-NN-cloud-arm64).
pkg=$(apt-cache depends "$META" | awk '$1 == "Depends:" && $2 ~ /^linux-image-/ {print $2; exit}')
[ -n "$pkg" ] || die "apt-cache knows no $META (apt-get update?)"
pkg=${pkg%:arm64}
version=${pkg#linux-image-}
if [ "${FORCE:-0}" != 1 ] && [ -f "$OUT/vmlinuz-$version" ] && [ -f "$OUT/initrd.img-$version" ]; then
    log "$OUT holds $version already"
    exit 0
fi

work=$(mktemp -d /tmp/rfs-arm64-kernel.XXXXXX)
trap 'rm -rf "$work"' EXIT
chmod 0777 "$work"   # apt-get download drops privileges to _apt to write here
(cd "$work" && apt-get download -q "$pkg:arm64" busybox-static:arm64 >/dev/null)
dpkg-deb -x "$work/${pkg}"_*_arm64.deb "$work/kernel"
dpkg-deb -x "$work"/busybox-static_*_arm64.deb "$work/busybox"
moddir=lib/modules/$version
[ -f "$work/kernel/boot/vmlinuz-$version" ] || die "$pkg has no /boot/vmlinuz-$version"

# The initrd's tree: busybox, the modules (in their places, with a modules.dep), /dev/console.
tree=$work/initrd
install -d -m 0755 "$tree"/{bin,dev,proc,sys,newroot,"$moddir"}
install -m 0755 "$work/busybox/bin/busybox" "$tree/bin/busybox"
mknod -m 0600 "$tree/dev/console" c 5 1
depmod -b "$work/kernel" "$version"
for module in "${MODULES[@]}"; do
    modprobe -d "$work/kernel" -S "$version" --show-depends "$module" |
        awk '$1 == "insmod" {print $2}'
done | sort -u | while read -r path; do
    rel=${path#"$work/kernel/"}
    install -D -m 0644 "$path" "$tree/$rel"
done
cp "$work/kernel/$moddir"/modules.{order,builtin,builtin.modinfo} "$tree/$moddir/"
depmod -b "$tree" "$version"
cat > "$tree/init" <<'EOF'
#!/bin/busybox sh
# rfs's initrd (scripts/arm64-kernel.sh): virtio_blk and the root filesystem are modules.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
root= fstype= mode=ro init=/sbin/init
for arg in $(cat /proc/cmdline); do
    case $arg in
        root=*) root=${arg#root=} ;;
        rootfstype=*) fstype=${arg#rootfstype=} ;;
        init=*) init=${arg#init=} ;;
        ro|rw) mode=$arg ;;
    esac
done
modprobe virtio_pci; modprobe virtio_mmio; modprobe virtio_blk
[ -z "$fstype" ] || [ "$fstype" = ext4 ] || modprobe "$fstype"
[ "$fstype" != vfat ] || { modprobe nls_cp437; modprobe nls_utf8; }
i=0
while [ ! -b "$root" ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
if ! mount ${fstype:+-t "$fstype"} -o "$mode" "$root" /newroot; then
    echo "rfs initrd: cannot mount root=$root (rootfstype=$fstype)"
    exit 1   # the kernel panics; with panic=-1 and -no-reboot, QEMU stops
fi
umount /proc /sys /dev
exec switch_root /newroot "$init"
EOF
chmod 0755 "$tree/init"

install -d -m 0755 "$OUT"
(cd "$tree" && find . | LC_ALL=C sort | cpio --quiet -o -H newc --owner 0:0 | gzip -9n) \
    > "$work/initrd.img"
install -m 0644 "$work/kernel/boot/vmlinuz-$version" "$OUT/vmlinuz-$version"
install -m 0644 "$work/initrd.img" "$OUT/initrd.img-$version"
log "$OUT: vmlinuz-$version, initrd.img-$version ($(du -h "$OUT/initrd.img-$version" | cut -f1))"
