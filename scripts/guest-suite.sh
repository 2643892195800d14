#!/usr/bin/env bash
# Runs inside the QEMU guest (see scripts/test.sh): makes the test volume
# groups, runs the conformance suite against real LVM, then the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
conformance=$1

bash tests/vm/lvm-fixture.sh setup
trap 'bash tests/vm/lvm-fixture.sh teardown >/dev/null 2>&1 || true' EXIT

echo "--- conformance suite on real LVM (thin and thick)"
# Only the backend tests (modules named *_lvm) and the final leak check:
# everything else already ran on the host.
LODESTONE_TEST_LVM=1 "$conformance" --test-threads=1 _lvm:: zz_leaks

echo "--- quickstart demo"
target/debug/lodestone demo --dir /tmp/lodestone-demo --vg-mib 512
