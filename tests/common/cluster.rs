//! Several `lodestone` processes standing for a cluster: node agents
//! (`--mode node`) on loopback addresses, each with its own certificate,
//! and one controller (`--mode controller`) that reaches them over mutual
//! TLS.

use super::pki::{Ca, TlsFiles, CONTROLLER_IDENTITY};
use super::{new_temp_dir, Driver};

/// One node: its CSI node service and its LVM agent in one process.
pub struct NodeAgent {
    pub node: String,
    /// host:port of the agent API.
    pub address: String,
    pub tls: TlsFiles,
    pub class_args: Vec<String>,
    pub driver: Driver,
}

fn agent_builder(
    node: &str,
    address: &str,
    tls: &TlsFiles,
    class_args: &[String],
) -> super::DriverBuilder {
    // A refresh period given with the classes replaces the default (off).
    let mut classes = class_args.to_vec();
    let mut refresh = Vec::new();
    if let Some(i) = classes.iter().position(|a| a == "--lvm-refresh-seconds") {
        refresh = classes.drain(i..i + 2).collect();
    }
    Driver::builder()
        .mode("node")
        .node_id(node)
        .class_args(classes)
        .args(refresh)
        .args(["--agent-listen", address])
        .args(tls.args())
}

impl NodeAgent {
    /// Starts the node `node` with its agent on `ip` (a loopback address).
    pub async fn start(ca: &Ca, node: &str, ip: &str, class_args: &[String]) -> NodeAgent {
        Self::start_armed(ca, node, ip, class_args, "").await
    }

    /// Starts the node with `failpoints` armed (see LODESTONE_FAILPOINTS);
    /// a restart arms none.
    pub async fn start_armed(
        ca: &Ca,
        node: &str,
        ip: &str,
        class_args: &[String],
        failpoints: &str,
    ) -> NodeAgent {
        let tls = ca.issue(node);
        let address = format!("{ip}:{}", super::pki::free_port(ip));
        let driver = agent_builder(node, &address, &tls, class_args)
            .env("LODESTONE_FAILPOINTS", failpoints)
            .start()
            .await;
        NodeAgent {
            node: node.to_string(),
            address,
            tls,
            class_args: class_args.to_vec(),
            driver,
        }
    }

    /// The controller's --agent flag for this node.
    pub fn agent_flag(&self) -> String {
        format!("{}={}", self.node, self.address)
    }

    /// SIGKILL, as a node crash would.
    pub fn kill(&self) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.driver.pid()),
            nix::sys::signal::Signal::SIGKILL,
        )
        .expect("SIGKILL the agent");
    }

    /// Starts the node again (same address, certificate and classes) after
    /// it died or was stopped.
    pub async fn restart(self) -> NodeAgent {
        self.restart_armed("").await
    }

    /// [`NodeAgent::restart`] with `failpoints` armed.
    pub async fn restart_armed(self, failpoints: &str) -> NodeAgent {
        let NodeAgent {
            node,
            address,
            tls,
            class_args,
            driver,
        } = self;
        let (_, dir) = driver.stop_and_keep_dir();
        let driver = agent_builder(&node, &address, &tls, &class_args)
            .env("LODESTONE_FAILPOINTS", failpoints)
            .start_in(dir)
            .await;
        NodeAgent {
            node,
            address,
            tls,
            class_args,
            driver,
        }
    }
}

/// The central controller for `agents`, with the controller's certificate.
pub async fn start_controller(ca: &Ca, agents: &[&NodeAgent], class_args: &[String]) -> Driver {
    let flags: Vec<String> = agents.iter().map(|a| a.agent_flag()).collect();
    start_controller_with(ca, &flags, class_args, &[]).await
}

/// The central controller for `agents`, armed with fail point `point`.
pub async fn start_controller_armed(
    ca: &Ca,
    agents: &[&NodeAgent],
    class_args: &[String],
    point: &str,
) -> Driver {
    let flags: Vec<String> = agents.iter().map(|a| a.agent_flag()).collect();
    controller_builder(ca, &flags, class_args)
        .env("LODESTONE_FAILPOINTS", point)
        .start_in(new_temp_dir())
        .await
}

/// The central controller for `--agent` flags (NODE=HOST:PORT), with more
/// arguments.
pub async fn start_controller_with(
    ca: &Ca,
    agent_flags: &[String],
    class_args: &[String],
    extra: &[&str],
) -> Driver {
    controller_builder(ca, agent_flags, class_args)
        .args(extra.iter().copied())
        .start_in(new_temp_dir())
        .await
}

/// The central controller's command line: its certificate and the agents.
fn controller_builder(
    ca: &Ca,
    agent_flags: &[String],
    class_args: &[String],
) -> super::DriverBuilder {
    let tls = ca.issue(CONTROLLER_IDENTITY);
    let mut b = Driver::builder()
        .mode("controller")
        .node_id("controller")
        .class_args(class_args.to_vec())
        .args(tls.args());
    for flag in agent_flags {
        b = b.args(["--agent".to_string(), flag.clone()]);
    }
    b
}

/// A TCP relay between the controller and one agent that can cut every
/// connection through it (and refuse new ones) until it is mended: a
/// network partition, with both processes still running.
pub struct Relay {
    pub address: String,
    cut: tokio::sync::watch::Sender<bool>,
}

impl Relay {
    /// Listens on `ip` (a loopback address) and relays to `to`.
    pub async fn start(ip: &str, to: &str) -> Relay {
        let listener = tokio::net::TcpListener::bind((ip, 0))
            .await
            .expect("bind the relay");
        let address = listener.local_addr().unwrap().to_string();
        let (cut, watch) = tokio::sync::watch::channel(false);
        let to = to.to_string();
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                if *watch.borrow() {
                    continue;
                }
                let to = to.clone();
                let mut watch = watch.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(&to).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = watch.wait_for(|cut| *cut) => {}
                    }
                });
            }
        });
        Relay { address, cut }
    }

    pub fn cut(&self) {
        self.cut.send_replace(true);
    }

    pub fn mend(&self) {
        self.cut.send_replace(false);
    }
}
