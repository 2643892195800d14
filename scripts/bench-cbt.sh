#!/usr/bin/env bash
# Usage: scripts/bench-cbt.sh
#
# The changed-block-tracking benchmark (see BENCHMARKS.md): builds the
# release driver and benches/cbt.rs, boots the QEMU guest (tests/vm/), makes
# the test volume groups there, and times GetMetadataAllocated and
# GetMetadataDelta of 1 GiB thin snapshots against the raw commands they run
# and against reading both snapshots whole. The markdown report goes to
# stdout (and target/bench/cbt.md); builds and progress to stderr. About 5
# minutes under TCG after the build.
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in -h|--help) sed -n '2,10p' "$0"; exit 0 ;; esac

bash tests/vm/host-packages.sh >&2
source_rev="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
git diff --quiet HEAD -- src Cargo.toml benches 2>/dev/null \
  || source_rev+=" with uncommitted changes in src/, Cargo.toml or benches/"

echo "bench-cbt.sh: building the release driver and the bench binary" >&2
cargo build --release --locked --bin lodestone >&2
bench=$(bash scripts/bench-binary.sh cbt)

mkdir -p target/bench
started=$(date +%s)
report=$(LODESTONE_VM_TIMEOUT=${LODESTONE_VM_TIMEOUT:-1800} \
  bash tests/vm/run-in-guest.sh bash -c '
    set -e
    bash tests/vm/lvm-fixture.sh setup >&2
    trap "bash tests/vm/lvm-fixture.sh teardown >/dev/null 2>&1 || true" EXIT
    "$@"' cbt-bench "$bench" --bench)
ended=$(date +%s)
{
  printf '%s\n' "$report"
  echo
  echo "- host: $(nproc) CPU(s), guest: ${LODESTONE_VM_SMP:-2} vCPU(s) under TCG (no KVM)"
  echo "- source built: $source_rev"
  echo "- wall time (boot, fixture, bench, teardown): $((ended - started)) s"
} | tee target/bench/cbt.md
