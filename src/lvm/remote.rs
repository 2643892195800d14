//! The controller's handle on a remote node's LVM agent: the [`Agent`]
//! trait over the internal gRPC API, with mutual TLS and deadlines.
//!
//! Every agent call is idempotent by LV name, so a call that timed out can
//! be sent again as it is. A mutation the controller gives up on (its
//! deadline, or its own caller gone) still runs to its end on the node: the
//! agent's service runs mutations detached from the RPC
//! ([`crate::lvm::detached`]).

use std::pin::Pin;
use std::time::Duration;

use tokio_stream::Stream;

use tonic::transport::Endpoint;
use tonic::Request;

use crate::agentpb as pb;
use crate::agentpb::agent_client::AgentClient;
use crate::core::blockmap::BlockMap;
use crate::lvm::agent::{Agent, ClassCapacity, LvSpec, Pull};
use crate::lvm::channel::AgentChannel;
use crate::lvm::error::{LvmError, Result};
use crate::lvm::inventory::{Stamp, Stamped, Update, Updates, WatchRequest};
use crate::lvm::report::Lv;
use crate::lvm::rpc::{block_map_of, error_from_status, Parts};
use crate::lvm::wire;
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

/// An agent's certificate must name its node: the name must be one a
/// certificate can hold.
fn checked_node_name(node: &str) -> std::result::Result<(), String> {
    if crate::tls::valid_server_name(node) {
        return Ok(());
    }
    Err(format!(
        "node name {node:?} cannot be checked against a certificate (not a DNS name)"
    ))
}

/// How anything reaches the agent of `node` at `address`: the controller,
/// and another agent reading a snapshot. TLS comes from the connector
/// (`TlsMaterial::connector`), with the certificates current at each new
/// connection.
pub(super) fn agent_endpoint(
    node: &str,
    address: &str,
    connect: Duration,
) -> std::result::Result<Endpoint, String> {
    checked_node_name(node)?;
    Ok(Endpoint::from_shared(format!("http://{address}"))
        .map_err(|e| format!("bad agent address {address:?} for node {node}: {e}"))?
        .connect_timeout(connect)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10)))
}

/// The size of the parts an agent sends its inventory in (see
/// [`crate::lvm::rpc::split_update`]): within the 2 KiB the stream's read
/// buffer starts with ([`crate::lvm::codec`]) and the 8 KiB of HTTP/2's,
/// so neither grows.
const WATCH_PART_BYTES: u32 = 1024;

pub struct RemoteAgent {
    node: String,
    address: String,
    client: AgentClient<AgentChannel>,
    /// For the inventory stream's own connection ([`crate::lvm::wire`]).
    tls: TlsMaterial,
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
        checked_node_name(node)?;
        let channel = AgentChannel::new(address, tls.connector(node, deadlines.connect))
            .map_err(|e| format!("{e} for node {node}"))?;
        Ok(RemoteAgent {
            node: node.to_string(),
            address: address.to_string(),
            client: AgentClient::new(channel),
            tls: tls.clone(),
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

    /// Runs one call with its deadline enforced here too: the header
    /// tells a live agent when to give up, and this bounds the wait for one
    /// that never answers (a hung host that still accepts connections).
    async fn within<T>(
        &self,
        deadline: Duration,
        call: impl std::future::Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T> {
        match tokio::time::timeout(deadline, call).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(s)) => Err(self.err(s)),
            Err(_) => Err(self.err(tonic::Status::deadline_exceeded(format!(
                "no answer within {deadline:?}"
            )))),
        }
    }

    /// Who answers at the address: its node name and device classes.
    pub async fn describe(&self) -> Result<pb::DescribeReply> {
        let r = self.request(pb::DescribeRequest {}, self.deadlines.read);
        let reply = self
            .within(self.deadlines.read, self.client.clone().describe(r))
            .await?;
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
        let d = self.deadlines.write;
        let r = self.request(pb::CreateRequest::from(spec), d);
        let reply = self.within(d, self.client.clone().create(r)).await?;
        Ok(Stamped {
            value: self.lv(reply.lv)?,
            stamp: self.stamp(reply.stamp)?,
        })
    }

    async fn remove(&self, class: &str, lv: &str) -> Result<Stamp> {
        let d = self.deadlines.write;
        let mut r = self.lv_ref(class, lv);
        r.set_timeout(d);
        let reply = self.within(d, self.client.clone().remove(r)).await?;
        self.stamp(reply.stamp)
    }

    async fn extend(&self, class: &str, lv: &str, size: u64) -> Result<Stamped<Lv>> {
        let d = self.deadlines.write;
        let r = self.request(
            pb::ExtendRequest {
                class: class.to_string(),
                name: lv.to_string(),
                size,
            },
            d,
        );
        let reply = self.within(d, self.client.clone().extend(r)).await?;
        Ok(Stamped {
            value: self.lv(reply.lv)?,
            stamp: self.stamp(reply.stamp)?,
        })
    }

    async fn find(&self, class: &str, lv: &str) -> Result<Option<Lv>> {
        let r = self.lv_ref(class, lv);
        let reply = self
            .within(self.deadlines.read, self.client.clone().find(r))
            .await?;
        Ok(reply.lv.map(Into::into))
    }

    async fn list(&self) -> Result<Vec<(String, Lv)>> {
        let r = self.request(pb::ListRequest {}, self.deadlines.read);
        let reply = self
            .within(self.deadlines.read, self.client.clone().list(r))
            .await?;
        reply
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
            .within(self.deadlines.read, self.client.clone().capacity(r))
            .await?;
        Ok(reply.into())
    }

    async fn resume(
        &self,
        class: &str,
        lv: &str,
        pull: Option<&Pull>,
    ) -> Result<Stamped<Option<Lv>>> {
        let d = self.deadlines.write;
        let r = self.request(
            pb::ResumeRequest {
                class: class.to_string(),
                name: lv.to_string(),
                pull: pull.map(Into::into),
            },
            d,
        );
        let reply = self.within(d, self.client.clone().resume(r)).await?;
        Ok(Stamped {
            value: reply.lv.map(Into::into),
            stamp: self.stamp(reply.stamp)?,
        })
    }

    async fn copy_progress(&self, class: &str, lv: &str) -> Option<(String, bool)> {
        let r = self.lv_ref(class, lv);
        match self
            .within(self.deadlines.read, self.client.clone().copy_progress(r))
            .await
        {
            Ok(p) => (!p.message.is_empty()).then_some((p.message, p.failed_for_good)),
            Err(e) => Some((e.to_string(), false)),
        }
    }

    /// Opens the stream over its own connection ([`crate::lvm::wire`]),
    /// or over gRPC for an agent that does not offer that: its set-up
    /// (connection, TLS handshake, the request) within the read deadline;
    /// then no deadline (the controller judges the stream by its
    /// heartbeats).
    async fn watch(&self, request: WatchRequest) -> Result<Updates> {
        use tokio_stream::StreamExt;
        let request = pb::WatchRequest {
            part_bytes: WATCH_PART_BYTES,
            ..pb::WatchRequest::from(&request)
        };
        let d = self.deadlines.read;
        let parts: Pin<Box<dyn Stream<Item = _> + Send>> =
            match wire::watch(&self.tls, &self.node, &self.address, d, request.clone()).await {
                Ok(s) => Box::pin(s),
                Err(e) if wire::not_offered(&e) => {
                    let r = Request::new(request);
                    Box::pin(self.within(d, self.client.clone().watch(r)).await?)
                }
                Err(e) => {
                    return Err(LvmError::Unavailable(format!(
                        "node {}: no inventory stream: {e}",
                        self.node
                    )))
                }
            };
        let node = self.node.clone();
        let mut pending = Parts::default();
        Ok(Box::pin(parts.filter_map(move |item| {
            match item {
                Ok(part) => pending
                    .push(part)
                    .transpose()
                    .map(|u| u.and_then(Update::try_from)),
                Err(s) => Some(Err(error_from_status(&node, s))),
            }
        })))
    }

    /// The agent reads the pool's metadata: bounded by the write deadline,
    /// the whole stream included.
    async fn block_map(&self, class: &str, lv: &str, base: Option<&str>) -> Result<BlockMap> {
        use tokio_stream::StreamExt;
        let d = self.deadlines.write;
        let r = self.request(
            pb::BlockMapRequest {
                class: class.to_string(),
                name: lv.to_string(),
                base: base.map(str::to_string),
            },
            d,
        );
        let collect = async {
            let mut stream = self.client.clone().block_map(r).await?.into_inner();
            let mut pieces = Vec::new();
            while let Some(piece) = stream.next().await {
                pieces.push(piece?);
            }
            Ok(tonic::Response::new(pieces))
        };
        let pieces = self.within(d, collect).await?;
        block_map_of(&pieces)
    }

    async fn grant(&self, class: &str, lv: &str, node: &str) -> Result<()> {
        let d = self.deadlines.read;
        let r = self.request(
            pb::GrantRequest {
                class: class.to_string(),
                name: lv.to_string(),
                node: node.to_string(),
            },
            d,
        );
        self.within(d, self.client.clone().grant(r)).await?;
        Ok(())
    }

    fn address(&self) -> Option<&str> {
        Some(&self.address)
    }
}
