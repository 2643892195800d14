//! Names, ids and tags for LVM volumes. Identity lives in LVM: the LV name is
//! derived from the CSI request name, the LV's tags carry the request name
//! and a digest of the creation parameters, and the volume id says where the
//! LV is. Formats carry a version so they can change without ambiguity.

use std::collections::BTreeMap;

use uuid::Uuid;

/// Version prefix of volume ids.
pub const VOLUME_ID_VERSION: &str = "lvm1";
/// LV names are this prefix plus 32 hex digits.
pub const LV_PREFIX: &str = "lds-";

/// Tag on every LV Lodestone created for a volume.
pub const TAG_VOLUME: &str = "lodestone.v1.vol";
/// Tag prefix: hex of the CSI request name.
pub const TAG_NAME: &str = "lodestone.v1.name=";
/// Tag prefix: digest of the creation parameters.
pub const TAG_PARAMS: &str = "lodestone.v1.params=";

fn namespace() -> Uuid {
    Uuid::new_v5(&Uuid::NAMESPACE_DNS, b"lvm.lodestone.dev")
}

/// The 32-hex-digit key of a request name (UUID v5).
pub fn key_for_name(request_name: &str) -> String {
    Uuid::new_v5(&namespace(), request_name.as_bytes())
        .simple()
        .to_string()
}

pub fn lv_name(key: &str) -> String {
    format!("{LV_PREFIX}{key}")
}

/// `lvm1:<node>:<device class>:<key>`, at most 3+1+63+1+24+1+32 = 125 bytes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct VolumeId {
    pub node: String,
    pub class: String,
    pub key: String,
}

impl VolumeId {
    pub fn encode(&self) -> String {
        format!(
            "{VOLUME_ID_VERSION}:{}:{}:{}",
            self.node, self.class, self.key
        )
    }

    /// None for anything that is not a well-formed id of this version.
    pub fn parse(id: &str) -> Option<Self> {
        let mut parts = id.split(':');
        let (version, node, class, key) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() || version != VOLUME_ID_VERSION {
            return None;
        }
        crate::config::validate_node_id(node).ok()?;
        crate::config::validate_class_name(class).ok()?;
        if key.len() != 32
            || !key
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        {
            return None;
        }
        Some(VolumeId {
            node: node.into(),
            class: class.into(),
            key: key.into(),
        })
    }

    pub fn lv_name(&self) -> String {
        lv_name(&self.key)
    }
}

/// The key of an LV name of ours, if it is one.
pub fn key_of_lv(lv: &str) -> Option<&str> {
    let key = lv.strip_prefix(LV_PREFIX)?;
    (key.len() == 32 && key.bytes().all(|b| b.is_ascii_hexdigit())).then_some(key)
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
    let digest = Uuid::new_v5(&namespace(), canonical.as_bytes())
        .simple()
        .to_string();
    digest[..16].to_string()
}

/// Tags for a new volume LV.
pub fn volume_tags(request_name: &str, digest: &str) -> Vec<String> {
    vec![
        TAG_VOLUME.to_string(),
        format!("{TAG_NAME}{}", hex(request_name.as_bytes())),
        format!("{TAG_PARAMS}{digest}"),
    ]
}

/// The request name recorded in an LV's tags.
pub fn tagged_name(tags: &[String]) -> Option<String> {
    let hexed = tags.iter().find_map(|t| t.strip_prefix(TAG_NAME))?;
    String::from_utf8(unhex(hexed)?).ok()
}

pub fn tagged_digest(tags: &[String]) -> Option<&str> {
    tags.iter().find_map(|t| t.strip_prefix(TAG_PARAMS))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_fit_the_spec_limit() {
        let id = VolumeId {
            node: "n".repeat(63),
            class: "c".repeat(crate::config::MAX_CLASS_NAME_LEN),
            key: key_for_name("pvc-1"),
        };
        let s = id.encode();
        assert!(s.len() <= 128, "{} bytes", s.len());
        assert_eq!(VolumeId::parse(&s), Some(id));
    }

    #[test]
    fn rejects_malformed_ids() {
        let key = key_for_name("x");
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
            assert_eq!(VolumeId::parse(&bad), None, "{bad}");
        }
    }

    #[test]
    fn names_are_deterministic_and_distinct() {
        assert_eq!(key_for_name("a"), key_for_name("a"));
        assert_ne!(key_for_name("a"), key_for_name("b"));
        let lv = lv_name(&key_for_name("a"));
        assert_eq!(key_of_lv(&lv), Some(key_for_name("a").as_str()));
        assert_eq!(key_of_lv("home"), None);
    }

    #[test]
    fn tags_carry_name_and_digest() {
        let mut p = BTreeMap::new();
        p.insert("deviceClass".to_string(), "thin".to_string());
        let d = params_digest(&p);
        let tags = volume_tags("pvc/ü 1", &d);
        assert_eq!(tagged_name(&tags).as_deref(), Some("pvc/ü 1"));
        assert_eq!(tagged_digest(&tags), Some(d.as_str()));
        // Only LVM's tag characters.
        for t in &tags {
            assert!(t
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_+.-/=!:&#".contains(c)));
        }
        p.insert("deviceClass".to_string(), "thick".to_string());
        assert_ne!(params_digest(&p), d);
    }
}
