//! The controller's index: every node's inventory as its agent last
//! reported it (see [`crate::lvm::inventory`] for the protocol), plus the
//! results of this controller's own calls, plus the space promised to
//! creates still under way.
//!
//! Reads (lookups by request name or id, lists, capacity, placement) are
//! answered from here and ask no agent. Each node has a health:
//!
//! - *unseen*: known (from the resolver) but no full inventory since this
//!   controller started: nothing may be concluded about what it holds;
//! - *live*: its stream sends updates or heartbeats;
//! - *down*: it was seen, then its stream broke or went silent. What it
//!   held at its last update is known, nothing newer.
//!
//! The controller's liveness rule (in `controller`) builds on this.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use crate::config::TOPOLOGY_NODE_KEY;
use crate::core::placement::{Candidate, Candidates};
use crate::core::request::topology_matches;
use crate::csi;
use crate::lvm::agent::{Agent, ClassCapacity};
use crate::lvm::error::LvmError;
use crate::lvm::ids::{self, Kind, LvId, LvmKind, TAG_COPYING};
use crate::lvm::inventory::{Stamp, Update, WatchRequest, DOWN_AFTER_HEARTBEATS};
use crate::lvm::report::Lv;

/// What is known of a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Health {
    Unseen,
    Live,
    /// Why it is down.
    Down(String),
}

/// One LV as the index knows it, and the stamp it was learnt at. `lv` is
/// None for an LV this controller removed, kept until the stream has
/// caught up with the removal (so an older update cannot bring it back).
#[derive(Debug, Clone)]
struct Entry {
    lv: Option<Kept>,
    /// Shared by every entry learnt from the same epoch.
    epoch: Arc<str>,
    generation: u64,
}

/// An [`Lv`] as the index keeps it. A cluster holds 100,000 of them, so
/// what many LVs share (VG, attributes, pool, policy) is held once per
/// index, the tags as one string, and the name is the entry's key.
#[derive(Debug, Clone)]
struct Kept {
    shape: Arc<Shape>,
    /// The tags joined by commas (no LVM tag holds one).
    tags: Box<str>,
    size: u64,
    /// LVM reports these with two decimals: an f32 holds them.
    data_percent: Option<f32>,
    metadata_percent: Option<f32>,
    created: Option<i64>,
    zeroing: bool,
}

/// The fields of an LV that recur across LVs and nodes.
#[derive(Debug, PartialEq, Eq, Hash)]
struct Shape {
    vg: Box<str>,
    attr: Box<str>,
    pool: Option<Box<str>>,
    when_full: Box<str>,
}

impl Kept {
    fn lv(&self, name: &str) -> Lv {
        let percent = |p: Option<f32>| p.map(|p| (f64::from(p) * 100.0).round() / 100.0);
        Lv {
            vg: self.shape.vg.to_string(),
            name: name.to_string(),
            size: self.size,
            attr: self.shape.attr.to_string(),
            tags: match &*self.tags {
                "" => Vec::new(),
                t => t.split(',').map(str::to_string).collect(),
            },
            pool: self.shape.pool.as_deref().map(str::to_string),
            data_percent: percent(self.data_percent),
            metadata_percent: percent(self.metadata_percent),
            when_full: self.shape.when_full.to_string(),
            zeroing: self.zeroing,
            created: self.created,
        }
    }
}

/// Shared copies of strings and shapes that recur across LVs and nodes.
#[derive(Debug, Default)]
struct Strings {
    strings: std::collections::HashSet<Arc<str>>,
    shapes: std::collections::HashSet<Arc<Shape>>,
}

/// The shared copy of `v` in `set`, added if missing.
fn intern<T, V>(set: &mut std::collections::HashSet<Arc<T>>, v: V) -> Arc<T>
where
    T: ?Sized + Eq + std::hash::Hash,
    V: std::borrow::Borrow<T> + Into<Arc<T>>,
{
    if let Some(a) = set.get(v.borrow()) {
        return a.clone();
    }
    let a = v.into();
    set.insert(a.clone());
    a
}

impl Strings {
    fn get(&mut self, s: &str) -> Arc<str> {
        intern(&mut self.strings, s)
    }

    fn keep(&mut self, lv: Lv) -> Kept {
        let shape = Shape {
            vg: lv.vg.into(),
            attr: lv.attr.into(),
            pool: lv.pool.map(Into::into),
            when_full: lv.when_full.into(),
        };
        let shape = intern(&mut self.shapes, shape);
        Kept {
            shape,
            tags: lv.tags.join(",").into(),
            size: lv.size,
            data_percent: lv.data_percent.map(|p| p as f32),
            metadata_percent: lv.metadata_percent.map(|p| p as f32),
            created: lv.created,
            zeroing: lv.zeroing,
        }
    }
}

#[derive(Debug)]
struct NodeView {
    health: Health,
    /// The last update applied: its epoch and generation.
    cursor: Option<Stamp>,
    segments: BTreeMap<String, String>,
    /// By class, then LV name.
    lvs: HashMap<Arc<str>, HashMap<Box<str>, Entry>>,
    classes: BTreeMap<String, ClassCapacity>,
    problems: Vec<String>,
    /// Where the node stands in each class's [`Ranking`]: (class, room,
    /// extent size), empty unless live.
    ranked: Vec<(Arc<str>, u64, u64)>,
}

impl NodeView {
    fn new(node: &str) -> Self {
        NodeView {
            health: Health::Unseen,
            cursor: None,
            segments: [(TOPOLOGY_NODE_KEY.to_string(), node.to_string())].into(),
            lvs: HashMap::new(),
            classes: BTreeMap::new(),
            problems: Vec::new(),
            ranked: Vec::new(),
        }
    }

    fn entry(&self, class: &str, name: &str) -> Option<&Entry> {
        self.lvs.get(class)?.get(name)
    }

    /// Every entry: (class, LV name, entry).
    fn entries(&self) -> impl Iterator<Item = (&Arc<str>, &str, &Entry)> {
        self.lvs
            .iter()
            .flat_map(|(c, m)| m.iter().map(move |(n, e)| (c, &**n, e)))
    }

    /// Whether the stream has already reported everything up to `stamp`.
    fn covers(&self, stamp: &Stamp) -> bool {
        self.cursor
            .as_ref()
            .is_some_and(|c| c.epoch == stamp.epoch && c.generation >= stamp.generation)
    }
}

/// Space promised to a create under way, until the node's inventory shows
/// the create (or the create failed).
#[derive(Debug)]
struct Reservation {
    node: String,
    class: String,
    bytes: u64,
    /// Released once the node's stream covers this stamp.
    until: Option<Stamp>,
}

/// The live nodes that have one class, ordered by their room (capacity
/// less reservations), kept up to date as updates and reservations change
/// it: placement reads the top instead of every node.
#[derive(Debug, Default)]
struct Ranking {
    order: std::collections::BTreeSet<(u64, std::cmp::Reverse<Arc<str>>)>,
    /// How many of them have each extent size.
    extents: BTreeMap<u64, usize>,
}

/// Where an LV of a known kind and key is: (node, class). Its name
/// follows from the kind and key.
type Place = (Arc<str>, Arc<str>);

/// A copy target: (node, LV name).
type PullTarget = (Arc<str>, Box<str>);

#[derive(Debug, Default)]
struct Inner {
    nodes: HashMap<Arc<str>, NodeView>,
    /// Where each request key's LVs are: (kind, key) -> {(node, class)}.
    /// A key is 32 hex digits: kept as the number they spell.
    by_key: HashMap<(Kind, KeyBits), Places>,
    /// The LVs still being filled from a snapshot on another node, by
    /// that snapshot's id: (node, LV name).
    pulls: HashMap<String, Vec<PullTarget>>,
    /// The live nodes of each class by room, for placement.
    ranking: HashMap<Arc<str>, Ranking>,
    strings: Strings,
    reservations: HashMap<u64, Reservation>,
    next_reservation: u64,
}

/// A request key, 32 hex digits, as the number they spell (in two halves:
/// eight-byte aligned, so a key map's entry takes 24 bytes, not 32).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct KeyBits([u64; 2]);

impl std::fmt::Display for KeyBits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}{:016x}", self.0[0], self.0[1])
    }
}

/// The kind and request key of one of our LV names.
fn kind_and_key(name: &str) -> Option<(Kind, KeyBits)> {
    [Kind::Volume, Kind::Snapshot]
        .into_iter()
        .find_map(|k| Some((k, key_bits(k.key_of_lv(name)?)?)))
}

fn key_bits(key: &str) -> Option<KeyBits> {
    let k = u128::from_str_radix(key, 16).ok()?;
    Some(KeyBits([(k >> 64) as u64, k as u64]))
}

/// The places of one key: nearly always one, held without a list.
#[derive(Debug)]
enum Places {
    One(Place),
    Many(Vec<Place>),
}

impl Places {
    fn as_slice(&self) -> &[Place] {
        match self {
            Places::One(p) => std::slice::from_ref(p),
            Places::Many(v) => v,
        }
    }

    fn add(&mut self, at: Place) {
        match self {
            Places::One(p) if *p == at => {}
            Places::One(p) => *self = Places::Many(vec![p.clone(), at]),
            Places::Many(v) if v.contains(&at) => {}
            Places::Many(v) => v.push(at),
        }
    }

    /// Removes `at`; false when no place is left.
    fn remove(&mut self, at: &Place) -> bool {
        match self {
            Places::One(p) => p != at,
            Places::Many(v) => {
                v.retain(|p| p != at);
                if v.len() == 1 {
                    *self = Places::One(v.pop().expect("one left"));
                }
                !self.as_slice().is_empty()
            }
        }
    }
}

/// The id of the snapshot on another node that the LV on `node` is still
/// being filled from, if it is.
fn pull_source(node: &str, e: &Entry) -> Option<String> {
    let lv = e.lv.as_ref()?;
    if !lv.tags.split(',').any(|t| t == TAG_COPYING) {
        return None;
    }
    let tags: Vec<String> = lv.tags.split(',').map(String::from).collect();
    ids::tagged_from(&tags)?;
    Some(ids::tagged_source(&tags, node)?.encode())
}

impl Inner {
    fn view(&mut self, node: &str) -> &mut NodeView {
        if !self.nodes.contains_key(node) {
            self.nodes.insert(Arc::from(node), NodeView::new(node));
        }
        self.nodes.get_mut(node).expect("just inserted")
    }

    fn entry(&mut self, lv: Option<Lv>, epoch: &Arc<str>, generation: u64) -> Entry {
        Entry {
            lv: lv.map(|lv| self.strings.keep(lv)),
            epoch: epoch.clone(),
            generation,
        }
    }

    /// Sets (or clears) one LV's entry and keeps `by_key` in step.
    fn set(&mut self, node: &str, class: &str, name: &str, entry: Option<Entry>) {
        let present = entry.as_ref().is_some_and(|e| e.lv.is_some());
        let was_pulling = (self.nodes.get(node))
            .and_then(|v| v.entry(class, name))
            .and_then(|e| pull_source(node, e));
        let pulling = entry.as_ref().and_then(|e| pull_source(node, e));
        if was_pulling != pulling {
            self.track_pull(node, name, was_pulling, pulling);
        }
        let class = self.strings.get(class);
        let view = self.view(node);
        match entry {
            Some(e) => {
                view.lvs
                    .entry(class.clone())
                    .or_default()
                    .insert(name.into(), e);
            }
            None => {
                if let Some(m) = view.lvs.get_mut(&*class) {
                    m.remove(name);
                }
            }
        };
        if let Some(k) = kind_and_key(name) {
            let (node, _) = self.nodes.get_key_value(node).expect("viewed above");
            let at = (node.clone(), class);
            if present {
                match self.by_key.get_mut(&k) {
                    Some(places) => places.add(at),
                    None => {
                        self.by_key.insert(k, Places::One(at));
                    }
                }
            } else if let Some(places) = self.by_key.get_mut(&k) {
                if !places.remove(&at) {
                    self.by_key.remove(&k);
                }
            }
        }
    }

    fn track_pull(&mut self, node: &str, name: &str, was: Option<String>, is: Option<String>) {
        if let Some(source) = was {
            if let Some(targets) = self.pulls.get_mut(&source) {
                targets.retain(|(n, l)| !(**n == *node && **l == *name));
                if targets.is_empty() {
                    self.pulls.remove(&source);
                }
            }
        }
        if let Some(source) = is {
            let node = self.strings.get(node);
            self.pulls
                .entry(source)
                .or_default()
                .push((node, name.into()));
        }
    }

    fn release_covered(&mut self, node: &str) {
        let Some(view) = self.nodes.get(node) else {
            return;
        };
        let covered: Vec<u64> = self
            .reservations
            .iter()
            .filter(|(_, r)| r.node == node)
            .filter(|(_, r)| r.until.as_ref().is_some_and(|s| view.covers(s)))
            .map(|(id, _)| *id)
            .collect();
        if covered.is_empty() {
            return;
        }
        for id in covered {
            self.reservations.remove(&id);
        }
        self.rerank(node);
    }

    /// Puts a node in its place in each class's ranking (after its
    /// health, capacity or reservations changed).
    fn rerank(&mut self, node: &str) {
        let Some((name, view)) = self.nodes.get_key_value(node) else {
            return;
        };
        let name = name.clone();
        let mut fresh = Vec::new();
        if view.health == Health::Live {
            for (class, cap) in &view.classes {
                let room = cap.available.saturating_sub(self.reserved(node, class));
                fresh.push((class.clone(), room, cap.extent_size));
            }
        }
        let fresh: Vec<(Arc<str>, u64, u64)> = fresh
            .into_iter()
            .map(|(c, room, extent)| (self.strings.get(&c), room, extent))
            .collect();
        let view = self.nodes.get_mut(node).expect("found above");
        let old = std::mem::replace(&mut view.ranked, fresh.clone());
        for (class, room, extent) in old {
            let r = self.ranking.entry(class).or_default();
            r.order.remove(&(room, std::cmp::Reverse(name.clone())));
            if let Some(n) = r.extents.get_mut(&extent) {
                *n -= 1;
                if *n == 0 {
                    r.extents.remove(&extent);
                }
            }
        }
        for (class, room, extent) in fresh {
            let r = self.ranking.entry(class).or_default();
            r.order.insert((room, std::cmp::Reverse(name.clone())));
            *r.extents.entry(extent).or_default() += 1;
        }
    }

    fn ranked<'a>(&'a self, class: &'a str) -> Ranked<'a> {
        Ranked {
            inner: self,
            class,
            ranking: self.ranking.get(class),
        }
    }

    fn rooms(&self, class: &str) -> Vec<Room> {
        let mut reserved: HashMap<&str, u64> = HashMap::new();
        for r in self.reservations.values().filter(|r| r.class == class) {
            *reserved.entry(r.node.as_str()).or_default() += r.bytes;
        }
        let rooms: Vec<Room> = self
            .nodes
            .iter()
            .filter(|(_, v)| v.health == Health::Live)
            .filter_map(|(node, v)| {
                Some(Room {
                    segments: v.segments.clone(),
                    capacity: v.classes.get(class)?.clone(),
                    reserved: reserved.get(&**node).copied().unwrap_or(0),
                })
            })
            .collect();
        rooms
    }

    fn reserve(&mut self, node: &str, class: &str, bytes: u64) -> u64 {
        self.next_reservation += 1;
        let id = self.next_reservation;
        self.reservations.insert(
            id,
            Reservation {
                node: node.to_string(),
                class: class.to_string(),
                bytes,
                until: None,
            },
        );
        self.rerank(node);
        id
    }

    fn reserved(&self, node: &str, class: &str) -> u64 {
        self.reservations
            .values()
            .filter(|r| r.node == node && r.class == class)
            .map(|r| r.bytes)
            .sum()
    }
}

/// A candidate node for a new volume, from the index.
#[derive(Debug, Clone)]
pub(crate) struct Room {
    pub segments: BTreeMap<String, String>,
    pub capacity: ClassCapacity,
    /// Bytes promised to creates under way there.
    pub reserved: u64,
}

/// The live nodes that have one class, as placement reads them (borrowed
/// from the locked index).
pub(crate) struct Ranked<'a> {
    inner: &'a Inner,
    class: &'a str,
    ranking: Option<&'a Ranking>,
}

impl Ranked<'_> {
    /// The extent sizes these nodes have (one, on most clusters).
    pub(crate) fn extent_sizes(&self) -> impl Iterator<Item = u64> + '_ {
        self.ranking
            .into_iter()
            .flat_map(|r| r.extents.keys().copied())
    }

    /// A node's capacity for the class, as its agent reported it.
    pub(crate) fn capacity(&self, node: &str) -> Option<&ClassCapacity> {
        self.inner.nodes.get(node)?.classes.get(self.class)
    }
}

impl Candidates for Ranked<'_> {
    fn named(&self, name: &str) -> Option<Candidate<'_>> {
        let (node, view) = self.inner.nodes.get_key_value(name)?;
        let (_, room, _) = view.ranked.iter().find(|(c, ..)| **c == *self.class)?;
        Some(Candidate {
            name: node,
            segments: &view.segments,
            available: *room,
        })
    }

    fn by_room(&self) -> Box<dyn Iterator<Item = Candidate<'_>> + '_> {
        let order = self.ranking.into_iter().flat_map(|r| r.order.iter().rev());
        Box::new(order.filter_map(|(room, std::cmp::Reverse(node))| {
            Some(Candidate {
                name: node,
                segments: &self.inner.nodes.get(&**node)?.segments,
                available: *room,
            })
        }))
    }

    /// A term that names a node is answered by looking the node up.
    fn lookup(&self, term: &csi::Topology) -> Option<Vec<Candidate<'_>>> {
        let node = term.segments.get(TOPOLOGY_NODE_KEY)?;
        Some(
            self.named(node)
                .filter(|c| topology_matches(term, c.segments))
                .into_iter()
                .collect(),
        )
    }
}

/// Nodes that are not live, for the liveness rule and for logs.
#[derive(Debug, Default)]
pub(crate) struct Absent {
    pub unseen: Vec<String>,
    pub down: Vec<(String, String)>,
}

#[derive(Debug, Default)]
pub(crate) struct Index {
    inner: RwLock<Inner>,
    /// Signalled whenever a node's health changes (for waiters).
    changed: tokio::sync::Notify,
}

impl Index {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read().expect("index poisoned")
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().expect("index poisoned")
    }

    /// Makes a node known (unseen until its first full inventory).
    pub(crate) fn add_node(&self, node: &str) {
        self.write().view(node);
    }

    pub(crate) fn health(&self, node: &str) -> Option<Health> {
        self.read().nodes.get(node).map(|v| v.health.clone())
    }

    /// Where the next watch of `node` resumes from.
    pub(crate) fn cursor(&self, node: &str) -> Option<Stamp> {
        self.read().nodes.get(node).and_then(|v| v.cursor.clone())
    }

    /// Applies one update of `node`'s stream. A delta that does not follow
    /// the index's cursor is refused (the caller watches again from
    /// scratch).
    pub(crate) fn apply(&self, node: &str, u: Update) -> Result<(), String> {
        // Most updates are heartbeats that change nothing: answered under
        // the read lock, so thousands of streams do not queue placement.
        if u.is_heartbeat() && self.unchanged_by(node, &u) {
            return Ok(());
        }
        let mut inner = self.write();
        let view = inner.view(node);
        let stamp = u.stamp();
        let epoch: Arc<str> = Arc::from(stamp.epoch.as_str());
        let newer = |e: &Entry| *e.epoch == *stamp.epoch && e.generation > u.generation;
        if u.full {
            // Keep only what this controller learnt from replies newer than
            // the update; the update is the truth for everything else.
            let mut keep: Vec<(String, String, Entry)> = Vec::new();
            let mut old: Vec<(String, String)> = Vec::new();
            for (class, name, e) in view.entries() {
                if newer(e) {
                    keep.push((class.to_string(), name.to_string(), e.clone()));
                }
                old.push((class.to_string(), name.to_string()));
            }
            for (class, name) in old {
                inner.set(node, &class, &name, None);
            }
            for (class, lv) in u.lvs {
                let name = lv.name.clone();
                let entry = inner.entry(Some(lv), &epoch, u.generation);
                inner.set(node, &class, &name, Some(entry));
            }
            for (class, name, e) in keep {
                inner.set(node, &class, &name, Some(e));
            }
        } else {
            // A delta continues the stream: same epoch, never older than
            // what was applied (its capacity would undo newer truth).
            let follows = (view.cursor.as_ref())
                .is_some_and(|c| c.epoch == u.epoch && c.generation <= u.generation);
            if !follows {
                return Err(format!(
                    "node {node} sent changes of epoch {} that do not follow what this \
                     controller has",
                    u.epoch
                ));
            }
            for (class, lv) in u.lvs {
                let name = lv.name.clone();
                if inner.view(node).entry(&class, &name).is_some_and(newer) {
                    continue;
                }
                let entry = inner.entry(Some(lv), &epoch, u.generation);
                inner.set(node, &class, &name, Some(entry));
            }
            for (class, name) in u.removed {
                if inner.view(node).entry(&class, &name).is_some_and(newer) {
                    continue;
                }
                inner.set(node, &class, &name, None);
            }
        }
        let view = inner.view(node);
        // Removals this controller made and the stream now covers are done.
        for m in view.lvs.values_mut() {
            m.retain(|_, e| {
                e.lv.is_some() || *e.epoch != *stamp.epoch || e.generation > stamp.generation
            });
        }
        view.classes = u.classes.into_iter().collect();
        view.problems = u.problems;
        view.cursor = Some(stamp);
        let was = std::mem::replace(&mut view.health, Health::Live);
        inner.release_covered(node);
        inner.rerank(node);
        drop(inner);
        if was != Health::Live {
            self.changed.notify_waiters();
        }
        Ok(())
    }

    /// Whether a heartbeat would change nothing: same cursor, node live,
    /// same capacity and problems.
    fn unchanged_by(&self, node: &str, u: &Update) -> bool {
        let inner = self.read();
        let Some(view) = inner.nodes.get(node) else {
            return false;
        };
        view.health == Health::Live
            && view
                .cursor
                .as_ref()
                .is_some_and(|c| c.epoch == u.epoch && c.generation == u.generation)
            && view.problems == u.problems
            && view.classes.len() == u.classes.len()
            && u.classes
                .iter()
                .all(|(c, cap)| view.classes.get(c) == Some(cap))
    }

    /// Records the result of this controller's own mutation on `node`:
    /// `lv` as it is after it (None: removed), stamped by the agent.
    pub(crate) fn record(&self, node: &str, class: &str, name: &str, lv: Option<Lv>, stamp: Stamp) {
        let mut inner = self.write();
        let view = inner.view(node);
        if view.covers(&stamp) {
            // The stream got there first, with this change or a newer one.
            return;
        }
        let entry = inner.entry(lv, &Arc::from(stamp.epoch.as_str()), stamp.generation);
        inner.set(node, class, name, Some(entry));
    }

    /// Marks a node down (its stream broke or went silent).
    pub(crate) fn mark_down(&self, node: &str, why: String) {
        let mut inner = self.write();
        let view = inner.view(node);
        if view.health == Health::Unseen {
            return;
        }
        if view.health == Health::Live {
            tracing::warn!(node = %node, reason = %why, "node down: its inventory stream stopped");
        }
        view.health = Health::Down(why);
        inner.rerank(node);
        drop(inner);
        self.changed.notify_waiters();
    }

    /// Forgets what the index has of a node's history, so its next watch
    /// starts with a full inventory (its LVs stay known until then).
    pub(crate) fn reset_cursor(&self, node: &str) {
        if let Some(v) = self.write().nodes.get_mut(node) {
            v.cursor = None;
        }
    }

    /// Every LV of that kind and key, on any node.
    pub(crate) fn find_key(&self, kind: Kind, key: &str) -> Vec<(LvId, Lv)> {
        let inner = self.read();
        let Some(at) = key_bits(key).and_then(|k| inner.by_key.get(&(kind, k))) else {
            return Vec::new();
        };
        let name = kind.lv_name(key);
        (at.as_slice().iter())
            .filter_map(|(node, class)| {
                let view = inner.nodes.get(node)?;
                let lv = view.entry(class, &name)?.lv.as_ref()?.lv(&name);
                Some((
                    LvId {
                        kind,
                        node: node.to_string(),
                        class: class.to_string(),
                        key: key.to_string(),
                    },
                    lv,
                ))
            })
            .collect()
    }

    /// The LV `name` of `class` on `node`, as last known.
    pub(crate) fn get(&self, node: &str, class: &str, name: &str) -> Option<Lv> {
        let inner = self.read();
        let view = inner.nodes.get(node)?;
        Some(view.entry(class, name)?.lv.as_ref()?.lv(name))
    }

    /// Every LV of that kind, on every node, as last known.
    pub(crate) fn list(&self, kind: Kind) -> Vec<(LvId, Lv)> {
        self.list_tagged(kind, "")
    }

    /// Every LV of that kind one of whose tags contains `tag` (copies only
    /// of those).
    pub(crate) fn list_tagged(&self, kind: Kind, tag: &str) -> Vec<(LvId, Lv)> {
        let inner = self.read();
        let mut out = Vec::new();
        for (node, view) in &inner.nodes {
            for (class, name, e) in view.entries() {
                let (Some(lv), Some(key)) = (&e.lv, kind.key_of_lv(name)) else {
                    continue;
                };
                if !lv.tags.contains(tag) {
                    continue;
                }
                out.push((
                    LvId {
                        kind,
                        node: node.to_string(),
                        class: class.to_string(),
                        key: key.to_string(),
                    },
                    lv.lv(name),
                ));
            }
        }
        out
    }

    /// The request keys of that kind held in more than one place (node and
    /// class), with every place: a lookup of the key map, no copy of the
    /// LVs (the controller checks this every minute).
    pub(crate) fn duplicates(&self, kind: Kind) -> Vec<Vec<LvId>> {
        let inner = self.read();
        (inner.by_key.iter())
            .filter(|((k, _), places)| *k == kind && places.as_slice().len() > 1)
            .map(|((_, key), places)| {
                (places.as_slice().iter())
                    .map(|(node, class)| LvId {
                        kind,
                        node: node.to_string(),
                        class: class.to_string(),
                        key: key.to_string(),
                    })
                    .collect()
            })
            .collect()
    }

    /// The volumes still being filled from `source` by a copy on another
    /// node, as "node/lv" (kept up to date with the entries: a lookup).
    pub(crate) fn copies_from(&self, source: &LvId) -> Vec<String> {
        let inner = self.read();
        inner
            .pulls
            .get(&source.encode())
            .into_iter()
            .flatten()
            .map(|(node, lv)| format!("{node}/{lv}"))
            .collect()
    }

    /// The nodes that are not live.
    pub(crate) fn absent(&self) -> Absent {
        let inner = self.read();
        let mut out = Absent::default();
        for (node, view) in &inner.nodes {
            match &view.health {
                Health::Live => {}
                Health::Unseen => out.unseen.push(node.to_string()),
                Health::Down(why) => out.down.push((node.to_string(), why.clone())),
            }
        }
        out.unseen.sort();
        out.down.sort();
        out
    }

    /// Node counts by health: (live, down, unseen).
    pub(crate) fn counts(&self) -> (usize, usize, usize) {
        let inner = self.read();
        let mut c = (0, 0, 0);
        for v in inner.nodes.values() {
            match v.health {
                Health::Live => c.0 += 1,
                Health::Down(_) => c.1 += 1,
                Health::Unseen => c.2 += 1,
            }
        }
        c
    }

    /// A class's capacity on a node, less what creates under way were
    /// promised there; None unless the node is live and has the class.
    pub(crate) fn room(&self, node: &str, class: &str) -> Option<Room> {
        let inner = self.read();
        let view = inner.nodes.get(node)?;
        if view.health != Health::Live {
            return None;
        }
        Some(Room {
            segments: view.segments.clone(),
            capacity: view.classes.get(class)?.clone(),
            reserved: inner.reserved(node, class),
        })
    }

    /// Decides where a new volume of `class` goes, with `decide` choosing
    /// among the live nodes that have the class, and reserves the bytes it
    /// returns there, in one step: two creates deciding at once never both
    /// count the same free space. Returns the decision and the reservation.
    pub(crate) fn place<T>(
        &self,
        class: &str,
        decide: impl FnOnce(&Ranked<'_>) -> crate::error::Result<(T, String, u64)>,
    ) -> crate::error::Result<(T, u64)> {
        let mut inner = self.write();
        let (decision, node, bytes) = decide(&inner.ranked(class))?;
        Ok((decision, inner.reserve(&node, class, bytes)))
    }

    /// Reserves `bytes` of `class` on `node` (an LV made there for another
    /// reason than placement), if its room holds them; None if not, or if
    /// its capacity is not known. Ends as [`Self::place`]'s do.
    pub(crate) fn reserve(&self, node: &str, class: &str, bytes: u64) -> Option<u64> {
        let mut inner = self.write();
        let available = inner.nodes.get(node)?.classes.get(class)?.available;
        if available.saturating_sub(inner.reserved(node, class)) < bytes {
            return None;
        }
        Some(inner.reserve(node, class, bytes))
    }

    /// Every live node that has `class`, with its room.
    pub(crate) fn rooms(&self, class: &str) -> Vec<Room> {
        self.read().rooms(class)
    }

    /// Ends a reservation: at once if the create failed (`None`), else
    /// when the node's stream covers the create's stamp.
    pub(crate) fn settle(&self, reservation: u64, stamp: Option<Stamp>) {
        let mut inner = self.write();
        match stamp {
            None => {
                if let Some(r) = inner.reservations.remove(&reservation) {
                    inner.rerank(&r.node);
                }
            }
            Some(s) => {
                let Some(r) = inner.reservations.get_mut(&reservation) else {
                    return;
                };
                r.until = Some(s);
                let node = r.node.clone();
                inner.release_covered(&node);
            }
        }
    }

    /// Waits until no node is unseen, or `limit` passes. Returns the
    /// nodes still unseen.
    pub(crate) async fn wait_seen(&self, limit: Duration) -> Vec<String> {
        let end = Instant::now() + limit;
        loop {
            let notified = self.changed.notified();
            let unseen = self.absent().unseen;
            if unseen.is_empty() || Instant::now() >= end {
                return unseen;
            }
            let _ = tokio::time::timeout_at(end.into(), notified).await;
        }
    }
}

/// Bounds how many watches are being set up at once (connection, TLS
/// handshake, first inventory), so thousands of agents are reached in
/// parallel without a storm.
pub(crate) const SETUPS_AT_ONCE: usize = 64;

/// Follows one agent's inventory into the index until `stop` is dropped or
/// the index goes away: watches, applies, judges silence, and watches
/// again after a cut (from its cursor; from scratch after a refused delta).
pub(crate) fn follow(
    index: std::sync::Weak<Index>,
    agent: Arc<dyn Agent>,
    heartbeat: Duration,
    setups: Arc<tokio::sync::Semaphore>,
) -> tokio::task::JoinHandle<()> {
    use tokio_stream::StreamExt;
    let node = agent.node().to_string();
    tokio::spawn(async move {
        let silence = heartbeat * DOWN_AFTER_HEARTBEATS;
        let mut backoff = Duration::from_millis(200);
        let mut last_error: Option<String> = None;
        loop {
            let Some(ix) = index.upgrade() else { return };
            let request = WatchRequest {
                cursor: ix.cursor(&node),
                heartbeat,
            };
            drop(ix);
            let permit = setups.acquire().await;
            let opened = tokio::time::timeout(silence, agent.watch(request)).await;
            let mut updates = match opened {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    drop(permit);
                    let why = format!("its agent cannot be watched: {e}");
                    if last_error.as_deref() != Some(why.as_str()) {
                        tracing::warn!(node = %node, error = %e, "agent not reachable yet");
                        last_error = Some(why.clone());
                    }
                    down(&index, &node, why);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    continue;
                }
                Err(_) => {
                    drop(permit);
                    down(
                        &index,
                        &node,
                        format!("no answer to a watch within {silence:?}"),
                    );
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    continue;
                }
            };
            let mut first = Some(permit);
            let why = loop {
                match tokio::time::timeout(silence, updates.next()).await {
                    Err(_) => break format!("silent for {silence:?}"),
                    Ok(None) => break "its inventory stream ended".to_string(),
                    Ok(Some(Err(e))) => break format!("its inventory stream failed: {e}"),
                    Ok(Some(Ok(u))) => {
                        let Some(ix) = index.upgrade() else { return };
                        let (full, stamp) = (u.full, u.stamp());
                        if let Err(e) = ix.apply(&node, u) {
                            ix.reset_cursor(&node);
                            break e;
                        }
                        // The set-up is over at the first update, of any kind.
                        if first.take().is_some() {
                            last_error = None;
                            let how = if full { "full" } else { "resumed" };
                            tracing::info!(node = %node, epoch = %stamp.epoch,
                                generation = stamp.generation, how,
                                "node inventory received");
                        }
                        backoff = Duration::from_millis(200);
                    }
                }
            };
            if first.take().is_some() && last_error.as_deref() != Some(why.as_str()) {
                // Refused or cut before any update (the agent's answer to
                // the request comes on the stream).
                tracing::warn!(node = %node, error = %why, "agent not reachable yet");
                last_error = Some(why.clone());
            }
            down(&index, &node, why);
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    })
}

fn down(index: &std::sync::Weak<Index>, node: &str, why: String) {
    if let Some(ix) = index.upgrade() {
        ix.mark_down(node, why);
    }
}

/// For errors of agents that answer for a node the index has as down.
pub(crate) fn down_error(node: &str, why: &str) -> LvmError {
    LvmError::Unavailable(format!(
        "node {node} is down ({why}); retry when it is back"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lv(name: &str, size: u64) -> Lv {
        Lv {
            vg: "vg".into(),
            name: name.into(),
            size,
            attr: "Vwi-a-tz--".into(),
            tags: Vec::new(),
            pool: Some("pool".into()),
            data_percent: None,
            metadata_percent: None,
            when_full: String::new(),
            zeroing: false,
            created: None,
        }
    }

    fn name(n: u8) -> String {
        Kind::Volume.lv_name(&format!("{n:032x}"))
    }

    fn stamp(epoch: &str, generation: u64) -> Stamp {
        Stamp {
            epoch: epoch.into(),
            generation,
        }
    }

    fn update(epoch: &str, generation: u64, full: bool) -> Update {
        Update {
            epoch: epoch.into(),
            generation,
            full,
            classes: vec![(
                "thin".into(),
                ClassCapacity {
                    available: 100,
                    extent_size: 1,
                    pool_full: false,
                    total: 100,
                    used_percent: 0.0,
                },
            )],
            ..Update::default()
        }
    }

    fn names(ix: &Index) -> Vec<String> {
        let mut v: Vec<String> = ix
            .list(Kind::Volume)
            .into_iter()
            .map(|(_, l)| l.name)
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_kept_lv_reads_back_as_it_was() {
        let mut strings = Strings::default();
        let mut a = lv(&name(1), 5);
        assert_eq!(strings.keep(a.clone()).lv(&a.name), a);
        a.tags = vec!["lodestone.v1.vol".into(), "lodestone.v1.name=6162".into()];
        a.data_percent = Some(12.34);
        a.metadata_percent = Some(99.99);
        a.created = Some(7);
        let kept = strings.keep(a.clone());
        assert_eq!(kept.lv(&a.name), a);
        // The VG, pool and attributes of the next LV are the same strings.
        let b = strings.keep(lv(&name(2), 6));
        assert!(Arc::ptr_eq(&kept.shape, &b.shape));
    }

    #[test]
    fn a_reply_wins_over_an_older_update_in_either_order() {
        let ix = Index::default();
        ix.add_node("n1");
        assert_eq!(ix.health("n1"), Some(Health::Unseen));
        let mut u = update("e", 3, true);
        u.lvs.push(("thin".into(), lv(&name(1), 1)));
        ix.apply("n1", u).unwrap();
        assert_eq!(ix.health("n1"), Some(Health::Live));

        // Created at 5 (the reply), then an update read at 4 arrives.
        ix.record("n1", "thin", &name(2), Some(lv(&name(2), 1)), stamp("e", 5));
        let mut u = update("e", 4, false);
        u.removed.push(("thin".into(), name(2)));
        ix.apply("n1", u).unwrap();
        assert_eq!(
            names(&ix),
            [name(1), name(2)],
            "an older update removed a newer LV"
        );

        // Removed at 6 (the reply); an update read at 5 still has it.
        ix.record("n1", "thin", &name(1), None, stamp("e", 6));
        let mut u = update("e", 5, false);
        u.lvs.push(("thin".into(), lv(&name(1), 1)));
        ix.apply("n1", u).unwrap();
        assert_eq!(
            names(&ix),
            [name(2)],
            "an older update brought a removed LV back"
        );
        assert_eq!(ix.find_key(Kind::Volume, &format!("{:032x}", 1)).len(), 0);

        // A full update at 6 is the truth for everything up to 6.
        let mut u = update("e", 6, true);
        u.lvs.push(("thin".into(), lv(&name(2), 1)));
        ix.apply("n1", u).unwrap();
        assert_eq!(names(&ix), [name(2)]);

        // A reply the stream already covers changes nothing.
        ix.record("n1", "thin", &name(2), None, stamp("e", 6));
        assert_eq!(names(&ix), [name(2)]);
    }

    #[test]
    fn duplicates_are_the_keys_held_in_two_places() {
        let ix = Index::default();
        let mut u = update("e", 1, true);
        u.lvs.push(("thin".into(), lv(&name(1), 1)));
        u.lvs.push(("thin".into(), lv(&name(2), 1)));
        ix.apply("n1", u).unwrap();
        let mut u = update("f", 1, true);
        u.lvs.push(("thin".into(), lv(&name(2), 1)));
        ix.apply("n2", u).unwrap();
        let dups = ix.duplicates(Kind::Volume);
        assert_eq!(dups.len(), 1, "{dups:?}");
        let mut nodes: Vec<&str> = dups[0].iter().map(|id| id.node.as_str()).collect();
        nodes.sort();
        assert_eq!(nodes, ["n1", "n2"]);
        assert!(dups[0].iter().all(|id| id.lv_name() == name(2)));
        assert!(ix.duplicates(Kind::Snapshot).is_empty());
    }

    #[test]
    fn a_restarted_agent_replaces_the_node_and_a_stray_delta_is_refused() {
        let ix = Index::default();
        let mut u = update("old", 9, true);
        u.lvs.push(("thin".into(), lv(&name(1), 1)));
        ix.apply("n1", u).unwrap();
        let err = ix.apply("n1", update("new", 1, false)).unwrap_err();
        assert!(err.contains("do not follow"), "{err}");
        let mut u = update("new", 1, true);
        u.lvs.push(("thin".into(), lv(&name(2), 1)));
        ix.apply("n1", u).unwrap();
        assert_eq!(names(&ix), [name(2)]);
        assert_eq!(ix.cursor("n1"), Some(stamp("new", 1)));
        // A delta older than what was applied (its capacity would undo a
        // newer one) is refused too.
        ix.apply("n1", update("new", 3, false)).unwrap();
        let err = ix.apply("n1", update("new", 2, false)).unwrap_err();
        assert!(err.contains("do not follow"), "{err}");
        assert_eq!(ix.cursor("n1"), Some(stamp("new", 3)));
    }

    #[test]
    fn reservations_hold_until_the_stream_shows_the_create() {
        let ix = Index::default();
        ix.apply("n1", update("e", 1, true)).unwrap();
        let take = |ix: &Index, bytes: u64| {
            ix.place("thin", |ranked| {
                let r = ranked.by_room().next().expect("n1 is live");
                if r.available < bytes {
                    return Err(crate::error::Error::ResourceExhausted(format!(
                        "{} left",
                        r.available
                    )));
                }
                Ok(((), r.name.to_string(), bytes))
            })
        };
        let (_, a) = take(&ix, 60).unwrap();
        assert!(take(&ix, 60).is_err(), "promised the same room twice");
        // The create failed: its room is free again.
        ix.settle(a, None);
        let (_, b) = take(&ix, 60).unwrap();
        // It succeeded at generation 2: held until the stream says so.
        ix.settle(b, Some(stamp("e", 2)));
        assert_eq!(ix.room("n1", "thin").unwrap().reserved, 60);
        ix.apply("n1", update("e", 2, false)).unwrap();
        assert_eq!(ix.room("n1", "thin").unwrap().reserved, 0);

        // A reservation on a named node (not placed) counts the same way,
        // and is refused when the room is short.
        let c = ix.reserve("n1", "thin", 60).expect("room for 60");
        assert!(ix.reserve("n1", "thin", 60).is_none(), "promised twice");
        assert!(take(&ix, 60).is_err(), "placement counts it");
        assert!(ix.reserve("n9", "thin", 1).is_none(), "an unknown node");
        ix.settle(c, None);
        assert!(take(&ix, 60).is_ok());
    }

    #[test]
    fn the_ranking_follows_capacity_reservations_and_health() {
        let ix = Index::default();
        let with = |epoch: &str, generation: u64, available: u64| {
            let mut u = update(epoch, generation, true);
            u.classes[0].1.available = available;
            u
        };
        ix.apply("a", with("e", 1, 100)).unwrap();
        ix.apply("b", with("e", 1, 80)).unwrap();
        ix.apply("c", with("e", 1, 100)).unwrap();
        let order = |ix: &Index| -> Vec<(String, u64)> {
            let inner = ix.read();
            let ranked = inner.ranked("thin");
            let v = ranked
                .by_room()
                .map(|c| (c.name.to_string(), c.available))
                .collect();
            v
        };
        let at = |v: &[(&str, u64)]| -> Vec<(String, u64)> {
            v.iter().map(|(n, b)| (n.to_string(), *b)).collect()
        };
        // Most room first, ties by name.
        assert_eq!(order(&ix), at(&[("a", 100), ("c", 100), ("b", 80)]));
        // A reservation moves its node down; its end moves it back.
        let (_, r) = ix.place("thin", |_| Ok(((), "a".to_string(), 30))).unwrap();
        assert_eq!(order(&ix), at(&[("c", 100), ("b", 80), ("a", 70)]));
        ix.settle(r, None);
        assert_eq!(order(&ix)[0], ("a".to_string(), 100));
        // New capacity from the stream; a node down leaves the ranking.
        ix.apply("b", with("e", 2, 500)).unwrap();
        ix.mark_down("c", "silent".into());
        assert_eq!(order(&ix), at(&[("b", 500), ("a", 100)]));
        // Lookups agree with the order.
        let inner = ix.read();
        let ranked = inner.ranked("thin");
        assert_eq!(ranked.named("b").map(|c| c.available), Some(500));
        assert!(ranked.named("c").is_none(), "a down node is no candidate");
        assert_eq!(ranked.extent_sizes().collect::<Vec<_>>(), [1]);
    }

    #[test]
    fn copies_from_another_node_are_found_by_their_source() {
        let ix = Index::default();
        let snap = LvId {
            kind: Kind::Snapshot,
            node: "node-a".into(),
            class: "thin".into(),
            key: format!("{:032x}", 7),
        };
        let mut target = lv(&name(1), 10);
        target.tags = vec![
            TAG_COPYING.to_string(),
            ids::from_tag("node-a"),
            snap.source_tag(),
        ];
        let mut u = update("e1", 1, true);
        u.lvs.push(("thin".into(), target.clone()));
        ix.apply("node-b", u).unwrap();
        assert_eq!(ix.copies_from(&snap), vec![format!("node-b/{}", name(1))]);
        // The same snapshot id on another node is another snapshot.
        let elsewhere = LvId {
            node: "node-c".into(),
            ..snap.clone()
        };
        assert!(ix.copies_from(&elsewhere).is_empty());
        // Complete: no longer a reader.
        target.tags.retain(|t| t != TAG_COPYING);
        let mut u = update("e1", 2, false);
        u.lvs.push(("thin".into(), target));
        ix.apply("node-b", u).unwrap();
        assert!(ix.copies_from(&snap).is_empty());
    }

    #[test]
    fn a_node_down_keeps_what_it_held_and_takes_no_placement() {
        let ix = Index::default();
        let mut u = update("e", 1, true);
        u.lvs.push(("thin".into(), lv(&name(1), 1)));
        ix.apply("n1", u).unwrap();
        ix.mark_down("n1", "silent".into());
        assert!(matches!(ix.health("n1"), Some(Health::Down(_))));
        assert_eq!(names(&ix), [name(1)]);
        assert!(ix.rooms("thin").is_empty());
        assert!(ix.room("n1", "thin").is_none());
        // Its next heartbeat (same generation) makes it live again.
        ix.apply("n1", update("e", 1, false)).unwrap();
        assert_eq!(ix.health("n1"), Some(Health::Live));
        ix.apply("n1", update("e", 1, false)).unwrap();
        assert_eq!(ix.rooms("thin").len(), 1);
        ix.mark_down("n1", "silent".into());
        // An unseen node stays unseen (nothing was ever known of it).
        ix.add_node("n2");
        ix.mark_down("n2", "no answer".into());
        assert_eq!(ix.absent().unseen, ["n2"]);
    }
}
