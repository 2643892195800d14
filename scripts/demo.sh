#!/usr/bin/env bash
# Quickstart: build Lodestone and walk one volume through its whole life on a
# throw-away loop-file volume group. Runs directly where the kernel has
# device-mapper; otherwise boots a small QEMU guest with Debian's kernel.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/vm/host-packages.sh >/dev/null
cargo build --release --locked --bin lodestone 2>&1 | grep -v '^\s*Compiling' || true
if [[ -e /sys/class/misc/device-mapper && $(id -u) == 0 ]]; then
  exec target/release/lodestone demo "$@"
fi
echo "(this kernel has no device-mapper: running the demo in a QEMU guest; ~1 minute)"
exec bash tests/vm/run-in-guest.sh target/release/lodestone demo "$@"
