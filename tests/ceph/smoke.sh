#!/usr/bin/env bash
# Smoke test of the single-node Ceph test cluster, on the host: start it,
# then as the driver's least-privilege user client.lodestone create an image,
# snapshot it, clone it (clone v2), set/get image metadata, resize, move it
# to the trash and restore it, remove everything, and stop the cluster.
# Prints the time of every step.
#
# Usage: tests/ceph/smoke.sh
#   LODESTONE_CEPH_DIR   cluster dir (default <repo>/target/ceph-smoke)
#   LODESTONE_CEPH_KEEP=1  leave the cluster running at the end
# Other LODESTONE_CEPH_* knobs are passed on to cluster.sh.
# Exit status 0 on success.
set -eEuo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
repo_root=$(cd "$here/../.." && pwd -P)
export LODESTONE_CEPH_DIR=${LODESTONE_CEPH_DIR:-$repo_root/target/ceph-smoke}
cluster=$here/cluster.sh

t0=${EPOCHREALTIME/./}
elapsed() { # seconds since $1 (microsecond stamp), 2 decimals
  local d=$(( ${EPOCHREALTIME/./} - $1 ))
  printf '%d.%02d' $((d / 1000000)) $(((d % 1000000) / 10000))
}
# step DESC CMD...: run CMD, print its duration
step() {
  local desc=$1 s=${EPOCHREALTIME/./}
  shift
  "$@"
  printf 'smoke: %-44s %6ss\n' "$desc" "$(elapsed "$s")"
}
fail() { echo "smoke: FAIL: $*" >&2; exit 1; }
trap 'echo "smoke: FAILED (exit $?) at line $LINENO: $BASH_COMMAND" >&2' ERR

started=0
cleanup() {
  if ((started)) && [[ "${LODESTONE_CEPH_KEEP:-0}" != 1 ]]; then
    "$cluster" stop "$LODESTONE_CEPH_DIR" >/dev/null || true
  fi
}
trap cleanup EXIT

step "cluster start" "$cluster" start "$LODESTONE_CEPH_DIR"
started=1
eval "$("$cluster" env "$LODESTONE_CEPH_DIR")"

# --- the env contract: paths only, never key material; keyrings 0600 ---
for f in "$LODESTONE_CEPH_KEYRING" "$LODESTONE_CEPH_ADMIN_KEYRING"; do
  [[ -r "$f" ]] || fail "keyring $f missing"
  [[ "$(stat -c %a "$f")" == 600 ]] || fail "keyring $f has mode $(stat -c %a "$f"), want 600"
done
env_text=$("$cluster" env "$LODESTONE_CEPH_DIR")
while read -r k _ v; do
  [[ "$k" == key ]] || continue
  [[ "$env_text" != *"$v"* ]] || fail "cluster.sh env printed key material"
done < <(cat "$LODESTONE_CEPH_KEYRING" "$LODESTONE_CEPH_ADMIN_KEYRING")
if grep -rqF -f <(awk '$1 == "key" { print $3 }' "$LODESTONE_CEPH_KEYRING") \
     "$LODESTONE_CEPH_DIR/log"; then
  fail "the client.lodestone key appears in a log under $LODESTONE_CEPH_DIR/log"
fi
echo "smoke: env ok: CEPH_CONF=$CEPH_CONF user=$LODESTONE_CEPH_USER mon=$LODESTONE_CEPH_MON_HOST"

# --- everything below runs as client.lodestone ---
r() { rbd --id "$LODESTONE_CEPH_USER" --keyring "$LODESTONE_CEPH_KEYRING" "$@"; }
p=$LODESTONE_CEPH_POOL

step "rbd create --size 64M $p/smoke" r create --size 64M "$p/smoke"
r info "$p/smoke" >/dev/null
step "rbd snap create $p/smoke@s1" r snap create "$p/smoke@s1" --no-progress
step "rbd clone (v2) -> $p/smoke-clone" \
  r clone --rbd-default-clone-format 2 "$p/smoke@s1" "$p/smoke-clone"
info=$(r info --format json "$p/smoke-clone")
[[ "$info" == *'"parent":'* ]] || fail "clone has no parent: $info"
# clone v2: the parent snapshot needed no protection
r snap ls --format json "$p/smoke" | grep -q '"protected":"false"' \
  || fail "parent snapshot unexpectedly protected"
step "rbd image-meta set" r image-meta set "$p/smoke-clone" lodestone.volume smoke-vol
v=$(r image-meta get "$p/smoke-clone" lodestone.volume)
[[ "$v" == smoke-vol ]] || fail "image-meta get returned '$v'"
step "rbd resize --size 128M" r resize --size 128M "$p/smoke-clone" --no-progress
step "rbd trash mv $p/smoke-clone" r trash mv "$p/smoke-clone"
trash_id=$(r trash ls "$p" | awk '$2 == "smoke-clone" { print $1 }')
[[ -n "$trash_id" ]] || fail "smoke-clone not in the trash"
step "rbd trash restore" r trash restore "$p/$trash_id"
r info "$p/smoke-clone" >/dev/null || fail "smoke-clone not restored"
step "rbd flatten $p/smoke-clone" r flatten "$p/smoke-clone" --no-progress
trash_remove() { # trash_remove POOL/NAME: the two-step delete a driver uses
  local id
  r trash mv "$1"
  id=$(r trash ls "${1%%/*}" | awk -v n="${1#*/}" '$2 == n { print $1 }')
  [[ -n "$id" ]] || fail "$1 not in the trash"
  r trash rm "${1%%/*}/$id" --no-progress
}
step "rbd trash mv + trash rm $p/smoke-clone" trash_remove "$p/smoke-clone"
step "rbd snap rm $p/smoke@s1" r snap rm "$p/smoke@s1" --no-progress
step "rbd rm $p/smoke" r rm "$p/smoke" --no-progress
[[ -z "$(r ls "$p")" ]] || fail "images left in $p: $(r ls "$p")"
[[ -z "$(r trash ls "$p")" ]] || fail "trash not empty in $p"

# --- least privilege: client.lodestone must not administer the cluster ---
s=${EPOCHREALTIME/./}
if out=$(ceph --id "$LODESTONE_CEPH_USER" --keyring "$LODESTONE_CEPH_KEYRING" \
           --connect-timeout 20 osd pool create lodestone-forbidden 2>&1); then
  fail "client.lodestone could create a pool"
fi
[[ "$out" == *EACCES* || "$out" == *"access denied"* ]] || fail "unexpected error: $out"
printf 'smoke: %-44s %6ss\n' "client.lodestone denied 'osd pool create'" "$(elapsed "$s")"

if [[ "${LODESTONE_CEPH_KEEP:-0}" != 1 ]]; then
  step "cluster stop" "$cluster" stop "$LODESTONE_CEPH_DIR"
  started=0
fi
echo "smoke: PASS in $(elapsed "$t0")s"
