#!/usr/bin/env bash
# Called by csi-sanity/run.sh for the rbd-* modes, inside the QEMU guest (or
# on a host whose kernel has krbd): starts a single-node Ceph cluster, the
# RBD driver (controller and node in one process) and runs csi-sanity once
# per access type, each isolated: its own work directory (socket, staging and
# target directories, logs) and its own fresh driver process, stopped
# afterwards; mounts one mode leaves behind are removed and reported before
# the next starts. The secrets file csi-sanity reads is written at run time
# from the test cluster's keyring into a private directory and removed
# afterwards; no key is ever committed or printed. Prints one summary line
# per mode; exits non-zero if any mode failed.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd -P)
repo=$(cd "$here/.." && pwd -P)
sanity=$1
shift
modes=()
while (($#)) && [[ "$1" != "--" ]]; do modes+=("$1"); shift; done
[[ "${1:-}" == "--" ]] && shift
((${#modes[@]})) || modes=(rbd-mount rbd-block)

cd "$repo"
# With a mgr: GetCapacity answers the pool's MAX AVAIL from the mgr's
# statistics, UNAVAILABLE without them, and csi-sanity expects OK. Under
# emulation the mgr adds about a minute to the start (minutes on a busy host).
export LODESTONE_CEPH_DIR=${LODESTONE_CEPH_DIR:-/tmp/ceph-sanity} LODESTONE_CEPH_MGR=1
bash tests/ceph/cluster.sh start >/dev/null
modprobe rbd 2>/dev/null || true
work=$(mktemp -d /tmp/lodestone-sanity-rbd.XXXXXX)
chmod 700 "$work"
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
cleanup() {
  stop_driver
  unmount_below "$work" >/dev/null
  bash tests/ceph/cluster.sh stop >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
eval "$(bash tests/ceph/cluster.sh env)"

key=$(sed -n 's/^[[:space:]]*key[[:space:]]*=[[:space:]]*//p' "$LODESTONE_CEPH_KEYRING" | head -n 1)
mkdir -m 700 "$work/secret"
printf '%s' "$LODESTONE_CEPH_USER" >"$work/secret/userID"
(umask 077 && printf '%s' "$key" >"$work/secret/userKey")
printf '[{"clusterID": "sanity", "monitors": ["%s"], "pools": ["%s"]}]\n' \
  "$LODESTONE_CEPH_MON_HOST" "$LODESTONE_CEPH_POOL" >"$work/config.json"
if [[ "$LODESTONE_CEPH_POOL" != rbd ]]; then
  echo "csi-sanity/rbd.yaml names pool rbd; this cluster's is $LODESTONE_CEPH_POOL" >&2
  exit 1
fi
# csi-sanity's secrets file (shape: rbd-secrets.example.yaml): the same user
# for every call that takes secrets.
(
  umask 077
  for call in CreateVolumeSecret DeleteVolumeSecret ControllerPublishVolumeSecret \
      ControllerUnpublishVolumeSecret ControllerValidateVolumeCapabilitiesSecret \
      NodeStageVolumeSecret NodePublishVolumeSecret CreateSnapshotSecret \
      DeleteSnapshotSecret ControllerExpandVolumeSecret NodeExpandVolumeSecret \
      ListSnapshotsSecret; do
    printf '%s:\n  userID: %s\n  userKey: %s\n' "$call" "$LODESTONE_CEPH_USER" "$key"
  done >"$work/secrets.yaml"
)
unset key

binary=${LODESTONE_SANITY_BIN:-target/rbd/debug/lodestone}
summary=()
status=0
for m in "${modes[@]}"; do
  access=${m#rbd-}
  mw=$work/$m
  mkdir -p "$mw"
  echo "=== csi-sanity: rbd, access type $access (work directory $mw)"
  "$binary" --driver rbd --mode all \
    --endpoint "unix://$mw/csi.sock" --node-id sanity-node \
    --rbd-config "$work/config.json" --rbd-secret-dir "$work/secret" \
    --log-format json >"$mw/driver.log" 2>&1 &
  driver_pid=$!
  for _ in $(seq 300); do [[ -S "$mw/csi.sock" ]] && break; sleep 0.2; done
  rc=0
  "$sanity" --csi.endpoint "$mw/csi.sock" \
    --csi.testvolumeparameters "$here/rbd.yaml" \
    --csi.secrets "$work/secrets.yaml" \
    --csi.testvolumeaccesstype "$access" \
    --csi.testvolumesize 67108864 --csi.testvolumeexpandsize 134217728 \
    --csi.stagingdir "$mw/staging" --csi.mountdir "$mw/target" \
    --ginkgo.no-color "$@" 2>&1 | tee "$mw/sanity.log" || rc=$?
  stop_driver
  counts=$(grep -Eo '[0-9]+ Passed \| [0-9]+ Failed \| [0-9]+ Pending \| [0-9]+ Skipped' \
    "$mw/sanity.log" | tail -n 1)
  [[ -n "$counts" ]] || counts="no ginkgo summary (csi-sanity exit $rc)"
  if ((rc != 0)); then
    status=1
    echo "=== FAILED: $m (driver log: last 40 lines)"
    tail -n 40 "$mw/driver.log"
    grep -E '^\s*\[FAIL\]' "$mw/sanity.log" | sort -u || true
  fi
  mounts=$(unmount_below "$mw")
  leftovers=""
  ((mounts == 0)) || leftovers=" (left behind: $mounts mounts; removed)"
  summary+=("$(printf '%-12s %s -- %s%s' "$m" "$( ((rc == 0)) && echo PASS || echo FAIL)" \
    "$counts" "$leftovers")")
done
echo "=== csi-sanity summary"
printf '%s\n' "${summary[@]}"
exit $status
