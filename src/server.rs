//! Assembles the services a process runs (by driver and mode) and serves
//! them on the CSI Unix socket until SIGTERM or SIGINT.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;

use crate::config::{DriverKind, LvmConfig, RunArgs};
use crate::core::locks::OpLocks;
use crate::core::node::NodeOps;
use crate::csi::controller_server::ControllerServer;
use crate::csi::identity_server::IdentityServer;
use crate::csi::node_server::NodeServer;
use crate::driver::controller::ControllerService;
use crate::driver::identity::{IdentityService, ReadinessCheck};
use crate::driver::node::NodeService;
use crate::lvm::agent::{Agent, LocalAgent};
use crate::lvm::controller::LvmController;
use crate::lvm::node::LvmNode;
use crate::runner::Runner;

/// Binds the socket: removes a stale socket file first, refuses to replace
/// anything that is not a socket.
pub fn bind(path: &Path) -> Result<UnixListener, String> {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(format!(
                "{} exists and is not a socket; refusing to remove it",
                path.display()
            ));
        }
        std::fs::remove_file(path)
            .map_err(|e| format!("cannot remove stale socket {}: {e}", path.display()))?;
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
    }
    UnixListener::bind(path).map_err(|e| format!("cannot listen on {}: {e}", path.display()))
}

/// The gRPC router of everything this process serves.
pub struct Services {
    pub identity: IdentityService,
    pub controller: Option<ControllerService>,
    pub node: Option<NodeService>,
}

/// Builds the LVM services for `args.mode`, starting the local agent.
pub async fn lvm_services(args: &RunArgs) -> Result<Services, String> {
    let node_id = args.node_id()?;
    let config = LvmConfig::load(args.lvm_config.as_deref(), &args.device_classes)?;
    let runner = Arc::new(Runner::new(args.command_timeout()));
    let agent = LocalAgent::new(node_id, config.clone(), runner.clone(), args.lvm_udev);
    if let Err(e) = agent.start().await {
        // Keep serving: Probe reports not ready and says why; the background
        // refresh picks the VGs up when they appear.
        tracing::error!(error = %e, "initial LVM report failed");
    }
    agent.spawn_refresher(Duration::from_secs(args.lvm_refresh_seconds));
    for c in &config.classes {
        tracing::info!(
            class = %c.name, vg = %c.volume_group, thin_pool = c.thin_pool.as_deref().unwrap_or("-"),
            default = c.default, "device class"
        );
    }

    let locks = OpLocks::default();
    let mut checks: Vec<ReadinessCheck> = Vec::new();
    let ready_agent = agent.clone();
    checks.push(Arc::new(move || ready_agent.readiness().err()));

    let controller = args.mode.runs_controller().then(|| {
        let ready_agent = agent.clone();
        let backend = LvmController::new(
            config.clone(),
            vec![agent.clone() as Arc<dyn Agent>],
            Box::new(move || ready_agent.readiness().err()),
        );
        ControllerService {
            backend: Arc::new(backend),
            locks: locks.clone(),
        }
    });
    let node = args.mode.runs_node().then(|| NodeService {
        ops: Arc::new(NodeOps::new(
            Arc::new(LvmNode::new(agent.clone())),
            runner.clone(),
        )),
        locks: locks.clone(),
        max_volumes: args.max_volumes_per_node,
    });
    Ok(Services {
        identity: IdentityService {
            name: args.driver_name(),
            controller: controller.is_some(),
            checks,
        },
        controller,
        node,
    })
}

pub async fn build(args: &RunArgs) -> Result<Services, String> {
    match args.driver {
        DriverKind::Lvm => lvm_services(args).await,
        DriverKind::Rbd => Err("the rbd driver is not available in this build yet".to_string()),
    }
}

/// Serves until `shutdown` resolves.
pub async fn serve(
    services: Services,
    listener: UnixListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), String> {
    let mut router =
        tonic::transport::Server::builder().add_service(IdentityServer::new(services.identity));
    if let Some(c) = services.controller {
        router = router.add_service(ControllerServer::new(c));
    }
    if let Some(n) = services.node {
        router = router.add_service(NodeServer::new(n));
    }
    router
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await
        .map_err(|e| format!("gRPC server failed: {e}"))
}

/// Resolves on SIGTERM or SIGINT.
pub async fn termination() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
}
