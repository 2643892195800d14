#!/usr/bin/env bash
# Interop over the CSI Unix socket with clients other than tonic's: a
# grpcio (gRPC C-core) Python client, which sends the socket path as the
# HTTP/2 :authority, calls Identity on a real lodestone process.
#
#   tests/interop/run.sh                     builds target/debug/lodestone
#   LODESTONE_BIN=path tests/interop/run.sh  uses that binary
#
# Needs python3 with venv; grpcio comes from PyPI into
# target/interop-tests/venv (pinned in requirements.txt), reinstalled only
# when that file changes. Exits non-zero when a test fails.
set -euo pipefail
cd "$(dirname "$0")/../.."

venv=target/interop-tests/venv
stamp=$venv/.requirements.sha256
want=$(sha256sum tests/interop/requirements.txt | cut -d' ' -f1)
if [[ ! -x $venv/bin/python || "$(cat "$stamp" 2>/dev/null)" != "$want" ]]; then
  echo "tests/interop: installing grpcio into $venv" >&2
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip --disable-pip-version-check --quiet install \
    -r tests/interop/requirements.txt
  echo "$want" >"$stamp"
fi

if [[ -z "${LODESTONE_BIN:-}" ]]; then
  cargo build --locked --bin lodestone
  LODESTONE_BIN=target/debug/lodestone
fi
LODESTONE_BIN=$(realpath "$LODESTONE_BIN") "$venv/bin/python" tests/interop/grpcio_unix.py -v
