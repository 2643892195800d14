//! RBD's side of identity (the shared rules and the idempotency protocol
//! are in [`crate::core::ids`]): its key space, the id format (versioned and
//! short: `rbd1:<clusterID>:<poolID>:<key>` for volumes, `rbds1:...` for
//! snapshots), image names (`lds-<key>`, `ldsnap-<key>`) and the image
//! metadata keys that carry identity.

use std::collections::BTreeMap;

use crate::core::ids::{is_key, KeySpace};
pub(crate) use crate::core::ids::{
    temp_name, Kind, KEY_PREFIX as META_PREFIX, NAME_KEY as META_NAME, PARAMS_KEY as META_PARAMS,
    SOURCE_KEY,
};

/// RBD's key namespaces.
pub(crate) const KEYS: KeySpace = KeySpace {
    volumes: "volume.rbd.lodestone.dev",
    snapshots: "snapshot.rbd.lodestone.dev",
};

/// Metadata key: the id of the volume or snapshot an image was made from.
pub(crate) const META_SOURCE: &str = "lodestone.v1.source";
/// On a hidden snapshot image: the CSI snapshot's creation time.
pub(crate) const META_CREATED: &str = "lodestone.v1.created";
/// The snapshot of a hidden snapshot image that CSI restores from.
pub(crate) const SNAP_NAME: &str = "csi";

/// What RBD adds to a [`Kind`].
pub(crate) trait RbdKind: Copy {
    /// The 32-hex-digit key of a request name, in RBD's key space.
    fn key_for_name(self, request_name: &str) -> String;
    /// The key of an image name of this kind, if it is one.
    fn key_of_image(self, image: &str) -> Option<&str>;
}

impl RbdKind for Kind {
    fn key_for_name(self, request_name: &str) -> String {
        KEYS.key_for_name(self, request_name)
    }

    fn key_of_image(self, image: &str) -> Option<&str> {
        self.key_of_name(image)
    }
}

fn id_prefix(kind: Kind) -> &'static str {
    match kind {
        Kind::Volume => "rbd1",
        Kind::Snapshot => "rbds1",
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RbdId {
    pub kind: Kind,
    pub cluster: String,
    pub pool_id: i64,
    pub key: String,
}

impl RbdId {
    pub(crate) fn image(&self) -> String {
        self.kind.object_name(&self.key)
    }

    pub(crate) fn encode(&self) -> String {
        format!(
            "{}:{}:{}:{}",
            id_prefix(self.kind),
            self.cluster,
            self.pool_id,
            self.key
        )
    }

    /// None for anything that is not a well-formed id of this kind.
    pub(crate) fn parse(kind: Kind, id: &str) -> Option<RbdId> {
        let mut parts = id.split(':');
        let (prefix, cluster, pool, key) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() || prefix != id_prefix(kind) || !is_key(key) {
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

/// The params digest in RBD's key space (see [`KeySpace::params_digest`]).
pub(crate) fn params_digest(params: &BTreeMap<String, String>) -> String {
    KEYS.params_digest(params)
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

    /// What is in Ceph stays readable: keys and digests of existing images
    /// are fixed byte for byte.
    #[test]
    fn on_disk_formats_are_fixed() {
        let key = Kind::Volume.key_for_name("pvc-1");
        assert_eq!(key, "7866faa9aeb25d688fdc741900eab627");
        assert_eq!(
            Kind::Snapshot.key_for_name("pvc-1"),
            "98321005e322529d9cc60544bab0932e"
        );
        let p: BTreeMap<String, String> = [
            ("clusterID".to_string(), "c".to_string()),
            ("pool".to_string(), "rbd".to_string()),
        ]
        .into();
        assert_eq!(params_digest(&p), "449a8a276a425188");
        let id = RbdId {
            kind: Kind::Snapshot,
            cluster: "c".into(),
            pool_id: 2,
            key: key.clone(),
        };
        assert_eq!(id.encode(), format!("rbds1:c:2:{key}"));
        assert_eq!(id.image(), format!("ldsnap-{key}"));
        assert_eq!(temp_name(&key), format!("ldtmp-{key}"));
        assert_eq!(
            [
                META_PREFIX,
                META_NAME,
                META_PARAMS,
                META_SOURCE,
                META_CREATED
            ],
            [
                "lodestone.v1.",
                "lodestone.v1.name",
                "lodestone.v1.params",
                "lodestone.v1.source",
                "lodestone.v1.created"
            ]
        );
    }
}
