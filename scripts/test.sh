#!/usr/bin/env bash
# The one test command: host checks and tests, then the real-kernel suite in
# a QEMU guest (real LVM thin pools and thick VGs, real mkfs and mounts).
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
cargo clippy --all-targets --locked -- -D warnings

section "host tests (unit tests; conformance validation against the driver on this host)"
cargo test --locked

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
