//! RBD driver configuration: the Ceph clusters (a JSON file shaped like a
//! ConfigMap mount) and the controller's standing credentials.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::core::backend::Secrets;
use crate::error::{Error, Result};
use crate::rbd::{Credentials, Secret};

/// Secret keys of a CSI secret for RBD.
pub(crate) const USER_ID: &str = "userID";
pub(crate) const USER_KEY: &str = "userKey";

/// Longest cluster id (keeps ids well under 128 bytes).
pub(crate) const MAX_CLUSTER_ID_LEN: usize = 36;

/// One Ceph cluster.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct Cluster {
    #[serde(rename = "clusterID")]
    pub cluster_id: String,
    /// Monitor addresses (`host:port`, or `[v2:...,v1:...]`).
    pub monitors: Vec<String>,
    /// Pools this driver lists (ListVolumes, ListSnapshots) and reports
    /// capacity for when a request names none.
    #[serde(default)]
    pub pools: Vec<String>,
    /// Topology keys the node plugins of this cluster report (their
    /// `--topology KEY=VALUE`); a volume not bound to a pool's topology is
    /// reachable from every node, i.e. from any topology in these keys.
    /// Default: [`DEFAULT_TOPOLOGY_KEYS`].
    #[serde(default)]
    pub topology_keys: Option<Vec<String>>,
}

/// The well-known Kubernetes topology keys node plugins report when a
/// cluster's `topologyKeys` does not say otherwise.
pub(crate) const DEFAULT_TOPOLOGY_KEYS: &[&str] = &[
    "topology.kubernetes.io/zone",
    "topology.kubernetes.io/region",
];

impl Cluster {
    /// Whether `key` is a topology key this cluster's nodes may report.
    pub(crate) fn knows_topology_key(&self, key: &str) -> bool {
        match &self.topology_keys {
            Some(keys) => keys.iter().any(|k| k == key),
            None => DEFAULT_TOPOLOGY_KEYS.contains(&key),
        }
    }

    /// librados `mon_host`.
    pub(crate) fn mon_host(&self) -> String {
        self.monitors.join(",")
    }
}

#[derive(Debug, Clone, Default)]
pub(crate) struct RbdConfig {
    pub clusters: Vec<Cluster>,
    /// Where the controller's own credentials are (`userID`, `userKey`
    /// files, optionally per cluster in a subdirectory named by the cluster
    /// id); used by calls that carry no secrets (List*, GetCapacity, Get*).
    pub secret_dir: Option<PathBuf>,
}

fn valid_cluster_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_CLUSTER_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

impl RbdConfig {
    pub(crate) fn parse(json: &str, secret_dir: Option<PathBuf>) -> Result<RbdConfig, String> {
        let clusters: Vec<Cluster> =
            serde_json::from_str(json).map_err(|e| format!("RBD config: {e}"))?;
        if clusters.is_empty() {
            return Err("RBD config lists no cluster".into());
        }
        for (i, c) in clusters.iter().enumerate() {
            if !valid_cluster_id(&c.cluster_id) {
                return Err(format!(
                    "RBD config: clusterID {:?} must be 1-{MAX_CLUSTER_ID_LEN} letters, digits, \
                     '-', '_' or '.'",
                    c.cluster_id
                ));
            }
            if c.monitors.is_empty() || c.monitors.iter().any(|m| m.trim().is_empty()) {
                return Err(format!(
                    "RBD config: cluster {} lists no monitor",
                    c.cluster_id
                ));
            }
            if clusters[..i].iter().any(|o| o.cluster_id == c.cluster_id) {
                return Err(format!(
                    "RBD config: cluster {} is listed twice",
                    c.cluster_id
                ));
            }
        }
        Ok(RbdConfig {
            clusters,
            secret_dir,
        })
    }

    pub(crate) fn load(path: &Path, secret_dir: Option<PathBuf>) -> Result<RbdConfig, String> {
        let json = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read the RBD config {}: {e}", path.display()))?;
        Self::parse(&json, secret_dir)
    }

    pub(crate) fn cluster(&self, id: &str) -> Result<&Cluster> {
        self.clusters
            .iter()
            .find(|c| c.cluster_id == id)
            .ok_or_else(|| {
                let known: Vec<&str> = self
                    .clusters
                    .iter()
                    .map(|c| c.cluster_id.as_str())
                    .collect();
                Error::InvalidArgument(format!(
                    "unknown clusterID {id:?}; configured clusters: {}",
                    known.join(", ")
                ))
            })
    }

    /// Credentials for `cluster`: the request's secrets when it has them,
    /// else the controller's own.
    pub(crate) fn credentials(&self, cluster: &Cluster, secrets: &Secrets) -> Result<Credentials> {
        if !secrets.is_empty() {
            let user = secrets.get(USER_ID).filter(|u| !u.is_empty());
            let key = secrets.get(USER_KEY).filter(|k| !k.is_empty());
            return match (user, key) {
                (Some(user), Some(key)) => Ok(Credentials {
                    mon_host: cluster.mon_host(),
                    user: user.to_string(),
                    key: Secret::new(key.to_string()),
                }),
                _ => Err(Error::InvalidArgument(format!(
                    "the request's secrets need {USER_ID} and {USER_KEY}"
                ))),
            };
        }
        let Some(dir) = &self.secret_dir else {
            return Err(Error::InvalidArgument(format!(
                "no credentials: the request carries no secrets ({USER_ID}, {USER_KEY}) and the \
                 driver has no --rbd-secret-dir"
            )));
        };
        let per_cluster = dir.join(&cluster.cluster_id);
        let dir = if per_cluster.join(USER_ID).is_file() {
            per_cluster
        } else {
            dir.clone()
        };
        let read = |name: &str| {
            std::fs::read_to_string(dir.join(name))
                .map(|s| s.trim().to_string())
                .map_err(|e| {
                    Error::Internal(format!(
                        "cannot read the driver's {name} in {}: {e}",
                        dir.display()
                    ))
                })
        };
        Ok(Credentials {
            mon_host: cluster.mon_host(),
            user: read(USER_ID)?,
            key: Secret::new(read(USER_KEY)?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_clusters() {
        let c = RbdConfig::parse(
            r#"[{"clusterID":"ceph-a","monitors":["10.0.0.1:6789","10.0.0.2:6789"],
                 "pools":["rbd"]}]"#,
            None,
        )
        .unwrap();
        assert_eq!(c.clusters[0].mon_host(), "10.0.0.1:6789,10.0.0.2:6789");
        assert!(c.cluster("ceph-a").is_ok());
        assert!(c.cluster("nope").is_err());
        assert!(c.clusters[0].knows_topology_key("topology.kubernetes.io/zone"));
        assert!(!c.clusters[0].knows_topology_key("example.com/rack"));
        let c = RbdConfig::parse(
            r#"[{"clusterID":"a","monitors":["m"],"topologyKeys":["example.com/rack"]}]"#,
            None,
        )
        .unwrap();
        assert!(c.clusters[0].knows_topology_key("example.com/rack"));
        assert!(!c.clusters[0].knows_topology_key("topology.kubernetes.io/zone"));
        for bad in [
            "[]",
            r#"[{"clusterID":"a b","monitors":["m"]}]"#,
            r#"[{"clusterID":"a","monitors":[]}]"#,
            r#"[{"clusterID":"a","monitors":["m"]},{"clusterID":"a","monitors":["m"]}]"#,
            r#"[{"clusterID":"a","monitors":["m"],"typo":1}]"#,
        ] {
            assert!(RbdConfig::parse(bad, None).is_err(), "{bad}");
        }
    }

    #[test]
    fn credentials_from_secrets_or_dir() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(USER_ID), "lodestone\n").unwrap();
        std::fs::write(dir.path().join(USER_KEY), "a2V5\n").unwrap();
        let c = RbdConfig::parse(
            r#"[{"clusterID":"a","monitors":["m:1"]}]"#,
            Some(dir.path().to_path_buf()),
        )
        .unwrap();
        let cl = &c.clusters[0];
        let own = c.credentials(cl, &Secrets::default()).unwrap();
        assert_eq!(
            (own.user.as_str(), own.mon_host.as_str()),
            ("lodestone", "m:1")
        );
        let mut s = Secrets::default();
        s.0.insert(USER_ID.into(), "other".into());
        assert!(c.credentials(cl, &s).is_err(), "a key is required");
        s.0.insert(USER_KEY.into(), "eHl6".into());
        assert_eq!(c.credentials(cl, &s).unwrap().user, "other");
        let none = RbdConfig::parse(r#"[{"clusterID":"a","monitors":["m:1"]}]"#, None).unwrap();
        assert!(none
            .credentials(&none.clusters[0], &Secrets::default())
            .is_err());
    }
}
