#!/usr/bin/env bash
# Called by csi-sanity/run.sh where device-mapper works: makes the test VGs,
# then runs csi-sanity once per class and access type, each class isolated:
# its own work directory (socket, staging and target directories, logs) and
# its own fresh driver process, stopped afterwards. What one class leaves
# behind (a volume still published, a mount, an LV) is cleaned up and
# reported before the next class starts, so it cannot fail the next one.
# Prints one summary line per class; exits non-zero if any class failed.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd -P)
repo=$(cd "$here/.." && pwd -P)
sanity=$1
shift
classes=()
while (($#)) && [[ "$1" != "--" ]]; do classes+=("$1"); shift; done
[[ "${1:-}" == "--" ]] && shift
((${#classes[@]})) || classes=(thin-mount thin-block thick-mount thick-block)

cd "$repo"
export LVM_SUPPRESS_FD_WARNINGS=1
lvm_config='activation { udev_sync = 0 udev_rules = 0 monitoring = 0 } devices { obtain_device_list_from_udev = 0 use_devicesfile = 0 }'
bash tests/vm/lvm-fixture.sh setup >/dev/null
work=$(mktemp -d /tmp/lodestone-sanity.XXXXXX)
driver_pid=
stop_driver() {
  if [[ -n "$driver_pid" ]]; then
    kill "$driver_pid" 2>/dev/null || true
    wait "$driver_pid" 2>/dev/null || true
    driver_pid=
  fi
}
# Unmounts everything below $1, deepest first; prints how many.
unmount_below() {
  local n=0 p
  while read -r p; do
    umount -l "$p" 2>/dev/null && n=$((n + 1))
  done < <(awk -v root="$1/" 'index($5, root) == 1 { print length($5), $5 }' /proc/self/mountinfo |
    sort -rn | cut -d' ' -f2-)
  echo "$n"
}
# Removes the LVs Lodestone made in the test VGs; prints how many.
remove_volumes() {
  local n=0 vg lv tags
  while read -r vg lv tags; do
    [[ "$tags" == *lodestone.v1.* ]] || continue
    lvm lvremove --config "$lvm_config" -q -y "$vg/$lv" >/dev/null 2>&1 && n=$((n + 1))
  done < <(lvm lvs --config "$lvm_config" --noheadings -o vg_name,lv_name,lv_tags \
    lodestone-thin lodestone-thick 2>/dev/null)
  echo "$n"
}
cleanup() {
  stop_driver
  unmount_below "$work" >/dev/null
  bash tests/vm/lvm-fixture.sh teardown >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

binary=${LODESTONE_SANITY_BIN:-target/debug/lodestone}
summary=()
status=0
for c in "${classes[@]}"; do
  class=${c%-*} access=${c#*-}
  cw=$work/$c
  mkdir -p "$cw"
  echo "=== csi-sanity: class $class, access type $access (work directory $cw)"
  "$binary" --endpoint "unix://$cw/csi.sock" --node-id sanity-node \
    --device-class thin=lodestone-thin/pool0 --device-class thick=lodestone-thick \
    --log-format json >"$cw/driver.log" 2>&1 &
  driver_pid=$!
  for _ in $(seq 300); do [[ -S "$cw/csi.sock" ]] && break; sleep 0.2; done
  rc=0
  "$sanity" --csi.endpoint "$cw/csi.sock" \
    --csi.testvolumeparameters "$here/$class.yaml" \
    --csi.testvolumeaccesstype "$access" \
    --csi.testvolumesize 67108864 --csi.testvolumeexpandsize 134217728 \
    --csi.stagingdir "$cw/staging" --csi.mountdir "$cw/target" \
    --ginkgo.no-color "$@" 2>&1 | tee "$cw/sanity.log" || rc=$?
  stop_driver
  counts=$(grep -Eo '[0-9]+ Passed \| [0-9]+ Failed \| [0-9]+ Pending \| [0-9]+ Skipped' \
    "$cw/sanity.log" | tail -n 1)
  [[ -n "$counts" ]] || counts="no ginkgo summary (csi-sanity exit $rc)"
  if ((rc != 0)); then
    status=1
    echo "=== FAILED: $c (driver log: last 40 lines)"
    tail -n 40 "$cw/driver.log"
    grep -E '^\s*\[FAIL\]' "$cw/sanity.log" | sort -u || true
  fi
  mounts=$(unmount_below "$cw")
  lvs=$(remove_volumes)
  leftovers=""
  ((mounts == 0 && lvs == 0)) || leftovers=" (left behind: $mounts mounts, $lvs LVs; removed)"
  summary+=("$(printf '%-12s %s -- %s%s' "$c" "$( ((rc == 0)) && echo PASS || echo FAIL)" \
    "$counts" "$leftovers")")
done
echo "=== csi-sanity summary"
printf '%s\n' "${summary[@]}"
exit $status
