#!/usr/bin/env bash
# The nodes' agent certificates from cert-manager (after
# `kubectl apply -k deploy/lvm/certs/cert-manager`), in two steps:
#
#   cert-manager-nodes.sh certificates [NODE...] | kubectl apply -f -
#       one Certificate per node (DNS SAN: the node's name), issued by the
#       lodestone-lvm-ca Issuer into the Secret lodestone-lvm-node-<node>
#
#   cert-manager-nodes.sh bundle [NODE...] | kubectl apply -f -
#       once they are issued: the Secret lodestone-lvm-node-tls that every
#       node plugin mounts (ca.crt, <node>.crt, <node>.key for each node),
#       copied from the per-node Secrets
#
# Without NODE arguments, every Node of the cluster (kubectl get nodes).
# Options: --namespace NS (default lodestone-lvm).
#
# cert-manager renews the per-node Secrets by itself; the bundle is a copy,
# so run `bundle` again after a renewal (or from a CronJob) and restart the
# node plugins, which read their certificate at start:
#   kubectl -n lodestone-lvm rollout restart daemonset/lodestone-lvm-node
set -euo pipefail

prog=cert-manager-nodes.sh
namespace=lodestone-lvm
die() { echo "$prog: $*" >&2; exit 2; }

[[ $# -ge 1 ]] || die "usage: $prog certificates|bundle [--namespace NS] [NODE...]"
command=$1; shift
while [[ $# -gt 0 ]]; do
  case "$1" in
    --namespace) namespace=${2:?--namespace needs a value}; shift 2 ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    -*) die "unknown option: $1" ;;
    *) break ;;
  esac
done

if [[ $# -gt 0 ]]; then
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

bundle() {
  # Everything is read before anything is printed, so a missing Secret
  # never yields a partial bundle.
  local node ca text crt key
  ca=$(field "lodestone-lvm-node-${nodes[0]}" ca.crt)
  text=$(printf '%s\n' \
    "apiVersion: v1" \
    "kind: Secret" \
    "metadata:" \
    "  name: lodestone-lvm-node-tls" \
    "  namespace: $namespace" \
    "  labels:" \
    "    app.kubernetes.io/part-of: lodestone" \
    "type: Opaque" \
    "data:" \
    "  ca.crt: $ca")
  for node in "${nodes[@]}"; do
    crt=$(field "lodestone-lvm-node-$node" tls.crt)
    key=$(field "lodestone-lvm-node-$node" tls.key)
    text+=$'\n'"  $node.crt: $crt"$'\n'"  $node.key: $key"
  done
  printf '%s\n' "$text"
}

case "$command" in
  certificates) certificates ;;
  bundle) bundle ;;
  *) die "unknown command: $command (certificates or bundle)" ;;
esac
