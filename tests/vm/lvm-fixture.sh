#!/usr/bin/env bash
# Create / remove the standard LVM volume groups for Lodestone's real-kernel
# tests.  Meant to run INSIDE the guest started by tests/vm/run-in-guest.sh
# (it refuses to run elsewhere unless LODESTONE_FIXTURE_FORCE=1).
#
# Usage: tests/vm/lvm-fixture.sh setup|teardown|status
#
#   lodestone-thin   VG on a 2 GiB sparse file + loop device, with thin pool
#                    "pool0" (1.5 GiB, --zero y, --errorwhenfull y)
#   lodestone-thick  VG on a 1.5 GiB sparse file + loop device (no pool)
#   lodestone-node2  VG on a 1 GiB sparse file with thin pool "pool0" of
#                    512 MiB (the rest for thick LVs): a second node's
#                    storage in the multi-node tests
#
# The backing files live in $LODESTONE_FIXTURE_DIR (default
# /tmp/lodestone-fixture, a tmpfs in the guest: only written blocks use RAM).
# setup is idempotent (existing VGs are kept); teardown unmounts anything on
# the VGs, removes them, detaches the loops and deletes the files.
set -euo pipefail

dir=${LODESTONE_FIXTURE_DIR:-/tmp/lodestone-fixture}
thin_vg=lodestone-thin
thick_vg=lodestone-thick
node2_vg=lodestone-node2
node2_file_size=${LODESTONE_FIXTURE_NODE2_SIZE:-1G}
node2_pool_size=${LODESTONE_FIXTURE_NODE2_POOL_SIZE:-512M}
all_vgs=("$thin_vg" "$thick_vg" "$node2_vg")
thin_file_size=${LODESTONE_FIXTURE_THIN_SIZE:-2G}
thick_file_size=${LODESTONE_FIXTURE_THICK_SIZE:-1536M}
pool_size=${LODESTONE_FIXTURE_POOL_SIZE:-1536M}
pool_meta_size=${LODESTONE_FIXTURE_POOL_META_SIZE:-16M}

# Scripts may pass their own fds around; don't let lvm complain about them.
export LVM_SUPPRESS_FD_WARNINGS=1
# Work even where lvm.conf still expects udev (the harness also writes these
# into the guest's /etc/lvm/lvm.conf).
lvm_config='activation { udev_sync = 0 udev_rules = 0 monitoring = 0 } devices { obtain_device_list_from_udev = 0 use_devicesfile = 0 }'
lvm() { command lvm "$1" --config "$lvm_config" "${@:2}"; }

say() { echo "lvm-fixture: $*"; }
die() { echo "lvm-fixture: error: $*" >&2; exit 1; }

usage() { sed -n '6p' "$0" >&2; exit 2; }
(($# == 1)) || usage

if [[ "${LODESTONE_VM_GUEST:-}" != 1 && "${LODESTONE_FIXTURE_FORCE:-}" != 1 ]]; then
  die "not inside the run-in-guest.sh VM (set LODESTONE_FIXTURE_FORCE=1 to run anyway)"
fi
[[ $(id -u) -eq 0 ]] || die "must run as root"

# Each lvm command costs 0.3 s (idle host) to several seconds (busy host)
# under TCG, so this keeps the number of lvm invocations small.
existing_vgs=" $(lvm vgs --noheadings -o vg_name 2>/dev/null | tr -s ' \n' '  ') "
vg_exists() { [[ "$existing_vgs" == *" $1 "* ]]; }

# loop device(s) currently backed by FILE
loops_of() { losetup -n -O NAME -j "$1" 2>/dev/null || true; }

attach_loop() { # attach_loop FILE SIZE -> prints the loop device
  local file=$1 size=$2 loop
  mkdir -p "$dir"
  [[ -f "$file" ]] || truncate -s "$size" "$file"
  loop=$(loops_of "$file" | head -n 1)
  if [[ -z "$loop" ]]; then
    [[ -e /dev/loop-control ]] || modprobe loop 2>/dev/null || true
    loop=$(losetup -f --show "$file")
  fi
  echo "$loop"
}

setup_vg() { # setup_vg VG SIZE -> 0 if created, 1 if it already existed
  local vg=$1 size=$2 file=$dir/$1.img loop
  if vg_exists "$vg"; then
    say "VG $vg already exists"
    return 1
  fi
  loop=$(attach_loop "$file" "$size")
  # vgcreate initialises the PV itself (implicit pvcreate)
  lvm vgcreate -q -y "$vg" "$loop" >/dev/null
  say "created VG $vg on $loop ($file, $size sparse)"
}

make_pool() { # make_pool VG SIZE
  lvm lvcreate -q -y --type thin-pool -L "$2" --poolmetadatasize "$pool_meta_size" \
    --zero y -n pool0 "$1" >/dev/null
  # lvcreate (2.03.16) rejects --errorwhenfull for thin pools; lvchange takes it
  lvm lvchange -q --errorwhenfull y "$1/pool0" >/dev/null
  say "created thin pool $1/pool0 ($2, zeroing on, error when full)"
}

setup_thin_vg() { # setup_thin_vg VG FILE_SIZE POOL_SIZE
  local need_pool=1
  if ! setup_vg "$1" "$2"; then
    lvm lvs "$1/pool0" >/dev/null 2>&1 && need_pool=0
  fi
  if ((need_pool)); then make_pool "$1" "$3"; fi
}

setup() {
  setup_thin_vg "$thin_vg" "$thin_file_size" "$pool_size"
  setup_vg "$thick_vg" "$thick_file_size" || true
  setup_thin_vg "$node2_vg" "$node2_file_size" "$node2_pool_size"
  status
}

status() {
  lvm vgs -o vg_name,pv_name,vg_size,vg_free,lv_count "${all_vgs[@]}" 2>/dev/null || true
  lvm lvs -o vg_name,lv_name,lv_attr,lv_size,data_percent,zero,lv_when_full \
    "${all_vgs[@]}" 2>/dev/null || true
}

teardown() {
  local vg vgs=() mapper dev mp loop file
  for vg in "${all_vgs[@]}"; do
    mapper=/dev/mapper/${vg//-/--}-
    # unmount whatever is mounted from this VG (innermost first)
    while read -r dev mp _; do
      if [[ "$dev" == "$mapper"* || "$dev" == /dev/"$vg"/* ]]; then echo "$mp"; fi
    done </proc/self/mounts | sort -r | while read -r mp; do
      umount "$mp" 2>/dev/null || umount -l "$mp" || true
    done
    vg_exists "$vg" && vgs+=("$vg")
  done
  if ((${#vgs[@]})); then
    lvm vgremove -q -y -ff "${vgs[@]}" >/dev/null
    say "removed VG ${vgs[*]}"
  fi
  # stale device-mapper devices (e.g. after a crashed test)
  dmsetup ls 2>/dev/null | while read -r dev _; do
    for vg in "${all_vgs[@]}"; do
      if [[ "$dev" == "${vg//-/--}-"* ]]; then dmsetup remove --force "$dev" 2>/dev/null || true; fi
    done
  done
  for vg in "${all_vgs[@]}"; do
    file=$dir/$vg.img
    for loop in $(loops_of "$file"); do
      losetup -d "$loop" && say "detached $loop"
    done
    rm -f "$file"
  done
  rmdir "$dir" 2>/dev/null || true
}

case "$1" in
  setup) setup ;;
  teardown) teardown ;;
  status) status ;;
  *) usage ;;
esac
