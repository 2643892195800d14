//! Identity rules both backends share, and the idempotency protocol they
//! follow.
//!
//! A CSI create may be retried at any time: after a timeout, after the
//! driver died halfway, or by a different controller process. No state of
//! ours lives outside the backend, so a retry must recognize the first
//! attempt's work from the backend alone:
//!
//! * **The request-name key.** The request name maps to a key, 32 hex digits
//!   (a UUID v5 of the name in a [`KeySpace`] of the backend and the kind),
//!   and the key names the object: `lds-<key>` for a volume, `ldsnap-<key>`
//!   for a snapshot (an LV on LVM, an image on RBD). A retry computes the
//!   same name and looks there first; LVM looks for it in every device class
//!   of every node. A short-lived helper object of a copy or clone is named
//!   `ldtmp-<key>` after the same key.
//! * **What the object records.** The request name itself (keys are
//!   hashes: a different name with the same object name is someone else's),
//!   and the [params digest](KeySpace::params_digest) of the StorageClass or
//!   VolumeSnapshotClass parameters, with the source's id added under
//!   [`SOURCE_KEY`] for a restore, clone or snapshot; and the source itself.
//!   LVM keeps these in the LV's tags, RBD in the image's metadata, both
//!   under [`KEY_PREFIX`].
//! * **A retry that finds the object** checks the recorded request name
//!   (another name: ALREADY_EXISTS) and digest (other parameters or another
//!   source: ALREADY_EXISTS), then that the size fits the requested range,
//!   and answers with what is there, finishing any step the first attempt
//!   did not get to.
//!
//! What is written first and what last:
//!
//! * **LVM, a new or thin-snapshot LV.** One `lvcreate` makes the LV with
//!   all its tags (kind, request name, digest, source), so an LV of ours
//!   never exists untagged. A restore or clone into a larger size is a thin
//!   snapshot at the source's size plus a tag with the size it is to have,
//!   grown next: a crash in between leaves an LV smaller than its size tag,
//!   and the retry grows it.
//! * **LVM, a full copy** (thick classes, other device classes). A live
//!   source is cut first (the snapshot `ldtmp-<key>`), then the target is
//!   created with all its tags plus `copying`, the blocks are copied, and
//!   `copying` is removed last; the cut goes after that. A crash leaves a
//!   target still tagged `copying`: the retry (and the agent when it starts)
//!   resumes the copy from the cut; until it is done a volume's create
//!   answers ABORTED and a snapshot is reported not ready. A cut no copy
//!   needs any more (its target complete or never made) is removed by the
//!   agent when it starts.
//! * **RBD, a new volume.** The image is created first and its metadata
//!   (request name, digest, source, topology) written last, in one OSD
//!   operation. A crash in between leaves an image under the right name
//!   without our metadata (or, for a clone, with only the metadata it
//!   inherited from its parent, whose name has another key): the retry
//!   takes it as its own (the name came from this request's key), grows it
//!   if it is smaller than asked, and writes the metadata. An image whose
//!   metadata names this request with another digest is refused.
//! * **RBD, a restore or clone.** A clone of a volume goes through a
//!   snapshot `ldtmp-<key>` of the source taken first; then the clone, its
//!   growth, its flattening when the copy crosses pools or the chain is too
//!   deep, the metadata, and last the removal of that snapshot. Every step
//!   tolerates finding its work done, so a retry redoes whatever is missing.
//! * **RBD, a snapshot.** A hidden clone `ldsnap-<key>` of the source (via
//!   `ldtmp-<key>`), then its metadata (with the creation time), then its
//!   own snapshot `csi`, last: a hidden image without `csi` is an attempt
//!   that did not finish, and the retry completes it; the source's
//!   `ldtmp-<key>` is removed after.
//!
//! A retry with the same name but a different kind never meets the first
//! attempt's object: volumes and snapshots live in separate key spaces and
//! under separate name prefixes.

use std::collections::BTreeMap;

use uuid::Uuid;

/// What every tag or metadata key of ours starts with; the version changes
/// if a format ever does.
#[allow(unreachable_pub)] // re-exported by the rbd backend
#[cfg_attr(not(feature = "rbd"), allow(dead_code))]
pub const KEY_PREFIX: &str = "lodestone.v1.";
/// Records the CSI request name (an LVM tag key, an RBD metadata key).
#[allow(unreachable_pub)] // re-exported by the rbd backend
pub const NAME_KEY: &str = "lodestone.v1.name";
/// Records the params digest (an LVM tag key, an RBD metadata key).
#[allow(unreachable_pub)] // re-exported by the rbd backend
pub const PARAMS_KEY: &str = "lodestone.v1.params";
/// Key under which the source's id enters the parameters that are digested.
pub const SOURCE_KEY: &str = "lodestone/source";
/// Name prefix of the short-lived helper objects of copies and clones.
pub const TEMP_PREFIX: &str = "ldtmp-";

/// Topology key every Lodestone LVM node reports; its value is the node id.
pub const TOPOLOGY_NODE_KEY: &str = "topology.lodestone.dev/node";
/// Longest node id we accept: a Kubernetes label value (the topology value).
pub const MAX_NODE_ID_LEN: usize = 63;
/// Longest device class name (keeps every volume id under 128 bytes).
pub const MAX_CLASS_NAME_LEN: usize = 24;

/// What an object of ours is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Volume,
    Snapshot,
}

impl Kind {
    /// Objects of this kind are named this prefix plus their key.
    pub fn name_prefix(self) -> &'static str {
        match self {
            Kind::Volume => "lds-",
            Kind::Snapshot => "ldsnap-",
        }
    }

    /// The name of the object of this kind with this key.
    pub fn object_name(self, key: &str) -> String {
        format!("{}{key}", self.name_prefix())
    }

    /// The key of an object name of this kind, if it is one.
    pub fn key_of_name(self, name: &str) -> Option<&str> {
        name.strip_prefix(self.name_prefix()).filter(|k| is_key(k))
    }
}

/// Whether `s` is a key: 32 lowercase hex digits.
pub(crate) fn is_key(s: &str) -> bool {
    s.len() == 32
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The name of the short-lived helper object of the create with this key.
pub fn temp_name(key: &str) -> String {
    format!("{TEMP_PREFIX}{key}")
}

/// The UUID v5 namespaces one backend derives its keys in, by kind. They are
/// fixed forever: another namespace would give every existing volume another
/// name.
#[derive(Debug, Clone, Copy)]
pub struct KeySpace {
    /// DNS name the volume namespace is derived from.
    pub volumes: &'static str,
    /// DNS name the snapshot namespace is derived from.
    pub snapshots: &'static str,
}

impl KeySpace {
    fn namespace(&self, kind: Kind) -> Uuid {
        let label = match kind {
            Kind::Volume => self.volumes,
            Kind::Snapshot => self.snapshots,
        };
        Uuid::new_v5(&Uuid::NAMESPACE_DNS, label.as_bytes())
    }

    /// The 32-hex-digit key of a request name (UUID v5).
    pub fn key_for_name(&self, kind: Kind, request_name: &str) -> String {
        Uuid::new_v5(&self.namespace(kind), request_name.as_bytes())
            .simple()
            .to_string()
    }

    /// A short digest of the parameters that decide what a volume or
    /// snapshot is (with the source under [`SOURCE_KEY`]); a retried create
    /// with the same name must present the same digest.
    pub fn params_digest(&self, params: &BTreeMap<String, String>) -> String {
        let canonical = serde_json::to_string(params).expect("string map serializes");
        let digest = Uuid::new_v5(&self.namespace(Kind::Volume), canonical.as_bytes())
            .simple()
            .to_string();
        digest[..16].to_string()
    }
}

/// A node id: a Kubernetes label value (it is the value of the node's
/// topology label) of at most [`MAX_NODE_ID_LEN`] characters.
pub fn validate_node_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > MAX_NODE_ID_LEN {
        return Err(format!(
            "node id {id:?} must be 1 to {MAX_NODE_ID_LEN} characters (it is the value of \
             the {TOPOLOGY_NODE_KEY} topology label); set --node-id"
        ));
    }
    let ok_chars = id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    let ends_ok = id.starts_with(|c: char| c.is_ascii_alphanumeric())
        && id.ends_with(|c: char| c.is_ascii_alphanumeric());
    if !ok_chars || !ends_ok {
        return Err(format!(
            "node id {id:?} is not a valid Kubernetes label value (letters, digits, '-', '_', \
             '.', starting and ending with a letter or digit); set --node-id"
        ));
    }
    Ok(())
}

/// A device class name: it is part of every LVM volume id.
pub fn validate_class_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= MAX_CLASS_NAME_LEN
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "device class name {name:?} must be 1 to {MAX_CLASS_NAME_LEN} lowercase letters, \
             digits or '-', not starting or ending with '-'"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPACE: KeySpace = KeySpace {
        volumes: "v.example",
        snapshots: "s.example",
    };

    #[test]
    fn keys_are_deterministic_and_kinds_apart() {
        let v = SPACE.key_for_name(Kind::Volume, "a");
        assert_eq!(v, SPACE.key_for_name(Kind::Volume, "a"));
        assert!(is_key(&v));
        assert_ne!(v, SPACE.key_for_name(Kind::Volume, "b"));
        assert_ne!(v, SPACE.key_for_name(Kind::Snapshot, "a"));
        let name = Kind::Volume.object_name(&v);
        assert_eq!(name, format!("lds-{v}"));
        assert_eq!(Kind::Volume.key_of_name(&name), Some(v.as_str()));
        assert_eq!(Kind::Snapshot.key_of_name(&name), None);
        assert_eq!(Kind::Volume.key_of_name("lds-abc"), None);
        assert_eq!(temp_name(&v), format!("ldtmp-{v}"));
    }

    #[test]
    fn digest_follows_every_parameter() {
        let mut p = BTreeMap::new();
        p.insert("a".to_string(), "1".to_string());
        let d = SPACE.params_digest(&p);
        assert_eq!(d.len(), 16);
        assert_eq!(d, SPACE.params_digest(&p.clone()));
        p.insert(SOURCE_KEY.to_string(), "x".to_string());
        assert_ne!(SPACE.params_digest(&p), d);
    }

    #[test]
    fn validates_class_names() {
        assert!(validate_class_name("thin-1").is_ok());
        assert!(validate_class_name(&"c".repeat(MAX_CLASS_NAME_LEN)).is_ok());
        for bad in [
            "",
            "-a",
            "a-",
            "A",
            "a:b",
            &"c".repeat(MAX_CLASS_NAME_LEN + 1),
        ] {
            assert!(validate_class_name(bad).is_err(), "{bad:?}");
        }
    }
}
