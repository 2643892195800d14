//! CSI Controller service over a [`ControllerBackend`].

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::core::backend::{
    ControllerBackend, CreateSnapshot, CreateVolume, Secrets, SnapshotInfo, Source, VolumeInfo,
};
use crate::core::capacity::Range;
use crate::core::locks::OpLocks;
use crate::core::request::{
    parse_capabilities, parse_capability, require_id, storage_params, validate_name,
};
use crate::csi::controller_server::Controller;
use crate::csi::controller_service_capability::{self, rpc};
use crate::csi::*;
use crate::driver::traced;
use crate::error::{Error, Result};
use crate::invalid;

pub struct ControllerService {
    pub backend: Arc<dyn ControllerBackend>,
    pub locks: OpLocks,
}

impl ControllerService {
    /// NOT_FOUND for a volume id this backend could never have issued (no
    /// volume can have it), without asking the backend.
    fn volume_id_may_exist(&self, id: &str) -> Result<()> {
        match self.backend.is_valid_id(id) {
            true => Ok(()),
            false => Err(Error::NotFound(format!("volume {id} does not exist"))),
        }
    }

    /// The same for snapshot ids.
    fn snapshot_id_may_exist(&self, id: &str) -> Result<()> {
        match self.backend.is_valid_snapshot_id(id) {
            true => Ok(()),
            false => Err(Error::NotFound(format!("snapshot {id} does not exist"))),
        }
    }
}

fn to_volume(v: &VolumeInfo) -> Volume {
    Volume {
        capacity_bytes: v.capacity as i64,
        volume_id: v.id.clone(),
        volume_context: v.context.clone().into_iter().collect(),
        content_source: v.source.as_ref().map(|s| VolumeContentSource {
            r#type: Some(match s {
                Source::Snapshot(id) => {
                    volume_content_source::Type::Snapshot(volume_content_source::SnapshotSource {
                        snapshot_id: id.clone(),
                    })
                }
                Source::Volume(id) => {
                    volume_content_source::Type::Volume(volume_content_source::VolumeSource {
                        volume_id: id.clone(),
                    })
                }
            }),
        }),
        accessible_topology: v
            .topology
            .iter()
            .map(|s| Topology {
                segments: s.clone().into_iter().collect(),
            })
            .collect(),
    }
}

fn to_snapshot(s: &SnapshotInfo) -> Snapshot {
    Snapshot {
        size_bytes: s.size as i64,
        snapshot_id: s.id.clone(),
        source_volume_id: s.source_volume_id.clone(),
        creation_time: Some(prost_types::Timestamp {
            seconds: s.created,
            nanos: 0,
        }),
        ready_to_use: s.ready,
        group_snapshot_id: String::new(),
    }
}

fn source_of(src: Option<&VolumeContentSource>) -> Result<Option<Source>> {
    let Some(src) = src else { return Ok(None) };
    match &src.r#type {
        Some(volume_content_source::Type::Snapshot(s)) => Ok(Some(Source::Snapshot(
            require_id(&s.snapshot_id, "snapshot_id")?.to_string(),
        ))),
        Some(volume_content_source::Type::Volume(v)) => Ok(Some(Source::Volume(
            require_id(&v.volume_id, "volume_id")?.to_string(),
        ))),
        None => Err(invalid!(
            "volume_content_source names neither a snapshot nor a volume"
        )),
    }
}

/// The operation lock CreateVolume takes on its source, shared: the key
/// DeleteVolume or DeleteSnapshot (and expansion) take exclusively for that
/// id, so a source is never copied while it is removed or grown, yet many
/// clones of one source run at once.
fn source_lock_key(source: Option<&Source>) -> Option<String> {
    match source {
        Some(Source::Volume(id)) => Some(format!("vol:{id}")),
        Some(Source::Snapshot(id)) => Some(format!("snap:{id}")),
        None => None,
    }
}

fn range_of(r: Option<&CapacityRange>) -> Result<Range> {
    match r {
        None => Ok(Range::default()),
        Some(r) => Range::new(r.required_bytes, r.limit_bytes),
    }
}

/// GetSnapshot is served but not advertised: GET_SNAPSHOT is an alpha
/// capability that csi-sanity 5.4 rejects as unknown.
const CAPABILITIES: &[rpc::Type] = &[
    rpc::Type::CreateDeleteVolume,
    rpc::Type::ListVolumes,
    rpc::Type::GetCapacity,
    rpc::Type::ExpandVolume,
    rpc::Type::GetVolume,
    rpc::Type::SingleNodeMultiWriter,
    rpc::Type::CreateDeleteSnapshot,
    rpc::Type::ListSnapshots,
    rpc::Type::CloneVolume,
];

fn unimplemented<T>(what: &str) -> Result<Response<T>, Status> {
    Err(Status::unimplemented(format!(
        "{what} is not supported by this driver"
    )))
}

#[tonic::async_trait]
impl Controller for ControllerService {
    /// Creates a volume, or returns the one an earlier call with the same
    /// name made. Same name with incompatible parameters: ALREADY_EXISTS.
    async fn create_volume(
        &self,
        req: Request<CreateVolumeRequest>,
    ) -> Result<Response<CreateVolumeResponse>, Status> {
        let req = req.into_inner();
        traced("CreateVolume", &req.name, async {
            validate_name(&req.name, "name")?;
            let capabilities = parse_capabilities(&req.volume_capabilities)?;
            let range = range_of(req.capacity_range.as_ref())?;
            let params = storage_params(
                &req.parameters,
                self.backend.parameter_keys(),
                self.backend.json_parameter_keys(),
            )?;
            if !req.mutable_parameters.is_empty() {
                // Only for plugins with MODIFY_VOLUME, which this one lacks.
                return Err(invalid!(
                    "mutable_parameters are not supported (the driver does not offer \
                     MODIFY_VOLUME)"
                ));
            }
            let source = source_of(req.volume_content_source.as_ref())?;
            match &source {
                Some(Source::Volume(id)) => self.volume_id_may_exist(id)?,
                Some(Source::Snapshot(id)) => self.snapshot_id_may_exist(id)?,
                None => {}
            }
            // The source is locked too: a clone must not copy a volume or
            // snapshot that a DeleteVolume or DeleteSnapshot is removing.
            let _guard = self.locks.try_lock_shared(
                [format!("name:{}", req.name)],
                source_lock_key(source.as_ref()),
            )?;
            let create = CreateVolume {
                name: req.name.clone(),
                range,
                params,
                capabilities,
                requirement: req.accessibility_requirements.clone(),
                source,
                secrets: Secrets::from(&req.secrets),
            };
            let v = self.backend.create_volume(&create).await?;
            Ok(CreateVolumeResponse {
                volume: Some(to_volume(&v)),
            })
        })
        .await
    }

    /// Deletes a volume; an unknown or malformed id is success.
    async fn delete_volume(
        &self,
        req: Request<DeleteVolumeRequest>,
    ) -> Result<Response<DeleteVolumeResponse>, Status> {
        let req = req.into_inner();
        traced("DeleteVolume", &req.volume_id, async {
            require_id(&req.volume_id, "volume_id")?;
            if !self.backend.is_valid_id(&req.volume_id) {
                // No volume can have this id: it is already gone.
                return Ok(DeleteVolumeResponse {});
            }
            let _guard = self.locks.try_lock([format!("vol:{}", req.volume_id)])?;
            self.backend
                .delete_volume(&req.volume_id, &Secrets::from(&req.secrets))
                .await?;
            Ok(DeleteVolumeResponse {})
        })
        .await
    }

    async fn controller_publish_volume(
        &self,
        _: Request<ControllerPublishVolumeRequest>,
    ) -> Result<Response<ControllerPublishVolumeResponse>, Status> {
        unimplemented("ControllerPublishVolume")
    }

    async fn controller_unpublish_volume(
        &self,
        _: Request<ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<ControllerUnpublishVolumeResponse>, Status> {
        unimplemented("ControllerUnpublishVolume")
    }

    /// Confirms the capabilities if the volume exists and supports them all;
    /// otherwise leaves `confirmed` empty and says why.
    async fn validate_volume_capabilities(
        &self,
        req: Request<ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<ValidateVolumeCapabilitiesResponse>, Status> {
        let req = req.into_inner();
        traced("ValidateVolumeCapabilities", &req.volume_id, async {
            require_id(&req.volume_id, "volume_id")?;
            if req.volume_capabilities.is_empty() {
                return Err(invalid!("volume_capabilities is required"));
            }
            for c in &req.volume_capabilities {
                if c.block.is_some() == c.mount.is_some() || c.access_mode.is_none() {
                    return Err(invalid!(
                        "each volume capability needs exactly one access type (block or mount) \
                         and an access_mode"
                    ));
                }
            }
            self.volume_id_may_exist(&req.volume_id)?;
            if self.backend.get_volume(&req.volume_id).await?.is_none() {
                return Err(Error::NotFound(format!(
                    "volume {} does not exist",
                    req.volume_id
                )));
            }
            // Confirmed echoes what was validated, and the CO compares it
            // with its request: confirm nothing unless every capability
            // and every parameter is one this driver understands.
            let mut unsupported: Vec<String> = req
                .volume_capabilities
                .iter()
                .filter_map(|c| parse_capability(c).err().map(|e| e.to_string()))
                .collect();
            if let Err(e) = storage_params(
                &req.parameters,
                self.backend.parameter_keys(),
                self.backend.json_parameter_keys(),
            ) {
                unsupported.push(e.to_string());
            }
            if !req.mutable_parameters.is_empty() {
                unsupported.push(
                    "mutable_parameters are not supported (the driver does not offer \
                     MODIFY_VOLUME)"
                        .to_string(),
                );
            }
            if !unsupported.is_empty() {
                return Ok(ValidateVolumeCapabilitiesResponse {
                    confirmed: None,
                    message: unsupported.join("; "),
                });
            }
            Ok(ValidateVolumeCapabilitiesResponse {
                confirmed: Some(validate_volume_capabilities_response::Confirmed {
                    volume_context: req.volume_context.clone(),
                    volume_capabilities: req.volume_capabilities.clone(),
                    parameters: req.parameters.clone(),
                    mutable_parameters: Default::default(),
                }),
                message: String::new(),
            })
        })
        .await
    }

    /// Lists volumes in id order. The page token is the last id returned, so
    /// a page stays valid when volumes come and go between calls.
    async fn list_volumes(
        &self,
        req: Request<ListVolumesRequest>,
    ) -> Result<Response<ListVolumesResponse>, Status> {
        let req = req.into_inner();
        traced("ListVolumes", &req.starting_token, async {
            if req.max_entries < 0 {
                return Err(invalid!("max_entries must not be negative"));
            }
            if !req.starting_token.is_empty() && !self.backend.is_valid_id(&req.starting_token) {
                return Err(Error::Aborted(format!(
                    "starting_token {:?} is not a token this driver issued",
                    req.starting_token
                )));
            }
            let all = self.backend.list_volumes().await?;
            let (entries, next_token) =
                page(&all, &req.starting_token, req.max_entries as usize, |v| {
                    &v.id
                });
            Ok(ListVolumesResponse {
                entries: entries
                    .iter()
                    .map(|v| list_volumes_response::Entry {
                        volume: Some(to_volume(v)),
                        status: None,
                    })
                    .collect(),
                next_token,
            })
        })
        .await
    }

    /// Capacity for the class the parameters name, within the topology given.
    async fn get_capacity(
        &self,
        req: Request<GetCapacityRequest>,
    ) -> Result<Response<GetCapacityResponse>, Status> {
        let req = req.into_inner();
        traced("GetCapacity", "", async {
            if !req.volume_capabilities.is_empty() {
                parse_capabilities(&req.volume_capabilities)?;
            }
            let params = storage_params(
                &req.parameters,
                self.backend.parameter_keys(),
                self.backend.json_parameter_keys(),
            )?;
            let cap = self
                .backend
                .capacity(&params, req.accessible_topology.as_ref())
                .await?;
            Ok(GetCapacityResponse {
                available_capacity: cap.available as i64,
                maximum_volume_size: Some(cap.maximum_volume as i64),
                minimum_volume_size: Some(cap.minimum_volume as i64),
            })
        })
        .await
    }

    async fn controller_get_capabilities(
        &self,
        _: Request<ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<ControllerGetCapabilitiesResponse>, Status> {
        let capabilities = CAPABILITIES
            .iter()
            .map(|t| ControllerServiceCapability {
                r#type: Some(controller_service_capability::Type::Rpc(
                    controller_service_capability::Rpc { r#type: *t as i32 },
                )),
            })
            .collect();
        Ok(Response::new(ControllerGetCapabilitiesResponse {
            capabilities,
        }))
    }

    /// Snapshots a volume, or returns the snapshot an earlier call with the
    /// same name made; same name with another source: ALREADY_EXISTS.
    async fn create_snapshot(
        &self,
        req: Request<CreateSnapshotRequest>,
    ) -> Result<Response<CreateSnapshotResponse>, Status> {
        let req = req.into_inner();
        traced("CreateSnapshot", &req.name, async {
            validate_name(&req.name, "name")?;
            require_id(&req.source_volume_id, "source_volume_id")?;
            let params =
                storage_params(&req.parameters, self.backend.snapshot_parameter_keys(), &[])?;
            self.volume_id_may_exist(&req.source_volume_id)?;
            let _guard = self.locks.try_lock([
                format!("snapname:{}", req.name),
                format!("vol:{}", req.source_volume_id),
            ])?;
            let create = CreateSnapshot {
                name: req.name.clone(),
                source_volume_id: req.source_volume_id.clone(),
                params,
                secrets: Secrets::from(&req.secrets),
            };
            let s = self.backend.create_snapshot(&create).await?;
            Ok(CreateSnapshotResponse {
                snapshot: Some(to_snapshot(&s)),
            })
        })
        .await
    }

    /// Deletes a snapshot; an unknown or malformed id is success.
    async fn delete_snapshot(
        &self,
        req: Request<DeleteSnapshotRequest>,
    ) -> Result<Response<DeleteSnapshotResponse>, Status> {
        let req = req.into_inner();
        traced("DeleteSnapshot", &req.snapshot_id, async {
            require_id(&req.snapshot_id, "snapshot_id")?;
            if !self.backend.is_valid_snapshot_id(&req.snapshot_id) {
                // No snapshot can have this id: it is already gone.
                return Ok(DeleteSnapshotResponse {});
            }
            let _guard = self.locks.try_lock([format!("snap:{}", req.snapshot_id)])?;
            self.backend
                .delete_snapshot(&req.snapshot_id, &Secrets::from(&req.secrets))
                .await?;
            Ok(DeleteSnapshotResponse {})
        })
        .await
    }

    /// Lists snapshots in id order, optionally one snapshot or those of one
    /// source volume; tokens work as for ListVolumes.
    async fn list_snapshots(
        &self,
        req: Request<ListSnapshotsRequest>,
    ) -> Result<Response<ListSnapshotsResponse>, Status> {
        let req = req.into_inner();
        traced("ListSnapshots", &req.starting_token, async {
            if req.max_entries < 0 {
                return Err(invalid!("max_entries must not be negative"));
            }
            if !req.starting_token.is_empty()
                && !self.backend.is_valid_snapshot_id(&req.starting_token)
            {
                return Err(Error::Aborted(format!(
                    "starting_token {:?} is not a token this driver issued",
                    req.starting_token
                )));
            }
            // Filtering by an id no snapshot or volume can have lists
            // nothing; one snapshot is looked up, not listed.
            let all: Vec<SnapshotInfo> = if (!req.snapshot_id.is_empty()
                && !self.backend.is_valid_snapshot_id(&req.snapshot_id))
                || (!req.source_volume_id.is_empty()
                    && !self.backend.is_valid_id(&req.source_volume_id))
            {
                Vec::new()
            } else if !req.snapshot_id.is_empty() {
                self.backend
                    .get_snapshot(&req.snapshot_id)
                    .await?
                    .into_iter()
                    .collect()
            } else {
                self.backend.list_snapshots().await?
            };
            let all: Vec<SnapshotInfo> = all
                .into_iter()
                .filter(|s| req.snapshot_id.is_empty() || s.id == req.snapshot_id)
                .filter(|s| {
                    req.source_volume_id.is_empty() || s.source_volume_id == req.source_volume_id
                })
                .collect();
            let (entries, next_token) =
                page(&all, &req.starting_token, req.max_entries as usize, |s| {
                    &s.id
                });
            Ok(ListSnapshotsResponse {
                entries: entries
                    .iter()
                    .map(|s| list_snapshots_response::Entry {
                        snapshot: Some(to_snapshot(s)),
                    })
                    .collect(),
                next_token,
            })
        })
        .await
    }

    async fn get_snapshot(
        &self,
        req: Request<GetSnapshotRequest>,
    ) -> Result<Response<GetSnapshotResponse>, Status> {
        let req = req.into_inner();
        traced("GetSnapshot", &req.snapshot_id, async {
            require_id(&req.snapshot_id, "snapshot_id")?;
            self.snapshot_id_may_exist(&req.snapshot_id)?;
            let s = self
                .backend
                .get_snapshot(&req.snapshot_id)
                .await?
                .ok_or_else(|| {
                    Error::NotFound(format!("snapshot {} does not exist", req.snapshot_id))
                })?;
            Ok(GetSnapshotResponse {
                snapshot: Some(to_snapshot(&s)),
            })
        })
        .await
    }

    /// Grows the volume; filesystem volumes then need NodeExpandVolume.
    async fn controller_expand_volume(
        &self,
        req: Request<ControllerExpandVolumeRequest>,
    ) -> Result<Response<ControllerExpandVolumeResponse>, Status> {
        let req = req.into_inner();
        traced("ControllerExpandVolume", &req.volume_id, async {
            require_id(&req.volume_id, "volume_id")?;
            let range = range_of(Some(
                req.capacity_range
                    .as_ref()
                    .ok_or_else(|| invalid!("capacity_range is required"))?,
            ))?;
            let block = match &req.volume_capability {
                Some(c) => parse_capability(c)?.is_block(),
                None => false,
            };
            self.volume_id_may_exist(&req.volume_id)?;
            let _guard = self.locks.try_lock([format!("vol:{}", req.volume_id)])?;
            let secrets = Secrets::from(&req.secrets);
            let size = self
                .backend
                .expand_volume(&req.volume_id, range, &secrets)
                .await?;
            Ok(ControllerExpandVolumeResponse {
                capacity_bytes: size as i64,
                node_expansion_required: !block,
            })
        })
        .await
    }

    async fn controller_get_volume(
        &self,
        req: Request<ControllerGetVolumeRequest>,
    ) -> Result<Response<ControllerGetVolumeResponse>, Status> {
        let req = req.into_inner();
        traced("ControllerGetVolume", &req.volume_id, async {
            require_id(&req.volume_id, "volume_id")?;
            self.volume_id_may_exist(&req.volume_id)?;
            let v = self
                .backend
                .get_volume(&req.volume_id)
                .await?
                .ok_or_else(|| {
                    Error::NotFound(format!("volume {} does not exist", req.volume_id))
                })?;
            Ok(ControllerGetVolumeResponse {
                volume: Some(to_volume(&v)),
                status: Some(controller_get_volume_response::VolumeStatus {
                    published_node_ids: Vec::new(),
                    volume_condition: None,
                }),
            })
        })
        .await
    }

    async fn controller_modify_volume(
        &self,
        _: Request<ControllerModifyVolumeRequest>,
    ) -> Result<Response<ControllerModifyVolumeResponse>, Status> {
        unimplemented("ControllerModifyVolume")
    }
}

/// One page of `items` (sorted by key) after `token`; the next token is the
/// last key of the page when more items follow.
pub(crate) fn page<'a, T>(
    items: &'a [T],
    token: &str,
    max: usize,
    key: impl Fn(&T) -> &str,
) -> (&'a [T], String) {
    let start = if token.is_empty() {
        0
    } else {
        items.partition_point(|i| key(i) <= token)
    };
    let rest = &items[start..];
    let n = if max == 0 {
        rest.len()
    } else {
        max.min(rest.len())
    };
    let next = if n < rest.len() {
        key(&rest[n - 1]).to_string()
    } else {
        String::new()
    };
    (&rest[..n], next)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use tokio::sync::{Notify, Semaphore};

    use crate::core::backend::Capacity;
    use crate::csi::volume_capability::{access_mode, AccessMode, MountVolume};

    /// A backend whose operations on ids or names starting with "slow" wait
    /// for `gate` after telling `entered`; everything else answers at once.
    struct Fake {
        gate: Semaphore,
        entered: Notify,
    }

    impl Fake {
        async fn maybe_hold(&self, id: &str) {
            assert!(
                !id.starts_with("bad"),
                "malformed id {id} reached the backend"
            );
            if id.starts_with("slow") {
                self.entered.notify_one();
                self.gate.acquire().await.expect("gate").forget();
            }
        }
    }

    fn volume(id: &str) -> VolumeInfo {
        VolumeInfo {
            id: id.to_string(),
            capacity: 1 << 20,
            topology: Vec::new(),
            context: BTreeMap::new(),
            abnormal: None,
            source: None,
        }
    }

    fn snapshot(id: &str, source: &str) -> SnapshotInfo {
        SnapshotInfo {
            id: id.to_string(),
            source_volume_id: source.to_string(),
            size: 1 << 20,
            created: 0,
            ready: true,
        }
    }

    #[tonic::async_trait]
    impl ControllerBackend for Fake {
        fn parameter_keys(&self) -> &'static [&'static str] {
            &[]
        }
        fn is_valid_id(&self, id: &str) -> bool {
            !id.starts_with("bad")
        }
        fn not_ready(&self) -> Option<String> {
            None
        }
        async fn create_volume(&self, req: &CreateVolume) -> Result<VolumeInfo> {
            self.maybe_hold(&req.name).await;
            Ok(volume(&req.name))
        }
        async fn delete_volume(&self, id: &str, _: &Secrets) -> Result<()> {
            self.maybe_hold(id).await;
            Ok(())
        }
        async fn get_volume(&self, id: &str) -> Result<Option<VolumeInfo>> {
            self.maybe_hold(id).await;
            Ok(Some(volume(id)))
        }
        async fn list_volumes(&self) -> Result<Vec<VolumeInfo>> {
            Ok(Vec::new())
        }
        async fn expand_volume(&self, id: &str, _: Range, _: &Secrets) -> Result<u64> {
            self.maybe_hold(id).await;
            Ok(1 << 20)
        }
        async fn capacity(
            &self,
            _: &BTreeMap<String, String>,
            _: Option<&Topology>,
        ) -> Result<Capacity> {
            Ok(Capacity::default())
        }
        fn snapshot_parameter_keys(&self) -> &'static [&'static str] {
            &[]
        }
        fn is_valid_snapshot_id(&self, id: &str) -> bool {
            !id.starts_with("bad")
        }
        async fn create_snapshot(&self, req: &CreateSnapshot) -> Result<SnapshotInfo> {
            self.maybe_hold(&req.source_volume_id).await;
            Ok(SnapshotInfo {
                id: req.name.clone(),
                source_volume_id: req.source_volume_id.clone(),
                size: 1 << 20,
                created: 0,
                ready: true,
            })
        }
        async fn delete_snapshot(&self, id: &str, _: &Secrets) -> Result<()> {
            self.maybe_hold(id).await;
            Ok(())
        }
        async fn get_snapshot(&self, id: &str) -> Result<Option<SnapshotInfo>> {
            self.maybe_hold(id).await;
            Ok(Some(snapshot(id, "vol-1")))
        }
        async fn list_snapshots(&self) -> Result<Vec<SnapshotInfo>> {
            Ok(vec![
                snapshot("snap-1", "vol-1"),
                snapshot("snap-2", "vol-2"),
            ])
        }
    }

    fn service() -> (Arc<Fake>, Arc<ControllerService>) {
        let fake = Arc::new(Fake {
            gate: Semaphore::new(0),
            entered: Notify::new(),
        });
        let svc = Arc::new(ControllerService {
            backend: fake.clone(),
            locks: OpLocks::default(),
        });
        (fake, svc)
    }

    fn create_from(name: &str, source: volume_content_source::Type) -> CreateVolumeRequest {
        CreateVolumeRequest {
            name: name.to_string(),
            volume_capabilities: vec![VolumeCapability {
                block: None,
                mount: Some(MountVolume::default()),
                access_mode: Some(AccessMode {
                    mode: access_mode::Mode::SingleNodeWriter as i32,
                }),
            }],
            volume_content_source: Some(VolumeContentSource {
                r#type: Some(source),
            }),
            ..Default::default()
        }
    }

    fn from_volume(id: &str) -> volume_content_source::Type {
        volume_content_source::Type::Volume(volume_content_source::VolumeSource {
            volume_id: id.to_string(),
        })
    }

    fn from_snapshot(id: &str) -> volume_content_source::Type {
        volume_content_source::Type::Snapshot(volume_content_source::SnapshotSource {
            snapshot_id: id.to_string(),
        })
    }

    fn delete_volume_req(id: &str) -> Request<DeleteVolumeRequest> {
        Request::new(DeleteVolumeRequest {
            volume_id: id.to_string(),
            ..Default::default()
        })
    }

    fn delete_snapshot_req(id: &str) -> Request<DeleteSnapshotRequest> {
        Request::new(DeleteSnapshotRequest {
            snapshot_id: id.to_string(),
            ..Default::default()
        })
    }

    /// While a source volume or snapshot is being deleted, CreateVolume from
    /// it is ABORTED; once the delete is done it proceeds.
    #[tokio::test]
    async fn a_clone_waits_for_the_deletion_of_its_source() {
        let (fake, svc) = service();
        let s = svc.clone();
        let deleting =
            tokio::spawn(async move { s.delete_volume(delete_volume_req("slow-v")).await });
        fake.entered.notified().await;
        let r = svc
            .create_volume(Request::new(create_from("clone-1", from_volume("slow-v"))))
            .await;
        assert_eq!(r.unwrap_err().code(), tonic::Code::Aborted);
        // Another source is not held up.
        svc.create_volume(Request::new(create_from("clone-2", from_volume("other"))))
            .await
            .unwrap();
        fake.gate.add_permits(1);
        deleting.await.unwrap().unwrap();
        svc.create_volume(Request::new(create_from("clone-1", from_volume("slow-v"))))
            .await
            .unwrap();

        let s = svc.clone();
        let deleting =
            tokio::spawn(async move { s.delete_snapshot(delete_snapshot_req("slow-s")).await });
        fake.entered.notified().await;
        let r = svc
            .create_volume(Request::new(create_from(
                "restore-1",
                from_snapshot("slow-s"),
            )))
            .await;
        assert_eq!(r.unwrap_err().code(), tonic::Code::Aborted);
        fake.gate.add_permits(1);
        deleting.await.unwrap().unwrap();
        svc.create_volume(Request::new(create_from(
            "restore-1",
            from_snapshot("slow-s"),
        )))
        .await
        .unwrap();
    }

    /// While a clone or restore is copying its source, deleting that source
    /// is ABORTED.
    #[tokio::test]
    async fn a_source_being_copied_cannot_be_deleted() {
        let (fake, svc) = service();
        for (source, volume) in [
            (from_volume("src-v"), true),
            (from_snapshot("src-s"), false),
        ] {
            let s = svc.clone();
            let creating = tokio::spawn(async move {
                s.create_volume(Request::new(create_from("slow-clone", source)))
                    .await
            });
            fake.entered.notified().await;
            let r = if volume {
                svc.delete_volume(delete_volume_req("src-v"))
                    .await
                    .map(|_| ())
            } else {
                svc.delete_snapshot(delete_snapshot_req("src-s"))
                    .await
                    .map(|_| ())
            };
            assert_eq!(r.unwrap_err().code(), tonic::Code::Aborted);
            fake.gate.add_permits(1);
            creating.await.unwrap().unwrap();
            if volume {
                svc.delete_volume(delete_volume_req("src-v")).await.unwrap();
            } else {
                svc.delete_snapshot(delete_snapshot_req("src-s"))
                    .await
                    .unwrap();
            }
        }
    }

    #[test]
    fn pages_by_last_key() {
        let items = vec!["a", "b", "c", "d", "e"];
        let (p, next) = page(&items, "", 2, |s| s);
        assert_eq!((p, next.as_str()), (&["a", "b"][..], "b"));
        let (p, next) = page(&items, &next, 2, |s| s);
        assert_eq!((p, next.as_str()), (&["c", "d"][..], "d"));
        let (p, next) = page(&items, &next, 2, |s| s);
        assert_eq!((p, next.as_str()), (&["e"][..], ""));
        // The token's own item is gone: the page starts after where it was.
        let items = vec!["a", "c", "d"];
        assert_eq!(page(&items, "b", 0, |s| s).0, &["c", "d"][..]);
        assert_eq!(page(&items, "", 0, |s| s), (&items[..], String::new()));
    }

    fn mount_cap(fs: &str) -> VolumeCapability {
        VolumeCapability {
            block: None,
            mount: Some(MountVolume {
                fs_type: fs.to_string(),
                ..Default::default()
            }),
            access_mode: Some(AccessMode {
                mode: access_mode::Mode::SingleNodeWriter as i32,
            }),
        }
    }

    /// Ids the backend could never have issued are answered here, and never
    /// reach the backend (the fake panics if they do): NOT_FOUND, OK for
    /// deletes, an empty list for ListSnapshots filters.
    #[tokio::test]
    async fn impossible_ids_are_answered_without_the_backend() {
        let (_, svc) = service();
        let code = |r: Result<(), Status>| r.map_err(|s| s.code()).err();
        let not_found = Some(tonic::Code::NotFound);
        let r = svc
            .controller_get_volume(Request::new(ControllerGetVolumeRequest {
                volume_id: "bad-v".into(),
            }))
            .await;
        assert_eq!(code(r.map(|_| ())), not_found);
        let r = svc
            .validate_volume_capabilities(Request::new(ValidateVolumeCapabilitiesRequest {
                volume_id: "bad-v".into(),
                volume_capabilities: vec![mount_cap("")],
                ..Default::default()
            }))
            .await;
        assert_eq!(code(r.map(|_| ())), not_found);
        let r = svc
            .controller_expand_volume(Request::new(ControllerExpandVolumeRequest {
                volume_id: "bad-v".into(),
                capacity_range: Some(CapacityRange {
                    required_bytes: 1 << 30,
                    limit_bytes: 0,
                }),
                ..Default::default()
            }))
            .await;
        assert_eq!(code(r.map(|_| ())), not_found);
        let r = svc
            .get_snapshot(Request::new(GetSnapshotRequest {
                snapshot_id: "bad-s".into(),
                ..Default::default()
            }))
            .await;
        assert_eq!(code(r.map(|_| ())), not_found);
        let r = svc
            .create_snapshot(Request::new(CreateSnapshotRequest {
                name: "snap".into(),
                source_volume_id: "bad-v".into(),
                ..Default::default()
            }))
            .await;
        assert_eq!(code(r.map(|_| ())), not_found);
        for source in [from_volume("bad-v"), from_snapshot("bad-s")] {
            let r = svc
                .create_volume(Request::new(create_from("from-bad", source)))
                .await;
            assert_eq!(code(r.map(|_| ())), not_found);
        }
        svc.delete_volume(delete_volume_req("bad-v")).await.unwrap();
        svc.delete_snapshot(delete_snapshot_req("bad-s"))
            .await
            .unwrap();
        for (snapshot_id, source_volume_id) in [
            ("bad-s", ""),
            ("", "bad-v"),
            ("snap-1", "bad-v"),
            ("bad-s", "vol-1"),
        ] {
            let r = svc
                .list_snapshots(Request::new(ListSnapshotsRequest {
                    snapshot_id: snapshot_id.into(),
                    source_volume_id: source_volume_id.into(),
                    ..Default::default()
                }))
                .await
                .unwrap()
                .into_inner();
            assert!(
                r.entries.is_empty(),
                "{snapshot_id} {source_volume_id}: {r:?}"
            );
        }
        // Well-formed filters still find what exists.
        let ids = |r: ListSnapshotsResponse| -> Vec<String> {
            r.entries
                .into_iter()
                .map(|e| e.snapshot.unwrap().snapshot_id)
                .collect()
        };
        for (snapshot_id, source_volume_id, want) in [
            ("snap-1", "", vec!["snap-1"]),
            ("snap-1", "vol-1", vec!["snap-1"]),
            ("snap-1", "vol-2", vec![]),
            ("", "vol-2", vec!["snap-2"]),
            ("", "", vec!["snap-1", "snap-2"]),
        ] {
            let r = svc
                .list_snapshots(Request::new(ListSnapshotsRequest {
                    snapshot_id: snapshot_id.into(),
                    source_volume_id: source_volume_id.into(),
                    ..Default::default()
                }))
                .await
                .unwrap()
                .into_inner();
            assert_eq!(ids(r), want, "{snapshot_id} {source_volume_id}");
        }
    }

    /// ValidateVolumeCapabilities of an existing volume confirms exactly
    /// what it was asked when everything is supported, and nothing (with a
    /// message) when a capability, a parameter or a mutable parameter is
    /// not.
    #[tokio::test]
    async fn validate_volume_capabilities_confirms_only_what_it_understands() {
        let (_, svc) = service();
        let validate = |caps: Vec<VolumeCapability>, params: &[(&str, &str)], mutable: bool| {
            let svc = svc.clone();
            let parameters = params
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            async move {
                svc.validate_volume_capabilities(Request::new(ValidateVolumeCapabilitiesRequest {
                    volume_id: "vol-1".into(),
                    volume_capabilities: caps,
                    parameters,
                    mutable_parameters: if mutable {
                        [("iops".to_string(), "1000".to_string())].into()
                    } else {
                        Default::default()
                    },
                    ..Default::default()
                }))
                .await
                .unwrap()
                .into_inner()
            }
        };
        let sidecar = ("csi.storage.k8s.io/pvc/name", "pvc-1");
        let ok = validate(vec![mount_cap("xfs")], &[sidecar], false).await;
        let confirmed = ok.confirmed.expect("confirmed");
        assert_eq!(confirmed.volume_capabilities, vec![mount_cap("xfs")]);
        assert_eq!(confirmed.parameters.len(), 1);
        for (caps, params, mutable) in [
            (vec![mount_cap("ntfs")], vec![], false),
            (vec![mount_cap("xfs")], vec![("noSuchKey", "1")], false),
            (vec![mount_cap("xfs")], vec![], true),
        ] {
            let r = validate(caps, &params, mutable).await;
            assert!(r.confirmed.is_none(), "{params:?} {mutable}: {r:?}");
            assert!(!r.message.is_empty());
        }
    }
}
