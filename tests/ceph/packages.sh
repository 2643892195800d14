#!/usr/bin/env bash
# Install (idempotently) the Debian packages that Lodestone's single-node Ceph
# test cluster (tests/ceph/cluster.sh) and the future RBD backend need.
# Cheap to re-run: exits at once when every package is already installed.
#
# Usage: tests/ceph/packages.sh [--no-mgr] [--print]
#   --no-mgr   leave out ceph-mgr (only needed for pool usage stats and
#              background tasks such as `ceph rbd task add ...`)
#   --print    print the package list and exit
# Must run as root (no sudo is used).
set -euo pipefail

prog=packages.sh
packages=(
  ceph-mon        # monitor (pulls in ceph-base: monmaptool)
  ceph-osd        # OSD daemon (memstore object store)
  ceph-mgr        # optional: pool usage stats, background rbd tasks
  ceph-common     # ceph, rbd and ceph-authtool CLIs, librados/librbd
  rbd-nbd         # userspace block mapping (alternative to krbd)
  uuid-runtime    # uuidgen for the OSD uuid
  librbd-dev      # headers + .so link for the driver's FFI
  librados-dev
)

for arg in "$@"; do
  case "$arg" in
    --no-mgr)
      kept=()
      for p in "${packages[@]}"; do [[ "$p" == ceph-mgr ]] || kept+=("$p"); done
      packages=("${kept[@]}") ;;
    --print) printf '%s\n' "${packages[@]}"; exit 0 ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "$prog: unknown argument: $arg" >&2; exit 2 ;;
  esac
done

missing=()
for p in "${packages[@]}"; do
  status=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)
  [[ "$status" == installed ]] || missing+=("$p")
done

if ((${#missing[@]} == 0)); then
  echo "$prog: all ${#packages[@]} packages already installed"
  exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
  echo "$prog: must run as root to install: ${missing[*]}" >&2
  exit 1
fi
echo "$prog: installing: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt_opts=(-y -q -o DPkg::Lock::Timeout=600
          -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)
apt-get "${apt_opts[@]}" update
apt-get "${apt_opts[@]}" install --no-install-recommends "${missing[@]}"

# The packages' postinst enables ceph systemd units for a cluster in /etc/ceph;
# the harness never uses /etc/ceph, and where PID 1 is not systemd nothing
# starts them.
echo "$prog: done"
