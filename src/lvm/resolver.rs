//! How the central controller finds each node's LVM agent: a static map
//! (tests, small setups) or the Kubernetes API (CSINode objects say which
//! nodes run this driver and under which node id; the Node's InternalIP and
//! the agent port say where its agent listens, on the host network).

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use crate::kube::{host_port, CsiNode, Kube, List, Node};
use crate::lvm::agent::Agent;
use crate::lvm::controller::LvmController;
use crate::lvm::remote::{Deadlines, RemoteAgent};
use crate::tls::TlsMaterial;

pub(crate) enum Resolver {
    /// (node id, host:port) pairs.
    Static(Vec<(String, String)>),
    Kubernetes {
        kube: Kube,
        /// Our CSI driver name, as registered in CSINode objects.
        driver: String,
        port: u16,
    },
}

/// A Kubernetes object name safe to put in a URL path.
fn plain_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

impl Resolver {
    /// Every node running this driver, with its agent's address.
    pub(crate) async fn nodes(&self) -> Result<Vec<(String, String)>, String> {
        let (kube, driver, port) = match self {
            Resolver::Static(map) => return Ok(map.clone()),
            Resolver::Kubernetes { kube, driver, port } => (kube, driver, *port),
        };
        let list: List<CsiNode> = kube
            .get("/apis/storage.k8s.io/v1/csinodes")
            .await
            .map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        for csinode in list.items {
            let name = csinode.metadata.name;
            let drivers = csinode.spec.drivers.unwrap_or_default();
            let Some(ours) = drivers.into_iter().find(|d| &d.name == driver) else {
                continue;
            };
            if !plain_name(&name) {
                tracing::warn!(node = %name, "CSINode with an unexpected name skipped");
                continue;
            }
            match kube.get::<Node>(&format!("/api/v1/nodes/{name}")).await {
                Ok(node) => match node.internal_ip() {
                    Some(ip) => out.push((ours.node_id, host_port(ip, port))),
                    None => {
                        tracing::warn!(node = %name, "node has no InternalIP; its agent cannot be reached")
                    }
                },
                Err(e) => tracing::warn!(node = %name, error = %e, "cannot read the node"),
            }
        }
        Ok(out)
    }
}

/// Keeps the controller's agents in step with the resolver.
pub(crate) struct Directory {
    controller: Weak<LvmController>,
    resolver: Resolver,
    tls: TlsMaterial,
    deadlines: Deadlines,
    known: HashMap<String, String>,
}

impl Directory {
    pub(crate) fn new(
        controller: &Arc<LvmController>,
        resolver: Resolver,
        tls: TlsMaterial,
        deadlines: Deadlines,
    ) -> Self {
        Directory {
            controller: Arc::downgrade(controller),
            resolver,
            tls,
            deadlines,
            known: HashMap::new(),
        }
    }

    /// One resolution: adds new nodes, follows nodes whose address changed.
    /// Nodes that disappear keep their (now unreachable) agent.
    pub(crate) async fn sync(&mut self) {
        let Some(controller) = self.controller.upgrade() else {
            return;
        };
        let nodes = match self.resolver.nodes().await {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "cannot resolve the node agents");
                return;
            }
        };
        for (node, address) in nodes {
            if self.known.get(&node) == Some(&address) {
                continue;
            }
            if let Err(e) = crate::config::validate_node_id(&node) {
                tracing::warn!(node = %node, error = %e, "node skipped");
                continue;
            }
            let agent = match RemoteAgent::new(&node, &address, &self.tls, self.deadlines) {
                Ok(a) => Arc::new(a),
                Err(e) => {
                    tracing::warn!(node = %node, error = %e, "node skipped");
                    continue;
                }
            };
            let moved = self.known.insert(node.clone(), address.clone());
            tracing::info!(node = %node, address = %address, previous = ?moved, "node agent added");
            controller.set_agent(agent as Arc<dyn Agent>);
        }
    }

    /// Resolves again every `every` (never, for a static map).
    pub(crate) fn spawn(mut self, every: Duration) {
        if matches!(self.resolver, Resolver::Static(_)) {
            return;
        }
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                if self.controller.strong_count() == 0 {
                    return;
                }
                self.sync().await;
            }
        });
    }
}
