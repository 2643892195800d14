//! The agent's gRPC service (served by `--mode node`) and the conversions
//! between the internal API's messages and the agent's types.

use std::sync::Arc;

use tonic::{Code, Request, Response, Status};

use crate::agentpb as pb;
use crate::error::Error;
use crate::lvm::agent::{Agent, ClassCapacity, LocalAgent, LvSpec, Origin};
use crate::lvm::report::Lv;

impl From<Lv> for pb::Lv {
    fn from(lv: Lv) -> Self {
        pb::Lv {
            vg: lv.vg,
            name: lv.name,
            size: lv.size,
            attr: lv.attr,
            tags: lv.tags,
            pool: lv.pool,
            data_percent: lv.data_percent,
            metadata_percent: lv.metadata_percent,
            when_full: lv.when_full,
            zeroing: lv.zeroing,
            created: lv.created,
        }
    }
}

impl From<pb::Lv> for Lv {
    fn from(lv: pb::Lv) -> Self {
        Lv {
            vg: lv.vg,
            name: lv.name,
            size: lv.size,
            attr: lv.attr,
            tags: lv.tags,
            pool: lv.pool,
            data_percent: lv.data_percent,
            metadata_percent: lv.metadata_percent,
            when_full: lv.when_full,
            zeroing: lv.zeroing,
            created: lv.created,
        }
    }
}

impl From<&LvSpec> for pb::CreateRequest {
    fn from(s: &LvSpec) -> Self {
        pb::CreateRequest {
            class: s.class.clone(),
            name: s.name.clone(),
            size: s.size,
            tags: s.tags.clone(),
            origin: s.origin.as_ref().map(|o| pb::Origin {
                class: o.class.clone(),
                lv: o.lv.clone(),
                frozen: o.frozen,
            }),
            read_only: s.read_only,
        }
    }
}

impl From<pb::CreateRequest> for LvSpec {
    fn from(r: pb::CreateRequest) -> Self {
        LvSpec {
            class: r.class,
            name: r.name,
            size: r.size,
            tags: r.tags,
            origin: r.origin.map(|o| Origin {
                class: o.class,
                lv: o.lv,
                frozen: o.frozen,
            }),
            read_only: r.read_only,
        }
    }
}

impl From<ClassCapacity> for pb::CapacityReply {
    fn from(c: ClassCapacity) -> Self {
        pb::CapacityReply {
            available: c.available,
            extent_size: c.extent_size,
            pool_full: c.pool_full,
            total: c.total,
            used_percent: c.used_percent,
        }
    }
}

impl From<pb::CapacityReply> for ClassCapacity {
    fn from(c: pb::CapacityReply) -> Self {
        ClassCapacity {
            available: c.available,
            extent_size: c.extent_size,
            pool_full: c.pool_full,
            total: c.total,
            used_percent: c.used_percent,
        }
    }
}

/// An agent's answer, back as the error it was on the node. Transport
/// failures (the node cannot be reached, refused our certificate, did not
/// answer in time) say which node.
pub fn error_from_status(node: &str, s: Status) -> Error {
    let m = s.message().to_string();
    match s.code() {
        Code::InvalidArgument => Error::InvalidArgument(m),
        Code::NotFound => Error::NotFound(m),
        Code::AlreadyExists => Error::AlreadyExists(m),
        Code::OutOfRange => Error::OutOfRange(m),
        Code::ResourceExhausted => Error::ResourceExhausted(m),
        Code::FailedPrecondition => Error::FailedPrecondition(m),
        Code::Aborted => Error::Aborted(m),
        Code::Internal => Error::Internal(format!("node {node}: {m}")),
        Code::DeadlineExceeded | Code::Cancelled => Error::DeadlineExceeded(format!(
            "the LVM agent of node {node} did not answer in time: {m}"
        )),
        Code::Unauthenticated | Code::PermissionDenied => Error::Unavailable(format!(
            "the LVM agent of node {node} refused the controller's certificate: {m}"
        )),
        _ => Error::Unavailable(format!(
            "the LVM agent of node {node} is unreachable: {}",
            describe_transport(&s)
        )),
    }
}

/// The message of a transport failure, with its cause chain (tonic puts
/// the interesting part, such as a certificate error, in the source).
fn describe_transport(s: &Status) -> String {
    use std::error::Error as _;
    let mut out = s.message().to_string();
    let mut cause = s.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}

/// The agent's gRPC service over the node's [`LocalAgent`].
pub struct AgentService {
    pub agent: Arc<crate::lvm::detached::Detached<LocalAgent>>,
}

fn lv_ref(r: Request<pb::LvRef>) -> pb::LvRef {
    r.into_inner()
}

#[tonic::async_trait]
impl pb::agent_server::Agent for AgentService {
    async fn describe(
        &self,
        _: Request<pb::DescribeRequest>,
    ) -> Result<Response<pb::DescribeReply>, Status> {
        Ok(Response::new(pb::DescribeReply {
            node: Agent::node(self.agent.as_ref()).to_string(),
            classes: self
                .agent
                .config()
                .classes
                .iter()
                .map(|c| c.name.clone())
                .collect(),
            version: env!("CARGO_PKG_VERSION").to_string(),
        }))
    }

    async fn create(&self, r: Request<pb::CreateRequest>) -> Result<Response<pb::LvReply>, Status> {
        let spec = LvSpec::from(r.into_inner());
        tracing::info!(class = %spec.class, lv = %spec.name, size = spec.size, "agent: create");
        let lv = self.agent.create(&spec).await?;
        Ok(Response::new(pb::LvReply {
            lv: Some(lv.into()),
        }))
    }

    async fn remove(&self, r: Request<pb::LvRef>) -> Result<Response<pb::RemoveReply>, Status> {
        let r = lv_ref(r);
        tracing::info!(class = %r.class, lv = %r.name, "agent: remove");
        self.agent.remove(&r.class, &r.name).await?;
        Ok(Response::new(pb::RemoveReply {}))
    }

    async fn extend(&self, r: Request<pb::ExtendRequest>) -> Result<Response<pb::LvReply>, Status> {
        let r = r.into_inner();
        tracing::info!(class = %r.class, lv = %r.name, size = r.size, "agent: extend");
        let lv = self.agent.extend(&r.class, &r.name, r.size).await?;
        Ok(Response::new(pb::LvReply {
            lv: Some(lv.into()),
        }))
    }

    async fn find(&self, r: Request<pb::LvRef>) -> Result<Response<pb::FindReply>, Status> {
        let r = lv_ref(r);
        let lv = self.agent.find(&r.class, &r.name).await?;
        Ok(Response::new(pb::FindReply {
            lv: lv.map(Into::into),
        }))
    }

    async fn list(&self, _: Request<pb::ListRequest>) -> Result<Response<pb::ListReply>, Status> {
        let lvs = self.agent.list().await?;
        Ok(Response::new(pb::ListReply {
            lvs: lvs
                .into_iter()
                .map(|(class, lv)| pb::ClassLv {
                    class,
                    lv: Some(lv.into()),
                })
                .collect(),
        }))
    }

    async fn capacity(
        &self,
        r: Request<pb::CapacityRequest>,
    ) -> Result<Response<pb::CapacityReply>, Status> {
        let cap = self.agent.capacity(&r.into_inner().class).await?;
        Ok(Response::new(cap.into()))
    }

    async fn resume(&self, r: Request<pb::LvRef>) -> Result<Response<pb::FindReply>, Status> {
        let r = lv_ref(r);
        let lv = self.agent.resume(&r.class, &r.name).await?;
        Ok(Response::new(pb::FindReply {
            lv: lv.map(Into::into),
        }))
    }

    async fn copy_progress(
        &self,
        r: Request<pb::LvRef>,
    ) -> Result<Response<pb::CopyProgressReply>, Status> {
        let r = lv_ref(r);
        let (message, failed_for_good) = self
            .agent
            .copy_progress(&r.class, &r.name)
            .await
            .unwrap_or_default();
        Ok(Response::new(pb::CopyProgressReply {
            message,
            failed_for_good,
        }))
    }
}
