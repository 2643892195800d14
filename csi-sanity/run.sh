#!/usr/bin/env bash
# Runs a csi-sanity binary you provide against Lodestone on real LVM.
#
#   csi-sanity/run.sh /path/to/csi-sanity [CLASS...] [-- extra csi-sanity flags]
#
# CLASS is thin-mount, thin-block, thick-mount or thick-block (default: all
# four), or rbd-mount / rbd-block for the RBD driver (against a throw-away
# single-node Ceph cluster; give them alone). The driver and csi-sanity run
# inside the QEMU guest used by the test suite (this host's kernel may lack
# device-mapper and krbd); where the kernel has device-mapper and you are
# root, the LVM modes run directly on this machine instead, on loop devices
# the script creates and removes.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd -P)
repo=$(cd "$here/.." && pwd -P)
(($# >= 1)) || { sed -n '4,12p' "$0" >&2; exit 2; }
sanity=$(cd "$(dirname "$1")" && pwd -P)/$(basename "$1")
shift
[[ -x "$sanity" ]] || { echo "not executable: $sanity" >&2; exit 2; }

cd "$repo"
# One class takes several minutes under emulation: give the guest about 15
# minutes per class unless told otherwise.
n=0
for a in "$@"; do [[ "$a" == "--" ]] && break; n=$((n + 1)); done
((n > 0)) || n=4
export LODESTONE_VM_TIMEOUT=${LODESTONE_VM_TIMEOUT:-$((900 * n + 600))}
if [[ "${1:-}" == rbd-* ]]; then
  # with ceph-mgr: GetCapacity reads the pool's MAX AVAIL from the mgr's
  # statistics (without a mgr it is UNAVAILABLE, and csi-sanity wants OK)
  bash tests/ceph/packages.sh >/dev/null
  CARGO_TARGET_DIR=target/rbd cargo build --locked --features rbd --bin lodestone
  bash tests/vm/host-packages.sh >/dev/null
  exec bash tests/vm/run-in-guest.sh bash "$here/guest-run-rbd.sh" "$sanity" "$@"
fi
cargo build --locked --bin lodestone
if [[ -e /sys/class/misc/device-mapper && $(id -u) == 0 ]]; then
  exec bash "$here/guest-run.sh" "$sanity" "$@"
fi
bash tests/vm/host-packages.sh >/dev/null
exec bash tests/vm/run-in-guest.sh bash "$here/guest-run.sh" "$sanity" "$@"
