//! Mounts: reading /proc/self/mountinfo, and mount/bind/unmount syscalls
//! (through sys-mount; no mount(8) process).

use std::path::{Path, PathBuf};

use sys_mount::{FilesystemType, Mount, MountFlags};

use crate::error::{Error, Result};

/// One line of /proc/self/mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MountEntry {
    pub major: u32,
    pub minor: u32,
    /// Root of the mount within its filesystem ("/" unless a bind of a subdir).
    pub root: String,
    pub mount_point: PathBuf,
    pub options: Vec<String>,
    pub fs_type: String,
    pub source: String,
}

impl MountEntry {
    pub(crate) fn read_only(&self) -> bool {
        self.options.iter().any(|o| o == "ro")
    }
}

/// Undo mountinfo's octal escapes (\040 for space and so on).
fn unescape(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = |b: &u8| (b'0'..=b'7').contains(b);
        if bytes[i] == b'\\' && i + 4 <= bytes.len() && bytes[i + 1..i + 4].iter().all(octal) {
            let v = bytes[i + 1..i + 4]
                .iter()
                .fold(0u32, |acc, b| acc * 8 + (b - b'0') as u32);
            out.push(v as u8);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub(crate) fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<MountEntry> {
    let (left, right) = line.split_once(" - ")?;
    let l: Vec<&str> = left.split(' ').collect();
    let r: Vec<&str> = right.split(' ').collect();
    if l.len() < 6 || r.len() < 2 {
        return None;
    }
    let (major, minor) = l[2].split_once(':')?;
    Some(MountEntry {
        major: major.parse().ok()?,
        minor: minor.parse().ok()?,
        root: unescape(l[3]),
        mount_point: PathBuf::from(unescape(l[4])),
        options: l[5].split(',').map(String::from).collect(),
        fs_type: r[0].to_string(),
        source: unescape(r[1]),
    })
}

pub(crate) fn read_mounts() -> Result<Vec<MountEntry>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| Error::Internal(format!("cannot read /proc/self/mountinfo: {e}")))?;
    Ok(parse_mountinfo(&text))
}

/// The mounts at `path`, bottom first (the last one is what a lookup sees).
pub(crate) fn mounts_at(path: &Path) -> Result<Vec<MountEntry>> {
    Ok(read_mounts()?
        .into_iter()
        .filter(|m| m.mount_point == path)
        .collect())
}

/// The top mount at `path`, if any.
pub(crate) fn mount_at(path: &Path) -> Result<Option<MountEntry>> {
    Ok(mounts_at(path)?.pop())
}

/// major:minor of a block device node.
pub(crate) fn device_numbers(dev: &Path) -> Result<(u32, u32)> {
    let st = nix::sys::stat::stat(dev)
        .map_err(|e| Error::Internal(format!("cannot stat {}: {e}", dev.display())))?;
    Ok((
        nix::sys::stat::major(st.st_rdev) as u32,
        nix::sys::stat::minor(st.st_rdev) as u32,
    ))
}

/// Whether a mount shows `device`: a filesystem on it (by device numbers,
/// or by source path, since btrfs reports an anonymous device number), or a
/// bind of its device node, which mountinfo lists as a file of devtmpfs.
pub(crate) fn shows_device(entry: &MountEntry, device: &Path) -> Result<bool> {
    if device_numbers(device)? == (entry.major, entry.minor) {
        return Ok(true);
    }
    let node = std::fs::canonicalize(device).unwrap_or_else(|_| device.to_path_buf());
    if entry.source.starts_with('/')
        && std::fs::canonicalize(&entry.source).ok().as_deref() == Some(node.as_path())
    {
        return Ok(true);
    }
    let in_devtmpfs = node
        .strip_prefix("/dev")
        .map(|p| Path::new("/").join(p))
        .ok();
    Ok(entry.fs_type == "devtmpfs" && in_devtmpfs.as_deref() == Some(Path::new(&entry.root)))
}

/// Every mount point that shows `device`.
pub(crate) fn mounts_of(device: &Path) -> Result<Vec<PathBuf>> {
    Ok(entries_of(device)?
        .into_iter()
        .map(|m| m.mount_point)
        .collect())
}

/// Every mount that shows `device`.
pub(crate) fn entries_of(device: &Path) -> Result<Vec<MountEntry>> {
    let mut out = Vec::new();
    for m in read_mounts()? {
        if shows_device(&m, device)? {
            out.push(m);
        }
    }
    Ok(out)
}

/// Splits CSI mount flags into kernel flags and filesystem data options.
pub(crate) fn split_flags(flags: &[String]) -> (MountFlags, Vec<String>) {
    let mut kernel = MountFlags::empty();
    let mut data = Vec::new();
    for f in flags.iter().flat_map(|f| f.split(',')) {
        match f {
            "" | "defaults" | "rw" => {}
            "ro" => kernel |= MountFlags::RDONLY,
            "noatime" => kernel |= MountFlags::NOATIME,
            "nodiratime" => kernel |= MountFlags::NODIRATIME,
            "relatime" => kernel |= MountFlags::RELATIME,
            "strictatime" => kernel |= MountFlags::STRICTATIME,
            "nosuid" => kernel |= MountFlags::NOSUID,
            "nodev" => kernel |= MountFlags::NODEV,
            "noexec" => kernel |= MountFlags::NOEXEC,
            "sync" => kernel |= MountFlags::SYNCHRONOUS,
            "dirsync" => kernel |= MountFlags::DIRSYNC,
            other => data.push(other.to_string()),
        }
    }
    (kernel, data)
}

fn mount_error(what: &str, target: &Path, e: std::io::Error) -> Error {
    Error::Internal(format!("{what} at {} failed: {e}", target.display()))
}

/// Refuses `path` when its last component is a symbolic link. A symlink
/// planted at a staging or target path could point at /etc or at another
/// volume's mount: nothing is ever created, mounted or unmounted through one.
///
/// FAILED_PRECONDITION rather than INVALID_ARGUMENT: the request itself is
/// well-formed; what is wrong is the state of the node at that path, which
/// the CO (or an operator) must clear before a retry can succeed.
pub(crate) fn refuse_symlink(path: &Path) -> Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => Err(Error::FailedPrecondition(format!(
            "{} is a symbolic link; Lodestone never mounts, unmounts or creates anything              through one (remove it and retry)",
            path.display()
        ))),
        _ => Ok(()),
    }
}

/// An open handle on a mount target that is not a symlink, so that the mount
/// lands on exactly what was checked even if the path is swapped meanwhile:
/// the mount goes to `/proc/self/fd/N`, which the kernel resolves to the
/// opened inode itself.
struct PinnedTarget {
    fd: std::os::fd::OwnedFd,
}

impl PinnedTarget {
    fn open(target: &Path) -> Result<Self> {
        use nix::fcntl::{open, OFlag};
        use nix::sys::stat::{fstat, Mode, SFlag};
        let fd = open(
            target,
            OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| Error::Internal(format!("cannot open {}: {e}", target.display())))?;
        let st = fstat(&fd)
            .map_err(|e| Error::Internal(format!("cannot stat {}: {e}", target.display())))?;
        if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFLNK {
            return Err(Error::FailedPrecondition(format!(
                "{} is a symbolic link; Lodestone never mounts through one",
                target.display()
            )));
        }
        Ok(PinnedTarget { fd })
    }

    fn path(&self) -> PathBuf {
        use std::os::fd::AsRawFd;
        PathBuf::from(format!("/proc/self/fd/{}", self.fd.as_raw_fd()))
    }
}

/// Mounts a filesystem from a block device (never through a symlink at
/// `target`).
pub(crate) fn mount_device(
    device: &Path,
    target: &Path,
    fs_type: &str,
    flags: &[String],
    extra_data: &[&str],
) -> Result<()> {
    let (kernel, mut data) = split_flags(flags);
    data.extend(extra_data.iter().map(|s| s.to_string()));
    let data = data.join(",");
    let pinned = PinnedTarget::open(target)?;
    let mut builder = Mount::builder()
        .fstype(FilesystemType::Manual(fs_type))
        .flags(kernel);
    if !data.is_empty() {
        builder = builder.data(&data);
    }
    builder
        .mount(device, pinned.path())
        .map(|_| ())
        .map_err(|e| mount_error("mount", target, e))
}

/// Bind-mounts `source` on `target` (never through a symlink at `target`)
/// with read-only and the other per-mount flags. Where the kernel has the
/// mount API of Linux 5.12 (open_tree, mount_setattr, move_mount), the
/// flags are set on a detached copy before it appears at `target`, so no
/// instant exists, not even across a crash, where a read-only publication
/// is writable; elsewhere a plain bind is followed by a remount.
pub(crate) fn bind(source: &Path, target: &Path, read_only: bool, flags: &[String]) -> Result<()> {
    let pinned = PinnedTarget::open(target)?;
    let (mut kernel, _data) = split_flags(flags);
    if read_only {
        kernel |= MountFlags::RDONLY;
    }
    if new_api::bind(source, &pinned, kernel).map_err(|e| mount_error("bind mount", target, e))? {
        return Ok(());
    }
    Mount::builder()
        .fstype(FilesystemType::Manual("none"))
        .flags(MountFlags::BIND)
        .mount(source, pinned.path())
        .map_err(|e| mount_error("bind mount", target, e))?;
    drop(pinned);
    if !kernel.is_empty() {
        // `target` is now a mount point, which cannot be renamed or
        // replaced while mounted.
        let remount = Mount::builder()
            .fstype(FilesystemType::Manual("none"))
            .flags(MountFlags::BIND | MountFlags::REMOUNT | kernel)
            .mount("", target);
        if let Err(e) = remount {
            let _ = unmount(target);
            return Err(mount_error("read-only/flags remount", target, e));
        }
    }
    Ok(())
}

/// The detached-mount API (linux/mount.h), through raw system calls.
mod new_api {
    use std::ffi::CString;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;
    use std::path::Path;

    use nix::libc;
    use sys_mount::MountFlags;

    use super::PinnedTarget;

    const OPEN_TREE_CLONE: libc::c_uint = 1;
    const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;
    const MOVE_MOUNT_T_EMPTY_PATH: libc::c_uint = 0x40;
    const MOUNT_ATTR_RDONLY: u64 = 0x1;
    const MOUNT_ATTR_NOSUID: u64 = 0x2;
    const MOUNT_ATTR_NODEV: u64 = 0x4;
    const MOUNT_ATTR_NOEXEC: u64 = 0x8;
    const MOUNT_ATTR_ATIME: u64 = 0x70;
    const MOUNT_ATTR_NOATIME: u64 = 0x10;
    const MOUNT_ATTR_STRICTATIME: u64 = 0x20;
    const MOUNT_ATTR_NODIRATIME: u64 = 0x80;

    #[repr(C)]
    struct MountAttr {
        attr_set: u64,
        attr_clr: u64,
        propagation: u64,
        userns_fd: u64,
    }

    /// The mount attributes for `flags` (sync and dirsync are filesystem
    /// flags that a bind cannot change, as with a bind remount).
    fn attrs(flags: MountFlags) -> MountAttr {
        let mut a = MountAttr {
            attr_set: 0,
            attr_clr: 0,
            propagation: 0,
            userns_fd: 0,
        };
        for (flag, attr) in [
            (MountFlags::RDONLY, MOUNT_ATTR_RDONLY),
            (MountFlags::NOSUID, MOUNT_ATTR_NOSUID),
            (MountFlags::NODEV, MOUNT_ATTR_NODEV),
            (MountFlags::NOEXEC, MOUNT_ATTR_NOEXEC),
            (MountFlags::NODIRATIME, MOUNT_ATTR_NODIRATIME),
        ] {
            if flags.contains(flag) {
                a.attr_set |= attr;
            }
        }
        for (flag, attr) in [
            (MountFlags::NOATIME, MOUNT_ATTR_NOATIME),
            (MountFlags::STRICTATIME, MOUNT_ATTR_STRICTATIME),
            (MountFlags::RELATIME, 0),
        ] {
            if flags.contains(flag) {
                a.attr_clr |= MOUNT_ATTR_ATIME;
                a.attr_set |= attr;
            }
        }
        a
    }

    fn check(r: libc::c_long) -> std::io::Result<libc::c_long> {
        if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(r)
        }
    }

    /// Ok(false) when the kernel lacks the API; the caller falls back.
    pub(super) fn bind(
        source: &Path,
        target: &PinnedTarget,
        flags: MountFlags,
    ) -> std::io::Result<bool> {
        let src = CString::new(source.as_os_str().as_bytes())
            .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
        let empty = c"";
        // SAFETY: plain system calls on valid NUL-terminated strings, a
        // valid attribute struct of the size passed, and descriptors we own.
        unsafe {
            let fd = match check(libc::syscall(
                libc::SYS_open_tree,
                libc::AT_FDCWD,
                src.as_ptr(),
                OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint,
            )) {
                Ok(fd) => OwnedFd::from_raw_fd(fd as libc::c_int),
                Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => return Ok(false),
                Err(e) => return Err(e),
            };
            let attr = attrs(flags);
            if attr.attr_set != 0 || attr.attr_clr != 0 {
                match check(libc::syscall(
                    libc::SYS_mount_setattr,
                    fd.as_raw_fd(),
                    empty.as_ptr(),
                    libc::AT_EMPTY_PATH,
                    &attr as *const MountAttr,
                    std::mem::size_of::<MountAttr>(),
                )) {
                    Ok(_) => {}
                    // Dropping the detached copy unmounts it.
                    Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => return Ok(false),
                    Err(e) => return Err(e),
                }
            }
            check(libc::syscall(
                libc::SYS_move_mount,
                fd.as_raw_fd(),
                empty.as_ptr(),
                target.fd.as_raw_fd(),
                empty.as_ptr(),
                MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH,
            ))?;
        }
        Ok(true)
    }
}

/// Unmounts `target` without following a symlink there (UMOUNT_NOFOLLOW).
/// EBUSY becomes FAILED_PRECONDITION with a hint.
pub(crate) fn unmount(target: &Path) -> Result<()> {
    use nix::mount::{umount2, MntFlags};
    umount2(target, MntFlags::UMOUNT_NOFOLLOW).map_err(|e| {
        if e == nix::errno::Errno::EBUSY {
            Error::FailedPrecondition(format!(
                "{} is busy (a process still uses it); stop it and retry",
                target.display()
            ))
        } else {
            mount_error("unmount", target, std::io::Error::from(e))
        }
    })
}

/// Unmounts every mount stacked at `target`; true if anything was unmounted.
#[cfg(test)]
fn unmount_all(target: &Path) -> Result<bool> {
    unmount_while(target, |_| true)
}

/// Unmounts the mounts stacked at `target` from the top down for as long as
/// `ours` accepts the top one; true if anything was unmounted. A mount
/// `ours` refuses is left in place (with what is below it).
pub(crate) fn unmount_while(target: &Path, ours: impl Fn(&MountEntry) -> bool) -> Result<bool> {
    refuse_symlink(target)?;
    let mut any = false;
    while let Some(top) = mount_at(target)? {
        if !ours(&top) {
            tracing::warn!(
                path = %target.display(),
                source = %top.source,
                "leaving a mount of another device in place"
            );
            break;
        }
        unmount(target)?;
        any = true;
    }
    Ok(any)
}

/// Whether a mount's device has gone away under it: a bind of a device node
/// whose node no longer exists, or a filesystem whose source device no longer
/// exists or is now another device (an LV removed or renamed, an RBD image
/// unmapped by force, while mounted).
pub(crate) fn source_vanished(entry: &MountEntry) -> bool {
    if entry.fs_type == "devtmpfs" && entry.root != "/" {
        let node = Path::new("/dev").join(entry.root.trim_start_matches('/'));
        return !node.exists();
    }
    if !entry.source.starts_with("/dev/") {
        return false;
    }
    match device_numbers(Path::new(&entry.source)) {
        Err(_) => true,
        // btrfs shows an anonymous device number: only a missing source counts.
        Ok(numbers) => entry.major != 0 && numbers != (entry.major, entry.minor),
    }
}

/// Whether the mount is a bind of a device node (a staged or published raw
/// block volume) rather than a filesystem.
pub(crate) fn is_device_bind(entry: &MountEntry) -> bool {
    entry.fs_type == "devtmpfs" && entry.root != "/"
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
98 22 253:3 / /var/lib/kubelet/staging\\040dir rw,noatime shared:40 - xfs /dev/mapper/vg-lv rw,attr2
99 22 253:3 / /var/lib/kubelet/pods/x/mount ro,relatime shared:40 - xfs /dev/mapper/vg-lv rw
100 22 0:5 /dm-3 /var/lib/kubelet/pods/x/dev/block rw,nosuid master:2 - devtmpfs udev rw";

    #[test]
    fn parses_mountinfo() {
        let m = parse_mountinfo(SAMPLE);
        assert_eq!(m.len(), 4);
        assert_eq!(
            m[1].mount_point,
            PathBuf::from("/var/lib/kubelet/staging dir")
        );
        assert_eq!((m[1].major, m[1].minor), (253, 3));
        assert_eq!(m[1].fs_type, "xfs");
        assert!(m[2].read_only());
        assert_eq!(m[3].root, "/dm-3");
        assert_eq!(m[3].source, "udev");
    }

    #[test]
    fn splits_flags() {
        let (k, d) = split_flags(&["ro".into(), "noatime,discard".into(), "data=ordered".into()]);
        assert!(k.contains(MountFlags::RDONLY | MountFlags::NOATIME));
        assert_eq!(d, vec!["discard", "data=ordered"]);
    }

    #[test]
    fn vanished_sources() {
        let entry = |fs_type: &str, root: &str, source: &str| MountEntry {
            major: 253,
            minor: 99,
            root: root.into(),
            mount_point: PathBuf::from("/x"),
            options: vec!["rw".into()],
            fs_type: fs_type.into(),
            source: source.into(),
        };
        assert!(source_vanished(&entry(
            "ext4",
            "/",
            "/dev/lodestone-no-such-lv"
        )));
        assert!(!source_vanished(&entry("proc", "/", "proc")));
        assert!(!source_vanished(&entry("tmpfs", "/", "none")));
        // /dev/null exists but is not device 253:99.
        assert!(source_vanished(&entry("ext4", "/", "/dev/null")));
        let bind = entry("devtmpfs", "/lodestone-no-such-node", "udev");
        assert!(is_device_bind(&bind) && source_vanished(&bind));
        let bind = entry("devtmpfs", "/null", "udev");
        assert!(is_device_bind(&bind) && !source_vanished(&bind));
        assert!(!is_device_bind(&entry("devtmpfs", "/", "udev")));
    }

    #[test]
    fn symlinks_are_refused_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        std::fs::create_dir(&real).unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        assert!(refuse_symlink(&real).is_ok());
        assert!(refuse_symlink(&dir.path().join("absent")).is_ok());
        assert!(matches!(
            refuse_symlink(&link),
            Err(Error::FailedPrecondition(_))
        ));
        // Refused before any mount is tried, so this needs no privilege.
        assert!(matches!(
            bind(&real, &link, false, &[]),
            Err(Error::FailedPrecondition(_))
        ));
        assert!(matches!(
            mount_device(Path::new("/dev/null"), &link, "ext4", &[], &[]),
            Err(Error::FailedPrecondition(_))
        ));
        assert!(matches!(
            unmount_all(&link),
            Err(Error::FailedPrecondition(_))
        ));
        assert!(std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
    }

    /// A read-only bind is read-only from the moment it appears (needs
    /// CAP_SYS_ADMIN; skipped where mounting is not allowed).
    #[test]
    fn read_only_bind() {
        let dir = tempfile::tempdir().unwrap();
        let (src, dst) = (dir.path().join("src"), dir.path().join("dst"));
        std::fs::create_dir(&src).unwrap();
        std::fs::create_dir(&dst).unwrap();
        let tmpfs = Mount::builder()
            .fstype(FilesystemType::Manual("tmpfs"))
            .data("size=1m")
            .mount("lodestone-test", &src);
        if let Err(e) = tmpfs {
            eprintln!("skipped: cannot mount here ({e})");
            return;
        }
        std::fs::write(src.join("f"), b"x").unwrap();
        let flags = ["noexec".to_string(), "nosuid".to_string()];
        let result = bind(&src, &dst, true, &flags);
        let entry = mount_at(&dst).unwrap();
        let write = std::fs::write(dst.join("g"), b"y");
        let _ = unmount_all(&dst);
        let _ = unmount_all(&src);
        result.unwrap();
        let entry = entry.expect("bind mounted");
        assert!(entry.read_only(), "{entry:?}");
        assert!(
            entry.options.iter().any(|o| o == "noexec")
                && entry.options.iter().any(|o| o == "nosuid"),
            "{entry:?}"
        );
        assert_eq!(write.unwrap_err().raw_os_error(), Some(nix::libc::EROFS));
    }

    #[test]
    fn unescapes() {
        assert_eq!(unescape("a\\040b\\134c"), "a b\\c");
        assert_eq!(unescape("plain\\"), "plain\\");
    }
}
