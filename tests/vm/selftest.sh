#!/usr/bin/env bash
# Prove that the guest environment can do everything Lodestone's real-kernel
# tests need.  Run it through the harness:
#
#   tests/vm/run-in-guest.sh tests/vm/selftest.sh
#
# Steps: lvm-fixture setup; thin + thick LVs with tags; JSON report; thin
# snapshot activated with -K; ext4 / xfs / btrfs mkfs + mount + write + read
# back; lvextend + resize2fs / xfs_growfs; removal; lvm-fixture teardown.
# Every lvm command's stderr is checked: any output there fails the test.
# Exit status 0 on success.
set -eEuo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
fixture=$here/lvm-fixture.sh
export LVM_SUPPRESS_FD_WARNINGS=1
work=$(mktemp -d /tmp/lodestone-selftest.XXXXXX)
thin=lodestone-thin
thick=lodestone-thick

t0=${EPOCHREALTIME/./}
step() {
  local now=${EPOCHREALTIME/./}
  printf 'selftest: [%6.2fs] %s\n' "$(((now - t0) / 10000))e-2" "$*"
}
ok() { echo "selftest:          ok: $*"; }
fail() { echo "selftest: FAIL: $*" >&2; exit 1; }
trap 'echo "selftest: FAILED (exit $?) at line $LINENO: $BASH_COMMAND" >&2' ERR

# Run an lvm command; anything on its stderr (warnings!) is a failure.
lv() {
  local err=$work/lvm.err
  if ! command lvm "$@" 2>"$err"; then
    cat "$err" >&2
    fail "lvm $*"
  fi
  if [[ -s "$err" ]]; then
    cat "$err" >&2
    fail "lvm $1 printed to stderr (see above)"
  fi
}

step "environment"
[[ "$(hostname)" != "(none)" ]] || fail "hostname not set"
[[ -e /dev/mapper/control ]] || fail "no /dev/mapper/control (dm_mod missing)"
[[ -L /dev/fd ]] || fail "/dev/fd missing"
grep -qw dm_thin_pool /proc/modules || fail "dm_thin_pool not loaded"
uname -r
ok "kernel $(uname -r), host $(hostname), $(nproc) cpus, $(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo) MiB"

step "lvm-fixture setup"
"$fixture" setup
# setup twice must be harmless
"$fixture" setup >/dev/null
lv lvs "$thin/pool0" >/dev/null

step "thin pool attributes"
attrs=$(lv lvs --noheadings -o zero,lv_when_full "$thin/pool0")
read -r zero when_full <<<"$attrs"
[[ "$zero" == zero ]] || fail "pool0 zeroing is '$zero'"
[[ "$when_full" == error ]] || fail "pool0 when_full is '$when_full'"
ok "pool0: $zero, when full: $when_full"

step "create thin LV and thick LV with tags"
lv lvcreate -q -y -V 256M -T "$thin/pool0" -n st-thin \
  --addtag lodestone.volume=st-thin --addtag lodestone.owner=selftest
lv lvcreate -q -y -L 512M -n st-thick --addtag lodestone.volume=st-thick "$thick"
lv lvcreate -q -y -V 256M -T "$thin/pool0" -n st-btrfs --addtag lodestone.volume=st-btrfs
[[ -b /dev/$thin/st-thin && -b /dev/$thick/st-thick && -b /dev/$thin/st-btrfs ]] \
  || fail "LV device nodes missing"
ok "/dev/$thin/st-thin /dev/$thick/st-thick /dev/$thin/st-btrfs"

step "JSON report"
json=$(lv lvs --reportformat json -o lv_name,vg_name,lv_tags,lv_size,pool_lv,origin,lv_attr,data_percent --units b "$thin" "$thick")
echo "$json"
grep -q '"lv_name":"st-thin"' <<<"$json" || fail "st-thin not in JSON report"
grep -q 'lodestone.owner=selftest' <<<"$json" || fail "tag missing from JSON report"
grep -q '"lv_tags":"lodestone.volume=st-thick"' <<<"$json" || fail "thick LV tag missing"
ok "report has LVs and tags"

step "ext4 on thin LV: mkfs, mount, write"
mkfs.ext4 -q -F "/dev/$thin/st-thin"
mkdir -p "$work/ext4" "$work/snap" "$work/xfs" "$work/btrfs"
mount "/dev/$thin/st-thin" "$work/ext4"
head -c 4M /dev/urandom >"$work/ext4/data"
echo "hello from lodestone" >"$work/ext4/hello"
sync
sum=$(md5sum <"$work/ext4/data")

step "thin snapshot (activated with -K), mounted read-only"
lv lvcreate -q -y -s -n st-snap --addtag lodestone.snapshot=st-snap "$thin/st-thin"
lv lvchange -q -ay -K "$thin/st-snap"
[[ -b /dev/$thin/st-snap ]] || fail "snapshot device missing"
mount -o ro,noload "/dev/$thin/st-snap" "$work/snap"
echo "changed after snapshot" >"$work/ext4/hello"
[[ "$(cat "$work/snap/hello")" == "hello from lodestone" ]] || fail "snapshot content differs"
[[ "$(md5sum <"$work/snap/data")" == "$sum" ]] || fail "snapshot data checksum differs"
umount "$work/snap"
ok "snapshot has the pre-snapshot content"

step "lvextend + online resize2fs"
before=$(df -B1 --output=size "$work/ext4" | tail -n 1)
lv lvextend -q -L +128M "$thin/st-thin"
resize2fs -f "/dev/$thin/st-thin" >/dev/null 2>&1 || fail "resize2fs"
after=$(df -B1 --output=size "$work/ext4" | tail -n 1)
((after > before)) || fail "ext4 did not grow ($before -> $after)"
[[ "$(md5sum <"$work/ext4/data")" == "$sum" ]] || fail "data changed by resize"
ok "ext4 grew $before -> $after bytes"
umount "$work/ext4"
# remount and read back
mount "/dev/$thin/st-thin" "$work/ext4"
[[ "$(cat "$work/ext4/hello")" == "changed after snapshot" ]] || fail "ext4 read-back"
umount "$work/ext4"

step "xfs on thick LV: mkfs, mount, write, grow"
mkfs.xfs -q -f "/dev/$thick/st-thick"
mount "/dev/$thick/st-thick" "$work/xfs"
echo xfs-data >"$work/xfs/f"
lv lvextend -q -L +128M "$thick/st-thick"
xfs_growfs "$work/xfs" >/dev/null || fail "xfs_growfs"
umount "$work/xfs"
mount "/dev/$thick/st-thick" "$work/xfs"
[[ "$(cat "$work/xfs/f")" == xfs-data ]] || fail "xfs read-back"
umount "$work/xfs"
ok "xfs"

step "btrfs on thin LV: mkfs, mount, write"
mkfs.btrfs -q -f "/dev/$thin/st-btrfs" >/dev/null
mount "/dev/$thin/st-btrfs" "$work/btrfs"
echo btrfs-data >"$work/btrfs/f"
sync
umount "$work/btrfs"
mount "/dev/$thin/st-btrfs" "$work/btrfs"
[[ "$(cat "$work/btrfs/f")" == btrfs-data ]] || fail "btrfs read-back"
umount "$work/btrfs"
ok "btrfs"

step "thin pool usage"
lv lvs -o lv_name,lv_size,data_percent,metadata_percent "$thin"

step "remove LVs"
lv lvremove -q -y "$thin/st-snap" "$thin/st-thin" "$thin/st-btrfs" "$thick/st-thick"
[[ ! -e /dev/$thin/st-thin ]] || fail "st-thin still has a device node"

step "lvm-fixture teardown"
"$fixture" teardown
"$fixture" teardown >/dev/null  # twice is harmless
if losetup -a | grep -q lodestone-fixture; then fail "loop devices left behind"; fi
rm -rf "$work"

step "PASS"
