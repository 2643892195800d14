//! The agent's gRPC service (served by `--mode node`) and the conversions
//! between the internal API's messages and the agent's types.

use std::sync::Arc;

use tonic::metadata::MetadataValue;
use tonic::{Code, Request, Response, Status};

use crate::agentpb as pb;
use crate::core::blockmap::{BlockMap, Extent};
use crate::error::Error;
use crate::lvm::agent::{Agent, ClassCapacity, LocalAgent, LvSpec, Origin, Pull};
use crate::lvm::error::LvmError;
use crate::lvm::ids::{has_tag, Kind, LvmKind};
use crate::lvm::inventory::{Stamp, Update, WatchRequest};
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
            pull: s.pull.as_ref().map(Into::into),
        }
    }
}

impl From<&Pull> for pb::Pull {
    fn from(p: &Pull) -> Self {
        pb::Pull {
            node: p.node.clone(),
            address: p.address.clone(),
            class: p.class.clone(),
            lv: p.lv.clone(),
        }
    }
}

impl From<pb::Pull> for Pull {
    fn from(p: pb::Pull) -> Self {
        Pull {
            node: p.node,
            address: p.address,
            class: p.class,
            lv: p.lv,
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
            pull: r.pull.map(Into::into),
            read_only: r.read_only,
        }
    }
}

impl From<Stamp> for pb::Stamp {
    fn from(s: Stamp) -> Self {
        pb::Stamp {
            epoch: s.epoch,
            generation: s.generation,
        }
    }
}

impl From<pb::Stamp> for Stamp {
    fn from(s: pb::Stamp) -> Self {
        Stamp {
            epoch: s.epoch,
            generation: s.generation,
        }
    }
}

impl From<Update> for pb::InventoryUpdate {
    fn from(u: Update) -> Self {
        pb::InventoryUpdate {
            epoch: u.epoch,
            generation: u.generation,
            full: u.full,
            lvs: u
                .lvs
                .into_iter()
                .map(|(class, lv)| pb::ClassLv {
                    class,
                    lv: Some(lv.into()),
                })
                .collect(),
            removed: u
                .removed
                .into_iter()
                .map(|(class, name)| pb::LvRef { class, name })
                .collect(),
            classes: u
                .classes
                .into_iter()
                .map(|(class, c)| pb::ClassInventory {
                    class,
                    capacity: Some(c.into()),
                })
                .collect(),
            problems: u.problems,
            more: false,
        }
    }
}

impl TryFrom<pb::InventoryUpdate> for Update {
    type Error = LvmError;

    fn try_from(u: pb::InventoryUpdate) -> Result<Self, LvmError> {
        let missing =
            |what: &str| LvmError::Internal(format!("an inventory update without {what}"));
        Ok(Update {
            epoch: u.epoch,
            generation: u.generation,
            full: u.full,
            lvs: u
                .lvs
                .into_iter()
                .map(|c| Ok((c.class, c.lv.ok_or_else(|| missing("an LV"))?.into())))
                .collect::<Result<_, LvmError>>()?,
            removed: u.removed.into_iter().map(|r| (r.class, r.name)).collect(),
            classes: u
                .classes
                .into_iter()
                .map(|c| {
                    Ok((
                        c.class,
                        c.capacity.ok_or_else(|| missing("a capacity"))?.into(),
                    ))
                })
                .collect::<Result<_, LvmError>>()?,
            problems: u.problems,
        })
    }
}

/// An update's parts on the wire, when the receiver asked for parts of at
/// most `budget` bytes of LVs and removals (`WatchRequest.part_bytes`). The
/// first part carries the capacity and the problems; every part the same
/// epoch, generation and `full`; all but the last `more`.
///
/// Why: a receiver keeps, per stream, buffers as large as the largest
/// message it has read. The controller holds one stream per node, so one
/// message with a node's whole inventory would cost it that size per node
/// for as long as the stream lives.
pub fn split_update(u: pb::InventoryUpdate, budget: u32) -> Vec<pb::InventoryUpdate> {
    use prost::Message;
    let budget = budget as usize;
    if budget == 0 {
        return vec![u];
    }
    let pb::InventoryUpdate {
        epoch,
        generation,
        full,
        lvs,
        removed,
        classes,
        problems,
        more: _,
    } = u;
    let empty = |classes, problems| pb::InventoryUpdate {
        epoch: epoch.clone(),
        generation,
        full,
        classes,
        problems,
        ..Default::default()
    };
    let mut parts = vec![empty(classes, problems)];
    let mut used = 0;
    // `used` > 0: the last part holds something (never an empty part).
    let mut room = |parts: &mut Vec<pb::InventoryUpdate>, len: usize| {
        if used > 0 && used + len > budget {
            parts.push(empty(Vec::new(), Vec::new()));
            used = 0;
        }
        used += len;
    };
    for lv in lvs {
        room(&mut parts, lv.encoded_len());
        parts.last_mut().expect("one part").lvs.push(lv);
    }
    for r in removed {
        room(&mut parts, r.encoded_len());
        parts.last_mut().expect("one part").removed.push(r);
    }
    let last = parts.len() - 1;
    for p in &mut parts[..last] {
        p.more = true;
    }
    parts
}

/// Puts an update sent in parts ([`split_update`]) back together.
#[derive(Debug, Default)]
pub struct Parts(Option<pb::InventoryUpdate>);

impl Parts {
    /// The whole update once its last part is in.
    pub fn push(
        &mut self,
        part: pb::InventoryUpdate,
    ) -> Result<Option<pb::InventoryUpdate>, LvmError> {
        let whole = match self.0.take() {
            None => part,
            Some(mut so_far) => {
                if (&so_far.epoch, so_far.generation) != (&part.epoch, part.generation) {
                    return Err(LvmError::Internal(format!(
                        "a part of the inventory update {}/{} came with {}/{}",
                        so_far.epoch, so_far.generation, part.epoch, part.generation
                    )));
                }
                so_far.lvs.extend(part.lvs);
                so_far.removed.extend(part.removed);
                so_far.more = part.more;
                so_far
            }
        };
        if whole.more {
            self.0 = Some(whole);
            return Ok(None);
        }
        Ok(Some(whole))
    }
}

impl From<&WatchRequest> for pb::WatchRequest {
    fn from(w: &WatchRequest) -> Self {
        let cursor = w.cursor.clone().unwrap_or_default();
        pb::WatchRequest {
            epoch: cursor.epoch,
            generation: cursor.generation,
            heartbeat_ms: w.heartbeat.as_millis().min(u32::MAX as u128) as u32,
            part_bytes: 0,
        }
    }
}

impl From<pb::WatchRequest> for WatchRequest {
    fn from(w: pb::WatchRequest) -> Self {
        let (low, high) = crate::lvm::inventory::HEARTBEAT_LIMITS;
        WatchRequest {
            cursor: (!w.epoch.is_empty()).then_some(Stamp {
                epoch: w.epoch,
                generation: w.generation,
            }),
            heartbeat: std::time::Duration::from_millis(w.heartbeat_ms.into()).clamp(low, high),
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

/// Metadata key of an agent's failure: which [`LvmError`] it was (see
/// [`LvmError::wire_name`]), so the controller gets the same variant back.
pub const ERROR_KEY: &str = "lodestone-lvm-error";
/// Metadata key of a failed lvm command's exit code.
pub const EXIT_KEY: &str = "lodestone-lvm-exit";

/// An agent's failure as it goes on the wire: the code the CSI outcome has
/// (PERMISSION_DENIED for an LV that is not Lodestone's), so a plain gRPC
/// client reads it as before, and the variant under [`ERROR_KEY`].
pub fn status_from_error(e: LvmError) -> Status {
    let name = e.wire_name();
    let exit = match &e {
        LvmError::CommandFailed { source, .. } => source.exit_code(),
        _ => None,
    };
    let denied = matches!(e, LvmError::PermissionDenied(_));
    let e = Error::from(e);
    let code = if denied {
        Code::PermissionDenied
    } else {
        e.code()
    };
    let mut s = Status::new(code, e.to_string());
    s.metadata_mut()
        .insert(ERROR_KEY, MetadataValue::from_static(name));
    if let Some(exit) = exit {
        s.metadata_mut().insert(EXIT_KEY, MetadataValue::from(exit));
    }
    s
}

/// An agent's answer, back as the error it was on the node. Transport
/// failures (the node cannot be reached, refused our certificate, did not
/// answer in time) say which node.
pub fn error_from_status(node: &str, s: Status) -> LvmError {
    let m = s.message().to_string();
    let sent = s.metadata().get(ERROR_KEY).and_then(|v| v.to_str().ok());
    if let Some(name) = sent {
        let m = match name {
            "internal" | "command-failed" => format!("node {node}: {m}"),
            _ => m,
        };
        let exit = s
            .metadata()
            .get(EXIT_KEY)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let host = |m: String| match s.code() {
            Code::Internal => core_error(Code::Internal, format!("node {node}: {m}")),
            code => core_error(code, m),
        };
        if let Some(e) = LvmError::from_wire(name, m, exit, host) {
            return e;
        }
    }
    // No variant (a transport failure, or an agent that does not send one):
    // the code says what it can.
    let m = s.message().to_string();
    match s.code() {
        Code::InvalidArgument | Code::OutOfRange => LvmError::BadRequest(m),
        // What the controller's branching reads NOT_FOUND from an agent's
        // find or capacity as: the node does not serve that class.
        Code::NotFound => LvmError::NoSuchClass(m),
        Code::AlreadyExists => LvmError::AlreadyExists(m),
        Code::ResourceExhausted => LvmError::NoSpace(m),
        Code::FailedPrecondition => LvmError::Blocked(m),
        Code::Aborted => LvmError::Busy(m),
        Code::Internal => LvmError::Internal(format!("node {node}: {m}")),
        Code::DeadlineExceeded | Code::Cancelled => LvmError::Timeout(format!(
            "the LVM agent of node {node} did not answer in time: {m}"
        )),
        Code::Unauthenticated | Code::PermissionDenied => LvmError::Unavailable(format!(
            "the LVM agent of node {node} refused the controller's certificate: {m}"
        )),
        _ => LvmError::Unavailable(format!(
            "the LVM agent of node {node} is unreachable: {}",
            describe_transport(&s)
        )),
    }
}

/// The core error a host failure on the node was, from its code.
fn core_error(code: Code, m: String) -> Error {
    match code {
        Code::InvalidArgument => Error::InvalidArgument(m),
        Code::NotFound => Error::NotFound(m),
        Code::AlreadyExists => Error::AlreadyExists(m),
        Code::OutOfRange => Error::OutOfRange(m),
        Code::ResourceExhausted => Error::ResourceExhausted(m),
        Code::FailedPrecondition => Error::FailedPrecondition(m),
        Code::Aborted => Error::Aborted(m),
        Code::Unavailable => Error::Unavailable(m),
        Code::DeadlineExceeded => Error::DeadlineExceeded(m),
        _ => Error::Internal(m),
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
///
/// It acts only on Lodestone's own LVs, whoever holds the controller's
/// certificate: a name that is not a volume's or a snapshot's (`lds-` or
/// `ldsnap-` and 32 hex digits: the thin pool, another program's LV) is
/// refused with PERMISSION_DENIED before LVM is asked anything, and an
/// existing LV with such a name that lacks its kind's tag is refused the
/// same way by remove, extend, resume and create (as an origin), and is
/// absent for find and list, as a missing LV is.
pub struct AgentService {
    pub agent: Arc<crate::lvm::detached::Detached<LocalAgent>>,
}

fn lv_ref(r: Request<pb::LvRef>) -> pb::LvRef {
    r.into_inner()
}

/// The kind of LV a name of ours denotes, or PERMISSION_DENIED.
fn own_kind(name: &str) -> Result<Kind, LvmError> {
    [Kind::Volume, Kind::Snapshot]
        .into_iter()
        .find(|k| k.key_of_lv(name).is_some())
        .ok_or_else(|| {
            tracing::warn!(lv = %name, "refused an agent API call on an LV that is not Lodestone's");
            LvmError::PermissionDenied(format!(
                "{name:?} is not a Lodestone volume or snapshot; the agent API acts on no other LV"
            ))
        })
}

use crate::lvm::ids::is_own;

fn not_tagged(class: &str, name: &str) -> LvmError {
    tracing::warn!(class = %class, lv = %name,
        "refused an agent API call on an LV without Lodestone's tag");
    LvmError::PermissionDenied(format!(
        "{name} does not carry Lodestone's tag; the agent API acts on no other LV"
    ))
}

impl AgentService {
    /// The LV `name` of `class` if it exists and is ours; PERMISSION_DENIED
    /// when the name or the tag says it is not.
    async fn own_lv(&self, class: &str, name: &str) -> Result<Option<Lv>, LvmError> {
        own_kind(name)?;
        let vg = match self.agent.config().class(class) {
            Some(c) => c.volume_group.clone(),
            None => {
                return Err(LvmError::NoSuchClass(format!(
                    "device class {class:?} is not configured"
                )))
            }
        };
        match self.agent.lookup(&vg, name).await? {
            Some(lv) if !is_own(&lv) => Err(not_tagged(class, name)),
            found => Ok(found),
        }
    }
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
        let kind = own_kind(&spec.name).map_err(status_from_error)?;
        if !has_tag(&spec.tags, kind.tag()) {
            return Err(status_from_error(LvmError::BadRequest(format!(
                "a new {} must carry the tag {}",
                spec.name,
                kind.tag()
            ))));
        }
        if let Some(o) = &spec.origin {
            if self
                .own_lv(&o.class, &o.lv)
                .await
                .map_err(status_from_error)?
                .is_none()
            {
                return Err(status_from_error(LvmError::LvMissing(format!(
                    "the origin {} does not exist",
                    o.lv
                ))));
            }
        }
        tracing::info!(class = %spec.class, lv = %spec.name, size = spec.size, "agent: create");
        let done = self.agent.create(&spec).await.map_err(status_from_error)?;
        Ok(Response::new(pb::LvReply {
            lv: Some(done.value.into()),
            stamp: Some(done.stamp.into()),
        }))
    }

    async fn remove(&self, r: Request<pb::LvRef>) -> Result<Response<pb::RemoveReply>, Status> {
        let r = lv_ref(r);
        self.own_lv(&r.class, &r.name)
            .await
            .map_err(status_from_error)?;
        tracing::info!(class = %r.class, lv = %r.name, "agent: remove");
        let stamp = self
            .agent
            .remove(&r.class, &r.name)
            .await
            .map_err(status_from_error)?;
        Ok(Response::new(pb::RemoveReply {
            stamp: Some(stamp.into()),
        }))
    }

    async fn extend(&self, r: Request<pb::ExtendRequest>) -> Result<Response<pb::LvReply>, Status> {
        let r = r.into_inner();
        self.own_lv(&r.class, &r.name)
            .await
            .map_err(status_from_error)?;
        tracing::info!(class = %r.class, lv = %r.name, size = r.size, "agent: extend");
        let done = self
            .agent
            .extend(&r.class, &r.name, r.size)
            .await
            .map_err(status_from_error)?;
        Ok(Response::new(pb::LvReply {
            lv: Some(done.value.into()),
            stamp: Some(done.stamp.into()),
        }))
    }

    async fn find(&self, r: Request<pb::LvRef>) -> Result<Response<pb::FindReply>, Status> {
        let r = lv_ref(r);
        own_kind(&r.name).map_err(status_from_error)?;
        let lv = self
            .agent
            .find(&r.class, &r.name)
            .await
            .map_err(status_from_error)?
            .filter(is_own);
        Ok(Response::new(pb::FindReply {
            lv: lv.map(Into::into),
            stamp: None,
        }))
    }

    async fn list(&self, _: Request<pb::ListRequest>) -> Result<Response<pb::ListReply>, Status> {
        let lvs = self.agent.list().await.map_err(status_from_error)?;
        Ok(Response::new(pb::ListReply {
            lvs: lvs
                .into_iter()
                .filter(|(_, lv)| is_own(lv))
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
        let cap = self
            .agent
            .capacity(&r.into_inner().class)
            .await
            .map_err(status_from_error)?;
        Ok(Response::new(cap.into()))
    }

    async fn resume(
        &self,
        r: Request<pb::ResumeRequest>,
    ) -> Result<Response<pb::FindReply>, Status> {
        let r = r.into_inner();
        self.own_lv(&r.class, &r.name)
            .await
            .map_err(status_from_error)?;
        let pull = r.pull.map(Pull::from);
        let done = self
            .agent
            .resume(&r.class, &r.name, pull.as_ref())
            .await
            .map_err(status_from_error)?;
        Ok(Response::new(pb::FindReply {
            lv: done.value.map(Into::into),
            stamp: Some(done.stamp.into()),
        }))
    }

    async fn copy_progress(
        &self,
        r: Request<pb::LvRef>,
    ) -> Result<Response<pb::CopyProgressReply>, Status> {
        let r = lv_ref(r);
        own_kind(&r.name).map_err(status_from_error)?;
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

    type WatchStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<pb::InventoryUpdate, Status>> + Send>,
    >;

    async fn watch(
        &self,
        r: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        use tokio_stream::StreamExt;
        let r = r.into_inner();
        let part_bytes = r.part_bytes;
        let mut updates = self
            .agent
            .watch(WatchRequest::from(r))
            .await
            .map_err(status_from_error)?;
        // Each update goes out in parts, as the receiver asked; the task
        // ends with the stream or with the receiver.
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    next = updates.next() => next,
                    _ = tx.closed() => return,
                };
                let parts = match next {
                    None => return,
                    Some(Ok(u)) => split_update(u.into(), part_bytes),
                    Some(Err(e)) => {
                        let _ = tx.send(Err(status_from_error(e))).await;
                        return;
                    }
                };
                for p in parts {
                    if tx.send(Ok(p)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    type BlockMapStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<pb::BlockMapPiece, Status>> + Send>,
    >;

    /// Only for LVs of ours (both of them, with a base).
    async fn block_map(
        &self,
        r: Request<pb::BlockMapRequest>,
    ) -> Result<Response<Self::BlockMapStream>, Status> {
        let r = r.into_inner();
        // Ours, both (PERMISSION_DENIED first), then there (NOT_FOUND).
        let mut missing = None;
        for name in std::iter::once(&r.name).chain(r.base.as_ref()) {
            let found = self.own_lv(&r.class, name).await;
            if found.map_err(status_from_error)?.is_none() {
                missing.get_or_insert(name);
            }
        }
        if let Some(name) = missing {
            return Err(Status::not_found(format!("{name} does not exist")));
        }
        let map = self
            .agent
            .block_map(&r.class, &r.name, r.base.as_deref())
            .await
            .map_err(status_from_error)?;
        let pieces = block_map_pieces(&map).into_iter().map(Ok);
        Ok(Response::new(Box::pin(tokio_stream::iter(pieces))))
    }

    /// Only for snapshots of ours.
    async fn grant(
        &self,
        r: Request<pb::GrantRequest>,
    ) -> Result<Response<pb::GrantReply>, Status> {
        let r = r.into_inner();
        if self
            .own_lv(&r.class, &r.name)
            .await
            .map_err(status_from_error)?
            .is_none()
        {
            return Err(Status::not_found(format!("{} does not exist", r.name)));
        }
        tracing::info!(class = %r.class, lv = %r.name, to = %r.node, "agent: grant");
        self.agent
            .grant(&r.class, &r.name, &r.node)
            .await
            .map_err(status_from_error)?;
        Ok(Response::new(pb::GrantReply {
            ttl_seconds: crate::lvm::pull::GRANT_TTL.as_secs(),
        }))
    }
}

/// Ranges per [`pb::BlockMapPiece`]: about 1 MiB of message.
const RANGES_PER_PIECE: usize = 1 << 16;

/// A map as the messages that carry it (one at least, for an empty map).
pub(crate) fn block_map_pieces(map: &BlockMap) -> Vec<pb::BlockMapPiece> {
    let piece = |ranges: &[Extent]| pb::BlockMapPiece {
        capacity: map.capacity,
        granularity: map.granularity,
        offsets: ranges.iter().map(|e| e.offset).collect(),
        lengths: ranges.iter().map(|e| e.length).collect(),
    };
    let mut pieces: Vec<_> = map.extents().chunks(RANGES_PER_PIECE).map(piece).collect();
    if pieces.is_empty() {
        pieces.push(piece(&[]));
    }
    pieces
}

/// The map the pieces carry.
pub(crate) fn block_map_of(pieces: &[pb::BlockMapPiece]) -> Result<BlockMap, LvmError> {
    let first = pieces
        .first()
        .ok_or_else(|| LvmError::Internal("the agent sent no block map".into()))?;
    if pieces.iter().any(|p| {
        p.offsets.len() != p.lengths.len()
            || p.capacity != first.capacity
            || p.granularity != first.granularity
    }) {
        return Err(LvmError::Internal(
            "the agent sent a malformed block map".into(),
        ));
    }
    let ranges = pieces.iter().flat_map(|p| {
        p.offsets
            .iter()
            .zip(&p.lengths)
            .map(|(&offset, &length)| Extent { offset, length })
    });
    Ok(BlockMap::new(first.capacity, first.granularity, ranges))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lv(name: &str, tags: &[&str]) -> Lv {
        Lv {
            vg: "vg0".into(),
            name: name.into(),
            size: 4 << 20,
            attr: "Vwi-a-tz--".into(),
            tags: tags.iter().map(|t| t.to_string()).collect(),
            pool: Some("pool0".into()),
            data_percent: None,
            metadata_percent: None,
            when_full: String::new(),
            zeroing: false,
            created: None,
        }
    }

    #[test]
    fn an_update_in_parts_is_put_back_together_as_it_was() {
        use prost::Message;
        let whole = pb::InventoryUpdate {
            epoch: "e".into(),
            generation: 7,
            full: true,
            lvs: (0..40)
                .map(|n| pb::ClassLv {
                    class: "thin".into(),
                    lv: Some(lv(&format!("lds-{n:032x}"), &["lodestone.v1.vol"]).into()),
                })
                .collect(),
            removed: vec![pb::LvRef {
                class: "thin".into(),
                name: "gone".into(),
            }],
            classes: vec![pb::ClassInventory {
                class: "thin".into(),
                capacity: None,
            }],
            problems: vec!["a problem".into()],
            more: false,
        };
        assert_eq!(split_update(whole.clone(), 0), std::slice::from_ref(&whole));
        let parts = split_update(whole.clone(), 1024);
        assert!(parts.len() > 3, "{} parts", parts.len());
        for (n, p) in parts.iter().enumerate() {
            assert_eq!(p.more, n + 1 < parts.len());
            assert!((&p.epoch, p.generation, p.full) == (&whole.epoch, 7, true));
            assert!(
                p.encoded_len() < 1024 + 200,
                "part {n}: {} bytes",
                p.encoded_len()
            );
            assert_eq!(p.classes.is_empty(), n > 0);
        }
        let mut joined = Parts::default();
        let last = parts.len() - 1;
        for (n, p) in parts.into_iter().enumerate() {
            let out = joined.push(p).unwrap();
            assert_eq!(out.is_some(), n == last);
            if let Some(out) = out {
                assert_eq!(out, whole);
            }
        }
        // A part of another generation is an error, not a merge.
        let mut parts = split_update(whole.clone(), 1024);
        parts[1].generation = 8;
        let mut joined = Parts::default();
        joined.push(parts.remove(0)).unwrap();
        assert!(joined.push(parts.remove(0)).is_err());
    }

    #[test]
    fn only_lodestone_names_and_tags_are_ours() {
        let key = "0123456789abcdef0123456789abcdef";
        assert_eq!(own_kind(&format!("lds-{key}")).unwrap(), Kind::Volume);
        assert_eq!(own_kind(&format!("ldsnap-{key}")).unwrap(), Kind::Snapshot);
        for name in [
            "pool0",
            "root",
            "lds-",
            &format!("ldtmp-{key}"),
            &format!("lds-{key}x"),
        ] {
            let e = status_from_error(own_kind(name).unwrap_err());
            assert_eq!(e.code(), Code::PermissionDenied, "{name}");
        }
        assert!(is_own(&lv(&format!("lds-{key}"), &["lodestone.v1.vol"])));
        assert!(is_own(&lv(
            &format!("ldsnap-{key}"),
            &["x", "lodestone.v1.snap"]
        )));
        assert!(!is_own(&lv(&format!("lds-{key}"), &[])));
        assert!(!is_own(&lv(&format!("lds-{key}"), &["lodestone.v1.snap"])));
        assert!(!is_own(&lv("pool0", &["lodestone.v1.vol"])));
    }

    /// Every variant crosses the agent API as itself, with the code a plain
    /// gRPC client expects, and gives the controller the same CSI outcome.
    #[test]
    fn errors_cross_the_wire_as_their_variant() {
        use crate::runner::RunError;
        let m = || "what happened".to_string();
        let failed = RunError::Failed {
            command: "lvm lvcreate".into(),
            code: 5,
            stderr: "  Something odd".into(),
            stdout: String::new(),
        };
        let cases = [
            (LvmError::NoSuchClass(m()), Code::NotFound),
            (LvmError::LvMissing(m()), Code::NotFound),
            (LvmError::InUse(m()), Code::FailedPrecondition),
            (LvmError::Busy(m()), Code::Aborted),
            (LvmError::NoSpace(m()), Code::ResourceExhausted),
            (LvmError::AlreadyExists(m()), Code::AlreadyExists),
            (LvmError::BadRequest(m()), Code::InvalidArgument),
            (LvmError::Blocked(m()), Code::FailedPrecondition),
            (LvmError::Unavailable(m()), Code::Unavailable),
            (LvmError::PermissionDenied(m()), Code::PermissionDenied),
            (LvmError::Timeout(m()), Code::DeadlineExceeded),
            (crate::lvm::error::classify(failed), Code::Internal),
            (LvmError::Host(Error::OutOfRange(m())), Code::OutOfRange),
            (LvmError::Internal(m()), Code::Internal),
        ];
        for (sent, wire_code) in cases {
            let name = sent.wire_name();
            let message = sent.to_string();
            let status = status_from_error(sent);
            assert_eq!(status.code(), wire_code, "{name}");
            assert!(status.message().contains("what happened") || name == "command-failed");
            let got = error_from_status("node-a", status);
            assert_eq!(got.wire_name(), name);
            assert!(got.to_string().contains(&message), "{name}: {got}");
            match &got {
                LvmError::Host(e) => assert_eq!(e, &Error::OutOfRange(m())),
                LvmError::CommandFailed { source, .. } => {
                    assert_eq!(source.exit_code(), Some(5));
                    assert!(got.to_string().starts_with("node node-a: "), "{got}");
                }
                _ => {}
            }
        }
        // The two NOT_FOUNDs stay apart: the controller skips a node without
        // the class but not a missing LV.
        let class = error_from_status(
            "node-a",
            status_from_error(LvmError::NoSuchClass("no class".into())),
        );
        assert!(matches!(class, LvmError::NoSuchClass(_)), "{class:?}");
        let lv = error_from_status(
            "node-a",
            status_from_error(LvmError::LvMissing("no lv".into())),
        );
        assert!(matches!(lv, LvmError::LvMissing(_)), "{lv:?}");
        // Without a variant (a transport failure) the code decides.
        let plain = error_from_status("node-a", Status::unavailable("connection refused"));
        assert!(matches!(plain, LvmError::Unavailable(_)), "{plain:?}");
        assert!(plain.to_string().contains("node-a"), "{plain}");
        let late = error_from_status("node-a", Status::deadline_exceeded("late"));
        assert!(matches!(late, LvmError::Timeout(_)), "{late:?}");
        let cert = error_from_status("node-a", Status::permission_denied("bad cert"));
        assert!(matches!(cert, LvmError::Unavailable(_)), "{cert:?}");
    }
}
