#!/usr/bin/env bash
# Runs inside the QEMU guest (see scripts/test.sh): starts the single-node
# Ceph cluster in the guest's tmpfs, loads krbd, and runs the RBD tests that
# map and mount (the rbd test binary given as $1).
set -euo pipefail
cd "$(dirname "$0")/.."
tests=$1

export LODESTONE_CEPH_DIR=/tmp/ceph LODESTONE_CEPH_MGR=0
bash tests/ceph/cluster.sh start >/dev/null
trap 'bash tests/ceph/cluster.sh stop >/dev/null 2>&1 || true' EXIT
eval "$(bash tests/ceph/cluster.sh env)"
modprobe rbd

echo "--- RBD node plugin on krbd"
LODESTONE_TEST_RBD=1 LODESTONE_TEST_RBD_NODE=1 "$tests" --test-threads=1 node_
