#!/usr/bin/env bash
# The one test command: host checks and tests (including the RBD controller
# against a real single-node Ceph cluster), then the real-kernel suites in a
# QEMU guest (real LVM thin pools and thick VGs, krbd maps, real mkfs and
# mounts).
#
#   scripts/test.sh            everything
#   scripts/test.sh --host     host part only (no guest)
#
# Installs the Debian packages it needs first (tests/vm/host-packages.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

host_only=0
[[ "${1:-}" == "--host" ]] && host_only=1

section() { printf '\n=== %s\n' "$*"; }

section "packages"
bash tests/vm/host-packages.sh

section "format and lint"
cargo fmt --check
bash scripts/check-layers.sh
cargo clippy --all-targets --locked -- -D warnings

section "host tests (unit tests; conformance validation against the driver on this host)"
cargo test --locked

section "interop: a grpcio (gRPC C-core) client on the CSI Unix socket"
bash tests/interop/run.sh

section "RBD driver against a single-node Ceph cluster on this host"
# The rbd feature's controller loads librbd at run time (the node plugin
# never does); its build lives in its own target dir so the default binary (used by the LVM guest suite) stays the default build.
bash tests/ceph/packages.sh --no-mgr
export CARGO_TARGET_DIR_RBD=target/rbd
CARGO_TARGET_DIR=$CARGO_TARGET_DIR_RBD cargo clippy --all-targets --locked --features rbd -- -D warnings
# Its own directory and ports (a developer's cluster may run on the
# defaults; tests/rbd_ffi.rs starts one more on ports of its own).
ceph() {
  env LODESTONE_CEPH_MON_V2_PORT=3337 LODESTONE_CEPH_MON_V1_PORT=6817 LODESTONE_CEPH_MGR=0 \
    bash tests/ceph/cluster.sh "$1" target/ceph-test
}
ceph start >/dev/null
trap 'ceph stop >/dev/null 2>&1 || true' EXIT
(
  eval "$(ceph env)"
  CARGO_TARGET_DIR=$CARGO_TARGET_DIR_RBD LODESTONE_TEST_RBD=1 LODESTONE_CEPH_MGR=0 \
    cargo test --locked --features rbd --lib --test rbd --test rbd_ffi -- --test-threads=1
)
ceph stop >/dev/null
trap - EXIT

section "deploy manifests, Dockerfile and RBAC checks"
bash tests/deploy/run.sh

[[ $host_only == 1 ]] && exit 0

section "real-kernel suite in a QEMU guest"
# Build the test binaries once on the host; the guest runs them unchanged.
conformance=$(cargo test --locked --test conformance --no-run --message-format=json 2>/dev/null \
  | python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "conformance":
        print(m["executable"])')
[[ -x "$conformance" ]] || { echo "conformance test binary not found" >&2; exit 1; }
cargo build --locked --bin lodestone
bash tests/vm/run-in-guest.sh bash scripts/guest-suite.sh "$conformance"

section "RBD node plugin (krbd) in a QEMU guest"
rbd_tests=$(CARGO_TARGET_DIR=$CARGO_TARGET_DIR_RBD cargo test --locked --features rbd --test rbd \
  --no-run --message-format=json 2>/dev/null | python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "rbd":
        print(m["executable"])')
[[ -x "$rbd_tests" ]] || { echo "rbd test binary not found" >&2; exit 1; }
bash tests/vm/run-in-guest.sh bash scripts/guest-rbd.sh "$rbd_tests"
