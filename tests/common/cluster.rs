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
    Driver::builder()
        .mode("node")
        .node_id(node)
        .class_args(class_args.to_vec())
        .args(["--agent-listen", address])
        .args(tls.args())
}

impl NodeAgent {
    /// Starts the node `node` with its agent on `ip` (a loopback address).
    pub async fn start(ca: &Ca, node: &str, ip: &str, class_args: &[String]) -> NodeAgent {
        let tls = ca.issue(node);
        let address = format!("{ip}:{}", super::pki::free_port(ip));
        let driver = agent_builder(node, &address, &tls, class_args)
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
        let NodeAgent {
            node,
            address,
            tls,
            class_args,
            driver,
        } = self;
        let (_, dir) = driver.stop_and_keep_dir();
        let driver = agent_builder(&node, &address, &tls, &class_args)
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
    let tls = ca.issue(CONTROLLER_IDENTITY);
    let mut b = Driver::builder()
        .mode("controller")
        .node_id("controller")
        .class_args(class_args.to_vec())
        .args(tls.args());
    for a in agents {
        b = b.args(["--agent".to_string(), a.agent_flag()]);
    }
    b.start_in(new_temp_dir()).await
}
