#!/usr/bin/env bash
# Usage: scripts/bench-xnode.sh [RATE]
#
# The cross-node restore benchmark (see BENCHMARKS.md): builds the release
# driver, boots the QEMU guest (tests/vm/), and there runs two LVM nodes in
# two network namespaces joined by a veth pair shaped with tc (tbf) to RATE
# (default 200mbit, tc syntax), with the central controller beside node-a.
# For a 1 GiB thin volume with 10% and then 90% of it written, it snapshots
# it on node-a and restores the snapshot on node-b (and clones the volume
# to node-b, shaped link), and reports the time,
# the bytes on the wire and the stream's throughput, beside what a plain
# TLS stream with the driver's TLS stack (benches/tls_stream.rs, same
# link) reaches, shaped and unshaped. The markdown report goes to stdout (and target/bench/xnode.md),
# progress to stderr. About 10 minutes under TCG after the build.
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in -h|--help) sed -n '2,13p' "$0"; exit 0 ;; esac

if [[ "${LODESTONE_VM_GUEST:-}" != 1 ]]; then
  rate=${1:-200mbit}
  [[ "$rate" =~ ^[0-9]+[kmg]bit$ ]] || { echo "bench-xnode.sh: RATE like 200mbit" >&2; exit 2; }
  LODESTONE_VM_EXTRA_PACKAGES="openssl iproute2" bash tests/vm/host-packages.sh >&2
  source_rev="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  git diff --quiet HEAD -- src Cargo.toml 2>/dev/null \
    || source_rev+=" with uncommitted changes in src/ or Cargo.toml"
  echo "bench-xnode.sh: building the release driver" >&2
  cargo build --release --locked --bin lodestone >&2
  tls_stream=$(bash scripts/bench-binary.sh tls_stream)
  mkdir -p target/bench
  started=$(date +%s)
  # Two 1 GiB volumes' worth of written blocks live in the guest's RAM.
  report=$(LODESTONE_VM_MEM=${LODESTONE_VM_MEM:-6144M} \
    LODESTONE_VM_TIMEOUT=${LODESTONE_VM_TIMEOUT:-2400} \
    bash tests/vm/run-in-guest.sh bash scripts/bench-xnode.sh "$rate" "$tls_stream")
  ended=$(date +%s)
  {
    printf '%s\n' "$report"
    echo
    echo "- host: $(nproc) CPU(s), guest: ${LODESTONE_VM_SMP:-2} vCPU(s) under TCG (no KVM)"
    echo "- source built: $source_rev"
    echo "- wall time (boot, setup, bench, teardown): $((ended - started)) s"
  } | tee target/bench/xnode.md
  exit 0
fi

# ---------------------------------------------------------------- the guest
rate=$1
tls_stream=$2
bin=$PWD/target/release/lodestone
work=/tmp/xnode
log() { echo "bench-xnode: $*" >&2; }

# node-a's thin pool holds the source (and its snapshot, sharing blocks);
# node-b's holds the restore.
export LODESTONE_FIXTURE_THIN_SIZE=1400M LODESTONE_FIXTURE_POOL_SIZE=1300M
export LODESTONE_FIXTURE_NODE2_SIZE=1400M LODESTONE_FIXTURE_NODE2_POOL_SIZE=1300M
export LODESTONE_FIXTURE_THICK_SIZE=64M
bash tests/vm/lvm-fixture.sh setup >&2

pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  ip netns del lda 2>/dev/null || true
  ip netns del ldb 2>/dev/null || true
  bash tests/vm/lvm-fixture.sh teardown >/dev/null 2>&1 || true
}
trap cleanup EXIT

rm -rf "$work"; mkdir -p "$work"
bash deploy/lvm/certs/make-certs.sh "$work/pki" node-a node-b 2>/dev/null >/dev/null

# Two namespaces, one veth pair: 10.213.0.1 (node-a, controller) and
# 10.213.0.2 (node-b).
modprobe veth; modprobe sch_tbf
ip netns add lda; ip netns add ldb
ip link add va type veth peer name vb
ip link set va netns lda; ip link set vb netns ldb
ip -n lda addr add 10.213.0.1/24 dev va; ip -n ldb addr add 10.213.0.2/24 dev vb
for ns in lda ldb; do ip -n "$ns" link set lo up; done
ip -n lda link set va up; ip -n ldb link set vb up
shape() { # shape on|off: the same rate both ways
  local dev
  for pair in lda:va ldb:vb; do
    dev=${pair#*:}
    ip netns exec "${pair%%:*}" tc qdisc del dev "$dev" root 2>/dev/null || true
    [[ $1 == on ]] && ip netns exec "${pair%%:*}" tc qdisc add dev "$dev" root tbf \
      rate "$rate" burst 256kb latency 50ms
  done
  return 0
}

tls() { # tls SIZE_MIB: "BYTES SECONDS" of one TLS stream a->b, the driver's TLS stack
  local pki=$work/pki out
  ip netns exec ldb "$tls_stream" serve 10.213.0.2:4433 \
    "$pki/nodes/node-b/tls.crt" "$pki/nodes/node-b/tls.key" "$pki/ca.crt" >"$work/tls.out" &
  local server=$!
  for _ in $(seq 50); do
    ip netns exec ldb ss -ltn 2>/dev/null | grep -q 10.213.0.2:4433 && break
    sleep 0.2
  done
  ip netns exec lda "$tls_stream" send 10.213.0.2:4433 node-b "$1" \
    "$pki/nodes/node-a/tls.crt" "$pki/nodes/node-a/tls.key" "$pki/ca.crt"
  wait "$server"
  cat "$work/tls.out"
}

classes=(--device-class thin=lodestone-thin/pool0)
common=(--log-format json --lvm-refresh-seconds 0 --copy-wait-seconds 2)
tls_args() { echo --tls-cert "$work/pki/$1.crt" --tls-key "$work/pki/$1.key" --tls-ca "$work/pki/ca.crt"; }
start() { # start NS NAME ARGS...: runs the driver in NS, logging to $work/NAME.log
  local ns=$1 name=$2; shift 2
  ip netns exec "$ns" "$bin" "${common[@]}" "$@" >"$work/$name.log" 2>&1 &
  pids+=($!)
}
start lda node-a --mode node --node-id node-a --endpoint "unix://$work/a.sock" \
  --agent-listen 10.213.0.1:7441 "${classes[@]}" $(tls_args nodes/node-a/tls)
start ldb node-b --mode node --node-id node-b --endpoint "unix://$work/b.sock" \
  --agent-listen 10.213.0.2:7441 --device-class thin=lodestone-node2/pool0 \
  $(tls_args nodes/node-b/tls)
sleep 3
start lda controller --mode controller --endpoint "unix://$work/ctl.sock" "${classes[@]}" \
  --agent node-a=10.213.0.1:7441 --agent node-b=10.213.0.2:7441 $(tls_args controller)
ctl() { "$bin" ctl --endpoint "unix://$work/ctl.sock" --output json --timeout 120 "$@"; }
for _ in $(seq 60); do ctl info >/dev/null 2>&1 && break; sleep 1; done
sleep 5 # every inventory in

field() { python3 -c 'import json,sys; d=json.load(sys.stdin); print(d[sys.argv[1]][sys.argv[2]])' "$@"; }
lv_path() { # lv_path VG ID: the LV of a volume id (its key ends the id)
  lvs --noheadings -o lv_path "$1" | tr -d ' ' | grep -- "${2##*:}\$"
}

# The log lines of the copy: (seconds from the first stream's header to
# the end, bytes of data, bytes on the wire).
stream_figures() {
  python3 - "$work/node-a.log" "$work/node-b.log" "$1" <<'EOF'
import json, sys
from datetime import datetime
def lines(path):
    for l in open(path, errors="replace"):
        try:
            yield json.loads(l)
        except ValueError:
            pass
def at(e):
    return datetime.fromisoformat(e["timestamp"].replace("Z", "+00:00")).timestamp()
lv = sys.argv[3]
start = end = None
for e in lines(sys.argv[2]):
    f = e.get("fields", {})
    if f.get("lv") != lv:
        continue
    if f.get("message") == "copying from another node" and start is None:
        start = at(e)
    if f.get("message") == "copy from another node complete":
        end = at(e)
served = [e["fields"] for e in lines(sys.argv[1])
          if e.get("fields", {}).get("message") == "snapshot served"]
s = served[-1]
print(f"{end - start:.2f} {s['bytes']} {s['wire']} {s['allocated']}")
EOF
}

echo "| 1 GiB thin volume | copy | link | on node-b after, s | data sent | on the wire | stream s | stream MB/s | of the link | plain TLS MB/s (same link) | of plain TLS |"
echo "|---|---|---|---|---|---|---|---|---|---|---|"
mb() { python3 -c "print(f'{$1 / $2 / 1e6:.1f}')"; }
link_mbs=$(python3 -c "
import re; m = re.match(r'(\d+)([kmg])bit', '$rate')
print(int(m[1]) * {'k': 1e3, 'm': 1e6, 'g': 1e9}[m[2]] / 8 / 1e6)")

for share in 10 90; do
  src=$(ctl create-volume "xsrc-$share" --size 1Gi --param deviceClass=thin --block \
    --topology topology.lodestone.dev/node=node-a | field volume volume_id)
  dev=$(lv_path lodestone-thin "$src")
  log "writing $share% of $dev in 1 MiB runs (random data)"
  python3 - "$dev" "$share" <<'EOF'
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY)
share = int(sys.argv[2])
block = os.urandom(1 << 20)
for mib in range(1024):
    if mib % 10 < share // 10:
        os.pwrite(fd, block[mib % 7:] + block[:mib % 7], mib << 20)
os.fsync(fd)
os.close(fd)
EOF
  snap=$(ctl create-snapshot "xsnap-$share" "$src" | field snapshot snapshot_id)
  for run in restore:shaped restore:unshaped clone:shaped; do
    what=${run%%:*} link=${run#*:}
    [[ $link == shaped ]] && shape on || shape off
    name="xdst-$share-$what-$link"
    if [[ $what == restore ]]; then
      from=(--snapshot-source "$snap")
    else
      from=(--volume-source "$src")
    fi
    log "$what of ${from[1]} on node-b ($link link)"
    t0=$(date +%s.%N)
    until out=$(ctl create-volume "$name" --size 1Gi --param deviceClass=thin --block \
      "${from[@]}" --topology topology.lodestone.dev/node=node-b 2>&1); do
      [[ "$out" == *ABORTED* ]] || { log "$what failed: $out"; exit 1; }
      sleep 0.5
    done
    t1=$(date +%s.%N)
    dst=$(printf '%s' "$out" | field volume volume_id)
    target=$(lv_path lodestone-node2 "$dst")
    cmp "$dev" "$target" || { log "the $what differs from its source"; exit 1; }
    read -r secs data wire allocated < <(stream_figures "$(basename "$target")")
    read -r tls_bytes tls_s < <(tls "$(( (wire >> 20) + 1 ))")
    tls_mbs=$(mb "$tls_bytes" "$tls_s")
    stream_mbs=$(mb "$wire" "$secs")
    if [[ $link == shaped ]]; then
      of_link=$(python3 -c "print(f'{$stream_mbs / $link_mbs:.0%}')"); label="$rate"
    else
      of_link="-"; label="unshaped"
    fi
    of_tls=$(python3 -c "print(f'{$stream_mbs / $tls_mbs:.0%}')")
    echo "| $share% written ($((allocated >> 20)) MiB allocated) | $what | $label | $(python3 -c "print(f'{$t1 - $t0:.1f}')") | $data | $wire | $secs | $stream_mbs | $of_link | $tls_mbs | $of_tls |"
    ctl delete-volume "$dst" >/dev/null
  done
  ctl delete-snapshot "$snap" >/dev/null
  ctl delete-volume "$src" >/dev/null
done
echo
echo "- link: a veth pair between two network namespaces, tbf at $rate (${link_mbs} MB/s) each way; \"unshaped\": the same pair without tbf"
echo "- restore: the first CreateVolume until the one that returns the volume (placement, grant, lvcreate, stream, syncs, tags; ctl polls every 0.5 s); clone: the same from the source volume, plus the hidden snapshot taken on node-a first and removed at the end; stream: node-b's log, header to end"
echo "- plain TLS: benches/tls_stream.rs, one TLS 1.3 stream with the driver's TLS stack (rustls, ring) and the node certificates, as many bytes as the restore put on the wire, node-a's namespace to node-b's: no gRPC, no checksums, no disks"
