#!/usr/bin/env bash
# Crash soak: N randomized kill -9 trials of the driver across create,
# snapshot, restore, clone, expand, delete and stage in both LVM classes,
# each followed by a restart and a retry that must converge, then a leak
# audit (LVs, device-mapper devices, mounts, loop devices). Runs in the QEMU
# guest on real LVM. Not part of scripts/test.sh, which runs a small sample.
#
#   scripts/crash-soak.sh [N] [SEED]      N defaults to 1000
set -euo pipefail
cd "$(dirname "$0")/.."
trials=${1:-1000}
seed=${2:-}
bash tests/vm/host-packages.sh >/dev/null
conformance=$(cargo test --locked --test conformance --no-run --message-format=json 2>/dev/null \
  | python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "conformance":
        print(m["executable"])')
[[ -x "$conformance" ]] || { echo "conformance test binary not found" >&2; exit 1; }
cargo build --locked --bin lodestone
export LODESTONE_SOAK_TRIALS=$trials
[[ -n "$seed" ]] && export LODESTONE_SOAK_SEED=$seed
# A thousand trials take hours under emulation. Over a long run, thick
# deletes zero (and so allocate) nearly every block of the fixture's sparse
# VG files (4.5 GiB in the guest's tmpfs): the guest gets room for all of it.
export LODESTONE_VM_MEM=${LODESTONE_VM_MEM:-6144M}
export LODESTONE_VM_TIMEOUT=${LODESTONE_VM_TIMEOUT:-86400}
exec bash tests/vm/run-in-guest.sh bash -c \
  'bash tests/vm/lvm-fixture.sh setup >/dev/null && LODESTONE_TEST_LVM=1 "$0" --test-threads=1 --nocapture soak_lvm::crash_soak' \
  "$conformance"
