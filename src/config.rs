//! Process configuration: command-line flags (each also read from the
//! environment) and the LVM device classes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::ValueEnum;
use serde::Deserialize;

pub use crate::core::ids::{
    validate_class_name, validate_node_id, MAX_CLASS_NAME_LEN, MAX_NODE_ID_LEN, TOPOLOGY_NODE_KEY,
};

/// A command line or LVM configuration that cannot be used. The text says
/// which flag or field and why; it already carries its source's text, so
/// print it once rather than walking the chain.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--tls-cert, --tls-key and --tls-ca go together")]
    TlsFlagsApart,
    #[error("--agent {entry:?}: expected NODE=HOST:PORT")]
    AgentEntry { entry: String },
    #[error("--agent: node {node} is given twice")]
    AgentTwice { node: String },
    #[error("cannot read the host name for --node-id: {0}")]
    HostName(#[source] nix::Error),
    /// `--node-id` (or the host name) breaks the node id rules.
    #[error("{0}")]
    NodeId(String),
    #[error("--endpoint {endpoint:?}: expected an absolute unix socket path or unix:///path")]
    Endpoint { endpoint: String },
    #[error("--device-class {spec:?}: expected NAME=VG or NAME=VG/POOL")]
    DeviceClassSpec { spec: String },
    #[error("cannot read LVM config {}: {source}", path.display())]
    ReadLvmConfig {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("LVM config {}: {source}", path.display())]
    ParseLvmConfig {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "no LVM device class configured: pass --device-class NAME=VG[/POOL] or --lvm-config FILE"
    )]
    NoDeviceClass,
    #[error("more than one device class is marked default")]
    SeveralDefaults,
    /// A device class name that breaks the class name rules.
    #[error("{0}")]
    ClassName(String),
    #[error(
        "{field} {name:?} is not a valid LVM name (letters, digits, '+', '_', '.', '-'; \
         not starting with '-')"
    )]
    LvmName { field: &'static str, name: String },
    #[error("device class {name:?} is defined twice")]
    ClassTwice { name: String },
    #[error("device class {class:?}: {field} must be {range}")]
    OutOfRange {
        class: String,
        field: &'static str,
        range: &'static str,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DriverKind {
    Lvm,
    Rbd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// Controller, node and LVM agent in one process (single node, csi-sanity).
    All,
    /// Controller service only.
    Controller,
    /// Node service (and, for LVM, the node's agent) only.
    Node,
}

impl Mode {
    pub fn runs_controller(self) -> bool {
        matches!(self, Mode::All | Mode::Controller)
    }
    pub fn runs_node(self) -> bool {
        matches!(self, Mode::All | Mode::Node)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AgentResolver {
    Static,
    Kubernetes,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// Storage backend this process serves.
    #[arg(
        long,
        env = "LODESTONE_DRIVER",
        value_enum,
        default_value = "lvm",
        global = true
    )]
    pub driver: DriverKind,

    /// CSI endpoint: a unix socket path or a unix:// URL.
    #[arg(
        long,
        env = "CSI_ENDPOINT",
        default_value = "unix:///run/lodestone/csi.sock",
        global = true
    )]
    pub endpoint: String,

    /// This node's id (defaults to the host name). At most 63 characters,
    /// a valid Kubernetes label value.
    #[arg(long, env = "LODESTONE_NODE_ID", global = true)]
    pub node_id: Option<String>,

    /// CSI driver name (default: lvm.lodestone.dev or rbd.lodestone.dev).
    #[arg(long, env = "LODESTONE_DRIVER_NAME", global = true)]
    pub driver_name: Option<String>,

    /// Which CSI services this process serves.
    #[arg(
        long,
        env = "LODESTONE_MODE",
        value_enum,
        default_value = "all",
        global = true
    )]
    pub mode: Mode,

    /// LVM device classes as a JSON file (see docs/lvm-config.md).
    #[arg(long, env = "LODESTONE_LVM_CONFIG", global = true)]
    pub lvm_config: Option<PathBuf>,

    /// A device class given inline: NAME=VG or NAME=VG/THINPOOL. Repeatable;
    /// the first is the default unless the config file names one.
    #[arg(
        long = "device-class",
        env = "LODESTONE_DEVICE_CLASSES",
        value_delimiter = ';',
        global = true
    )]
    pub device_classes: Vec<String>,

    /// Let udev manage device nodes (default: LVM creates them itself, which
    /// is what works inside containers and minimal hosts).
    #[arg(long, env = "LODESTONE_LVM_UDEV", global = true)]
    pub lvm_udev: bool,

    /// Seconds between background LVM reports (picks up thin pool usage and
    /// changes made outside the driver). 0 disables.
    #[arg(
        long,
        env = "LODESTONE_LVM_REFRESH_SECONDS",
        default_value_t = 30,
        global = true
    )]
    pub lvm_refresh_seconds: u64,

    /// How long CreateVolume or CreateSnapshot waits for a full copy (thick
    /// snapshots, restores and clones) before answering "in progress"; the
    /// copy goes on in the background and a retry picks up its result.
    #[arg(
        long,
        env = "LODESTONE_COPY_WAIT_SECONDS",
        default_value_t = 20,
        global = true
    )]
    pub copy_wait_seconds: u64,

    /// How often a restore copied from another node records how far it
    /// got (an LV tag, one lvchange), once at least 64 MiB arrived since
    /// the last record: a crash costs at most this much of the copy.
    #[arg(
        long,
        env = "LODESTONE_COPY_CHECKPOINT_SECONDS",
        default_value_t = 10,
        global = true
    )]
    pub copy_checkpoint_seconds: u64,

    /// `--mode node` (LVM): where the node's LVM agent API listens for the
    /// controller (host:port, on the node's network).
    #[arg(
        long,
        env = "LODESTONE_AGENT_LISTEN",
        default_value = "0.0.0.0:7441",
        global = true
    )]
    pub agent_listen: String,

    /// `--mode controller` (LVM): a node's agent address, NODE=HOST:PORT.
    /// Repeatable (or `;`-separated in the environment).
    #[arg(
        long = "agent",
        env = "LODESTONE_AGENTS",
        value_delimiter = ';',
        global = true
    )]
    pub agents: Vec<String>,

    /// `--mode controller` (LVM): how node agents are found: `static` (the
    /// `--agent` map) or `kubernetes` (CSINode objects of this driver, each
    /// Node's InternalIP and `--agent-port`).
    #[arg(
        long,
        env = "LODESTONE_AGENT_RESOLVER",
        value_enum,
        default_value = "static",
        global = true
    )]
    pub agent_resolver: AgentResolver,

    /// The agents' port, for the `kubernetes` resolver.
    #[arg(
        long,
        env = "LODESTONE_AGENT_PORT",
        default_value_t = 7441,
        global = true
    )]
    pub agent_port: u16,

    /// Service account directory (token, ca.crt) for the Kubernetes API.
    #[arg(
        long,
        env = "LODESTONE_SERVICE_ACCOUNT_DIR",
        default_value = crate::kube::SERVICE_ACCOUNT_DIR,
        global = true
    )]
    pub service_account_dir: PathBuf,

    /// Deadline of an agent call that changes LVM (reads get at most 15 s).
    #[arg(
        long,
        env = "LODESTONE_AGENT_TIMEOUT_SECONDS",
        default_value_t = 180,
        global = true
    )]
    pub agent_timeout_seconds: u64,

    /// How often each agent's inventory stream sends a heartbeat when
    /// nothing changes; a node silent for three periods is down.
    #[arg(
        long,
        env = "LODESTONE_AGENT_HEARTBEAT_MS",
        default_value_t = 2000,
        global = true
    )]
    pub agent_heartbeat_ms: u64,

    /// PEM certificate of this process for the agent API (mutual TLS). An
    /// agent's names its node (DNS SAN); the controller's names
    /// `--controller-identity`.
    #[arg(long, env = "LODESTONE_TLS_CERT", global = true)]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of `--tls-cert`.
    #[arg(long, env = "LODESTONE_TLS_KEY", global = true)]
    pub tls_key: Option<PathBuf>,

    /// PEM CA certificate that signed every agent's and the controller's
    /// certificate; nothing else is trusted.
    #[arg(long, env = "LODESTONE_TLS_CA", global = true)]
    pub tls_ca: Option<PathBuf>,

    /// The name (DNS SAN) an agent requires in the controller's client
    /// certificate.
    #[arg(
        long,
        env = "LODESTONE_CONTROLLER_IDENTITY",
        default_value = "lodestone-controller",
        global = true
    )]
    pub controller_identity: String,

    /// `--driver rbd`: the Ceph clusters, a JSON array of
    /// `{"clusterID", "monitors": [...], "pools": [...]}`.
    #[arg(
        long,
        env = "LODESTONE_RBD_CONFIG",
        default_value = "/etc/lodestone/rbd/config.json",
        global = true
    )]
    pub rbd_config: PathBuf,

    /// `--driver rbd`: directory with the controller's own `userID` and
    /// `userKey` (per cluster in a subdirectory named by its id), for calls
    /// that carry no secrets (ListVolumes, GetCapacity, ...).
    #[arg(long, env = "LODESTONE_RBD_SECRET_DIR", global = true)]
    pub rbd_secret_dir: Option<PathBuf>,

    /// `--driver rbd`: clone-chain depth from which new clones are
    /// flattened in the background.
    #[arg(
        long,
        env = "LODESTONE_RBD_SOFT_CLONE_DEPTH",
        default_value_t = 4,
        global = true
    )]
    pub rbd_soft_clone_depth: usize,

    /// `--driver rbd`: clone-chain depth from which a call returns only
    /// after flattening.
    #[arg(
        long,
        env = "LODESTONE_RBD_HARD_CLONE_DEPTH",
        default_value_t = 8,
        global = true
    )]
    pub rbd_hard_clone_depth: usize,

    /// `--driver rbd`, node plugin: a topology segment this node reports,
    /// KEY=VALUE (e.g. topology.kubernetes.io/zone=a). Repeatable. (Not
    /// global: `lodestone ctl` has a --topology of its own.)
    #[arg(long = "topology", env = "LODESTONE_TOPOLOGY", value_delimiter = ';')]
    pub topology: Vec<String>,

    /// Timeout for one external command, in seconds.
    #[arg(
        long,
        env = "LODESTONE_COMMAND_TIMEOUT_SECONDS",
        default_value_t = 120,
        global = true
    )]
    pub command_timeout_seconds: u64,

    /// Maximum number of volumes on this node reported to the orchestrator
    /// (0: no limit).
    #[arg(
        long,
        env = "LODESTONE_MAX_VOLUMES_PER_NODE",
        default_value_t = 0,
        global = true
    )]
    pub max_volumes_per_node: i64,

    /// Serve Prometheus metrics (GET /metrics) and a health check
    /// (GET /healthz) on this host:port, e.g. 0.0.0.0:9808. Empty: off.
    #[arg(
        long,
        env = "LODESTONE_METRICS_ADDRESS",
        default_value = "",
        global = true
    )]
    pub metrics_address: String,

    /// Log format.
    #[arg(
        long,
        env = "LODESTONE_LOG_FORMAT",
        value_enum,
        default_value = "text",
        global = true
    )]
    pub log_format: LogFormat,
}

impl RunArgs {
    /// The TLS files of the agent API: all three or none.
    pub fn tls_files(&self) -> Result<Option<crate::tls::TlsFiles>, ConfigError> {
        match (&self.tls_cert, &self.tls_key, &self.tls_ca) {
            (Some(cert), Some(key), Some(ca)) => Ok(Some(crate::tls::TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                ca: ca.clone(),
            })),
            (None, None, None) => Ok(None),
            _ => Err(ConfigError::TlsFlagsApart),
        }
    }

    /// The heartbeat period asked of agents' inventory streams.
    pub fn agent_heartbeat(&self) -> Duration {
        let (low, high) = crate::lvm::inventory::HEARTBEAT_LIMITS;
        Duration::from_millis(self.agent_heartbeat_ms).clamp(low, high)
    }

    /// The static agent map: (node, address) pairs.
    pub fn agent_map(&self) -> Result<Vec<(String, String)>, ConfigError> {
        let mut out: Vec<(String, String)> = Vec::new();
        for entry in self.agents.iter().filter(|e| !e.trim().is_empty()) {
            let (node, addr) = entry
                .trim()
                .split_once('=')
                .filter(|(n, a)| !n.is_empty() && !a.is_empty())
                .ok_or_else(|| ConfigError::AgentEntry {
                    entry: entry.clone(),
                })?;
            if out.iter().any(|(n, _)| n == node) {
                return Err(ConfigError::AgentTwice {
                    node: node.to_string(),
                });
            }
            out.push((node.to_string(), addr.to_string()));
        }
        Ok(out)
    }

    pub fn command_timeout(&self) -> Duration {
        Duration::from_secs(self.command_timeout_seconds.max(1))
    }

    pub fn driver_name(&self) -> String {
        self.driver_name
            .clone()
            .unwrap_or_else(|| match self.driver {
                DriverKind::Lvm => "lvm.lodestone.dev".to_string(),
                DriverKind::Rbd => "rbd.lodestone.dev".to_string(),
            })
    }

    /// The node id, checked: a valid label value of at most 63 characters.
    pub fn node_id(&self) -> Result<String, ConfigError> {
        let id = match &self.node_id {
            Some(id) => id.clone(),
            None => nix::unistd::gethostname()
                .map_err(ConfigError::HostName)?
                .to_string_lossy()
                .into_owned(),
        };
        validate_node_id(&id).map_err(ConfigError::NodeId)?;
        Ok(id)
    }

    /// The socket path from `--endpoint`.
    pub fn socket_path(&self) -> Result<PathBuf, ConfigError> {
        socket_path(&self.endpoint)
    }
}

pub fn socket_path(endpoint: &str) -> Result<PathBuf, ConfigError> {
    let path = endpoint.strip_prefix("unix://").unwrap_or(endpoint);
    // unix:///abs/path leaves "/abs/path"; unix://rel is not accepted.
    if !path.starts_with('/') {
        return Err(ConfigError::Endpoint {
            endpoint: endpoint.to_string(),
        });
    }
    Ok(PathBuf::from(path))
}

/// One device class: a volume group, optionally a thin pool inside it.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DeviceClass {
    pub name: String,
    pub volume_group: String,
    #[serde(default)]
    pub thin_pool: Option<String>,
    #[serde(default)]
    pub default: bool,
    /// Thin only: how many times the pool's size may be promised to volumes.
    #[serde(default = "default_overprovision")]
    pub overprovision_ratio: f64,
    /// Bytes kept free and never handed out (thick: in the VG; thin: in the pool).
    #[serde(default)]
    pub spare_bytes: u64,
    /// Thin only: pool data usage (percent) at and above which new volumes are refused.
    #[serde(default = "default_full_threshold")]
    pub pool_full_threshold_percent: f64,
    /// Size of a volume whose request names no capacity.
    #[serde(default = "default_volume_size")]
    pub default_size_bytes: u64,
}

fn default_overprovision() -> f64 {
    5.0
}
fn default_full_threshold() -> f64 {
    90.0
}
fn default_volume_size() -> u64 {
    1 << 30
}

impl DeviceClass {
    pub fn is_thin(&self) -> bool {
        self.thin_pool.is_some()
    }

    fn inline(spec: &str) -> Result<Self, ConfigError> {
        let (name, target) = spec
            .split_once('=')
            .ok_or_else(|| ConfigError::DeviceClassSpec {
                spec: spec.to_string(),
            })?;
        let (vg, pool) = match target.split_once('/') {
            Some((vg, pool)) => (vg, Some(pool.to_string())),
            None => (target, None),
        };
        Ok(DeviceClass {
            name: name.to_string(),
            volume_group: vg.to_string(),
            thin_pool: pool,
            default: false,
            overprovision_ratio: default_overprovision(),
            spare_bytes: 0,
            pool_full_threshold_percent: default_full_threshold(),
            default_size_bytes: default_volume_size(),
        })
    }
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct LvmConfigFile {
    #[serde(default)]
    device_classes: Vec<DeviceClass>,
}

/// The validated LVM configuration: at least one class, exactly one default.
#[derive(Debug, Clone)]
pub struct LvmConfig {
    pub classes: Vec<DeviceClass>,
}

impl LvmConfig {
    pub fn load(file: Option<&Path>, inline: &[String]) -> Result<Self, ConfigError> {
        let mut classes = Vec::new();
        if let Some(path) = file {
            let text =
                std::fs::read_to_string(path).map_err(|source| ConfigError::ReadLvmConfig {
                    path: path.to_path_buf(),
                    source,
                })?;
            let parsed: LvmConfigFile =
                serde_json::from_str(&text).map_err(|source| ConfigError::ParseLvmConfig {
                    path: path.to_path_buf(),
                    source,
                })?;
            classes.extend(parsed.device_classes);
        }
        for spec in inline.iter().filter(|s| !s.trim().is_empty()) {
            classes.push(DeviceClass::inline(spec.trim())?);
        }
        Self::new(classes)
    }

    pub fn new(mut classes: Vec<DeviceClass>) -> Result<Self, ConfigError> {
        if classes.is_empty() {
            return Err(ConfigError::NoDeviceClass);
        }
        let defaults = classes.iter().filter(|c| c.default).count();
        if defaults > 1 {
            return Err(ConfigError::SeveralDefaults);
        }
        if defaults == 0 {
            classes[0].default = true;
        }
        for (i, c) in classes.iter().enumerate() {
            validate_class_name(&c.name).map_err(ConfigError::ClassName)?;
            validate_lvm_name(&c.volume_group, "volumeGroup")?;
            if let Some(pool) = &c.thin_pool {
                validate_lvm_name(pool, "thinPool")?;
            }
            if classes[..i].iter().any(|o| o.name == c.name) {
                return Err(ConfigError::ClassTwice {
                    name: c.name.clone(),
                });
            }
            let out_of_range = |field, range| ConfigError::OutOfRange {
                class: c.name.clone(),
                field,
                range,
            };
            if !(c.overprovision_ratio >= 1.0 && c.overprovision_ratio <= 1000.0) {
                return Err(out_of_range("overprovisionRatio", "between 1 and 1000"));
            }
            if !(c.pool_full_threshold_percent > 0.0 && c.pool_full_threshold_percent <= 100.0) {
                return Err(out_of_range("poolFullThresholdPercent", "in (0, 100]"));
            }
        }
        Ok(LvmConfig { classes })
    }

    pub fn default_class(&self) -> &DeviceClass {
        self.classes
            .iter()
            .find(|c| c.default)
            .expect("validated: one default")
    }

    pub fn class(&self, name: &str) -> Option<&DeviceClass> {
        self.classes.iter().find(|c| c.name == name)
    }

    /// Distinct volume groups, in configuration order.
    pub fn volume_groups(&self) -> Vec<String> {
        let mut vgs: Vec<String> = Vec::new();
        for c in &self.classes {
            if !vgs.contains(&c.volume_group) {
                vgs.push(c.volume_group.clone());
            }
        }
        vgs
    }
}

/// LVM's own rules for VG and LV names, minus anything that could read as a flag.
pub fn validate_lvm_name(name: &str, what: &'static str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= 127
        && !name.starts_with('-')
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "+_.-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(ConfigError::LvmName {
            field: what,
            name: name.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inline_classes_and_default() {
        let cfg = LvmConfig::load(None, &["thin=vg0/pool0".into(), "thick=vg1".into()]).unwrap();
        assert_eq!(cfg.default_class().name, "thin");
        assert_eq!(
            cfg.class("thin").unwrap().thin_pool.as_deref(),
            Some("pool0")
        );
        assert!(!cfg.class("thick").unwrap().is_thin());
        assert_eq!(cfg.volume_groups(), vec!["vg0", "vg1"]);
    }

    #[test]
    fn rejects_bad_names_and_duplicates() {
        assert!(LvmConfig::load(None, &["Bad=vg0".into()]).is_err());
        assert!(LvmConfig::load(None, &["a=-vg".into()]).is_err());
        assert!(LvmConfig::load(None, &["a=vg;rm".into()]).is_err());
        assert!(LvmConfig::load(None, &["a=vg".into(), "a=vg2".into()]).is_err());
        assert!(LvmConfig::load(None, &[]).is_err());
        let long = format!("{}=vg", "a".repeat(MAX_CLASS_NAME_LEN + 1));
        assert!(LvmConfig::load(None, &[long]).is_err());
    }

    #[test]
    fn node_ids() {
        assert!(validate_node_id("node-1.example").is_ok());
        assert!(validate_node_id(&"n".repeat(63)).is_ok());
        assert!(validate_node_id(&"n".repeat(64)).is_err());
        assert!(validate_node_id("-x").is_err());
        assert!(validate_node_id("a:b").is_err());
        assert!(validate_node_id("").is_err());
    }

    #[test]
    fn endpoints() {
        assert_eq!(
            socket_path("unix:///run/x.sock").unwrap(),
            PathBuf::from("/run/x.sock")
        );
        assert_eq!(
            socket_path("/run/x.sock").unwrap(),
            PathBuf::from("/run/x.sock")
        );
        assert!(socket_path("unix://x.sock").is_err());
        assert!(socket_path("tcp://1.2.3.4:5").is_err());
    }

    #[test]
    fn config_file_rejects_unknown_fields() {
        let text = r#"{"deviceClasses":[{"name":"a","volumeGroup":"vg","thinpool":"p"}]}"#;
        assert!(serde_json::from_str::<LvmConfigFile>(text).is_err());
        let text = r#"{"deviceClasses":[{"name":"a","volumeGroup":"vg","thinPool":"p",
            "overprovisionRatio":2.5,"spareBytes":1024}]}"#;
        let f: LvmConfigFile = serde_json::from_str(text).unwrap();
        assert_eq!(f.device_classes[0].overprovision_ratio, 2.5);
    }

    #[test]
    fn errors_name_the_file_or_field_and_keep_their_source() {
        use std::error::Error as _;
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.json");
        let e = LvmConfig::load(Some(&missing), &[]).unwrap_err();
        let ConfigError::ReadLvmConfig { path, source } = &e else {
            panic!("{e:?}")
        };
        assert_eq!(path, &missing);
        assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        assert!(e.source().is_some());
        assert!(e.to_string().contains(&*missing.to_string_lossy()), "{e}");

        let bad = dir.path().join("bad.json");
        std::fs::write(&bad, "{").unwrap();
        let e = LvmConfig::load(Some(&bad), &[]).unwrap_err();
        assert!(
            matches!(&e, ConfigError::ParseLvmConfig { path, .. } if path == &bad),
            "{e:?}"
        );
        assert!(e.source().is_some());

        let mut class = DeviceClass::inline("a=vg").unwrap();
        class.overprovision_ratio = 0.5;
        let e = LvmConfig::new(vec![class]).unwrap_err();
        assert!(
            matches!(
                &e,
                ConfigError::OutOfRange {
                    field: "overprovisionRatio",
                    ..
                }
            ),
            "{e:?}"
        );
        assert_eq!(
            e.to_string(),
            "device class \"a\": overprovisionRatio must be between 1 and 1000"
        );
        let e = LvmConfig::load(None, &["a=vg/-p".into()]).unwrap_err();
        assert!(
            matches!(
                &e,
                ConfigError::LvmName {
                    field: "thinPool",
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(matches!(
            LvmConfig::load(None, &["a".into()]),
            Err(ConfigError::DeviceClassSpec { .. })
        ));
        assert!(matches!(
            socket_path("x"),
            Err(ConfigError::Endpoint { .. })
        ));
    }
}
