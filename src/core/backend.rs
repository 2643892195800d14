//! What the CSI layer needs from a storage backend. The CSI services validate
//! requests and map errors; backends (LVM, RBD) implement these traits.

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::core::blockmap::BlockMap;
use crate::core::capacity::Range;
use crate::core::request::Capability;
use crate::csi;
use crate::error::{Error, Result};

/// Where a new volume's data comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Snapshot(String),
    Volume(String),
}

/// Secrets that came with a request (CSI `secrets` fields). Never logged:
/// Debug shows only the key names.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secrets(pub BTreeMap<String, String>);

impl Secrets {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let keys: Vec<&str> = self.0.keys().map(String::as_str).collect();
        write!(f, "Secrets({keys:?})")
    }
}

impl From<&std::collections::HashMap<String, String>> for Secrets {
    fn from(m: &std::collections::HashMap<String, String>) -> Self {
        Secrets(m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
    }
}

/// A validated CreateVolume request.
#[derive(Debug, Clone)]
pub struct CreateVolume {
    pub name: String,
    pub range: Range,
    /// StorageClass parameters of ours (sidecar metadata dropped).
    pub params: BTreeMap<String, String>,
    pub capabilities: Vec<Capability>,
    pub requirement: Option<csi::TopologyRequirement>,
    pub source: Option<Source>,
    pub secrets: Secrets,
}

/// A validated CreateSnapshot request.
#[derive(Debug, Clone)]
pub struct CreateSnapshot {
    pub name: String,
    pub source_volume_id: String,
    pub params: BTreeMap<String, String>,
    pub secrets: Secrets,
}

/// A snapshot as the CSI layer reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotInfo {
    pub id: String,
    pub source_volume_id: String,
    pub size: u64,
    /// Seconds since the epoch.
    pub created: i64,
    pub ready: bool,
}

/// A volume as the CSI layer reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct VolumeInfo {
    pub id: String,
    pub capacity: u64,
    /// Topology segments the volume is reachable from.
    pub topology: Vec<BTreeMap<String, String>>,
    pub context: BTreeMap<String, String>,
    /// Set when the backend knows the volume is unhealthy.
    pub abnormal: Option<String>,
    pub source: Option<Source>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Capacity {
    pub available: u64,
    pub maximum_volume: u64,
    pub minimum_volume: u64,
}

#[tonic::async_trait]
pub trait ControllerBackend: Send + Sync + 'static {
    /// StorageClass parameter keys this backend accepts.
    fn parameter_keys(&self) -> &'static [&'static str];
    /// The ones among them whose values are JSON documents.
    fn json_parameter_keys(&self) -> &'static [&'static str] {
        &[]
    }
    /// Whether `id` is well-formed for this backend (used for page tokens).
    fn is_valid_id(&self, id: &str) -> bool;
    /// None when ready; otherwise why not (served by Probe, spawns nothing).
    fn not_ready(&self) -> Option<String>;
    async fn create_volume(&self, req: &CreateVolume) -> Result<VolumeInfo>;
    /// Deleting what does not exist is success.
    async fn delete_volume(&self, id: &str, secrets: &Secrets) -> Result<()>;
    async fn get_volume(&self, id: &str) -> Result<Option<VolumeInfo>>;
    /// All volumes, sorted by id.
    async fn list_volumes(&self) -> Result<Vec<VolumeInfo>>;
    /// Grows the volume to satisfy `range`; returns the new size.
    async fn expand_volume(&self, id: &str, range: Range, secrets: &Secrets) -> Result<u64>;
    async fn capacity(
        &self,
        params: &BTreeMap<String, String>,
        topology: Option<&csi::Topology>,
    ) -> Result<Capacity>;
    /// VolumeSnapshotClass parameter keys this backend accepts.
    fn snapshot_parameter_keys(&self) -> &'static [&'static str];
    fn is_valid_snapshot_id(&self, id: &str) -> bool;
    /// Creates a snapshot, or returns the one an earlier call made;
    /// `ready` is false while its data is still being copied.
    async fn create_snapshot(&self, req: &CreateSnapshot) -> Result<SnapshotInfo>;
    /// Deleting what does not exist is success.
    async fn delete_snapshot(&self, id: &str, secrets: &Secrets) -> Result<()>;
    async fn get_snapshot(&self, id: &str) -> Result<Option<SnapshotInfo>>;
    /// All snapshots, sorted by id.
    async fn list_snapshots(&self) -> Result<Vec<SnapshotInfo>>;
    /// Whether this backend serves block maps (the CSI SnapshotMetadata
    /// service is offered only then).
    fn serves_block_maps(&self) -> bool {
        false
    }
    /// The ranges of a snapshot that hold data. NOT_FOUND when there is no
    /// such snapshot.
    async fn allocated(&self, _snapshot_id: &str, _secrets: &Secrets) -> Result<BlockMap> {
        Err(Error::FailedPrecondition(
            "this backend does not track allocated blocks".into(),
        ))
    }
    /// The ranges that differ between two snapshots of one volume (`base`
    /// taken before `target`). NOT_FOUND when either is missing,
    /// INVALID_ARGUMENT when they are of different volumes.
    async fn delta(&self, _base: &str, _target: &str, _secrets: &Secrets) -> Result<BlockMap> {
        Err(Error::FailedPrecondition(
            "this backend does not track changed blocks".into(),
        ))
    }
}

/// The backend's view of a volume on this node, without running anything.
#[derive(Debug, Clone, PartialEq)]
pub enum NodeVolume {
    Missing,
    Present {
        device: PathBuf,
        abnormal: Option<String>,
    },
}

/// What NodeStageVolume hands the backend to make a volume usable here.
#[derive(Debug, Clone, Copy)]
pub struct Attach<'a> {
    pub id: &'a str,
    /// The staging directory (a network backend keeps its notes there).
    pub staging: &'a std::path::Path,
    /// The volume context CreateVolume returned.
    pub context: &'a BTreeMap<String, String>,
    pub secrets: &'a Secrets,
}

#[tonic::async_trait]
pub trait NodeBackend: Send + Sync + 'static {
    fn node_id(&self) -> &str;
    fn topology(&self) -> BTreeMap<String, String>;
    fn not_ready(&self) -> Option<String>;
    /// Makes the volume's block device usable here and returns its path.
    /// NOT_FOUND when the volume does not exist on this node.
    async fn attach(&self, req: &Attach<'_>) -> Result<PathBuf>;
    /// Undoes `attach` (unmap a network device; nothing for LVM), after
    /// the staging path was unmounted.
    async fn detach(&self, id: &str, staging: &std::path::Path) -> Result<()>;
    async fn volume(&self, id: &str) -> Result<NodeVolume>;
}
