//! Assembles the services a process runs (by driver and mode) and serves
//! them on the CSI Unix socket until SIGTERM or SIGINT.

mod authority;
mod run_to_end;

pub use authority::FixAuthority;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tokio_stream::StreamExt;

use crate::agentpb::agent_server::AgentServer;
use crate::config::{AgentResolver, DriverKind, LvmConfig, Mode, RunArgs};
use crate::core::locks::OpLocks;
use crate::core::node::NodeOps;
use crate::csi::controller_server::ControllerServer;
use crate::csi::identity_server::IdentityServer;
use crate::csi::node_server::NodeServer;
use crate::driver::controller::ControllerService;
use crate::driver::identity::{IdentityService, ReadinessCheck};
use crate::driver::node::NodeService;
use crate::kube::Kube;
use crate::lvm::agent::{Agent, AgentOptions, LocalAgent};
use crate::lvm::controller::LvmController;
use crate::lvm::detached::Detached;
use crate::lvm::node::LvmNode;
use crate::lvm::remote::Deadlines;
use crate::lvm::resolver::{Directory, Resolver};
use crate::lvm::rpc::AgentService;
use crate::metrics::{BuildInfo, Sources};
use crate::runner::Runner;
use crate::tls::{require_peer, TlsMaterial};
use run_to_end::RunToEndLayer;

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
    /// What `--metrics-address` reads.
    pub metrics: Sources,
}

/// Starts this node's LVM agent (the only code here that runs LVM).
async fn start_local_agent(
    args: &RunArgs,
    config: &LvmConfig,
    runner: &Arc<Runner>,
) -> Result<Arc<LocalAgent>, String> {
    let agent = LocalAgent::new(
        args.node_id()?,
        config.clone(),
        runner.clone(),
        AgentOptions {
            udev: args.lvm_udev,
            copy_wait: Duration::from_secs(args.copy_wait_seconds),
        },
    );
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
    Ok(agent)
}

fn tls_material(args: &RunArgs, why: &str) -> Result<TlsMaterial, String> {
    let files = args
        .tls_files()?
        .ok_or_else(|| format!("{why} needs --tls-cert, --tls-key and --tls-ca"))?;
    TlsMaterial::load(&files)
}

/// `--mode node`: serves the agent API to the controller over mutual TLS.
async fn serve_agent(args: &RunArgs, agent: Arc<LocalAgent>) -> Result<(), String> {
    let tls = tls_material(args, "the LVM agent API (--mode node)")?;
    let listener = tokio::net::TcpListener::bind(&args.agent_listen)
        .await
        .map_err(|e| {
            format!(
                "cannot listen on {} for the agent API: {e}",
                args.agent_listen
            )
        })?;
    let service = AgentServer::with_interceptor(
        AgentService {
            agent: Arc::new(Detached::new(agent)),
        },
        require_peer(args.controller_identity.clone()),
    );
    let server = tonic::transport::Server::builder()
        .layer(RunToEndLayer)
        .add_service(service);
    tracing::info!(listen = %args.agent_listen, controller = %args.controller_identity,
        "serving the LVM agent API (mutual TLS)");
    tokio::spawn(async move {
        if let Err(e) = server.serve_with_incoming(tls.incoming(listener)).await {
            tracing::error!(error = %e, "the agent API server failed");
        }
    });
    Ok(())
}

/// `--mode controller`: the central controller, with the agents the
/// resolver finds (first resolution before serving, then every 30 s).
async fn central_controller(
    args: &RunArgs,
    config: &LvmConfig,
) -> Result<Arc<LvmController>, String> {
    let tls = tls_material(args, "the LVM controller (--mode controller)")?;
    let resolver = match args.agent_resolver {
        AgentResolver::Static => {
            let map = args.agent_map()?;
            if map.is_empty() {
                return Err(
                    "--mode controller needs the nodes' agents: --agent NODE=HOST:PORT \
                            (or --agent-resolver kubernetes)"
                        .into(),
                );
            }
            Resolver::Static(map)
        }
        AgentResolver::Kubernetes => Resolver::Kubernetes {
            kube: Kube::in_cluster(&args.service_account_dir)?,
            driver: args.driver_name(),
            port: args.agent_port,
        },
    };
    let write = Duration::from_secs(args.agent_timeout_seconds.max(1));
    let deadlines = Deadlines {
        connect: Duration::from_secs(5),
        read: write.min(Duration::from_secs(15)),
        write,
    };
    let controller = Arc::new(LvmController::central(config.clone()));
    let mut directory = Directory::new(&controller, resolver, tls, deadlines);
    directory.sync().await;
    directory.spawn(Duration::from_secs(30));
    controller.spawn_duplicate_scan(Duration::from_secs(60));
    Ok(controller)
}

/// Builds the LVM services for `args.mode`.
pub async fn lvm_services(args: &RunArgs) -> Result<Services, String> {
    let config = LvmConfig::load(args.lvm_config.as_deref(), &args.device_classes)?;
    let runner = Arc::new(Runner::new(args.command_timeout()));
    let local = match args.mode.runs_node() {
        true => Some(start_local_agent(args, &config, &runner).await?),
        false => None,
    };
    let local_ready = local.clone().map(|a| move || a.readiness().err());
    let locks = OpLocks::default();
    let mut checks: Vec<ReadinessCheck> = Vec::new();
    if let Some(ready) = local_ready.clone() {
        checks.push(Arc::new(ready));
    }

    let controller = match (args.mode, &local) {
        (Mode::Node, _) => None,
        (Mode::All, Some(agent)) => {
            let ready = local_ready.clone().expect("local agent");
            Some(Arc::new(LvmController::new(
                config.clone(),
                vec![Arc::new(Detached::new(agent.clone())) as Arc<dyn Agent>],
                Box::new(ready),
            )))
        }
        _ => Some(central_controller(args, &config).await?),
    };
    if args.mode == Mode::Node {
        serve_agent(args, local.clone().expect("node mode runs an agent")).await?;
    }
    let metrics = Sources {
        build: build_info(args),
        runner: Some(runner.clone()),
        lvm: local.clone(),
        lvm_controller: controller.clone(),
        readiness: checks.clone(),
    };
    let controller = controller.map(|backend| ControllerService {
        backend: backend as Arc<dyn crate::core::backend::ControllerBackend>,
        locks: locks.clone(),
    });
    let node = local.map(|agent| NodeService {
        ops: Arc::new(NodeOps::new(Arc::new(LvmNode::new(agent)), runner.clone())),
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
        metrics,
    })
}

/// Builds the RBD services for `args.mode`.
#[cfg(feature = "rbd")]
pub async fn rbd_services(args: &RunArgs) -> Result<Services, String> {
    use crate::rbd::config::RbdConfig;
    use crate::rbd::controller::{FlattenPolicy, RbdController};
    use crate::rbd::{ConnectOptions, ConnectionPool};

    let config = RbdConfig::load(&args.rbd_config, args.rbd_secret_dir.clone())?;
    crate::rbd::memory::limit_arenas();
    if args.mode.runs_controller() {
        // librbd / librados are loaded at run time, by the controller only.
        crate::rbd::ffi::load()?;
    }
    if args.rbd_soft_clone_depth == 0 || args.rbd_hard_clone_depth < args.rbd_soft_clone_depth {
        return Err("--rbd-soft-clone-depth must be at least 1 and at most \
                    --rbd-hard-clone-depth"
            .into());
    }
    for c in &config.clusters {
        tracing::info!(cluster = %c.cluster_id, monitors = %c.mon_host(), pools = ?c.pools,
            "ceph cluster");
    }
    let locks = OpLocks::default();
    let controller = args.mode.runs_controller().then(|| {
        let options = ConnectOptions {
            op_timeout: args.command_timeout(),
            ..ConnectOptions::default()
        };
        let pool = Arc::new(ConnectionPool::new(options, Duration::from_secs(300)));
        let policy = FlattenPolicy {
            soft_depth: args.rbd_soft_clone_depth,
            hard_depth: args.rbd_hard_clone_depth,
        };
        ControllerService {
            backend: Arc::new(RbdController::new(config.clone(), pool, policy)),
            locks: locks.clone(),
        }
    });
    let runner = Arc::new(Runner::new(args.command_timeout()));
    let node = if args.mode.runs_node() {
        let mut topology = std::collections::BTreeMap::new();
        for t in &args.topology {
            let (k, v) = t
                .split_once('=')
                .filter(|(k, v)| !k.is_empty() && !v.is_empty())
                .ok_or_else(|| format!("--topology {t:?}: expected KEY=VALUE"))?;
            topology.insert(k.to_string(), v.to_string());
        }
        let key_dir = args
            .socket_path()?
            .parent()
            .map(|p| p.join("keys"))
            .ok_or("the socket path has no directory")?;
        let backend = crate::rbd::node::RbdNode::new(
            args.node_id()?,
            topology,
            config.clone(),
            runner.clone(),
            key_dir,
        );
        Some(NodeService {
            ops: Arc::new(NodeOps::new(Arc::new(backend), runner.clone())),
            locks: locks.clone(),
            max_volumes: args.max_volumes_per_node,
        })
    } else {
        None
    };
    Ok(Services {
        identity: IdentityService {
            name: args.driver_name(),
            controller: controller.is_some(),
            checks: Vec::new(),
        },
        controller,
        node,
        metrics: Sources {
            build: build_info(args),
            runner: Some(runner),
            lvm: None,
            lvm_controller: None,
            readiness: Vec::new(),
        },
    })
}

/// The labels of `lodestone_build_info`.
fn build_info(args: &RunArgs) -> BuildInfo {
    use clap::ValueEnum;
    let name = |v: Option<clap::builder::PossibleValue>| {
        v.map(|v| v.get_name().to_string()).unwrap_or_default()
    };
    BuildInfo {
        version: env!("CARGO_PKG_VERSION").to_string(),
        driver: name(args.driver.to_possible_value()),
        mode: name(args.mode.to_possible_value()),
    }
}

pub async fn build(args: &RunArgs) -> Result<Services, String> {
    match args.driver {
        DriverKind::Lvm => lvm_services(args).await,
        #[cfg(feature = "rbd")]
        DriverKind::Rbd => rbd_services(args).await,
        #[cfg(not(feature = "rbd"))]
        DriverKind::Rbd => Err("this lodestone was built without the rbd feature".to_string()),
    }
}

/// Serves until `shutdown` resolves. Every connection goes through
/// [`FixAuthority`], so clients that send the socket path as `:authority`
/// (gRPC C-core and Java clients) are served too.
pub async fn serve(
    services: Services,
    listener: UnixListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), String> {
    // Calls run to their end even when their client leaves (see
    // [`run_to_end`]).
    let mut router = tonic::transport::Server::builder()
        .layer(RunToEndLayer)
        .add_service(IdentityServer::new(services.identity));
    if let Some(c) = services.controller {
        router = router.add_service(ControllerServer::new(c));
    }
    if let Some(n) = services.node {
        router = router.add_service(NodeServer::new(n));
    }
    router
        .serve_with_incoming_shutdown(
            UnixListenerStream::new(listener).map(|conn| conn.map(FixAuthority::new)),
            shutdown,
        )
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
