//! Block device ioctls, done in-process: size, exclusive open, zeroing.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::error::{Error, Result};

nix::ioctl_read!(blkgetsize64, 0x12, 114, u64);
nix::ioctl_write_ptr_bad!(blkzeroout, nix::request_code_none!(0x12, 127), [u64; 2]);
nix::ioctl_write_ptr_bad!(
    blkroset,
    nix::request_code_none!(0x12, 93),
    nix::libc::c_int
);
nix::ioctl_read_bad!(
    blkroget,
    nix::request_code_none!(0x12, 94),
    nix::libc::c_int
);

/// Whether the kernel refuses writes to the device.
pub(crate) fn is_read_only(path: &Path) -> Result<bool> {
    let f = File::open(path)
        .map_err(|e| Error::Internal(format!("cannot open {}: {e}", path.display())))?;
    let mut ro: nix::libc::c_int = 0;
    // SAFETY: BLKROGET writes one int through the pointer.
    unsafe { blkroget(f.as_raw_fd(), &mut ro) }
        .map_err(|e| Error::Internal(format!("BLKROGET on {}: {e}", path.display())))?;
    Ok(ro != 0)
}

/// Makes the kernel refuse (or accept again) writes to the whole device: a
/// read-only bind mount of a device node does not stop writes to the device.
pub(crate) fn set_read_only(path: &Path, read_only: bool) -> Result<()> {
    let f = File::open(path)
        .map_err(|e| Error::Internal(format!("cannot open {}: {e}", path.display())))?;
    let ro: nix::libc::c_int = read_only.into();
    // SAFETY: BLKROSET reads one int through the pointer.
    unsafe { blkroset(f.as_raw_fd(), &ro) }
        .map_err(|e| Error::Internal(format!("BLKROSET on {}: {e}", path.display())))?;
    Ok(())
}

/// Size of a block device in bytes.
pub(crate) fn size(path: &Path) -> Result<u64> {
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
pub(crate) fn open_exclusive(path: &Path) -> Result<File> {
    open_exclusive_with(path, 0)
}

fn open_exclusive_with(path: &Path, extra_flags: i32) -> Result<File> {
    OpenOptions::new()
        .write(true)
        .custom_flags(libc_o_excl() | extra_flags)
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

/// Opens the device for reading with O_EXCL: while it is held, nobody can
/// mount it or open it exclusively (as a thick LV's zeroing before removal
/// does). EBUSY is ABORTED: a retry after the other holder is done works.
pub(crate) fn open_exclusive_read(path: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc_o_excl())
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(nix::libc::EBUSY) {
                Error::Aborted(format!(
                    "{} is in use (being removed, or read by another call); retry",
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
pub(crate) fn zero_all(f: &File, path: &Path) -> Result<u64> {
    let total = size_of(f, path)?;
    zero_range(f, path, 0, total)?;
    Ok(total)
}

/// Zeroes `len` bytes from `start` through BLKZEROOUT (see [`zero_all`]).
/// Blocking.
pub(crate) fn zero_range(f: &File, path: &Path, start: u64, len: u64) -> Result<()> {
    const CHUNK: u64 = 1 << 30;
    let total = start + len;
    let mut offset = start;
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
    Ok(())
}

/// Copies every byte of `src` into `dst` (both block devices of at least
/// the same size as `src`), in 4 MiB chunks. A chunk of zeroes is not
/// written: with `dst_reads_zero` (a fresh thin LV, whose unwritten blocks
/// read as zeroes) it is skipped, otherwise it is zeroed with BLKZEROOUT, so
/// no old data of `dst` can survive. `dst` is opened O_EXCL (never a mounted
/// device). Stops early, with an error, when `cancel` is set. Blocking.
pub(crate) fn copy(
    src: &Path,
    dst: &Path,
    dst_reads_zero: bool,
    cancel: &std::sync::atomic::AtomicBool,
    progress: &std::sync::atomic::AtomicU64,
) -> Result<u64> {
    use std::io::Read;
    use std::os::unix::fs::FileExt;
    use std::sync::atomic::Ordering;

    // O_DIRECT both ways: no page-cache copies of data read once, and no
    // cache of the target to flush at the end.
    let direct = nix::libc::O_DIRECT;
    let mut input = OpenOptions::new()
        .read(true)
        .custom_flags(direct)
        .open(src)
        .map_err(|e| Error::Internal(format!("cannot open {}: {e}", src.display())))?;
    let total = size_of(&input, src)?;
    let output = open_exclusive_with(dst, direct)?;
    let dst_size = size_of(&output, dst)?;
    if dst_size < total {
        return Err(Error::Internal(format!(
            "{} ({dst_size} bytes) is smaller than {} ({total} bytes)",
            dst.display(),
            src.display()
        )));
    }
    const CHUNK: usize = 4 << 20;
    let mut aligned = AlignedBuf::new(CHUNK);
    let buf = aligned.as_mut_slice();
    // Slice equality against zeroes is a memcmp: fast even in debug builds.
    let zeroes = vec![0u8; CHUNK];
    let mut offset: u64 = 0;
    while offset < total {
        if cancel.load(Ordering::Relaxed) {
            return Err(Error::Aborted(format!(
                "copy into {} was cancelled",
                dst.display()
            )));
        }
        let len = (CHUNK as u64).min(total - offset) as usize;
        input
            .read_exact(&mut buf[..len])
            .map_err(|e| Error::Internal(format!("read {} at {offset}: {e}", src.display())))?;
        if buf[..len] == zeroes[..len] {
            if !dst_reads_zero {
                let range = [offset, len as u64];
                // SAFETY: BLKZEROOUT reads a [start, length] pair of u64.
                unsafe { blkzeroout(output.as_raw_fd(), &range) }.map_err(|e| {
                    Error::Internal(format!("BLKZEROOUT on {} at {offset}: {e}", dst.display()))
                })?;
            }
        } else {
            output.write_all_at(&buf[..len], offset).map_err(|e| {
                Error::Internal(format!("write {} at {offset}: {e}", dst.display()))
            })?;
        }
        offset += len as u64;
        progress.store(offset, Ordering::Relaxed);
    }
    // A larger destination (a restore into a bigger volume): its tail must
    // not keep old data either.
    if !dst_reads_zero && dst_size > total {
        let range = [total, dst_size - total];
        // SAFETY: BLKZEROOUT reads a [start, length] pair of u64.
        unsafe { blkzeroout(output.as_raw_fd(), &range) }.map_err(|e| {
            Error::Internal(format!("BLKZEROOUT on the tail of {}: {e}", dst.display()))
        })?;
    }
    output
        .sync_all()
        .map_err(|e| Error::Internal(format!("sync {}: {e}", dst.display())))?;
    Ok(total)
}

/// A zeroed, 4 KiB-aligned buffer (O_DIRECT needs aligned memory).
struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    layout: std::alloc::Layout,
}

impl AlignedBuf {
    fn new(len: usize) -> Self {
        let layout = std::alloc::Layout::from_size_align(len, 4096).expect("valid layout");
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr =
            std::ptr::NonNull::new(ptr).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        AlignedBuf { ptr, layout }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: ptr points to layout.size() initialised bytes we own.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}
