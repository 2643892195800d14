#!/usr/bin/env bash
# Usage: scripts/bench-binary.sh NAME [CARGO-ARGS...]
#
# Builds the bench target NAME (`cargo bench --locked --bench NAME
# --no-run CARGO-ARGS...`) and prints the path of its executable. Compiler
# messages go to stderr; exits non-zero when there is no executable.
set -euo pipefail
name=${1:?usage: bench-binary.sh NAME [CARGO-ARGS...]}
shift
path=$(cargo bench --locked --bench "$name" --no-run --message-format=json "$@" \
  | python3 -c 'import json, sys
name = sys.argv[1]
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-message":
        print(m["message"].get("rendered", ""), end="", file=sys.stderr)
    if m.get("reason") == "compiler-artifact" and m.get("executable") \
            and m["target"]["name"] == name and "bench" in m["target"]["kind"]:
        print(m["executable"])' "$name")
[[ -x "$path" ]] || { echo "bench-binary.sh: no executable for bench $name" >&2; exit 1; }
printf '%s\n' "$path"
