//! The controller against in-memory agents that push their inventory: what
//! a read, a create and a delete cost in agent calls, what a node that is
//! down or hung costs other requests, and that concurrent creates never
//! promise a node more room than it has.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::*;
use crate::core::backend::ControllerBackend;
use crate::core::request::Capability;
use crate::csi::volume_capability::access_mode::Mode as AccessMode;
use crate::lvm::error::{LvmError, Result as LvmResult};
use crate::lvm::inventory::{Stamped, Update, Updates, WatchRequest};

const GIB: u64 = 1 << 30;
const EXTENT: u64 = 4 << 20;

/// One node's LVM, in memory: class "thin" with a fixed room.
struct FakeNode {
    node: String,
    room: u64,
    state: Mutex<(u64, BTreeMap<String, Lv>)>,
    watchers: Mutex<Vec<mpsc::Sender<LvmResult<Update>>>>,
    /// Every call but watch, by name.
    calls: Mutex<BTreeMap<&'static str, u64>>,
    /// Calls (and watches) never answer.
    hung: Arc<AtomicBool>,
    /// Creates never answer (the rest does).
    stall_creates: AtomicBool,
    creates: AtomicU64,
    /// A resume with a source on another node completes the copy.
    complete_pulls: AtomicBool,
    /// What each pull read (node, LV).
    pulled: Mutex<Vec<(String, String)>>,
    /// Its LVs are thick (no pool).
    thick: AtomicBool,
    /// The state as last pushed: what heartbeats repeat.
    latest: Arc<Mutex<Update>>,
}

impl FakeNode {
    fn new(node: &str, room: u64) -> Arc<Self> {
        Arc::new(FakeNode {
            node: node.to_string(),
            room,
            state: Mutex::new((0, BTreeMap::new())),
            watchers: Mutex::default(),
            calls: Mutex::default(),
            hung: Arc::default(),
            stall_creates: AtomicBool::new(false),
            creates: AtomicU64::new(0),
            complete_pulls: AtomicBool::new(false),
            pulled: Mutex::default(),
            thick: AtomicBool::new(false),
            latest: Arc::default(),
        })
    }

    fn count(&self, call: &'static str) {
        *self.calls.lock().unwrap().entry(call).or_default() += 1;
    }

    fn calls(&self) -> u64 {
        self.calls.lock().unwrap().values().sum()
    }

    async fn hang_if_asked(&self) {
        if self.hung.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
    }

    fn used(lvs: &BTreeMap<String, Lv>) -> u64 {
        lvs.values().map(|l| l.size).sum()
    }

    /// A full update of the state as it is.
    fn full(&self) -> Update {
        let st = self.state.lock().unwrap();
        Update {
            epoch: "e1".into(),
            generation: st.0,
            full: true,
            lvs: st.1.values().map(|l| ("thin".into(), l.clone())).collect(),
            removed: Vec::new(),
            classes: vec![(
                "thin".into(),
                ClassCapacity {
                    available: self.room - Self::used(&st.1),
                    extent_size: EXTENT,
                    pool_full: false,
                    total: self.room,
                    used_percent: 0.0,
                },
            )],
            problems: Vec::new(),
        }
    }

    /// Pushes the state to every watcher (a full update is a valid delta
    /// for this fake's purpose; the real agent sends changes only).
    fn push(&self) {
        let update = self.full();
        *self.latest.lock().unwrap() = update.clone();
        self.watchers
            .lock()
            .unwrap()
            .retain(|w| w.try_send(Ok(update.clone())).is_ok());
    }

    fn change(&self, f: impl FnOnce(&mut BTreeMap<String, Lv>)) -> Stamp {
        let stamp = {
            let mut st = self.state.lock().unwrap();
            f(&mut st.1);
            st.0 += 1;
            Stamp {
                epoch: "e1".into(),
                generation: st.0,
            }
        };
        self.push();
        stamp
    }
}

fn new_lv(spec: &LvSpec, thick: bool) -> Lv {
    Lv {
        vg: "vg".into(),
        name: spec.name.clone(),
        size: spec.size,
        attr: "Vwi-a-tz--".into(),
        tags: spec.tags.clone(),
        pool: (!thick).then(|| "pool".into()),
        data_percent: None,
        metadata_percent: None,
        when_full: String::new(),
        zeroing: false,
        created: Some(1),
    }
}

#[tonic::async_trait]
impl Agent for FakeNode {
    fn node(&self) -> &str {
        &self.node
    }

    async fn create(&self, spec: &LvSpec) -> LvmResult<Stamped<Lv>> {
        self.count("create");
        self.hang_if_asked().await;
        if self.stall_creates.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        self.creates.fetch_add(1, Ordering::SeqCst);
        // The call takes a while, as lvcreate does: creates overlap.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let lv = new_lv(spec, self.thick.load(Ordering::SeqCst));
        let mut full = false;
        let stamp = self.change(|lvs| {
            if Self::used(lvs) + spec.size > self.room && !lvs.contains_key(&spec.name) {
                full = true;
                return;
            }
            lvs.insert(spec.name.clone(), lv.clone());
        });
        if full {
            return Err(LvmError::NoSpace("the fake VG is full".into()));
        }
        Ok(Stamped { value: lv, stamp })
    }

    async fn remove(&self, _: &str, lv: &str) -> LvmResult<Stamp> {
        self.count("remove");
        self.hang_if_asked().await;
        Ok(self.change(|lvs| {
            lvs.remove(lv);
        }))
    }

    async fn extend(&self, _: &str, lv: &str, size: u64) -> LvmResult<Stamped<Lv>> {
        self.count("extend");
        self.hang_if_asked().await;
        let mut out = None;
        let stamp = self.change(|lvs| {
            if let Some(l) = lvs.get_mut(lv) {
                l.size = l.size.max(size);
                out = Some(l.clone());
            }
        });
        let value = out.ok_or_else(|| LvmError::LvMissing(lv.into()))?;
        Ok(Stamped { value, stamp })
    }

    async fn find(&self, _: &str, lv: &str) -> LvmResult<Option<Lv>> {
        self.count("find");
        self.hang_if_asked().await;
        Ok(self.state.lock().unwrap().1.get(lv).cloned())
    }

    async fn list(&self) -> LvmResult<Vec<(String, Lv)>> {
        self.count("list");
        self.hang_if_asked().await;
        Ok(self.full().lvs)
    }

    async fn capacity(&self, _: &str) -> LvmResult<ClassCapacity> {
        self.count("capacity");
        self.hang_if_asked().await;
        Ok(self.full().classes.remove(0).1)
    }

    async fn resume(
        &self,
        _: &str,
        lv: &str,
        pull: Option<&Pull>,
    ) -> LvmResult<Stamped<Option<Lv>>> {
        self.count("resume");
        if let Some(p) = pull {
            self.pulled
                .lock()
                .unwrap()
                .push((p.node.clone(), p.lv.clone()));
            if self.complete_pulls.load(Ordering::SeqCst) {
                self.change(|lvs| {
                    if let Some(l) = lvs.get_mut(lv) {
                        l.tags.retain(|t| t != TAG_COPYING);
                    }
                });
            }
        }
        let st = self.state.lock().unwrap();
        Ok(Stamped {
            value: st.1.get(lv).cloned(),
            stamp: Stamp {
                epoch: "e1".into(),
                generation: st.0,
            },
        })
    }

    async fn grant(&self, _: &str, _: &str, _: &str) -> LvmResult<()> {
        self.count("grant");
        Ok(())
    }

    fn address(&self) -> Option<&str> {
        Some("fake:1")
    }

    async fn copy_progress(&self, _: &str, _: &str) -> Option<(String, bool)> {
        None
    }

    async fn block_map(&self, _: &str, lv: &str, _: Option<&str>) -> LvmResult<BlockMap> {
        self.count("block_map");
        let size = self.state.lock().unwrap().1.get(lv).map(|l| l.size);
        size.map(|s| BlockMap::whole(s, 1 << 16))
            .ok_or_else(|| LvmError::LvMissing(lv.into()))
    }

    async fn watch(&self, request: WatchRequest) -> LvmResult<Updates> {
        self.hang_if_asked().await;
        let (tx, rx) = mpsc::channel(1024);
        tx.try_send(Ok(self.full())).unwrap();
        // Heartbeats at the period asked, as of the latest generation.
        let beat = tx.clone();
        *self.latest.lock().unwrap() = self.full();
        let latest = self.latest.clone();
        let hung = self.hung.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(request.heartbeat).await;
                if hung.load(Ordering::SeqCst) {
                    // A hung host: the stream stays open and says nothing.
                    continue;
                }
                let mut hb = latest.lock().unwrap().clone();
                hb.full = false;
                hb.lvs.clear();
                if beat.send(Ok(hb)).await.is_err() {
                    return;
                }
            }
        });
        self.watchers.lock().unwrap().push(tx);
        Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }
}

fn config() -> LvmConfig {
    LvmConfig::load(None, &["thin=vg/pool".into()]).unwrap()
}

async fn controller(nodes: &[Arc<FakeNode>]) -> Arc<LvmController> {
    let agents = nodes.iter().map(|n| n.clone() as Arc<dyn Agent>).collect();
    let c = LvmController::new(config(), agents, Box::new(|| None))
        .with_heartbeat(Duration::from_millis(50));
    let c = Arc::new(c);
    c.start(Duration::from_secs(5)).await;
    c
}

fn request(name: &str, size: u64) -> CreateVolume {
    CreateVolume {
        name: name.into(),
        range: Range {
            required: size,
            limit: 0,
        },
        params: BTreeMap::new(),
        capabilities: vec![Capability {
            access: Access::Block,
            mode: AccessMode::SingleNodeWriter,
        }],
        requirement: None,
        source: None,
        secrets: Default::default(),
    }
}

fn total_calls(nodes: &[Arc<FakeNode>]) -> u64 {
    nodes.iter().map(|n| n.calls()).sum()
}

#[tokio::test]
async fn reads_ask_no_agent_and_changes_ask_one() {
    let nodes: Vec<_> = (0..5)
        .map(|i| FakeNode::new(&format!("n{i}"), 10 * GIB))
        .collect();
    let c = controller(&nodes).await;
    let before = total_calls(&nodes);
    let v = c.create_volume(&request("pvc-1", GIB)).await.unwrap();
    assert_eq!(total_calls(&nodes) - before, 1, "one agent call per create");

    let before = total_calls(&nodes);
    assert!(c.get_volume(&v.id).await.unwrap().is_some());
    assert_eq!(c.list_volumes().await.unwrap().len(), 1);
    c.capacity(&BTreeMap::new(), None).await.unwrap();
    // A retry finds the volume in the index.
    let again = c.create_volume(&request("pvc-1", GIB)).await.unwrap();
    assert_eq!(again.id, v.id);
    assert_eq!(total_calls(&nodes) - before, 0, "reads ask no agent");

    let before = total_calls(&nodes);
    c.delete_volume(&v.id, &Default::default()).await.unwrap();
    assert_eq!(total_calls(&nodes) - before, 1, "one agent call per delete");
    // Gone at once for reads, whatever the stream's timing.
    assert!(c.get_volume(&v.id).await.unwrap().is_none());
    c.delete_volume(&v.id, &Default::default()).await.unwrap();
    assert_eq!(
        total_calls(&nodes) - before,
        1,
        "deleting what is gone asks nobody"
    );
}

#[tokio::test]
async fn a_hung_node_costs_other_requests_nothing() {
    let nodes: Vec<_> = (0..3)
        .map(|i| FakeNode::new(&format!("n{i}"), 10 * GIB))
        .collect();
    let c = controller(&nodes).await;
    // n0 hangs: it accepts calls and never answers, stream included.
    nodes[0].hung.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(matches!(c.index.health("n0"), Some(Health::Down(_))));
    for i in 0..10 {
        let started = Instant::now();
        let v = c
            .create_volume(&request(&format!("pvc-{i}"), GIB))
            .await
            .unwrap();
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "{:?}",
            started.elapsed()
        );
        assert!(!v.id.contains("n0"), "placed on the hung node: {}", v.id);
    }
    assert_eq!(nodes[0].calls(), 0, "nothing asked the hung node");
}

#[tokio::test]
async fn an_unseen_node_makes_new_names_unavailable_and_says_which() {
    let nodes: Vec<_> = (0..2)
        .map(|i| FakeNode::new(&format!("n{i}"), 10 * GIB))
        .collect();
    nodes[1].hung.store(true, Ordering::SeqCst);
    let agents = nodes.iter().map(|n| n.clone() as Arc<dyn Agent>).collect();
    let c = LvmController::new(config(), agents, Box::new(|| None))
        .with_heartbeat(Duration::from_millis(50));
    let c = Arc::new(c);
    c.start(Duration::from_millis(300)).await;
    let err = c.create_volume(&request("pvc-x", GIB)).await.unwrap_err();
    assert!(
        matches!(&err, Error::Unavailable(m) if m.contains("n1")),
        "{err:?}"
    );
    // Once it has sent its inventory, the same request proceeds.
    nodes[1].hung.store(false, Ordering::SeqCst);
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        match c.create_volume(&request("pvc-x", GIB)).await {
            Ok(_) => break,
            Err(Error::Unavailable(_)) if Instant::now() < end => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => panic!("{e:?}"),
        }
    }
}

#[tokio::test]
async fn an_earlier_attempt_on_a_node_now_down_is_unavailable() {
    let nodes: Vec<_> = (0..2)
        .map(|i| FakeNode::new(&format!("n{i}"), 10 * GIB))
        .collect();
    let c = controller(&nodes).await;
    // The first attempt goes to a node that then hangs mid-call.
    c.note_attempt(&Kind::Volume.key_for_name("pvc-a"), "n1");
    nodes[1].hung.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let err = c.create_volume(&request("pvc-a", GIB)).await.unwrap_err();
    assert!(
        matches!(&err, Error::Unavailable(m) if m.contains("n1")),
        "{err:?}"
    );
    // Other names go on.
    c.create_volume(&request("pvc-b", GIB)).await.unwrap();
}

#[tokio::test]
async fn concurrent_creates_never_promise_a_node_more_than_it_has() {
    // Two nodes with room for 10 volumes each; 50 creates at once.
    let nodes: Vec<_> = (0..2)
        .map(|i| FakeNode::new(&format!("n{i}"), 10 * GIB))
        .collect();
    let c = controller(&nodes).await;
    let calls = (0..50).map(|i| {
        let c = c.clone();
        async move { c.create_volume(&request(&format!("pvc-{i}"), GIB)).await }
    });
    let results = futures_join_all(calls).await;
    let ok = results.iter().filter(|r| r.is_ok()).count();
    let exhausted = results
        .iter()
        .filter(|r| matches!(r, Err(Error::ResourceExhausted(_))))
        .count();
    assert_eq!((ok, exhausted), (20, 30), "{results:?}");
    // No create was sent to a node that had no room for it.
    let sent: u64 = nodes.iter().map(|n| n.creates.load(Ordering::SeqCst)).sum();
    assert_eq!(sent, 20);
}

#[tokio::test]
async fn a_create_whose_caller_left_frees_its_reservation() {
    let nodes = vec![FakeNode::new("n0", 10 * GIB)];
    let c = controller(&nodes).await;
    nodes[0].stall_creates.store(true, Ordering::SeqCst);
    let r = tokio::time::timeout(
        Duration::from_millis(200),
        c.create_volume(&request("pvc-1", 4 * GIB)),
    )
    .await;
    assert!(r.is_err(), "the stalled create answered");
    assert_eq!(c.index.room("n0", "thin").unwrap().reserved, 0);
}

fn on_node(node: &str) -> Option<csi::TopologyRequirement> {
    let topology = csi::Topology {
        segments: node_segments(node).into_iter().collect(),
    };
    Some(csi::TopologyRequirement {
        requisite: vec![topology.clone()],
        preferred: vec![topology],
    })
}

/// LV names on a fake node.
fn names(node: &FakeNode) -> Vec<String> {
    node.state.lock().unwrap().1.keys().cloned().collect()
}

/// A thick source's point in time is a full copy on the source's node:
/// its size is reserved there like a placed create's while it is made,
/// and a node without the room refuses the clone before any LVM work.
#[tokio::test]
async fn a_thick_sources_point_in_time_is_reserved_on_its_node() {
    let nodes = vec![FakeNode::new("n0", 5 * GIB), FakeNode::new("n1", 10 * GIB)];
    nodes[0].thick.store(true, Ordering::SeqCst);
    let c = controller(&nodes).await;
    let on_n0 = |name: &str, size: u64| {
        let mut r = request(name, size);
        r.requirement = on_node("n0");
        r
    };
    let clone_of = |name: &str, source: &str| {
        let mut r = request(name, 2 * GIB);
        r.requirement = on_node("n1");
        r.source = Some(Source::Volume(source.to_string()));
        r
    };
    let a = c.create_volume(&on_n0("pvc-a", 2 * GIB)).await.unwrap();
    let creates_on_n0 = || nodes[0].calls.lock().unwrap().get("create").copied();

    // 1. While n0 makes the copy, its 2 GiB are promised: a 2 GiB create
    // there is refused (3 GiB free, 2 promised). Abandoned, it is freed.
    nodes[0].stall_creates.store(true, Ordering::SeqCst);
    let before = creates_on_n0();
    let task = tokio::spawn({
        let (c, r) = (c.clone(), clone_of("pvc-c1", &a.id));
        async move { c.create_volume(&r).await }
    });
    let end = Instant::now() + Duration::from_secs(5);
    while creates_on_n0() == before {
        assert!(Instant::now() < end, "the copy was never asked for");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(c.index.room("n0", "thin").unwrap().reserved, 2 * GIB);
    let err = c.create_volume(&on_n0("pvc-b", 2 * GIB)).await.unwrap_err();
    assert!(matches!(err, Error::ResourceExhausted(_)), "{err:?}");
    task.abort();
    let _ = task.await;
    assert_eq!(c.index.room("n0", "thin").unwrap().reserved, 0);
    nodes[0].stall_creates.store(false, Ordering::SeqCst);

    // 2. Without the room (1 GiB free for a 2 GiB copy): refused, and n0
    // is not asked.
    let b = c.create_volume(&on_n0("pvc-b", 2 * GIB)).await.unwrap();
    let before = creates_on_n0();
    let err = c
        .create_volume(&clone_of("pvc-c2", &b.id))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::ResourceExhausted(m) if m.contains("node n0 has no room")),
        "{err:?}"
    );
    assert_eq!(creates_on_n0(), before, "no LVM work");
    assert_eq!(c.index.room("n0", "thin").unwrap().reserved, 0);
}

/// A clone placed on another node than its source volume reads a hidden
/// snapshot of the source (its point in time, on the source's node), which
/// no snapshot call shows and which goes once the clone is complete or
/// deleted; the sweep removes one whose clone is gone.
#[tokio::test]
async fn a_clone_on_another_node_reads_a_hidden_snapshot_that_goes_afterwards() {
    let nodes = vec![FakeNode::new("n0", 10 * GIB), FakeNode::new("n1", 10 * GIB)];
    let c = controller(&nodes).await;
    let mut r = request("pvc-src", GIB);
    r.requirement = on_node("n0");
    let v = c.create_volume(&r).await.unwrap();
    let clone_of = |name: &str| {
        let mut r = request(name, GIB);
        r.requirement = on_node("n1");
        r.source = Some(Source::Volume(v.id.clone()));
        r
    };
    let hidden_of = |name: &str| {
        Kind::Snapshot.lv_name(&ids::hidden_source_key(&Kind::Volume.key_for_name(name)))
    };

    // 1. Incomplete: the clone exists on n1, marked copying, and reads
    // n0's hidden snapshot, which nobody sees as a snapshot.
    let err = c.create_volume(&clone_of("pvc-c1")).await.unwrap_err();
    assert!(matches!(&err, Error::Aborted(_)), "{err:?}");
    let hidden = hidden_of("pvc-c1");
    assert!(names(&nodes[0]).contains(&hidden), "{:?}", names(&nodes[0]));
    assert_eq!(
        nodes[1].pulled.lock().unwrap().last(),
        Some(&("n0".to_string(), hidden.clone()))
    );
    assert!(c.list_snapshots().await.unwrap().is_empty());
    let hidden_id = format!(
        "lvs1:n0:thin:{}",
        ids::hidden_source_key(&Kind::Volume.key_for_name("pvc-c1"))
    );
    assert!(c.get_snapshot(&hidden_id).await.unwrap().is_none());
    assert!(
        c.list_volumes().await.unwrap().len() == 1,
        "not listed while copying"
    );

    // 2. Complete: the retry answers the clone and the hidden snapshot goes.
    nodes[1].complete_pulls.store(true, Ordering::SeqCst);
    let done = c.create_volume(&clone_of("pvc-c1")).await.unwrap();
    assert!(done.id.starts_with("lvm1:n1:"), "{}", done.id);
    assert_eq!(done.source, Some(Source::Volume(v.id.clone())));
    assert!(!names(&nodes[0]).contains(&hidden));

    // 3. Deleted while copying: the hidden snapshot goes with it.
    nodes[1].complete_pulls.store(false, Ordering::SeqCst);
    let _ = c.create_volume(&clone_of("pvc-c2")).await.unwrap_err();
    assert!(names(&nodes[0]).contains(&hidden_of("pvc-c2")));
    let id2 = format!("lvm1:n1:thin:{}", Kind::Volume.key_for_name("pvc-c2"));
    c.delete_volume(&id2, &Default::default()).await.unwrap();
    assert!(!names(&nodes[0]).contains(&hidden_of("pvc-c2")));

    // 4. A clone that vanished without the controller (a crash between
    // its removal and the hidden snapshot's): the sweep removes it, and
    // keeps the hidden snapshot of a clone still copying.
    let _ = c.create_volume(&clone_of("pvc-c3")).await.unwrap_err();
    let _ = c.create_volume(&clone_of("pvc-c4")).await.unwrap_err();
    let c3 = Kind::Volume.lv_name(&Kind::Volume.key_for_name("pvc-c3"));
    nodes[1].change(|lvs| {
        lvs.remove(&c3);
    });
    let end = Instant::now() + Duration::from_secs(5);
    while c.index.get("n1", "thin", &c3).is_some() {
        assert!(Instant::now() < end, "the removal never reached the index");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    c.sweep_points_in_time().await;
    assert!(!names(&nodes[0]).contains(&hidden_of("pvc-c3")));
    assert!(names(&nodes[0]).contains(&hidden_of("pvc-c4")));

    // 5. The source volume goes while pvc-c4 copies: the retry still
    // completes it from its hidden snapshot, then removes that.
    c.delete_volume(&v.id, &Default::default()).await.unwrap();
    nodes[1].complete_pulls.store(true, Ordering::SeqCst);
    let done = c.create_volume(&clone_of("pvc-c4")).await.unwrap();
    assert_eq!(done.source, Some(Source::Volume(v.id.clone())));
    assert_eq!(names(&nodes[0]), Vec::<String>::new());
    // A new clone of the deleted source: NOT_FOUND.
    let err = c.create_volume(&clone_of("pvc-c5")).await.unwrap_err();
    assert!(matches!(&err, Error::NotFound(_)), "{err:?}");
    // So is one of a well-formed id in a class that is not configured.
    let mut r = request("pvc-c6", GIB);
    r.source = Some(Source::Volume(format!(
        "lvm1:n0:nosuch:{}",
        Kind::Volume.key_for_name("x")
    )));
    let err = c.create_volume(&r).await.unwrap_err();
    assert!(matches!(&err, Error::NotFound(_)), "{err:?}");
}

async fn futures_join_all<F>(futures: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}
