//! CSI Identity service.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::csi::identity_server::Identity;
use crate::csi::plugin_capability::{self, service, volume_expansion};
use crate::csi::{
    GetPluginCapabilitiesRequest, GetPluginCapabilitiesResponse, GetPluginInfoRequest,
    GetPluginInfoResponse, PluginCapability, ProbeRequest, ProbeResponse,
};

/// Readiness checks of the parts this process runs; each returns why it is
/// not ready. They read in-memory state only: Probe never runs a command.
pub(crate) type ReadinessCheck = Arc<dyn Fn() -> Option<String> + Send + Sync>;

pub struct IdentityService {
    pub name: String,
    pub controller: bool,
    /// The SnapshotMetadata service is served here.
    pub snapshot_metadata: bool,
    pub checks: Vec<ReadinessCheck>,
}

#[tonic::async_trait]
impl Identity for IdentityService {
    /// The driver's name and version.
    async fn get_plugin_info(
        &self,
        _: Request<GetPluginInfoRequest>,
    ) -> Result<Response<GetPluginInfoResponse>, Status> {
        Ok(Response::new(GetPluginInfoResponse {
            name: self.name.clone(),
            vendor_version: env!("CARGO_PKG_VERSION").to_string(),
            manifest: Default::default(),
        }))
    }

    /// Controller and SnapshotMetadata services (when served here),
    /// topology constraints, and online expansion.
    async fn get_plugin_capabilities(
        &self,
        _: Request<GetPluginCapabilitiesRequest>,
    ) -> Result<Response<GetPluginCapabilitiesResponse>, Status> {
        let svc = |t: service::Type| PluginCapability {
            r#type: Some(plugin_capability::Type::Service(
                plugin_capability::Service { r#type: t as i32 },
            )),
        };
        let mut capabilities = vec![svc(service::Type::VolumeAccessibilityConstraints)];
        if self.controller {
            capabilities.push(svc(service::Type::ControllerService));
        }
        if self.snapshot_metadata {
            capabilities.push(svc(service::Type::SnapshotMetadataService));
        }
        capabilities.push(PluginCapability {
            r#type: Some(plugin_capability::Type::VolumeExpansion(
                plugin_capability::VolumeExpansion {
                    r#type: volume_expansion::Type::Online as i32,
                },
            )),
        });
        Ok(Response::new(GetPluginCapabilitiesResponse {
            capabilities,
        }))
    }

    /// ready=true when every part of this process is ready; ready=false (and
    /// a log line saying why) otherwise. Reads in-memory state only and
    /// depends on nothing outside this process.
    async fn probe(&self, _: Request<ProbeRequest>) -> Result<Response<ProbeResponse>, Status> {
        let problems: Vec<String> = self.checks.iter().filter_map(|c| c()).collect();
        if !problems.is_empty() {
            tracing::warn!(problems = %problems.join("; "), "probe: not ready");
        }
        Ok(Response::new(ProbeResponse {
            ready: Some(problems.is_empty()),
        }))
    }
}

/// Why the process is not ready (every failing check, joined), or None.
pub(crate) fn not_ready(checks: &[ReadinessCheck]) -> Option<String> {
    let problems: Vec<String> = checks.iter().filter_map(|c| c()).collect();
    (!problems.is_empty()).then(|| problems.join("; "))
}

/// Adds `lodestone_ready` to the registry: the readiness checks, run at
/// each scrape (they read memory only).
pub(crate) fn register_metrics(
    registry: &mut prometheus_client::registry::Registry,
    checks: &[ReadinessCheck],
) {
    registry.register_collector(Box::new(Readiness(checks.to_vec())));
}

struct Readiness(Vec<ReadinessCheck>);

impl std::fmt::Debug for Readiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Readiness({} checks)", self.0.len())
    }
}

impl prometheus_client::collector::Collector for Readiness {
    fn encode(&self, mut out: prometheus_client::encoding::DescriptorEncoder) -> std::fmt::Result {
        use prometheus_client::encoding::EncodeMetric;
        let ready = prometheus_client::metrics::gauge::ConstGauge::new(match not_ready(&self.0) {
            None => 1i64,
            Some(_) => 0,
        });
        ready.encode(out.encode_descriptor(
            "lodestone_ready",
            "1 when the readiness checks pass (what Probe and /healthz report), else 0.",
            None,
            ready.metric_type(),
        )?)
    }
}
