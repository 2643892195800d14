//! Names, ids and tags for LVM volumes and snapshots. Identity lives in LVM:
//! the LV name is derived from the CSI request name, the LV's tags carry the
//! request name, a digest of the creation parameters and where its data came
//! from, and the id says where the LV is. Formats carry a version so they can
//! change without ambiguity.

use std::collections::BTreeMap;

use uuid::Uuid;

/// Tag prefix: hex of the CSI request name.
pub const TAG_NAME: &str = "lodestone.v1.name=";
/// Tag prefix: digest of the creation parameters.
pub const TAG_PARAMS: &str = "lodestone.v1.params=";
/// Tag prefix: the origin of a snapshot, restore or clone (`v:` or `s:`,
/// then device class and key).
pub const TAG_SOURCE: &str = "lodestone.v1.src=";
/// Tag present while a full copy into the LV is incomplete.
pub const TAG_COPYING: &str = "lodestone.v1.copying";
/// Tag prefix: the size in bytes a restore or clone made as a thin snapshot
/// grows to right after it is created. An LV smaller than this was
/// interrupted between the two steps; the retry finishes the growth.
pub const TAG_SIZE: &str = "lodestone.v1.size=";
/// Tag on a copy target whose copy failed for good (its point in time is
/// lost): kept in LVM so that no later attempt, in this process or after a
/// restart, copies a later state under the old identity.
pub const TAG_COPY_FAILED: &str = "lodestone.v1.copyfailed";

/// What an LV of ours is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Volume,
    Snapshot,
}

impl Kind {
    /// Version prefix of ids of this kind.
    pub fn id_prefix(self) -> &'static str {
        match self {
            Kind::Volume => "lvm1",
            Kind::Snapshot => "lvs1",
        }
    }

    /// LV names are this prefix plus 32 hex digits.
    pub fn lv_prefix(self) -> &'static str {
        match self {
            Kind::Volume => "lds-",
            Kind::Snapshot => "ldsnap-",
        }
    }

    /// The tag every LV of this kind carries.
    pub fn tag(self) -> &'static str {
        match self {
            Kind::Volume => "lodestone.v1.vol",
            Kind::Snapshot => "lodestone.v1.snap",
        }
    }

    fn source_code(self) -> &'static str {
        match self {
            Kind::Volume => "v",
            Kind::Snapshot => "s",
        }
    }

    /// Volume and snapshot names live in separate namespaces.
    fn namespace(self) -> Uuid {
        let label: &[u8] = match self {
            Kind::Volume => b"lvm.lodestone.dev",
            Kind::Snapshot => b"snapshot.lvm.lodestone.dev",
        };
        Uuid::new_v5(&Uuid::NAMESPACE_DNS, label)
    }

    /// The 32-hex-digit key of a request name (UUID v5).
    pub fn key_for_name(self, request_name: &str) -> String {
        Uuid::new_v5(&self.namespace(), request_name.as_bytes())
            .simple()
            .to_string()
    }

    pub fn lv_name(self, key: &str) -> String {
        format!("{}{key}", self.lv_prefix())
    }

    /// The key of an LV name of this kind, if it is one.
    pub fn key_of_lv(self, lv: &str) -> Option<&str> {
        let key = lv.strip_prefix(self.lv_prefix())?;
        is_key(key).then_some(key)
    }
}

fn is_key(key: &str) -> bool {
    key.len() == 32
        && key
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Name prefix of the short-lived snapshots copies read from.
pub const TEMP_PREFIX: &str = "ldtmp-";

/// Name of the short-lived snapshot a copy reads from.
pub fn temp_lv_name(key: &str) -> String {
    format!("{TEMP_PREFIX}{key}")
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
        crate::config::validate_node_id(node).ok()?;
        crate::config::validate_class_name(class).ok()?;
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
        format!(
            "{TAG_SOURCE}{}:{}:{}",
            self.kind.source_code(),
            self.class,
            self.key
        )
    }
}

/// The origin recorded in an LV's tags, on `node`.
pub fn tagged_source(tags: &[String], node: &str) -> Option<LvId> {
    let value = tags.iter().find_map(|t| t.strip_prefix(TAG_SOURCE))?;
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

/// A short digest of the parameters that decide what a volume is; a retried
/// CreateVolume with the same name must present the same digest.
pub fn params_digest(params: &BTreeMap<String, String>) -> String {
    let canonical = serde_json::to_string(params).expect("string map serializes");
    let digest = Uuid::new_v5(&Kind::Volume.namespace(), canonical.as_bytes())
        .simple()
        .to_string();
    digest[..16].to_string()
}

/// Tags for a new LV of `kind`.
pub fn tags(
    kind: Kind,
    request_name: &str,
    digest: &str,
    source: Option<&LvId>,
    copying: bool,
) -> Vec<String> {
    let mut tags = vec![
        kind.tag().to_string(),
        format!("{TAG_NAME}{}", hex(request_name.as_bytes())),
        format!("{TAG_PARAMS}{digest}"),
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
    let hexed = tags.iter().find_map(|t| t.strip_prefix(TAG_NAME))?;
    String::from_utf8(unhex(hexed)?).ok()
}

pub fn tagged_digest(tags: &[String]) -> Option<&str> {
    tags.iter().find_map(|t| t.strip_prefix(TAG_PARAMS))
}

/// The size an LV is to grow to right after its creation, if it says so.
pub fn tagged_size(tags: &[String]) -> Option<u64> {
    tags.iter()
        .find_map(|t| t.strip_prefix(TAG_SIZE))
        .and_then(|v| v.parse().ok())
}

/// The tag recording the size an LV grows to after its creation.
pub fn size_tag(size: u64) -> String {
    format!("{TAG_SIZE}{size}")
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
                class: "c".repeat(crate::config::MAX_CLASS_NAME_LEN),
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
        assert_eq!(tagged_source(&tags, "n1"), Some(src));
        assert!(has_tag(&tags, TAG_COPYING) && has_tag(&tags, Kind::Volume.tag()));
        let mut grown = tags.clone();
        assert_eq!(tagged_size(&grown), None);
        grown.push(size_tag(3 << 30));
        assert_eq!(tagged_size(&grown), Some(3 << 30));
        // Only LVM's tag characters.
        for t in tags.iter().chain(&grown) {
            assert!(t
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_+.-/=!:&#".contains(c)));
        }
        p.insert("deviceClass".to_string(), "thick".to_string());
        assert_ne!(params_digest(&p), d);
    }
}
