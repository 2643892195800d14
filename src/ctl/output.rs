//! What `lodestone ctl` prints: the JSON documents (their field names are
//! part of ctl's interface) and their compact text form.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;
use serde_json::json;
use tonic::Code;

use crate::config::TOPOLOGY_NODE_KEY;
use crate::csi;

/// What a command prints: a JSON document, or its text form.
pub(super) struct Printed {
    pub(super) json: serde_json::Value,
    pub(super) text: String,
}

pub(super) fn done(json: serde_json::Value, text: String) -> Printed {
    Printed {
        json,
        text: format!("{text}\n"),
    }
}

pub(super) fn stats_printed(r: &csi::NodeGetVolumeStatsResponse) -> Printed {
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
pub(super) struct InfoOut {
    pub(super) name: String,
    pub(super) vendor_version: String,
    pub(super) manifest: BTreeMap<String, String>,
    pub(super) ready: Option<bool>,
    pub(super) plugin_capabilities: Vec<String>,
    /// None: no controller service here.
    pub(super) controller_capabilities: Option<Vec<String>>,
    /// None: no node service here.
    pub(super) node_capabilities: Option<Vec<String>>,
    pub(super) node: Option<NodeOut>,
}

#[derive(Debug, Serialize)]
pub(super) struct NodeOut {
    pub(super) node_id: String,
    pub(super) max_volumes_per_node: i64,
    pub(super) accessible_topology: Option<BTreeMap<String, String>>,
}

impl InfoOut {
    pub(super) fn fields(&self) -> Vec<(&'static str, String)> {
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
pub(super) struct VolumeOut {
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

    pub(super) fn fields(&self) -> Vec<(&'static str, String)> {
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
    pub(super) fn row(&self) -> Vec<String> {
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
pub(super) struct SnapshotOut {
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
    pub(super) fn fields(&self) -> Vec<(&'static str, String)> {
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

    pub(super) fn row(&self) -> Vec<String> {
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
pub(super) struct StatusOut {
    pub(super) published_node_ids: Vec<String>,
    pub(super) volume_condition: Option<ConditionOut>,
}

#[derive(Debug, Serialize)]
pub(super) struct ConditionOut {
    pub(super) abnormal: bool,
    pub(super) message: String,
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
    pub(super) fn text(&self) -> String {
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

pub(super) fn sorted(m: &HashMap<String, String>) -> BTreeMap<String, String> {
    m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

fn segments_text(m: &BTreeMap<String, String>) -> String {
    let parts: Vec<String> = m.iter().map(|(k, v)| format!("{k}={v}")).collect();
    parts.join(",")
}

pub(super) fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

pub(super) fn plugin_capability(c: &csi::PluginCapability) -> String {
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

pub(super) fn controller_capability(c: &csi::ControllerServiceCapability) -> String {
    use csi::controller_service_capability::{rpc, Type};
    match &c.r#type {
        Some(Type::Rpc(r)) => rpc::Type::try_from(r.r#type)
            .map(|t| t.as_str_name().to_string())
            .unwrap_or_else(|_| format!("UNKNOWN({})", r.r#type)),
        None => "UNKNOWN".into(),
    }
}

pub(super) fn node_capability(c: &csi::NodeServiceCapability) -> String {
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
pub(super) fn fields(pairs: &[(&str, String)]) -> String {
    let width = pairs.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    pairs
        .iter()
        .map(|(k, v)| format!("{k:<width$}  {v}\n"))
        .collect()
}

/// A table with a header; columns two spaces apart, the last one unpadded.
/// No rows: one line saying so.
pub(super) fn table(header: &[&str], rows: &[Vec<String>], what: &str) -> String {
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
pub(super) fn bytes(n: i64) -> String {
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

/// An error and its sources on one line.
pub(super) fn error_chain(e: &dyn std::error::Error) -> String {
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

/// A status code as the gRPC spec names it (`INVALID_ARGUMENT`): tonic's
/// variant name in upper snake case.
pub(super) fn code_name(code: Code) -> String {
    let mut out = String::new();
    for (i, c) in format!("{code:?}").chars().enumerate() {
        if i > 0 && c.is_ascii_uppercase() {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn code_names_follow_the_grpc_spec() {
        let names: Vec<String> = (0..=16).map(|i| code_name(Code::from(i))).collect();
        assert_eq!(
            names,
            [
                "OK",
                "CANCELLED",
                "UNKNOWN",
                "INVALID_ARGUMENT",
                "DEADLINE_EXCEEDED",
                "NOT_FOUND",
                "ALREADY_EXISTS",
                "PERMISSION_DENIED",
                "RESOURCE_EXHAUSTED",
                "FAILED_PRECONDITION",
                "ABORTED",
                "OUT_OF_RANGE",
                "UNIMPLEMENTED",
                "INTERNAL",
                "UNAVAILABLE",
                "DATA_LOSS",
                "UNAUTHENTICATED",
            ]
        );
    }
}
