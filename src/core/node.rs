//! Node-side volume work shared by every backend: format only blank devices,
//! mount at the staging path, bind-mount to each target, grow filesystems,
//! and report usage and health. The backend only finds the block device.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use crate::core::backend::{Attach, NodeBackend, NodeVolume, Secrets};
use crate::core::request::{Access, Capability, FsType};
use crate::csi::volume_capability::access_mode::Mode as AccessMode;
use crate::error::{Error, Result};
use crate::host::{blockdev, fs, mount};
use crate::runner::Runner;

/// Volume context key with extra mkfs arguments (a StorageClass's
/// `mkfsOptions`, passed on by the controller).
#[allow(unreachable_pub)] // re-exported by the rbd backend
pub const CTX_MKFS_OPTIONS: &str = "mkfsOptions";

pub struct NodeOps {
    pub backend: Arc<dyn NodeBackend>,
    pub runner: Arc<Runner>,
}

/// Usage and health of a published or staged volume.
#[derive(Debug, Clone, PartialEq)]
pub struct Stats {
    pub usage: Option<fs::Usage>,
    pub block_bytes: Option<u64>,
    pub abnormal: Option<String>,
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Internal(format!("blocking task failed: {e}")))?
}

fn is_dir(p: &Path) -> bool {
    std::fs::symlink_metadata(p)
        .map(|m| m.is_dir())
        .unwrap_or(false)
}

fn mounted_device(entry: &mount::MountEntry, device: &Path) -> Result<bool> {
    mount::shows_device(entry, device)
}

/// Whether a mount found at a path the CO names belongs to the volume: it
/// shows the volume's device, or (when the backend no longer knows the
/// volume, or its device node is gone) its own device vanished under it.
fn belongs(entry: &mount::MountEntry, device: Option<&Path>) -> bool {
    match device {
        // The device node itself gone (an LV removed or renamed, an image
        // unmapped): judge by the mount's own source.
        Some(d) => mount::shows_device(entry, d).unwrap_or_else(|_| mount::source_vanished(entry)),
        None => mount::source_vanished(entry),
    }
}

/// Where a staged block volume's device is bound inside the staging path:
/// the record that the volume is staged, and what keeps it from deletion.
pub(crate) fn staged_block_file(staging: &Path) -> std::path::PathBuf {
    staging.join("device")
}

fn create_parent(path: &Path) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| Error::Internal(format!("cannot create {}: {e}", parent.display())))?;
    }
    Ok(())
}

/// Makes the directory `path` (its parents as needed). An existing directory
/// is fine; a symlink there is refused, never followed.
fn make_dir(path: &Path) -> Result<()> {
    create_parent(path)?;
    match std::fs::create_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            mount::refuse_symlink(path)?;
            if is_dir(path) {
                Ok(())
            } else {
                Err(Error::FailedPrecondition(format!(
                    "{} exists and is not a directory; a filesystem volume needs a directory or \
                     nothing there",
                    path.display()
                )))
            }
        }
        Err(e) => Err(Error::Internal(format!(
            "cannot create {}: {e}",
            path.display()
        ))),
    }
}

/// Makes the empty regular file `path` (a block volume's bind target). An
/// existing regular file is fine; a symlink, a directory or a device node
/// there is refused. Created with O_EXCL|O_NOFOLLOW, so nothing is ever
/// created or opened through a link.
fn make_file(path: &Path) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    create_parent(path)?;
    let refuse = |what: &str| {
        Error::FailedPrecondition(format!(
            "{} is {what}; a block volume needs an empty file or nothing there",
            path.display()
        ))
    };
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => return Err(mount::refuse_symlink(path).unwrap_err()),
        Ok(m) if m.is_dir() => return Err(refuse("a directory")),
        Ok(m) if m.is_file() => return Ok(()),
        Ok(_) => return Err(refuse("a special file")),
        Err(_) => {}
    }
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
        .open(path)
    {
        Ok(_) => Ok(()),
        // Made meanwhile: judge what is there now.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            match std::fs::symlink_metadata(path) {
                Ok(m) if m.is_file() => Ok(()),
                _ => Err(refuse("not a regular file")),
            }
        }
        Err(e) => Err(Error::Internal(format!(
            "cannot create {}: {e}",
            path.display()
        ))),
    }
}

/// Removes what publish or stage made at `path`: an empty directory or an
/// empty file. Anything with content is left alone.
fn remove_made(path: &Path) -> Result<()> {
    match std::fs::symlink_metadata(path) {
        Err(_) => Ok(()),
        Ok(m) if m.is_dir() => match std::fs::remove_dir(path) {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(nix::libc::ENOTEMPTY) => {
                tracing::warn!(path = %path.display(), "not removing a non-empty directory");
                Ok(())
            }
            Err(e) => Err(Error::Internal(format!(
                "cannot remove {}: {e}",
                path.display()
            ))),
        },
        Ok(m) if m.is_file() && m.len() == 0 => std::fs::remove_file(path)
            .map_err(|e| Error::Internal(format!("cannot remove {}: {e}", path.display()))),
        Ok(_) => {
            tracing::warn!(path = %path.display(), "not removing a file Lodestone did not make");
            Ok(())
        }
    }
}

/// The other publications of a device on this node: every mount showing it
/// except the ones at `except` (its staging mount or staged block file, and
/// the target being published).
fn other_mounts(device: &Path, except: &[&Path]) -> Result<Vec<mount::MountEntry>> {
    Ok(mount::entries_of(device)?
        .into_iter()
        .filter(|m| !except.contains(&m.mount_point.as_path()))
        .collect())
}

/// A read-only bind of a device node does not stop writes to the device
/// (the kernel only checks read-only mounts for regular files), so a raw
/// block volume published read-only has its whole device made read-only
/// (BLKROSET), and a read-write publication makes it writable again. Both
/// refuse when another publication on this node wants the opposite.
fn settle_block_read_only(
    device: &Path,
    others: &[mount::MountEntry],
    read_only: bool,
) -> Result<()> {
    let device_ro = blockdev::is_read_only(device)?;
    if read_only {
        if let Some(rw) = others.iter().find(|m| !m.read_only()) {
            return Err(Error::FailedPrecondition(format!(
                "the volume is published read-write on this node ({}); it cannot also be \
                 published read-only",
                rw.mount_point.display()
            )));
        }
        if !device_ro {
            blockdev::set_read_only(device, true)?;
        }
    } else {
        if let Some(ro) = others.iter().find(|m| m.read_only()) {
            return Err(Error::FailedPrecondition(format!(
                "the volume is published read-only on this node ({}); a read-write \
                 publication must wait until that is unpublished",
                ro.mount_point.display()
            )));
        }
        if device_ro {
            if let Some(other) = others.first() {
                return Err(Error::FailedPrecondition(format!(
                    "the volume's device is read-only while published on this node ({}); a \
                     read-write publication must wait until that is unpublished",
                    other.mount_point.display()
                )));
            }
            blockdev::set_read_only(device, false)?;
        }
    }
    Ok(())
}

/// What is at `path` that a volume could be: the top mount there, or, for a
/// directory that is a block volume's staging path, the bind of the device
/// inside it. None for anything else (including a symlink).
fn volume_mount_at(path: &Path) -> Result<Option<mount::MountEntry>> {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(None);
    };
    if meta.file_type().is_symlink() {
        return Ok(None);
    }
    if let Some(m) = mount::mount_at(path)? {
        return Ok(Some(m));
    }
    if meta.is_dir() {
        return Ok(mount::mount_at(&staged_block_file(path))?.filter(mount::is_device_bind));
    }
    Ok(None)
}

impl NodeOps {
    pub fn new(backend: Arc<dyn NodeBackend>, runner: Arc<Runner>) -> Self {
        NodeOps { backend, runner }
    }

    /// NodeStageVolume. Block volumes need nothing at the staging path; mount
    /// volumes get a filesystem (made only on a blank device) mounted there.
    pub async fn stage(
        &self,
        id: &str,
        staging: &Path,
        cap: &Capability,
        context: &BTreeMap<String, String>,
        secrets: &Secrets,
    ) -> Result<()> {
        // Before the backend keeps anything there (RBD writes a note).
        mount::refuse_symlink(staging)?;
        let device = self
            .backend
            .attach(&Attach {
                id,
                staging,
                context,
                secrets,
            })
            .await?;
        crate::fail_point!("node.stage.after_attach");
        let Access::Mount { fs: wanted, flags } = &cap.access else {
            return self.stage_block(staging, &device).await;
        };
        if let Some(existing) = mount::mount_at(staging)? {
            if mounted_device(&existing, &device)? {
                if let Some(w) = wanted {
                    if existing.fs_type != w.as_str() {
                        return Err(Error::AlreadyExists(format!(
                            "volume {id} is staged at {} as {}, not {}",
                            staging.display(),
                            existing.fs_type,
                            w.as_str()
                        )));
                    }
                }
                return Ok(());
            }
            return Err(Error::AlreadyExists(format!(
                "another device ({}) is mounted at staging path {}",
                existing.source,
                staging.display()
            )));
        }
        let staging_dir = staging.to_path_buf();
        blocking(move || make_dir(&staging_dir)).await?;
        let mut formatted = false;
        let fs_type = match fs::probe(&self.runner, &device).await? {
            fs::Content::Blank => {
                formatted = true;
                let fs = wanted.unwrap_or(FsType::Ext4);
                tracing::info!(volume = id, fs = fs.as_str(), "formatting blank volume");
                let extra = match context.get(CTX_MKFS_OPTIONS) {
                    Some(o) => fs::mkfs_options(o)?,
                    None => Vec::new(),
                };
                fs::mkfs(&self.runner, fs, &device, &extra).await?;
                crate::fail_point!("node.stage.after_mkfs");
                fs.as_str().to_string()
            }
            fs::Content::Filesystem(found) => {
                if let Some(w) = wanted {
                    if found != w.as_str() {
                        return Err(Error::FailedPrecondition(format!(
                            "volume {id} holds a {found} filesystem but {} was requested; \
                             Lodestone never reformats a volume that has data",
                            w.as_str()
                        )));
                    }
                }
                FsType::parse_named(&found).map_err(|_| {
                    Error::FailedPrecondition(format!(
                        "volume {id} holds a {found} filesystem, which Lodestone does not mount"
                    ))
                })?;
                found
            }
            fs::Content::Other(what) => {
                return Err(Error::FailedPrecondition(format!(
                    "volume {id} holds a {what}; refusing to format it"
                )))
            }
        };
        // XFS refuses a second mount of the same filesystem UUID (a clone or
        // a snapshot beside its source) unless told not to check.
        let extra: &[&str] = if fs_type == "xfs" { &["nouuid"] } else { &[] };
        let (device2, staging2, flags, fs2) = (
            device.clone(),
            staging.to_path_buf(),
            flags.clone(),
            fs_type.clone(),
        );
        let read_only = flags.iter().any(|f| f == "ro");
        blocking(move || mount::mount_device(&device2, &staging2, &fs2, &flags, extra)).await?;
        crate::fail_point!("node.stage.after_mount");
        if !formatted && !read_only {
            self.grow_if_smaller(id, &device, staging, &fs_type).await?;
        }
        Ok(())
    }

    /// A filesystem smaller than its device (a restore or clone into a
    /// larger volume, or an expansion the node never finished) is grown.
    async fn grow_if_smaller(
        &self,
        id: &str,
        device: &Path,
        mount_point: &Path,
        fs_type: &str,
    ) -> Result<()> {
        let (dev, fs) = (device.to_path_buf(), fs_type.to_string());
        let sizes = blocking(move || Ok((blockdev::size(&dev)?, fs::fs_size(&dev, &fs)))).await?;
        if let (device_bytes, Some(fs_bytes)) = sizes {
            // Filesystems end on a block boundary: a few blocks short is full size.
            if device_bytes > fs_bytes + (1 << 20) {
                tracing::info!(
                    volume = id,
                    fs_bytes,
                    device_bytes,
                    "growing filesystem to its device"
                );
                fs::grow(&self.runner, fs_type, device, mount_point).await?;
            }
        }
        Ok(())
    }

    /// A block volume is staged by binding its device node to a file in the
    /// staging directory.
    async fn stage_block(&self, staging: &Path, device: &Path) -> Result<()> {
        let file = staged_block_file(staging);
        mount::refuse_symlink(&file)?;
        if let Some(existing) = mount::mount_at(&file)? {
            if mounted_device(&existing, device)? {
                return Ok(());
            }
            return Err(Error::AlreadyExists(format!(
                "another device is staged at {}",
                staging.display()
            )));
        }
        let (device, staging) = (device.to_path_buf(), staging.to_path_buf());
        blocking(move || {
            make_dir(&staging)?;
            make_file(&file)?;
            crate::fail_point!("node.stage.after_create_file");
            mount::bind(&device, &file, false, &[])?;
            crate::fail_point!("node.stage.after_bind");
            Ok(())
        })
        .await
    }

    /// NodeUnstageVolume: unmount what the volume has at the staging path
    /// and detach. Nothing of the volume there is success; a mount of
    /// another device there is left alone (the volume is not staged there).
    pub async fn unstage(&self, id: &str, staging: &Path) -> Result<()> {
        let device = match self.backend.volume(id).await? {
            NodeVolume::Present { device, .. } => Some(device),
            NodeVolume::Missing => None,
        };
        let staging_path = staging.to_path_buf();
        let staging = staging_path.clone();
        blocking(move || {
            mount::refuse_symlink(&staging)?;
            let file = staged_block_file(&staging);
            let ours = |m: &mount::MountEntry| belongs(m, device.as_deref());
            // A block volume's staging directory is never a mount point; when
            // it is one, `device` in it is a file of the mounted filesystem.
            let block_staging = mount::mount_at(&staging)?.is_none();
            let unmounted = block_staging && mount::unmount_while(&file, ours)?;
            let leftover = block_staging
                && std::fs::symlink_metadata(&file)
                    .map(|m| m.is_file() && m.len() == 0)
                    .unwrap_or(false);
            if unmounted || (leftover && mount::mount_at(&file)?.is_none()) {
                crate::fail_point!("node.unstage.after_unmount_block");
                // The last user of a block volume on this node: a read-only
                // publication's device-wide flag goes with it. Also on a
                // retry after a crash right after the unmount (the empty
                // file is still there).
                if let Some(dev) = &device {
                    if dev.exists()
                        && mount::mounts_of(dev)?.is_empty()
                        && blockdev::is_read_only(dev)?
                    {
                        blockdev::set_read_only(dev, false)?;
                    }
                }
                remove_made(&file)?;
            }
            mount::unmount_while(&staging, ours)?;
            Ok(())
        })
        .await?;
        crate::fail_point!("node.unstage.after_unmount");
        self.backend.detach(id, &staging_path).await
    }

    /// NodePublishVolume: bind the staged filesystem (or the device node, for
    /// block) to the target, read-only when asked.
    pub async fn publish(
        &self,
        id: &str,
        staging: &Path,
        target: &Path,
        cap: &Capability,
        read_only: bool,
    ) -> Result<()> {
        let read_only = read_only || cap.read_only_mode();
        let device = match self.backend.volume(id).await? {
            NodeVolume::Present { device, .. } => device,
            NodeVolume::Missing => {
                return Err(Error::NotFound(format!(
                    "volume {id} does not exist on this node"
                )))
            }
        };
        mount::refuse_symlink(target)?;
        let block = cap.is_block();
        // Where the volume is staged: the staging mount, or for block the
        // bind of its device inside the staging directory.
        let staged_at = if block {
            staged_block_file(staging)
        } else {
            staging.to_path_buf()
        };
        match mount::mount_at(&staged_at)? {
            Some(m) if mounted_device(&m, &device)? => {}
            _ => {
                return Err(Error::FailedPrecondition(format!(
                    "volume {id} is not staged at {}; call NodeStageVolume first",
                    staging.display()
                )))
            }
        }
        let (source, flags) = match &cap.access {
            Access::Block => (device.clone(), Vec::new()),
            Access::Mount { flags, .. } => (staging.to_path_buf(), flags.clone()),
        };
        let single_writer = cap.mode == AccessMode::SingleNodeSingleWriter;
        let (id, target) = (id.to_string(), target.to_path_buf());
        blocking(move || {
            let except = [staged_at.as_path(), target.as_path()];
            if let Some(existing) = mount::mount_at(&target)? {
                if mounted_device(&existing, &device)? && existing.read_only() == read_only {
                    // Published here already. A raw block volume's
                    // read-only setting lives on the device too: a retry
                    // after a crash between the bind and BLKROSET, or after
                    // something reset the flag, must not answer OK while
                    // the device takes writes.
                    if block {
                        settle_block_read_only(
                            &device,
                            &other_mounts(&device, &except)?,
                            read_only,
                        )?;
                    }
                    return Ok(());
                }
                return Err(Error::AlreadyExists(format!(
                    "{} is already a mount point with another volume or another read-only setting",
                    target.display()
                )));
            }
            let others = other_mounts(&device, &except)?;
            // SINGLE_NODE_SINGLE_WRITER: one publication on this node at a
            // time. Stateless: any mount of the device other than its
            // staging is a publication. (SINGLE_NODE_WRITER keeps the
            // permissive meaning older COs rely on for pods sharing a
            // volume on one node.)
            if single_writer {
                if let Some(other) = others.first() {
                    return Err(Error::FailedPrecondition(format!(
                        "volume {id} is already published on this node at {}; its access mode \
                         SINGLE_NODE_SINGLE_WRITER allows one publication at a time",
                        other.mount_point.display()
                    )));
                }
            }
            if !block {
                make_dir(&target)?;
                crate::fail_point!("node.publish.after_create");
                mount::bind(&source, &target, read_only, &flags)?;
                crate::fail_point!("node.publish.after_bind");
                return Ok(());
            }
            // The device is made read-only (or writable) before the bind, so
            // no instant exists where a read-only publication takes writes.
            settle_block_read_only(&device, &others, read_only)?;
            crate::fail_point!("node.publish.after_read_only");
            make_file(&target)?;
            crate::fail_point!("node.publish.after_create");
            mount::bind(&source, &target, read_only, &flags)?;
            crate::fail_point!("node.publish.after_bind");
            if read_only && !blockdev::is_read_only(&device)? {
                blockdev::set_read_only(&device, true)?;
            }
            Ok(())
        })
        .await
    }

    /// NodeUnpublishVolume: unmount the volume at the target and remove what
    /// publish made (an empty directory or file; anything with content is
    /// left alone). A mount of another device there is left alone: the
    /// volume is not published there.
    pub async fn unpublish(&self, id: &str, target: &Path) -> Result<()> {
        let device = match self.backend.volume(id).await? {
            NodeVolume::Present { device, .. } => Some(device),
            NodeVolume::Missing => None,
        };
        let target = target.to_path_buf();
        blocking(move || {
            mount::unmount_while(&target, |m| belongs(m, device.as_deref()))?;
            crate::fail_point!("node.unpublish.after_unmount");
            if mount::mount_at(&target)?.is_some() {
                return Ok(());
            }
            remove_made(&target)
        })
        .await
    }

    /// NodeGetVolumeStats. NOT_FOUND unless `path` is where the volume is
    /// staged or published (its filesystem's mount, the bind of its device,
    /// or a block volume's staging directory); otherwise usage, with an
    /// abnormal condition when something is off, such as a volume whose
    /// backing storage vanished while it was still mounted.
    pub async fn stats(&self, id: &str, path: &Path) -> Result<Stats> {
        let volume = self.backend.volume(id).await?;
        let id = id.to_string();
        let path = path.to_path_buf();
        blocking(move || {
            let not_found = || {
                Error::NotFound(format!(
                    "volume {id} is not staged or published at {}",
                    path.display()
                ))
            };
            let Some(entry) = volume_mount_at(&path)? else {
                return Err(not_found());
            };
            let (device, abnormal) = match volume {
                NodeVolume::Present { device, abnormal } => {
                    match mount::shows_device(&entry, &device) {
                        Ok(true) => (Some(device), abnormal),
                        Ok(false) => return Err(not_found()),
                        Err(_) if mount::source_vanished(&entry) => (
                            None,
                            Some(abnormal.unwrap_or_else(|| {
                                "the volume's device no longer exists".to_string()
                            })),
                        ),
                        Err(e) => return Err(e),
                    }
                }
                NodeVolume::Missing if mount::source_vanished(&entry) => (
                    None,
                    Some("the volume's backing storage no longer exists".to_string()),
                ),
                NodeVolume::Missing => {
                    return Err(Error::NotFound(format!(
                        "volume {id} does not exist on this node"
                    )))
                }
            };
            let (usage, block_bytes) = if mount::is_device_bind(&entry) {
                let size = match &device {
                    Some(d) => blockdev::size(d).ok(),
                    None if is_dir(&path) => blockdev::size(&staged_block_file(&path)).ok(),
                    None => blockdev::size(&path).ok(),
                };
                (None, size)
            } else {
                (fs::usage(&path).ok(), None)
            };
            Ok(Stats {
                usage,
                block_bytes,
                abnormal,
            })
        })
        .await
    }

    /// NodeExpandVolume: grow the filesystem the volume has at `path` to its
    /// device's size; a block volume needs nothing. Returns the device size.
    /// NOT_FOUND for an unknown volume, and for a path where the volume is
    /// neither staged nor published (the CO may retry once it is).
    pub async fn expand(&self, id: &str, path: &Path, block_hint: bool) -> Result<u64> {
        let device = match self.backend.volume(id).await? {
            NodeVolume::Present { device, .. } => device,
            NodeVolume::Missing => {
                return Err(Error::NotFound(format!(
                    "volume {id} does not exist on this node"
                )))
            }
        };
        let (dev, p) = (device.clone(), path.to_path_buf());
        let (size, entry) = blocking(move || {
            let entry = volume_mount_at(&p)?;
            Ok((blockdev::size(&dev)?, entry))
        })
        .await?;
        let entry = match entry {
            Some(e) if mounted_device(&e, &device)? => e,
            _ => {
                return Err(Error::NotFound(format!(
                    "volume {id} is not staged or published at {}",
                    path.display()
                )))
            }
        };
        if block_hint || mount::is_device_bind(&entry) {
            return Ok(size);
        }
        crate::fail_point!("node.expand.before_grow");
        fs::grow(&self.runner, &entry.fs_type, &device, path).await?;
        Ok(size)
    }
}
