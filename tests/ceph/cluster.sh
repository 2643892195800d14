#!/usr/bin/env bash
# A throw-away single-node Ceph cluster for Lodestone's RBD tests.
#
# Usage: tests/ceph/cluster.sh start|stop|status|env|purge [DIR]
#
#   start   create a fresh cluster in DIR and wait until pool "rbd" is usable
#           (if this DIR's cluster is already running: say so, exit 0)
#   stop    stop the daemons of DIR (pid files under DIR) and wait for them
#   status  daemon pids and cluster health; exit 3 if not running
#   env     print `export` lines for tests (no key material, only paths):
#             CEPH_CONF                     DIR/ceph.conf (ceph/rbd CLIs read it)
#             LODESTONE_CEPH_MON_HOST       [v2:127.0.0.1:3300,v1:127.0.0.1:6789]
#                                           (librados `mon_host` syntax)
#             LODESTONE_CEPH_MONITORS       127.0.0.1:6789 (plain msgr1 list,
#                                           as ceph-csi-style configs and the
#                                           kernel client take them)
#             LODESTONE_CEPH_USER           lodestone (the id; entity is
#                                           client.lodestone)
#             LODESTONE_CEPH_KEYRING        DIR/client.lodestone.keyring
#             LODESTONE_CEPH_ADMIN_KEYRING  DIR/client.admin.keyring
#             LODESTONE_CEPH_POOL           rbd
#             LODESTONE_CEPH_FSID, LODESTONE_CEPH_DIR
#   purge   stop, then delete DIR
#
# DIR defaults to $LODESTONE_CEPH_DIR, else <repo>/target/ceph.  Everything
# the cluster has lives in DIR: ceph.conf, keyrings (mode 0600), mon/osd/mgr
# data, run dir (pid files, admin sockets), logs.  Nothing in /etc/ceph or
# /var/lib/ceph is read or written.
#
# The cluster: mon.a on 127.0.0.1 (msgr2 + msgr1), osd.0 on memstore (RAM),
# optionally mgr.x; cephx everywhere; pool size 1; pool "rbd" initialised
# for RBD; user client.lodestone with caps
#   mon 'profile rbd' osd 'profile rbd pool=rbd' mgr 'profile rbd pool=rbd'.
#
# Environment (all optional):
#   LODESTONE_CEPH_DIR           cluster directory (see above)
#   LODESTONE_CEPH_MON_V2_PORT   monitor msgr2 port        (default 3300)
#   LODESTONE_CEPH_MON_V1_PORT   monitor msgr1 port        (default 6789)
#   LODESTONE_CEPH_MGR           1 = run a ceph-mgr, 0 = don't
#                                (default 1 if ceph-mgr is installed)
#   LODESTONE_CEPH_MGR_MODULES   extra mgr Python modules to make available
#                                besides the always-on ones, or "all"
#   LODESTONE_CEPH_OSD_BYTES     memstore size in bytes    (default 1 GiB)
#   LODESTONE_CEPH_TIMEOUT       seconds start may take    (default 180,
#                                600 inside the run-in-guest.sh VM)
#
# Exit status: 0 ok, 1 failure, 2 usage, 3 (status) not running.
set -euo pipefail

prog=cluster.sh
script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
repo_root=$(cd "$script_dir/../.." && pwd -P)

usage() { sed -n '4p' "$0" | sed 's/^# //' >&2; exit 2; }
(($# >= 1 && $# <= 2)) || usage
cmd=$1
dir=${2:-${LODESTONE_CEPH_DIR:-$repo_root/target/ceph}}
[[ -n "$dir" ]] || usage
dir=$(realpath -m -- "$dir")

say() { echo "$prog: $*"; }
warn() { echo "$prog: $*" >&2; }
die() { echo "$prog: error: $*" >&2; exit 1; }

umask 077  # keyrings, config and data are for the owner only

conf=$dir/ceph.conf
marker=$dir/.lodestone-ceph-cluster
state_file=$dir/cluster.state  # written by start: ports, fsid, daemons
pool=rbd
user=lodestone
mon_id=a
osd_id=0
mgr_id=x

# ---------------------------------------------------------------- helpers

stamp() { printf '%(%T)T.%s' -1 "${EPOCHREALTIME: -6:3}"; } # hh:mm:ss.mmm
now_ms() { local t=${EPOCHREALTIME/./}; echo $((t / 1000)); }
fmt_s() { printf '%d.%02d' $(($1 / 1000)) $((($1 % 1000) / 10)); } # ms -> s

# Read one key of the state file (no sourcing of files from DIR).
state() {
  local k v
  [[ -r "$state_file" ]] || return 1
  while IFS='=' read -r k v; do
    [[ "$k" == "$1" ]] && { printf '%s\n' "$v"; return 0; }
  done <"$state_file"
  return 1
}

daemons() { # daemons recorded for this DIR (or the ones start will create)
  local d
  d=$(state daemons 2>/dev/null) || d="mon.$mon_id osd.$osd_id mgr.$mgr_id"
  echo "$d"
}

# pid of daemon NAME (mon.a ...) if it is running from this DIR, else fail.
daemon_pid() {
  local name=$1 pidf=$dir/run/$1.pid pid args
  [[ -r "$pidf" ]] || return 1
  read -r pid <"$pidf" 2>/dev/null || return 1
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  mapfile -d '' -t args <"/proc/$pid/cmdline" 2>/dev/null || return 1
  # guard against a recycled pid: must be ceph-<type> with our config
  [[ "${args[0]-}" == *"ceph-${name%%.*}" && " ${args[*]} " == *" $conf "* ]] || return 1
  echo "$pid"
}

# Does anything listen on TCP port $1 (any address, v4 or v6)?  Prints
# "pid (comm)" of the owner when it can find it.
port_owner() {
  local port=$1 hex inode f line i
  hex=$(printf '%04X' "$port")
  inode=$(awk -v p=":$hex" '$4 == "0A" && substr($2, length($2) - 4) == p { print $10; exit }' \
          /proc/net/tcp /proc/net/tcp6 2>/dev/null)
  [[ -n "$inode" ]] || return 1
  for f in /proc/[0-9]*/fd/*; do
    if [[ "$(readlink "$f" 2>/dev/null)" == "socket:[$inode]" ]]; then
      line=${f#/proc/}; line=${line%%/*}
      local comm args conf_arg=
      comm=$(cat /proc/"$line"/comm 2>/dev/null || echo '?')
      if [[ "$comm" == ceph-* ]]; then  # whose cluster is it?
        mapfile -d '' -t args <"/proc/$line/cmdline" 2>/dev/null || args=()
        for i in "${!args[@]}"; do
          [[ "${args[$i]}" == --conf || "${args[$i]}" == -c ]] && conf_arg=${args[$((i + 1))]:-}
        done
      fi
      echo "pid $line ($comm${conf_arg:+ of the cluster in ${conf_arg%/ceph.conf}})"
      return 0
    fi
  done
  echo "unknown process"
  return 0
}

log_tails() { # the last lines of every daemon log, for failure reports
  local f
  for f in "$dir"/log/mon.*.log "$dir"/log/osd.*.log "$dir"/log/mgr.*.log \
           "$dir"/log/cluster-sh.log; do
    [[ -s "$f" ]] || continue
    echo "----- tail of $f -----"
    tail -n "${LODESTONE_CEPH_LOG_LINES:-25}" "$f"
  done
  echo "-----"
}

ceph_admin() { # the ceph CLI as client.admin against this cluster
  ceph --conf "$conf" --name client.admin --connect-timeout "${CEPH_CONNECT_TIMEOUT:-20}" "$@"
}

alive() {
  local _a _b st
  read -r _a _b st _ <"/proc/$1/stat" 2>/dev/null || return 1
  [[ -n "$st" && "$st" != Z ]]
}

# stop_daemons [quiet]: SIGKILL every daemon of DIR, wait until they are gone.
# The state is disposable (start always builds a fresh cluster and memstore
# keeps its data in RAM), so there is nothing to shut down cleanly; a
# SIGTERM'd mgr takes ~2.5 s and the mon ~3 s more to exit.  Unmap krbd/nbd
# devices BEFORE stopping, or their I/O (and `rbd unmap`) hangs.
stop_daemons() {
  local name pid pids=() names=() i left
  for name in "mgr.$mgr_id" "osd.$osd_id" "mon.$mon_id"; do
    pid=$(daemon_pid "$name") || continue
    kill -KILL "$pid" 2>/dev/null || true
    pids+=("$pid"); names+=("$name")
  done
  local deadline=$((SECONDS + ${LODESTONE_CEPH_STOP_TIMEOUT:-20}))
  while :; do
    left=()
    for i in "${!pids[@]}"; do alive "${pids[$i]}" && left+=("${names[$i]} (pid ${pids[$i]})"); done
    ((${#left[@]})) || break
    ((SECONDS < deadline)) || die "still running after SIGKILL: ${left[*]}"
    sleep 0.05
  done
  rm -f "$dir"/run/*.pid "$dir"/run/*.asok
  [[ -n "${1:-}" ]] && return 0
  if ((${#names[@]})); then say "stopped ${names[*]} ($dir)"; else say "no daemons running in $dir"; fi
}

lock_dir() {
  mkdir -p "$dir"
  exec 9>"$dir/.lock"
  flock -n 9 || die "another cluster.sh is working on $dir"
}

new_uuid() { # no process needed where the kernel provides them
  local u
  if read -r u </proc/sys/kernel/random/uuid 2>/dev/null; then echo "$u"; else uuidgen; fi
}

need() { command -v "$1" >/dev/null || die "$1 not found; run tests/ceph/packages.sh"; }

# ---------------------------------------------------------------- start

python=/usr/bin/python3  # the one python3-rados is built for (not a pyenv shim)
# mon_commands_py CONF ARG...: as client.admin, send each JSON ARG to the
# mon (print its output; exit 1 with the mon's error on failure); an ARG
# "@option" prints "option = value" of the client's config instead, and
# "=client.x" checks that client.x can authenticate.
read -r -d '' mon_commands_py <<'PY' || true
import sys
import rados
cluster = rados.Rados(conffile=sys.argv[1], name="client.admin")
cluster.connect(timeout=60)
for arg in sys.argv[2:]:
    if arg.startswith("="):  # can this user authenticate (key + caps in place)?
        user = rados.Rados(conffile=sys.argv[1], name=arg[1:])
        user.connect(timeout=60)
        user.shutdown()
        print("# %s authenticated" % arg[1:])
        continue
    if arg.startswith("@"):
        print("%s = %s" % (arg[1:], cluster.conf_get(arg[1:])))
        continue
    ret, out, err = cluster.mon_command(arg, b"", timeout=60)
    print("# %s -> %d %s" % (arg, ret, err.strip()))
    if out:
        print(out.decode("utf-8", "replace").strip())
    if ret != 0:
        sys.exit("mon command %s failed: %d %s" % (arg, ret, err.strip()))
cluster.shutdown()
PY

write_conf() {
  local fsid=$1 mon_host=$2 with_mgr=$3
  # \$name, \$id are ceph metavariables, expanded by each daemon/client
  cat >"$conf" <<EOF
# Written by tests/ceph/cluster.sh start; regenerated on every start.
[global]
fsid = $fsid
mon host = $mon_host
mon initial members = $mon_id
public addr = 127.0.0.1
ms bind ipv6 = false
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
auth allow insecure global id reclaim = false
run dir = $dir/run
crash dir = $dir/crash
pid file = $dir/run/\$name.pid
log file = $dir/log/\$name.log
log to syslog = false
err to syslog = false
mon cluster log file = $dir/log/cluster.log
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon data avail warn = 2
mon data avail crit = 1
# the mon batches map changes for paxos propose interval (1 s): every OSD
# boot step, pool create, pool init... cost a second each
paxos propose interval = 0.1
# read by the mon at mkfs; only the always-on modules (those present) run
mgr initial modules =
$( ((with_mgr)) || printf '%s\n' "# no mgr: no 'no active mgr' health warning" "mon mgr mkfs grace = 31536000" )

[mon]
mon data = $dir/\$name
keyring = $dir/\$name/keyring

[mon.$mon_id]
# lets mkfs find itself in the monmap it builds from mon host (else: "does
# not exist in monmap" and a bind to the default ports)
public addrv = $mon_host

[osd]
osd data = $dir/\$name
keyring = $dir/\$name/keyring
osd objectstore = memstore
memstore device bytes = $osd_bytes
osd class load list = *
osd class default list = *
osd op num shards = 2
osd op num threads per shard = 1

[mgr]
mgr data = $dir/\$name
# pool usage stats (df, rados_ioctx_pool_stat) lag writes by ~6 s with the
# default 5 s / 2 s; tests want them sooner
mgr stats period = 1
mgr tick period = 1
keyring = $dir/\$name/keyring
$( [[ -n "$mgr_module_path" ]] && echo "mgr module path = $mgr_module_path" )

[client]
keyring = $dir/\$name.keyring
EOF
}

# b64 BYTE...: base64 of the given byte values (pure bash: no process)
b64() {
  local t=ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/
  local out='' n=$# i v
  local b=("$@")
  for ((i = 0; i < n; i += 3)); do
    v=$(( b[i] << 16 | ${b[i+1]:-0} << 8 | ${b[i+2]:-0} ))
    out+=${t:v >> 18 & 63:1}${t:v >> 12 & 63:1}
    if ((i + 1 < n)); then out+=${t:v >> 6 & 63:1}; else out+='='; fi
    if ((i + 2 < n)); then out+=${t:v & 63:1}; else out+='='; fi
  done
  printf '%s' "$out"
}

# write_key FILE ENTITY [SUBSYS CAP]...: a new keyring FILE for ENTITY with a
# fresh random key and caps; the same entry also goes to the mon's seed
# keyring.  A cephx secret is the base64 of a CryptoKey: le16 type (1 = AES),
# le32 seconds + le32 nanoseconds (creation time), le16 length (16), then 16
# random bytes (here from $SRANDOM: bash's getrandom(2)-backed source).
# Made in bash rather than by one `ceph-authtool --gen-key` per entity:
# under TCG every process costs seconds.  The key is never printed/logged.
write_key() {
  local file=$1 entity=$2 t=$EPOCHSECONDS r bytes=(1 0) i key text
  shift 2
  bytes+=($((t & 255)) $((t >> 8 & 255)) $((t >> 16 & 255)) $((t >> 24 & 255)) 0 0 0 0 16 0)
  for ((i = 0; i < 4; i++)); do
    r=$SRANDOM
    bytes+=($((r & 255)) $((r >> 8 & 255)) $((r >> 16 & 255)) $((r >> 24 & 255)))
  done
  key=$(b64 "${bytes[@]}")
  ((${#key} == 40)) || die "could not generate a key for $entity"
  printf -v text '[%s]\n\tkey = %s\n' "$entity" "$key"
  while (($# >= 2)); do printf -v text '%s\tcaps %s = "%s"\n' "$text" "$1" "$2"; shift 2; done
  printf '%s' "$text" >"$file"   # umask 077: mode 0600
  [[ "$file" == "$seed" ]] || printf '%s' "$text" >>"$seed"
}

start_fail() {
  warn "error: $*"
  local p
  for p in "${bg_pids[@]}"; do kill "$p" 2>/dev/null; done
  log_tails >&2
  stop_daemons quiet
  warn "cluster state and logs kept in $dir"
  exit 1
}

# run_step DESC CMD...: run CMD bounded by what is left of the start timeout,
# output to the log (or to $step_out); on failure report DESC + log tails and
# stop the daemons.
run_step() {
  local desc=$1 left rc=0
  shift
  left=$((deadline - SECONDS))
  ((left > 0)) || start_fail "timed out (LODESTONE_CEPH_TIMEOUT=${timeout_s}s) before: $desc"
  local out=${step_out:-$dir/log/cluster-sh.log}
  local a shown=()
  for a in "$@"; do [[ "$a" == *$'\n'* ]] && shown+=("<script>") || shown+=("$a"); done
  echo "### $(stamp) $desc: ${shown[*]}" >>"$dir/log/cluster-sh.log"
  # 9>&-: daemons must not inherit (and hold) the lock on DIR
  timeout --kill-after=5 "$left" "$@" >>"$out" 2>&1 9>&- || rc=$?
  [[ "$out" == "$dir/log/cluster-sh.log" ]] || cat "$out" >>"$dir/log/cluster-sh.log"
  if ((rc == 124 || rc == 137)); then
    start_fail "timed out (LODESTONE_CEPH_TIMEOUT=${timeout_s}s) during: $desc"
  elif ((rc != 0)); then
    start_fail "$desc failed (exit $rc)"
  fi
}

# bg_start NAME CMD...: run CMD in the background (bounded like run_step),
# output to DIR/log/NAME.out; bg_wait NAME: wait for it, fail like run_step.
declare -A bg_pids=()
bg_start() {
  local name=$1
  shift
  echo "### $(stamp) $name: $* (in the background)" >>"$dir/log/cluster-sh.log"
  timeout --kill-after=5 $((deadline - SECONDS)) "$@" >"$dir/log/$name.out" 2>&1 9>&- &
  bg_pids[$name]=$!
}
bg_wait() {
  local name=$1 rc=0
  wait "${bg_pids[$name]}" || rc=$?
  unset "bg_pids[$name]"
  echo "### $(stamp) $name done (exit $rc)" >>"$dir/log/cluster-sh.log"
  cat "$dir/log/$name.out" >>"$dir/log/cluster-sh.log"
  if ((rc == 124 || rc == 137)); then
    start_fail "timed out (LODESTONE_CEPH_TIMEOUT=${timeout_s}s) during: $name"
  elif ((rc != 0)); then
    start_fail "$name failed (exit $rc)"
  fi
}

cmd_start() {
  local v2=${LODESTONE_CEPH_MON_V2_PORT:-3300} v1=${LODESTONE_CEPH_MON_V1_PORT:-6789}
  osd_bytes=${LODESTONE_CEPH_OSD_BYTES:-1073741824}
  # under TCG (the QEMU guest) everything is 3-10x slower
  if [[ "${LODESTONE_VM_GUEST:-}" == 1 ]]; then timeout_s=${LODESTONE_CEPH_TIMEOUT:-600}
  else timeout_s=${LODESTONE_CEPH_TIMEOUT:-180}; fi
  local with_mgr=${LODESTONE_CEPH_MGR:-}
  if [[ -z "$with_mgr" ]]; then
    command -v ceph-mgr >/dev/null && with_mgr=1 || with_mgr=0
  fi
  [[ "$with_mgr" == [01] ]] || die "LODESTONE_CEPH_MGR must be 0 or 1"
  local mgr_modules=${LODESTONE_CEPH_MGR_MODULES-}
  local p
  for p in "$v2" "$v1"; do
    if ! [[ "$p" =~ ^[0-9]+$ ]] || ((p < 1 || p > 65535)); then die "bad port '$p'"; fi
  done
  ((v1 != v2)) || die "msgr2 and msgr1 ports must differ (both $v1)"
  if ! [[ "$osd_bytes" =~ ^[0-9]+$ ]] || ((osd_bytes < 64 * 1024 * 1024)); then
    die "LODESTONE_CEPH_OSD_BYTES must be a byte count >= 64 MiB"
  fi
  [[ "$timeout_s" =~ ^[0-9]+$ ]] || die "LODESTONE_CEPH_TIMEOUT must be whole seconds"
  need ceph-mon; need ceph-osd; need ceph; need rbd
  [[ -x "$python" ]] || die "$python not found; run tests/ceph/packages.sh"
  ((with_mgr == 0)) || need ceph-mgr
  # unix socket paths are limited to 107 bytes: DIR/run/ceph-mgr.x.asok,
  # and room for a client's DIR/run/ceph-client.lodestone.asok if wanted
  (( ${#dir} <= 70 )) || die "DIR too long for admin socket paths (${#dir} > 70 chars): $dir"

  lock_dir
  if [[ ! -e "$marker" ]]; then
    local f
    for f in "$dir"/* "$dir"/.[!.]* "$dir"/..?*; do
      [[ -e "$f" || -L "$f" ]] || continue
      [[ "$f" == "$dir/.lock" ]] && continue
      die "$dir exists, is not empty and was not made by $prog; refusing to wipe it"
    done
  fi

  # Already running from this DIR?
  local running=() missing=() name
  for name in $(daemons); do
    if daemon_pid "$name" >/dev/null; then running+=("$name"); else missing+=("$name"); fi
  done
  if ((${#running[@]})); then
    if ((${#missing[@]} == 0)); then
      say "already running in $dir (${running[*]}); 'cluster.sh stop' first for a fresh one"
      return 0
    fi
    warn "partly running in $dir (up: ${running[*]}; down: ${missing[*]}): restarting from scratch"
    stop_daemons quiet
  fi

  local owner
  for p in "$v2" "$v1"; do
    if owner=$(port_owner "$p"); then
      die "TCP port $p is already in use ($owner); another cluster? Stop it" \
          "('tests/ceph/cluster.sh stop DIR') or pick other ports with" \
          "LODESTONE_CEPH_MON_V2_PORT / LODESTONE_CEPH_MON_V1_PORT"
    fi
  done

  local t0 t_mon t_pool t_end
  t0=$(now_ms)
  deadline=$((SECONDS + timeout_s))

  # fresh state: wipe everything but the lock
  find "$dir" -mindepth 1 -maxdepth 1 ! -name .lock -exec rm -rf {} +
  : >"$marker"
  mkdir -p "$dir/run" "$dir/log" "$dir/crash" "$dir/mon.$mon_id" "$dir/osd.$osd_id"
  ((with_mgr == 0)) || mkdir -p "$dir/mgr.$mgr_id"

  local fsid osd_uuid mon_host
  fsid=$(new_uuid)
  osd_uuid=$(new_uuid)
  mon_host="[v2:127.0.0.1:$v2,v1:127.0.0.1:$v1]"
  local daemon_list="mon.$mon_id osd.$osd_id"
  ((with_mgr == 0)) || daemon_list+=" mgr.$mgr_id"
  # The mgr imports EVERY module found in its module path at start-up, even
  # disabled ones (each in its own Python sub-interpreter): ~35 s for all 27
  # on this host, minutes under TCG.  Give it a module path holding only the
  # always-on modules (fewer make health HEALTH_ERR "Not found or
  # unloadable") plus any asked for.  Filled in once the mon has told us the
  # always-on list.
  mgr_module_path=
  if ((with_mgr)) && [[ "$mgr_modules" != all ]]; then
    mgr_module_path=$dir/mgr-modules
    mkdir -p "$mgr_module_path"
  fi
  write_conf "$fsid" "$mon_host" "$with_mgr"
  {
    echo "fsid=$fsid"
    echo "mon_host=$mon_host"
    echo "monitors=127.0.0.1:$v1"
    echo "daemons=$daemon_list"
  } >"$state_file"

  # Keys: every entity gets its own 0600 keyring file, and all of them (with
  # caps) are seeded into the mon's auth database by `ceph-mon --mkfs`, so
  # no `ceph auth` calls are needed; no key passes through a command line,
  # stdout or a log.
  seed=$dir/mon-seed.keyring
  write_key "$seed" mon. mon 'allow *'
  write_key "$dir/client.admin.keyring" client.admin \
    mon 'allow *' osd 'allow *' mgr 'allow *' mds 'allow *'
  write_key "$dir/client.$user.keyring" "client.$user" \
    mon 'profile rbd' osd "profile rbd pool=$pool" mgr "profile rbd pool=$pool"
  write_key "$dir/osd.$osd_id/keyring" "osd.$osd_id" \
    mon 'allow profile osd' mgr 'allow profile osd' osd 'allow *'
  if ((with_mgr)); then
    write_key "$dir/mgr.$mgr_id/keyring" "mgr.$mgr_id" \
      mon 'allow profile mgr' osd 'allow *' mds 'allow *'
  fi

  # No monmaptool: with no --monmap, mkfs builds the initial monmap from
  # `mon host` + `mon initial members` (one process less: ~5 s under TCG).
  run_step "ceph-mon --mkfs" ceph-mon --conf "$conf" --mkfs --id "$mon_id" --keyring "$seed"
  rm -f "$seed"
  run_step "start ceph-mon" ceph-mon --conf "$conf" --id "$mon_id"
  t_mon=$(now_ms)

  # Register the OSD, create the pool, check that client.lodestone can log
  # in and (for the mgr) learn the always-on mgr modules, in ONE process
  # through the python3-rados binding: the `ceph` CLI costs ~3x more per
  # call (~1 s here, ~10-30 s under TCG).  Meanwhile (2 CPUs) make the OSD's
  # store: mkfs needs the mon (for its config), not the OSD's registration.
  bg_start ceph-osd-mkfs ceph-osd --conf "$conf" --id "$osd_id" --mkfs --osd-uuid "$osd_uuid"
  local mon_out=$dir/log/mon-commands.out
  step_out=$mon_out run_step "register osd.$osd_id, create pool $pool" \
    "$python" -c "$mon_commands_py" "$conf" \
      "{\"prefix\": \"osd new\", \"uuid\": \"$osd_uuid\", \"id\": $osd_id}" \
      "{\"prefix\": \"osd pool create\", \"pool\": \"$pool\"}" \
      '{"prefix": "mgr module ls", "format": "json"}' \
      '@mgr_module_path' "=client.$user"

  if [[ -n "$mgr_module_path" ]]; then
    local always sys_path m
    always=$(grep -o '"always_on_modules": *\[[^]]*\]' "$mon_out" | sed 's/.*\[//; s/[]",]/ /g')
    [[ -n "${always// /}" ]] || start_fail "no always_on_modules in 'mgr module ls' output"
    sys_path=$(sed -n 's/^mgr_module_path = //p' "$mon_out")
    [[ -d "$sys_path" ]] || sys_path=/usr/share/ceph/mgr
    for m in "$sys_path"/*.py $always $mgr_modules; do
      [[ "$m" == /* ]] || m=$sys_path/$m
      [[ -e "$m" ]] || start_fail "no mgr module ${m##*/} in $sys_path"
      [[ -e "$mgr_module_path/${m##*/}" ]] || ln -s "$m" "$mgr_module_path/${m##*/}"
    done
  fi

  # `rbd pool init` writes to the pool, so it returns once the OSD is up and
  # the pool's PGs are active, i.e. the pool is usable.  It can wait for
  # that in the background while the daemons start (its objecter re-asks
  # for maps every tick: 5 s by default, so the OSD's boot would be seen late).
  bg_start rbd-pool-init rbd --conf "$conf" --name client.admin \
    --objecter-tick-interval 0.2 pool init "$pool"
  # the mgr first: its Python start-up overlaps the OSD's
  if ((with_mgr)); then
    run_step "start ceph-mgr" ceph-mgr --conf "$conf" --id "$mgr_id"
  fi
  bg_wait ceph-osd-mkfs
  run_step "start ceph-osd" ceph-osd --conf "$conf" --id "$osd_id"
  bg_wait rbd-pool-init
  t_pool=$(now_ms)

  if ((with_mgr)); then
    # Wait for an available mgr (pool stats, rbd background tasks).  Polling
    # `ceph mgr stat` costs a Python start per try (~1 s here, ~3 s under
    # TCG); the mon's cluster log prints each new mgr map instead, and
    # "x(active, since ...)" (no "starting") means available.
    while ! grep -qE "mgrmap e[0-9]+: $mgr_id\(active, since" "$dir/log/cluster.log" 2>/dev/null; do
      ((SECONDS < deadline)) || start_fail "timed out (LODESTONE_CEPH_TIMEOUT=${timeout_s}s) waiting for mgr.$mgr_id to become active"
      daemon_pid "mgr.$mgr_id" >/dev/null || start_fail "ceph-mgr exited"
      sleep 0.2
    done
  fi
  t_end=$(now_ms)

  for name in $daemon_list; do
    daemon_pid "$name" >/dev/null || start_fail "$name is not running after start"
  done
  local timing
  timing="mon $(fmt_s $((t_mon - t0)))s, osd+pool $(fmt_s $((t_pool - t_mon)))s"
  ((with_mgr)) && timing+=", mgr active +$(fmt_s $((t_end - t_pool)))s"
  say "cluster up in $(fmt_s $((t_end - t0)))s ($timing): $daemon_list, mon $mon_host, dir $dir"
  say "for tests: eval \"\$($0 env $dir)\""
}

# ---------------------------------------------------------------- others

shq() { # quote for the shell, readably
  if [[ "$1" =~ ^[A-Za-z0-9_./:,@%+=-]*$ ]]; then printf '%s' "$1"
  else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}

cmd_env() {
  [[ -r "$state_file" && -r "$conf" ]] || die "no cluster in $dir (run: $prog start $dir)"
  local name
  for name in $(daemons); do
    daemon_pid "$name" >/dev/null || { warn "warning: $name is not running in $dir"; break; }
  done
  printf 'export CEPH_CONF=%s\n' "$(shq "$conf")"
  printf 'export LODESTONE_CEPH_DIR=%s\n' "$(shq "$dir")"
  printf 'export LODESTONE_CEPH_MON_HOST=%s\n' "$(shq "$(state mon_host)")"
  printf 'export LODESTONE_CEPH_MONITORS=%s\n' "$(shq "$(state monitors)")"
  printf 'export LODESTONE_CEPH_FSID=%s\n' "$(shq "$(state fsid)")"
  printf 'export LODESTONE_CEPH_POOL=%s\n' "$(shq "$pool")"
  printf 'export LODESTONE_CEPH_USER=%s\n' "$(shq "$user")"
  printf 'export LODESTONE_CEPH_KEYRING=%s\n' "$(shq "$dir/client.$user.keyring")"
  printf 'export LODESTONE_CEPH_ADMIN_KEYRING=%s\n' "$(shq "$dir/client.admin.keyring")"
}

cmd_status() {
  [[ -r "$state_file" ]] || { say "no cluster in $dir"; exit 3; }
  local name pid up=0 down=0
  say "dir $dir, mon $(state mon_host)"
  for name in $(daemons); do
    if pid=$(daemon_pid "$name"); then
      printf '  %-6s running (pid %s)\n' "$name" "$pid"; up=$((up + 1))
    else
      printf '  %-6s not running\n' "$name"; down=$((down + 1))
    fi
  done
  if ! daemon_pid "mon.$mon_id" >/dev/null; then
    say "not running"
    exit 3
  fi
  CEPH_CONNECT_TIMEOUT=10 ceph_admin health detail || { say "monitor not answering"; exit 1; }
  ((down == 0)) || exit 1
}

case "$cmd" in
  start) cmd_start ;;
  stop) [[ -d "$dir" ]] || { say "no cluster in $dir"; exit 0; }; lock_dir; stop_daemons ;;
  status) cmd_status ;;
  env) cmd_env ;;
  purge)
    [[ -d "$dir" ]] || exit 0
    [[ -e "$marker" ]] || die "$dir was not made by $prog; not deleting it"
    lock_dir; stop_daemons quiet; rm -rf "$dir"; say "removed $dir" ;;
  -h|--help|help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' ;;
  *) usage ;;
esac
