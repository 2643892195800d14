//! RBD on the node side: map an image with the kernel client (krbd, the
//! `rbd` CLI through the runner, option `noudev`), find mapped images in
//! sysfs (no process, and it survives a plugin restart), unmap on unstage.
//!
//! The key reaches `rbd map` through a private keyring file (mode 0600 in a
//! 0700 directory) that is removed right after, never through argv.
//! rbd-nbd is not offered: its daemon would die with a restarted plugin
//! and take every mounted volume of the node with it.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::core::backend::{Attach, NodeBackend, NodeVolume};
use crate::error::{Error, Result};
use crate::rbd::config::{RbdConfig, USER_ID, USER_KEY};
use crate::rbd::controller::{CTX_CLUSTER, CTX_IMAGE, CTX_POOL};
use crate::rbd::ids::{Kind, RbdId};
use crate::runner::{Cmd, Runner};

const SYSFS_RBD: &str = "/sys/bus/rbd/devices";
/// What the node keeps in the staging directory for unstage.
const STAGE_NOTE: &str = "lodestone-rbd.json";

pub(crate) struct RbdNode {
    node_id: String,
    topology: BTreeMap<String, String>,
    config: RbdConfig,
    runner: Arc<Runner>,
    /// Private directory for short-lived keyring files.
    key_dir: PathBuf,
    sysfs: PathBuf,
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
struct StageNote {
    volume_id: String,
    pool: String,
    image: String,
    device: String,
}

/// A keyring file that is removed when dropped.
struct Keyring(PathBuf);

impl Drop for Keyring {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The `/dev/rbdN` of the image mapped from `pool_id`/`image` (not a
/// snapshot), found in sysfs.
fn mapped_device(sysfs: &Path, pool_id: i64, image: &str) -> Option<PathBuf> {
    let entries = std::fs::read_dir(sysfs).ok()?;
    for e in entries.flatten() {
        let read = |f: &str| {
            std::fs::read_to_string(e.path().join(f))
                .map(|s| s.trim().to_string())
                .unwrap_or_default()
        };
        if read("name") == image
            && read("pool_id") == pool_id.to_string()
            && read("current_snap") == "-"
        {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.bytes().all(|b| b.is_ascii_digit()) {
                return Some(PathBuf::from(format!("/dev/rbd{n}")));
            }
        }
    }
    None
}

/// Removes keyring files an earlier run of the plugin left behind (killed
/// during `rbd map`, before its guard could remove them). At start no map
/// of this process is in flight, so every keyring in the directory is
/// stale. Returns how many went.
fn sweep_keyrings(key_dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(key_dir) else {
        return 0;
    };
    let mut n = 0;
    for e in entries.flatten() {
        let path = e.path();
        let is_keyring = path.extension().is_some_and(|x| x == "keyring")
            && e.file_type().is_ok_and(|t| t.is_file());
        if !is_keyring {
            continue;
        }
        match std::fs::remove_file(&path) {
            Ok(()) => n += 1,
            Err(err) => {
                tracing::warn!(path = %path.display(), error = %err, "cannot remove a stale keyring")
            }
        }
    }
    if n > 0 {
        tracing::info!(removed = n, dir = %key_dir.display(), "removed stale keyring files");
    }
    n
}

impl RbdNode {
    pub(crate) fn new(
        node_id: String,
        topology: BTreeMap<String, String>,
        config: RbdConfig,
        runner: Arc<Runner>,
        key_dir: PathBuf,
    ) -> Self {
        sweep_keyrings(&key_dir);
        RbdNode {
            node_id,
            topology,
            config,
            runner,
            key_dir,
            sysfs: PathBuf::from(SYSFS_RBD),
        }
    }

    fn write_keyring(&self, user: &str, key: &str) -> Result<Keyring> {
        let internal = |e: std::io::Error| Error::Internal(format!("keyring file: {e}"));
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.key_dir)
            .map_err(internal)?;
        let path = self
            .key_dir
            .join(format!("{}.keyring", uuid::Uuid::new_v4().simple()));
        let guard = Keyring(path.clone());
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(internal)?;
        let user = user.strip_prefix("client.").unwrap_or(user);
        f.write_all(format!("[client.{user}]\n\tkey = {key}\n").as_bytes())
            .map_err(internal)?;
        Ok(guard)
    }

    fn note_path(staging: &Path) -> PathBuf {
        staging.join(STAGE_NOTE)
    }
}

/// A CSI user id or key as `rbd` would take it: no whitespace, no newline
/// (it goes into a keyring file).
fn plain(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic())
}

#[tonic::async_trait]
impl NodeBackend for RbdNode {
    fn node_id(&self) -> &str {
        &self.node_id
    }

    fn topology(&self) -> BTreeMap<String, String> {
        self.topology.clone()
    }

    fn not_ready(&self) -> Option<String> {
        None
    }

    async fn attach(&self, req: &Attach<'_>) -> Result<PathBuf> {
        let id = RbdId::parse(Kind::Volume, req.id)
            .ok_or_else(|| Error::NotFound(format!("volume {} does not exist", req.id)))?;
        let cluster = self.config.cluster(&id.cluster)?;
        let image = id.image();
        if let Some(dev) = mapped_device(&self.sysfs, id.pool_id, &image) {
            return Ok(dev);
        }
        let pool = req
            .context
            .get(CTX_POOL)
            .ok_or_else(|| Error::InvalidArgument(format!("volume context lacks {CTX_POOL}")))?;
        if req.context.get(CTX_IMAGE).is_some_and(|i| *i != image)
            || req
                .context
                .get(CTX_CLUSTER)
                .is_some_and(|c| *c != id.cluster)
        {
            return Err(Error::InvalidArgument(
                "the volume context does not match the volume id".into(),
            ));
        }
        let user = req.secrets.get(USER_ID).filter(|u| plain(u));
        let key = req.secrets.get(USER_KEY).filter(|k| plain(k));
        let (Some(user), Some(key)) = (user, key) else {
            return Err(Error::InvalidArgument(format!(
                "NodeStageVolume needs the secrets {USER_ID} and {USER_KEY} (the StorageClass's \
                 node-stage secret)"
            )));
        };
        let keyring = self.write_keyring(user, key)?;
        crate::fail_point!("rbd.map.after_keyring");
        let user = user.strip_prefix("client.").unwrap_or(user);
        let cmd = Cmd::new("rbd")
            .args(["map", "--id", user, "--keyring"])
            .arg(&keyring.0)
            .args(["-m", &cluster.mon_host(), "--options", "noudev"])
            .arg(format!("{pool}/{image}"));
        let out = self.runner.run(&cmd).await;
        drop(keyring);
        let out = out.map_err(|e| {
            let stderr = e.stderr().to_string();
            if stderr.contains("No such file") || stderr.contains("not found") {
                Error::NotFound(format!("image {pool}/{image}: {stderr}"))
            } else {
                Error::Internal(format!("rbd map {pool}/{image}: {e}"))
            }
        })?;
        let device = out.stdout.trim().to_string();
        let device = match mapped_device(&self.sysfs, id.pool_id, &image) {
            Some(d) => d,
            None if device.starts_with("/dev/rbd") => PathBuf::from(device),
            None => {
                return Err(Error::Internal(format!(
                    "rbd map {pool}/{image} printed no device"
                )))
            }
        };
        tracing::info!(volume = %req.id, device = %device.display(), "mapped");
        let note = StageNote {
            volume_id: req.id.to_string(),
            pool: pool.clone(),
            image,
            device: device.display().to_string(),
        };
        if let Err(e) = std::fs::create_dir_all(req.staging).and_then(|_| {
            std::fs::write(
                Self::note_path(req.staging),
                serde_json::to_vec(&note).expect("note serializes"),
            )
        }) {
            tracing::warn!(error = %e, "cannot write the staging note");
        }
        Ok(device)
    }

    async fn detach(&self, id: &str, staging: &Path) -> Result<()> {
        let note_path = Self::note_path(staging);
        let device = match RbdId::parse(Kind::Volume, id) {
            Some(rid) => mapped_device(&self.sysfs, rid.pool_id, &rid.image()),
            None => None,
        };
        if let Some(dev) = device {
            let cmd = Cmd::new("rbd")
                .args(["unmap", "--options", "noudev"])
                .arg(&dev);
            if let Err(e) = self.runner.run(&cmd).await {
                let stderr = e.stderr().to_lowercase();
                return Err(if stderr.contains("busy") {
                    Error::FailedPrecondition(format!(
                        "{} is still in use (open or mounted elsewhere); close it and retry: {}",
                        dev.display(),
                        e.stderr().trim()
                    ))
                } else {
                    Error::Internal(format!("rbd unmap {}: {e}", dev.display()))
                });
            }
            tracing::info!(volume = %id, device = %dev.display(), "unmapped");
        }
        match std::fs::remove_file(&note_path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(error = %e, "cannot remove the staging note"),
        }
        Ok(())
    }

    async fn volume(&self, id: &str) -> Result<NodeVolume> {
        let Some(rid) = RbdId::parse(Kind::Volume, id) else {
            return Ok(NodeVolume::Missing);
        };
        Ok(
            match mapped_device(&self.sysfs, rid.pool_id, &rid.image()) {
                Some(device) => NodeVolume::Present {
                    device,
                    abnormal: None,
                },
                None => NodeVolume::Missing,
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_mapped_images_in_sysfs() {
        let dir = tempfile::tempdir().unwrap();
        let dev = |n: &str, pool_id: &str, name: &str, snap: &str| {
            let d = dir.path().join(n);
            std::fs::create_dir(&d).unwrap();
            std::fs::write(d.join("pool_id"), format!("{pool_id}\n")).unwrap();
            std::fs::write(d.join("name"), format!("{name}\n")).unwrap();
            std::fs::write(d.join("current_snap"), format!("{snap}\n")).unwrap();
        };
        dev("0", "2", "lds-a", "-");
        dev("1", "3", "lds-b", "-");
        dev("2", "3", "lds-c", "snap1");
        assert_eq!(
            mapped_device(dir.path(), 3, "lds-b"),
            Some(PathBuf::from("/dev/rbd1"))
        );
        assert_eq!(mapped_device(dir.path(), 2, "lds-b"), None);
        assert_eq!(mapped_device(dir.path(), 3, "lds-c"), None);
        assert_eq!(mapped_device(&dir.path().join("none"), 2, "lds-a"), None);
    }

    #[test]
    fn keyring_is_private_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let node = RbdNode::new(
            "n".into(),
            BTreeMap::new(),
            RbdConfig::default(),
            Arc::new(Runner::new(std::time::Duration::from_secs(5))),
            dir.path().join("keys"),
        );
        let path = {
            let k = node.write_keyring("client.lodestone", "a2V5").unwrap();
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&k.0).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
            let dmode = std::fs::metadata(dir.path().join("keys"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(dmode & 0o777, 0o700);
            assert_eq!(
                std::fs::read_to_string(&k.0).unwrap(),
                "[client.lodestone]\n\tkey = a2V5\n"
            );
            k.0.clone()
        };
        assert!(!path.exists());
        assert!(!plain("a b") && !plain("x\n") && plain("AQB+/=="));
    }

    /// Keyrings left by a plugin killed during `rbd map` are removed when
    /// the plugin starts again; other files in the directory stay.
    #[test]
    fn stale_keyrings_are_swept_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("keys");
        std::fs::create_dir(&keys).unwrap();
        for n in ["0a1b.keyring", "ff00.keyring"] {
            std::fs::write(keys.join(n), "[client.x]\n\tkey = a2V5\n").unwrap();
        }
        std::fs::write(keys.join("notes.txt"), "keep").unwrap();
        std::fs::create_dir(keys.join("sub.keyring")).unwrap();
        let _node = RbdNode::new(
            "n".into(),
            BTreeMap::new(),
            RbdConfig::default(),
            Arc::new(Runner::new(std::time::Duration::from_secs(5))),
            keys.clone(),
        );
        let mut left: Vec<String> = std::fs::read_dir(&keys)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["notes.txt", "sub.keyring"]);
        // no directory yet (first start): nothing to do, no error
        assert_eq!(sweep_keyrings(&dir.path().join("none")), 0);
    }
}
