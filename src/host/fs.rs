//! Filesystems on block devices: detect (blkid), format (mkfs, only when the
//! device is blank), grow, and usage statistics (statvfs, no process).

use std::path::Path;

use crate::core::request::FsType;
use crate::error::{Error, Result};
use crate::runner::{Cmd, Runner};

/// What a low-level probe found on a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Content {
    Blank,
    Filesystem(String),
    /// A partition table or other signature that is not a filesystem.
    Other(String),
}

/// Parses `blkid -p -o export` output.
pub(crate) fn parse_blkid(stdout: &str) -> Content {
    let mut fs = None;
    let mut other = None;
    for line in stdout.lines() {
        if let Some(v) = line.strip_prefix("TYPE=") {
            fs = Some(v.to_string());
        } else if let Some(v) = line.strip_prefix("PTTYPE=") {
            other = Some(format!("partition table {v}"));
        }
    }
    match (fs, other) {
        (Some(t), _) => Content::Filesystem(t),
        (None, Some(o)) => Content::Other(o),
        (None, None) => Content::Blank,
    }
}

/// Probes the device directly (no blkid cache). Exit code 2 means blank.
pub(crate) async fn probe(runner: &Runner, device: &Path) -> Result<Content> {
    let cmd = Cmd::new("blkid").args(["-p", "-o", "export"]).arg(device);
    let out = runner.run_unchecked(&cmd).await?;
    match out.code {
        0 => Ok(parse_blkid(&out.stdout)),
        2 => Ok(Content::Blank),
        code => Err(Error::Internal(format!(
            "blkid on {} failed ({code}): {}",
            device.display(),
            out.stderr.trim()
        ))),
    }
}

/// mkfs arguments: quiet, and no discard (new volumes are already blank:
/// thin blocks are unallocated, thick LVs were zeroed on delete).
/// The mkfs command; `extra` (checked by [`mkfs_options`]) goes before the
/// device and replaces our defaults when given.
pub(crate) fn mkfs_command(fs: FsType, device: &Path, extra: &[String]) -> Cmd {
    let cmd = match fs {
        FsType::Ext4 if extra.is_empty() => Cmd::new("mkfs.ext4").args([
            "-q",
            "-E",
            "nodiscard,lazy_itable_init=1,lazy_journal_init=1",
        ]),
        FsType::Ext4 => Cmd::new("mkfs.ext4").arg("-q"),
        FsType::Xfs => Cmd::new("mkfs.xfs").args(["-q", "-K"]),
        FsType::Btrfs => Cmd::new("mkfs.btrfs").args(["-q", "-K"]),
    };
    cmd.args(extra).arg(device)
}

pub(crate) async fn mkfs(
    runner: &Runner,
    fs: FsType,
    device: &Path,
    extra: &[String],
) -> Result<()> {
    runner.run(&mkfs_command(fs, device, extra)).await?;
    Ok(())
}

/// Extra mkfs arguments from a StorageClass (`mkfsOptions`), split on
/// whitespace. Each must be a plain option or value: no path (so nothing
/// can name another device), no shell or quoting characters, at most 16.
pub(crate) fn mkfs_options(s: &str) -> Result<Vec<String>> {
    let args: Vec<String> = s.split_whitespace().map(String::from).collect();
    let plain = |a: &str| {
        a.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"=,._:+-".contains(&b))
    };
    if args.len() > 16 || args.iter().any(|a| !plain(a)) {
        return Err(Error::InvalidArgument(format!(
            "mkfsOptions {s:?}: at most 16 options of letters, digits and = , . _ : + - \
             (no paths)"
        )));
    }
    Ok(args)
}

/// The command that grows a mounted filesystem to its device's size.
pub(crate) fn grow_command(fs_type: &str, device: &Path, mount_point: &Path) -> Result<Cmd> {
    Ok(match fs_type {
        "ext4" | "ext3" | "ext2" => Cmd::new("resize2fs").arg(device),
        "xfs" => Cmd::new("xfs_growfs").arg("-d").arg(mount_point),
        "btrfs" => Cmd::new("btrfs")
            .args(["filesystem", "resize", "max"])
            .arg(mount_point),
        other => {
            return Err(Error::FailedPrecondition(format!(
                "cannot grow a {other} filesystem online"
            )))
        }
    })
}

pub(crate) async fn grow(
    runner: &Runner,
    fs_type: &str,
    device: &Path,
    mount_point: &Path,
) -> Result<()> {
    runner
        .run(&grow_command(fs_type, device, mount_point)?)
        .await?;
    Ok(())
}

/// The size a filesystem thinks it has, read from its superblock (no
/// process). None for an unknown filesystem or an unreadable superblock.
pub(crate) fn fs_size(device: &Path, fs_type: &str) -> Option<u64> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(device).ok()?;
    let read = |offset: u64, len: usize| -> Option<Vec<u8>> {
        let mut buf = vec![0u8; len];
        f.read_exact_at(&mut buf, offset).ok()?;
        Some(buf)
    };
    let le32 = |b: &[u8], o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap()) as u64;
    match fs_type {
        "ext4" | "ext3" | "ext2" => {
            let sb = read(1024, 1024)?;
            if sb[0x38..0x3a] != [0x53, 0xef] {
                return None;
            }
            let block = 1024u64 << le32(&sb, 0x18);
            let mut blocks = le32(&sb, 0x4);
            if le32(&sb, 0x60) & 0x80 != 0 {
                blocks |= le32(&sb, 0x150) << 32;
            }
            Some(blocks * block)
        }
        "xfs" => {
            let sb = read(0, 16)?;
            if &sb[0..4] != b"XFSB" {
                return None;
            }
            let block = u32::from_be_bytes(sb[4..8].try_into().unwrap()) as u64;
            let blocks = u64::from_be_bytes(sb[8..16].try_into().unwrap());
            Some(blocks * block)
        }
        "btrfs" => {
            let sb = read(0x10000, 0x100)?;
            if &sb[0x40..0x48] != b"_BHRfS_M" {
                return None;
            }
            Some(u64::from_le_bytes(sb[0x70..0x78].try_into().unwrap()))
        }
        _ => None,
    }
}

/// Usage of a mounted filesystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub total_bytes: u64,
    pub available_bytes: u64,
    pub used_bytes: u64,
    pub total_inodes: u64,
    pub free_inodes: u64,
    pub used_inodes: u64,
}

pub(crate) fn usage(path: &Path) -> Result<Usage> {
    let st = nix::sys::statvfs::statvfs(path)
        .map_err(|e| Error::Internal(format!("statvfs {}: {e}", path.display())))?;
    let frsize = st.fragment_size() as u64;
    let blocks = st.blocks() as u64;
    let files = st.files() as u64;
    let ffree = st.files_free() as u64;
    Ok(Usage {
        total_bytes: blocks * frsize,
        available_bytes: st.blocks_available() as u64 * frsize,
        used_bytes: blocks.saturating_sub(st.blocks_free() as u64) * frsize,
        total_inodes: files,
        free_inodes: ffree,
        used_inodes: files.saturating_sub(ffree),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blkid_output() {
        assert_eq!(
            parse_blkid("DEVNAME=/dev/x\nUUID=1\nTYPE=xfs\nUSAGE=filesystem\n"),
            Content::Filesystem("xfs".into())
        );
        assert_eq!(
            parse_blkid("DEVNAME=/dev/x\nPTTYPE=gpt\n"),
            Content::Other("partition table gpt".into())
        );
        assert_eq!(parse_blkid(""), Content::Blank);
    }

    #[test]
    fn commands() {
        let dev = Path::new("/dev/vg/lv");
        assert_eq!(
            mkfs_command(FsType::Xfs, dev, &[]).display(),
            "mkfs.xfs -q -K /dev/vg/lv"
        );
        let extra = mkfs_options(" -m 0  -E lazy_itable_init=0 ").unwrap();
        assert_eq!(
            mkfs_command(FsType::Ext4, dev, &extra).display(),
            "mkfs.ext4 -q -m 0 -E lazy_itable_init=0 /dev/vg/lv"
        );
        for bad in ["/dev/sda", "-L a;b", "$(x)", "a'b", "-d /tmp"] {
            assert!(mkfs_options(bad).is_err(), "{bad}");
        }
        assert_eq!(
            grow_command("xfs", dev, Path::new("/mnt/x"))
                .unwrap()
                .display(),
            "xfs_growfs -d /mnt/x"
        );
        assert_eq!(
            grow_command("ext4", dev, Path::new("/m"))
                .unwrap()
                .display(),
            "resize2fs /dev/vg/lv"
        );
        assert!(grow_command("vfat", dev, Path::new("/m")).is_err());
    }

    #[test]
    fn statvfs_of_root() {
        let u = usage(Path::new("/")).unwrap();
        assert!(u.total_bytes > 0 && u.used_bytes <= u.total_bytes);
    }
}
