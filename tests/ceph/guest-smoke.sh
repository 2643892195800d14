#!/usr/bin/env bash
# Kernel RBD smoke test; runs INSIDE the QEMU guest (the host kernel has no
# rbd driver):
#
#   tests/vm/run-in-guest.sh bash tests/ceph/guest-smoke.sh
#
# Starts the single-node cluster in /tmp/ceph (guest tmpfs), then as
# client.lodestone: creates rbd/img, `rbd map --options noudev` (no udev in
# the guest: without noudev, map waits for udev forever), mkfs.ext4, mount,
# writes and reads back a file, umount, `rbd unmap --options noudev`, removes
# the image and stops the cluster.  Prints the time of every step.
#
#   LODESTONE_CEPH_DIR   cluster dir (default /tmp/ceph)
#   LODESTONE_CEPH_MGR   default 0 here: krbd needs no mgr, and under TCG the
#                        mgr's Python modules take minutes to load

# Exit status 0 on success.
set -eEuo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
export LODESTONE_CEPH_DIR=${LODESTONE_CEPH_DIR:-/tmp/ceph}
export LODESTONE_CEPH_MGR=${LODESTONE_CEPH_MGR:-0}
cluster=$here/cluster.sh

fail() { echo "guest-smoke: FAIL: $*" >&2; exit 1; }
[[ "${LODESTONE_VM_GUEST:-}" == 1 || "${LODESTONE_CEPH_FORCE:-}" == 1 ]] \
  || fail "run me inside the VM: tests/vm/run-in-guest.sh bash $0 (or set LODESTONE_CEPH_FORCE=1)"
[[ $(id -u) -eq 0 ]] || fail "must run as root (rbd map, mount)"

t0=${EPOCHREALTIME/./}
elapsed() {
  local d=$(( ${EPOCHREALTIME/./} - $1 ))
  printf '%d.%02d' $((d / 1000000)) $(((d % 1000000) / 10000))
}
step() {
  local desc=$1 s=${EPOCHREALTIME/./}
  shift
  "$@"
  printf 'guest-smoke: %-40s %6ss\n' "$desc" "$(elapsed "$s")"
}
trap 'echo "guest-smoke: FAILED (exit $?) at line $LINENO: $BASH_COMMAND" >&2' ERR

echo "guest-smoke: kernel $(uname -r), host $(hostname), $(nproc) cpus"
mnt=/tmp/guest-smoke-mnt
dev=
started=0
cleanup() {
  # best effort, in dependency order: the cluster must outlive the mapping
  mountpoint -q "$mnt" 2>/dev/null && umount "$mnt"
  [[ -n "$dev" && -b "$dev" ]] && rbd unmap --options noudev "$dev" 2>/dev/null
  ((started)) && "$cluster" stop "$LODESTONE_CEPH_DIR" >/dev/null
  # the guest's /tmp dies with it: keep the cluster logs (no keys in them)
  # in the harness's share dir (kept on failure or with LODESTONE_VM_KEEP=1)
  if [[ -n "${LODESTONE_VM_SHARE:-}" && -d "$LODESTONE_CEPH_DIR/log" ]]; then
    cp -r "$LODESTONE_CEPH_DIR/log" "$LODESTONE_VM_SHARE/ceph-log" 2>/dev/null
  fi
  return 0
}
trap cleanup EXIT

step "cluster start" "$cluster" start "$LODESTONE_CEPH_DIR"
started=1
eval "$("$cluster" env "$LODESTONE_CEPH_DIR")"
r() { rbd --id "$LODESTONE_CEPH_USER" --keyring "$LODESTONE_CEPH_KEYRING" "$@"; }
img=$LODESTONE_CEPH_POOL/img

step "modprobe rbd" modprobe rbd
step "rbd create --size 64M $img" r create --size 64M "$img"
map() { dev=$(r map --options noudev "$img"); }
step "rbd map --options noudev $img" map
[[ "$dev" == /dev/rbd* && -b "$dev" ]] || fail "rbd map gave '$dev'"
echo "guest-smoke: mapped $img at $dev"
r showmapped
step "mkfs.ext4 $dev" mkfs.ext4 -q -F "$dev"
mkdir -p "$mnt"
step "mount" mount "$dev" "$mnt"
payload="lodestone guest smoke $(date +%s%N)"
write() { printf '%s\n' "$payload" >"$mnt/hello.txt"; head -c 8M /dev/urandom >"$mnt/blob"; sync; }
step "write + sync (8 MiB)" write
sum=$(md5sum <"$mnt/blob")
step "umount" umount "$mnt"
# remount: the data must come from the RBD image, not the page cache
step "mount again" mount "$dev" "$mnt"
[[ "$(cat "$mnt/hello.txt")" == "$payload" ]] || fail "file content differs after remount"
[[ "$(md5sum <"$mnt/blob")" == "$sum" ]] || fail "blob checksum differs after remount"
echo "guest-smoke: read back ok"
step "umount" umount "$mnt"
step "rbd unmap --options noudev $dev" r unmap --options noudev "$dev"
dev=
[[ -z "$(r showmapped)" ]] || fail "still mapped: $(r showmapped)"
step "rbd rm $img" r rm --no-progress "$img"
step "cluster stop" "$cluster" stop "$LODESTONE_CEPH_DIR"
started=0
echo "guest-smoke: PASS in $(elapsed "$t0")s"
