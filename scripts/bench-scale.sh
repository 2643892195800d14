#!/usr/bin/env bash
# The central LVM controller at cluster scale: the release binary against
# simulated node agents (benches/scale.rs). Not part of the test command.
#
#   scripts/bench-scale.sh                       # 10, 100, 1000 and 5000 nodes
#   scripts/bench-scale.sh --nodes 10,100 --calls 20
#
# Needs no LVM and no root: everything runs on loopback addresses
# (127.10.x.y), so it runs on the host, not in the test guest.
set -euo pipefail
cd "$(dirname "$0")/.."
# One listener and one connection per simulated node, in both processes.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
cargo build --release --locked --bin lodestone
cargo bench --locked --bench scale -- "$@"
