#!/usr/bin/env bash
# bench/run.sh inside a virtual machine, for what this machine's limits forbid: one gateway
# holding 50,000 idle WebSockets needs 50,000 open files in one process. A container without
# CAP_SYS_RESOURCE cannot raise its open-files hard limit (`ulimit -Hn`); a guest kernel's root can.
#
#   bench/vm.sh                                   the idle-WebSocket runs: --only ws
#                                                 --ws-connections "10000 50000" --ws-connect-rate 200
#   bench/vm.sh --only ws --ws-connections 50000  any bench/run.sh flags (it runs with --skip-build)
#   bench/vm.sh --memory 8G --accel tcg ...       guest memory (default 8G); kvm or tcg (default)
#
# The guest boots Debian's kernel (apt-get download, kept in ~/.cache/fleet-bench-vm) with a
# busybox initramfs, mounts this machine's / read-only over 9p (so it runs the same release
# binaries, redis-server and scripts), mounts the output directory read-write at the same path,
# raises its limits, runs bench/run.sh there and powers off. Everything is kept in the output
# directory (default .bench/vm-<time>/), with the guest's console in console.log.
#
# Memory and capacity measured in the guest are the point; its speed is not. Software emulation
# (tcg) runs code several times slower than the machine does, and nested KVM, where offered, may
# not boot at all (seen: it hangs after the BIOS), so tcg is the default. Build the release
# binaries first (bench/run.sh does, or cargo build --release --workspace --bins).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
# shellcheck source=bench/lib.sh
source bench/lib.sh

memory=8G
accel=tcg
out=""
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --memory) memory=$2; shift 2 ;;
    --accel) accel=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
    *) args+=("$1"); shift ;;
  esac
done
# Paced: the emulated machine admits a few hundred connections a second (see docs/performance.md).
[ ${#args[@]} -gt 0 ] || args=(--only ws --ws-connections "10000 50000" --ws-connect-rate 200)
case "$accel" in kvm|tcg) ;; *) echo "--accel is kvm or tcg, not $accel" >&2; exit 2 ;; esac

bin="${CARGO_TARGET_DIR:-$root/target}/release"
case "$root $bin" in
  /tmp/*|*" /tmp/"*) echo "the guest has a /tmp of its own: keep the checkout and CARGO_TARGET_DIR outside /tmp" >&2; exit 2 ;;
esac
for b in fleet-bench edge-api ws-gateway dispatcher callback-worker exec-worker; do
  [ -x "$bin/$b" ] || { echo "$bin/$b is missing: cargo build --release --workspace --bins" >&2; exit 1; }
done

# --- what the host needs: qemu, a static busybox, cpio, and the guest's kernel ---------------
missing=()
command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
# The initramfs has no libraries: its busybox must be the static one (ldd fails on it).
{ [ -x /bin/busybox ] && ! ldd /bin/busybox >/dev/null 2>&1; } || missing+=(busybox-static)
command -v cpio >/dev/null || missing+=(cpio)
[ ${#missing[@]} -eq 0 ] || apt_install "${missing[@]}"

cache="${XDG_CACHE_HOME:-$HOME/.cache}/fleet-bench-vm"
if ! [ -d "$cache/kernel/boot" ]; then
  echo "fetching Debian's kernel (apt-get download linux-image-amd64) into $cache"
  rm -rf "$cache" && mkdir -p "$cache/debs"
  # The metapackage names the versioned package that holds the kernel and its modules.
  pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}')
  if [ -z "$pkg" ] || ! (cd "$cache/debs" && apt-get download "$pkg" >/dev/null 2>&1); then
    rm -rf "$cache"
    echo "cannot download Debian's kernel (apt-get download ${pkg:-linux-image-amd64}); run apt-get update?" >&2
    exit 1
  fi
  dpkg-deb -x "$cache"/debs/"$pkg"_*.deb "$cache/kernel.tmp" && mv "$cache/kernel.tmp" "$cache/kernel"
  rm -rf "$cache/debs"
fi
kernel=$(find "$cache/kernel/boot" -name 'vmlinuz-*' | head -1)
modules=$(find "$cache/kernel/lib/modules" -mindepth 2 -maxdepth 2 -name kernel | head -1)

out=${out:-$root/.bench/vm-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$out"
out=$(cd "$out" && pwd)
rm -f "$out/vm-rc"

# --- the initramfs: busybox, the virtio and 9p modules, and an init that runs the benchmark ---
ir=$(mktemp -d)
trap 'rm -rf "$ir"' EXIT
mkdir -p "$ir"/{bin,m,proc,sys,dev,newroot}
cp /bin/busybox "$ir/bin/"
# In load order (each after what it needs).
mods="virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci 9pnet 9pnet_virtio netfs fscache 9p"
for m in $mods; do
  f=$(find "$modules" -name "$m.ko" | head -1)
  [ -n "$f" ] || { echo "module $m.ko not found under $modules" >&2; exit 1; }
  cp "$f" "$ir/m/"
done
q() { printf '%q ' "$@"; }
cat >"$ir/init" <<EOF
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in $mods; do insmod /m/\$m.ko || echo "guest: insmod \$m failed"; done
ip link set lo up
nine="trans=virtio,version=9p2000.L,msize=512000,cache=loose"
mount -t 9p -o "\$nine,ro" hostroot /newroot
mount -t proc proc /newroot/proc; mount -t sysfs sys /newroot/sys; mount -t devtmpfs dev /newroot/dev
mkdir -p /newroot/dev/pts /newroot/dev/shm; mount -t devpts devpts /newroot/dev/pts; mount -t tmpfs shm /newroot/dev/shm
mount -t tmpfs tmp /newroot/tmp; mount -t tmpfs run /newroot/run
mkdir -p /newroot$(q "$out") 2>/dev/null; mount -t 9p -o "\$nine" out /newroot$(q "$out")
echo "guest: \$(nproc) cpus, \$(awk '/MemTotal/ {print \$2}' /proc/meminfo) kB, kernel \$(uname -r)"
chroot /newroot /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  HOME=/tmp TERM=dumb CARGO_TARGET_DIR=$(q "${CARGO_TARGET_DIR:-$root/target}") \
  /bin/bash -c 'cd "\$1" && out=\$2 && shift 2 && bench/run.sh --skip-build --out "\$out" "\$@"; echo \$? >"\$out/vm-rc"' \
  bench $(q "$root" "$out" "${args[@]}")
sync
poweroff -f
EOF
chmod +x "$ir/init"
(cd "$ir" && find . | cpio -o -H newc 2>/dev/null | gzip -1 >"$ir.cpio.gz")
trap 'rm -rf "$ir" "$ir.cpio.gz"' EXIT

accel_flags=(-accel "tcg,thread=multi")
[ "$accel" = kvm ] && accel_flags=(-enable-kvm -cpu host)
: >"$out/console.log"
# The guest's kernel would default to transparent huge pages "always"; it gets the host's mode,
# which decides how much of a process's heap is resident (RSS per connection is what is measured).
thp=$(sed -n 's/.*\[\(.*\)\].*/\1/p' /sys/kernel/mm/transparent_hugepage/enabled 2>/dev/null || true)
echo "booting the guest ($accel, $(nproc) cpus, $memory); its console is in $out/console.log"
qemu-system-x86_64 "${accel_flags[@]}" -smp "$(nproc)" -m "$memory" -nographic -no-reboot -net none \
  -kernel "$kernel" -initrd "$ir.cpio.gz" -append "console=ttyS0 quiet panic=-1${thp:+ transparent_hugepage=$thp}" \
  -fsdev "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap" \
  -device virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot \
  -fsdev "local,id=out,path=$out,security_model=none" \
  -device virtio-9p-pci,fsdev=out,mount_tag=out \
  </dev/null >>"$out/console.log" 2>&1 &
qemu=$!
tail -n +1 -f --pid "$qemu" "$out/console.log" | grep --line-buffered -v -E '^\s*$|^\x1b|SeaBIOS|iPXE|Booting from' || true
wait "$qemu" || true
rc=$(cat "$out/vm-rc" 2>/dev/null || echo "none (the guest did not finish; see $out/console.log)")
echo "guest's bench/run.sh exit status: $rc"
[ "$rc" = 0 ]
