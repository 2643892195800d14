//! `lodestone ctl`: a CSI client for operators.
//!
//! Calls the driver on `--endpoint` (a Unix socket) one RPC or a few at a
//! time and prints the answer as compact text or as one JSON document. A
//! failed call prints its gRPC code and message on stderr and exits 1; a
//! command line that cannot be used exits 2. Secrets come from a file or
//! standard input (`--secrets-file`), never from the command line, which
//! every user of the machine can see; they are sent to the driver and never
//! printed, not even in error messages.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::Path;
use std::time::Duration;

use clap::{Subcommand, ValueEnum};
use serde::Serialize;
use serde_json::json;
use tonic::{Code, Status};

use crate::client::{self, Client};
use crate::config::{socket_path, RunArgs, TOPOLOGY_NODE_KEY};
use crate::csi;
use crate::csi::volume_capability::access_mode::Mode as WireMode;
use crate::csi::volume_capability::{AccessMode, BlockVolume, MountVolume};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Compact lines and tables for people.
    Text,
    /// One JSON document per command, with stable snake_case field names.
    Json,
}

#[derive(Debug, Clone, clap::Args)]
pub struct CtlArgs {
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value = "text", global = true)]
    pub output: Output,

    /// Seconds to wait for the connection and for each call.
    #[arg(long, default_value_t = 120, global = true)]
    pub timeout: u64,

    /// Boxed: the commands' arguments are large next to the other
    /// subcommands of `lodestone`.
    #[command(subcommand)]
    pub command: Box<CtlCommand>,
}

/// Access modes, as the CSI spec names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AccessModeArg {
    SingleNodeWriter,
    SingleNodeReaderOnly,
    SingleNodeSingleWriter,
    SingleNodeMultiWriter,
    MultiNodeReaderOnly,
    MultiNodeSingleWriter,
    MultiNodeMultiWriter,
}

impl AccessModeArg {
    fn wire(self) -> WireMode {
        match self {
            AccessModeArg::SingleNodeWriter => WireMode::SingleNodeWriter,
            AccessModeArg::SingleNodeReaderOnly => WireMode::SingleNodeReaderOnly,
            AccessModeArg::SingleNodeSingleWriter => WireMode::SingleNodeSingleWriter,
            AccessModeArg::SingleNodeMultiWriter => WireMode::SingleNodeMultiWriter,
            AccessModeArg::MultiNodeReaderOnly => WireMode::MultiNodeReaderOnly,
            AccessModeArg::MultiNodeSingleWriter => WireMode::MultiNodeSingleWriter,
            AccessModeArg::MultiNodeMultiWriter => WireMode::MultiNodeMultiWriter,
        }
    }
}

/// The volume capability of a request.
#[derive(Debug, Clone, clap::Args)]
pub struct CapabilityArgs {
    /// A raw block volume (default: a mounted filesystem).
    #[arg(long, conflicts_with_all = ["fs_type", "mount_flags"])]
    pub block: bool,
    /// Filesystem of a mount volume (default: the driver's choice).
    #[arg(long)]
    pub fs_type: Option<String>,
    /// A mount option of a mount volume. Repeatable.
    #[arg(long = "mount-flag", value_name = "FLAG")]
    pub mount_flags: Vec<String>,
    /// Access mode.
    #[arg(long, value_enum, default_value = "single-node-writer")]
    pub access_mode: AccessModeArg,
}

impl CapabilityArgs {
    fn wire(&self) -> csi::VolumeCapability {
        csi::VolumeCapability {
            block: self.block.then_some(BlockVolume {}),
            mount: (!self.block).then(|| MountVolume {
                fs_type: self.fs_type.clone().unwrap_or_default(),
                mount_flags: self.mount_flags.clone(),
                volume_mount_group: String::new(),
            }),
            access_mode: Some(AccessMode {
                mode: self.access_mode.wire() as i32,
            }),
        }
    }
}

/// A refused `--secret`. Its parser accepts anything, so that clap never
/// echoes it in an error, and drops the value at once.
#[derive(Debug, Clone)]
pub struct Secret;

fn secret(_: &str) -> Result<Secret, String> {
    Ok(Secret)
}

#[derive(Debug, Clone, Default, clap::Args)]
pub struct SecretArgs {
    /// Secrets for the driver, read from PATH (`-`: standard input): a JSON
    /// object of strings, or KEY=VALUE lines (`#` starts a comment line).
    /// Never printed.
    #[arg(long = "secrets-file", value_name = "PATH")]
    pub secrets_file: Option<std::path::PathBuf>,
    /// Refused: a command line is visible to every user of the machine.
    #[arg(long = "secret", hide = true, value_parser = secret)]
    pub refused: Vec<Secret>,
}

/// The secrets of a `--secrets-file`'s text. Errors name keys and line
/// numbers, never a value nor a line's text.
fn parse_secrets(text: &str) -> Result<HashMap<String, String>, String> {
    let mut out = HashMap::new();
    if text.trim_start().starts_with('{') {
        let map: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(text).map_err(|e| {
                format!(
                    "the secrets file is not a JSON object of strings (line {}, column {}; \
                     the text is not shown)",
                    e.line(),
                    e.column()
                )
            })?;
        for (k, v) in map {
            let serde_json::Value::String(v) = v else {
                return Err(format!("secret {k:?}: the value must be a JSON string"));
            };
            if k.is_empty() {
                return Err("a secret's key must not be empty".into());
            }
            out.insert(k, v);
        }
        return Ok(out);
    }
    for (n, line) in text.lines().enumerate() {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        let Some((k, v)) = line.split_once('=').filter(|(k, _)| !k.trim().is_empty()) else {
            return Err(format!(
                "line {} of the secrets file is not KEY=VALUE (the line is not shown)",
                n + 1
            ));
        };
        let k = k.trim();
        if out.insert(k.to_string(), v.to_string()).is_some() {
            return Err(format!("secret {k:?} is given twice in the secrets file"));
        }
    }
    Ok(out)
}

impl SecretArgs {
    /// The secrets, read from the file or standard input.
    fn read(&self) -> Result<HashMap<String, String>, Failure> {
        if !self.refused.is_empty() {
            return Err(Failure::Usage(
                "--secret is not accepted (the argument is not shown): a command line is \
                 visible to every user of the machine; put the secrets in a file readable only \
                 by you and pass --secrets-file PATH, or --secrets-file - to read standard input"
                    .into(),
            ));
        }
        let Some(path) = &self.secrets_file else {
            return Ok(HashMap::new());
        };
        let text = if path.as_os_str() == "-" {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut text).map_err(|e| {
                Failure::Usage(format!("cannot read secrets from standard input: {e}"))
            })?;
            text
        } else {
            std::fs::read_to_string(path).map_err(|e| {
                Failure::Usage(format!(
                    "cannot read the secrets file {}: {e}",
                    path.display()
                ))
            })?
        };
        parse_secrets(&text).map_err(Failure::Usage)
    }
}

/// `KEY=VALUE` of `--param`, `--topology` and `--context`.
pub fn key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err("expected KEY=VALUE".to_string()),
    }
}

/// A size in bytes: a whole number, optionally with a decimal (k, M, G, T,
/// P) or binary (Ki, Mi, Gi, Ti, Pi) suffix as in Kubernetes quantities.
pub fn size(s: &str) -> Result<i64, String> {
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, suffix) = s.split_at(digits);
    let multiplier: i64 = match suffix {
        "" => 1,
        "k" | "K" => 1000,
        "M" => 1000_i64.pow(2),
        "G" => 1000_i64.pow(3),
        "T" => 1000_i64.pow(4),
        "P" => 1000_i64.pow(5),
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "Pi" => 1 << 50,
        _ => {
            return Err(format!(
                "unknown unit {suffix:?}: use bytes or k, M, G, T, P, Ki, Mi, Gi, Ti, Pi"
            ))
        }
    };
    let n: i64 = number
        .parse()
        .map_err(|_| "expected a whole number of bytes, e.g. 1073741824 or 1Gi".to_string())?;
    n.checked_mul(multiplier)
        .ok_or_else(|| "too large".to_string())
}

#[derive(Debug, Clone, Subcommand)]
pub enum CtlCommand {
    /// Plugin name and version, readiness, capabilities, node id and topology.
    Info,
    /// CreateVolume.
    CreateVolume(CreateVolumeArgs),
    /// DeleteVolume (an unknown id is success).
    DeleteVolume {
        /// The volume id.
        id: String,
        #[command(flatten)]
        secrets: SecretArgs,
    },
    /// ListVolumes, every page.
    ListVolumes {
        /// Entries per ListVolumes call (0: the driver decides).
        #[arg(long, default_value_t = 0)]
        page_size: i32,
    },
    /// ControllerGetVolume.
    GetVolume {
        /// The volume id.
        id: String,
    },
    /// ControllerExpandVolume to at least SIZE bytes (e.g. 2Gi).
    ExpandVolume {
        /// The volume id.
        id: String,
        /// The new size (e.g. 2Gi).
        #[arg(value_parser = size)]
        size: i64,
        /// The volume is a raw block volume (no node expansion needed).
        #[arg(long)]
        block: bool,
        #[command(flatten)]
        secrets: SecretArgs,
    },
    /// CreateSnapshot of a volume.
    CreateSnapshot {
        /// The request name (the CO's idempotency key).
        name: String,
        /// The volume to snapshot.
        source_volume_id: String,
        /// A VolumeSnapshotClass parameter, KEY=VALUE. Repeatable.
        #[arg(long = "param", value_name = "KEY=VALUE", value_parser = key_value)]
        params: Vec<(String, String)>,
        #[command(flatten)]
        secrets: SecretArgs,
    },
    /// DeleteSnapshot (an unknown id is success).
    DeleteSnapshot {
        /// The snapshot id.
        id: String,
        #[command(flatten)]
        secrets: SecretArgs,
    },
    /// ListSnapshots, every page.
    ListSnapshots {
        /// Only the snapshots of this volume.
        #[arg(long)]
        source: Option<String>,
        /// Only this snapshot.
        #[arg(long)]
        id: Option<String>,
        /// Entries per ListSnapshots call (0: the driver decides).
        #[arg(long, default_value_t = 0)]
        page_size: i32,
        #[command(flatten)]
        secrets: SecretArgs,
    },
    /// NodeStageVolume (the staging directory must exist).
    Stage {
        /// The volume id.
        id: String,
        /// An existing directory to mount the volume at (relative paths are
        /// made absolute).
        staging_path: String,
        #[command(flatten)]
        capability: CapabilityArgs,
        /// The volume context CreateVolume returned, KEY=VALUE. Repeatable.
        #[arg(long = "context", value_name = "KEY=VALUE", value_parser = key_value)]
        context: Vec<(String, String)>,
        #[command(flatten)]
        secrets: SecretArgs,
    },
    /// NodeUnstageVolume.
    Unstage {
        /// The volume id.
        id: String,
        /// Where the volume is staged.
        staging_path: String,
    },
    /// NodePublishVolume of a staged volume.
    Publish {
        /// The volume id.
        id: String,
        /// Where the volume is staged.
        staging_path: String,
        /// Where to publish it (the driver creates it).
        target_path: String,
        /// Publish read-only.
        #[arg(long)]
        readonly: bool,
        #[command(flatten)]
        capability: CapabilityArgs,
        /// The volume context CreateVolume returned, KEY=VALUE. Repeatable.
        #[arg(long = "context", value_name = "KEY=VALUE", value_parser = key_value)]
        context: Vec<(String, String)>,
        #[command(flatten)]
        secrets: SecretArgs,
    },
    /// NodeUnpublishVolume.
    Unpublish {
        /// The volume id.
        id: String,
        /// Where the volume is published.
        target_path: String,
    },
    /// NodeGetVolumeStats of a staged or published path.
    Stats {
        /// The volume id.
        id: String,
        /// The staging or target path.
        path: String,
    },
    /// GetCapacity.
    Capacity {
        /// A StorageClass parameter, KEY=VALUE. Repeatable.
        #[arg(long = "param", value_name = "KEY=VALUE", value_parser = key_value)]
        params: Vec<(String, String)>,
        /// A topology segment, KEY=VALUE. Repeatable.
        #[arg(long = "topology", value_name = "KEY=VALUE", value_parser = key_value)]
        topology: Vec<(String, String)>,
    },
}

#[derive(Debug, Clone, clap::Args)]
pub struct CreateVolumeArgs {
    /// The request name (the CO's idempotency key), e.g. pvc-1234.
    pub name: String,
    /// Required bytes (e.g. 1073741824 or 1Gi); default: the driver's.
    #[arg(long, value_parser = size)]
    pub size: Option<i64>,
    /// Largest acceptable size in bytes.
    #[arg(long, value_parser = size)]
    pub limit: Option<i64>,
    /// A StorageClass parameter, KEY=VALUE (e.g. deviceClass=thick). Repeatable.
    #[arg(long = "param", value_name = "KEY=VALUE", value_parser = key_value)]
    pub params: Vec<(String, String)>,
    #[command(flatten)]
    pub capability: CapabilityArgs,
    /// Restore from this snapshot.
    #[arg(long, conflicts_with = "volume_source")]
    pub snapshot_source: Option<String>,
    /// Clone this volume.
    #[arg(long)]
    pub volume_source: Option<String>,
    /// A segment of the topology the volume must be reachable from,
    /// KEY=VALUE (e.g. topology.lodestone.dev/node=node-a). Repeatable.
    #[arg(long = "topology", value_name = "KEY=VALUE", value_parser = key_value)]
    pub topology: Vec<(String, String)>,
    #[command(flatten)]
    pub secrets: SecretArgs,
}

/// Why ctl stops.
#[derive(Debug)]
enum Failure {
    /// The command line cannot be used: exit 2.
    Usage(String),
    /// The driver could not be reached, or a call failed: exit 1.
    Call(String),
}

impl Failure {
    fn status(method: &str, s: &Status) -> Failure {
        Failure::Call(format!(
            "{method}: {}: {}",
            crate::metrics::code_name(s.code()),
            s.message()
        ))
    }
}

/// Runs `lodestone ctl` and returns the process exit code.
pub async fn run(run: &RunArgs, args: &CtlArgs) -> i32 {
    match execute(run, args).await {
        Ok(()) => 0,
        Err(Failure::Usage(m)) => {
            eprintln!("lodestone ctl: {m}");
            2
        }
        Err(Failure::Call(m)) => {
            eprintln!("lodestone ctl: {m}");
            1
        }
    }
}

/// What a command prints: a JSON document, or its text form.
struct Printed {
    json: serde_json::Value,
    text: String,
}

async fn execute(run: &RunArgs, args: &CtlArgs) -> Result<(), Failure> {
    let timeout = Duration::from_secs(args.timeout.max(1));
    let socket = socket_path(&run.endpoint).map_err(Failure::Usage)?;
    // Everything local is checked before connecting.
    let prepared = Prepared::new(&args.command)?;
    let client = match tokio::time::timeout(timeout, client::connect(&socket)).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            return Err(Failure::Call(format!(
                "cannot connect to {}: {}",
                socket.display(),
                error_chain(&e)
            )))
        }
        Err(_) => {
            return Err(Failure::Call(format!(
                "cannot connect to {}: no answer within {}s",
                socket.display(),
                timeout.as_secs()
            )))
        }
    };
    let mut c = Caller { client, timeout };
    let printed = c.command(&args.command, prepared).await?;
    match args.output {
        Output::Json => println!("{}", printed.json),
        Output::Text => print!("{}", printed.text),
    }
    Ok(())
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        // Some layers repeat their source's message as their own.
        let more = s.to_string();
        if !text.ends_with(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    text
}

/// The parts of a command checked and converted before any call.
#[derive(Default)]
struct Prepared {
    secrets: HashMap<String, String>,
    params: HashMap<String, String>,
    context: HashMap<String, String>,
    topology: HashMap<String, String>,
}

fn unique(pairs: &[(String, String)], flag: &str) -> Result<HashMap<String, String>, Failure> {
    let mut out = HashMap::new();
    for (k, v) in pairs {
        if out.insert(k.clone(), v.clone()).is_some() {
            return Err(Failure::Usage(format!("{flag} {k} is given twice")));
        }
    }
    Ok(out)
}

impl Prepared {
    fn new(cmd: &CtlCommand) -> Result<Prepared, Failure> {
        let none = SecretArgs::default();
        let (secrets, params, context, topology): (&SecretArgs, &[_], &[_], &[_]) = match cmd {
            CtlCommand::CreateVolume(a) => (&a.secrets, &a.params, &[], &a.topology),
            CtlCommand::DeleteVolume { secrets, .. }
            | CtlCommand::ExpandVolume { secrets, .. }
            | CtlCommand::DeleteSnapshot { secrets, .. }
            | CtlCommand::ListSnapshots { secrets, .. } => (secrets, &[], &[], &[]),
            CtlCommand::CreateSnapshot {
                params, secrets, ..
            } => (secrets, params, &[], &[]),
            CtlCommand::Stage {
                context, secrets, ..
            }
            | CtlCommand::Publish {
                context, secrets, ..
            } => (secrets, &[], context, &[]),
            CtlCommand::Capacity { params, topology } => (&none, params, &[], topology),
            _ => (&none, &[], &[], &[]),
        };
        Ok(Prepared {
            params: unique(params, "--param")?,
            context: unique(context, "--context")?,
            topology: unique(topology, "--topology")?,
            secrets: secrets.read()?,
        })
    }
}

/// An absolute path for the driver: a relative one is taken from the
/// current directory.
fn absolute(path: &str) -> Result<String, Failure> {
    if path.is_empty() {
        return Err(Failure::Usage("a path must not be empty".into()));
    }
    let p = std::path::absolute(Path::new(path))
        .map_err(|e| Failure::Usage(format!("cannot make {path:?} absolute: {e}")))?;
    p.into_os_string()
        .into_string()
        .map_err(|_| Failure::Usage(format!("{path:?} is not valid UTF-8")))
}

struct Caller {
    client: Client,
    timeout: Duration,
}

/// Awaits one call within the timeout; a failed call names its method.
async fn call<T>(
    method: &str,
    timeout: Duration,
    fut: impl Future<Output = Result<tonic::Response<T>, Status>>,
) -> Result<T, Failure> {
    match tokio::time::timeout(timeout, fut).await {
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(s)) => Err(Failure::status(method, &s)),
        Err(_) => Err(Failure::Call(format!(
            "{method}: DEADLINE_EXCEEDED: no answer within {}s (--timeout)",
            timeout.as_secs()
        ))),
    }
}

/// Every page of a list call: `fetch` gets the starting token and returns
/// one page and the next token. Stops at an empty token, or at a token that
/// does not move (a driver that would loop).
async fn all_pages<T, F, Fut>(mut fetch: F) -> Result<Vec<T>, Failure>
where
    F: FnMut(String) -> Fut,
    Fut: Future<Output = Result<(Vec<T>, String), Failure>>,
{
    let mut all = Vec::new();
    let mut token = String::new();
    loop {
        let (page, next) = fetch(token.clone()).await?;
        all.extend(page);
        if next.is_empty() || next == token {
            return Ok(all);
        }
        token = next;
    }
}

impl Caller {
    async fn command(&mut self, cmd: &CtlCommand, p: Prepared) -> Result<Printed, Failure> {
        let t = self.timeout;
        let ctrl = &mut self.client.controller;
        let node = &mut self.client.node;
        match cmd {
            CtlCommand::Info => self.info().await,
            CtlCommand::CreateVolume(a) => {
                let req = create_volume_request(a, p);
                let r = call("CreateVolume", t, ctrl.create_volume(req)).await?;
                let v = VolumeOut::from(r.volume.as_ref());
                Ok(Printed {
                    text: fields(&v.fields()),
                    json: json!({ "volume": v }),
                })
            }
            CtlCommand::DeleteVolume { id, .. } => {
                let req = csi::DeleteVolumeRequest {
                    volume_id: id.clone(),
                    secrets: p.secrets,
                };
                call("DeleteVolume", t, ctrl.delete_volume(req)).await?;
                Ok(done(
                    json!({ "deleted": true, "volume_id": id }),
                    format!("deleted {id}"),
                ))
            }
            CtlCommand::ListVolumes { page_size } => {
                let volumes = all_pages(|token| {
                    let req = csi::ListVolumesRequest {
                        max_entries: *page_size,
                        starting_token: token,
                    };
                    let mut c = ctrl.clone();
                    async move {
                        let r = call("ListVolumes", t, c.list_volumes(req)).await?;
                        let page = r.entries.iter().map(|e| VolumeOut::from(e.volume.as_ref()));
                        Ok((page.collect(), r.next_token))
                    }
                })
                .await?;
                let rows: Vec<Vec<String>> = volumes.iter().map(VolumeOut::row).collect();
                Ok(Printed {
                    text: table(
                        &["VOLUME_ID", "CAPACITY", "NODE", "SOURCE"],
                        &rows,
                        "volumes",
                    ),
                    json: json!({ "volumes": volumes }),
                })
            }
            CtlCommand::GetVolume { id } => {
                let req = csi::ControllerGetVolumeRequest {
                    volume_id: id.clone(),
                };
                let r = call("ControllerGetVolume", t, ctrl.controller_get_volume(req)).await?;
                let v = VolumeOut::from(r.volume.as_ref());
                let status = r.status.as_ref().map(|s| StatusOut {
                    published_node_ids: s.published_node_ids.clone(),
                    volume_condition: s.volume_condition.as_ref().map(ConditionOut::from),
                });
                let mut lines = v.fields();
                if let Some(s) = &status {
                    lines.push(("published on", s.published_node_ids.join(", ")));
                    if let Some(c) = &s.volume_condition {
                        lines.push(("condition", c.text()));
                    }
                }
                Ok(Printed {
                    text: fields(&lines),
                    json: json!({ "volume": v, "status": status }),
                })
            }
            CtlCommand::ExpandVolume {
                id, size, block, ..
            } => {
                let req = csi::ControllerExpandVolumeRequest {
                    volume_id: id.clone(),
                    capacity_range: Some(csi::CapacityRange {
                        required_bytes: *size,
                        limit_bytes: 0,
                    }),
                    secrets: p.secrets,
                    volume_capability: block.then(block_capability),
                };
                let r = call(
                    "ControllerExpandVolume",
                    t,
                    ctrl.controller_expand_volume(req),
                )
                .await?;
                Ok(Printed {
                    text: fields(&[
                        ("volume_id", id.clone()),
                        ("capacity", bytes(r.capacity_bytes)),
                        ("node expansion", yes_no(r.node_expansion_required).into()),
                    ]),
                    json: json!({
                        "volume_id": id,
                        "capacity_bytes": r.capacity_bytes,
                        "node_expansion_required": r.node_expansion_required,
                    }),
                })
            }
            CtlCommand::CreateSnapshot {
                name,
                source_volume_id,
                ..
            } => {
                let req = csi::CreateSnapshotRequest {
                    source_volume_id: source_volume_id.clone(),
                    name: name.clone(),
                    secrets: p.secrets,
                    parameters: p.params,
                };
                let r = call("CreateSnapshot", t, ctrl.create_snapshot(req)).await?;
                let s = SnapshotOut::from(r.snapshot.as_ref());
                Ok(Printed {
                    text: fields(&s.fields()),
                    json: json!({ "snapshot": s }),
                })
            }
            CtlCommand::DeleteSnapshot { id, .. } => {
                let req = csi::DeleteSnapshotRequest {
                    snapshot_id: id.clone(),
                    secrets: p.secrets,
                };
                call("DeleteSnapshot", t, ctrl.delete_snapshot(req)).await?;
                Ok(done(
                    json!({ "deleted": true, "snapshot_id": id }),
                    format!("deleted {id}"),
                ))
            }
            CtlCommand::ListSnapshots {
                source,
                id,
                page_size,
                ..
            } => {
                let snapshots = all_pages(|token| {
                    let req = csi::ListSnapshotsRequest {
                        max_entries: *page_size,
                        starting_token: token,
                        source_volume_id: source.clone().unwrap_or_default(),
                        snapshot_id: id.clone().unwrap_or_default(),
                        secrets: p.secrets.clone(),
                    };
                    let mut c = ctrl.clone();
                    async move {
                        let r = call("ListSnapshots", t, c.list_snapshots(req)).await?;
                        let page = r
                            .entries
                            .iter()
                            .map(|e| SnapshotOut::from(e.snapshot.as_ref()));
                        Ok((page.collect(), r.next_token))
                    }
                })
                .await?;
                let rows: Vec<Vec<String>> = snapshots.iter().map(SnapshotOut::row).collect();
                let header = [
                    "SNAPSHOT_ID",
                    "SOURCE_VOLUME_ID",
                    "SIZE",
                    "READY",
                    "CREATED",
                ];
                Ok(Printed {
                    text: table(&header, &rows, "snapshots"),
                    json: json!({ "snapshots": snapshots }),
                })
            }
            CtlCommand::Stage {
                id,
                staging_path,
                capability,
                ..
            } => {
                let path = absolute(staging_path)?;
                let req = csi::NodeStageVolumeRequest {
                    volume_id: id.clone(),
                    publish_context: HashMap::new(),
                    staging_target_path: path.clone(),
                    volume_capability: Some(capability.wire()),
                    secrets: p.secrets,
                    volume_context: p.context,
                };
                call("NodeStageVolume", t, node.node_stage_volume(req)).await?;
                Ok(done(
                    json!({ "staged": true, "volume_id": id, "staging_target_path": path }),
                    format!("staged {id} at {path}"),
                ))
            }
            CtlCommand::Unstage { id, staging_path } => {
                let path = absolute(staging_path)?;
                let req = csi::NodeUnstageVolumeRequest {
                    volume_id: id.clone(),
                    staging_target_path: path.clone(),
                };
                call("NodeUnstageVolume", t, node.node_unstage_volume(req)).await?;
                Ok(done(
                    json!({ "unstaged": true, "volume_id": id, "staging_target_path": path }),
                    format!("unstaged {id} from {path}"),
                ))
            }
            CtlCommand::Publish {
                id,
                staging_path,
                target_path,
                readonly,
                capability,
                ..
            } => {
                let staging = absolute(staging_path)?;
                let target = absolute(target_path)?;
                let req = csi::NodePublishVolumeRequest {
                    volume_id: id.clone(),
                    publish_context: HashMap::new(),
                    staging_target_path: staging,
                    target_path: target.clone(),
                    volume_capability: Some(capability.wire()),
                    readonly: *readonly,
                    secrets: p.secrets,
                    volume_context: p.context,
                };
                call("NodePublishVolume", t, node.node_publish_volume(req)).await?;
                let ro = if *readonly { " (read-only)" } else { "" };
                Ok(done(
                    json!({
                        "published": true, "volume_id": id, "target_path": target,
                        "readonly": readonly,
                    }),
                    format!("published {id} at {target}{ro}"),
                ))
            }
            CtlCommand::Unpublish { id, target_path } => {
                let target = absolute(target_path)?;
                let req = csi::NodeUnpublishVolumeRequest {
                    volume_id: id.clone(),
                    target_path: target.clone(),
                };
                call("NodeUnpublishVolume", t, node.node_unpublish_volume(req)).await?;
                Ok(done(
                    json!({ "unpublished": true, "volume_id": id, "target_path": target }),
                    format!("unpublished {id} from {target}"),
                ))
            }
            CtlCommand::Stats { id, path } => {
                let path = absolute(path)?;
                let req = csi::NodeGetVolumeStatsRequest {
                    volume_id: id.clone(),
                    volume_path: path,
                    staging_target_path: String::new(),
                };
                let r = call("NodeGetVolumeStats", t, node.node_get_volume_stats(req)).await?;
                Ok(stats_printed(&r))
            }
            CtlCommand::Capacity { .. } => {
                let req = csi::GetCapacityRequest {
                    volume_capabilities: Vec::new(),
                    parameters: p.params,
                    accessible_topology: (!p.topology.is_empty()).then_some(csi::Topology {
                        segments: p.topology,
                    }),
                };
                let r = call("GetCapacity", t, ctrl.get_capacity(req)).await?;
                let opt = |v: Option<i64>| v.map(bytes).unwrap_or_else(|| "-".into());
                Ok(Printed {
                    text: fields(&[
                        ("available", bytes(r.available_capacity)),
                        ("maximum volume", opt(r.maximum_volume_size)),
                        ("minimum volume", opt(r.minimum_volume_size)),
                    ]),
                    json: json!({
                        "available_capacity": r.available_capacity,
                        "maximum_volume_size": r.maximum_volume_size,
                        "minimum_volume_size": r.minimum_volume_size,
                    }),
                })
            }
        }
    }

    async fn info(&mut self) -> Result<Printed, Failure> {
        let t = self.timeout;
        let c = &mut self.client;
        let plugin = call(
            "GetPluginInfo",
            t,
            c.identity.get_plugin_info(csi::GetPluginInfoRequest {}),
        )
        .await?;
        let caps = call(
            "GetPluginCapabilities",
            t,
            c.identity
                .get_plugin_capabilities(csi::GetPluginCapabilitiesRequest {}),
        )
        .await?;
        let probe = call("Probe", t, c.identity.probe(csi::ProbeRequest {})).await?;
        let plugin_capabilities: Vec<String> =
            caps.capabilities.iter().map(plugin_capability).collect();
        let controller_capabilities = if plugin_capabilities
            .iter()
            .any(|c| c == "CONTROLLER_SERVICE")
        {
            let r = call(
                "ControllerGetCapabilities",
                t,
                c.controller
                    .controller_get_capabilities(csi::ControllerGetCapabilitiesRequest {}),
            )
            .await?;
            Some(r.capabilities.iter().map(controller_capability).collect())
        } else {
            None
        };
        // A process without the node service answers UNIMPLEMENTED.
        let node_caps = tokio::time::timeout(
            t,
            c.node
                .node_get_capabilities(csi::NodeGetCapabilitiesRequest {}),
        )
        .await;
        let node_capabilities: Option<Vec<String>> = match node_caps {
            Ok(Ok(r)) => Some(
                r.into_inner()
                    .capabilities
                    .iter()
                    .map(node_capability)
                    .collect(),
            ),
            Ok(Err(s)) if s.code() == Code::Unimplemented => None,
            Ok(Err(s)) => return Err(Failure::status("NodeGetCapabilities", &s)),
            Err(_) => {
                return Err(Failure::Call(format!(
                    "NodeGetCapabilities: DEADLINE_EXCEEDED: no answer within {}s",
                    t.as_secs()
                )))
            }
        };
        let node = match node_capabilities {
            Some(_) => {
                let r = call(
                    "NodeGetInfo",
                    t,
                    c.node.node_get_info(csi::NodeGetInfoRequest {}),
                )
                .await?;
                Some(NodeOut {
                    node_id: r.node_id,
                    max_volumes_per_node: r.max_volumes_per_node,
                    accessible_topology: r.accessible_topology.map(|t| sorted(&t.segments)),
                })
            }
            None => None,
        };
        let info = InfoOut {
            name: plugin.name,
            vendor_version: plugin.vendor_version,
            manifest: sorted(&plugin.manifest),
            ready: probe.ready,
            plugin_capabilities,
            controller_capabilities,
            node_capabilities,
            node,
        };
        Ok(Printed {
            text: fields(&info.fields()),
            json: json!(info),
        })
    }
}

/// A raw block, single-node-writer capability (ControllerExpandVolume
/// only needs to know that it is block).
fn block_capability() -> csi::VolumeCapability {
    csi::VolumeCapability {
        block: Some(BlockVolume {}),
        mount: None,
        access_mode: Some(AccessMode {
            mode: WireMode::SingleNodeWriter as i32,
        }),
    }
}

fn done(json: serde_json::Value, text: String) -> Printed {
    Printed {
        json,
        text: format!("{text}\n"),
    }
}

fn create_volume_request(a: &CreateVolumeArgs, p: Prepared) -> csi::CreateVolumeRequest {
    use csi::volume_content_source::{SnapshotSource, Type, VolumeSource};
    let source = match (&a.snapshot_source, &a.volume_source) {
        (Some(id), _) => Some(Type::Snapshot(SnapshotSource {
            snapshot_id: id.clone(),
        })),
        (None, Some(id)) => Some(Type::Volume(VolumeSource {
            volume_id: id.clone(),
        })),
        (None, None) => None,
    };
    let topology = (!p.topology.is_empty()).then_some(csi::Topology {
        segments: p.topology,
    });
    csi::CreateVolumeRequest {
        name: a.name.clone(),
        capacity_range: (a.size.is_some() || a.limit.is_some()).then(|| csi::CapacityRange {
            required_bytes: a.size.unwrap_or(0),
            limit_bytes: a.limit.unwrap_or(0),
        }),
        volume_capabilities: vec![a.capability.wire()],
        parameters: p.params,
        secrets: p.secrets,
        volume_content_source: source.map(|t| csi::VolumeContentSource { r#type: Some(t) }),
        accessibility_requirements: topology.map(|t| csi::TopologyRequirement {
            requisite: vec![t.clone()],
            preferred: vec![t],
        }),
        mutable_parameters: HashMap::new(),
    }
}

fn stats_printed(r: &csi::NodeGetVolumeStatsResponse) -> Printed {
    let usage: Vec<UsageOut> = r
        .usage
        .iter()
        .map(|u| UsageOut {
            unit: csi::volume_usage::Unit::try_from(u.unit)
                .map(|u| u.as_str_name().to_string())
                .unwrap_or_else(|_| format!("UNKNOWN({})", u.unit)),
            total: u.total,
            used: u.used,
            available: u.available,
        })
        .collect();
    let condition = r.volume_condition.as_ref().map(ConditionOut::from);
    let rows: Vec<Vec<String>> = usage
        .iter()
        .map(|u| {
            let n = |v: i64| {
                if u.unit == "BYTES" {
                    bytes(v)
                } else {
                    v.to_string()
                }
            };
            vec![u.unit.clone(), n(u.total), n(u.used), n(u.available)]
        })
        .collect();
    let mut text = table(&["UNIT", "TOTAL", "USED", "AVAILABLE"], &rows, "usage");
    if let Some(c) = &condition {
        text.push_str(&format!("condition: {}\n", c.text()));
    }
    Printed {
        json: json!({ "usage": usage, "volume_condition": condition }),
        text,
    }
}

// ---------------------------------------------------------------------------
// Output documents (the JSON field names are part of ctl's interface)
// ---------------------------------------------------------------------------

#[derive(Debug, Serialize)]
struct InfoOut {
    name: String,
    vendor_version: String,
    manifest: BTreeMap<String, String>,
    ready: Option<bool>,
    plugin_capabilities: Vec<String>,
    /// None: no controller service here.
    controller_capabilities: Option<Vec<String>>,
    /// None: no node service here.
    node_capabilities: Option<Vec<String>>,
    node: Option<NodeOut>,
}

#[derive(Debug, Serialize)]
struct NodeOut {
    node_id: String,
    max_volumes_per_node: i64,
    accessible_topology: Option<BTreeMap<String, String>>,
}

impl InfoOut {
    fn fields(&self) -> Vec<(&'static str, String)> {
        let list = |v: &Option<Vec<String>>| match v {
            Some(v) => v.join(", "),
            None => "not served".to_string(),
        };
        let mut out = vec![
            ("name", self.name.clone()),
            ("version", self.vendor_version.clone()),
            (
                "ready",
                self.ready
                    .map(|r| r.to_string())
                    .unwrap_or_else(|| "unknown".into()),
            ),
            ("plugin", self.plugin_capabilities.join(", ")),
            ("controller", list(&self.controller_capabilities)),
            ("node", list(&self.node_capabilities)),
        ];
        if let Some(n) = &self.node {
            out.push(("node id", n.node_id.clone()));
            out.push((
                "max volumes",
                match n.max_volumes_per_node {
                    0 => "no limit".to_string(),
                    m => m.to_string(),
                },
            ));
            if let Some(t) = &n.accessible_topology {
                out.push(("topology", segments_text(t)));
            }
        }
        out
    }
}

#[derive(Debug, Serialize)]
struct SourceOut {
    /// `snapshot` or `volume`.
    kind: &'static str,
    id: String,
}

#[derive(Debug, Serialize)]
struct VolumeOut {
    volume_id: String,
    capacity_bytes: i64,
    volume_context: BTreeMap<String, String>,
    content_source: Option<SourceOut>,
    accessible_topology: Vec<BTreeMap<String, String>>,
}

impl From<Option<&csi::Volume>> for VolumeOut {
    fn from(v: Option<&csi::Volume>) -> Self {
        use csi::volume_content_source::Type;
        let Some(v) = v else {
            return VolumeOut {
                volume_id: String::new(),
                capacity_bytes: 0,
                volume_context: BTreeMap::new(),
                content_source: None,
                accessible_topology: Vec::new(),
            };
        };
        VolumeOut {
            volume_id: v.volume_id.clone(),
            capacity_bytes: v.capacity_bytes,
            volume_context: sorted(&v.volume_context),
            content_source: v
                .content_source
                .as_ref()
                .and_then(|s| s.r#type.as_ref())
                .map(|t| match t {
                    Type::Snapshot(s) => SourceOut {
                        kind: "snapshot",
                        id: s.snapshot_id.clone(),
                    },
                    Type::Volume(v) => SourceOut {
                        kind: "volume",
                        id: v.volume_id.clone(),
                    },
                }),
            accessible_topology: v
                .accessible_topology
                .iter()
                .map(|t| sorted(&t.segments))
                .collect(),
        }
    }
}

impl VolumeOut {
    fn source_text(&self) -> String {
        match &self.content_source {
            Some(s) => format!("{} {}", s.kind, s.id),
            None => "-".into(),
        }
    }

    fn topology_text(&self) -> String {
        let t: Vec<String> = self.accessible_topology.iter().map(segments_text).collect();
        if t.is_empty() {
            "-".into()
        } else {
            t.join(" | ")
        }
    }

    fn fields(&self) -> Vec<(&'static str, String)> {
        let mut out = vec![
            ("volume_id", self.volume_id.clone()),
            ("capacity", bytes(self.capacity_bytes)),
            ("topology", self.topology_text()),
            ("source", self.source_text()),
        ];
        if !self.volume_context.is_empty() {
            out.push(("context", segments_text(&self.volume_context)));
        }
        out
    }

    /// VOLUME_ID, CAPACITY, NODE (the node segment's value, else every
    /// segment), SOURCE.
    fn row(&self) -> Vec<String> {
        let nodes: Vec<String> = self
            .accessible_topology
            .iter()
            .map(|t| match t.get(TOPOLOGY_NODE_KEY) {
                Some(node) if t.len() == 1 => node.clone(),
                _ => segments_text(t),
            })
            .collect();
        let nodes = if nodes.is_empty() {
            "-".to_string()
        } else {
            nodes.join(" | ")
        };
        vec![
            self.volume_id.clone(),
            bytes_short(self.capacity_bytes),
            nodes,
            self.source_text(),
        ]
    }
}

#[derive(Debug, Serialize)]
struct SnapshotOut {
    snapshot_id: String,
    source_volume_id: String,
    size_bytes: i64,
    ready_to_use: bool,
    /// RFC 3339, UTC.
    creation_time: Option<String>,
}

impl From<Option<&csi::Snapshot>> for SnapshotOut {
    fn from(s: Option<&csi::Snapshot>) -> Self {
        let empty = csi::Snapshot::default();
        let s = s.unwrap_or(&empty);
        SnapshotOut {
            snapshot_id: s.snapshot_id.clone(),
            source_volume_id: s.source_volume_id.clone(),
            size_bytes: s.size_bytes,
            ready_to_use: s.ready_to_use,
            creation_time: s.creation_time.as_ref().map(|t| rfc3339(t.seconds)),
        }
    }
}

impl SnapshotOut {
    fn fields(&self) -> Vec<(&'static str, String)> {
        vec![
            ("snapshot_id", self.snapshot_id.clone()),
            ("source", self.source_volume_id.clone()),
            ("size", bytes(self.size_bytes)),
            ("ready", yes_no(self.ready_to_use).into()),
            (
                "created",
                self.creation_time.clone().unwrap_or_else(|| "-".into()),
            ),
        ]
    }

    fn row(&self) -> Vec<String> {
        vec![
            self.snapshot_id.clone(),
            self.source_volume_id.clone(),
            bytes_short(self.size_bytes),
            yes_no(self.ready_to_use).into(),
            self.creation_time.clone().unwrap_or_else(|| "-".into()),
        ]
    }
}

#[derive(Debug, Serialize)]
struct StatusOut {
    published_node_ids: Vec<String>,
    volume_condition: Option<ConditionOut>,
}

#[derive(Debug, Serialize)]
struct ConditionOut {
    abnormal: bool,
    message: String,
}

impl From<&csi::VolumeCondition> for ConditionOut {
    fn from(c: &csi::VolumeCondition) -> Self {
        ConditionOut {
            abnormal: c.abnormal,
            message: c.message.clone(),
        }
    }
}

impl ConditionOut {
    fn text(&self) -> String {
        let state = if self.abnormal { "abnormal" } else { "normal" };
        format!("{state}: {}", self.message)
    }
}

#[derive(Debug, Serialize)]
struct UsageOut {
    /// `BYTES` or `INODES`.
    unit: String,
    total: i64,
    used: i64,
    available: i64,
}

fn sorted(m: &HashMap<String, String>) -> BTreeMap<String, String> {
    m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

fn segments_text(m: &BTreeMap<String, String>) -> String {
    let parts: Vec<String> = m.iter().map(|(k, v)| format!("{k}={v}")).collect();
    parts.join(",")
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

fn plugin_capability(c: &csi::PluginCapability) -> String {
    use csi::plugin_capability::{service, volume_expansion, Type};
    match &c.r#type {
        Some(Type::Service(s)) => service::Type::try_from(s.r#type)
            .map(|t| t.as_str_name().to_string())
            .unwrap_or_else(|_| format!("UNKNOWN_SERVICE({})", s.r#type)),
        Some(Type::VolumeExpansion(e)) => volume_expansion::Type::try_from(e.r#type)
            .map(|t| format!("VOLUME_EXPANSION_{}", t.as_str_name()))
            .unwrap_or_else(|_| format!("UNKNOWN_EXPANSION({})", e.r#type)),
        None => "UNKNOWN".into(),
    }
}

fn controller_capability(c: &csi::ControllerServiceCapability) -> String {
    use csi::controller_service_capability::{rpc, Type};
    match &c.r#type {
        Some(Type::Rpc(r)) => rpc::Type::try_from(r.r#type)
            .map(|t| t.as_str_name().to_string())
            .unwrap_or_else(|_| format!("UNKNOWN({})", r.r#type)),
        None => "UNKNOWN".into(),
    }
}

fn node_capability(c: &csi::NodeServiceCapability) -> String {
    use csi::node_service_capability::{rpc, Type};
    match &c.r#type {
        Some(Type::Rpc(r)) => rpc::Type::try_from(r.r#type)
            .map(|t| t.as_str_name().to_string())
            .unwrap_or_else(|_| format!("UNKNOWN({})", r.r#type)),
        None => "UNKNOWN".into(),
    }
}

// ---------------------------------------------------------------------------
// Text formatting
// ---------------------------------------------------------------------------

/// `name  value` lines, values aligned.
fn fields(pairs: &[(&str, String)]) -> String {
    let width = pairs.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    pairs
        .iter()
        .map(|(k, v)| format!("{k:<width$}  {v}\n"))
        .collect()
}

/// A table with a header; columns two spaces apart, the last one unpadded.
/// No rows: one line saying so.
fn table(header: &[&str], rows: &[Vec<String>], what: &str) -> String {
    if rows.is_empty() {
        return format!("no {what}\n");
    }
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let last = cells.len().saturating_sub(1);
        let mut s = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i == last {
                s.push_str(cell);
            } else {
                s.push_str(&format!("{cell:<w$}  "));
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(header.to_vec());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

/// Bytes in binary units, exact to one decimal: `1 GiB`, `1.5 GiB`, `512 B`.
fn bytes_short(n: i64) -> String {
    const UNITS: &[&str] = &["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value.abs() >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if value.fract() == 0.0 {
        format!("{value} {}", UNITS[unit])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// `1 GiB (1073741824 bytes)`.
fn bytes(n: i64) -> String {
    if n.abs() < 1024 {
        format!("{n} bytes")
    } else {
        format!("{} ({n} bytes)", bytes_short(n))
    }
}

/// Seconds since the epoch as RFC 3339 UTC (proleptic Gregorian calendar).
fn rfc3339(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01, counting in 400-year eras
    // that start on March 1st.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Cli, Command};
    use clap::Parser;

    fn parse(args: &[&str]) -> Result<CtlArgs, clap::Error> {
        let mut argv = vec!["lodestone", "ctl"];
        argv.extend_from_slice(args);
        match Cli::try_parse_from(argv)?.command {
            Some(Command::Ctl(c)) => Ok(c),
            other => panic!("not ctl: {other:?}"),
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(size("1073741824"), Ok(1 << 30));
        assert_eq!(size("1Gi"), Ok(1 << 30));
        assert_eq!(size("512Mi"), Ok(512 << 20));
        assert_eq!(size("2G"), Ok(2_000_000_000));
        assert_eq!(size("1k"), Ok(1000));
        assert_eq!(size("0"), Ok(0));
        assert!(size("").is_err());
        assert!(size("Gi").is_err());
        assert!(size("1.5Gi").is_err());
        assert!(size("-1").is_err());
        assert!(size("1GB").is_err());
        assert!(size("9000Pi").is_err());
        assert!(size("99999999999999999999").is_err());
    }

    #[test]
    fn key_values() {
        assert_eq!(key_value("a=b"), Ok(("a".into(), "b".into())));
        assert_eq!(key_value("a=b=c"), Ok(("a".into(), "b=c".into())));
        assert_eq!(key_value("a="), Ok(("a".into(), String::new())));
        assert!(key_value("=b").is_err());
        assert!(key_value("ab").is_err());
    }

    #[test]
    fn parses_commands_and_options_anywhere() {
        let c = parse(&[
            "create-volume",
            "pvc-1",
            "--size",
            "1Gi",
            "--param",
            "deviceClass=thick",
            "--block",
            "--topology",
            "topology.lodestone.dev/node=n1",
            "-o",
            "json",
        ])
        .unwrap();
        assert_eq!(c.output, Output::Json);
        let CtlCommand::CreateVolume(a) = *c.command else {
            panic!()
        };
        assert_eq!(a.size, Some(1 << 30));
        assert!(a.capability.block);
        let p = Prepared::new(&CtlCommand::CreateVolume(a.clone())).unwrap();
        let req = create_volume_request(&a, p);
        assert_eq!(
            req.parameters.get("deviceClass").map(String::as_str),
            Some("thick")
        );
        let req_top = req.accessibility_requirements.unwrap();
        assert_eq!(req_top.requisite.len(), 1);
        assert_eq!(req.capacity_range.unwrap().required_bytes, 1 << 30);
        assert!(req.volume_capabilities[0].block.is_some());
        assert!(req.volume_capabilities[0].mount.is_none());
    }

    #[test]
    fn refuses_contradictions() {
        assert!(parse(&["create-volume", "x", "--block", "--fs-type", "xfs"]).is_err());
        assert!(parse(&[
            "create-volume",
            "x",
            "--snapshot-source",
            "a",
            "--volume-source",
            "b"
        ])
        .is_err());
        assert!(parse(&["create-volume"]).is_err());
        assert!(parse(&["create-volume", "x", "--size", "lots"]).is_err());
        assert!(parse(&["create-volume", "x", "--param", "novalue"]).is_err());
        assert!(parse(&["frobnicate"]).is_err());
        let e = parse(&["get-volume"]).unwrap_err();
        assert_eq!(e.exit_code(), 2);
    }

    #[test]
    fn secrets_are_never_taken_from_the_command_line() {
        for args in [
            &["delete-volume", "v", "--secret", "password=hunter2"][..],
            &["delete-volume", "v", "--secret=hunter2"],
        ] {
            let c = parse(args).unwrap();
            assert!(!format!("{c:?}").contains("hunter2"));
            let Err(Failure::Usage(m)) = Prepared::new(&c.command) else {
                panic!("--secret is a usage error")
            };
            assert!(
                !m.contains("hunter2") && m.contains("--secrets-file"),
                "{m}"
            );
        }
    }

    #[test]
    fn secrets_files() {
        let dir = tempfile::tempdir().unwrap();
        let lines = dir.path().join("lines");
        std::fs::write(&lines, "# comment\n\nuserID = admin\nkey=a=b c\r\n").unwrap();
        let c = parse(&[
            "delete-volume",
            "v",
            "--secrets-file",
            lines.to_str().unwrap(),
        ])
        .unwrap();
        let p = Prepared::new(&c.command).unwrap();
        assert_eq!(p.secrets.len(), 2);
        assert_eq!(p.secrets["userID"], " admin");
        assert_eq!(p.secrets["key"], "a=b c");
        let json = parse_secrets(r#" {"userID": "admin", "userKey": "hunter2"}"#).unwrap();
        assert_eq!(json["userKey"], "hunter2");
        assert!(parse_secrets("").unwrap().is_empty());
        for bad in [
            "hunter2",
            "=hunter2",
            "a=1\na=hunter2",
            r#"{"a": 5}"#,
            r#"{"a": "hunter2""#,
            r#"{"a": "x", "a": "hunter2"}"#,
        ] {
            match parse_secrets(bad) {
                Err(m) => assert!(!m.contains("hunter2"), "{m}"),
                // serde_json keeps the last of repeated keys
                Ok(map) => assert_eq!(bad, r#"{"a": "x", "a": "hunter2"}"#, "{map:?}"),
            }
        }
        let c = parse(&["delete-volume", "v", "--secrets-file", "/nonexistent/s"]).unwrap();
        assert!(matches!(Prepared::new(&c.command), Err(Failure::Usage(_))));
    }

    #[test]
    fn tables_and_fields() {
        let rows = vec![
            vec!["a".to_string(), "1 GiB".to_string(), "n1".to_string()],
            vec!["bbbb".to_string(), "2 MiB".to_string(), "n2".to_string()],
        ];
        assert_eq!(
            table(&["ID", "SIZE", "NODE"], &rows, "volumes"),
            "ID    SIZE   NODE\na     1 GiB  n1\nbbbb  2 MiB  n2\n"
        );
        assert_eq!(table(&["ID"], &[], "volumes"), "no volumes\n");
        assert_eq!(
            fields(&[("name", "x".into()), ("version", "1".into())]),
            "name     x\nversion  1\n"
        );
    }

    #[test]
    fn byte_counts() {
        assert_eq!(bytes_short(512), "512 B");
        assert_eq!(bytes_short(1 << 30), "1 GiB");
        assert_eq!(bytes_short(3 << 29), "1.5 GiB");
        assert_eq!(bytes(1 << 20), "1 MiB (1048576 bytes)");
        assert_eq!(bytes(10), "10 bytes");
    }

    #[test]
    fn timestamps() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_763_769_601), "2025-11-22T00:00:01Z");
        assert_eq!(rfc3339(-1), "1969-12-31T23:59:59Z");
    }

    #[test]
    fn volume_rows_show_the_node() {
        let v = csi::Volume {
            capacity_bytes: 1 << 30,
            volume_id: "lvm1:n1:thin:00".into(),
            accessible_topology: vec![csi::Topology {
                segments: [(TOPOLOGY_NODE_KEY.to_string(), "n1".to_string())].into(),
            }],
            ..Default::default()
        };
        let out = VolumeOut::from(Some(&v));
        assert_eq!(out.row(), vec!["lvm1:n1:thin:00", "1 GiB", "n1", "-"]);
        let doc = serde_json::to_value(&out).unwrap();
        assert_eq!(doc["capacity_bytes"], 1 << 30);
        assert_eq!(doc["accessible_topology"][0][TOPOLOGY_NODE_KEY], "n1");
        assert!(doc["content_source"].is_null());
    }
}
