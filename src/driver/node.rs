//! CSI Node service over the shared [`NodeOps`].

use std::collections::BTreeMap;
use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::core::backend::Secrets;
use crate::core::locks::OpLocks;
use crate::core::node::NodeOps;
use crate::core::request::{existing_volume_path, parse_capability, require_id, validate_path};
use crate::csi::node_server::Node;
use crate::csi::node_service_capability::{self, rpc};
use crate::csi::volume_usage::Unit;
use crate::csi::*;
use crate::driver::traced;
use crate::error::{Error, Result};
use crate::invalid;

pub struct NodeService {
    pub ops: Arc<NodeOps>,
    pub locks: OpLocks,
    pub max_volumes: i64,
}

const CAPABILITIES: &[rpc::Type] = &[
    rpc::Type::StageUnstageVolume,
    rpc::Type::GetVolumeStats,
    rpc::Type::ExpandVolume,
    rpc::Type::VolumeCondition,
    rpc::Type::SingleNodeMultiWriter,
];

fn capability(c: Option<&VolumeCapability>) -> Result<crate::core::request::Capability> {
    parse_capability(c.ok_or_else(|| invalid!("volume_capability is required"))?)
}

impl NodeService {
    fn lock(&self, id: &str) -> Result<crate::core::locks::OpGuard> {
        self.locks.try_lock([format!("vol:{id}")])
    }
}

#[tonic::async_trait]
impl Node for NodeService {
    /// Formats a blank device and mounts it at the staging path (mount
    /// volumes); makes the device ready (block volumes). Idempotent.
    async fn node_stage_volume(
        &self,
        req: Request<NodeStageVolumeRequest>,
    ) -> Result<Response<NodeStageVolumeResponse>, Status> {
        let req = req.into_inner();
        traced("NodeStageVolume", &req.volume_id, async {
            require_id(&req.volume_id, "volume_id")?;
            let staging = validate_path(&req.staging_target_path, "staging_target_path")?;
            let cap = capability(req.volume_capability.as_ref())?;
            let _guard = self.lock(&req.volume_id)?;
            let context: BTreeMap<String, String> = req
                .volume_context
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let secrets = Secrets::from(&req.secrets);
            self.ops
                .stage(&req.volume_id, &staging, &cap, &context, &secrets)
                .await?;
            Ok(NodeStageVolumeResponse {})
        })
        .await
    }

    /// Unmounts the staging path. Nothing mounted there is success.
    async fn node_unstage_volume(
        &self,
        req: Request<NodeUnstageVolumeRequest>,
    ) -> Result<Response<NodeUnstageVolumeResponse>, Status> {
        let req = req.into_inner();
        traced("NodeUnstageVolume", &req.volume_id, async {
            require_id(&req.volume_id, "volume_id")?;
            let staging = validate_path(&req.staging_target_path, "staging_target_path")?;
            let _guard = self.lock(&req.volume_id)?;
            self.ops.unstage(&req.volume_id, &staging).await?;
            Ok(NodeUnstageVolumeResponse {})
        })
        .await
    }

    /// Bind-mounts the staged volume (or the device, for block) at the target.
    async fn node_publish_volume(
        &self,
        req: Request<NodePublishVolumeRequest>,
    ) -> Result<Response<NodePublishVolumeResponse>, Status> {
        let req = req.into_inner();
        traced("NodePublishVolume", &req.volume_id, async {
            require_id(&req.volume_id, "volume_id")?;
            let target = validate_path(&req.target_path, "target_path")?;
            let cap = capability(req.volume_capability.as_ref())?;
            if req.staging_target_path.is_empty() {
                return Err(Error::FailedPrecondition(
                    "staging_target_path is required: this driver stages volumes \
                     (STAGE_UNSTAGE_VOLUME); call NodeStageVolume first"
                        .to_string(),
                ));
            }
            let staging = validate_path(&req.staging_target_path, "staging_target_path")?;
            if target == staging {
                return Err(invalid!("target_path must differ from staging_target_path"));
            }
            let _guard = self.lock(&req.volume_id)?;
            self.ops
                .publish(&req.volume_id, &staging, &target, &cap, req.readonly)
                .await?;
            Ok(NodePublishVolumeResponse {})
        })
        .await
    }

    /// Unmounts the target and removes it. A target that is gone is success.
    async fn node_unpublish_volume(
        &self,
        req: Request<NodeUnpublishVolumeRequest>,
    ) -> Result<Response<NodeUnpublishVolumeResponse>, Status> {
        let req = req.into_inner();
        traced("NodeUnpublishVolume", &req.volume_id, async {
            require_id(&req.volume_id, "volume_id")?;
            let target = validate_path(&req.target_path, "target_path")?;
            let _guard = self.lock(&req.volume_id)?;
            self.ops.unpublish(&req.volume_id, &target).await?;
            Ok(NodeUnpublishVolumeResponse {})
        })
        .await
    }

    /// Bytes and inodes of a mounted volume, bytes of a block volume, and a
    /// condition that turns abnormal when the backing LV or the mount is gone.
    async fn node_get_volume_stats(
        &self,
        req: Request<NodeGetVolumeStatsRequest>,
    ) -> Result<Response<NodeGetVolumeStatsResponse>, Status> {
        let req = req.into_inner();
        traced("NodeGetVolumeStats", &req.volume_id, async {
            require_id(&req.volume_id, "volume_id")?;
            let path = existing_volume_path(&req.volume_path, "volume_path")?;
            let stats = self.ops.stats(&req.volume_id, &path).await?;
            let mut usage = Vec::new();
            if let Some(u) = stats.usage {
                usage.push(VolumeUsage {
                    available: u.available_bytes as i64,
                    total: u.total_bytes as i64,
                    used: u.used_bytes as i64,
                    unit: Unit::Bytes as i32,
                });
                usage.push(VolumeUsage {
                    available: u.free_inodes as i64,
                    total: u.total_inodes as i64,
                    used: u.used_inodes as i64,
                    unit: Unit::Inodes as i32,
                });
            }
            if let Some(bytes) = stats.block_bytes {
                usage.push(VolumeUsage {
                    available: 0,
                    total: bytes as i64,
                    used: 0,
                    unit: Unit::Bytes as i32,
                });
            }
            Ok(NodeGetVolumeStatsResponse {
                usage,
                volume_condition: Some(VolumeCondition {
                    abnormal: stats.abnormal.is_some(),
                    message: stats
                        .abnormal
                        .unwrap_or_else(|| "volume is healthy".to_string()),
                }),
            })
        })
        .await
    }

    /// Grows the filesystem to the volume's new size; nothing for block.
    async fn node_expand_volume(
        &self,
        req: Request<NodeExpandVolumeRequest>,
    ) -> Result<Response<NodeExpandVolumeResponse>, Status> {
        let req = req.into_inner();
        traced("NodeExpandVolume", &req.volume_id, async {
            require_id(&req.volume_id, "volume_id")?;
            if let Some(r) = &req.capacity_range {
                crate::core::capacity::Range::new(r.required_bytes, r.limit_bytes)?;
            }
            let path = existing_volume_path(&req.volume_path, "volume_path")?;
            let block = match &req.volume_capability {
                Some(c) => parse_capability(c)?.is_block(),
                None => false,
            };
            let _guard = self.lock(&req.volume_id)?;
            let size = self.ops.expand(&req.volume_id, &path, block).await?;
            if let Some(r) = &req.capacity_range {
                if r.required_bytes > 0 && (size as i64) < r.required_bytes {
                    return Err(Error::OutOfRange(format!(
                        "the volume is {size} bytes, less than the {} requested; expand it \
                         with ControllerExpandVolume first",
                        r.required_bytes
                    )));
                }
            }
            Ok(NodeExpandVolumeResponse {
                capacity_bytes: size as i64,
            })
        })
        .await
    }

    async fn node_get_capabilities(
        &self,
        _: Request<NodeGetCapabilitiesRequest>,
    ) -> Result<Response<NodeGetCapabilitiesResponse>, Status> {
        let capabilities = CAPABILITIES
            .iter()
            .map(|t| NodeServiceCapability {
                r#type: Some(node_service_capability::Type::Rpc(
                    node_service_capability::Rpc { r#type: *t as i32 },
                )),
            })
            .collect();
        Ok(Response::new(NodeGetCapabilitiesResponse { capabilities }))
    }

    /// The node id and its topology segment.
    async fn node_get_info(
        &self,
        _: Request<NodeGetInfoRequest>,
    ) -> Result<Response<NodeGetInfoResponse>, Status> {
        let backend = &self.ops.backend;
        Ok(Response::new(NodeGetInfoResponse {
            node_id: backend.node_id().to_string(),
            max_volumes_per_node: self.max_volumes,
            accessible_topology: Some(Topology {
                segments: backend.topology().into_iter().collect(),
            }),
        }))
    }
}
