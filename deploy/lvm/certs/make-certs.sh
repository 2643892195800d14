#!/usr/bin/env bash
# Makes the certificates of the LVM controller-agent link with openssl:
#
#   OUTDIR/secrets/lodestone-lvm-controller-tls.yaml
#       a Secret (tls.crt, tls.key, ca.crt) with the controller's client
#       certificate (DNS SAN lodestone-controller), mounted by the
#       controller Deployment only
#   OUTDIR/nodes/<node>/tls.crt, tls.key, ca.crt
#       each node's server certificate (DNS SAN: the node's name), its key
#       and the CA, to be copied to that node only, into
#       /etc/lodestone/agent-tls/ (the node plugin mounts that host
#       directory). No Secret holds node keys: a Secret mounted by a
#       DaemonSet reaches every node, and root on any node would then hold
#       every node's key.
#
# Usage: make-certs.sh [options] OUTDIR NODE [NODE...]
#   --namespace NS          namespace of the Secret (default lodestone-lvm)
#   --days N                validity of the controller and node certificates
#                           (default 365); the CA gets 10 years
#   --controller-identity N the controller's DNS name (default
#                           lodestone-controller; must match the node
#                           plugins' --controller-identity)
#
# OUTDIR is yours to choose and keep private: it holds the CA key and every
# node's key. Files that already exist there are reused, so running the
# script again with more nodes adds their certificates with the same CA;
# delete a file to have it made anew. Then:
#
#   kubectl apply -f OUTDIR/secrets/
#   for node in NODE...; do    # as root on the node, e.g. over ssh:
#     ssh root@$node 'install -d -m 0700 /etc/lodestone/agent-tls'
#     scp -p OUTDIR/nodes/$node/* root@$node:/etc/lodestone/agent-tls/
#   done
#
# The driver re-reads the files when they change: a renewal needs no
# restart. List every node that runs the node plugin, e.g.
#   make-certs.sh ~/lodestone-pki $(kubectl get nodes -o name | cut -d/ -f2)
set -euo pipefail
umask 077

prog=make-certs.sh
namespace=lodestone-lvm
days=365
identity=lodestone-controller

die() { echo "$prog: $*" >&2; exit 2; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --namespace) namespace=${2:?--namespace needs a value}; shift 2 ;;
    --days) days=${2:?--days needs a value}; shift 2 ;;
    --controller-identity) identity=${2:?--controller-identity needs a value}; shift 2 ;;
    -h|--help) sed -n '2,39p' "$0"; exit 0 ;;
    --) shift; break ;;
    -*) die "unknown option: $1" ;;
    *) break ;;
  esac
done
[[ $# -ge 2 ]] || die "usage: $prog [options] OUTDIR NODE [NODE...]"
out=$1; shift
[[ "$days" =~ ^[1-9][0-9]*$ ]] || die "--days must be a positive number"
command -v openssl >/dev/null || die "openssl is needed"

# A node name becomes a DNS SAN, a file name and the driver's node id (a
# label value: at most 63 characters).
dns_name_re='^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$'
for name in "$identity" "$@"; do
  [[ ${#name} -le 63 && "$name" =~ $dns_name_re ]] \
    || die "$name: not a lowercase DNS name of at most 63 characters"
done
mapfile -t nodes < <(printf '%s\n' "$@" | sort -u)

mkdir -p "$out/nodes" "$out/secrets"

# --- the CA -------------------------------------------------------------
if [[ ! -s "$out/ca.key" || ! -s "$out/ca.crt" ]]; then
  openssl req -x509 -new -nodes -sha256 -days 3650 \
    -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 \
    -keyout "$out/ca.key" -out "$out/ca.crt" \
    -subj "/CN=lodestone-lvm agent CA" \
    -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -addext "subjectKeyIdentifier=hash" 2>/dev/null
  echo "$prog: made a new CA in $out/ca.crt" >&2
fi

# issue NAME PURPOSE FILE_BASE: a P-256 key and a certificate for DNS name
# NAME, signed by the CA, for TLS PURPOSE (serverAuth, clientAuth or both).
issue() {
  local name=$1 purpose=$2 base=$3 ext
  [[ -s "$base.key" && -s "$base.crt" ]] && return 0
  ext=$(mktemp)
  printf '%s\n' \
    "basicConstraints=critical,CA:FALSE" \
    "keyUsage=critical,digitalSignature" \
    "extendedKeyUsage=$purpose" \
    "subjectAltName=DNS:$name" \
    "subjectKeyIdentifier=hash" \
    "authorityKeyIdentifier=keyid" >"$ext"
  openssl req -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 \
    -keyout "$base.key" -out "$base.csr" -subj "/CN=$name" 2>/dev/null
  openssl x509 -req -sha256 -days "$days" -in "$base.csr" \
    -CA "$out/ca.crt" -CAkey "$out/ca.key" \
    -set_serial "0x$(openssl rand -hex 16)" \
    -extfile "$ext" -out "$base.crt" 2>/dev/null
  rm -f "$base.csr" "$ext"
  echo "$prog: issued $base.crt for $name ($purpose)" >&2
}

issue "$identity" clientAuth "$out/controller"
for node in "${nodes[@]}"; do
  mkdir -p "$out/nodes/$node"
  # Server for the controller and other agents; client when it reads a
  # snapshot from another node (cross-node restores).
  issue "$node" serverAuth,clientAuth "$out/nodes/$node/tls"
  cp "$out/ca.crt" "$out/nodes/$node/ca.crt"
done

# --- the Secret manifests -------------------------------------------------
b64() { base64 <"$1" | tr -d '\n'; }

secret_header() {
  printf '%s\n' \
    "# Made by deploy/lvm/certs/make-certs.sh. Holds private keys: keep it" \
    "# out of version control." \
    "apiVersion: v1" \
    "kind: Secret" \
    "metadata:" \
    "  name: $1" \
    "  namespace: $namespace" \
    "  labels:" \
    "    app.kubernetes.io/part-of: lodestone" \
    "type: Opaque" \
    "data:"
}

{
  secret_header lodestone-lvm-controller-tls
  echo "  ca.crt: $(b64 "$out/ca.crt")"
  echo "  tls.crt: $(b64 "$out/controller.crt")"
  echo "  tls.key: $(b64 "$out/controller.key")"
} >"$out/secrets/lodestone-lvm-controller-tls.yaml"

# Earlier versions wrote one Secret with every node's key; it must go.
if [[ -e "$out/secrets/lodestone-lvm-node-tls.yaml" ]]; then
  rm -f "$out/secrets/lodestone-lvm-node-tls.yaml"
  echo "$prog: removed $out/secrets/lodestone-lvm-node-tls.yaml (every node's key in one" \
    "Secret); delete it from the cluster too:" \
    "kubectl -n $namespace delete secret lodestone-lvm-node-tls" >&2
fi
echo "$prog: wrote $out/secrets/ and $out/nodes/<node>/ (${#nodes[@]} nodes); apply the" \
  "Secret with: kubectl apply -f $out/secrets/ and copy each $out/nodes/<node>/ to" \
  "/etc/lodestone/agent-tls/ on that node only" >&2
