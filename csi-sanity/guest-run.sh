#!/usr/bin/env bash
# Called by csi-sanity/run.sh where device-mapper works: makes the test VGs,
# starts the driver, runs csi-sanity once per class and access type.
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
bash tests/vm/lvm-fixture.sh setup >/dev/null
work=$(mktemp -d /tmp/lodestone-sanity.XXXXXX)
driver_pid=
cleanup() {
  [[ -n "$driver_pid" ]] && kill "$driver_pid" 2>/dev/null && wait "$driver_pid" 2>/dev/null
  bash tests/vm/lvm-fixture.sh teardown >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

target/debug/lodestone --endpoint "unix://$work/csi.sock" --node-id sanity-node \
  --device-class thin=lodestone-thin/pool0 --device-class thick=lodestone-thick \
  --log-format json >"$work/driver.log" 2>&1 &
driver_pid=$!
for _ in $(seq 100); do [[ -S "$work/csi.sock" ]] && break; sleep 0.1; done

status=0
for c in "${classes[@]}"; do
  class=${c%-*} access=${c#*-}
  echo "=== csi-sanity: class $class, access type $access"
  if ! "$sanity" --csi.endpoint "$work/csi.sock" \
      --csi.testvolumeparameters "$here/$class.yaml" \
      --csi.testvolumeaccesstype "$access" \
      --csi.testvolumesize 67108864 --csi.testvolumeexpandsize 134217728 \
      --csi.stagingdir "$work/staging" --csi.mountdir "$work/target" "$@"; then
    status=1
    echo "=== FAILED: $c (driver log: last 40 lines)"
    tail -n 40 "$work/driver.log"
  fi
done
exit $status
