//! The RPCs of each `lodestone ctl` command: one small function per
//! command, each building its request, calling the driver within the
//! timeout and returning what to print.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use serde_json::json;
use tonic::{Code, Status};

use super::args::{absolute, CapabilityArgs, CreateVolumeArgs, CtlCommand, Prepared};
use super::output::{
    bytes, controller_capability, done, fields, node_capability, plugin_capability, sorted,
    stats_printed, table, yes_no, ConditionOut, InfoOut, NodeOut, Printed, SnapshotOut, StatusOut,
    VolumeOut,
};
use super::Failure;
use crate::client::Client;
use crate::csi;
use crate::csi::volume_capability::access_mode::Mode as WireMode;
use crate::csi::volume_capability::{AccessMode, BlockVolume};

pub(super) struct Caller {
    pub(super) client: Client,
    pub(super) timeout: Duration,
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
    /// Runs one command: a short dispatch to the function of each.
    pub(super) async fn command(
        &mut self,
        cmd: &CtlCommand,
        p: Prepared,
    ) -> Result<Printed, Failure> {
        use CtlCommand as C;
        match cmd {
            C::Info => self.info().await,
            C::CreateVolume(a) => self.create_volume(a, p).await,
            C::DeleteVolume { id, .. } => self.delete_volume(id, p).await,
            C::ListVolumes { page_size } => self.list_volumes(*page_size).await,
            C::GetVolume { id } => self.get_volume(id).await,
            C::ExpandVolume {
                id, size, block, ..
            } => self.expand_volume(id, *size, *block, p).await,
            C::CreateSnapshot {
                name,
                source_volume_id,
                ..
            } => self.create_snapshot(name, source_volume_id, p).await,
            C::DeleteSnapshot { id, .. } => self.delete_snapshot(id, p).await,
            C::ListSnapshots {
                source,
                id,
                page_size,
                ..
            } => {
                let filter = (source.as_deref(), id.as_deref());
                self.list_snapshots(filter, *page_size, p).await
            }
            C::Blocks {
                snapshot,
                base,
                from,
                ..
            } => self.blocks(snapshot, base.as_deref(), *from, p).await,
            C::Stage {
                id,
                staging_path,
                capability,
                ..
            } => self.stage(id, staging_path, capability, p).await,
            C::Unstage { id, staging_path } => self.unstage(id, staging_path).await,
            C::Publish {
                id,
                staging_path,
                target_path,
                readonly,
                capability,
                ..
            } => {
                let paths = (staging_path.as_str(), target_path.as_str());
                self.publish(id, paths, *readonly, capability, p).await
            }
            C::Unpublish { id, target_path } => self.unpublish(id, target_path).await,
            C::Stats { id, path } => self.stats(id, path).await,
            C::Capacity { .. } => self.capacity(p).await,
        }
    }

    async fn create_volume(
        &mut self,
        a: &CreateVolumeArgs,
        p: Prepared,
    ) -> Result<Printed, Failure> {
        let req = create_volume_request(a, p);
        let ctrl = &mut self.client.controller;
        let r = call("CreateVolume", self.timeout, ctrl.create_volume(req)).await?;
        let v = VolumeOut::from(r.volume.as_ref());
        Ok(Printed {
            text: fields(&v.fields()),
            json: json!({ "volume": v }),
        })
    }

    async fn delete_volume(&mut self, id: &str, p: Prepared) -> Result<Printed, Failure> {
        let req = csi::DeleteVolumeRequest {
            volume_id: id.to_string(),
            secrets: p.secrets,
        };
        let ctrl = &mut self.client.controller;
        call("DeleteVolume", self.timeout, ctrl.delete_volume(req)).await?;
        Ok(done(
            json!({ "deleted": true, "volume_id": id }),
            format!("deleted {id}"),
        ))
    }

    async fn list_volumes(&mut self, page_size: i32) -> Result<Printed, Failure> {
        let t = self.timeout;
        let ctrl = &self.client.controller;
        let volumes = all_pages(|token| {
            let req = csi::ListVolumesRequest {
                max_entries: page_size,
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

    async fn get_volume(&mut self, id: &str) -> Result<Printed, Failure> {
        let req = csi::ControllerGetVolumeRequest {
            volume_id: id.to_string(),
        };
        let ctrl = &mut self.client.controller;
        let r = call(
            "ControllerGetVolume",
            self.timeout,
            ctrl.controller_get_volume(req),
        )
        .await?;
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

    async fn expand_volume(
        &mut self,
        id: &str,
        size: i64,
        block: bool,
        p: Prepared,
    ) -> Result<Printed, Failure> {
        let req = csi::ControllerExpandVolumeRequest {
            volume_id: id.to_string(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: size,
                limit_bytes: 0,
            }),
            secrets: p.secrets,
            volume_capability: block.then(block_capability),
        };
        let ctrl = &mut self.client.controller;
        let r = call(
            "ControllerExpandVolume",
            self.timeout,
            ctrl.controller_expand_volume(req),
        )
        .await?;
        Ok(Printed {
            text: fields(&[
                ("volume_id", id.to_string()),
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

    async fn create_snapshot(
        &mut self,
        name: &str,
        source_volume_id: &str,
        p: Prepared,
    ) -> Result<Printed, Failure> {
        let req = csi::CreateSnapshotRequest {
            source_volume_id: source_volume_id.to_string(),
            name: name.to_string(),
            secrets: p.secrets,
            parameters: p.params,
        };
        let ctrl = &mut self.client.controller;
        let r = call("CreateSnapshot", self.timeout, ctrl.create_snapshot(req)).await?;
        let s = SnapshotOut::from(r.snapshot.as_ref());
        Ok(Printed {
            text: fields(&s.fields()),
            json: json!({ "snapshot": s }),
        })
    }

    async fn delete_snapshot(&mut self, id: &str, p: Prepared) -> Result<Printed, Failure> {
        let req = csi::DeleteSnapshotRequest {
            snapshot_id: id.to_string(),
            secrets: p.secrets,
        };
        let ctrl = &mut self.client.controller;
        call("DeleteSnapshot", self.timeout, ctrl.delete_snapshot(req)).await?;
        Ok(done(
            json!({ "deleted": true, "snapshot_id": id }),
            format!("deleted {id}"),
        ))
    }

    /// `filter`: the source volume and the snapshot id to list, if any.
    async fn blocks(
        &mut self,
        snapshot: &str,
        base: Option<&str>,
        from: i64,
        p: Prepared,
    ) -> Result<Printed, Failure> {
        use crate::client::{block_pages, BlockQuery};
        let query = match base {
            None => BlockQuery::Allocated(snapshot),
            Some(base) => BlockQuery::Delta {
                base,
                target: snapshot,
            },
        };
        let method = if base.is_some() {
            "GetMetadataDelta"
        } else {
            "GetMetadataAllocated"
        };
        let mut c = self.client.snapshot_metadata.clone();
        let read = async {
            let pages = block_pages(&mut c, query, from, 0, p.secrets).await?;
            Ok(tonic::Response::new(pages))
        };
        let pages = call(method, self.timeout, read).await?;
        let capacity = pages.last().map_or(0, |p| p.volume_capacity_bytes);
        let ranges: Vec<(i64, i64)> = pages.into_iter().flat_map(|p| p.ranges).collect();
        let total: i64 = ranges.iter().map(|r| r.1).sum();
        let rows: Vec<Vec<String>> = ranges
            .iter()
            .map(|(o, l)| vec![o.to_string(), l.to_string(), bytes(*l)])
            .collect();
        let what = if base.is_some() {
            "changed ranges"
        } else {
            "allocated ranges"
        };
        let mut text = table(&["OFFSET", "LENGTH", "SIZE"], &rows, what);
        if !ranges.is_empty() {
            let of = bytes(capacity);
            text.push_str(&format!(
                "{} {what}, {} of {of}\n",
                ranges.len(),
                bytes(total)
            ));
        }
        let listed: Vec<_> = ranges
            .iter()
            .map(|(o, l)| json!({ "offset": o, "length": l }))
            .collect();
        Ok(Printed {
            text,
            json: json!({ "volume_capacity_bytes": capacity, "bytes": total, "ranges": listed }),
        })
    }

    async fn list_snapshots(
        &mut self,
        (source, id): (Option<&str>, Option<&str>),
        page_size: i32,
        p: Prepared,
    ) -> Result<Printed, Failure> {
        let t = self.timeout;
        let ctrl = &self.client.controller;
        let snapshots = all_pages(|token| {
            let req = csi::ListSnapshotsRequest {
                max_entries: page_size,
                starting_token: token,
                source_volume_id: source.unwrap_or_default().to_string(),
                snapshot_id: id.unwrap_or_default().to_string(),
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

    async fn stage(
        &mut self,
        id: &str,
        staging_path: &str,
        capability: &CapabilityArgs,
        p: Prepared,
    ) -> Result<Printed, Failure> {
        let path = absolute(staging_path)?;
        let req = csi::NodeStageVolumeRequest {
            volume_id: id.to_string(),
            publish_context: HashMap::new(),
            staging_target_path: path.clone(),
            volume_capability: Some(capability.wire()),
            secrets: p.secrets,
            volume_context: p.context,
        };
        let node = &mut self.client.node;
        call("NodeStageVolume", self.timeout, node.node_stage_volume(req)).await?;
        Ok(done(
            json!({ "staged": true, "volume_id": id, "staging_target_path": path }),
            format!("staged {id} at {path}"),
        ))
    }

    async fn unstage(&mut self, id: &str, staging_path: &str) -> Result<Printed, Failure> {
        let path = absolute(staging_path)?;
        let req = csi::NodeUnstageVolumeRequest {
            volume_id: id.to_string(),
            staging_target_path: path.clone(),
        };
        let node = &mut self.client.node;
        call(
            "NodeUnstageVolume",
            self.timeout,
            node.node_unstage_volume(req),
        )
        .await?;
        Ok(done(
            json!({ "unstaged": true, "volume_id": id, "staging_target_path": path }),
            format!("unstaged {id} from {path}"),
        ))
    }

    /// `paths`: the staging path and the target path.
    async fn publish(
        &mut self,
        id: &str,
        (staging_path, target_path): (&str, &str),
        readonly: bool,
        capability: &CapabilityArgs,
        p: Prepared,
    ) -> Result<Printed, Failure> {
        let staging = absolute(staging_path)?;
        let target = absolute(target_path)?;
        let req = csi::NodePublishVolumeRequest {
            volume_id: id.to_string(),
            publish_context: HashMap::new(),
            staging_target_path: staging,
            target_path: target.clone(),
            volume_capability: Some(capability.wire()),
            readonly,
            secrets: p.secrets,
            volume_context: p.context,
        };
        let node = &mut self.client.node;
        call(
            "NodePublishVolume",
            self.timeout,
            node.node_publish_volume(req),
        )
        .await?;
        let ro = if readonly { " (read-only)" } else { "" };
        Ok(done(
            json!({
                "published": true, "volume_id": id, "target_path": target,
                "readonly": readonly,
            }),
            format!("published {id} at {target}{ro}"),
        ))
    }

    async fn unpublish(&mut self, id: &str, target_path: &str) -> Result<Printed, Failure> {
        let target = absolute(target_path)?;
        let req = csi::NodeUnpublishVolumeRequest {
            volume_id: id.to_string(),
            target_path: target.clone(),
        };
        let node = &mut self.client.node;
        call(
            "NodeUnpublishVolume",
            self.timeout,
            node.node_unpublish_volume(req),
        )
        .await?;
        Ok(done(
            json!({ "unpublished": true, "volume_id": id, "target_path": target }),
            format!("unpublished {id} from {target}"),
        ))
    }

    async fn stats(&mut self, id: &str, path: &str) -> Result<Printed, Failure> {
        let path = absolute(path)?;
        let req = csi::NodeGetVolumeStatsRequest {
            volume_id: id.to_string(),
            volume_path: path,
            staging_target_path: String::new(),
        };
        let node = &mut self.client.node;
        let r = call(
            "NodeGetVolumeStats",
            self.timeout,
            node.node_get_volume_stats(req),
        )
        .await?;
        Ok(stats_printed(&r))
    }

    async fn capacity(&mut self, p: Prepared) -> Result<Printed, Failure> {
        let req = csi::GetCapacityRequest {
            volume_capabilities: Vec::new(),
            parameters: p.params,
            accessible_topology: (!p.topology.is_empty()).then_some(csi::Topology {
                segments: p.topology,
            }),
        };
        let ctrl = &mut self.client.controller;
        let r = call("GetCapacity", self.timeout, ctrl.get_capacity(req)).await?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ctl::args::parse;
    use crate::ctl::Output;

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
}
