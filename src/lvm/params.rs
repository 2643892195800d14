//! The StorageClass parameters of LVM volumes, parsed once into a typed
//! struct. The driver's generic gate (`core::request::storage_params`)
//! refuses unknown keys and unsafe values first; this says what the known
//! ones mean.

use std::collections::BTreeMap;

use crate::core::ids::SOURCE_KEY;
use crate::error::{Error, Result};

/// The device class to create the volume in (default: the configured
/// default class, or the source's class for a restore or clone).
pub(crate) const PARAM_DEVICE_CLASS: &str = "deviceClass";
/// Every StorageClass parameter LVM volumes take.
pub(crate) const PARAMETER_KEYS: &[&str] = &[PARAM_DEVICE_CLASS];

/// What a StorageClass asks of an LVM volume.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct LvmParams {
    /// The device class named, if any.
    pub device_class: Option<String>,
}

impl LvmParams {
    /// The parameters as the gate passed them. A key the gate should have
    /// refused is refused here too, in the gate's words.
    pub(crate) fn parse(params: &BTreeMap<String, String>) -> Result<Self> {
        let mut out = LvmParams::default();
        for (k, v) in params {
            match k.as_str() {
                PARAM_DEVICE_CLASS => out.device_class = Some(v.clone()),
                _ => {
                    return Err(Error::InvalidArgument(format!(
                        "unknown parameter {k:?}; supported parameters: {}",
                        PARAMETER_KEYS.join(", ")
                    )))
                }
            }
        }
        Ok(out)
    }

    /// What a volume's parameter digest is made of: the class it went to
    /// (named or not) and its source, if any. The same map as volumes made
    /// by earlier versions, so a retry across an upgrade finds its volume.
    pub(crate) fn digest_input(class: &str, source: Option<&str>) -> BTreeMap<String, String> {
        let mut map = BTreeMap::new();
        map.insert(PARAM_DEVICE_CLASS.to_string(), class.to_string());
        if let Some(source) = source {
            map.insert(SOURCE_KEY.to_string(), source.to_string());
        }
        map
    }

    /// A snapshot's digest: its source volume only (snapshots take no
    /// parameters).
    pub(crate) fn snapshot_digest_input(source: &str) -> BTreeMap<String, String> {
        [(SOURCE_KEY.to_string(), source.to_string())].into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn parses_known_keys_and_refuses_others() {
        assert_eq!(LvmParams::parse(&map(&[])).unwrap(), LvmParams::default());
        let p = LvmParams::parse(&map(&[("deviceClass", "thick")])).unwrap();
        assert_eq!(p.device_class.as_deref(), Some("thick"));
        let e = LvmParams::parse(&map(&[("deviceclass", "thick")])).unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");
        assert!(e.to_string().contains("deviceClass"), "{e}");
    }

    /// The digest input is what earlier versions hashed (the request's
    /// parameters with the class filled in, plus the source): changing it
    /// would make a retried request look like a different one.
    #[test]
    fn digest_input_is_unchanged() {
        assert_eq!(
            LvmParams::digest_input("thin", None),
            map(&[("deviceClass", "thin")])
        );
        assert_eq!(
            LvmParams::digest_input("thin", Some("v1")),
            map(&[("deviceClass", "thin"), ("lodestone/source", "v1")])
        );
        assert_eq!(
            LvmParams::snapshot_digest_input("v1"),
            map(&[("lodestone/source", "v1")])
        );
    }
}
