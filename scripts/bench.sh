#!/usr/bin/env bash
# Usage: scripts/bench.sh [--iterations N] [--list-volumes N] [--rss-volumes N] [--classes thin,thick]
#
# The LVM driver benchmark (see BENCHMARKS.md): builds the release driver and
# the bench binary (benches/lvm.rs), boots the QEMU guest (tests/vm/), makes
# the test volume groups there (tests/vm/lvm-fixture.sh), runs the bench and
# removes the volume groups. The markdown report goes to stdout (and to
# target/bench/lvm.md); builds and progress go to stderr.
#
# Defaults: 10 rounds per class, 20 volumes for ListVolumes, 200 thin volumes
# for the memory test; about 25 minutes under TCG (plus the first build, which
# compiles the dependencies twice: release and bench). Options may also be
# given as LODESTONE_BENCH_ITERATIONS, _LIST_VOLUMES, _RSS_VOLUMES, _CLASSES.
# The guest is killed after LODESTONE_VM_TIMEOUT seconds (default here 3600).
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in -h|--help) sed -n '2,14p' "$0"; exit 0 ;; esac

bash tests/vm/host-packages.sh >&2

# What is being measured: recorded before the build (others may commit meanwhile).
source_rev="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
git diff --quiet HEAD -- src Cargo.toml benches 2>/dev/null \
  || source_rev+=" with uncommitted changes in src/, Cargo.toml or benches/"

echo "bench.sh: building the release driver and the bench binary" >&2
cargo build --release --locked --bin lodestone >&2
bench=$(bash scripts/bench-binary.sh lvm)

# How busy the host is while the guest runs: 1-minute load average and the
# number of QEMU guests (ours included), every 5 s.
mkdir -p target/bench
samples=target/bench/host-load.txt
: >"$samples"
( while :; do
    printf '%s %s\n' "$(cut -d' ' -f1 /proc/loadavg)" "$(pgrep -c qemu-system || true)" >>"$samples"
    sleep 5
  done ) &
sampler=$!
trap 'kill "$sampler" 2>/dev/null || true' EXIT

echo "bench.sh: running $bench in the guest" >&2
started=$(date +%s)
report=$(LODESTONE_VM_TIMEOUT=${LODESTONE_VM_TIMEOUT:-3600} \
  bash tests/vm/run-in-guest.sh bash -c '
    set -e
    bash tests/vm/lvm-fixture.sh setup >&2
    trap "bash tests/vm/lvm-fixture.sh teardown >/dev/null 2>&1 || true" EXIT
    "$@"' lvm-bench "$bench" --bench "$@")
ended=$(date +%s)
kill "$sampler" 2>/dev/null || true

{
  printf '%s\n' "$report"
  echo
  echo "### Host during the run"
  echo
  echo "- host: $(nproc) CPU(s), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')," \
    "guest: ${LODESTONE_VM_SMP:-2} vCPU(s) under TCG (no KVM)"
  echo "- source built: $source_rev"
  echo "- wall time (boot, fixture, bench, teardown): $((ended - started)) s"
  awk '{ n++; s += $1; if ($1 > m) m = $1; if (n == 1 || $1 < lo) lo = $1; if ($2 > q) q = $2 }
       END { if (n) printf "- host 1-minute load average: min %.2f, mean %.2f, max %.2f (%d samples); QEMU guests running at once: up to %d (this one included)\n", lo, s / n, m, n, q }' \
    "$samples"
} | tee target/bench/lvm.md
