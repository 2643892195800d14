//! The controller's handle on a remote node's LVM agent: the [`Agent`]
//! trait over the internal gRPC API, with mutual TLS and deadlines.
//!
//! Every agent call is idempotent by LV name, so a call that timed out can
//! be sent again as it is. A mutation the controller gives up on (its
//! deadline, or its own caller gone) still runs to its end on the node: the
//! agent's service runs mutations detached from the RPC
//! ([`crate::lvm::detached`]).

use std::time::Duration;

use tonic::transport::{Channel, Endpoint};
use tonic::Request;

use crate::agentpb as pb;
use crate::agentpb::agent_client::AgentClient;
use crate::lvm::agent::{Agent, ClassCapacity, LvSpec};
use crate::lvm::error::{LvmError, Result};
use crate::lvm::inventory::{Stamp, Stamped, Updates, WatchRequest};
use crate::lvm::report::Lv;
use crate::lvm::rpc::error_from_status;
use crate::tls::TlsMaterial;

/// Deadlines of agent calls.
#[derive(Debug, Clone, Copy)]
pub struct Deadlines {
    pub connect: Duration,
    /// Reads answer from the agent's memory.
    pub read: Duration,
    /// Mutations run lvm (and may wait for a copy).
    pub write: Duration,
}

pub struct RemoteAgent {
    node: String,
    client: AgentClient<Channel>,
    deadlines: Deadlines,
}

impl RemoteAgent {
    /// A lazily connected handle on the agent of `node` at `address`
    /// (host:port). The agent must present a certificate naming `node`.
    pub fn new(
        node: &str,
        address: &str,
        tls: &TlsMaterial,
        deadlines: Deadlines,
    ) -> std::result::Result<Self, String> {
        if !crate::tls::valid_server_name(node) {
            return Err(format!(
                "node name {node:?} cannot be checked against a certificate (not a DNS name)"
            ));
        }
        // TLS comes from the connector, with the certificates current at
        // each new connection.
        let endpoint = Endpoint::from_shared(format!("http://{address}"))
            .map_err(|e| format!("bad agent address {address:?} for node {node}: {e}"))?
            .connect_timeout(deadlines.connect)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10));
        Ok(RemoteAgent {
            node: node.to_string(),
            client: AgentClient::new(endpoint.connect_with_connector_lazy(tls.connector(node))),
            deadlines,
        })
    }

    fn request<T>(&self, msg: T, deadline: Duration) -> Request<T> {
        let mut r = Request::new(msg);
        r.set_timeout(deadline);
        r
    }

    fn lv_ref(&self, class: &str, lv: &str) -> Request<pb::LvRef> {
        self.request(
            pb::LvRef {
                class: class.to_string(),
                name: lv.to_string(),
            },
            self.deadlines.read,
        )
    }

    fn err(&self, s: tonic::Status) -> LvmError {
        error_from_status(&self.node, s)
    }

    fn lv(&self, lv: Option<pb::Lv>) -> Result<Lv> {
        lv.map(Into::into).ok_or_else(|| {
            LvmError::Internal(format!("the agent of node {} sent no LV", self.node))
        })
    }

    fn stamp(&self, stamp: Option<pb::Stamp>) -> Result<Stamp> {
        stamp.map(Into::into).ok_or_else(|| {
            LvmError::Internal(format!(
                "the agent of node {} sent no stamp (an older version?)",
                self.node
            ))
        })
    }

    /// Who answers at the address: its node name and device classes.
    pub async fn describe(&self) -> Result<pb::DescribeReply> {
        let r = self.request(pb::DescribeRequest {}, self.deadlines.read);
        let reply = self
            .client
            .clone()
            .describe(r)
            .await
            .map_err(|s| self.err(s))?
            .into_inner();
        if reply.node != self.node {
            return Err(LvmError::Unavailable(format!(
                "the agent reached for node {} says it serves node {}",
                self.node, reply.node
            )));
        }
        Ok(reply)
    }
}

#[tonic::async_trait]
impl Agent for RemoteAgent {
    fn node(&self) -> &str {
        &self.node
    }

    async fn create(&self, spec: &LvSpec) -> Result<Stamped<Lv>> {
        let r = self.request(pb::CreateRequest::from(spec), self.deadlines.write);
        let reply = self
            .client
            .clone()
            .create(r)
            .await
            .map_err(|s| self.err(s))?
            .into_inner();
        Ok(Stamped {
            value: self.lv(reply.lv)?,
            stamp: self.stamp(reply.stamp)?,
        })
    }

    async fn remove(&self, class: &str, lv: &str) -> Result<Stamp> {
        let mut r = self.lv_ref(class, lv);
        r.set_timeout(self.deadlines.write);
        let reply = self
            .client
            .clone()
            .remove(r)
            .await
            .map_err(|s| self.err(s))?
            .into_inner();
        self.stamp(reply.stamp)
    }

    async fn extend(&self, class: &str, lv: &str, size: u64) -> Result<Stamped<Lv>> {
        let r = self.request(
            pb::ExtendRequest {
                class: class.to_string(),
                name: lv.to_string(),
                size,
            },
            self.deadlines.write,
        );
        let reply = self
            .client
            .clone()
            .extend(r)
            .await
            .map_err(|s| self.err(s))?
            .into_inner();
        Ok(Stamped {
            value: self.lv(reply.lv)?,
            stamp: self.stamp(reply.stamp)?,
        })
    }

    async fn find(&self, class: &str, lv: &str) -> Result<Option<Lv>> {
        let r = self.lv_ref(class, lv);
        let reply = self.client.clone().find(r).await.map_err(|s| self.err(s))?;
        Ok(reply.into_inner().lv.map(Into::into))
    }

    async fn list(&self) -> Result<Vec<(String, Lv)>> {
        let r = self.request(pb::ListRequest {}, self.deadlines.read);
        let reply = self.client.clone().list(r).await.map_err(|s| self.err(s))?;
        reply
            .into_inner()
            .lvs
            .into_iter()
            .map(|c| Ok((c.class, self.lv(c.lv)?)))
            .collect()
    }

    async fn capacity(&self, class: &str) -> Result<ClassCapacity> {
        let r = self.request(
            pb::CapacityRequest {
                class: class.to_string(),
            },
            self.deadlines.read,
        );
        let reply = self
            .client
            .clone()
            .capacity(r)
            .await
            .map_err(|s| self.err(s))?;
        Ok(reply.into_inner().into())
    }

    async fn resume(&self, class: &str, lv: &str) -> Result<Stamped<Option<Lv>>> {
        let mut r = self.lv_ref(class, lv);
        r.set_timeout(self.deadlines.write);
        let reply = self
            .client
            .clone()
            .resume(r)
            .await
            .map_err(|s| self.err(s))?
            .into_inner();
        Ok(Stamped {
            value: reply.lv.map(Into::into),
            stamp: self.stamp(reply.stamp)?,
        })
    }

    async fn copy_progress(&self, class: &str, lv: &str) -> Option<(String, bool)> {
        let r = self.lv_ref(class, lv);
        match self.client.clone().copy_progress(r).await {
            Ok(reply) => {
                let p = reply.into_inner();
                (!p.message.is_empty()).then_some((p.message, p.failed_for_good))
            }
            Err(s) => Some((self.err(s).to_string(), false)),
        }
    }

    async fn watch(&self, _request: WatchRequest) -> Result<Updates> {
        Err(LvmError::Unavailable(
            "the inventory stream is not built yet".into(),
        ))
    }
}
