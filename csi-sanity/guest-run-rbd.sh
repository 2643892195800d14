#!/usr/bin/env bash
# Called by csi-sanity/run.sh for the rbd-* modes, inside the QEMU guest (or
# on a host whose kernel has krbd): starts a single-node Ceph cluster, the
# RBD driver (controller and node in one process) and runs csi-sanity once
# per access type. The secrets file csi-sanity reads is written at run time
# from the test cluster's keyring into a private directory and removed
# afterwards; no key is ever committed or printed.
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
export LODESTONE_CEPH_DIR=${LODESTONE_CEPH_DIR:-/tmp/ceph-sanity} LODESTONE_CEPH_MGR=0
bash tests/ceph/cluster.sh start >/dev/null
modprobe rbd 2>/dev/null || true
work=$(mktemp -d /tmp/lodestone-sanity-rbd.XXXXXX)
chmod 700 "$work"
driver_pid=
cleanup() {
  [[ -n "$driver_pid" ]] && kill "$driver_pid" 2>/dev/null && wait "$driver_pid" 2>/dev/null
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

"${LODESTONE_SANITY_BIN:-target/rbd/debug/lodestone}" --driver rbd --mode all \
  --endpoint "unix://$work/csi.sock" --node-id sanity-node \
  --rbd-config "$work/config.json" --rbd-secret-dir "$work/secret" \
  --log-format json >"$work/driver.log" 2>&1 &
driver_pid=$!
for _ in $(seq 100); do [[ -S "$work/csi.sock" ]] && break; sleep 0.1; done

status=0
for m in "${modes[@]}"; do
  access=${m#rbd-}
  echo "=== csi-sanity: rbd, access type $access"
  if ! "$sanity" --csi.endpoint "$work/csi.sock" \
      --csi.testvolumeparameters "$here/rbd.yaml" \
      --csi.secrets "$work/secrets.yaml" \
      --csi.testvolumeaccesstype "$access" \
      --csi.testvolumesize 67108864 --csi.testvolumeexpandsize 134217728 \
      --csi.stagingdir "$work/staging" --csi.mountdir "$work/target" "$@"; then
    status=1
    echo "=== FAILED: $m (driver log: last 40 lines)"
    tail -n 40 "$work/driver.log"
  fi
done
exit $status
