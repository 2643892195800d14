#!/usr/bin/env bash
# Install (idempotently) every Debian package the real-kernel VM harness
# (tests/vm/run-in-guest.sh) and the guest-side tests need, plus protoc for
# the Rust build.  Cheap to re-run: exits right away when all are installed.
#
# Usage: tests/vm/host-packages.sh [--with-ceph] [--print]
#   --with-ceph  also install the single-node Ceph cluster packages
#   --print      only print the package list and exit
# Extra packages may be given in LODESTONE_VM_EXTRA_PACKAGES (space separated).
# Must run as root (no sudo is used).
set -euo pipefail

packages=(
  # --- the VM itself ---
  qemu-system-x86        # qemu-system-x86_64 with virtio-9p (virtfs)
  linux-image-amd64      # guest kernel: /boot/vmlinuz-*, /lib/modules/*
  busybox-static         # initramfs userland
  kmod                   # modprobe (host: --show-depends; guest: loading)
  cpio gzip              # initramfs packing
  xz-utils zstd          # unpacking the kernel image for direct (PVH) boot
  coreutils util-linux mount iproute2 procps
  # --- storage tooling used inside the guest ---
  lvm2 dmsetup thin-provisioning-tools
  e2fsprogs xfsprogs btrfs-progs
  # --- Rust build (tonic/prost codegen needs protoc + well-known types) ---
  protobuf-compiler libprotobuf-dev
  gcc libc6-dev pkg-config
)
ceph_packages=(ceph-mon ceph-osd ceph-common rbd-nbd uuid-runtime)

for arg in "$@"; do
  case "$arg" in
    --with-ceph) packages+=("${ceph_packages[@]}") ;;
    --print) printf '%s\n' "${packages[@]}"; exit 0 ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) echo "host-packages.sh: unknown argument: $arg" >&2; exit 2 ;;
  esac
done
if [[ -n "${LODESTONE_VM_EXTRA_PACKAGES:-}" ]]; then
  read -r -a extra <<<"$LODESTONE_VM_EXTRA_PACKAGES"
  packages+=("${extra[@]}")
fi

missing=()
for p in "${packages[@]}"; do
  status=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)
  [[ "$status" == installed ]] || missing+=("$p")
done

if ((${#missing[@]} == 0)); then
  echo "host-packages.sh: all ${#packages[@]} packages already installed"
else
  if [[ $(id -u) -ne 0 ]]; then
    echo "host-packages.sh: must run as root to install: ${missing[*]}" >&2
    exit 1
  fi
  echo "host-packages.sh: installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt_opts=(-y -q -o DPkg::Lock::Timeout=600 -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)
  apt-get "${apt_opts[@]}" update
  apt-get "${apt_opts[@]}" install --no-install-recommends "${missing[@]}"
fi

# The harness boots the newest /boot/vmlinuz-* with its /lib/modules tree.
if ! compgen -G '/boot/vmlinuz-*' >/dev/null; then
  echo "host-packages.sh: no /boot/vmlinuz-* after install" >&2
  exit 1
fi
