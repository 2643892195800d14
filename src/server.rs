//! Assembles the services a process runs (by driver and mode) and serves
//! them on the CSI Unix socket until SIGTERM or SIGINT.

mod authority;
mod run_to_end;

pub use authority::FixAuthority;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tokio_stream::StreamExt;

use crate::agentpb::agent_server::AgentServer;
use crate::agentpb::peer_server::PeerServer;
use crate::config::{AgentResolver, ConfigError, DriverKind, LvmConfig, Mode, RunArgs};
use crate::core::locks::OpLocks;
use crate::core::node::NodeOps;
use crate::csi::controller_server::ControllerServer;
use crate::csi::identity_server::IdentityServer;
use crate::csi::node_server::NodeServer;
use crate::csi::snapshot_metadata_server::SnapshotMetadataServer;
use crate::driver::controller::ControllerService;
use crate::driver::identity::{IdentityService, ReadinessCheck};
use crate::driver::node::NodeService;
use crate::driver::snapshot_metadata::SnapshotMetadataService;
use crate::kube::{Kube, KubeError};
use crate::lvm::agent::{Agent, AgentOptions, LocalAgent};
use crate::lvm::controller::LvmController;
use crate::lvm::detached::Detached;
use crate::lvm::node::LvmNode;
use crate::lvm::pull::PeerService;
use crate::lvm::remote::Deadlines;
use crate::lvm::resolver::{Directory, Resolver};
use crate::lvm::rpc::AgentService;
use crate::lvm::wire;
use crate::metrics::{BuildInfo, Endpoint};
use crate::runner::Runner;
use crate::tls::{require_peer, TlsError, TlsMaterial};
use run_to_end::RunToEndLayer;

/// Why the services cannot start or stopped serving. The text says what
/// and carries its source's; paths and flags are named.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Kube(#[from] KubeError),
    #[error("{} exists and is not a socket; refusing to remove it", path.display())]
    NotASocket { path: PathBuf },
    #[error("cannot remove stale socket {}: {source}", path.display())]
    RemoveStale {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create {}: {source}", path.display())]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on {}: {source}", path.display())]
    Listen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{why} needs --tls-cert, --tls-key and --tls-ca")]
    TlsRequired { why: &'static str },
    #[error("cannot listen on {address} for the agent API: {source}")]
    AgentListen {
        address: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "--mode controller needs the nodes' agents: --agent NODE=HOST:PORT \
         (or --agent-resolver kubernetes)"
    )]
    NoAgents,
    /// The RBD configuration file (its text names the file).
    #[error("{0}")]
    RbdConfig(String),
    #[error("--rbd-soft-clone-depth must be at least 1 and at most --rbd-hard-clone-depth")]
    CloneDepths,
    #[error("--topology {entry:?}: expected KEY=VALUE")]
    Topology { entry: String },
    #[error("the socket path has no directory")]
    NoSocketDirectory,
    #[error("this lodestone was built without the rbd feature")]
    NoRbdFeature,
    /// librbd/librados could not be loaded (the text names the library).
    #[error("{0}")]
    RbdLibrary(String),
    #[error("gRPC server failed: {0}")]
    Serve(#[source] tonic::transport::Error),
}

/// Binds the socket: removes a stale socket file first, refuses to replace
/// anything that is not a socket.
pub fn bind(path: &Path) -> Result<UnixListener, ServerError> {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(ServerError::NotASocket {
                path: path.to_path_buf(),
            });
        }
        std::fs::remove_file(path).map_err(|source| ServerError::RemoveStale {
            path: path.to_path_buf(),
            source,
        })?;
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|source| ServerError::CreateDir {
            path: parent.to_path_buf(),
            source,
        })?;
    }
    UnixListener::bind(path).map_err(|source| ServerError::Listen {
        path: path.to_path_buf(),
        source,
    })
}

/// The gRPC router of everything this process serves.
pub struct Services {
    pub identity: IdentityService,
    pub controller: Option<ControllerService>,
    pub node: Option<NodeService>,
    /// What `--metrics-address` serves.
    pub metrics: Endpoint,
}

/// Starts this node's LVM agent (the only code here that runs LVM).
async fn start_local_agent(
    args: &RunArgs,
    config: &LvmConfig,
    runner: &Arc<Runner>,
) -> Result<Arc<LocalAgent>, ServerError> {
    let agent = LocalAgent::new(
        args.node_id()?,
        config.clone(),
        runner.clone(),
        AgentOptions {
            udev: args.lvm_udev,
            copy_wait: Duration::from_secs(args.copy_wait_seconds),
            checkpoint_every: Duration::from_secs(args.copy_checkpoint_seconds),
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

fn tls_material(args: &RunArgs, why: &'static str) -> Result<TlsMaterial, ServerError> {
    let files = args.tls_files()?.ok_or(ServerError::TlsRequired { why })?;
    Ok(TlsMaterial::load(&files)?)
}

/// `--mode node`: serves the agent API to the controller over mutual TLS.
async fn serve_agent(args: &RunArgs, agent: Arc<LocalAgent>) -> Result<(), ServerError> {
    let tls = tls_material(args, "the LVM agent API (--mode node)")?;
    let listener = tokio::net::TcpListener::bind(&args.agent_listen)
        .await
        .map_err(|source| ServerError::AgentListen {
            address: args.agent_listen.clone(),
            source,
        })?;
    // Its own certificate also opens its reads from other agents.
    agent.set_peer_tls(tls.clone());
    let peer = PeerServer::new(PeerService {
        agent: agent.clone(),
    });
    let api = Arc::new(AgentService {
        agent: Arc::new(Detached::new(agent)),
    });
    let service = tonic::service::interceptor::InterceptedService::new(
        AgentServer::from_arc(api.clone()),
        require_peer(args.controller_identity.clone()),
    );
    let server = tonic::transport::Server::builder()
        .layer(RunToEndLayer)
        .add_service(service)
        .add_service(peer);
    tracing::info!(listen = %args.agent_listen, controller = %args.controller_identity,
        "serving the LVM agent API (mutual TLS)");
    let controller = args.controller_identity.clone();
    tokio::spawn(async move {
        // The inventory streams have their own transport on this port.
        let incoming = wire::route(tls.incoming(listener), api, controller);
        if let Err(e) = server.serve_with_incoming(incoming).await {
            tracing::error!(error = %e, "the agent API server failed");
        }
    });
    Ok(())
}

/// `--mode controller`: the central controller, with the agents the
/// resolver finds (first resolution before serving, then every 30 s),
/// following each agent's inventory stream.
async fn central_controller(
    args: &RunArgs,
    config: &LvmConfig,
) -> Result<Arc<LvmController>, ServerError> {
    let tls = tls_material(args, "the LVM controller (--mode controller)")?;
    let resolver = match args.agent_resolver {
        AgentResolver::Static => {
            let map = args.agent_map()?;
            if map.is_empty() {
                return Err(ServerError::NoAgents);
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
    let controller =
        Arc::new(LvmController::central(config.clone()).with_heartbeat(args.agent_heartbeat()));
    let mut directory = Directory::new(&controller, resolver, tls, deadlines);
    directory.sync().await;
    // Every agent's stream is being set up (concurrently, bounded); serve
    // once all inventories are in, or after a short wait (requests that
    // need a node still unseen are UNAVAILABLE until it is).
    controller.start(Duration::from_secs(10)).await;
    directory.spawn(Duration::from_secs(30));
    controller.spawn_duplicate_scan(Duration::from_secs(60));
    Ok(controller)
}

/// Builds the LVM services for `args.mode`.
pub async fn lvm_services(args: &RunArgs) -> Result<Services, ServerError> {
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
            let controller = Arc::new(
                LvmController::new(
                    config.clone(),
                    vec![Arc::new(Detached::new(agent.clone())) as Arc<dyn Agent>],
                    Box::new(ready),
                )
                .with_heartbeat(args.agent_heartbeat()),
            );
            // The one node's inventory is in before the first request.
            controller.start(Duration::from_secs(30)).await;
            Some(controller)
        }
        _ => Some(central_controller(args, &config).await?),
    };
    if args.mode == Mode::Node {
        serve_agent(args, local.clone().expect("node mode runs an agent")).await?;
    }
    let metrics = metrics_endpoint(args, &runner, &checks, |registry| {
        if let Some(agent) = &local {
            crate::lvm::agent::register_metrics(registry, agent.clone());
        }
        if let Some(controller) = &controller {
            crate::lvm::controller::register_metrics(registry, controller.clone());
        }
    });
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
            snapshot_metadata: controller
                .as_ref()
                .is_some_and(|c| c.backend.serves_block_maps()),
            checks,
        },
        controller,
        node,
        metrics,
    })
}

/// Builds the RBD services for `args.mode`.
#[cfg(feature = "rbd")]
pub async fn rbd_services(args: &RunArgs) -> Result<Services, ServerError> {
    use crate::rbd::config::RbdConfig;
    use crate::rbd::controller::{FlattenPolicy, RbdController};
    use crate::rbd::{ConnectOptions, ConnectionPool};

    let config = RbdConfig::load(&args.rbd_config, args.rbd_secret_dir.clone())
        .map_err(ServerError::RbdConfig)?;
    crate::rbd::memory::limit_arenas();
    if args.mode.runs_controller() {
        // librbd / librados are loaded at run time, by the controller only.
        crate::rbd::ffi::load().map_err(ServerError::RbdLibrary)?;
    }
    if args.rbd_soft_clone_depth == 0 || args.rbd_hard_clone_depth < args.rbd_soft_clone_depth {
        return Err(ServerError::CloneDepths);
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
        let backend = Arc::new(RbdController::new(config.clone(), pool, policy));
        backend.spawn_trash_sweep(Duration::from_secs(600));
        ControllerService {
            backend,
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
                .ok_or_else(|| ServerError::Topology { entry: t.clone() })?;
            topology.insert(k.to_string(), v.to_string());
        }
        let key_dir = args
            .socket_path()?
            .parent()
            .map(|p| p.join("keys"))
            .ok_or(ServerError::NoSocketDirectory)?;
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
            snapshot_metadata: controller
                .as_ref()
                .is_some_and(|c| c.backend.serves_block_maps()),
            checks: Vec::new(),
        },
        controller,
        node,
        metrics: metrics_endpoint(args, &runner, &[], |_| {}),
    })
}

/// What `--metrics-address` serves: build info and CSI calls, what the
/// command runner and the backend export, and the readiness checks
/// (`lodestone_ready` and `/healthz`).
fn metrics_endpoint(
    args: &RunArgs,
    runner: &Runner,
    checks: &[ReadinessCheck],
    backend: impl FnOnce(&mut prometheus_client::registry::Registry),
) -> Endpoint {
    let mut registry = crate::metrics::registry(build_info(args));
    crate::driver::identity::register_metrics(&mut registry, checks);
    runner.register_metrics(&mut registry);
    backend(&mut registry);
    let checks = checks.to_vec();
    let health = Arc::new(move || crate::driver::identity::not_ready(&checks));
    Endpoint::new(registry, health)
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

pub async fn build(args: &RunArgs) -> Result<Services, ServerError> {
    match args.driver {
        DriverKind::Lvm => lvm_services(args).await,
        #[cfg(feature = "rbd")]
        DriverKind::Rbd => rbd_services(args).await,
        #[cfg(not(feature = "rbd"))]
        DriverKind::Rbd => Err(ServerError::NoRbdFeature),
    }
}

/// Serves until `shutdown` resolves. Every connection goes through
/// [`FixAuthority`], so clients that send the socket path as `:authority`
/// (gRPC C-core and Java clients) are served too.
pub async fn serve(
    services: Services,
    listener: UnixListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    // Calls run to their end even when their client leaves (see
    // [`run_to_end`]).
    let mut router = tonic::transport::Server::builder()
        .layer(RunToEndLayer)
        .add_service(IdentityServer::new(services.identity));
    if let Some(c) = services.controller {
        if c.backend.serves_block_maps() {
            router = router.add_service(SnapshotMetadataServer::new(SnapshotMetadataService {
                backend: c.backend.clone(),
            }));
        }
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
        .map_err(ServerError::Serve)
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Flags {
        #[command(flatten)]
        run: RunArgs,
    }

    #[test]
    fn bind_names_the_path_it_refuses() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("not-a-socket");
        std::fs::write(&file, "").unwrap();
        let e = bind(&file).unwrap_err();
        assert!(
            matches!(&e, ServerError::NotASocket { path } if path == &file),
            "{e:?}"
        );
        assert!(file.exists(), "a file that is not a socket is kept");
    }

    #[tokio::test]
    async fn configuration_errors_pass_through_unchanged() {
        let flags = Flags::parse_from([
            "lodestone",
            "--device-class",
            "a=vg",
            "--lvm-config",
            "/nonexistent/lvm.json",
        ]);
        let Err(e) = build(&flags.run).await else {
            panic!("built without its configuration file")
        };
        assert!(
            matches!(&e, ServerError::Config(ConfigError::ReadLvmConfig { .. })),
            "{e:?}"
        );
        assert!(
            e.to_string()
                .starts_with("cannot read LVM config /nonexistent/lvm.json: "),
            "{e}"
        );
    }
}
