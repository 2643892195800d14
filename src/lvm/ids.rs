//! LVM's side of identity (the shared rules and the idempotency protocol
//! are in [`crate::core::ids`]): its key space, the id format
//! (`lvm1:<node>:<device class>:<key>`, `lvs1:...` for snapshots) and the
//! LV tags that carry identity, each `<key>=<value>` (the request name in
//! hex: LVM allows few characters in tags). Formats carry a version so they
//! can change without ambiguity.

use std::collections::BTreeMap;

use crate::core::ids::{
    is_key, validate_class_name, validate_node_id, KeySpace, NAME_KEY, PARAMS_KEY,
};
pub use crate::core::ids::{temp_name as temp_lv_name, Kind, SOURCE_KEY, TEMP_PREFIX};

/// LVM's key namespaces.
pub const KEYS: KeySpace = KeySpace {
    volumes: "lvm.lodestone.dev",
    snapshots: "snapshot.lvm.lodestone.dev",
};

/// Tag key: the origin of a snapshot, restore or clone (`v:` or `s:`, then
/// device class and key).
const SOURCE_TAG: &str = "lodestone.v1.src";
/// Tag key: the size in bytes a restore or clone made as a thin snapshot
/// grows to right after it is created. An LV smaller than this was
/// interrupted between the two steps; the retry finishes the growth.
const SIZE_TAG: &str = "lodestone.v1.size";
/// Tag present while a full copy into the LV is incomplete.
pub const TAG_COPYING: &str = "lodestone.v1.copying";
/// Tag key: the node a cross-node copy reads its source from (a restore on
/// another node than its snapshot's). Without it, the source is on the
/// LV's own node.
const FROM_TAG: &str = "lodestone.v1.from";
/// Tag key: how far a cross-node copy got, in bytes of the source: below
/// this offset the target holds its final data (the checkpoint a resumed
/// copy starts from).
const COPIED_TAG: &str = "lodestone.v1.copied";
/// Tag on a copy target whose copy failed for good (its point in time is
/// lost): kept in LVM so that no later attempt, in this process or after a
/// restart, copies a later state under the old identity.
pub const TAG_COPY_FAILED: &str = "lodestone.v1.copyfailed";
/// Tag key on a hidden snapshot (the point in time a clone on another node
/// reads): `<target node>:<target volume key>`. Such a snapshot is no CSI
/// snapshot: it is never listed or found by id, and it goes when its clone
/// is complete or gone.
pub const FOR_TAG: &str = "lodestone.v1.for";

/// What LVM adds to a [`Kind`].
pub trait LvmKind: Copy {
    /// Version prefix of ids of this kind.
    fn id_prefix(self) -> &'static str;
    /// The tag every LV of this kind carries.
    fn tag(self) -> &'static str;
    /// The 32-hex-digit key of a request name, in LVM's key space.
    fn key_for_name(self, request_name: &str) -> String;
    /// The LV name of the key (`lds-<key>`, `ldsnap-<key>`).
    fn lv_name(self, key: &str) -> String;
    /// The key of an LV name of this kind, if it is one.
    fn key_of_lv(self, lv: &str) -> Option<&str>;
}

impl LvmKind for Kind {
    fn id_prefix(self) -> &'static str {
        match self {
            Kind::Volume => "lvm1",
            Kind::Snapshot => "lvs1",
        }
    }

    fn tag(self) -> &'static str {
        match self {
            Kind::Volume => "lodestone.v1.vol",
            Kind::Snapshot => "lodestone.v1.snap",
        }
    }

    fn key_for_name(self, request_name: &str) -> String {
        KEYS.key_for_name(self, request_name)
    }

    fn lv_name(self, key: &str) -> String {
        self.object_name(key)
    }

    fn key_of_lv(self, lv: &str) -> Option<&str> {
        self.key_of_name(lv)
    }
}

/// How a source tag names the kind of the origin.
fn source_code(kind: Kind) -> &'static str {
    match kind {
        Kind::Volume => "v",
        Kind::Snapshot => "s",
    }
}

/// The tag `<key>=<value>`.
fn tag(key: &str, value: &str) -> String {
    format!("{key}={value}")
}

/// The value of the first tag `<key>=<value>`.
fn tag_value<'a>(tags: &'a [String], key: &str) -> Option<&'a str> {
    tags.iter()
        .find_map(|t| t.strip_prefix(key)?.strip_prefix('='))
}

/// `<prefix>:<node>:<device class>:<key>`: at most 4+1+63+1+24+1+32 = 126 bytes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LvId {
    pub kind: Kind,
    pub node: String,
    pub class: String,
    pub key: String,
}

impl LvId {
    pub fn encode(&self) -> String {
        format!(
            "{}:{}:{}:{}",
            self.kind.id_prefix(),
            self.node,
            self.class,
            self.key
        )
    }

    /// None for anything that is not a well-formed id of this kind.
    pub fn parse(kind: Kind, id: &str) -> Option<Self> {
        let mut parts = id.split(':');
        let (prefix, node, class, key) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() || prefix != kind.id_prefix() || !is_key(key) {
            return None;
        }
        validate_node_id(node).ok()?;
        validate_class_name(class).ok()?;
        Some(LvId {
            kind,
            node: node.into(),
            class: class.into(),
            key: key.into(),
        })
    }

    pub fn lv_name(&self) -> String {
        self.kind.lv_name(&self.key)
    }

    /// The source tag naming this LV as an origin (node is implied: copies
    /// and snapshots always live on their origin's node).
    pub fn source_tag(&self) -> String {
        let value = format!("{}:{}:{}", source_code(self.kind), self.class, self.key);
        tag(SOURCE_TAG, &value)
    }
}

/// The origin recorded in an LV's tags: on `node`, the LV's own, unless the
/// LV was copied from another node.
pub fn tagged_source(tags: &[String], node: &str) -> Option<LvId> {
    let node = tagged_from(tags).unwrap_or(node);
    let value = tag_value(tags, SOURCE_TAG)?;
    let mut parts = value.split(':');
    let kind = match parts.next()? {
        "v" => Kind::Volume,
        "s" => Kind::Snapshot,
        _ => return None,
    };
    let (class, key) = (parts.next()?, parts.next()?);
    LvId::parse(kind, &format!("{}:{node}:{class}:{key}", kind.id_prefix()))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The params digest in LVM's key space (see [`KeySpace::params_digest`]).
pub fn params_digest(params: &BTreeMap<String, String>) -> String {
    KEYS.params_digest(params)
}

/// Tags for a new LV of `kind`.
/// Whether an LV is Lodestone's: a volume's or a snapshot's name that
/// carries its kind's tag.
pub fn is_own(lv: &crate::lvm::report::Lv) -> bool {
    [Kind::Volume, Kind::Snapshot]
        .into_iter()
        .any(|k| k.key_of_lv(&lv.name).is_some() && has_tag(&lv.tags, k.tag()))
}

pub fn tags(
    kind: Kind,
    request_name: &str,
    digest: &str,
    source: Option<&LvId>,
    copying: bool,
) -> Vec<String> {
    let mut tags = vec![
        kind.tag().to_string(),
        tag(NAME_KEY, &hex(request_name.as_bytes())),
        tag(PARAMS_KEY, digest),
    ];
    if let Some(s) = source {
        tags.push(s.source_tag());
    }
    if copying {
        tags.push(TAG_COPYING.to_string());
    }
    tags
}

/// The request name recorded in an LV's tags.
pub fn tagged_name(tags: &[String]) -> Option<String> {
    let hexed = tag_value(tags, NAME_KEY)?;
    String::from_utf8(unhex(hexed)?).ok()
}

pub fn tagged_digest(tags: &[String]) -> Option<&str> {
    tag_value(tags, PARAMS_KEY)
}

/// The size an LV is to grow to right after its creation, if it says so.
pub fn tagged_size(tags: &[String]) -> Option<u64> {
    tag_value(tags, SIZE_TAG).and_then(|v| v.parse().ok())
}

/// The tag recording the size an LV grows to after its creation.
pub fn size_tag(size: u64) -> String {
    tag(SIZE_TAG, &size.to_string())
}

/// The tag naming the node a cross-node copy reads from.
pub fn from_tag(node: &str) -> String {
    tag(FROM_TAG, node)
}

/// The node a cross-node copy reads from, if the LV is one.
pub fn tagged_from(tags: &[String]) -> Option<&str> {
    tag_value(tags, FROM_TAG)
}

/// The key of the hidden snapshot a clone on another node reads (see
/// [`FOR_TAG`]): derived from the clone's key in its own namespace, so no
/// request name ever maps to it.
pub fn hidden_source_key(volume_key: &str) -> String {
    let ns = uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_DNS, b"source.lvm.lodestone.dev");
    uuid::Uuid::new_v5(&ns, volume_key.as_bytes())
        .simple()
        .to_string()
}

/// The tag naming the clone a hidden snapshot is for.
pub fn for_tag(node: &str, volume_key: &str) -> String {
    tag(FOR_TAG, &format!("{node}:{volume_key}"))
}

/// (target node, target volume key) of a hidden snapshot; None for every
/// other LV.
pub fn tagged_for(tags: &[String]) -> Option<(&str, &str)> {
    tag_value(tags, FOR_TAG)?.split_once(':')
}

/// The checkpoint tag of a cross-node copy.
pub fn copied_tag(offset: u64) -> String {
    tag(COPIED_TAG, &offset.to_string())
}

/// How far a cross-node copy got (0 before its first checkpoint).
pub fn tagged_copied(tags: &[String]) -> u64 {
    tag_value(tags, COPIED_TAG)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Every checkpoint tag an LV carries (one, normally).
pub fn copied_tags(tags: &[String]) -> Vec<String> {
    tags.iter()
        .filter(|t| t.starts_with(COPIED_TAG) && t[COPIED_TAG.len()..].starts_with('='))
        .cloned()
        .collect()
}

pub fn has_tag(tags: &[String], tag: &str) -> bool {
    tags.iter().any(|t| t == tag)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_fit_the_spec_limit() {
        for kind in [Kind::Volume, Kind::Snapshot] {
            let id = LvId {
                kind,
                node: "n".repeat(63),
                class: "c".repeat(crate::core::ids::MAX_CLASS_NAME_LEN),
                key: kind.key_for_name("pvc-1"),
            };
            let s = id.encode();
            assert!(s.len() <= 128, "{} bytes", s.len());
            assert_eq!(LvId::parse(kind, &s), Some(id.clone()));
            let other = if kind == Kind::Volume {
                Kind::Snapshot
            } else {
                Kind::Volume
            };
            assert_eq!(LvId::parse(other, &s), None, "kinds never mix");
        }
    }

    #[test]
    fn rejects_malformed_ids() {
        let key = Kind::Volume.key_for_name("x");
        for bad in [
            String::new(),
            "garbage".to_string(),
            format!("lvm2:n:c:{key}"),
            format!("lvm1:n:c:{key}:extra"),
            format!("lvm1:n:C:{key}"),
            format!("lvm1:-n:c:{key}"),
            "lvm1:n:c:abc".to_string(),
            format!("lvm1:n:c:{}", key.to_uppercase()),
        ] {
            assert_eq!(LvId::parse(Kind::Volume, &bad), None, "{bad}");
        }
    }

    #[test]
    fn names_are_deterministic_and_distinct() {
        let v = Kind::Volume;
        assert_eq!(v.key_for_name("a"), v.key_for_name("a"));
        assert_ne!(v.key_for_name("a"), v.key_for_name("b"));
        assert_ne!(v.key_for_name("a"), Kind::Snapshot.key_for_name("a"));
        let lv = v.lv_name(&v.key_for_name("a"));
        assert_eq!(v.key_of_lv(&lv), Some(v.key_for_name("a").as_str()));
        assert_eq!(Kind::Snapshot.key_of_lv(&lv), None);
        assert_eq!(v.key_of_lv("home"), None);
    }

    #[test]
    fn tags_carry_name_digest_and_source() {
        let mut p = BTreeMap::new();
        p.insert("deviceClass".to_string(), "thin".to_string());
        let d = params_digest(&p);
        let src = LvId {
            kind: Kind::Snapshot,
            node: "n1".into(),
            class: "thin".into(),
            key: Kind::Snapshot.key_for_name("s"),
        };
        let tags = tags(Kind::Volume, "pvc/ü 1", &d, Some(&src), true);
        assert_eq!(tagged_name(&tags).as_deref(), Some("pvc/ü 1"));
        assert_eq!(tagged_digest(&tags), Some(d.as_str()));
        assert_eq!(tagged_source(&tags, "n1"), Some(src.clone()));
        assert!(has_tag(&tags, TAG_COPYING) && has_tag(&tags, Kind::Volume.tag()));
        let mut grown = tags.clone();
        assert_eq!(tagged_size(&grown), None);
        grown.push(size_tag(3 << 30));
        assert_eq!(tagged_size(&grown), Some(3 << 30));
        // A cross-node copy names its source's node, and its checkpoint.
        assert_eq!(tagged_copied(&grown), 0);
        grown.push(from_tag("node-b.example"));
        grown.push(copied_tag(64 << 20));
        let mut moved = src.clone();
        moved.node = "node-b.example".into();
        assert_eq!(tagged_source(&grown, "n1"), Some(moved));
        assert_eq!(tagged_copied(&grown), 64 << 20);
        assert_eq!(copied_tags(&grown), vec![copied_tag(64 << 20)]);
        // Only LVM's tag characters.
        for t in tags.iter().chain(&grown) {
            assert!(t
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_+.-/=!:&#".contains(c)));
        }
        p.insert("deviceClass".to_string(), "thick".to_string());
        assert_ne!(params_digest(&p), d);
    }

    #[test]
    fn a_hidden_source_has_its_own_key_and_names_its_clone() {
        let key = Kind::Volume.key_for_name("pvc-1");
        let hidden = hidden_source_key(&key);
        assert!(is_key(&hidden));
        assert_eq!(hidden, hidden_source_key(&key), "deterministic");
        assert_ne!(hidden, Kind::Snapshot.key_for_name(&key));
        assert_ne!(
            hidden,
            hidden_source_key(&Kind::Volume.key_for_name("pvc-2"))
        );
        let tags = vec![Kind::Snapshot.tag().to_string(), for_tag("node-b.x", &key)];
        assert_eq!(tagged_for(&tags), Some(("node-b.x", key.as_str())));
        assert_eq!(tagged_for(&tags[..1]), None);
        assert_eq!(
            hidden_source_key("68895271c1c95cddb5fabda9f84e4b8e"),
            "579c1bcf2e8d55228a43af253d377ebf"
        );
    }

    /// What is in LVM stays readable: keys, digests and tags of existing
    /// LVs are fixed byte for byte.
    #[test]
    fn on_disk_formats_are_fixed() {
        assert_eq!(
            Kind::Volume.key_for_name("pvc-1"),
            "68895271c1c95cddb5fabda9f84e4b8e"
        );
        assert_eq!(
            Kind::Snapshot.key_for_name("pvc-1"),
            "883e29a3836d5eb9aeef91f6c19bc359"
        );
        let p: BTreeMap<String, String> = [
            ("deviceClass".to_string(), "thin".to_string()),
            (SOURCE_KEY.to_string(), "x".to_string()),
        ]
        .into();
        assert_eq!(params_digest(&p), "647250ec22455b22");
        let key = Kind::Snapshot.key_for_name("s");
        let src = LvId {
            kind: Kind::Snapshot,
            node: "n1".into(),
            class: "thin".into(),
            key: key.clone(),
        };
        assert_eq!(
            tags(Kind::Volume, "a/b", "0123", Some(&src), true),
            [
                "lodestone.v1.vol".to_string(),
                "lodestone.v1.name=612f62".to_string(),
                "lodestone.v1.params=0123".to_string(),
                format!("lodestone.v1.src=s:thin:{key}"),
                "lodestone.v1.copying".to_string(),
            ]
        );
        assert_eq!(size_tag(1024), "lodestone.v1.size=1024");
        assert_eq!(Kind::Snapshot.tag(), "lodestone.v1.snap");
        assert_eq!(src.encode(), format!("lvs1:n1:thin:{key}"));
        assert_eq!(src.lv_name(), format!("ldsnap-{key}"));
        assert_eq!(temp_lv_name(&key), format!("ldtmp-{key}"));
        for t in tags(Kind::Snapshot, "x", "d", Some(&src), true) {
            assert!(t.starts_with(crate::core::ids::KEY_PREFIX), "{t}");
        }
    }
}
