#!/usr/bin/env bash
# Build a stock Debian kernel and a busybox initramfs for consnap's Linux
# tests, from Debian packages, without installing anything on the host
# (apt-get download + dpkg -x). Output, in target/linux/:
#   bzImage            the packaged kernel (Linux 64-bit boot protocol)
#   vmlinux            the same kernel uncompressed; boots through its PVH note
#   initramfs.cpio.gz  busybox; /init prints a marker and reboots
# Needs: apt-get, dpkg, cpio, gzip, lz4 (and xz/zstd for other kernels);
# scripts/deps.sh checks or installs them.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
out=${CONSNAP_LINUX_DIR:-$root/target/linux}
flavour=${CONSNAP_LINUX_FLAVOUR:-cloud-amd64}

if [[ -s $out/bzImage && -s $out/vmlinux && -s $out/initramfs.cpio.gz ]]; then
    echo "fetch-linux: using $out"
    exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"

# The metapackage names the current kernel package.
resolve() { apt-cache depends "linux-image-$flavour" 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}'; }
pkg=$(resolve)
if [[ -z $pkg && $(id -u) -eq 0 ]]; then
    # A fresh machine may have no package lists yet.
    apt-get update -qq
    pkg=$(resolve)
fi
[[ -n $pkg ]] || { echo "fetch-linux: cannot resolve linux-image-$flavour (run apt-get update)" >&2; exit 1; }
apt-get download "$pkg" busybox-static >/dev/null 2>&1 || apt-get download "$pkg" busybox-static
dpkg -x "$pkg"_*.deb kernel
dpkg -x busybox-static_*.deb busybox

mkdir -p "$out"
cp kernel/boot/vmlinuz-* "$out/bzImage.tmp"

# Uncompress: the payload's offset and length are in the setup header
# (payload_offset at 0x248, payload_length at 0x24c, after (setup_sects+1)*512).
u8() { od -An -tu1 -j "$2" -N 1 "$1" | tr -d ' '; }
u32() { od -An -tu4 -j "$2" -N 4 "$1" | tr -d ' '; }
img="$out/bzImage.tmp"
setup_sects=$(u8 "$img" $((0x1f1)))
[[ $setup_sects -ne 0 ]] || setup_sects=4
start=$(( (setup_sects + 1) * 512 + $(u32 "$img" $((0x248))) ))
dd if="$img" of=payload.bin bs=64K iflag=skip_bytes,count_bytes skip="$start" count="$(u32 "$img" $((0x24c)))" status=none
magic=$(head -c 6 payload.bin | od -An -tx1 | tr -d ' \n')
case $magic in
    # The kernel appends the uncompressed size after the lz4 stream, which lz4 reports as an error.
    02214c18*) lz4 -dc payload.bin > vmlinux 2>/dev/null || true ;;
    fd377a585a00) xz -dc payload.bin > vmlinux ;;
    28b52ffd*) zstd -dc payload.bin > vmlinux ;;
    1f8b*) gzip -dc payload.bin > vmlinux ;;
    *) echo "fetch-linux: unknown kernel compression (magic $magic)" >&2; exit 1 ;;
esac
head -c 4 vmlinux | grep -q ELF || { echo "fetch-linux: decompressed kernel is not an ELF" >&2; exit 1; }

# Busybox initramfs whose init proves userspace ran, then reboots (reboot=k
# makes that an i8042 reset, which ends the consnap run).
mkdir -p rootfs/bin rootfs/proc rootfs/sys rootfs/dev
cp busybox/bin/busybox rootfs/bin/busybox
for t in sh mount echo uname reboot; do ln -s busybox "rootfs/bin/$t"; done
cat > rootfs/init <<'INIT'
#!/bin/sh
mount -t proc proc /proc
echo "consnap-linux: init running on $(uname -r)"
reboot -f
INIT
chmod +x rootfs/init
(cd rootfs && find . | cpio -o -H newc --quiet | gzip -9) > initramfs.cpio.gz

mv vmlinux "$out/vmlinux"
mv initramfs.cpio.gz "$out/initramfs.cpio.gz"
mv "$out/bzImage.tmp" "$out/bzImage"
echo "fetch-linux: $pkg -> $out"
