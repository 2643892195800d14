//! The command line of `lodestone ctl`, and what is checked and converted
//! before any call: sizes, KEY=VALUE pairs, secrets files, paths.

use std::collections::HashMap;
use std::path::Path;

use clap::{Subcommand, ValueEnum};

use super::Failure;
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
    pub(super) fn wire(&self) -> csi::VolumeCapability {
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
    /// The byte ranges of a snapshot that hold data (GetMetadataAllocated)
    /// or, with --base, that changed since an earlier snapshot of the same
    /// volume (GetMetadataDelta).
    Blocks {
        /// The snapshot id.
        snapshot: String,
        /// An earlier snapshot of the same volume.
        #[arg(long)]
        base: Option<String>,
        /// List from this byte offset on (rounded down by the driver).
        #[arg(long, value_parser = size, default_value = "0")]
        from: i64,
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

/// The parts of a command checked and converted before any call.
#[derive(Default)]
pub(super) struct Prepared {
    pub(super) secrets: HashMap<String, String>,
    pub(super) params: HashMap<String, String>,
    pub(super) context: HashMap<String, String>,
    pub(super) topology: HashMap<String, String>,
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
    pub(super) fn new(cmd: &CtlCommand) -> Result<Prepared, Failure> {
        let none = SecretArgs::default();
        let (secrets, params, context, topology): (&SecretArgs, &[_], &[_], &[_]) = match cmd {
            CtlCommand::CreateVolume(a) => (&a.secrets, &a.params, &[], &a.topology),
            CtlCommand::DeleteVolume { secrets, .. }
            | CtlCommand::ExpandVolume { secrets, .. }
            | CtlCommand::DeleteSnapshot { secrets, .. }
            | CtlCommand::ListSnapshots { secrets, .. }
            | CtlCommand::Blocks { secrets, .. } => (secrets, &[], &[], &[]),
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
pub(super) fn absolute(path: &str) -> Result<String, Failure> {
    if path.is_empty() {
        return Err(Failure::Usage("a path must not be empty".into()));
    }
    let p = std::path::absolute(Path::new(path))
        .map_err(|e| Failure::Usage(format!("cannot make {path:?} absolute: {e}")))?;
    p.into_os_string()
        .into_string()
        .map_err(|_| Failure::Usage(format!("{path:?} is not valid UTF-8")))
}

/// Parses `lodestone ctl ARGS` as the `lodestone` command line does: the
/// driver's flags beside the `ctl` subcommand.
#[cfg(test)]
pub(super) fn parse(args: &[&str]) -> Result<CtlArgs, clap::Error> {
    use clap::Parser;
    #[derive(Debug, Parser)]
    struct Cli {
        #[command(subcommand)]
        command: Top,
        #[command(flatten)]
        _run: crate::config::RunArgs,
    }
    #[derive(Debug, clap::Subcommand)]
    enum Top {
        Ctl(CtlArgs),
    }
    let mut argv = vec!["lodestone", "ctl"];
    argv.extend_from_slice(args);
    let Top::Ctl(c) = Cli::try_parse_from(argv)?.command;
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
