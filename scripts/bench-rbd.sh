#!/usr/bin/env bash
# Usage: scripts/bench-rbd.sh
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
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in -h|--help) sed -n '2,12p' "$0"; exit 0 ;; esac

bash tests/ceph/packages.sh --no-mgr >&2
export LODESTONE_CEPH_MON_V2_PORT=${LODESTONE_CEPH_MON_V2_PORT:-3327}
export LODESTONE_CEPH_MON_V1_PORT=${LODESTONE_CEPH_MON_V1_PORT:-6807}
export LODESTONE_CEPH_MGR=0
dir=target/ceph-bench
export CARGO_TARGET_DIR=target/rbd
cargo build --release --locked --features rbd --bin lodestone >&2
bench=$(bash scripts/bench-binary.sh rbd --features rbd)

bash tests/ceph/cluster.sh start "$dir" >&2
trap 'bash tests/ceph/cluster.sh stop "$dir" >/dev/null 2>&1 || true' EXIT
eval "$(bash tests/ceph/cluster.sh env "$dir")"
mkdir -p target/bench
LODESTONE_BENCH_BIN=target/rbd/release/lodestone "$bench" --bench | tee target/bench/rbd.md
