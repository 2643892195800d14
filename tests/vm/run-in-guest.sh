#!/usr/bin/env bash
# Run one command inside a throw-away QEMU (TCG) guest that boots Debian's
# kernel, so tests get device-mapper / dm-thin / loop / rbd / nbd even when
# the host kernel has none of them.
#
# Usage: tests/vm/run-in-guest.sh <command> [args...]
#
# The guest sees the host root read-only (virtio-9p) under a tmpfs overlay,
# so host-built binaries run unchanged; writes in the guest are discarded.
# The command runs as root with the caller's working directory and stdin
# /dev/null; its stdout and stderr stream to this script's stdout and stderr.
#
# Exit status: the command's own exit status, or
#   124  the guest ran longer than LODESTONE_VM_TIMEOUT (qemu was killed)
#   125  harness failure: qemu or the guest crashed before reporting a status
#   126/127  the command could not be executed / was not found
#
# Environment forwarded into the guest: PATH, HOME, TERM, RUST_LOG,
# RUST_BACKTRACE, every LODESTONE_* variable, and the names listed
# (space separated) in LODESTONE_VM_ENV.  Nothing else.
# The guest additionally gets LODESTONE_VM_GUEST=1,
# LODESTONE_VM_SHARE (a writable dir that survives in the host's run dir when
# it is kept) and LODESTONE_VM_HOSTROOT (read-only view of the host root).
#
# Knobs (all optional):
#   LODESTONE_VM_MEM      guest memory, qemu -m syntax      (default 3072M)
#   LODESTONE_VM_SMP      guest CPUs                          (default 2)
#   LODESTONE_VM_CPU      qemu -cpu model                     (default max)
#   LODESTONE_VM_TIMEOUT  seconds before qemu is killed       (default 1800)
#   LODESTONE_VM_KERNEL   kernel image       (default newest /boot/vmlinuz-*)
#   LODESTONE_VM_DIR      cache + run dirs           (default <repo>/target/vm)
#   LODESTONE_VM_DEBUG=1  stream the guest console live, verbose kernel,
#                         trace the guest init, keep the run dir
#   LODESTONE_VM_KEEP=1   keep the run dir (it is always kept on failure)
#   LODESTONE_VM_TIMING=1 print boot/command timing and qemu peak RSS
#   LODESTONE_VM_MODULES  optional modules loaded before the command
#                         (default: dm_crypt nbd rbd virtio_blk ext4 xfs btrfs)
#   LODESTONE_VM_APPEND   extra guest kernel command line
#   LODESTONE_VM_PVH=0    boot the bzImage via SeaBIOS instead of PVH vmlinux
#   LODESTONE_VM_OUT=DIR  copy what the command wrote to $LODESTONE_VM_SHARE
#                         into host directory DIR after the run
set -euo pipefail

prog=run-in-guest
t_script=$(date +%s%N)
die() { echo "$prog: $*" >&2; exit 125; }

(($# >= 1)) || { sed -n '6,7p' "$0" >&2; exit 2; }

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
repo_root=$(cd "$script_dir/../.." && pwd -P)
vm_dir=${LODESTONE_VM_DIR:-$repo_root/target/vm}
mem=${LODESTONE_VM_MEM:-3072M}
smp=${LODESTONE_VM_SMP:-2}
timeout_s=${LODESTONE_VM_TIMEOUT:-1800}
debug=${LODESTONE_VM_DEBUG:-0}
keep=${LODESTONE_VM_KEEP:-0}
timing=${LODESTONE_VM_TIMING:-0}
optional_modules=${LODESTONE_VM_MODULES-dm_crypt nbd rbd virtio_blk ext4 xfs btrfs}
[[ "$timeout_s" =~ ^[0-9]+$ ]] || die "LODESTONE_VM_TIMEOUT must be whole seconds"

qemu=$(command -v qemu-system-x86_64 || true)
[[ -n "$qemu" ]] || die "qemu-system-x86_64 not found; run tests/vm/host-packages.sh"
busybox=$(command -v busybox || true)
[[ -x /bin/busybox ]] && busybox=/bin/busybox
[[ -n "$busybox" ]] || die "busybox not found; run tests/vm/host-packages.sh"
for tool in modprobe cpio gzip; do
  command -v "$tool" >/dev/null || die "$tool not found; run tests/vm/host-packages.sh"
done

# ---- the command: resolve on the host (the guest sees the same files) ----
cwd=$(pwd -P)
cmd=$1
if [[ "$cmd" != */* ]]; then
  if ! type -P -- "$cmd" >/dev/null; then
    echo "$prog: $cmd: command not found" >&2
    exit 127
  fi
elif [[ ! -e "$cmd" ]]; then
  echo "$prog: $cmd: no such file" >&2
  exit 127
fi

# ---- kernel ----
if [[ -n "${LODESTONE_VM_KERNEL:-}" ]]; then
  kernel=$LODESTONE_VM_KERNEL
else
  kernel=$(ls -1 /boot/vmlinuz-* 2>/dev/null | sort -V | tail -n 1 || true)
fi
[[ -n "$kernel" && -r "$kernel" ]] || die "no readable kernel (/boot/vmlinuz-*); run tests/vm/host-packages.sh"
kver=${LODESTONE_VM_KVER:-${kernel##*/vmlinuz-}}
[[ -d /lib/modules/$kver ]] || die "/lib/modules/$kver missing for $kernel"

mkdir -p "$vm_dir"

# ---- PVH: boot the uncompressed vmlinux directly ----
# SeaBIOS + real-mode setup + xz decompression of the bzImage cost ~5 s under
# TCG.  Debian kernels have CONFIG_PVH, so qemu can jump straight into an
# uncompressed ELF vmlinux; extract it once and cache it.
boot_kernel=$kernel
pvh_note='\x04\x00\x00\x00[\x04\x08]\x00\x00\x00\x12\x00\x00\x00Xen\x00'
extract_vmlinux() { # extract_vmlinux BZIMAGE OUT -> 0 if OUT is a PVH-capable ELF
  local in=$1 out=$2 magic tool off
  for spec in $'\xfd7zXZ:xz -dc' $'\x28\xb5\x2f\xfd:zstd -qdc' $'\x1f\x8b\x08:gzip -dc'; do
    magic=${spec%%:*} tool=${spec#*:}
    command -v "${tool%% *}" >/dev/null || continue
    for off in $(LC_ALL=C grep -aboF -- "$magic" "$in" 2>/dev/null | head -n 3 | cut -d: -f1); do
      tail -c +$((off + 1)) "$in" | $tool >"$out" 2>/dev/null
      if [[ "$(head -c 4 "$out" 2>/dev/null | tr -d '\0')" == $'\x7fELF' ]] \
         && LC_ALL=C grep -qaP "$pvh_note" "$out"; then
        return 0
      fi
    done
  done
  rm -f "$out"
  return 1
}
if [[ "${LODESTONE_VM_PVH:-1}" == 1 && "$(head -c 4 "$kernel" | tr -d '\0')" != $'\x7fELF' ]]; then
  kkey=$(stat -Lc '%s-%Y' "$kernel")
  vmlinux=$vm_dir/vmlinux-$kver-$kkey
  if [[ ! -s "$vmlinux" && ! -e "$vmlinux.no-pvh" ]]; then
    exec 9>"$vm_dir/.vmlinux.lock"
    flock 9
    if [[ ! -s "$vmlinux" && ! -e "$vmlinux.no-pvh" ]]; then
      find "$vm_dir" -maxdepth 1 -name 'vmlinux-*' -mmin +60 -delete 2>/dev/null || true
      if extract_vmlinux "$kernel" "$vmlinux.tmp"; then
        mv -f "$vmlinux.tmp" "$vmlinux"
      else
        echo "$prog: note: cannot extract a PVH vmlinux from $kernel; booting it via BIOS (slower)" >&2
        : >"$vmlinux.no-pvh"
      fi
    fi
    exec 9>&-
  fi
  [[ -s "$vmlinux" ]] && boot_kernel=$vmlinux
fi

# ---- stage 1: the initramfs /init (busybox sh) ----
# Loads the virtio/9p/overlay modules, mounts the host root read-only, puts a
# tmpfs-backed overlay on top, mounts the per-run share and hands over to the
# per-run stage-2 script found in the share.
read -r -d '' init_script <<'INIT' || true
#!/bin/busybox sh
/bin/busybox mkdir -p /bin /proc /sys /dev /host /rw /newroot
/bin/busybox --install -s /bin
export PATH=/bin
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
echo 1 >/proc/sys/kernel/sysrq
fail() {
  echo "lodestone-vm: stage1: $*"
  echo "lodestone-vm: stage1 failed, shutting down"
  echo b >/proc/sysrq-trigger
  sleep 30
}
while read -r m; do
  insmod "/modules/$m" || fail "insmod $m"
done </modules/order
o9p=trans=virtio,version=9p2000.L,msize=512000
mount -t 9p -o "$o9p,ro,cache=loose" hostroot /host || fail "mount hostroot"
mount -t tmpfs -o mode=0755 tmpfs /rw || fail "mount tmpfs"
mkdir -p /rw/upper /rw/work
mount -t overlay -o lowerdir=/host,upperdir=/rw/upper,workdir=/rw/work overlay /newroot \
  || fail "mount overlay"
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /newroot/run || fail "mount /run"
mkdir -p /newroot/run/lodestone-vm/share /newroot/run/lodestone-vm/host
mount -t 9p -o "$o9p,cache=none" lodestone /newroot/run/lodestone-vm/share || fail "mount share"
mount --move /host /newroot/run/lodestone-vm/host || fail "move hostroot"
for d in dev proc sys; do mount --move /$d /newroot/$d || fail "move /$d"; done
exec switch_root /newroot /bin/bash /run/lodestone-vm/share/stage2.sh
fail "switch_root"
INIT

# ---- initramfs: built once per kernel + init + module set, cached ----
mods=()
for m in virtio_pci 9pnet_virtio 9p overlay; do
  while read -r verb path _; do
    [[ "$verb" == insmod ]] || continue
    [[ " ${mods[*]-} " == *" $path "* ]] || mods+=("$path")
  done < <(modprobe -S "$kver" --show-depends "$m" 2>/dev/null || true)
done
((${#mods[@]} > 0)) || echo "$prog: note: no modules needed for 9p/overlay on $kver (built in?)" >&2
key=$( { echo "$kver"; printf '%s\n' "${mods[@]-}"; echo "$init_script"; \
         stat -Lc '%s %Y' "$busybox"; } | sha256sum | cut -c1-16)
initrd=$vm_dir/initramfs-$kver-$key.cpio.gz
if [[ ! -s "$initrd" ]]; then
  exec 9>"$vm_dir/.initramfs.lock"
  flock 9
  if [[ ! -s "$initrd" ]]; then
    stage=$(mktemp -d "$vm_dir/initramfs-build.XXXXXX")
    mkdir -p "$stage/bin" "$stage/modules"
    cp "$busybox" "$stage/bin/busybox"
    printf '%s\n' "$init_script" >"$stage/init"
    chmod 755 "$stage/init"
    : >"$stage/modules/order"
    for path in "${mods[@]-}"; do
      [[ -n "$path" ]] || continue
      base=${path##*/}
      case "$base" in
        *.ko) cp "$path" "$stage/modules/$base" ;;
        *.ko.xz) xz -dc "$path" >"$stage/modules/${base%.xz}"; base=${base%.xz} ;;
        *.ko.zst) zstd -qdc "$path" >"$stage/modules/${base%.zst}"; base=${base%.zst} ;;
        *.ko.gz) gzip -dc "$path" >"$stage/modules/${base%.gz}"; base=${base%.gz} ;;
        *) die "unexpected module file $path" ;;
      esac
      echo "$base" >>"$stage/modules/order"
    done
    (cd "$stage" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0) \
      | gzip -6 >"$initrd.tmp"
    mv -f "$initrd.tmp" "$initrd"
    rm -rf "$stage"
    # drop images for other kernels / init versions (not ones a concurrent
    # run of another script version may be booting right now)
    find "$vm_dir" -maxdepth 1 -name 'initramfs-*.cpio.gz' ! -path "$initrd" -mmin +60 \
      -delete 2>/dev/null || true
  fi
  exec 9>&-
fi

# ---- per-run share dir: stage2, argv, env in; status, logs out ----
# (run dirs kept after failures are pruned after two days)
find "$vm_dir" -maxdepth 1 -name 'run.*' -type d -mtime +2 -exec rm -rf {} + 2>/dev/null || true
run_dir=$(mktemp -d "$vm_dir/run.XXXXXX")
mkdir -p "$run_dir/share/out"

# argv and environment as NUL-separated lists: no quoting issues at all.
printf '%s\0' "$@" >"$run_dir/share/argv"
{
  extra=()
  read -r -a extra <<<"${LODESTONE_VM_ENV:-}" || true
  while IFS= read -r -d '' kv; do
    name=${kv%%=*}
    case "$name" in
      LODESTONE_*|RUST_LOG|RUST_BACKTRACE|PATH|HOME|TERM) printf '%s\0' "$kv" ;;
      *) for e in "${extra[@]-}"; do
           [[ -n "$e" && "$name" == "$e" ]] && { printf '%s\0' "$kv"; break; }
         done ;;
    esac
  done < <(env -0)
} >"$run_dir/share/env"
printf '%s' "$cwd" >"$run_dir/share/cwd"
out_tty=0 err_tty=0
[[ -t 1 ]] && out_tty=1
[[ -t 2 ]] && err_tty=1
{
  echo "stdout_tty=$out_tty"
  echo "stderr_tty=$err_tty"
  echo "debug=$debug"
  printf 'bb=%q\n' "$busybox"
  printf 'optional_modules=%q\n' "$optional_modules"
} >"$run_dir/share/flags"

# ---- stage 2: runs as PID 1 in the switched root (host's bash) ----
cat >"$run_dir/share/stage2.sh" <<'STAGE2'
#!/bin/bash
# lodestone-vm stage 2: set up a usable system, run the command, power off.
# Every process costs ~20 ms (static busybox) to ~120 ms (dynamic) under TCG,
# so this uses bash builtins and busybox applets where it can.
set -u
V=/run/lodestone-vm
S=$V/share
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
. "$S/flags"
if [[ "$debug" == 1 ]]; then PS4='+ ${EPOCHREALTIME} '; set -x; fi
log() { echo "lodestone-vm: $*"; }
finish() {
  local rc=$1
  $bb dmesg >"$S/dmesg.log" 2>/dev/null
  ((rc == 0)) || dmesg --level=emerg,alert,crit,err,warn >"$S/dmesg-warn.log" 2>/dev/null
  echo "$rc" >"$S/exit-status.tmp" && $bb mv -f "$S/exit-status.tmp" "$S/exit-status"
  $bb sync
  $bb umount "$S" 2>/dev/null
  echo b >/proc/sysrq-trigger
  $bb sleep 30
}
up_ms() { local u; read -r u _ </proc/uptime; echo "${u/./}0"; }
echo "boot_done_ms=$(up_ms)" >"$S/timing"

# Kernel modules: the host's /lib/modules is visible, so modprobe just works.
# Two parallel modprobe runs (2 vCPUs), overlapped with the rest of setup.
$bb mkdir -p /etc/modprobe.d
printf 'options loop max_loop=16\noptions nbd nbds_max=16\n' >/etc/modprobe.d/lodestone-vm.conf
modprobe -a loop dm_mod dm_bufio dm_persistent_data dm_bio_prison dm_thin_pool \
  dm_snapshot >"$S/modprobe-required.log" 2>&1 &
mod_req=$!
mod_opt=
if [[ -n "$optional_modules" ]]; then
  # shellcheck disable=SC2086
  modprobe -a -q $optional_modules >"$S/modprobe-optional.log" 2>&1 &
  mod_opt=$!
fi

declare -A mounted=()
while read -r _ mp _; do mounted[$mp]=1; done </proc/self/mounts
mnt() { # mnt TYPE DIR OPTS
  [[ -n "${mounted[$2]-}" ]] && return 0
  [[ -d "$2" ]] || $bb mkdir -p "$2"
  $bb mount -t "$1" -o "$3" "$1" "$2" || log "mount $1 on $2 failed"
  mounted[$2]=1
}
mnt proc /proc nosuid,nodev,noexec
mnt sysfs /sys nosuid,nodev,noexec
mnt devtmpfs /dev mode=0755,nosuid
mnt devpts /dev/pts mode=0620,gid=5,ptmxmode=0666,nosuid,noexec
mnt tmpfs /dev/shm mode=1777,nosuid,nodev
mnt tmpfs /run mode=0755,nosuid,nodev
mnt tmpfs /run/lock mode=1777,nosuid,nodev,noexec,size=5m
# The LVM fixture's sparse VG files live in /tmp: a tmpfs's default cap
# (half the memory) fails their writes (loop write errors) long before the
# guest runs out of memory, e.g. once thick deletes have zeroed most extents.
mnt tmpfs /tmp mode=1777,nosuid,nodev,size=85%
mnt cgroup2 /sys/fs/cgroup nosuid,nodev,noexec
[[ -e /dev/ptmx ]] || $bb ln -s pts/ptmx /dev/ptmx
$bb ln -sfn /proc/self/fd /dev/fd
$bb ln -sfn /proc/self/fd/0 /dev/stdin
$bb ln -sfn /proc/self/fd/1 /dev/stdout
$bb ln -sfn /proc/self/fd/2 /dev/stderr
[[ "$(readlink /etc/mtab 2>/dev/null)" == *self/mounts ]] || $bb ln -sfn /proc/self/mounts /etc/mtab
$bb mkdir -p /run/lvm /run/lock/lvm /var/tmp /etc/lvm/backup /etc/lvm/archive

echo lodestone-guest >/proc/sys/kernel/hostname
echo lodestone-guest >/etc/hostname
printf '127.0.0.1\tlocalhost\n127.0.1.1\tlodestone-guest\n::1\tlocalhost ip6-localhost ip6-loopback\n' >/etc/hosts
$bb ip link set lo up || log "lo up failed"

# LVM without udev: LVM creates /dev nodes itself; no dmeventd (monitoring),
# no lvmpolld, no devices file.  Only the guest overlay's lvm.conf changes.
cat >/etc/lvm/lvm.conf <<'LVMCONF'
# written by lodestone tests/vm/run-in-guest.sh (guest overlay only)
devices {
	obtain_device_list_from_udev = 0
	external_device_info_source = "none"
	use_devicesfile = 0
}
activation {
	udev_sync = 0
	udev_rules = 0
	verify_udev_operations = 0
	monitoring = 0
}
global {
	use_lvmpolld = 0
}
LVMCONF
$bb rm -f /etc/lvm/lvmlocal.conf

# ---- the command ----
mapfile -d '' -t argv <"$S/argv"
mapfile -d '' -t envs <"$S/env"
envs+=(LODESTONE_VM_GUEST=1 "LODESTONE_VM_SHARE=$S/out" "LODESTONE_VM_HOSTROOT=$V/host")
cwd=$(<"$S/cwd")

# The caller's cwd / command may live under a host dir that the guest
# shadows with a fresh tmpfs (/tmp, /run, /dev/shm): make it visible again
# through a writable overlay on the read-only host view.
expose() {
  local p=$1 top
  case "$p" in
    /dev/shm/*) top=${p#/dev/shm/}; top=/dev/shm/${top%%/*} ;;
    /tmp/*|/run/*) top=${p#/*/}; top=${p%%/"$top"}/${top%%/*} ;;
    *) return 0 ;;
  esac
  [[ -n "${mounted[$top]-}" ]] && return 0
  if [[ -d "$V/host$top" ]]; then
    local n=$V/ov$RANDOM
    $bb mkdir -p "$n/u" "$n/w" "$top"
    $bb mount -t overlay -o "lowerdir=$V/host$top,upperdir=$n/u,workdir=$n/w" overlay "$top" \
      && mounted[$top]=1 || log "could not expose host $top"
  elif [[ -f "$V/host$top" ]]; then
    : >>"$top"
    $bb mount --bind "$V/host$top" "$top" && mounted[$top]=1 || log "could not expose host $top"
  fi
}
expose "$cwd"
[[ "${argv[0]}" == /* ]] && expose "${argv[0]}"

wait $mod_req || { log "modprobe of required modules failed:"; $bb cat "$S/modprobe-required.log"; }
[[ -n "$mod_opt" ]] && { wait $mod_opt || true; }

exec 3>/dev/ttyS1 4>/dev/ttyS2
$bb stty -F /dev/ttyS1 raw -echo
$bb stty -F /dev/ttyS2 raw -echo

echo "cmd_start_ms=$(up_ms)" >>"$S/timing"
if ! cd "$cwd"; then
  log "cannot cd to $cwd" >&4
  finish 125
fi
run() { env -i "${envs[@]}" "${argv[@]}" </dev/null 3>&- 4>&-; }
if [[ "$stdout_tty" == 1 && "$stderr_tty" == 1 ]]; then
  run >&3 2>&4
  rc=$?
else
  # give the command pipes (not ttys) where the caller had no tty
  $bb mkfifo $V/o $V/e $V/z
  po='' pe=''
  if [[ "$stdout_tty" == 1 ]]; then exec 5>&3; else $bb cat $V/o >&3 & po=$!; exec 5>$V/o; fi
  if [[ "$stderr_tty" == 1 ]]; then exec 6>&4; else $bb cat $V/e >&4 & pe=$!; exec 6>$V/e; fi
  run >&5 2>&6 5>&- 6>&-
  rc=$?
  exec 5>&- 6>&-
  # background processes may still hold the pipes: bounded wait
  for _ in {1..50}; do
    alive=0
    for p in $po $pe; do kill -0 "$p" 2>/dev/null && alive=1; done
    ((alive)) || break
    read -r -t 0.1 <>"$V/z" || true  # sleep without a process
  done
  for p in $po $pe; do kill "$p" 2>/dev/null; done
fi
echo "cmd_end_ms=$(up_ms)" >>"$S/timing"
# stty uses TCSADRAIN: returns once the serial ports have sent everything
$bb stty -F /dev/ttyS1 raw -echo
$bb stty -F /dev/ttyS2 raw -echo
finish "$rc"
STAGE2

# ---- host side streams: fifo -> cat -> our stdout/stderr ----
mkfifo "$run_dir/out.fifo" "$run_dir/err.fifo"
cat "$run_dir/out.fifo" &
cat_out=$!
cat "$run_dir/err.fifo" >&2 &
cat_err=$!
if [[ "$debug" == 1 ]]; then
  mkfifo "$run_dir/console.fifo"
  tee "$run_dir/console.log" <"$run_dir/console.fifo" >&2 &
  cat_con=$!
  console_path=$run_dir/console.fifo
  kparams="loglevel=7"
else
  cat_con=
  console_path=$run_dir/console.log
  kparams="quiet loglevel=3"
fi

# no_timer_check: under emulation on a loaded host the kernel's check of
# the IO-APIC timer can miss its ticks and panic at boot ("IO-APIC + timer
# doesn't work"); the emulated timer is fine, so the check is skipped.
# shellcheck disable=SC2054  # commas are qemu option syntax
qemu_args=(
  -nodefaults -no-user-config -no-reboot
  -machine pc -accel tcg,tb-size=256 -cpu "${LODESTONE_VM_CPU:-max}" -smp "$smp" -m "$mem"
  -kernel "$boot_kernel" -initrd "$initrd"
  -append "console=ttyS0 $kparams panic=-1 rdinit=/init no_timer_check mitigations=off i8042.noaux i8042.nokbd ${LODESTONE_VM_APPEND:-}"
  -chardev "file,id=out,path=$run_dir/out.fifo"
  -chardev "file,id=err,path=$run_dir/err.fifo"
  -chardev "file,id=con,path=$console_path"
  -serial chardev:con -serial chardev:out -serial chardev:err
  -display none -monitor none -nic none
  -device virtio-rng-pci
  -virtfs "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap"
  -virtfs "local,path=$run_dir/share,mount_tag=lodestone,security_model=none"
)

qemu_pid=
rss_pid=
cleanup() {
  local p
  for p in "$qemu_pid" "$rss_pid"; do
    [[ -n "$p" ]] && kill "$p" 2>/dev/null
  done
  # unblock cats whose fifo was never opened by qemu
  for f in out.fifo err.fifo console.fifo; do
    [[ -p "$run_dir/$f" ]] && { exec 8<>"$run_dir/$f"; exec 8>&-; }
  done
  return 0
}
on_signal() {
  trap - INT TERM HUP
  cleanup
  wait 2>/dev/null
  echo "$prog: interrupted; run dir kept: $run_dir" >&2
  exit 130
}
trap on_signal INT TERM HUP

start_ns=$(date +%s%N)
# timeout(1) kills qemu after LODESTONE_VM_TIMEOUT (exit 124, or 137 if it
# needed SIGKILL); --foreground keeps qemu in our process group so a
# terminal's Ctrl-C reaches it too.
timeout --foreground -k 10 "$timeout_s" "$qemu" "${qemu_args[@]}" </dev/null >"$run_dir/qemu.log" 2>&1 &
qemu_pid=$!
if [[ "$timing" == 1 ]]; then
  ( while kill -0 "$qemu_pid" 2>/dev/null; do
      q=$(pgrep -P "$qemu_pid" -n 2>/dev/null || true)
      v=$(awk '/^VmHWM:/ {print $2}' "/proc/${q:-0}/status" 2>/dev/null || true)
      [[ -n "$v" ]] && echo "$v" >"$run_dir/qemu-hwm-kb"
      sleep 0.5
    done ) </dev/null >/dev/null 2>&1 &
  rss_pid=$!
fi

qemu_rc=0
wait "$qemu_pid" || qemu_rc=$?
qemu_pid=
end_ns=$(date +%s%N)
cleanup
wait "$cat_out" "$cat_err" ${cat_con:+"$cat_con"} 2>/dev/null || true
[[ -n "$rss_pid" ]] && { wait "$rss_pid" 2>/dev/null || true; rss_pid=; }
trap - INT TERM HUP
if [[ "$qemu_rc" == 124 || "$qemu_rc" == 137 ]] \
   && (((end_ns - start_ns) / 1000000000 >= timeout_s)); then
  : >"$run_dir/timed-out"
fi

status_file=$run_dir/share/exit-status
if [[ -n "${LODESTONE_VM_OUT:-}" ]]; then
  mkdir -p "$LODESTONE_VM_OUT"
  cp -a "$run_dir/share/out/." "$LODESTONE_VM_OUT/" 2>/dev/null || true
fi
if [[ -e "$run_dir/timed-out" ]]; then
  rc=124
  echo "$prog: timed out after ${timeout_s}s (LODESTONE_VM_TIMEOUT); qemu killed" >&2
elif [[ -s "$status_file" ]]; then
  rc=$(<"$status_file")
  [[ "$rc" =~ ^[0-9]+$ ]] || rc=125
else
  rc=125
  echo "$prog: guest did not report an exit status (qemu exit $qemu_rc)" >&2
fi

if [[ "$timing" == 1 ]]; then
  total_ms=$(((end_ns - start_ns) / 1000000))
  boot="?" cmd="?"
  if [[ -s "$run_dir/share/timing" ]]; then
    # shellcheck disable=SC1091
    . "$run_dir/share/timing"
    [[ -n "${cmd_start_ms:-}" ]] && boot=$((cmd_start_ms))ms
    [[ -n "${cmd_end_ms:-}" && -n "${cmd_start_ms:-}" ]] && cmd=$((cmd_end_ms - cmd_start_ms))ms
  fi
  hwm=$(cat "$run_dir/qemu-hwm-kb" 2>/dev/null || echo 0)
  prep_ms=$(((start_ns - t_script) / 1000000))
  echo "$prog: timing: host-prep=${prep_ms}ms boot-to-command=$boot (guest uptime) command=$cmd qemu-wall=${total_ms}ms qemu-peak-rss=$((hwm / 1024))MiB" >&2
fi

if [[ "$rc" == 124 || "$rc" == 125 ]] && [[ ! -s "$status_file" ]]; then
  {
    echo "----- qemu output -----"; tail -n 20 "$run_dir/qemu.log" 2>/dev/null
    echo "----- guest console (last 60 lines) -----"; tail -n 60 "$run_dir/console.log" 2>/dev/null
    echo "-----"
  } >&2
fi
if [[ "$rc" != 0 ]]; then
  if [[ -s "$run_dir/share/dmesg-warn.log" && "$debug" != 1 ]]; then
    # known noise: loop on tmpfs has no WRITE_ZEROES (LVM falls back), ACPI/PCI
    # quirks of the emulated machine, TSC calibration under TCG
    warn=$(grep -vE 'op 0x9:\(WRITE_ZEROES\)|blk_print_req_error: [0-9]+ callbacks suppressed|MMCONFIG|host bridge windows|AMD-Vi|IMA_DISABLE|calibrat|TSC|tsc:' \
             "$run_dir/share/dmesg-warn.log" | tail -n 25 || true)
    [[ -n "$warn" ]] && printf '%s\n%s\n' "$prog: guest kernel warnings/errors:" "$warn" >&2
  fi
  echo "$prog: exit status $rc; logs kept in $run_dir (console.log, share/dmesg.log, share/out/)" >&2
elif [[ "$keep" == 1 || "$debug" == 1 ]]; then
  echo "$prog: run dir kept: $run_dir" >&2
else
  rm -rf "$run_dir"
fi
exit "$rc"
