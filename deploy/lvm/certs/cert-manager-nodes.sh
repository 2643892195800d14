#!/usr/bin/env bash
# The nodes' agent certificates from cert-manager (after
# `kubectl apply -k deploy/lvm/certs/cert-manager`), in two steps:
#
#   cert-manager-nodes.sh certificates [NODE...] | kubectl apply -f -
#       one Certificate per node (DNS SAN: the node's name), issued by the
#       lodestone-lvm-ca Issuer into the Secret lodestone-lvm-node-<node>;
#       no pod mounts these Secrets
#
#   cert-manager-nodes.sh export NODE DIR
#       once issued: that node's tls.crt, tls.key and ca.crt, from its
#       Secret, written to DIR (mode 0600), to copy to that node only, into
#       /etc/lodestone/agent-tls/ (the host directory the node plugin
#       mounts), e.g.
#         cert-manager-nodes.sh export worker-1 ./worker-1
#         scp -p ./worker-1/* root@worker-1:/etc/lodestone/agent-tls/
#         rm -r ./worker-1
#
# Without NODE arguments, `certificates` covers every Node of the cluster
# (kubectl get nodes). Options: --namespace NS (default lodestone-lvm).
#
# Node keys never go into a Secret that a DaemonSet mounts (it would reach
# every node). cert-manager renews the per-node Secrets by itself; run
# `export` and the copy again after a renewal (the node plugin re-reads the
# files when they change: no restart).
set -euo pipefail

prog=cert-manager-nodes.sh
namespace=lodestone-lvm
die() { echo "$prog: $*" >&2; exit 2; }

[[ $# -ge 1 ]] || die "usage: $prog certificates [--namespace NS] [NODE...] | export [--namespace NS] NODE DIR"
command=$1; shift
while [[ $# -gt 0 ]]; do
  case "$1" in
    --namespace) namespace=${2:?--namespace needs a value}; shift 2 ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    -*) die "unknown option: $1" ;;
    *) break ;;
  esac
done

if [[ "$command" == export ]]; then
  [[ $# -eq 2 ]] || die "usage: $prog export [--namespace NS] NODE DIR"
  export_dir=$2
  nodes=("$1")
elif [[ $# -gt 0 ]]; then
  nodes=("$@")
else
  mapfile -t nodes < <(kubectl get nodes -o jsonpath='{range .items[*]}{.metadata.name}{"\n"}{end}')
fi
[[ ${#nodes[@]} -gt 0 ]] || die "no nodes"
dns_name_re='^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$'
for node in "${nodes[@]}"; do
  [[ ${#node} -le 63 && "$node" =~ $dns_name_re ]] \
    || die "$node: not a lowercase DNS name of at most 63 characters"
done

certificates() {
  local node
  for node in "${nodes[@]}"; do
    cat <<EOF
---
apiVersion: cert-manager.io/v1
kind: Certificate
metadata:
  name: lodestone-lvm-node-$node
  namespace: $namespace
  labels:
    app.kubernetes.io/part-of: lodestone
spec:
  secretName: lodestone-lvm-node-$node
  commonName: $node
  dnsNames:
    - $node
  usages:
    - digital signature
    - server auth
    - client auth
  duration: 8760h
  renewBefore: 720h
  privateKey:
    algorithm: ECDSA
    size: 256
    rotationPolicy: Always
  issuerRef:
    group: cert-manager.io
    kind: Issuer
    name: lodestone-lvm-ca
EOF
  done
}

# field SECRET KEY: one base64 value of a Secret (kubectl prints data as is).
field() {
  local value
  value=$(kubectl -n "$namespace" get secret "$1" \
    -o "jsonpath={.data.${2//./\\.}}") || die "cannot read Secret $1"
  [[ -n "$value" ]] || die "Secret $1 has no $2 (not issued yet?)"
  printf '%s' "$value"
}

export_node() {
  # Everything is read before anything is written, so a missing Secret
  # never leaves a partial set of files.
  local node=${nodes[0]} secret ca crt key
  secret="lodestone-lvm-node-$node"
  ca=$(field "$secret" ca.crt)
  crt=$(field "$secret" tls.crt)
  key=$(field "$secret" tls.key)
  umask 077
  mkdir -p "$export_dir"
  printf '%s' "$ca" | base64 -d >"$export_dir/ca.crt"
  printf '%s' "$crt" | base64 -d >"$export_dir/tls.crt"
  printf '%s' "$key" | base64 -d >"$export_dir/tls.key"
  echo "$prog: wrote $export_dir/{tls.crt,tls.key,ca.crt} of $node; copy them to" \
    "/etc/lodestone/agent-tls/ on $node only, then delete them here" >&2
}

case "$command" in
  certificates) certificates ;;
  export) export_node ;;
  *) die "unknown command: $command (certificates or export)" ;;
esac
