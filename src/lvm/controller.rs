//! LVM controller logic: places volumes on nodes and manages volumes and
//! snapshots through each node's agent. Identity is in LVM (see `ids`), so
//! any controller process can restart at any time and a retried call finds
//! what an earlier attempt made.
//!
//! What every node holds and how much room it has comes from the agents'
//! inventory streams, kept in the [`Index`]: reads ask no agent, and a
//! create, delete, expand or snapshot makes exactly one agent call (plus
//! the calls a copy still running needs).
//!
//! The liveness rule: a request that involves no node that is down or
//! unseen never waits on one. A request whose volume may exist on such a
//! node (an earlier attempt of it went there, or the node has not sent its
//! inventory since this controller started) is UNAVAILABLE, naming the
//! node, rather than risk a second copy elsewhere. Placement skips nodes
//! that are not live.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use crate::config::{DeviceClass, LvmConfig, TOPOLOGY_NODE_KEY};
use crate::core::backend::{
    Capacity, ControllerBackend, CreateSnapshot, CreateVolume, Secrets, SnapshotInfo, Source,
    VolumeInfo,
};
use crate::core::blockmap::BlockMap;
use crate::core::capacity::Range;
use crate::core::periodic;
use crate::core::placement::{self, Candidates};
use crate::core::request::{topology_matches, Access, FsType};
use crate::csi;
use crate::error::{Error, Result};
use crate::lvm::agent::{Agent, ClassCapacity, LvSpec, Origin, Pull};
use crate::lvm::ids::{self, Kind, LvId, LvmKind, TAG_COPYING};
use crate::lvm::index::{self, Health, Index, Ranked};
use crate::lvm::inventory::Stamp;
use crate::lvm::params::{LvmParams, PARAMETER_KEYS};
use crate::lvm::report::Lv;

pub(crate) struct LvmController {
    config: LvmConfig,
    /// The agents of known nodes, by node id, each with the task that
    /// follows its inventory. Nodes are added as the resolver finds them
    /// and never dropped in a process's life (a node that went away is
    /// down, so nothing on it looks deleted).
    agents: RwLock<BTreeMap<String, Slot>>,
    index: Arc<Index>,
    /// The heartbeat period asked of every agent's stream.
    heartbeat: Duration,
    setups: Arc<tokio::sync::Semaphore>,
    /// Time spent deciding placements (for the metrics).
    pub placements: prometheus_client::metrics::histogram::Histogram,
    /// Whether an id naming an unknown node is UNAVAILABLE (central
    /// controller: the node may not be resolved yet) rather than absent.
    strict_nodes: bool,
    not_ready: Box<dyn Fn() -> Option<String> + Send + Sync>,
    /// The node each create went to, by LV key, in this process's life: a
    /// retry whose earlier attempt went to a node that is now unreachable
    /// waits for that node instead of creating a second copy elsewhere.
    attempts: Mutex<HashMap<String, String>>,
    /// LV keys found on more than one node (see `report_duplicates`).
    pub duplicates: AtomicU64,
}

/// Space promised to one create under way (see [`Index::place`]): freed
/// when dropped (the create failed, or its caller left), or held until
/// the node's inventory shows the create.
struct Reserved {
    index: Arc<Index>,
    id: u64,
    open: bool,
}

impl Reserved {
    fn new(index: Arc<Index>, id: u64) -> Self {
        Reserved {
            index,
            id,
            open: true,
        }
    }

    fn held_until(mut self, stamp: Stamp) {
        self.open = false;
        self.index.settle(self.id, Some(stamp));
    }
}

impl Drop for Reserved {
    fn drop(&mut self) {
        if self.open {
            self.index.settle(self.id, None);
        }
    }
}

struct Slot {
    agent: Arc<dyn Agent>,
    follower: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(f) = &self.follower {
            f.abort();
        }
    }
}

/// The heartbeat period the controller asks of agents' streams.
pub(crate) const HEARTBEAT: Duration = Duration::from_secs(2);

fn node_segments(node: &str) -> BTreeMap<String, String> {
    [(TOPOLOGY_NODE_KEY.to_string(), node.to_string())].into()
}

fn is_copying(lv: &Lv) -> bool {
    ids::has_tag(&lv.tags, TAG_COPYING)
}

/// How large a new volume may be and is by default.
struct Sizing {
    /// The largest of the filesystem's minimum and the source's size.
    minimum: u64,
    /// The size when the request names none: the source's, or the class's.
    default: u64,
}

impl Sizing {
    fn of(req: &CreateVolume, class: &DeviceClass, source: Option<&Lv>) -> Result<Sizing> {
        let fs_minimum = req
            .capabilities
            .iter()
            .map(|c| match &c.access {
                Access::Mount { fs, .. } => fs.unwrap_or(FsType::Ext4).min_bytes(),
                Access::Block => 0,
            })
            .max()
            .unwrap_or(0);
        let source_size = source.map(|lv| lv.size).unwrap_or(0);
        if req.range.limit > 0 && source_size > req.range.limit {
            return Err(Error::OutOfRange(format!(
                "the source holds {source_size} bytes, more than limit_bytes {}",
                req.range.limit
            )));
        }
        Ok(Sizing {
            minimum: fs_minimum.max(source_size),
            default: if source.is_some() {
                source_size
            } else {
                class.default_size_bytes
            },
        })
    }
}

/// Where a clone on another node stands with its source's point in time.
enum PointInTime {
    /// The hidden snapshot to read, complete.
    Ready(LvId),
    /// A thick hidden snapshot still being copied: its progress.
    Copying(String),
}

/// (kind, id, what to call it) of a restore's or clone's source.
fn source_parts(source: &Source) -> (Kind, &str, &'static str) {
    match source {
        Source::Snapshot(id) => (Kind::Snapshot, id, "snapshot"),
        Source::Volume(id) => (Kind::Volume, id, "volume"),
    }
}

/// The hidden snapshot clone `id` reads: on the source volume's node and
/// in its class.
fn hidden_source_of(id: &LvId, source: &LvId) -> LvId {
    LvId {
        kind: Kind::Snapshot,
        node: source.node.clone(),
        class: source.class.clone(),
        key: ids::hidden_source_key(&id.key),
    }
}

/// What the node is asked to create for a new volume.
fn new_volume_spec(
    req: &CreateVolume,
    id: &LvId,
    size: u64,
    digest: &str,
    source: Option<&(LvId, Lv)>,
) -> LvSpec {
    LvSpec {
        class: id.class.clone(),
        name: id.lv_name(),
        size,
        tags: ids::tags(
            Kind::Volume,
            &req.name,
            digest,
            source.map(|(s, _)| s),
            false,
        ),
        origin: source.map(|(sid, lv)| Origin {
            class: sid.class.clone(),
            lv: lv.name.clone(),
            frozen: sid.kind == Kind::Snapshot,
        }),
        pull: None,
        read_only: false,
    }
}

impl LvmController {
    pub(crate) fn new(
        config: LvmConfig,
        agents: Vec<Arc<dyn Agent>>,
        not_ready: Box<dyn Fn() -> Option<String> + Send + Sync>,
    ) -> Self {
        let index = Arc::new(Index::default());
        let agents = agents
            .into_iter()
            .map(|a| {
                index.add_node(a.node());
                let slot = Slot {
                    agent: a.clone(),
                    follower: None,
                };
                (a.node().to_string(), slot)
            })
            .collect();
        LvmController {
            config,
            agents: RwLock::new(agents),
            index,
            heartbeat: HEARTBEAT,
            setups: Arc::new(tokio::sync::Semaphore::new(index::SETUPS_AT_ONCE)),
            placements: prometheus_client::metrics::histogram::Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(1e-5, 4.0, 10),
            ),
            strict_nodes: false,
            not_ready,
            attempts: Mutex::default(),
            duplicates: AtomicU64::new(0),
        }
    }

    /// Sets the heartbeat period asked of agents' streams (before use).
    pub(crate) fn with_heartbeat(mut self, every: Duration) -> Self {
        self.heartbeat = every;
        self
    }

    /// The central controller: no agents until the resolver adds them, and
    /// ids of nodes not (yet) known are UNAVAILABLE, never "deleted".
    pub(crate) fn central(config: LvmConfig) -> Self {
        let mut c = Self::new(config, Vec::new(), Box::new(|| None));
        c.strict_nodes = true;
        c
    }

    fn named_class(&self, name: &str) -> Result<&DeviceClass> {
        self.config.class(name).ok_or_else(|| {
            let known: Vec<&str> = self
                .config
                .classes
                .iter()
                .map(|c| c.name.as_str())
                .collect();
            Error::InvalidArgument(format!(
                "unknown deviceClass {name:?}; configured classes: {}",
                known.join(", ")
            ))
        })
    }

    fn class_for(&self, params: &LvmParams) -> Result<&DeviceClass> {
        match &params.device_class {
            None => Ok(self.config.default_class()),
            Some(name) => self.named_class(name),
        }
    }

    fn agent(&self, node: &str) -> Option<Arc<dyn Agent>> {
        self.agents
            .read()
            .expect("agents poisoned")
            .get(node)
            .map(|s| s.agent.clone())
    }

    /// The agent of a node the index has the LV on, for a change: fails
    /// fast, naming the node, when the node is not live.
    fn agent_for_change(&self, node: &str) -> Result<Arc<dyn Agent>> {
        match self.index.health(node) {
            Some(Health::Live) => {}
            Some(Health::Down(why)) => return Err(index::down_error(node, &why).into()),
            Some(Health::Unseen) | None => {
                return Err(Error::Unavailable(format!(
                    "node {node} has not sent its inventory to this controller yet; retry"
                )))
            }
        }
        self.agent(node)
            .ok_or_else(|| Error::Unavailable(format!("node {node} is not known; retry")))
    }

    /// Adds (or replaces, when its address changed) the agent of a node,
    /// and follows its inventory.
    pub(crate) fn set_agent(&self, agent: Arc<dyn Agent>) {
        let node = agent.node().to_string();
        self.index.add_node(&node);
        let follower = Some(self.follow(agent.clone()));
        let mut agents = self.agents.write().expect("agents poisoned");
        agents.insert(node, Slot { agent, follower });
    }

    fn follow(&self, agent: Arc<dyn Agent>) -> tokio::task::JoinHandle<()> {
        index::follow(
            Arc::downgrade(&self.index),
            agent,
            self.heartbeat,
            self.setups.clone(),
        )
    }

    /// Follows the inventory of every agent given at construction, and
    /// waits (at most `limit`) until each has sent it.
    pub(crate) async fn start(&self, limit: Duration) {
        {
            let mut agents = self.agents.write().expect("agents poisoned");
            for slot in agents.values_mut() {
                if slot.follower.is_none() {
                    slot.follower = Some(self.follow(slot.agent.clone()));
                }
            }
        }
        let unseen = self.index.wait_seen(limit).await;
        if !unseen.is_empty() {
            tracing::warn!(nodes = ?unseen, "serving before these nodes sent their inventory");
        }
    }

    /// Node counts by health: (live, down, unseen).
    pub(crate) fn node_counts(&self) -> (usize, usize, usize) {
        self.index.counts()
    }

    /// The LV an id names, if it exists and carries its kind's tag, as the
    /// index has it. UNAVAILABLE when its node's inventory is not in.
    async fn find(&self, id: &LvId) -> Result<Option<Lv>> {
        if self.agent(&id.node).is_none() {
            if self.strict_nodes {
                return Err(Error::Unavailable(format!(
                    "node {} is not known to this controller (yet); retry",
                    id.node
                )));
            }
            return Ok(None);
        }
        if self.config.class(&id.class).is_none() {
            return Ok(None);
        }
        if self.index.health(&id.node) == Some(Health::Unseen) {
            return Err(Error::Unavailable(format!(
                "node {} has not sent its inventory to this controller yet; retry",
                id.node
            )));
        }
        let lv = self.index.get(&id.node, &id.class, &id.lv_name());
        // A hidden snapshot is not one by any id.
        Ok(lv
            .filter(|l| ids::has_tag(&l.tags, id.kind.tag()) && ids::tagged_for(&l.tags).is_none()))
    }

    async fn resolve(&self, kind: Kind, id: &str) -> Result<Option<(LvId, Lv)>> {
        let Some(lid) = LvId::parse(kind, id) else {
            return Ok(None);
        };
        Ok(self.find(&lid).await?.map(|lv| (lid, lv)))
    }

    /// An LV of that kind and key in any class on any node, from the
    /// index. When there is none, the liveness rule applies: UNAVAILABLE if
    /// an earlier attempt of this request went to a node that is not live
    /// now, or if some node has not sent its inventory since this
    /// controller started (the LV could be there); nodes that were seen
    /// and are down now are only logged.
    async fn find_anywhere(&self, kind: Kind, key: &str) -> Result<Option<(LvId, Lv)>> {
        let found = self.index.find_key(kind, key);
        if found.len() > 1 {
            let places: Vec<LvId> = found.iter().map(|(id, _)| id.clone()).collect();
            self.report_places(kind, &places);
        }
        if let Some(hit) = found.into_iter().next() {
            return Ok(Some(hit));
        }
        let tried = self
            .attempts
            .lock()
            .expect("attempts poisoned")
            .get(key)
            .cloned();
        if let Some(node) = tried {
            match self.index.health(&node) {
                Some(Health::Down(why)) => {
                    return Err(Error::Unavailable(format!(
                        "an earlier attempt of this request went to node {node}, which is down \
                         ({why}); retry when it is back"
                    )))
                }
                Some(Health::Unseen) => {
                    return Err(Error::Unavailable(format!(
                        "an earlier attempt of this request went to node {node}, whose \
                         inventory is not in yet; retry"
                    )))
                }
                _ => {}
            }
        }
        let absent = self.index.absent();
        if !absent.unseen.is_empty() {
            let n = absent.unseen.len();
            let first: Vec<&str> = absent.unseen.iter().take(5).map(String::as_str).collect();
            return Err(Error::Unavailable(format!(
                "{n} node(s) ({}{}) have not sent their inventory since this controller \
                 started, and this request's {} could be there; retry",
                first.join(", "),
                if n > first.len() { ", ..." } else { "" },
                if kind == Kind::Volume {
                    "volume"
                } else {
                    "snapshot"
                }
            )));
        }
        Ok(None)
    }

    fn note_attempt(&self, key: &str, node: &str) {
        self.attempts
            .lock()
            .expect("attempts poisoned")
            .insert(key.to_string(), node.to_string());
    }

    fn forget_attempt(&self, key: &str) {
        self.attempts.lock().expect("attempts poisoned").remove(key);
    }

    /// Logs (and counts) every LV key that exists on more than one node or
    /// in more than one class: a duplicate left by a retry during a window
    /// this controller could not see (see docs). Nothing is deleted.
    fn report_duplicates(&self, kind: Kind) {
        for places in self.index.duplicates(kind) {
            self.report_places(kind, &places);
        }
    }

    /// Logs (and counts) every place of one request key after the first.
    fn report_places(&self, kind: Kind, places: &[LvId]) {
        let Some((first, others)) = places.split_first() else {
            return;
        };
        for second in others {
            self.duplicates.fetch_add(1, Ordering::Relaxed);
            tracing::error!(
                kind = ?kind, first = %first.encode(), second = %second.encode(),
                "the same request's {} exists twice; nothing was deleted: keep the one in \
                 use and delete the other",
                if kind == Kind::Volume { "volume" } else { "snapshot" }
            );
        }
    }

    /// An existing LV for a retried request: it must be the one this name
    /// made with these parameters, else ALREADY_EXISTS.
    fn check_existing(&self, name: &str, lv: &Lv, digest: &str, what: &str) -> Result<()> {
        if ids::tagged_name(&lv.tags).as_deref() != Some(name) {
            return Err(Error::AlreadyExists(format!(
                "logical volume {}/{} exists but was not created for {name:?}; remove or rename \
                 it",
                lv.vg, lv.name
            )));
        }
        if ids::tagged_digest(&lv.tags) != Some(digest) {
            return Err(Error::AlreadyExists(format!(
                "{what} {name:?} already exists with different parameters or source"
            )));
        }
        Ok(())
    }

    /// A restore or clone made as a thin snapshot and then grown: if the
    /// growth was interrupted (a crash between the two steps), it is done
    /// now, to the size recorded when the LV was created.
    async fn finish_growth(&self, id: &LvId, lv: Lv) -> Result<Lv> {
        match ids::tagged_size(&lv.tags) {
            Some(size) if size > lv.size => {
                tracing::info!(lv = %lv.name, from = lv.size, to = size,
                    "finishing the growth of an interrupted restore or clone");
                let agent = self.agent_for_change(&id.node)?;
                let done = agent.extend(&id.class, &lv.name, size).await?;
                let lv = done.value;
                self.index
                    .record(&id.node, &id.class, &lv.name, Some(lv.clone()), done.stamp);
                Ok(lv)
            }
            _ => Ok(lv),
        }
    }

    /// A copy still under way: make sure it runs, and give it a moment.
    async fn settle(&self, id: &LvId, lv: Lv) -> Result<(Lv, Option<String>)> {
        if !is_copying(&lv) {
            return Ok((lv, None));
        }
        // A copy from another node: its source's agent is asked again to
        // let this node read (a restarted agent forgot), and the target is
        // told where the source is now. A clone reads the hidden snapshot
        // that holds its source volume's point in time.
        let pull = match (
            ids::tagged_from(&lv.tags),
            ids::tagged_source(&lv.tags, &id.node),
        ) {
            (Some(_), Some(src)) => {
                let snapshot = match src.kind {
                    Kind::Snapshot => src,
                    Kind::Volume => match self.point_in_time(id, &lv, &src).await? {
                        PointInTime::Ready(hidden) => hidden,
                        PointInTime::Copying(progress) => return Ok((lv, Some(progress))),
                    },
                };
                match self.pull_from(&snapshot, &id.node).await {
                    Ok(pull) => Some(pull),
                    Err(Error::NotFound(m)) => {
                        // The snapshot is gone: this copy can never complete,
                        // and it was never reported, so it goes.
                        self.remove(id, &lv).await?;
                        return Err(Error::NotFound(format!(
                            "the source snapshot {} no longer exists ({m}); the unfinished copy \
                             was removed",
                            snapshot.encode()
                        )));
                    }
                    Err(e) => return Err(e),
                }
            }
            _ => None,
        };
        let (lv, progress) = self.advance(id, lv, pull.as_ref()).await?;
        if progress.is_none() {
            crate::fail_point!("lvm.clone.before_dropping_point_in_time");
            self.drop_point_in_time(id, &lv).await;
        }
        Ok((lv, progress))
    }

    /// Makes sure the copy into an LV runs (on its node), and returns the
    /// LV as it is after a moment, with the copy's progress while it is
    /// incomplete; FAILED_PRECONDITION once it failed for good.
    async fn advance(
        &self,
        id: &LvId,
        lv: Lv,
        pull: Option<&Pull>,
    ) -> Result<(Lv, Option<String>)> {
        let agent = self.agent_for_change(&id.node)?;
        let done = agent.resume(&id.class, &lv.name, pull).await?;
        self.index.record(
            &id.node,
            &id.class,
            &lv.name,
            done.value.clone(),
            done.stamp,
        );
        let lv = done.value.unwrap_or(lv);
        if !is_copying(&lv) {
            return Ok((lv, None));
        }
        match agent.copy_progress(&id.class, &lv.name).await {
            Some((message, true)) => Err(Error::FailedPrecondition(message)),
            Some((message, false)) => Ok((lv, Some(message))),
            None => Ok((lv, Some("copying data".to_string()))),
        }
    }

    /// The hidden snapshot a clone on another node reads (see
    /// [`ids::FOR_TAG`]): made on the source volume's node the first time
    /// the clone settles, after the clone's LV exists (so the sweep can
    /// always tell whether a hidden snapshot is still needed).
    async fn point_in_time(&self, id: &LvId, lv: &Lv, source: &LvId) -> Result<PointInTime> {
        let hidden = hidden_source_of(id, source);
        let found = self
            .index
            .get(&hidden.node, &hidden.class, &hidden.lv_name())
            .filter(|h| ids::tagged_for(&h.tags).is_some());
        let h = match found {
            Some(h) => h,
            None => self.make_point_in_time(id, lv, source, &hidden).await?,
        };
        if !is_copying(&h) {
            return Ok(PointInTime::Ready(hidden));
        }
        match self.advance(&hidden, h.clone(), None).await {
            Ok((_, None)) => Ok(PointInTime::Ready(hidden)),
            Ok((_, Some(progress))) => Ok(PointInTime::Copying(format!(
                "taking the source volume's point in time on node {}: {progress}",
                hidden.node
            ))),
            Err(Error::FailedPrecondition(m)) => {
                // Nothing was read from it yet (a grant needs it complete):
                // the next attempt takes the point in time again.
                self.remove(&hidden, &h).await?;
                Err(Error::Aborted(format!(
                    "the copy of the source volume on node {} failed ({m}) and was removed; \
                     retry",
                    hidden.node
                )))
            }
            Err(e) => Err(e),
        }
    }

    async fn make_point_in_time(
        &self,
        id: &LvId,
        lv: &Lv,
        source: &LvId,
        hidden: &LvId,
    ) -> Result<Lv> {
        if ids::tagged_copied(&lv.tags) > 0 {
            // Data from a point in time that no longer exists: start over.
            self.remove(id, lv).await?;
            return Err(Error::Aborted(format!(
                "the point in time volume {} was being cloned from is gone; the unfinished \
                 clone was removed; retry",
                source.encode()
            )));
        }
        let Some(src_lv) = self.find(source).await? else {
            self.remove(id, lv).await?;
            return Err(Error::NotFound(format!(
                "source volume {} does not exist; the unfinished clone was removed",
                source.encode()
            )));
        };
        let mut tags = ids::tags(
            Kind::Snapshot,
            &ids::tagged_name(&lv.tags).unwrap_or_default(),
            ids::tagged_digest(&lv.tags).unwrap_or_default(),
            Some(source),
            false,
        );
        tags.push(ids::for_tag(&id.node, &id.key));
        let spec = LvSpec {
            class: source.class.clone(),
            name: hidden.lv_name(),
            size: src_lv.size,
            tags,
            origin: Some(Origin {
                class: source.class.clone(),
                lv: src_lv.name.clone(),
                frozen: false,
            }),
            pull: None,
            read_only: true,
        };
        let agent = self.agent_for_change(&source.node)?;
        // A thick source's point in time is a full copy: its size is
        // promised on the source's node, so that creates placed there
        // meanwhile do not count the same space.
        let reserved = match src_lv.pool {
            Some(_) => None,
            None => Some(self.reserve_on(&source.node, &source.class, src_lv.size)?),
        };
        let done = agent.create(&spec).await?;
        self.record(hidden, &done.value, done.stamp.clone());
        if let Some(r) = reserved {
            r.held_until(done.stamp);
        }
        tracing::info!(clone = %id.encode(), source = %source.encode(), hidden = %hidden.encode(),
            "took the source volume's point in time for a clone on another node");
        crate::fail_point!("lvm.clone.after_point_in_time");
        Ok(done.value)
    }

    /// Removes the hidden snapshot of a clone on another node, if it has
    /// one: once the clone is complete or deleted. A failure is logged; the
    /// sweep ([`Self::sweep_points_in_time`]) removes it later.
    async fn drop_point_in_time(&self, id: &LvId, lv: &Lv) {
        let Some(source) = ids::tagged_source(&lv.tags, &id.node)
            .filter(|s| s.kind == Kind::Volume && ids::tagged_from(&lv.tags).is_some())
        else {
            return;
        };
        let hidden = hidden_source_of(id, &source);
        let Some(h) = self
            .index
            .get(&hidden.node, &hidden.class, &hidden.lv_name())
        else {
            return;
        };
        match self.remove(&hidden, &h).await {
            Ok(()) => tracing::info!(clone = %id.encode(), hidden = %hidden.encode(),
                "removed the hidden snapshot of a clone"),
            Err(e) => tracing::warn!(clone = %id.encode(), hidden = %hidden.encode(), error = %e,
                "could not remove the hidden snapshot of a clone; the sweep will"),
        }
    }

    /// Removes every hidden snapshot whose clone is complete or gone (a
    /// crash between the clone's end and the removal, a delete racing a
    /// copy). Judged only from the clone's node's inventory: while that
    /// node is not live, its hidden snapshots stay.
    pub(crate) async fn sweep_points_in_time(&self) {
        for (hidden, h) in self.index.list_tagged(Kind::Snapshot, ids::FOR_TAG) {
            let Some((node, key)) = ids::tagged_for(&h.tags) else {
                continue;
            };
            if self.index.health(node) != Some(Health::Live) {
                continue;
            }
            let needed = self
                .index
                .find_key(Kind::Volume, key)
                .iter()
                .any(|(vid, v)| vid.node == node && is_copying(v));
            if needed {
                continue;
            }
            match self.remove(&hidden, &h).await {
                Ok(()) => tracing::info!(hidden = %hidden.encode(),
                    "removed a hidden snapshot whose clone is complete or gone"),
                Err(e) => tracing::warn!(hidden = %hidden.encode(), error = %e,
                    "could not remove a hidden snapshot; next sweep"),
            }
        }
    }

    /// Every `every`, looks through the index for duplicates (e.g. after a
    /// node that was down comes back) and sweeps hidden snapshots no clone
    /// needs any more.
    pub(crate) fn spawn_duplicate_scan(self: &Arc<Self>, every: Duration) {
        if every.is_zero() {
            return;
        }
        periodic::spawn_every(self, every, |me: Arc<Self>| async move {
            for kind in [Kind::Volume, Kind::Snapshot] {
                me.report_duplicates(kind);
            }
            me.sweep_points_in_time().await;
        });
    }

    fn volume_info(id: &LvId, lv: &Lv) -> VolumeInfo {
        let source = ids::tagged_source(&lv.tags, &id.node).map(|s| match s.kind {
            Kind::Snapshot => Source::Snapshot(s.encode()),
            Kind::Volume => Source::Volume(s.encode()),
        });
        VolumeInfo {
            id: id.encode(),
            capacity: lv.size,
            topology: vec![node_segments(&id.node)],
            context: BTreeMap::new(),
            abnormal: (!lv.is_active()).then(|| "logical volume is not active".to_string()),
            source,
        }
    }

    fn snapshot_info(id: &LvId, lv: &Lv) -> SnapshotInfo {
        let source = ids::tagged_source(&lv.tags, &id.node)
            .map(|s| s.encode())
            .unwrap_or_default();
        SnapshotInfo {
            id: id.encode(),
            source_volume_id: source,
            size: lv.size,
            created: lv.created.unwrap_or(0),
            ready: !is_copying(lv),
        }
    }

    /// A snapshot whose block map is asked for: it must exist and be
    /// complete (a thick snapshot's copy may still run).
    async fn mapped_snapshot(&self, id: &str) -> Result<(LvId, Lv)> {
        let (lid, lv) = self
            .resolve(Kind::Snapshot, id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("snapshot {id} does not exist")))?;
        if is_copying(&lv) {
            return Err(Error::FailedPrecondition(format!(
                "snapshot {id} is not ready to use yet (its copy runs)"
            )));
        }
        Ok((lid, lv))
    }

    /// Whether a restore or clone from `source` may be copied to another
    /// node: its node's agent can be reached by other agents.
    fn can_pull(&self, source: &LvId) -> bool {
        self.agent(&source.node)
            .is_some_and(|a| a.address().is_some())
    }

    /// Where the agent of `target` reads snapshot `source` from, once the
    /// source's agent has granted it (renewed at each call).
    async fn pull_from(&self, source: &LvId, target: &str) -> Result<Pull> {
        let agent = self.agent_for_change(&source.node)?;
        let address = agent.address().map(str::to_string).ok_or_else(|| {
            Error::FailedPrecondition(format!(
                "node {} cannot serve its snapshots to other nodes",
                source.node
            ))
        })?;
        let lv = source.lv_name();
        agent.grant(&source.class, &lv, target).await?;
        Ok(Pull {
            node: source.node.clone(),
            address,
            class: source.class.clone(),
            lv,
        })
    }

    /// The place a restore's or clone's source id names (no lookup):
    /// NOT_FOUND for an id this driver never issues, or of a class that is
    /// not configured.
    fn source_id(&self, source: &Source) -> Result<LvId> {
        let (kind, id, what) = source_parts(source);
        LvId::parse(kind, id)
            .filter(|sid| self.config.class(&sid.class).is_some())
            .ok_or_else(|| Error::NotFound(format!("source {what} {id} does not exist")))
    }

    /// The source of a new restore or clone, which must exist and be
    /// complete.
    async fn source_of(&self, source: &Source, sid: LvId) -> Result<(LvId, Lv)> {
        let (_, id, what) = source_parts(source);
        let lv = self
            .find(&sid)
            .await?
            .ok_or_else(|| Error::NotFound(format!("source {what} {id} does not exist")))?;
        if is_copying(&lv) {
            return Err(Error::Aborted(format!(
                "source {what} {id} is still being copied; retry when it is ready"
            )));
        }
        Ok((sid, lv))
    }

    /// The class a new volume goes to: the StorageClass's, else its
    /// source's, else the default.
    fn class_of_new_volume(
        &self,
        params: &LvmParams,
        source: Option<&LvId>,
    ) -> Result<&DeviceClass> {
        match (&params.device_class, source) {
            (None, Some(sid)) => self.named_class(&sid.class),
            _ => self.class_for(params),
        }
    }

    /// A CreateVolume whose LV exists already (a retry, or a replay after a
    /// crash): the same volume if this request would have made it, else
    /// ALREADY_EXISTS; ABORTED while its data is still being copied.
    async fn answer_retry(
        &self,
        req: &CreateVolume,
        class: &DeviceClass,
        digest: &str,
        id: LvId,
        lv: Lv,
    ) -> Result<VolumeInfo> {
        self.check_existing(&req.name, &lv, digest, "volume")?;
        let lv = self.finish_growth(&id, lv).await?;
        if id.class != class.name || !req.range.accepts(lv.size) {
            return Err(Error::AlreadyExists(format!(
                "volume {:?} already exists with {} bytes in device class {}, which this \
                 request does not accept",
                req.name, lv.size, id.class
            )));
        }
        let (lv, copying) = self.settle(&id, lv).await?;
        if let Some(progress) = copying {
            return Err(Error::Aborted(format!(
                "volume {:?}: {progress}; retry",
                req.name
            )));
        }
        Ok(Self::volume_info(&id, &lv))
    }

    /// Placement: the live nodes' room for the class (from the index, less
    /// what creates under way were promised), then the decision, and a
    /// reservation of the volume's size on the chosen node. Returns the
    /// decision, the size the volume has there, and the reservation.
    fn place(
        &self,
        req: &CreateVolume,
        class: &DeviceClass,
        sizing: &Sizing,
        source_node: Option<&str>,
        movable: bool,
    ) -> Result<((placement::Decision, u64), Reserved)> {
        let started = Instant::now();
        let placed = self.index.place(&class.name, |ranked| {
            // The size rounds up to the extent: the largest any node needs.
            let mut largest = None;
            for extent in ranked.extent_sizes() {
                let size = req.range.pick(extent, sizing.minimum, sizing.default)?;
                largest = largest.max(Some(size));
            }
            let Some(largest) = largest else {
                return Err(Error::Unavailable(format!(
                    "no live node can serve device class {} right now",
                    class.name
                )));
            };
            let decision = placement::place(
                req.requirement.as_ref(),
                ranked,
                largest,
                source_node,
                movable,
            )
            .map_err(|e| match e {
                Error::ResourceExhausted(m) => match full_pools(class, ranked) {
                    full if full.is_empty() => Error::ResourceExhausted(m),
                    full => Error::ResourceExhausted(format!("{m}; {}", full.join("; "))),
                },
                e => e,
            })?;
            let cap = ranked
                .capacity(&decision.node)
                .expect("the decision is a candidate");
            let size = req
                .range
                .pick(cap.extent_size, sizing.minimum, sizing.default)?;
            let node = decision.node.clone();
            Ok(((decision, size), node, size))
        });
        self.placements.observe(started.elapsed().as_secs_f64());
        let (_, down, unseen) = self.index.counts();
        if down + unseen > 0 {
            tracing::info!(class = %class.name, down, unseen,
                "placement skipped the nodes that are not live");
        }
        let (decided, id) = placed?;
        Ok((decided, Reserved::new(self.index.clone(), id)))
    }

    /// Reserves `bytes` of `class` on `node` for an LV that placement did
    /// not choose the node of: RESOURCE_EXHAUSTED when its room is short.
    fn reserve_on(&self, node: &str, class: &str, bytes: u64) -> Result<Reserved> {
        let id = self.index.reserve(node, class, bytes).ok_or_else(|| {
            Error::ResourceExhausted(format!(
                "node {node} has no room for {bytes} more bytes in device class {class} \
                 (the copy of the source volume a clone on another node reads)"
            ))
        })?;
        Ok(Reserved::new(self.index.clone(), id))
    }

    /// Creates the LV on its node and answers once its data is complete
    /// (ABORTED while a copy from its source runs). Ends the reservation
    /// made for it when the agent answers (and, on success, once the
    /// node's inventory shows the new LV).
    async fn create_on_node(
        &self,
        req: &CreateVolume,
        id: &LvId,
        spec: &LvSpec,
        reservation: Reserved,
    ) -> Result<VolumeInfo> {
        let agent = self.agent_for_change(&id.node)?;
        self.note_attempt(&id.key, &id.node);
        let done = agent.create(spec).await?;
        self.record(id, &done.value, done.stamp.clone());
        reservation.held_until(done.stamp);
        let (lv, copying) = self.settle(id, done.value).await?;
        if let Some(progress) = copying {
            return Err(Error::Aborted(format!(
                "volume {:?} is being filled from its source ({progress}); retry",
                req.name
            )));
        }
        Ok(Self::volume_info(id, &lv))
    }

    fn record(&self, id: &LvId, lv: &Lv, stamp: Stamp) {
        self.index
            .record(&id.node, &id.class, &lv.name, Some(lv.clone()), stamp);
    }

    /// Removes an LV the index has, and records that it is gone.
    async fn remove(&self, id: &LvId, lv: &Lv) -> Result<()> {
        let agent = self.agent_for_change(&id.node)?;
        let stamp = agent.remove(&id.class, &lv.name).await?;
        self.index
            .record(&id.node, &id.class, &lv.name, None, stamp);
        Ok(())
    }

    /// Every LV of the kind, from the index (duplicates are reported).
    fn list_kind(&self, kind: Kind) -> Vec<(LvId, Lv)> {
        self.report_duplicates(kind);
        self.index.list(kind)
    }
}

#[tonic::async_trait]
impl ControllerBackend for LvmController {
    fn parameter_keys(&self) -> &'static [&'static str] {
        PARAMETER_KEYS
    }

    fn is_valid_id(&self, id: &str) -> bool {
        LvId::parse(Kind::Volume, id).is_some()
    }

    fn not_ready(&self) -> Option<String> {
        (self.not_ready)()
    }

    async fn create_volume(&self, req: &CreateVolume) -> Result<VolumeInfo> {
        let params = LvmParams::parse(&req.params)?;
        // The source's id is all the request's identity needs (its class,
        // the digest): a retry is answered without looking the source up,
        // so also after the source is gone (a clone copies from its own
        // point in time). Only a new volume needs the source's LV.
        let sid = req.source.as_ref().map(|s| self.source_id(s)).transpose()?;
        let class = self.class_of_new_volume(&params, sid.as_ref())?;
        let source_id = sid.as_ref().map(LvId::encode);
        let digest =
            ids::params_digest(&LvmParams::digest_input(&class.name, source_id.as_deref()));
        let key = Kind::Volume.key_for_name(&req.name);
        // A retry (or a replay after a crash) finds what the first attempt made.
        if let Some((id, lv)) = self.find_anywhere(Kind::Volume, &key).await? {
            return self.answer_retry(req, class, &digest, id, lv).await;
        }
        let source = match (&req.source, sid) {
            (Some(s), Some(sid)) => Some(self.source_of(s, sid).await?),
            _ => None,
        };
        let sizing = Sizing::of(req, class, source.as_ref().map(|(_, lv)| lv))?;
        let source_node = source.as_ref().map(|(sid, _)| sid.node.as_str());
        let movable = source.as_ref().is_some_and(|(sid, _)| self.can_pull(sid));
        let deciding = Instant::now();
        let ((decision, size), reservation) =
            self.place(req, class, &sizing, source_node, movable)?;
        let placement_us = deciding.elapsed().as_micros() as u64;
        tracing::info!(
            name = %req.name, node = %decision.node, rule = decision.rule, class = %class.name,
            size, source = ?source_id, placement_us, "placed volume"
        );
        let id = LvId {
            kind: Kind::Volume,
            node: decision.node,
            class: class.name.clone(),
            key,
        };
        let mut spec = new_volume_spec(req, &id, size, &digest, source.as_ref());
        if let Some((sid, _)) = source.as_ref().filter(|(sid, _)| sid.node != id.node) {
            // A restore or clone on another node than its source's: the new
            // node reads the data from the source's node. A restore starts
            // reading at once; a clone's LV is made first, and its first
            // settle takes the source volume's point in time to read from.
            spec.origin = None;
            if sid.kind == Kind::Snapshot {
                spec.pull = Some(self.pull_from(sid, &id.node).await?);
            }
            spec.tags.push(ids::from_tag(&sid.node));
            spec.tags.push(TAG_COPYING.to_string());
        }
        self.create_on_node(req, &id, &spec, reservation).await
    }

    async fn delete_volume(&self, id: &str, _: &Secrets) -> Result<()> {
        match self.resolve(Kind::Volume, id).await? {
            Some((lid, lv)) => {
                self.remove(&lid, &lv).await?;
                self.forget_attempt(&lid.key);
                self.drop_point_in_time(&lid, &lv).await;
                Ok(())
            }
            None => Ok(()),
        }
    }

    async fn get_volume(&self, id: &str) -> Result<Option<VolumeInfo>> {
        Ok(self
            .resolve(Kind::Volume, id)
            .await?
            .filter(|(_, lv)| !is_copying(lv))
            .map(|(lid, lv)| Self::volume_info(&lid, &lv)))
    }

    async fn list_volumes(&self) -> Result<Vec<VolumeInfo>> {
        let mut out: Vec<VolumeInfo> = self
            .list_kind(Kind::Volume)
            .iter()
            .filter(|(_, lv)| !is_copying(lv))
            .map(|(id, lv)| Self::volume_info(id, lv))
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    async fn expand_volume(&self, id: &str, range: Range, _: &Secrets) -> Result<u64> {
        let (lid, lv) = self
            .resolve(Kind::Volume, id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("volume {id} does not exist")))?;
        if lv.size >= range.required {
            return Ok(lv.size);
        }
        let agent = self.agent_for_change(&lid.node)?;
        let room = self.index.room(&lid.node, &lid.class).ok_or_else(|| {
            Error::Unavailable(format!(
                "node {} has no capacity report for device class {}; retry",
                lid.node, lid.class
            ))
        })?;
        let cap = ClassCapacity {
            available: room.capacity.available.saturating_sub(room.reserved),
            ..room.capacity
        };
        let size = range.pick(cap.extent_size, 0, lv.size)?;
        if size - lv.size > cap.available {
            return Err(Error::ResourceExhausted(format!(
                "growing {id} by {} bytes needs more than the {} bytes available in device \
                 class {}",
                size - lv.size,
                cap.available,
                lid.class
            )));
        }
        let done = agent.extend(&lid.class, &lv.name, size).await?;
        self.record(&lid, &done.value, done.stamp);
        Ok(done.value.size)
    }

    async fn capacity(
        &self,
        params: &BTreeMap<String, String>,
        topology: Option<&csi::Topology>,
    ) -> Result<Capacity> {
        let class = self.class_for(&LvmParams::parse(params)?)?;
        let mut total = Capacity::default();
        // Live nodes only: a node that is down or unseen takes no volume now.
        for room in self.index.rooms(&class.name) {
            if let Some(t) = topology {
                if !topology_matches(t, &room.segments) {
                    continue;
                }
            }
            let available = room.capacity.available.saturating_sub(room.reserved);
            total.available += available;
            total.maximum_volume = total.maximum_volume.max(available);
            total.minimum_volume = total.minimum_volume.max(room.capacity.extent_size);
        }
        Ok(total)
    }

    fn snapshot_parameter_keys(&self) -> &'static [&'static str] {
        &[]
    }

    fn is_valid_snapshot_id(&self, id: &str) -> bool {
        LvId::parse(Kind::Snapshot, id).is_some()
    }

    async fn create_snapshot(&self, req: &CreateSnapshot) -> Result<SnapshotInfo> {
        let (src, src_lv) = self
            .resolve(Kind::Volume, &req.source_volume_id)
            .await?
            .ok_or_else(|| {
                Error::NotFound(format!(
                    "source volume {} does not exist",
                    req.source_volume_id
                ))
            })?;
        let digest = ids::params_digest(&LvmParams::snapshot_digest_input(&src.encode()));
        let key = Kind::Snapshot.key_for_name(&req.name);
        if let Some((id, lv)) = self.find_anywhere(Kind::Snapshot, &key).await? {
            self.check_existing(&req.name, &lv, &digest, "snapshot")?;
            let (lv, _) = self.settle(&id, lv).await?;
            return Ok(Self::snapshot_info(&id, &lv));
        }
        if is_copying(&src_lv) {
            return Err(Error::Aborted(format!(
                "volume {} is still being filled from its source; retry later",
                req.source_volume_id
            )));
        }
        let id = LvId {
            kind: Kind::Snapshot,
            node: src.node.clone(),
            class: src.class.clone(),
            key,
        };
        let spec = LvSpec {
            class: src.class.clone(),
            name: id.lv_name(),
            size: src_lv.size,
            tags: ids::tags(Kind::Snapshot, &req.name, &digest, Some(&src), false),
            origin: Some(Origin {
                class: src.class.clone(),
                lv: src_lv.name.clone(),
                frozen: false,
            }),
            pull: None,
            read_only: true,
        };
        let agent = self.agent_for_change(&src.node)?;
        self.note_attempt(&id.key, &id.node);
        let done = agent.create(&spec).await?;
        self.record(&id, &done.value, done.stamp);
        let (lv, _) = self.settle(&id, done.value).await?;
        Ok(Self::snapshot_info(&id, &lv))
    }

    async fn delete_snapshot(&self, id: &str, _: &Secrets) -> Result<()> {
        match self.resolve(Kind::Snapshot, id).await? {
            Some((lid, lv)) => {
                // A restore on another node reads it until it is complete
                // (and resumes from its checkpoint after a crash).
                let readers = self.index.copies_from(&lid);
                if !readers.is_empty() {
                    return Err(Error::FailedPrecondition(format!(
                        "snapshot {id} is being copied to {}; retry when that restore is done \
                         or deleted",
                        readers.join(", ")
                    )));
                }
                self.remove(&lid, &lv).await?;
                self.forget_attempt(&lid.key);
                Ok(())
            }
            None => Ok(()),
        }
    }

    async fn get_snapshot(&self, id: &str) -> Result<Option<SnapshotInfo>> {
        Ok(self
            .resolve(Kind::Snapshot, id)
            .await?
            .map(|(lid, lv)| Self::snapshot_info(&lid, &lv)))
    }

    async fn list_snapshots(&self) -> Result<Vec<SnapshotInfo>> {
        let mut out: Vec<SnapshotInfo> = self
            .list_kind(Kind::Snapshot)
            .iter()
            .filter(|(_, lv)| ids::tagged_for(&lv.tags).is_none())
            .map(|(id, lv)| Self::snapshot_info(id, lv))
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    fn serves_block_maps(&self) -> bool {
        true
    }

    /// One agent call, to the snapshot's node.
    async fn allocated(&self, snapshot_id: &str, _: &Secrets) -> Result<BlockMap> {
        let (id, lv) = self.mapped_snapshot(snapshot_id).await?;
        let agent = self.agent_for_change(&id.node)?;
        Ok(agent.block_map(&id.class, &lv.name, None).await?)
    }

    /// One agent call, to the node of both snapshots (a volume's snapshots
    /// live beside it).
    async fn delta(&self, base: &str, target: &str, _: &Secrets) -> Result<BlockMap> {
        let (base_id, base_lv) = self.mapped_snapshot(base).await?;
        let (id, lv) = self.mapped_snapshot(target).await?;
        let base_source = ids::tagged_source(&base_lv.tags, &base_id.node);
        let source = ids::tagged_source(&lv.tags, &id.node);
        if source.is_none() || base_source != source || base_id.node != id.node {
            return Err(Error::InvalidArgument(format!(
                "snapshots {base} and {target} are not of the same volume"
            )));
        }
        let agent = self.agent_for_change(&id.node)?;
        Ok(agent
            .block_map(&id.class, &lv.name, Some(&base_lv.name))
            .await?)
    }
}

/// Adds `lodestone_lvm_duplicates_found_total` to the registry: read from
/// [`LvmController::duplicates`] at each scrape.
pub(crate) fn register_metrics(
    registry: &mut prometheus_client::registry::Registry,
    controller: Arc<LvmController>,
) {
    registry.register_collector(Box::new(DuplicatesFound(controller)));
}

struct DuplicatesFound(Arc<LvmController>);

impl std::fmt::Debug for DuplicatesFound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DuplicatesFound")
    }
}

impl prometheus_client::collector::Collector for DuplicatesFound {
    fn encode(&self, mut out: prometheus_client::encoding::DescriptorEncoder) -> std::fmt::Result {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::gauge::ConstGauge;
        let found = self.0.duplicates.load(Ordering::Relaxed);
        let counter = prometheus_client::metrics::counter::ConstCounter::new(found);
        counter.encode(out.encode_descriptor(
            "lodestone_lvm_duplicates_found",
            "Times the controller found one request's volume or snapshot on two nodes or \
             classes (see the logs; nothing is deleted).",
            None,
            counter.metric_type(),
        )?)?;
        let (live, down, unseen) = self.0.node_counts();
        let mut family = out.encode_descriptor(
            "lodestone_lvm_inventory_nodes",
            "Nodes by the state of their inventory stream: live, down (seen, then silent or \
             cut) or unseen (no inventory since the controller started).",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for (state, n) in [("live", live), ("down", down), ("unseen", unseen)] {
            let gauge = ConstGauge::new(n as i64);
            gauge.encode(family.encode_family(&[("state", state)])?)?;
        }
        self.0.placements.encode(out.encode_descriptor(
            "lodestone_lvm_placement_seconds",
            "Time the controller spent deciding where a new volume goes (from its index, \
             reservation included).",
            None,
            self.0.placements.metric_type(),
        )?)
    }
}

/// The nodes whose thin pool for `class` is past its threshold: said when
/// no node has room (only then: it reads every node).
fn full_pools(class: &DeviceClass, ranked: &Ranked<'_>) -> Vec<String> {
    ranked
        .by_room()
        .filter_map(|c| {
            let cap = ranked.capacity(c.name)?;
            cap.pool_full.then(|| {
                format!(
                    "{}: thin pool {}/{} is {:.1}% full (threshold {}%)",
                    c.name,
                    class.volume_group,
                    class.thin_pool.as_deref().unwrap_or(""),
                    cap.used_percent,
                    class.pool_full_threshold_percent
                )
            })
        })
        .collect()
}

#[cfg(test)]
#[path = "controller_tests.rs"]
mod tests;

#[cfg(test)]
mod metrics_tests {
    use super::*;

    #[test]
    fn duplicates_found_is_a_counter_read_at_scrape_time() {
        let config = LvmConfig::load(None, &["thin=vg0/pool0".into()]).unwrap();
        let controller = Arc::new(LvmController::new(config, Vec::new(), Box::new(|| None)));
        let mut registry = prometheus_client::registry::Registry::default();
        register_metrics(&mut registry, controller.clone());
        controller.duplicates.fetch_add(3, Ordering::Relaxed);
        let mut page = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut page, &registry).unwrap();
        assert!(
            page.contains(
                "# TYPE lodestone_lvm_duplicates_found_total counter\n\
                 lodestone_lvm_duplicates_found_total 3\n"
            ),
            "{page}"
        );
    }
}
