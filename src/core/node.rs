//! Node-side volume work shared by every backend: format only blank devices,
//! mount at the staging path, bind-mount to each target, grow filesystems,
//! and report usage and health. The backend only finds the block device.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use crate::core::backend::{Attach, NodeBackend, NodeVolume, Secrets};
use crate::core::request::{Access, Capability, FsType};
use crate::error::{Error, Result};
use crate::host::{blockdev, fs, mount};
use crate::runner::Runner;

/// Volume context key with extra mkfs arguments (a StorageClass's
/// `mkfsOptions`, passed on by the controller).
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

/// Where a staged block volume's device is bound inside the staging path:
/// the record that the volume is staged, and what keeps it from deletion.
pub fn staged_block_file(staging: &Path) -> std::path::PathBuf {
    staging.join("device")
}

fn create_file(path: &Path) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| Error::Internal(format!("cannot create {}: {e}", parent.display())))?;
    }
    if is_dir(path) {
        return Err(Error::FailedPrecondition(format!(
            "{} is a directory; a block volume needs a file or nothing there",
            path.display()
        )));
    }
    if !path.exists() {
        std::fs::File::create(path)
            .map_err(|e| Error::Internal(format!("cannot create {}: {e}", path.display())))?;
    }
    Ok(())
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
        let device = self
            .backend
            .attach(&Attach {
                id,
                staging,
                context,
                secrets,
            })
            .await?;
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
        if !is_dir(staging) {
            std::fs::create_dir_all(staging).map_err(|e| {
                Error::Internal(format!(
                    "cannot create staging path {}: {e}",
                    staging.display()
                ))
            })?;
        }
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
        if let Some(existing) = mount::mount_at(&file)? {
            if mounted_device(&existing, device)? {
                return Ok(());
            }
            return Err(Error::AlreadyExists(format!(
                "another device is staged at {}",
                staging.display()
            )));
        }
        let device = device.to_path_buf();
        blocking(move || {
            create_file(&file)?;
            mount::bind(&device, &file, false, &[])
        })
        .await
    }

    /// NodeUnstageVolume: unmount the staging path (if mounted) and detach.
    pub async fn unstage(&self, id: &str, staging: &Path) -> Result<()> {
        let device = match self.backend.volume(id).await? {
            NodeVolume::Present { device, .. } => Some(device),
            NodeVolume::Missing => None,
        };
        let staging_path = staging.to_path_buf();
        let staging = staging_path.clone();
        blocking(move || {
            let file = staged_block_file(&staging);
            if mount::unmount_all(&file)? {
                remove_made(&file)?;
                // The last user of a block volume on this node: a read-only
                // publication's device-wide flag goes with it.
                if let Some(dev) = &device {
                    blockdev::set_read_only(dev, false)?;
                }
            }
            mount::unmount_all(&staging).map(|_| ())
        })
        .await?;
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
        let (source, flags, device) = match &cap.access {
            Access::Block => {
                let device = match self.backend.volume(id).await? {
                    NodeVolume::Present { device, .. } => device,
                    NodeVolume::Missing => {
                        return Err(Error::NotFound(format!(
                            "volume {id} is not present on this node"
                        )))
                    }
                };
                match mount::mount_at(&staged_block_file(staging))? {
                    Some(m) if mounted_device(&m, &device)? => {}
                    _ => {
                        return Err(Error::FailedPrecondition(format!(
                            "volume {id} is not staged at {}; call NodeStageVolume first",
                            staging.display()
                        )))
                    }
                }
                (device.clone(), Vec::new(), device)
            }
            Access::Mount { flags, .. } => {
                let device = match self.backend.volume(id).await? {
                    NodeVolume::Present { device, .. } => device,
                    NodeVolume::Missing => {
                        return Err(Error::NotFound(format!("volume {id} does not exist")))
                    }
                };
                match mount::mount_at(staging)? {
                    Some(m) if mounted_device(&m, &device)? => {}
                    _ => {
                        return Err(Error::FailedPrecondition(format!(
                            "volume {id} is not staged at {}; call NodeStageVolume first",
                            staging.display()
                        )))
                    }
                }
                (staging.to_path_buf(), flags.clone(), device)
            }
        };
        if let Some(existing) = mount::mount_at(target)? {
            if mounted_device(&existing, &device)? && existing.read_only() == read_only {
                return Ok(());
            }
            return Err(Error::AlreadyExists(format!(
                "{} is already a mount point with another volume or another read-only setting",
                target.display()
            )));
        }
        let target = target.to_path_buf();
        let block = cap.is_block();
        let staged_file = staged_block_file(staging);
        blocking(move || {
            if !block {
                std::fs::create_dir_all(&target).map_err(|e| {
                    Error::Internal(format!("cannot create {}: {e}", target.display()))
                })?;
                return mount::bind(&source, &target, read_only, &flags);
            }
            // A read-only bind of a device node does not stop writes to the
            // device: the device itself is made read-only while published so.
            let others: Vec<_> = mount::mounts_of(&device)?
                .into_iter()
                .filter(|p| *p != staged_file)
                .collect();
            if !read_only && blockdev::is_read_only(&device)? {
                if !others.is_empty() {
                    return Err(Error::FailedPrecondition(format!(
                        "the volume is published read-only on this node ({}); a read-write \
                         publication must wait until that is unpublished",
                        others[0].display()
                    )));
                }
                blockdev::set_read_only(&device, false)?;
            }
            if read_only && !others.is_empty() && !blockdev::is_read_only(&device)? {
                return Err(Error::FailedPrecondition(format!(
                    "the volume is published read-write on this node ({}); it cannot also be \
                     published read-only",
                    others[0].display()
                )));
            }
            create_file(&target)?;
            mount::bind(&source, &target, read_only, &flags)?;
            if read_only {
                blockdev::set_read_only(&device, true)?;
            }
            Ok(())
        })
        .await
    }

    /// NodeUnpublishVolume: unmount the target and remove what publish made
    /// (an empty directory or file; anything with content is left alone).
    pub async fn unpublish(&self, target: &Path) -> Result<()> {
        let target = target.to_path_buf();
        blocking(move || {
            mount::unmount_all(&target)?;
            remove_made(&target)
        })
        .await
    }

    /// NodeGetVolumeStats: NOT_FOUND when neither the path nor the volume
    /// exists; otherwise usage, with an abnormal condition when something is off.
    pub async fn stats(&self, id: &str, path: &Path) -> Result<Stats> {
        if std::fs::symlink_metadata(path).is_err() {
            return Err(Error::NotFound(format!(
                "volume path {} does not exist",
                path.display()
            )));
        }
        let volume = self.backend.volume(id).await?;
        let entry = mount::mount_at(path)?;
        let mut abnormal;
        let device = match &volume {
            NodeVolume::Missing if entry.is_none() => {
                return Err(Error::NotFound(format!("volume {id} does not exist")));
            }
            NodeVolume::Missing => {
                abnormal = Some("the volume's backing storage no longer exists".to_string());
                None
            }
            NodeVolume::Present {
                device,
                abnormal: a,
            } => {
                abnormal = a.clone();
                Some(device.clone())
            }
        };
        match &entry {
            None => {
                abnormal.get_or_insert_with(|| format!("{} is not mounted", path.display()));
            }
            Some(m) => {
                if let Some(dev) = &device {
                    if !mounted_device(m, dev).unwrap_or(false) {
                        abnormal.get_or_insert_with(|| {
                            format!("{} holds another device than the volume", path.display())
                        });
                    }
                }
            }
        }
        let path = path.to_path_buf();
        let is_block = !is_dir(&path);
        let (usage, block_bytes) = blocking(move || {
            if is_block {
                Ok((None, blockdev::size(&path).ok()))
            } else {
                Ok((fs::usage(&path).ok(), None))
            }
        })
        .await?;
        Ok(Stats {
            usage,
            block_bytes,
            abnormal,
        })
    }

    /// NodeExpandVolume: grow the filesystem mounted at `path` to its device's
    /// size; a block volume needs nothing. Returns the device size.
    pub async fn expand(&self, id: &str, path: &Path, block_hint: bool) -> Result<u64> {
        let device = match self.backend.volume(id).await? {
            NodeVolume::Present { device, .. } => device,
            NodeVolume::Missing => {
                return Err(Error::NotFound(format!("volume {id} does not exist")))
            }
        };
        if std::fs::symlink_metadata(path).is_err() {
            return Err(Error::NotFound(format!(
                "volume path {} does not exist",
                path.display()
            )));
        }
        let dev = device.clone();
        let size = blocking(move || blockdev::size(&dev)).await?;
        if block_hint || !is_dir(path) {
            return Ok(size);
        }
        let entry = mount::mount_at(path)?.ok_or_else(|| {
            Error::FailedPrecondition(format!("{} is not mounted", path.display()))
        })?;
        if !mounted_device(&entry, &device)? {
            return Err(Error::FailedPrecondition(format!(
                "{} does not hold volume {id}",
                path.display()
            )));
        }
        fs::grow(&self.runner, &entry.fs_type, &device, path).await?;
        Ok(size)
    }
}
