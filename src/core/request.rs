//! Validation of what arrives on the wire: names, ids, paths, capabilities
//! and parameters. Everything here is pure; bad input is refused before any
//! backend is touched.

use std::collections::{BTreeMap, HashMap};
use std::path::{Component, Path, PathBuf};

use crate::csi;
use crate::csi::volume_capability::access_mode::Mode as AccessMode;
use crate::error::{Error, Result};
use crate::invalid;

/// The spec's size limit for names and ids.
pub(crate) const MAX_NAME_BYTES: usize = 128;
const MAX_PATH_BYTES: usize = 4096;
/// Parameters with this prefix come from the sidecars (PVC name, namespace,
/// secrets references...) and are not StorageClass options of ours.
pub(crate) const SIDECAR_PARAM_PREFIX: &str = "csi.storage.k8s.io/";

/// Filesystems a mount volume may ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FsType {
    Ext4,
    Xfs,
    Btrfs,
}

impl FsType {
    /// None for an empty fs_type (the orchestrator left the choice to us).
    pub fn parse(s: &str) -> Result<Option<Self>> {
        Self::parse_named(s)
            .map(Some)
            .or_else(|e| if s.is_empty() { Ok(None) } else { Err(e) })
    }

    pub fn parse_named(s: &str) -> Result<Self> {
        match s {
            "ext4" => Ok(FsType::Ext4),
            "xfs" => Ok(FsType::Xfs),
            "btrfs" => Ok(FsType::Btrfs),
            other => Err(invalid!(
                "unsupported fs_type {other:?}: Lodestone formats ext4 (the default), xfs or btrfs"
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            FsType::Ext4 => "ext4",
            FsType::Xfs => "xfs",
            FsType::Btrfs => "btrfs",
        }
    }

    /// Smallest device the filesystem's mkfs accepts with default options.
    pub fn min_bytes(self) -> u64 {
        match self {
            FsType::Ext4 => 16 << 20,
            FsType::Xfs => 300 << 20,
            FsType::Btrfs => 128 << 20,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    Block,
    /// `fs` is None when the request named no filesystem: an existing one is
    /// used as it is, a blank device gets ext4.
    Mount {
        fs: Option<FsType>,
        flags: Vec<String>,
    },
}

/// One validated volume capability.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capability {
    pub access: Access,
    pub mode: AccessMode,
}

impl Capability {
    pub fn is_block(&self) -> bool {
        matches!(self.access, Access::Block)
    }

    /// Read-only by access mode.
    pub fn read_only_mode(&self) -> bool {
        matches!(
            self.mode,
            AccessMode::SingleNodeReaderOnly | AccessMode::MultiNodeReaderOnly
        )
    }
}

/// Why a capability is not supported (for ValidateVolumeCapabilities'
/// message) versus malformed (INVALID_ARGUMENT everywhere).
pub(crate) fn parse_capability(cap: &csi::VolumeCapability) -> Result<Capability> {
    let mode = cap
        .access_mode
        .as_ref()
        .map(|m| m.mode())
        .ok_or_else(|| invalid!("volume_capability.access_mode is required"))?;
    // `block` and `mount` are a oneof in the spec, plain fields in our copy
    // of the proto so that a message setting both is seen (and refused).
    let access = match (&cap.block, &cap.mount) {
        (None, None) => {
            return Err(invalid!(
                "volume_capability.access_type (block or mount) is required"
            ))
        }
        (Some(_), Some(_)) => {
            return Err(invalid!(
                "volume_capability sets both block and mount; exactly one access type is allowed"
            ))
        }
        (Some(_), None) => Access::Block,
        (None, Some(m)) => {
            let fs = FsType::parse(&m.fs_type)?;
            for flag in &m.mount_flags {
                validate_mount_flag(flag)?;
            }
            if !m.volume_mount_group.is_empty() {
                return Err(invalid!(
                    "volume_mount_group is not supported (the driver does not advertise \
                     VOLUME_MOUNT_GROUP)"
                ));
            }
            Access::Mount {
                fs,
                flags: m.mount_flags.clone(),
            }
        }
    };
    match mode {
        AccessMode::SingleNodeWriter
        | AccessMode::SingleNodeReaderOnly
        | AccessMode::SingleNodeSingleWriter
        | AccessMode::SingleNodeMultiWriter => Ok(Capability { access, mode }),
        AccessMode::Unknown => Err(invalid!("volume_capability.access_mode.mode is required")),
        other => Err(invalid!(
            "access mode {} is not supported: local volumes are reachable from one node only",
            other.as_str_name()
        )),
    }
}

pub(crate) fn parse_capabilities(caps: &[csi::VolumeCapability]) -> Result<Vec<Capability>> {
    if caps.is_empty() {
        return Err(invalid!("volume_capabilities is required"));
    }
    caps.iter().map(parse_capability).collect()
}

fn validate_mount_flag(flag: &str) -> Result<()> {
    let ok = !flag.is_empty()
        && flag.len() <= 256
        && !flag.starts_with('-')
        && flag
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_=.,:/+-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(invalid!(
            "mount flag {flag:?} is not allowed (letters, digits and _=.,:/+- only, not \
             starting with '-')"
        ))
    }
}

/// A CSI name (volume or snapshot request name).
pub(crate) fn validate_name(name: &str, what: &str) -> Result<()> {
    if name.is_empty() {
        return Err(invalid!("{what} is required"));
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(invalid!(
            "{what} is {} bytes; at most {MAX_NAME_BYTES} are allowed",
            name.len()
        ));
    }
    if name.chars().any(char::is_control) {
        return Err(invalid!("{what} must not contain control characters"));
    }
    Ok(())
}

/// A volume or snapshot id: present and of sane size. Whether it decodes is
/// the backend's business (an undecodable id is simply not found).
pub(crate) fn require_id<'a>(id: &'a str, what: &str) -> Result<&'a str> {
    if id.is_empty() {
        return Err(invalid!("{what} is required"));
    }
    Ok(id)
}

/// An absolute, normalized path with no `.` or `..` components.
pub(crate) fn validate_path(path: &str, what: &str) -> Result<PathBuf> {
    if path.is_empty() {
        return Err(invalid!("{what} is required"));
    }
    if path.len() > MAX_PATH_BYTES || path.contains('\0') {
        return Err(invalid!("{what} is too long or contains a NUL byte"));
    }
    let p = Path::new(path);
    if !p.is_absolute() {
        return Err(invalid!("{what} {path:?} must be an absolute path"));
    }
    if path.split('/').any(|seg| seg == "." || seg == "..")
        || p.components()
            .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
    {
        return Err(invalid!(
            "{what} {path:?} must not contain '.' or '..' components"
        ));
    }
    if p.parent().is_none() {
        return Err(invalid!("{what} must not be the root directory"));
    }
    Ok(p.components().collect())
}

/// StorageClass parameters of ours, with sidecar metadata dropped. Any other
/// key is refused so that a typo does not silently give a default volume.
/// Values of `json` keys must be JSON (they are only ever parsed, never
/// passed on); every other value is refused when it carries characters a
/// shell or a flag parser would read.
pub(crate) fn storage_params(
    params: &HashMap<String, String>,
    known: &[&str],
    json: &[&str],
) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for (k, v) in params {
        if k.starts_with(SIDECAR_PARAM_PREFIX) {
            continue;
        }
        if !known.contains(&k.as_str()) {
            return Err(invalid!(
                "unknown parameter {k:?}; supported parameters: {}",
                known.join(", ")
            ));
        }
        if json.contains(&k.as_str()) {
            if serde_json::from_str::<serde_json::Value>(v).is_err() {
                return Err(invalid!("parameter {k:?} must be JSON"));
            }
        } else if v.starts_with('-')
            || v.chars()
                .any(|c| c.is_control() || "`$;|&<>(){}\\'\"".contains(c))
        {
            return Err(invalid!(
                "parameter {k:?} has a value with characters that are not allowed"
            ));
        }
        out.insert(k.clone(), v.clone());
    }
    Ok(out)
}

/// Whether a node with `node_segments` lies inside topology `t`.
pub(crate) fn topology_matches(
    t: &csi::Topology,
    node_segments: &BTreeMap<String, String>,
) -> bool {
    t.segments
        .iter()
        .all(|(k, v)| node_segments.get(k) == Some(v))
}

/// A volume path of NodeGetVolumeStats or NodeExpandVolume: required, and
/// NOT_FOUND (never touched) unless it is a clean absolute path, since no
/// volume can be published at anything else.
pub(crate) fn existing_volume_path(path: &str, what: &str) -> Result<PathBuf> {
    if path.is_empty() {
        return Err(invalid!("{what} is required"));
    }
    validate_path(path, what).map_err(|_| {
        Error::NotFound(format!(
            "no volume is published at {path:?} (not a clean absolute path)"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::csi::volume_capability::{AccessMode as WireMode, BlockVolume, MountVolume};

    /// A capability with the given access fields (both may be set: the
    /// wire allows it, the parser must refuse it).
    fn cap(block: bool, mount: Option<MountVolume>, mode: AccessMode) -> csi::VolumeCapability {
        csi::VolumeCapability {
            block: block.then_some(BlockVolume {}),
            mount,
            access_mode: Some(WireMode { mode: mode as i32 }),
        }
    }

    fn mount(fs: &str, flags: &[&str]) -> Option<MountVolume> {
        Some(MountVolume {
            fs_type: fs.into(),
            mount_flags: flags.iter().map(|s| s.to_string()).collect(),
            volume_mount_group: String::new(),
        })
    }

    #[test]
    fn capabilities() {
        let c = parse_capability(&cap(
            false,
            mount("", &["noatime"]),
            AccessMode::SingleNodeWriter,
        ));
        assert_eq!(
            c.unwrap().access,
            Access::Mount {
                fs: None,
                flags: vec!["noatime".into()]
            }
        );
        assert!(
            parse_capability(&cap(true, None, AccessMode::SingleNodeReaderOnly))
                .unwrap()
                .is_block()
        );
        for bad in [
            cap(false, None, AccessMode::SingleNodeWriter),
            cap(true, mount("", &[]), AccessMode::SingleNodeWriter),
            cap(true, mount("xfs", &[]), AccessMode::SingleNodeReaderOnly),
            cap(true, None, AccessMode::MultiNodeMultiWriter),
            cap(true, None, AccessMode::Unknown),
            cap(false, mount("ntfs", &[]), AccessMode::SingleNodeWriter),
            cap(false, mount("xfs", &["-o"]), AccessMode::SingleNodeWriter),
            cap(false, mount("xfs", &["a;b"]), AccessMode::SingleNodeWriter),
        ] {
            assert!(
                matches!(parse_capability(&bad), Err(Error::InvalidArgument(_))),
                "{bad:?}"
            );
        }
        assert!(parse_capabilities(&[]).is_err());
    }

    /// Both access types on the wire (what a oneof decoder would collapse
    /// into the last one) decode into both fields and are refused.
    #[test]
    fn both_access_types_on_the_wire_are_refused() {
        use prost::Message;
        // field 1 (block, empty message), field 2 (mount, empty message),
        // field 3 (access_mode { mode: SINGLE_NODE_WRITER })
        let wire = [0x0a, 0x00, 0x12, 0x00, 0x1a, 0x02, 0x08, 0x01];
        let decoded = csi::VolumeCapability::decode(&wire[..]).unwrap();
        assert!(decoded.block.is_some() && decoded.mount.is_some());
        let e = parse_capability(&decoded).unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
        assert!(e.to_string().contains("both block and mount"), "{e}");
    }

    #[test]
    fn names() {
        assert!(validate_name("pvc-1", "name").is_ok());
        assert!(validate_name(&"a".repeat(128), "name").is_ok());
        assert!(validate_name(&"a".repeat(129), "name").is_err());
        assert!(validate_name("", "name").is_err());
        assert!(validate_name("a\nb", "name").is_err());
    }

    #[test]
    fn paths() {
        assert_eq!(validate_path("/a/b/", "p").unwrap(), PathBuf::from("/a/b"));
        for bad in ["", "a/b", "/a/../b", "/a/./b", "/", "/a\0b"] {
            assert!(validate_path(bad, "p").is_err(), "{bad:?}");
        }
    }

    #[test]
    fn params() {
        let mut p = HashMap::new();
        p.insert("deviceClass".to_string(), "thin".to_string());
        p.insert("csi.storage.k8s.io/pvc/name".to_string(), "x".to_string());
        let out = storage_params(&p, &["deviceClass"], &[]).unwrap();
        assert_eq!(out.len(), 1);
        p.insert("devicClass".to_string(), "thin".to_string());
        assert!(storage_params(&p, &["deviceClass"], &[]).is_err());
        let mut p = HashMap::new();
        p.insert("deviceClass".to_string(), "--force".to_string());
        assert!(storage_params(&p, &["deviceClass"], &[]).is_err());
        p.insert("deviceClass".to_string(), "a;rm".to_string());
        assert!(storage_params(&p, &["deviceClass"], &[]).is_err());
        // a JSON parameter takes JSON (multi-line too), and only JSON
        let mut p = HashMap::new();
        p.insert("pools".to_string(), "[{\"a\": \"b\"},\n {}]".to_string());
        assert!(storage_params(&p, &["pools"], &[]).is_err());
        assert!(storage_params(&p, &["pools"], &["pools"]).is_ok());
        p.insert("pools".to_string(), "[{\"a\": ".to_string());
        let e = storage_params(&p, &["pools"], &["pools"]).unwrap_err();
        assert!(e.to_string().contains("must be JSON"), "{e}");
    }
}
