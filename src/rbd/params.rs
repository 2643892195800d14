//! RBD StorageClass and VolumeSnapshotClass parameters, checked and parsed
//! once into types the controller works with.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::csi;
use crate::error::{Error, Result};
use crate::rbd::client::DEFAULT_FEATURES;
use crate::rbd::ffi;

pub(crate) const P_CLUSTER: &str = "clusterID";
pub(crate) const P_POOL: &str = "pool";
pub(crate) const P_DATA_POOL: &str = "dataPool";
pub(crate) const P_FEATURES: &str = "imageFeatures";
pub(crate) const P_MKFS_OPTIONS: &str = "mkfsOptions";
pub(crate) const P_MOUNTER: &str = "mounter";
pub(crate) const P_TOPOLOGY_POOLS: &str = "topologyConstrainedPools";

/// The StorageClass parameters the RBD driver knows.
pub(crate) const PARAMETER_KEYS: &[&str] = &[
    P_CLUSTER,
    P_POOL,
    P_DATA_POOL,
    P_FEATURES,
    P_MKFS_OPTIONS,
    P_MOUNTER,
    P_TOPOLOGY_POOLS,
];
/// The VolumeSnapshotClass parameters the RBD driver knows.
pub(crate) const SNAPSHOT_PARAMETER_KEYS: &[&str] = &[P_CLUSTER];
/// Parameters whose values are JSON.
pub(crate) const JSON_PARAMETER_KEYS: &[&str] = &[P_TOPOLOGY_POOLS];

/// A StorageClass's parameters for a new volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RbdParams {
    /// `clusterID` (required).
    pub cluster_id: String,
    /// `pool`, `dataPool`, `topologyConstrainedPools`.
    pub pools: Pools,
    /// `imageFeatures` as librbd feature bits.
    pub features: u64,
    /// `mounter`, when given.
    pub mounter: Option<Mounter>,
    /// `mkfsOptions`, when given (checked, passed to the node as is).
    pub mkfs_options: Option<String>,
}

impl RbdParams {
    pub(crate) fn parse(params: &BTreeMap<String, String>) -> Result<RbdParams> {
        let cluster_id = cluster_id(params)?.clone();
        let features = features(params.get(P_FEATURES))?;
        let mounter = params
            .get(P_MOUNTER)
            .map(|m| Mounter::parse(m))
            .transpose()?;
        let mkfs_options = params.get(P_MKFS_OPTIONS).cloned();
        if let Some(o) = &mkfs_options {
            crate::host::fs::mkfs_options(o)?;
        }
        Ok(RbdParams {
            cluster_id,
            pools: Pools::parse(params)?,
            features,
            mounter,
            mkfs_options,
        })
    }
}

/// `clusterID`, required.
pub(crate) fn cluster_id(params: &BTreeMap<String, String>) -> Result<&String> {
    params.get(P_CLUSTER).ok_or_else(|| {
        Error::InvalidArgument(format!("StorageClass parameter {P_CLUSTER} is required"))
    })
}

/// GetCapacity's parameters: a StorageClass's cluster and pools, or none
/// at all (then every configured cluster counts).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CapacityParams {
    pub cluster_id: String,
    pub pools: Pools,
}

impl CapacityParams {
    /// None when no `clusterID` is given.
    pub(crate) fn parse(params: &BTreeMap<String, String>) -> Result<Option<CapacityParams>> {
        let Some(cluster_id) = params.get(P_CLUSTER) else {
            return Ok(None);
        };
        Ok(Some(CapacityParams {
            cluster_id: cluster_id.clone(),
            pools: Pools::parse(params)?,
        }))
    }
}

/// A VolumeSnapshotClass's parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SnapshotParams {
    /// `clusterID`: when given, it must be the source volume's.
    pub cluster_id: Option<String>,
}

impl SnapshotParams {
    pub(crate) fn parse(params: &BTreeMap<String, String>) -> SnapshotParams {
        SnapshotParams {
            cluster_id: params.get(P_CLUSTER).cloned(),
        }
    }
}

/// How nodes map images.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mounter {
    Krbd,
}

impl Mounter {
    fn parse(m: &str) -> Result<Mounter> {
        match m {
            "krbd" => Ok(Mounter::Krbd),
            "rbd-nbd" => Err(Error::InvalidArgument(format!(
                "{P_MOUNTER} rbd-nbd is not offered: its daemon would die with a restarted \
                 node plugin and break the node's mounted volumes; use krbd"
            ))),
            m => Err(Error::InvalidArgument(format!(
                "{P_MOUNTER} must be krbd, not {m:?}"
            ))),
        }
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Mounter::Krbd => "krbd",
        }
    }
}

/// The pools a StorageClass offers new volumes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Pools {
    pub choice: PoolChoice,
    /// `dataPool`: where image data goes (a constrained pool may name its own).
    pub data_pool: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PoolChoice {
    /// `pool` alone: volumes reachable from every node.
    Plain(String),
    /// `topologyConstrainedPools` (never empty, each pool with its domain
    /// segments), and `pool` for requests that ask for no topology.
    Constrained {
        pools: Vec<ConstrainedPool>,
        default: Option<String>,
    },
}

impl Pools {
    pub(crate) fn parse(params: &BTreeMap<String, String>) -> Result<Pools> {
        let data_pool = params.get(P_DATA_POOL).cloned();
        let Some(spec) = params.get(P_TOPOLOGY_POOLS) else {
            let pool = params.get(P_POOL).ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "StorageClass parameter {P_POOL} (or {P_TOPOLOGY_POOLS}) is required"
                ))
            })?;
            return Ok(Pools {
                choice: PoolChoice::Plain(pool.clone()),
                data_pool,
            });
        };
        let pools: Vec<ConstrainedPool> = serde_json::from_str(spec)
            .map_err(|e| Error::InvalidArgument(format!("{P_TOPOLOGY_POOLS}: {e}")))?;
        if pools.is_empty() || pools.iter().any(|p| p.domain_segments.is_empty()) {
            return Err(Error::InvalidArgument(format!(
                "{P_TOPOLOGY_POOLS}: list at least one pool, each with domainSegments"
            )));
        }
        Ok(Pools {
            choice: PoolChoice::Constrained {
                pools,
                default: params.get(P_POOL).cloned(),
            },
            data_pool,
        })
    }
}

/// One entry of `topologyConstrainedPools`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct ConstrainedPool {
    pub pool_name: String,
    #[serde(default)]
    pub data_pool: Option<String>,
    domain_segments: Vec<DomainSegment>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct DomainSegment {
    /// The topology key nodes report (e.g. `topology.kubernetes.io/zone`).
    domain_label: String,
    value: String,
}

impl ConstrainedPool {
    /// The topology of the pool's volumes.
    pub(crate) fn segments(&self) -> BTreeMap<String, String> {
        self.domain_segments
            .iter()
            .map(|s| (s.domain_label.clone(), s.value.clone()))
            .collect()
    }

    /// Whether the pool lies in topology `t`.
    pub(crate) fn matches(&self, t: &csi::Topology) -> bool {
        self.domain_segments
            .iter()
            .all(|s| t.segments.get(&s.domain_label) == Some(&s.value))
    }
}

/// `imageFeatures` as feature bits (librbd's defaults when not given).
fn features(spec: Option<&String>) -> Result<u64> {
    let Some(spec) = spec.filter(|s| !s.trim().is_empty()) else {
        return Ok(DEFAULT_FEATURES);
    };
    let mut bits = 0;
    for f in spec.split(',').map(str::trim).filter(|f| !f.is_empty()) {
        bits |= match f {
            "layering" => ffi::RBD_FEATURE_LAYERING,
            "exclusive-lock" => ffi::RBD_FEATURE_EXCLUSIVE_LOCK,
            "object-map" => ffi::RBD_FEATURE_OBJECT_MAP,
            "fast-diff" => ffi::RBD_FEATURE_FAST_DIFF,
            "deep-flatten" => ffi::RBD_FEATURE_DEEP_FLATTEN,
            other => {
                return Err(Error::InvalidArgument(format!(
                    "imageFeatures: unknown or unsupported feature {other:?} (supported: \
                     layering, exclusive-lock, object-map, fast-diff, deep-flatten)"
                )))
            }
        };
    }
    let needs = |f: u64, on: u64, what: &str| {
        if bits & f != 0 && bits & on == 0 {
            Err(Error::InvalidArgument(format!("imageFeatures: {what}")))
        } else {
            Ok(())
        }
    };
    needs(
        ffi::RBD_FEATURE_OBJECT_MAP,
        ffi::RBD_FEATURE_EXCLUSIVE_LOCK,
        "object-map needs exclusive-lock",
    )?;
    needs(
        ffi::RBD_FEATURE_FAST_DIFF,
        ffi::RBD_FEATURE_OBJECT_MAP,
        "fast-diff needs object-map",
    )?;
    if bits & ffi::RBD_FEATURE_LAYERING == 0 {
        return Err(Error::InvalidArgument(
            "imageFeatures: layering is required (snapshots and clones use it)".into(),
        ));
    }
    Ok(bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_features() {
        assert_eq!(features(None).unwrap(), DEFAULT_FEATURES);
        assert_eq!(
            features(Some(&"layering".to_string())).unwrap(),
            ffi::RBD_FEATURE_LAYERING
        );
        for bad in [
            "layering,journaling",
            "layering,object-map",
            "exclusive-lock",
        ] {
            assert!(features(Some(&bad.to_string())).is_err(), "{bad}");
        }
    }

    fn map(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn parses_a_storage_class() {
        let p = RbdParams::parse(&map(&[
            (P_CLUSTER, "c"),
            (P_POOL, "rbd"),
            (P_DATA_POOL, "ec"),
            (P_FEATURES, "layering"),
            (P_MOUNTER, "krbd"),
            (P_MKFS_OPTIONS, "-m0"),
        ]))
        .unwrap();
        assert_eq!(
            p,
            RbdParams {
                cluster_id: "c".into(),
                pools: Pools {
                    choice: PoolChoice::Plain("rbd".into()),
                    data_pool: Some("ec".into()),
                },
                features: ffi::RBD_FEATURE_LAYERING,
                mounter: Some(Mounter::Krbd),
                mkfs_options: Some("-m0".into()),
            }
        );
        let zoned = RbdParams::parse(&map(&[
            (P_CLUSTER, "c"),
            (
                P_TOPOLOGY_POOLS,
                r#"[{"poolName":"pa","domainSegments":[{"domainLabel":"z","value":"a"}]}]"#,
            ),
        ]))
        .unwrap();
        let PoolChoice::Constrained { pools, default } = zoned.pools.choice else {
            panic!("{zoned:?}");
        };
        assert_eq!((pools[0].pool_name.as_str(), default), ("pa", None));
        assert_eq!(pools[0].segments(), map(&[("z", "a")]));
        assert_eq!(zoned.features, DEFAULT_FEATURES);
    }

    /// Every bad value is INVALID_ARGUMENT, with the message it always had.
    #[test]
    fn refuses_bad_values() {
        let base = [(P_CLUSTER, "c"), (P_POOL, "rbd")];
        let with = |k: &'static str, v: &'static str| {
            let mut m = map(&base);
            m.insert(k.to_string(), v.to_string());
            m
        };
        for (params, wants) in [
            (map(&[(P_POOL, "rbd")]), "clusterID is required"),
            (
                map(&[(P_CLUSTER, "c")]),
                "pool (or topologyConstrainedPools)",
            ),
            (with(P_MOUNTER, "rbd-nbd"), "rbd-nbd is not offered"),
            (
                with(P_MOUNTER, "fuse"),
                "mounter must be krbd, not \"fuse\"",
            ),
            (with(P_FEATURES, "journaling"), "unsupported feature"),
            (with(P_TOPOLOGY_POOLS, "{"), "topologyConstrainedPools: "),
            (with(P_TOPOLOGY_POOLS, "[]"), "list at least one pool"),
            (
                with(
                    P_TOPOLOGY_POOLS,
                    r#"[{"poolName":"p","domainSegments":[]}]"#,
                ),
                "each with domainSegments",
            ),
        ] {
            match RbdParams::parse(&params) {
                Err(Error::InvalidArgument(m)) => assert!(m.contains(wants), "{m}"),
                other => panic!("{params:?}: {other:?}"),
            }
        }
        assert!(matches!(
            RbdParams::parse(&with(P_MKFS_OPTIONS, "-O ^has_journal; rm")),
            Err(Error::InvalidArgument(_))
        ));
    }
}
