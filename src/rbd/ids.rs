//! RBD volume and snapshot identity. Ids are versioned and short:
//! `rbd1:<clusterID>:<poolID>:<key>` for volumes, `rbds1:...` for
//! snapshots; the key (32 hex digits, a UUID v5 of the request name) also
//! names the image (`lds-<key>`, `ldsnap-<key>`), so a retried request
//! finds what an earlier attempt made. Image metadata holds the request
//! name, a digest of the parameters and the source.

use std::collections::BTreeMap;

use uuid::Uuid;

/// What every metadata key of ours starts with.
pub const META_PREFIX: &str = "lodestone.v1.";
pub const META_NAME: &str = "lodestone.v1.name";
pub const META_PARAMS: &str = "lodestone.v1.params";
pub const META_SOURCE: &str = "lodestone.v1.source";
/// On a hidden snapshot image: the CSI snapshot's creation time.
pub const META_CREATED: &str = "lodestone.v1.created";
/// The snapshot of a hidden snapshot image that CSI restores from.
pub const SNAP_NAME: &str = "csi";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Volume,
    Snapshot,
}

impl Kind {
    fn id_prefix(self) -> &'static str {
        match self {
            Kind::Volume => "rbd1",
            Kind::Snapshot => "rbds1",
        }
    }

    pub fn image_prefix(self) -> &'static str {
        match self {
            Kind::Volume => "lds-",
            Kind::Snapshot => "ldsnap-",
        }
    }

    fn namespace(self) -> Uuid {
        let label: &[u8] = match self {
            Kind::Volume => b"volume.rbd.lodestone.dev",
            Kind::Snapshot => b"snapshot.rbd.lodestone.dev",
        };
        Uuid::new_v5(&Uuid::NAMESPACE_DNS, label)
    }

    pub fn key_for_name(self, request_name: &str) -> String {
        Uuid::new_v5(&self.namespace(), request_name.as_bytes())
            .simple()
            .to_string()
    }

    /// The key of an image name of this kind, if it is one.
    pub fn key_of_image(self, image: &str) -> Option<&str> {
        image
            .strip_prefix(self.image_prefix())
            .filter(|k| is_key(k))
    }
}

fn is_key(s: &str) -> bool {
    s.len() == 32
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RbdId {
    pub kind: Kind,
    pub cluster: String,
    pub pool_id: i64,
    pub key: String,
}

impl RbdId {
    pub fn image(&self) -> String {
        format!("{}{}", self.kind.image_prefix(), self.key)
    }

    pub fn encode(&self) -> String {
        format!(
            "{}:{}:{}:{}",
            self.kind.id_prefix(),
            self.cluster,
            self.pool_id,
            self.key
        )
    }

    /// None for anything that is not a well-formed id of this kind.
    pub fn parse(kind: Kind, id: &str) -> Option<RbdId> {
        let mut parts = id.split(':');
        let (prefix, cluster, pool, key) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() || prefix != kind.id_prefix() || !is_key(key) {
            return None;
        }
        let pool_id: i64 = pool.parse().ok().filter(|p| *p >= 0)?;
        if pool != pool_id.to_string()
            || cluster.is_empty()
            || cluster.len() > crate::rbd::config::MAX_CLUSTER_ID_LEN
        {
            return None;
        }
        Some(RbdId {
            kind,
            cluster: cluster.to_string(),
            pool_id,
            key: key.to_string(),
        })
    }
}

/// A short digest of the parameters that shape a volume or snapshot.
pub fn params_digest(params: &BTreeMap<String, String>) -> String {
    let canonical = serde_json::to_string(params).expect("string map serializes");
    Uuid::new_v5(&Kind::Volume.namespace(), canonical.as_bytes())
        .simple()
        .to_string()[..16]
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_reject_garbage() {
        let key = Kind::Volume.key_for_name("pvc-1");
        let id = RbdId {
            kind: Kind::Volume,
            cluster: "ceph-a".into(),
            pool_id: 3,
            key: key.clone(),
        };
        let s = id.encode();
        assert!(s.len() < 128);
        assert_eq!(RbdId::parse(Kind::Volume, &s), Some(id.clone()));
        assert_eq!(RbdId::parse(Kind::Snapshot, &s), None);
        assert_eq!(id.image(), format!("lds-{key}"));
        assert_eq!(Kind::Volume.key_of_image(&id.image()), Some(key.as_str()));
        assert_ne!(Kind::Snapshot.key_for_name("pvc-1"), key);
        for bad in [
            "",
            "rbd1:c:1",
            "rbd1:c:-1:0123456789abcdef0123456789abcdef",
            "rbd1:c:01:0123456789abcdef0123456789abcdef",
            "rbd1::1:0123456789abcdef0123456789abcdef",
            "rbd1:c:1:0123456789ABCDEF0123456789abcdef",
            "rbd1:c:1:0123456789abcdef0123456789abcdef:x",
        ] {
            assert_eq!(RbdId::parse(Kind::Volume, bad), None, "{bad}");
        }
    }
}
