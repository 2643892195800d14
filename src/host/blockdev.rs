//! Block device ioctls, done in-process: size, exclusive open, zeroing.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::error::{Error, Result};

nix::ioctl_read!(blkgetsize64, 0x12, 114, u64);
nix::ioctl_write_ptr_bad!(blkzeroout, nix::request_code_none!(0x12, 127), [u64; 2]);

/// Size of a block device in bytes.
pub fn size(path: &Path) -> Result<u64> {
    let f = File::open(path)
        .map_err(|e| Error::Internal(format!("cannot open {}: {e}", path.display())))?;
    size_of(&f, path)
}

fn size_of(f: &File, path: &Path) -> Result<u64> {
    let mut bytes: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer we pass.
    unsafe { blkgetsize64(f.as_raw_fd(), &mut bytes) }
        .map_err(|e| Error::Internal(format!("BLKGETSIZE64 on {}: {e}", path.display())))?;
    Ok(bytes)
}

/// Opens the device for writing with O_EXCL, which the kernel refuses with
/// EBUSY while the device is mounted or otherwise claimed. Holding the file
/// keeps anyone else from mounting it.
pub fn open_exclusive(path: &Path) -> Result<File> {
    OpenOptions::new()
        .write(true)
        .custom_flags(libc_o_excl())
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(nix::libc::EBUSY) {
                Error::FailedPrecondition(format!(
                    "{} is in use (mounted or held open); unpublish and unstage the volume first",
                    path.display()
                ))
            } else {
                Error::Internal(format!("cannot open {} exclusively: {e}", path.display()))
            }
        })
}

fn libc_o_excl() -> i32 {
    nix::libc::O_EXCL
}

/// Zeroes the whole device through BLKZEROOUT, so the kernel uses the
/// cheapest way the device offers that guarantees zeroes (write-zeroes,
/// unmap with zeroing, or plain writes). Blocking: call from spawn_blocking.
pub fn zero_all(f: &File, path: &Path) -> Result<u64> {
    let total = size_of(f, path)?;
    const CHUNK: u64 = 1 << 30;
    let mut offset = 0;
    while offset < total {
        let len = CHUNK.min(total - offset);
        let range = [offset, len];
        // SAFETY: BLKZEROOUT reads a [start, length] pair of u64 through the pointer.
        unsafe { blkzeroout(f.as_raw_fd(), &range) }.map_err(|e| {
            Error::Internal(format!(
                "BLKZEROOUT {}..{} on {}: {e}",
                offset,
                offset + len,
                path.display()
            ))
        })?;
        offset += len;
    }
    Ok(total)
}
