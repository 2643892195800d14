#!/usr/bin/env bash
# Usage: scripts/bench-rbd.sh
#        LODESTONE_BENCH_CEPHCSI=/path/to/cephcsi scripts/bench-rbd.sh
#
# The RBD driver benchmark (see BENCHMARKS.md): starts a throw-away
# single-node Ceph cluster on this host (tests/ceph/cluster.sh, its own
# directory and ports, no mgr), builds the release driver with the rbd
# feature and the bench binary (benches/rbd.rs, in target/rbd), runs it and
# stops the cluster. Driver calls and the same librbd calls made directly
# alternate in one loop (paired p50 ratios, bursts of 20 and 50, a
# per-step breakdown); the controller's and a node plugin's memory close
# the report, which goes to stdout and to target/bench/rbd.md; builds and
# progress go to stderr.
#
# With LODESTONE_BENCH_CEPHCSI (a cephcsi binary you built from the ceph-csi
# repository; needs root), ceph-csi's RBD controller and node plugin run
# against the same cluster in the same run, and a side-by-side table closes
# the report. The cluster then has a ceph-mgr: ceph-csi hands image removal
# to the mgr's trash tasks.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in -h|--help) sed -n '2,19p' "$0"; exit 0 ;; esac

if [[ -n "${LODESTONE_BENCH_CEPHCSI:-}" ]]; then
  [[ -x "$LODESTONE_BENCH_CEPHCSI" ]] || { echo "not executable: $LODESTONE_BENCH_CEPHCSI" >&2; exit 2; }
  bash tests/ceph/packages.sh >&2
  export LODESTONE_CEPH_MGR=1
else
  bash tests/ceph/packages.sh --no-mgr >&2
  export LODESTONE_CEPH_MGR=0
fi
export LODESTONE_CEPH_MON_V2_PORT=${LODESTONE_CEPH_MON_V2_PORT:-3327}
export LODESTONE_CEPH_MON_V1_PORT=${LODESTONE_CEPH_MON_V1_PORT:-6807}
dir=target/ceph-bench
export CARGO_TARGET_DIR=target/rbd
cargo build --release --locked --features rbd --bin lodestone >&2
bench=$(bash scripts/bench-binary.sh rbd --features rbd)

bash tests/ceph/cluster.sh start "$dir" >&2
trap 'bash tests/ceph/cluster.sh stop "$dir" >/dev/null 2>&1 || true' EXIT
eval "$(bash tests/ceph/cluster.sh env "$dir")"
mkdir -p target/bench
LODESTONE_BENCH_BIN=target/rbd/release/lodestone "$bench" --bench | tee target/bench/rbd.md
