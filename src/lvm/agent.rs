//! The LVM agent: the only code that runs LVM on a node.
//!
//! It keeps an in-memory copy of the node's LVM state, filled by one
//! `lvm fullreport` at start (and on a slow background timer), and kept
//! right after each mutation from the mutation's own result. So a create,
//! remove or extend costs exactly the one lvm process it needs, and reads
//! cost none. A mutation whose outcome is unknown (timeout, odd failure)
//! marks the copy dirty; the next read refreshes it once.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::config::{DeviceClass, LvmConfig};
use crate::core::blockmap::BlockMap;
use crate::host::blockdev;
use crate::lvm::error::{LvmError, Result};
use crate::lvm::ids::{self, Kind, LvmKind};
use crate::lvm::inventory::{Stamp, Stamped, Update, Updates, WatchRequest};
use crate::lvm::report::{self, FullReport, Lv, Vg};
use crate::runner::{Cmd, Runner};

/// What the controller asks a node to create.
#[derive(Debug, Clone)]
pub struct LvSpec {
    pub class: String,
    pub name: String,
    pub size: u64,
    pub tags: Vec<String>,
    /// Where the data comes from: None for a blank volume.
    pub origin: Option<Origin>,
    /// A restore from a snapshot on another node (instead of `origin`).
    pub pull: Option<Pull>,
    /// A snapshot: read-only (thin snapshots also stay inactive).
    pub read_only: bool,
}

/// A snapshot on another node that a new LV is filled from, through that
/// node's agent (see [`crate::lvm::pull`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pull {
    pub node: String,
    /// host:port of the source node's agent.
    pub address: String,
    pub class: String,
    pub lv: String,
}

/// The LV a snapshot, restore or clone takes its data from, on the same node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub class: String,
    pub lv: String,
    /// A snapshot never changes, so it is read directly; a live volume is
    /// first frozen in a short-lived snapshot.
    pub frozen: bool,
}

/// Space a device class can still hand out.
#[derive(Debug, Clone, PartialEq)]
pub struct ClassCapacity {
    /// Bytes a new volume may take now.
    pub available: u64,
    /// Allocation unit (the VG's extent size).
    pub extent_size: u64,
    /// Thin only: the pool is at or past its full threshold.
    pub pool_full: bool,
    /// Total bytes of the VG (thick) or pool (thin).
    pub total: u64,
    /// Thin: pool data usage in percent; thick: share of the VG allocated.
    pub used_percent: f64,
}

/// What the metrics show of one device class, from the in-memory state.
#[derive(Debug, Clone, PartialEq)]
pub struct ClassStats {
    pub class: String,
    pub vg: String,
    pub pool: Option<String>,
    /// None while the VG is missing from the last report.
    pub vg_size: Option<u64>,
    pub vg_free: Option<u64>,
    /// Thin classes whose pool is in the last report.
    pub pool_size: Option<u64>,
    pub pool_data_percent: Option<f64>,
    pub pool_metadata_percent: Option<f64>,
    /// What GetCapacity would answer for the class now.
    pub available: Option<u64>,
    pub volumes: u64,
    pub snapshots: u64,
}

/// The in-memory LVM state as the metrics show it.
#[derive(Debug, Clone, PartialEq)]
pub struct LvmStats {
    pub classes: Vec<ClassStats>,
    /// Time since the last full report (None before the first).
    pub report_age: Option<Duration>,
}

/// The narrow API a controller uses to reach a node's LVM. In one process
/// it is a direct call; across nodes it is the agent's gRPC service.
#[tonic::async_trait]
pub trait Agent: Send + Sync + 'static {
    fn node(&self) -> &str;
    async fn create(&self, spec: &LvSpec) -> Result<Stamped<Lv>>;
    async fn remove(&self, class: &str, lv: &str) -> Result<Stamp>;
    async fn extend(&self, class: &str, lv: &str, size: u64) -> Result<Stamped<Lv>>;
    async fn find(&self, class: &str, lv: &str) -> Result<Option<Lv>>;
    /// Every LV that belongs to a configured class, as (class, LV).
    async fn list(&self) -> Result<Vec<(String, Lv)>>;
    async fn capacity(&self, class: &str) -> Result<ClassCapacity>;
    /// For an LV whose full copy is incomplete: makes sure the copy runs (it
    /// restarts after a crash or a failure), waits briefly, and returns the
    /// LV as it is then.
    /// `pull`: where a cross-node copy reads from (the agent keeps no
    /// addresses).
    async fn resume(
        &self,
        class: &str,
        lv: &str,
        pull: Option<&Pull>,
    ) -> Result<Stamped<Option<Lv>>>;
    /// What a running or failed copy into the LV has to say, if anything,
    /// and whether it failed for good.
    async fn copy_progress(&self, class: &str, lv: &str) -> Option<(String, bool)>;
    /// The node's inventory, pushed (see [`crate::lvm::inventory`]).
    async fn watch(&self, request: WatchRequest) -> Result<Updates>;
    /// The ranges of LV `lv` that hold data or, with `base`, that differ
    /// from `base` (see [`crate::lvm::blockmap`]).
    async fn block_map(&self, class: &str, lv: &str, base: Option<&str>) -> Result<BlockMap>;
    /// Lets the agent of `node` read snapshot `lv` for a while (see
    /// [`crate::lvm::pull`]).
    async fn grant(&self, class: &str, lv: &str, node: &str) -> Result<()> {
        let _ = (class, lv, node);
        Err(LvmError::Unavailable(format!(
            "node {} cannot serve its snapshots to other nodes",
            self.node()
        )))
    }
    /// host:port where other agents reach this one, when they can.
    fn address(&self) -> Option<&str> {
        None
    }
}

/// The in-memory copy of LVM's state: one full report, plus the changes
/// this agent made since.
///
/// A report takes a while (seconds under load) and does not hold off this
/// agent's own mutations, so a report that started before an `lvcreate`
/// finished may not show its LV. Every change to the copy therefore takes
/// the next `generation` and records it per LV in `touched`; a report
/// records the generation it started at and, when applied, yields to every
/// LV changed after that: the copy never loses a change newer than the
/// report (a new LV does not vanish, a removed one does not come back).
/// Everything else is taken from the report, which is the truth for
/// changes made by anyone else.
///
/// The copy is also what the inventory stream sends (see
/// [`crate::lvm::inventory`]): `changed` keeps, per LV, the generation of
/// its last change, removals included, across reports, so a watcher can
/// be sent every change after any generation it has seen, down to
/// `horizon` (older removals are forgotten past [`REMEMBERED_REMOVALS`]).
#[derive(Debug, Default)]
struct State {
    vgs: BTreeMap<String, Vg>,
    lvs: BTreeMap<(String, String), Lv>,
    /// What the last report found wrong with the configuration.
    problems: Vec<String>,
    refreshed: Option<Instant>,
    dirty: bool,
    /// Count of changes made to this copy (never reset).
    generation: u64,
    /// The generation of the last change of each LV changed since the last
    /// report was applied.
    touched: BTreeMap<(String, String), u64>,
    /// The generation at which the copy was last marked dirty.
    dirty_at: u64,
    /// The generation of each LV's last change (present or removed).
    changed: BTreeMap<(String, String), u64>,
    /// Changes at or below this generation may be forgotten.
    horizon: u64,
}

/// Removed LVs whose removal the agent remembers for watchers resuming.
const REMEMBERED_REMOVALS: usize = 10_000;

/// Whether two states of an LV differ for the inventory: a thin volume's
/// own usage is noise (it moves with every write), a pool's is capacity.
fn differs(a: Option<&Lv>, b: Option<&Lv>) -> bool {
    match (a, b) {
        (None, None) => false,
        (Some(a), Some(b)) if !a.is_thin_pool() && !b.is_thin_pool() => {
            let quiet = |l: &Lv| Lv {
                data_percent: None,
                metadata_percent: None,
                ..l.clone()
            };
            quiet(a) != quiet(b)
        }
        (a, b) => a != b,
    }
}

impl State {
    /// Records a change of one LV made by this agent; returns its
    /// generation.
    fn touch(&mut self, vg: &str, name: &str) -> u64 {
        self.generation += 1;
        let key = (vg.to_string(), name.to_string());
        self.touched.insert(key.clone(), self.generation);
        self.changed.insert(key, self.generation);
        self.generation
    }

    /// Forgets the oldest removals beyond [`REMEMBERED_REMOVALS`], raising
    /// the horizon past them.
    fn prune(&mut self) {
        let removed = self.changed.len().saturating_sub(self.lvs.len());
        if removed <= REMEMBERED_REMOVALS {
            return;
        }
        let mut gone: Vec<(u64, (String, String))> = self
            .changed
            .iter()
            .filter(|(k, _)| !self.lvs.contains_key(*k))
            .map(|(k, g)| (*g, k.clone()))
            .collect();
        gone.sort();
        for (g, k) in gone.into_iter().take(removed - REMEMBERED_REMOVALS) {
            self.changed.remove(&k);
            self.horizon = self.horizon.max(g);
        }
    }

    /// Replaces the copy with a report that started at generation `start`,
    /// keeping every LV changed after `start` as this copy has it (and the
    /// VG space those changes took or gave back).
    fn apply_report(&mut self, start: u64, vgs: Vec<Vg>, lvs: Vec<Lv>) {
        let mut vgs: BTreeMap<String, Vg> = vgs.into_iter().map(|v| (v.name.clone(), v)).collect();
        let mut lvs: BTreeMap<(String, String), Lv> = lvs
            .into_iter()
            .map(|l| ((l.vg.clone(), l.name.clone()), l))
            .collect();
        for (key, &at) in &self.touched {
            if at <= start {
                continue;
            }
            let ours = self.lvs.get(key);
            let theirs = lvs.get(key);
            // Space a thick LV holds in its VG (thin LVs take pool space).
            let held = |l: Option<&Lv>| l.filter(|l| l.pool.is_none()).map_or(0, |l| l.size);
            if let Some(vg) = vgs.get_mut(&key.0) {
                vg.free = (vg.free + held(theirs)).saturating_sub(held(ours));
            }
            match ours {
                Some(l) => lvs.insert(key.clone(), l.clone()),
                None => lvs.remove(key),
            };
        }
        // What the report changed (made by others, or noticed late) takes
        // one new generation.
        let keys: std::collections::BTreeSet<(String, String)> =
            self.lvs.keys().chain(lvs.keys()).cloned().collect();
        let moved: Vec<(String, String)> = keys
            .into_iter()
            .filter(|k| differs(self.lvs.get(k), lvs.get(k)))
            .collect();
        if !moved.is_empty() || self.vgs != vgs {
            self.generation += 1;
            for k in moved {
                self.changed.insert(k, self.generation);
            }
        }
        self.vgs = vgs;
        self.lvs = lvs;
        self.prune();
        // Every change recorded so far is older than the next report.
        self.touched.clear();
        self.refreshed = Some(Instant::now());
        self.dirty = self.dirty_at > start;
    }
}

/// A write lock on the state that tells watchers of the new generation
/// when it is released.
struct StateWrite<'a> {
    guard: std::sync::RwLockWriteGuard<'a, State>,
    changes: &'a tokio::sync::watch::Sender<u64>,
}

impl std::ops::Deref for StateWrite<'_> {
    type Target = State;
    fn deref(&self) -> &State {
        &self.guard
    }
}

impl std::ops::DerefMut for StateWrite<'_> {
    fn deref_mut(&mut self) -> &mut State {
        &mut self.guard
    }
}

impl Drop for StateWrite<'_> {
    fn drop(&mut self) {
        let g = self.guard.generation;
        self.changes.send_if_modified(|v| {
            let moved = *v != g;
            *v = g;
            moved
        });
    }
}

pub struct LocalAgent {
    node: String,
    /// This process's inventory epoch (see [`crate::lvm::inventory`]).
    epoch: String,
    config: LvmConfig,
    pub(super) runner: Arc<Runner>,
    lvm_config_arg: String,
    state: RwLock<State>,
    refreshing: tokio::sync::Mutex<()>,
    /// Thick LVs being zeroed before removal, and those already zeroed.
    zeroing: Arc<std::sync::Mutex<BTreeMap<String, ZeroJob>>>,
    /// Full copies under way or failed, by "vg/lv" of the target.
    pub(super) copies: std::sync::Mutex<BTreeMap<String, super::copy::CopyEntry>>,
    /// Leftover temporary snapshots ("vg/lv") being removed in the
    /// background after the start.
    pub(super) removing: std::sync::Mutex<std::collections::BTreeSet<String>>,
    /// This agent, for tasks that outlive the call that started them.
    pub(super) me: std::sync::Weak<LocalAgent>,
    /// The generation, for watchers of the inventory.
    changes: tokio::sync::watch::Sender<u64>,
    /// How long a call that starts or resumes a full copy waits for it
    /// before answering "in progress".
    pub(super) copy_wait: Duration,
    /// How often a cross-node copy records its checkpoint (at least).
    pub(super) checkpoint_every: Duration,
    /// Held while a pool's metadata snapshot is reserved (a pool has one
    /// at most).
    pub(super) metadata_snap: tokio::sync::Mutex<()>,
    /// Cross-node copies: grants to read snapshots, streams being served,
    /// and the TLS material to reach other agents.
    pub(super) peers: super::pull::Peers,
}

/// How an agent runs LVM.
#[derive(Debug, Clone, Copy)]
pub struct AgentOptions {
    /// Let udev manage device nodes.
    pub udev: bool,
    /// See [`LocalAgent::copy_wait`].
    pub copy_wait: Duration,
    /// See [`LocalAgent::checkpoint_every`].
    pub checkpoint_every: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ZeroJob {
    Running,
    Done,
}

const NO_UDEV: &str = "activation { udev_sync = 0 udev_rules = 0 } \
                       devices { obtain_device_list_from_udev = 0 }";
const REPORT_TIME: &str = "report { time_format = \"%s\" }";

impl LocalAgent {
    pub fn new(
        node: String,
        config: LvmConfig,
        runner: Arc<Runner>,
        opts: AgentOptions,
    ) -> Arc<Self> {
        let lvm_config_arg = if opts.udev {
            REPORT_TIME.to_string()
        } else {
            format!("{NO_UDEV} {REPORT_TIME}")
        };
        Arc::new_cyclic(|me| LocalAgent {
            node,
            epoch: uuid::Uuid::new_v4().simple().to_string(),
            config,
            runner,
            lvm_config_arg,
            state: RwLock::new(State {
                dirty: true,
                ..State::default()
            }),
            refreshing: tokio::sync::Mutex::new(()),
            zeroing: Arc::default(),
            copies: Default::default(),
            removing: Default::default(),
            me: me.clone(),
            copy_wait: opts.copy_wait,
            checkpoint_every: opts.checkpoint_every,
            changes: tokio::sync::watch::channel(0).0,
            metadata_snap: tokio::sync::Mutex::new(()),
            peers: Default::default(),
        })
    }

    /// The state, for a change: watchers hear of the new generation when
    /// the guard goes.
    fn write_state(&self) -> StateWrite<'_> {
        StateWrite {
            guard: self.state.write().expect("state poisoned"),
            changes: &self.changes,
        }
    }

    /// An LV as the copy has it now, with the stamp of its last change.
    fn stamped_lv(&self, lv: Lv) -> Stamped<Lv> {
        let st = self.state.read().expect("state poisoned");
        let key = (lv.vg.clone(), lv.name.clone());
        let generation = st.changed.get(&key).copied().unwrap_or(st.generation);
        Stamped {
            value: st.lvs.get(&key).cloned().unwrap_or(lv),
            stamp: Stamp {
                epoch: self.epoch.clone(),
                generation,
            },
        }
    }

    /// The stamp of an LV's last change (a removal included).
    fn stamp_of(&self, vg: &str, name: &str) -> Stamp {
        let st = self.state.read().expect("state poisoned");
        let key = (vg.to_string(), name.to_string());
        Stamp {
            epoch: self.epoch.clone(),
            generation: st.changed.get(&key).copied().unwrap_or(st.generation),
        }
    }

    pub fn config(&self) -> &LvmConfig {
        &self.config
    }

    pub(super) fn lvm(&self, sub: &str) -> Cmd {
        Cmd::new("lvm")
            .arg(sub)
            .arg("--config")
            .arg(&self.lvm_config_arg)
            .env("LVM_SUPPRESS_FD_WARNINGS", "1")
    }

    pub(super) fn class(&self, name: &str) -> Result<&DeviceClass> {
        self.config.class(name).ok_or_else(|| {
            LvmError::NoSuchClass(format!("device class {name:?} is not configured"))
        })
    }

    /// Readiness from the last report, without running anything: every
    /// configured VG and thin pool was seen.
    pub fn readiness(&self) -> std::result::Result<(), String> {
        let st = self.state.read().expect("state poisoned");
        if st.refreshed.is_none() {
            return Err("no LVM report yet".into());
        }
        if st.problems.is_empty() {
            Ok(())
        } else {
            Err(st.problems.join("; "))
        }
    }

    /// Per device class sizes, usage and counts for the metrics. Reads the
    /// in-memory state only: never runs lvm, never refreshes a dirty state.
    pub fn stats(&self) -> LvmStats {
        let (mut classes, report_age) = {
            let st = self.state.read().expect("state poisoned");
            let classes: Vec<ClassStats> = self
                .config
                .classes
                .iter()
                .map(|c| {
                    let vg = st.vgs.get(&c.volume_group);
                    let pool = c
                        .thin_pool
                        .as_ref()
                        .and_then(|p| st.lvs.get(&(c.volume_group.clone(), p.clone())))
                        .filter(|lv| lv.is_thin_pool());
                    let count = |kind: Kind| {
                        st.lvs
                            .values()
                            .filter(|lv| kind.key_of_lv(&lv.name).is_some())
                            .filter(|lv| self.class_of(lv).is_some_and(|o| o.name == c.name))
                            .count() as u64
                    };
                    ClassStats {
                        class: c.name.clone(),
                        vg: c.volume_group.clone(),
                        pool: c.thin_pool.clone(),
                        vg_size: vg.map(|v| v.size),
                        vg_free: vg.map(|v| v.free),
                        pool_size: pool.map(|p| p.size),
                        pool_data_percent: pool.and_then(|p| p.data_percent),
                        pool_metadata_percent: pool.and_then(|p| p.metadata_percent),
                        available: None,
                        volumes: count(Kind::Volume),
                        snapshots: count(Kind::Snapshot),
                    }
                })
                .collect();
            (classes, st.refreshed.map(|t| t.elapsed()))
        };
        // capacity_now takes the state lock itself.
        for (stats, class) in classes.iter_mut().zip(&self.config.classes) {
            stats.available = self.capacity_now(class).ok().map(|c| c.available);
        }
        LvmStats {
            classes,
            report_age,
        }
    }

    /// Device node of an LV.
    pub fn device_path(vg: &str, lv: &str) -> PathBuf {
        PathBuf::from(format!("/dev/{vg}/{lv}"))
    }

    /// Runs one report and applies it to the in-memory state (see
    /// [`State`]: changes this agent made while it ran are kept).
    pub async fn refresh(&self) -> Result<()> {
        let _one_at_a_time = self.refreshing.lock().await;
        let start = self.state.read().expect("state poisoned").generation;
        let cmd = self
            .lvm("fullreport")
            .args(["--reportformat", "json", "--units", "b", "--nosuffix"])
            .args(["--configreport", "vg", "-o", report::VG_FIELDS])
            .args(["--configreport", "lv", "-o", report::LV_FIELDS])
            .args(["--configreport", "pv", "-o", "pv_name"])
            .args(["--configreport", "pvseg", "-o", "pvseg_start"])
            .args(["--configreport", "seg", "-o", "segtype"])
            .args(self.config.volume_groups());
        // A missing VG makes lvm exit non-zero but still report the others.
        let out = self.runner.run_unchecked(&cmd).await?;
        let parsed: FullReport = match crate::runner::parse_json(&cmd, &out.stdout) {
            Ok(p) => p,
            Err(e) if out.code != 0 => {
                self.record_problems(vec![format!("lvm report failed: {}", out.stderr.trim())]);
                return Err(LvmError::Unavailable(format!(
                    "{e}; lvm said: {}",
                    out.stderr.trim()
                )));
            }
            Err(e) => return Err(e.into()),
        };
        let (vgs, lvs) = report::parse(parsed).map_err(|e| LvmError::Internal(e.to_string()))?;
        let mut st = self.write_state();
        st.apply_report(start, vgs, lvs);
        st.problems = self.check_config(&st);
        if !st.problems.is_empty() {
            tracing::warn!(problems = ?st.problems, "LVM configuration problems");
        }
        Ok(())
    }

    fn record_problems(&self, problems: Vec<String>) {
        let mut st = self.write_state();
        st.problems = problems;
        st.refreshed.get_or_insert_with(Instant::now);
    }

    fn check_config(&self, st: &State) -> Vec<String> {
        let mut problems = Vec::new();
        for c in &self.config.classes {
            if !st.vgs.contains_key(&c.volume_group) {
                problems.push(format!(
                    "device class {}: volume group {} not found",
                    c.name, c.volume_group
                ));
                continue;
            }
            if let Some(pool) = &c.thin_pool {
                match st.lvs.get(&(c.volume_group.clone(), pool.clone())) {
                    Some(lv) if lv.is_thin_pool() => {}
                    _ => problems.push(format!(
                        "device class {}: thin pool {}/{} not found",
                        c.name, c.volume_group, pool
                    )),
                }
            }
        }
        problems
    }

    /// At start: one report, then make every thin pool fail writes fast when
    /// full (instead of queueing I/O until hung) and zero new blocks. A pool
    /// that cannot be set (or is missing now) is not fatal here: every create
    /// in its class checks it again and refuses while it is unsafe.
    pub async fn start(&self) -> Result<()> {
        self.refresh().await?;
        for class in &self.config.classes {
            if class.is_thin() {
                if let Err(e) = self.ensure_pool_safe(class).await {
                    tracing::warn!(class = %class.name, error = %e, "thin pool not safe yet");
                }
            }
        }
        self.spawn_orphan_cleanup();
        Ok(())
    }

    /// Every LV named `prefix*` in the in-memory state.
    pub(super) fn lvs_named(&self, prefix: &str) -> Vec<Lv> {
        let st = self.state.read().expect("state poisoned");
        st.lvs
            .values()
            .filter(|l| l.name.starts_with(prefix))
            .cloned()
            .collect()
    }

    /// Before anything is created in a thin class: its pool must zero new
    /// blocks (else a new volume may read blocks another volume freed) and
    /// fail writes when full (else I/O queues until hung). Checked on the
    /// in-memory report (no lvm process when it is set, the usual case); set
    /// with one lvchange when it is not, e.g. for a pool made or changed
    /// after the start. A pool that cannot be set refuses new volumes.
    async fn ensure_pool_safe(&self, class: &DeviceClass) -> Result<()> {
        let Some(pool) = &class.thin_pool else {
            return Ok(());
        };
        let vg = &class.volume_group;
        let lv = self
            .lookup_class_lv(class, pool)
            .await?
            .filter(|l| l.is_thin_pool())
            .ok_or_else(|| {
                LvmError::Unavailable(format!(
                    "thin pool {vg}/{pool} of device class {} is not available",
                    class.name
                ))
            })?;
        let flags = pool_fixes(&lv);
        if flags.is_empty() {
            return Ok(());
        }
        tracing::info!(
            vg,
            pool,
            ?flags,
            "setting thin pool to error when full and zero new blocks"
        );
        let cmd = self.lvm("lvchange").args(flags).arg(format!("{vg}/{pool}"));
        if let Err(e) = self.runner.run(&cmd).await {
            self.mark_dirty();
            let e = LvmError::from(e);
            return Err(LvmError::Blocked(format!(
                "thin pool {vg}/{pool} of device class {} {}, and setting it failed ({e}); new \
                 volumes in this class are refused until the pool is set with `lvchange \
                 --zero y --errorwhenfull y {vg}/{pool}`",
                class.name,
                pool_problem(&lv),
            )));
        }
        crate::fail_point!("lvm.pool_safety.after_lvchange");
        self.update_lv(vg, pool, |l| {
            l.when_full = "error".into();
            l.zeroing = true;
            if l.attr.len() > 7 {
                l.attr.replace_range(7..8, "z");
            }
        });
        Ok(())
    }

    /// An LV of a class's VG; when it is missing from the in-memory state
    /// (a pool or VG made after the last report), one fresh report first,
    /// at most every few seconds.
    async fn lookup_class_lv(&self, class: &DeviceClass, name: &str) -> Result<Option<Lv>> {
        if let Some(lv) = self.lookup(&class.volume_group, name).await? {
            return Ok(Some(lv));
        }
        if let Err(e) = self.refresh_if_older(MISSING_REFRESH).await {
            tracing::debug!(error = %e, "looking again for a missing LV failed");
            return Ok(None);
        }
        self.lookup(&class.volume_group, name).await
    }

    /// Refreshes when the last report is older than `age`.
    async fn refresh_if_older(&self, age: Duration) -> Result<()> {
        let stale = {
            let st = self.state.read().expect("state poisoned");
            st.refreshed.is_none_or(|t| t.elapsed() >= age)
        };
        if stale {
            self.refresh().await?;
        }
        Ok(())
    }

    /// Refreshes periodically until the process ends.
    pub fn spawn_refresher(self: &Arc<Self>, every: Duration) {
        if every.is_zero() {
            return;
        }
        let agent = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(agent) = agent.upgrade() else { return };
                if let Err(e) = agent.refresh().await {
                    tracing::warn!(error = %e, "background LVM refresh failed");
                }
            }
        });
    }

    pub(super) fn mark_dirty(&self) {
        let mut st = self.write_state();
        st.generation += 1;
        st.dirty_at = st.generation;
        st.dirty = true;
    }

    async fn ensure_fresh(&self) -> Result<()> {
        let dirty = self.state.read().expect("state poisoned").dirty;
        if dirty {
            self.refresh().await?;
        }
        Ok(())
    }

    /// The LV, from the in-memory state (refreshed first only if dirty).
    pub async fn lookup(&self, vg: &str, lv: &str) -> Result<Option<Lv>> {
        self.ensure_fresh().await?;
        let st = self.state.read().expect("state poisoned");
        Ok(st.lvs.get(&(vg.to_string(), lv.to_string())).cloned())
    }

    /// Activates an LV that is not active (after a reboot, or a thin
    /// snapshot). One lvm process, only when needed.
    pub async fn activate(&self, vg: &str, lv: &str) -> Result<()> {
        let cmd = self
            .lvm("lvchange")
            .args(["--activate", "y", "--ignoreactivationskip"]);
        self.runner
            .run(&cmd.arg(format!("{vg}/{lv}")))
            .await
            .map_err(|e| {
                self.mark_dirty();
                LvmError::from(e)
            })?;
        let mut st = self.write_state();
        st.touch(vg, lv);
        if let Some(l) = st.lvs.get_mut(&(vg.to_string(), lv.to_string())) {
            let mut attr: Vec<char> = l.attr.chars().collect();
            if attr.len() > 4 {
                attr[4] = 'a';
                l.attr = attr.into_iter().collect();
            }
        }
        Ok(())
    }

    /// Zeroes a thick LV through BLKZEROOUT on an O_EXCL descriptor (which
    /// the kernel refuses while the LV is mounted, so a volume in use is never
    /// touched). The work runs in its own task: if the caller gives up (a
    /// gRPC deadline), it goes on, a retry meanwhile gets ABORTED, and a
    /// retry after it finishes does not zero again. A crash midway is
    /// harmless: the retry after restart zeroes from the start.
    pub(super) async fn zero(&self, lv: &Lv) -> Result<()> {
        let key = format!("{}/{}", lv.vg, lv.name);
        {
            let mut jobs = self.zeroing.lock().expect("zero jobs poisoned");
            match jobs.get(&key) {
                Some(ZeroJob::Done) => return Ok(()),
                Some(ZeroJob::Running) => {
                    return Err(LvmError::Busy(format!(
                        "{key} is still being zeroed before removal; retry later"
                    )))
                }
                None => jobs.insert(key.clone(), ZeroJob::Running),
            };
        }
        let dev = Self::device_path(&lv.vg, &lv.name);
        let jobs = self.zeroing.clone();
        let job_key = key.clone();
        let started = Instant::now();
        let task = tokio::task::spawn_blocking(move || {
            let result = blockdev::open_exclusive(&dev).and_then(|f| blockdev::zero_all(&f, &dev));
            let mut jobs = jobs.lock().expect("zero jobs poisoned");
            match &result {
                Ok(_) => jobs.insert(job_key, ZeroJob::Done),
                Err(_) => jobs.remove(&job_key),
            };
            result
        });
        let zeroed = task
            .await
            .map_err(|e| LvmError::Internal(format!("zeroing task failed: {e}")))??;
        tracing::debug!(lv = %key, zeroed, elapsed = ?started.elapsed(), "zeroed thick LV");
        Ok(())
    }

    /// Drops the record that an LV was zeroed (it is gone, or may hold new
    /// data: the next removal attempt zeroes again).
    pub(super) fn forget_zeroed(&self, vg: &str, lv: &str) {
        self.zeroing
            .lock()
            .expect("zero jobs poisoned")
            .remove(&format!("{vg}/{lv}"));
    }

    /// A blank LV: thin in the class's pool, or thick (signatures wiped and
    /// the start zeroed, so a leftover filesystem is never adopted; old data
    /// is zeroed when LVs are removed).
    pub(super) async fn create_blank(&self, class: &DeviceClass, spec: &LvSpec) -> Result<Lv> {
        let mut cmd = self.lvm("lvcreate").args(["--name", &spec.name, "--yes"]);
        for tag in &spec.tags {
            cmd = cmd.args(["--addtag", tag]);
        }
        let size = format!("{}b", spec.size);
        cmd = match &class.thin_pool {
            Some(pool) => cmd
                .args(["--virtualsize", &size, "--thinpool"])
                .arg(format!("{}/{pool}", class.volume_group)),
            None => cmd
                .args(["--size", &size, "--wipesignatures", "y", "--zero", "y"])
                .arg(&class.volume_group),
        };
        if let Some(existing) = self
            .run_create(&cmd, &class.volume_group, &spec.name)
            .await?
        {
            return Ok(existing);
        }
        crate::fail_point!("lvm.create.after_lvcreate");
        let attr = if class.is_thin() {
            "Vwi-a-tz--"
        } else {
            "-wi-a-----"
        };
        Ok(self.remember(class, new_lv(class, spec, spec.size, attr)))
    }

    /// A thin snapshot of an LV in the same pool: read-only and inactive for
    /// a CSI snapshot, writable and active for a restore or clone (grown
    /// afterwards when a larger size was asked for).
    async fn create_thin_snapshot(
        &self,
        class: &DeviceClass,
        spec: &LvSpec,
        origin: &Origin,
    ) -> Result<Lv> {
        let vg = &class.volume_group;
        let origin_lv = self.lookup(vg, &origin.lv).await?.ok_or_else(|| {
            LvmError::LvMissing(format!("the source LV {vg}/{} no longer exists", origin.lv))
        })?;
        let mut cmd = self
            .lvm("lvcreate")
            .args(["--snapshot", "--name", &spec.name, "--yes"]);
        for tag in &spec.tags {
            cmd = cmd.args(["--addtag", tag]);
        }
        // A restore or clone into a larger size is created at the source's
        // size and grown next; the tag records the size it is to have, so a
        // retry after a crash in between finishes the growth.
        let grows = !spec.read_only && spec.size > origin_lv.size;
        let size_tag = ids::size_tag(spec.size);
        if grows && !ids::has_tag(&spec.tags, &size_tag) {
            cmd = cmd.args(["--addtag", &size_tag]);
        }
        cmd = if spec.read_only {
            cmd.args([
                "--permission",
                "r",
                "--setactivationskip",
                "y",
                "--activate",
                "n",
            ])
        } else {
            cmd.args([
                "--permission",
                "rw",
                "--setactivationskip",
                "n",
                "--activate",
                "y",
            ])
        };
        let cmd = cmd.arg(format!("{vg}/{}", origin.lv));
        let lv = match self.run_create(&cmd, vg, &spec.name).await? {
            Some(existing) => existing,
            None => {
                let attr = if spec.read_only {
                    "Vri---tz-k"
                } else {
                    "Vwi-a-tz--"
                };
                let mut lv = new_lv(class, spec, origin_lv.size, attr);
                if grows && !ids::has_tag(&lv.tags, &size_tag) {
                    lv.tags.push(size_tag);
                }
                self.remember(class, lv)
            }
        };
        if !spec.read_only && spec.size > lv.size {
            crate::fail_point!("lvm.thin_clone.after_snapshot");
            return self.lvm_extend(&class.name, &spec.name, spec.size).await;
        }
        Ok(lv)
    }

    /// Runs an lvcreate. On "already exists" (an earlier attempt this
    /// process did not see) returns what is there; on other failures marks
    /// the state dirty and maps the error.
    pub(super) async fn run_create(&self, cmd: &Cmd, vg: &str, name: &str) -> Result<Option<Lv>> {
        let Err(e) = self.runner.run(cmd).await else {
            return Ok(None);
        };
        let err = LvmError::from(e);
        self.mark_dirty();
        if let LvmError::AlreadyExists(_) = err {
            if let Some(lv) = self.lookup(vg, name).await? {
                return Ok(Some(lv));
            }
        }
        Err(err)
    }

    /// Records a new LV in the in-memory state (and the VG space it took).
    pub(super) fn remember(&self, class: &DeviceClass, lv: Lv) -> Lv {
        let mut st = self.write_state();
        st.touch(&lv.vg, &lv.name);
        if !class.is_thin() {
            if let Some(vg) = st.vgs.get_mut(&class.volume_group) {
                vg.free = vg.free.saturating_sub(lv.size);
            }
        }
        st.lvs.insert((lv.vg.clone(), lv.name.clone()), lv.clone());
        lv
    }

    /// Forgets a removed LV (and gives its space back to the VG).
    pub(super) fn forget(&self, vg: &str, name: &str) {
        let mut st = self.write_state();
        st.touch(vg, name);
        if let Some(lv) = st.lvs.remove(&(vg.to_string(), name.to_string())) {
            if lv.pool.is_none() {
                if let Some(vg) = st.vgs.get_mut(vg) {
                    vg.free += lv.size;
                }
            }
        }
    }

    /// Edits an LV's tags and attributes in the in-memory state.
    pub(super) fn update_lv(&self, vg: &str, name: &str, f: impl FnOnce(&mut Lv)) {
        let mut st = self.write_state();
        st.touch(vg, name);
        if let Some(lv) = st.lvs.get_mut(&(vg.to_string(), name.to_string())) {
            f(lv);
        }
    }

    pub(super) fn extent_size_of(&self, vg: &str) -> Result<u64> {
        let st = self.state.read().expect("state poisoned");
        st.vgs
            .get(vg)
            .map(|v| v.extent_size)
            .ok_or_else(|| LvmError::Unavailable(format!("volume group {vg} is not available")))
    }

    pub(super) fn class_of(&self, lv: &Lv) -> Option<&DeviceClass> {
        let ours = [Kind::Volume, Kind::Snapshot]
            .iter()
            .any(|k| k.key_of_lv(&lv.name).is_some());
        if lv.is_thin_pool() || !ours {
            return None;
        }
        self.config
            .classes
            .iter()
            .find(|c| c.volume_group == lv.vg && c.thin_pool.as_deref() == lv.pool.as_deref())
    }

    pub(super) fn capacity_now(&self, class: &DeviceClass) -> Result<ClassCapacity> {
        let st = self.state.read().expect("state poisoned");
        capacity_in(&st, class)
    }
}

/// The inventory stream (see [`crate::lvm::inventory`] for the protocol).
impl LocalAgent {
    /// The update a watcher gets now: everything (`since` None), or the
    /// changes after generation `since`. Read under one lock, so its
    /// contents are exactly the copy at its generation.
    fn inventory_update(&self, since: Option<u64>) -> Update {
        let st = self.state.read().expect("state poisoned");
        let mut u = Update {
            epoch: self.epoch.clone(),
            generation: st.generation,
            full: since.is_none(),
            problems: st.problems.clone(),
            ..Update::default()
        };
        let ours = |lv: &Lv| {
            ids::is_own(lv)
                .then(|| self.class_of(lv))
                .flatten()
                .map(|c| (c.name.clone(), lv.clone()))
        };
        match since {
            None => u.lvs = st.lvs.values().filter_map(ours).collect(),
            Some(since) => {
                for (key, _) in st.changed.iter().filter(|(_, g)| **g > since) {
                    match st.lvs.get(key).and_then(ours) {
                        Some(found) => u.lvs.push(found),
                        // Gone, or no longer ours: gone from every class of
                        // its VG (removing what is absent is a no-op).
                        None if key_is_ours(&key.1) => {
                            for c in self.config.classes.iter() {
                                if c.volume_group == key.0 {
                                    u.removed.push((c.name.clone(), key.1.clone()));
                                }
                            }
                        }
                        None => {}
                    }
                }
            }
        }
        u.classes = self
            .config
            .classes
            .iter()
            .filter_map(|c| Some((c.name.clone(), capacity_in(&st, c).ok()?)))
            .collect();
        u
    }

    /// Where a watch starts: after the watcher's cursor when this process
    /// still knows every change since it, else from scratch.
    fn resumable(&self, cursor: Option<&Stamp>) -> Option<u64> {
        let c = cursor?;
        let st = self.state.read().expect("state poisoned");
        (c.epoch == self.epoch && c.generation >= st.horizon && c.generation <= st.generation)
            .then_some(c.generation)
    }

    /// One watcher's stream: the first update, then an update whenever the
    /// generation moves, and heartbeats. Ends when the watcher goes.
    fn inventory_stream(self: Arc<Self>, request: WatchRequest) -> Updates {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Update>>(4);
        let mut changes = self.changes.subscribe();
        let agent = Arc::downgrade(&self);
        let mut since = self.resumable(request.cursor.as_ref());
        tracing::info!(
            resumed_from = ?since, heartbeat = ?request.heartbeat,
            "agent: inventory watch opened"
        );
        drop(self);
        tokio::spawn(async move {
            loop {
                let Some(me) = agent.upgrade() else { return };
                // Never send a state this agent itself distrusts.
                if me.state.read().expect("state poisoned").dirty {
                    if let Err(e) = me.refresh().await {
                        tracing::warn!(error = %e, "inventory: refresh before sending failed");
                    }
                }
                changes.borrow_and_update();
                let update = me.inventory_update(since);
                drop(me);
                since = Some(update.generation);
                if tx.send(Ok(update)).await.is_err() {
                    return;
                }
                // Until the generation moves, heartbeats.
                loop {
                    tokio::select! {
                        moved = changes.changed() => {
                            if moved.is_err() {
                                return;
                            }
                            break;
                        }
                        _ = tokio::time::sleep(request.heartbeat) => {
                            let Some(me) = agent.upgrade() else { return };
                            // A class whose VG or pool is missing is looked
                            // for again (a pool made after the start shows
                            // up within a few heartbeats, not a refresh
                            // period); a change it finds is sent next.
                            let missing = me
                                .config
                                .classes
                                .iter()
                                .any(|c| me.capacity_now(c).is_err());
                            if missing && me.refresh_if_older(MISSING_REFRESH).await.is_ok() {
                                let moved = *changes.borrow() != since.unwrap_or(0);
                                if moved {
                                    break;
                                }
                            }
                            let beat = me.inventory_update(since);
                            drop(me);
                            if !beat.is_heartbeat() {
                                // A change slipped in: send it as such.
                                since = Some(beat.generation);
                            }
                            if tx.send(Ok(beat)).await.is_err() {
                                return;
                            }
                        }
                        _ = tx.closed() => return,
                    }
                }
            }
        });
        Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
    }
}

/// Whether an LV name is one of Lodestone's (a volume's or a snapshot's).
fn key_is_ours(name: &str) -> bool {
    [Kind::Volume, Kind::Snapshot]
        .iter()
        .any(|k| k.key_of_lv(name).is_some())
}

/// A class's capacity in a copy of the LVM state.
fn capacity_in(st: &State, class: &DeviceClass) -> Result<ClassCapacity> {
    {
        let vg = st.vgs.get(&class.volume_group).ok_or_else(|| {
            LvmError::Unavailable(format!(
                "volume group {} of device class {} is not available",
                class.volume_group, class.name
            ))
        })?;
        let Some(pool_name) = &class.thin_pool else {
            return Ok(ClassCapacity {
                available: vg.free.saturating_sub(class.spare_bytes),
                extent_size: vg.extent_size,
                pool_full: false,
                total: vg.size,
                used_percent: percent(vg.size - vg.free.min(vg.size), vg.size),
            });
        };
        let pool = st
            .lvs
            .get(&(vg.name.clone(), pool_name.clone()))
            .ok_or_else(|| {
                LvmError::Unavailable(format!(
                    "thin pool {}/{pool_name} is not available",
                    vg.name
                ))
            })?;
        let promised: u64 = st
            .lvs
            .values()
            .filter(|l| l.vg == vg.name && l.pool.as_deref() == Some(pool_name))
            .map(|l| l.size)
            .sum();
        let used_percent = pool.data_percent.unwrap_or(0.0);
        let pool_full = used_percent >= class.pool_full_threshold_percent;
        let limit =
            (pool.size.saturating_sub(class.spare_bytes) as f64 * class.overprovision_ratio) as u64;
        Ok(ClassCapacity {
            available: if pool_full {
                0
            } else {
                limit.saturating_sub(promised)
            },
            extent_size: vg.extent_size,
            pool_full,
            total: pool.size,
            used_percent,
        })
    }
}

/// How often at most a VG or thin pool missing from the in-memory state
/// triggers a fresh report (it may have been made after the last one).
const MISSING_REFRESH: Duration = Duration::from_secs(2);

/// The lvchange flags a thin pool needs to zero new blocks and fail writes
/// when full (none when it does both).
fn pool_fixes(pool: &Lv) -> Vec<&'static str> {
    let mut flags = Vec::new();
    if pool.when_full != "error" {
        flags.extend(["--errorwhenfull", "y"]);
    }
    if !pool.zeroing {
        flags.extend(["--zero", "y"]);
    }
    flags
}

fn pool_problem(pool: &Lv) -> &'static str {
    match (pool.zeroing, pool.when_full == "error") {
        (false, false) => "does not zero new blocks nor fail writes when full",
        (false, true) => "does not zero new blocks",
        _ => "does not fail writes when full",
    }
}

fn percent(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 * 100.0 / whole as f64
    }
}

fn new_lv(class: &DeviceClass, spec: &LvSpec, size: u64, attr: &str) -> Lv {
    Lv {
        vg: class.volume_group.clone(),
        name: spec.name.clone(),
        size,
        attr: attr.to_string(),
        tags: spec.tags.clone(),
        pool: class.thin_pool.clone(),
        data_percent: class.is_thin().then_some(0.0),
        metadata_percent: None,
        when_full: String::new(),
        zeroing: false,
        created: Some(now_epoch()),
    }
}

fn now_epoch() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The mutations, as LVM sees them (the [`Agent`] impl stamps them).
impl LocalAgent {
    async fn lvm_create(&self, spec: &LvSpec) -> Result<Lv> {
        let class = self.class(&spec.class)?.clone();
        let extent = self.extent_size_of(&class.volume_group)?;
        if spec.size == 0 || spec.size % extent != 0 {
            return Err(LvmError::Internal(format!(
                "size {} is not a whole number of {extent}-byte extents",
                spec.size
            )));
        }
        self.ensure_pool_safe(&class).await?;
        if let Some(pull) = &spec.pull {
            return self.create_pull(&class, spec, pull).await;
        }
        match &spec.origin {
            None => self.create_blank(&class, spec).await,
            Some(o) if class.is_thin() && o.class == class.name => {
                self.create_thin_snapshot(&class, spec, o).await
            }
            Some(o) => self.create_copy(&class, spec, o).await,
        }
    }

    async fn lvm_remove(&self, class: &str, lv_name: &str) -> Result<()> {
        let class = self.class(class)?.clone();
        let Some(lv) = self.lookup(&class.volume_group, lv_name).await? else {
            return Ok(());
        };
        // Never while this node still shows it mounted (a staged or
        // published raw block volume holds no open count LVM could see).
        if lv.is_active() {
            let dev = Self::device_path(&lv.vg, &lv.name);
            if let Some(at) = crate::host::mount::mounts_of(&dev)?.first() {
                return Err(LvmError::InUse(format!(
                    "{}/{} is still mounted at {}; unpublish and unstage it first",
                    lv.vg,
                    lv.name,
                    at.display()
                )));
            }
        }
        // A copy into this LV stops first (and removes its own temporary
        // snapshot); the caller retries. Not while another node reads it.
        self.cancel_copy(&lv)?;
        let _removal = self.begin_removal(&lv)?;
        if !class.is_thin() {
            self.remove_cuts_of(&lv).await?;
            // Zero the data before the extents go back to the VG (a
            // read-only snapshot is made writable for that first).
            if !lv.is_active() {
                self.activate(&lv.vg, &lv.name).await?;
            }
            if lv.is_read_only() {
                let cmd = self.lvm("lvchange").args(["--permission", "rw"]);
                self.runner
                    .run(&cmd.arg(format!("{}/{}", lv.vg, lv.name)))
                    .await
                    .map_err(LvmError::from)?;
                self.update_lv(&lv.vg, &lv.name, |l| l.attr.replace_range(1..2, "w"));
            }
            self.zero(&lv).await?;
        }
        let cmd = self
            .lvm("lvremove")
            .arg("--yes")
            .arg(format!("{}/{}", lv.vg, lv.name));
        crate::fail_point!("lvm.delete.before_lvremove");
        let removed = self.runner.run(&cmd).await.map_err(LvmError::from);
        // Success or not, the zeroing record goes: should the removal have
        // failed, the LV was still in use and may hold new data, so the next
        // attempt zeroes again.
        self.forget_zeroed(&lv.vg, &lv.name);
        match removed {
            Ok(_) | Err(LvmError::LvMissing(_)) => {}
            Err(e) => {
                self.mark_dirty();
                return Err(e);
            }
        }
        self.forget(&lv.vg, &lv.name);
        crate::fail_point!("lvm.delete.after_lvremove");
        self.remove_temp_of(&lv).await
    }

    async fn lvm_extend(&self, class: &str, lv_name: &str, size: u64) -> Result<Lv> {
        let class = self.class(class)?.clone();
        let lv = self
            .lookup(&class.volume_group, lv_name)
            .await?
            .ok_or_else(|| LvmError::LvMissing(format!("volume {lv_name} does not exist")))?;
        if size <= lv.size {
            return Ok(lv);
        }
        let cmd = self
            .lvm("lvextend")
            .args(["--size", &format!("{size}b")])
            .arg(format!("{}/{}", lv.vg, lv.name));
        if let Err(e) = self.runner.run(&cmd).await {
            // An lvextend of an earlier attempt may have got there first:
            // one left running by a process killed mid-call (a started
            // command runs to its end) commits while this one waits for the
            // VG lock, and this one then fails on a size already reached.
            // What counts is the LV's size as LVM reports it now.
            self.mark_dirty();
            let err = LvmError::from(e);
            return match self.lookup(&lv.vg, &lv.name).await? {
                Some(now) if now.size >= size => {
                    tracing::info!(vg = %lv.vg, lv = %lv.name, size = now.size,
                        "already at the requested size (an earlier attempt's lvextend finished)");
                    Ok(now)
                }
                _ => Err(err),
            };
        }
        crate::fail_point!("lvm.expand.after_lvextend");
        let mut st = self.write_state();
        st.touch(&lv.vg, &lv.name);
        if !class.is_thin() {
            if let Some(vg) = st.vgs.get_mut(&lv.vg) {
                vg.free = vg.free.saturating_sub(size - lv.size);
            }
        }
        let entry = st.lvs.entry((lv.vg.clone(), lv.name.clone())).or_insert(lv);
        entry.size = size;
        Ok(entry.clone())
    }
}

#[tonic::async_trait]
impl Agent for LocalAgent {
    fn node(&self) -> &str {
        &self.node
    }

    async fn create(&self, spec: &LvSpec) -> Result<Stamped<Lv>> {
        let lv = self.lvm_create(spec).await?;
        Ok(self.stamped_lv(lv))
    }

    async fn remove(&self, class: &str, lv_name: &str) -> Result<Stamp> {
        self.lvm_remove(class, lv_name).await?;
        let vg = &self.class(class)?.volume_group;
        Ok(self.stamp_of(vg, lv_name))
    }

    async fn extend(&self, class: &str, lv_name: &str, size: u64) -> Result<Stamped<Lv>> {
        let lv = self.lvm_extend(class, lv_name, size).await?;
        Ok(self.stamped_lv(lv))
    }

    async fn find(&self, class: &str, lv: &str) -> Result<Option<Lv>> {
        let class = self.class(class)?;
        let found = self.lookup(&class.volume_group, lv).await?;
        Ok(found.filter(|l| l.pool.as_deref() == class.thin_pool.as_deref()))
    }

    async fn list(&self) -> Result<Vec<(String, Lv)>> {
        self.ensure_fresh().await?;
        let st = self.state.read().expect("state poisoned");
        Ok(st
            .lvs
            .values()
            .filter_map(|lv| self.class_of(lv).map(|c| (c.name.clone(), lv.clone())))
            .collect())
    }

    async fn capacity(&self, class: &str) -> Result<ClassCapacity> {
        let class = self.class(class)?;
        self.ensure_fresh().await?;
        match self.capacity_now(class) {
            // Made after the last report? Look once more (rate-limited).
            Err(LvmError::Unavailable(e)) => {
                // A failed report changes nothing: the answer stays.
                if self.refresh_if_older(MISSING_REFRESH).await.is_err() {
                    return Err(LvmError::Unavailable(e));
                }
                self.capacity_now(class)
            }
            r => r,
        }
    }

    async fn resume(
        &self,
        class: &str,
        lv: &str,
        pull: Option<&Pull>,
    ) -> Result<Stamped<Option<Lv>>> {
        let vg = self.class(class)?.volume_group.clone();
        Ok(match self.resume_copy(class, lv, pull).await? {
            Some(found) => {
                let done = self.stamped_lv(found);
                Stamped {
                    value: Some(done.value),
                    stamp: done.stamp,
                }
            }
            None => Stamped {
                value: None,
                stamp: self.stamp_of(&vg, lv),
            },
        })
    }

    async fn copy_progress(&self, class: &str, lv: &str) -> Option<(String, bool)> {
        let vg = &self.class(class).ok()?.volume_group;
        if let Ok(Some(l)) = self.lookup(vg, lv).await {
            if ids::has_tag(&l.tags, ids::TAG_COPY_FAILED) {
                let memory = self.describe_copy(vg, lv).unwrap_or_default();
                return Some((
                    format!(
                        "the copy into {vg}/{lv} failed and cannot be resumed (its point in \
                         time is lost{}); delete it and create it again",
                        if memory.is_empty() {
                            String::new()
                        } else {
                            format!(": {memory}")
                        }
                    ),
                    true,
                ));
            }
        }
        let message = self.describe_copy(vg, lv)?;
        Some((message, self.copy_failed_for_good(vg, lv)))
    }

    async fn watch(&self, request: WatchRequest) -> Result<Updates> {
        let me = self
            .me
            .upgrade()
            .ok_or_else(|| LvmError::Unavailable("the agent is stopping".into()))?;
        Ok(me.inventory_stream(request))
    }

    async fn block_map(&self, class: &str, lv: &str, base: Option<&str>) -> Result<BlockMap> {
        self.read_block_map(class, lv, base).await
    }

    async fn grant(&self, class: &str, lv: &str, node: &str) -> Result<()> {
        self.grant_read(class, lv, node).await
    }
}

/// Adds the LVM gauges (`lodestone_lvm_*`) to the registry: read from
/// [`LocalAgent::stats`] at each scrape, so a scrape never runs lvm.
pub fn register_metrics(
    registry: &mut prometheus_client::registry::Registry,
    agent: Arc<LocalAgent>,
) {
    registry.register_collector(Box::new(LvmGauges(agent)));
}

struct LvmGauges(Arc<LocalAgent>);

impl std::fmt::Debug for LvmGauges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LvmGauges")
    }
}

/// One gauge family from (labels, value) rows; none at all without rows.
fn gauges<L, V>(
    encoder: &mut prometheus_client::encoding::DescriptorEncoder,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (L, V)>,
) -> std::fmt::Result
where
    L: prometheus_client::encoding::EncodeLabelSet,
    V: prometheus_client::encoding::EncodeGaugeValue,
{
    use prometheus_client::encoding::EncodeMetric;
    use prometheus_client::metrics::{gauge::ConstGauge, MetricType};
    let mut rows = rows.into_iter().peekable();
    if rows.peek().is_none() {
        return Ok(());
    }
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, value) in rows {
        ConstGauge::new(value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

impl prometheus_client::collector::Collector for LvmGauges {
    fn encode(&self, mut out: prometheus_client::encoding::DescriptorEncoder) -> std::fmt::Result {
        let stats = self.0.stats();
        let cs = &stats.classes;
        let cv = |c: &ClassStats| [("class", c.class.clone()), ("vg", c.vg.clone())];
        let cvp = |c: &ClassStats| {
            let pool = c.pool.clone().unwrap_or_default();
            [
                ("class", c.class.clone()),
                ("vg", c.vg.clone()),
                ("pool", pool),
            ]
        };
        let by_class =
            |f: fn(&ClassStats) -> Option<u64>| cs.iter().filter_map(move |c| Some((cv(c), f(c)?)));
        let by_pool = |f: fn(&ClassStats) -> Option<u64>| {
            cs.iter().filter_map(move |c| Some((cvp(c), f(c)?)))
        };
        let percent = |f: fn(&ClassStats) -> Option<f64>| {
            cs.iter().filter_map(move |c| Some((cvp(c), f(c)?)))
        };
        gauges(
            &mut out,
            "lodestone_lvm_vg_size_bytes",
            "Size of the device class's volume group.",
            by_class(|c| c.vg_size),
        )?;
        gauges(
            &mut out,
            "lodestone_lvm_vg_free_bytes",
            "Unallocated bytes in the device class's volume group.",
            by_class(|c| c.vg_free),
        )?;
        gauges(
            &mut out,
            "lodestone_lvm_thin_pool_size_bytes",
            "Size of the thin pool of a thin device class.",
            by_pool(|c| c.pool_size),
        )?;
        gauges(
            &mut out,
            "lodestone_lvm_thin_pool_data_percent",
            "Percent of the thin pool's data space in use (as of the last LVM report).",
            percent(|c| c.pool_data_percent),
        )?;
        gauges(
            &mut out,
            "lodestone_lvm_thin_pool_metadata_percent",
            "Percent of the thin pool's metadata space in use (as of the last LVM report).",
            percent(|c| c.pool_metadata_percent),
        )?;
        gauges(
            &mut out,
            "lodestone_lvm_available_bytes",
            "Bytes a new volume of the device class may take now (what GetCapacity reports).",
            by_class(|c| c.available),
        )?;
        gauges(
            &mut out,
            "lodestone_lvm_volumes",
            "Volumes of the device class on this node.",
            by_pool(|c| c.vg_size.map(|_| c.volumes)),
        )?;
        gauges(
            &mut out,
            "lodestone_lvm_snapshots",
            "Snapshots of the device class on this node.",
            by_pool(|c| c.vg_size.map(|_| c.snapshots)),
        )?;
        gauges(
            &mut out,
            "lodestone_lvm_report_age_seconds",
            "Seconds since the last full LVM report (mutations update the state in between).",
            stats
                .report_age
                .map(|age| ([] as [(&str, &str); 0], age.as_secs())),
        )
    }
}

#[cfg(test)]
mod metrics_tests {
    use super::*;

    /// The gauges of a thin class whose VG and pool are in the report, and
    /// none at all for a class whose VG is missing; no command runs.
    #[test]
    fn lvm_gauges_come_from_memory() {
        let config = LvmConfig::load(None, &["thin=vg0/pool0".into(), "gone=vg9".into()]);
        let runner = Arc::new(Runner::new(Duration::from_secs(5)));
        let options = AgentOptions {
            udev: false,
            copy_wait: Duration::from_secs(1),
            checkpoint_every: Duration::from_secs(1),
        };
        let agent = LocalAgent::new("n1".into(), config.unwrap(), runner.clone(), options);
        let mut registry = prometheus_client::registry::Registry::default();
        register_metrics(&mut registry, agent.clone());
        let page = || {
            let mut page = String::new();
            prometheus_client::encoding::prometheus_text::encode(&mut page, &registry).unwrap();
            page
        };
        assert_eq!(page(), "", "nothing known before the first report");
        {
            let mut st = agent.state.write().unwrap();
            let vg = Vg {
                name: "vg0".into(),
                size: 2 << 30,
                free: 1 << 20,
                extent_size: 4 << 20,
            };
            st.vgs.insert("vg0".into(), vg);
            let pool = Lv {
                vg: "vg0".into(),
                name: "pool0".into(),
                size: 1 << 30,
                attr: "twi-aotz--".into(),
                tags: Vec::new(),
                pool: None,
                data_percent: Some(12.5),
                metadata_percent: None,
                when_full: String::new(),
                zeroing: false,
                created: None,
            };
            st.lvs.insert(("vg0".into(), "pool0".into()), pool);
            st.refreshed = Some(Instant::now());
        }
        let page = page();
        let cvp = "{class=\"thin\",vg=\"vg0\",pool=\"pool0\"}";
        for line in [
            "# TYPE lodestone_lvm_vg_size_bytes gauge\n".to_string(),
            "lodestone_lvm_vg_size_bytes{class=\"thin\",vg=\"vg0\"} 2147483648\n".into(),
            "lodestone_lvm_vg_free_bytes{class=\"thin\",vg=\"vg0\"} 1048576\n".into(),
            format!("lodestone_lvm_thin_pool_size_bytes{cvp} 1073741824\n"),
            format!("lodestone_lvm_thin_pool_data_percent{cvp} 12.5\n"),
            format!("lodestone_lvm_volumes{cvp} 0\n"),
            format!("lodestone_lvm_snapshots{cvp} 0\n"),
            "lodestone_lvm_report_age_seconds 0\n".into(),
        ] {
            assert!(page.contains(&line), "no {line:?} in\n{page}");
        }
        assert!(!page.contains("metadata_percent"), "{page}");
        assert!(!page.contains("vg9"), "{page}");
        assert!(runner.spawn_counts().is_empty(), "a scrape ran a command");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lv(vg: &str, name: &str, size: u64, attr: &str, pool: Option<&str>) -> Lv {
        Lv {
            vg: vg.into(),
            name: name.into(),
            size,
            attr: attr.into(),
            tags: Vec::new(),
            pool: pool.map(String::from),
            data_percent: None,
            metadata_percent: None,
            when_full: String::new(),
            zeroing: false,
            created: None,
        }
    }

    fn vg(name: &str, free: u64) -> Vg {
        Vg {
            name: name.into(),
            size: 1 << 30,
            free,
            extent_size: 4 << 20,
        }
    }

    /// A report that started before this agent's own create, remove or
    /// change finished does not undo it; LVs nobody here touched since
    /// are taken from the report (changes made by someone else), and so
    /// is the dirty flag unless it was set after the report started.
    /// An agent with one thin class (vg0/pool0) and one thick class (vg1),
    /// its copy of LVM filled by hand (no lvm runs).
    fn agent_with_state() -> Arc<LocalAgent> {
        let config = LvmConfig::load(None, &["thin=vg0/pool0".into(), "thick=vg1".into()]);
        let runner = Arc::new(Runner::new(Duration::from_secs(5)));
        let options = AgentOptions {
            udev: false,
            copy_wait: Duration::from_secs(1),
            checkpoint_every: Duration::from_secs(1),
        };
        let agent = LocalAgent::new("n1".into(), config.unwrap(), runner, options);
        {
            let mut st = agent.write_state();
            let mut pool = lv("vg0", "pool0", 1 << 30, "twi-aotz--", None);
            pool.data_percent = Some(1.0);
            st.apply_report(
                0,
                vec![vg("vg0", 1 << 30), vg("vg1", 4 << 30)],
                vec![pool, ours("vg1", "a", None)],
            );
        }
        agent
    }

    /// A volume LV of ours named after `seed`.
    fn ours(vg: &str, seed: &str, pool: Option<&str>) -> Lv {
        let name = Kind::Volume.lv_name(&Kind::Volume.key_for_name(seed));
        let attr = if pool.is_some() {
            "Vwi-a-tz--"
        } else {
            "-wi-a-----"
        };
        let mut l = lv(vg, &name, 64 << 20, attr, pool);
        l.tags = ids::tags(Kind::Volume, seed, "d", None, false);
        l
    }

    fn names(lvs: &[(String, Lv)]) -> Vec<(String, String)> {
        let mut v: Vec<_> = lvs
            .iter()
            .map(|(c, l)| (c.clone(), l.name.clone()))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn inventory_is_full_then_only_what_changed() {
        let agent = agent_with_state();
        let full = agent.inventory_update(None);
        assert!(full.full);
        assert_eq!(
            names(&full.lvs),
            [("thick".into(), ours("vg1", "a", None).name)]
        );
        let classes: Vec<&str> = full.classes.iter().map(|(c, _)| c.as_str()).collect();
        assert_eq!(classes, ["thin", "thick"]);
        let g = full.generation;

        // Nothing since: a heartbeat.
        assert!(agent.inventory_update(Some(g)).is_heartbeat());

        // Our create and our remove, each with its exact stamp.
        let thin = agent.config.class("thin").unwrap().clone();
        let b = agent.remember(&thin, ours("vg0", "b", Some("pool0")));
        let done = agent.stamped_lv(b.clone());
        assert_eq!(done.stamp.generation, g + 1);
        agent.forget("vg1", &ours("vg1", "a", None).name);
        let removed = agent.stamp_of("vg1", &ours("vg1", "a", None).name);
        assert_eq!(removed.generation, g + 2);

        let delta = agent.inventory_update(Some(g));
        assert!(!delta.full);
        assert_eq!(names(&delta.lvs), [("thin".into(), b.name.clone())]);
        // Gone from every class of its VG.
        assert_eq!(
            delta.removed,
            [("thick".into(), ours("vg1", "a", None).name)]
        );
        // From a later cursor, only the later change.
        let later = agent.inventory_update(Some(g + 1));
        assert!(later.lvs.is_empty());
        assert_eq!(later.removed.len(), 1);
    }

    #[test]
    fn a_watch_resumes_only_from_this_process_and_within_memory() {
        let agent = agent_with_state();
        let now = agent.stamp_of("vg1", "nothing");
        assert_eq!(agent.resumable(Some(&now)), Some(now.generation));
        let other = Stamp {
            epoch: "another process".into(),
            generation: now.generation,
        };
        assert_eq!(agent.resumable(Some(&other)), None);
        let future = Stamp {
            generation: now.generation + 5,
            ..now.clone()
        };
        assert_eq!(agent.resumable(Some(&future)), None);
        agent.write_state().horizon = now.generation + 1;
        assert_eq!(
            agent.resumable(Some(&now)),
            None,
            "older than what it remembers"
        );
        assert_eq!(agent.resumable(None), None);
    }

    #[test]
    fn a_report_started_before_a_create_sends_no_removal() {
        let agent = agent_with_state();
        let start = agent.stamp_of("vg0", "x").generation;
        let thin = agent.config.class("thin").unwrap().clone();
        // The create lands while the report runs; the report misses it.
        let b = agent.remember(&thin, ours("vg0", "b", Some("pool0")));
        let before_report = agent.stamp_of("vg0", "x").generation;
        {
            let mut pool = lv("vg0", "pool0", 1 << 30, "twi-aotz--", None);
            pool.data_percent = Some(1.0);
            let mut st = agent.write_state();
            st.apply_report(
                start,
                vec![vg("vg0", 1 << 30), vg("vg1", 4 << 30)],
                vec![pool, ours("vg1", "a", None)],
            );
        }
        let delta = agent.inventory_update(Some(before_report));
        assert!(delta.removed.is_empty(), "{:?}", delta.removed);
        assert!(delta.lvs.is_empty());
        assert_eq!(
            agent.inventory_update(None).lvs.len(),
            2,
            "the new LV stays in the copy"
        );
        assert!(agent.stamped_lv(b).value.pool.is_some());
    }

    #[test]
    fn a_report_sends_what_others_changed_but_not_usage_noise() {
        let agent = agent_with_state();
        let g = agent.stamp_of("vg1", "x").generation;
        let report = |thin_usage: f64, with_a: bool| {
            let mut pool = lv("vg0", "pool0", 1 << 30, "twi-aotz--", None);
            pool.data_percent = Some(1.0);
            let mut b = ours("vg0", "b", Some("pool0"));
            b.data_percent = Some(thin_usage);
            let mut lvs = vec![pool, b];
            if with_a {
                lvs.push(ours("vg1", "a", None));
            }
            let mut st = agent.write_state();
            let start = st.generation;
            st.apply_report(start, vec![vg("vg0", 1 << 30), vg("vg1", 4 << 30)], lvs);
        };
        // Someone made "b" by hand: one change.
        report(5.0, true);
        let delta = agent.inventory_update(Some(g));
        assert_eq!(delta.lvs.len(), 1);
        let g = delta.generation;
        // Only b's own usage moved: nothing to send.
        report(50.0, true);
        assert_eq!(agent.inventory_update(Some(g)).generation, g);
        // Someone removed "a" by hand.
        report(50.0, false);
        let delta = agent.inventory_update(Some(g));
        assert_eq!(delta.removed.len(), 1);
    }

    #[tokio::test]
    async fn a_watch_sends_full_then_changes_then_heartbeats() {
        use tokio_stream::StreamExt;
        let agent = agent_with_state();
        agent.write_state().dirty = false;
        let mut updates = agent
            .watch(WatchRequest {
                cursor: None,
                heartbeat: Duration::from_millis(100),
            })
            .await
            .unwrap();
        let first = updates.next().await.unwrap().unwrap();
        assert!(first.full);
        let thin = agent.config.class("thin").unwrap().clone();
        agent.remember(&thin, ours("vg0", "b", Some("pool0")));
        let next = updates.next().await.unwrap().unwrap();
        assert_eq!(next.lvs.len(), 1, "{next:?}");
        assert_eq!(next.generation, first.generation + 1);
        let beat = updates.next().await.unwrap().unwrap();
        assert!(beat.is_heartbeat(), "{beat:?}");
        assert_eq!(beat.generation, next.generation);
    }

    #[test]
    fn a_report_never_overwrites_a_newer_change() {
        let mut st = State::default();
        st.apply_report(
            0,
            vec![vg("vg1", 900)],
            vec![
                lv("vg1", "old", 100, "-wi-a-----", None),
                lv("vg1", "gone", 50, "-wi-a-----", None),
                lv("vg1", "theirs", 10, "-wi-a-----", None),
            ],
        );
        assert_eq!(st.vgs["vg1"].free, 900);

        // The report starts here; it cannot see what follows.
        let start = st.generation;
        // Our create (thick: takes VG space), our remove, our resize.
        st.touch("vg1", "new");
        st.lvs.insert(
            ("vg1".into(), "new".into()),
            lv("vg1", "new", 200, "-wi-a-----", None),
        );
        st.touch("vg1", "gone");
        st.lvs.remove(&("vg1".into(), "gone".into()));
        st.touch("vg1", "old");
        st.lvs.get_mut(&("vg1".into(), "old".into())).unwrap().size = 300;
        st.generation += 1;
        st.dirty_at = st.generation;
        st.dirty = true;

        // What the report saw: everything as before our changes, and
        // someone else removed "theirs" (its 10 bytes back in the VG).
        st.apply_report(
            start,
            vec![vg("vg1", 910)],
            vec![
                lv("vg1", "old", 100, "-wi-a-----", None),
                lv("vg1", "gone", 50, "-wi-a-----", None),
            ],
        );
        let names: Vec<&str> = st.lvs.keys().map(|(_, n)| n.as_str()).collect();
        assert_eq!(names, ["new", "old"], "ours kept, theirs gone");
        assert_eq!(st.lvs[&("vg1".into(), "old".into())].size, 300);
        // 910 from the report, -200 new, +50 gone, -200 grown.
        assert_eq!(st.vgs["vg1"].free, 560);
        assert!(st.dirty, "marked dirty after the report started");
        assert!(st.touched.is_empty());

        // The next report started after every change: it is the truth.
        let start = st.generation;
        st.apply_report(start, vec![vg("vg1", 700)], vec![]);
        assert!(st.lvs.is_empty());
        assert_eq!(st.vgs["vg1"].free, 700);
        assert!(!st.dirty);
    }

    #[test]
    fn stats_come_from_memory_only() {
        let config = LvmConfig::load(None, &["thin=vg0/pool0".into(), "thick=vg1".into()]);
        let runner = Arc::new(Runner::new(Duration::from_secs(5)));
        let agent = LocalAgent::new(
            "n1".into(),
            config.unwrap(),
            runner.clone(),
            AgentOptions {
                udev: false,
                copy_wait: Duration::from_secs(1),
                checkpoint_every: Duration::from_secs(1),
            },
        );
        // Before any report: the classes, nothing known about them.
        let before = agent.stats();
        assert_eq!(before.report_age, None);
        assert_eq!(before.classes.len(), 2);
        assert_eq!(before.classes[0].vg_size, None);
        assert_eq!(before.classes[0].available, None);

        let key = "0123456789abcdef0123456789abcdef";
        let mut pool = lv("vg0", "pool0", 1 << 30, "twi-aotz--", None);
        pool.data_percent = Some(12.5);
        pool.metadata_percent = Some(3.0);
        {
            let mut st = agent.state.write().unwrap();
            for (name, size, free) in [("vg0", 2u64 << 30, 512u64 << 20), ("vg1", 1 << 30, 1 << 29)]
            {
                let vg = Vg {
                    name: name.into(),
                    size,
                    free,
                    extent_size: 4 << 20,
                };
                st.vgs.insert(name.into(), vg);
            }
            let lvs = [
                pool,
                lv(
                    "vg0",
                    &format!("lds-{key}"),
                    1 << 28,
                    "Vwi-a-tz--",
                    Some("pool0"),
                ),
                lv(
                    "vg0",
                    &format!("ldsnap-{key}"),
                    1 << 28,
                    "Vri---tz-k",
                    Some("pool0"),
                ),
                lv(
                    "vg0",
                    &format!("ldtmp-{key}"),
                    1 << 28,
                    "Vri---tz-k",
                    Some("pool0"),
                ),
                lv("vg0", "someone-elses", 1 << 28, "-wi-a-----", None),
                lv("vg1", &format!("lds-{key}"), 1 << 28, "-wi-a-----", None),
                lv(
                    "vg1",
                    &format!("lds-{}", &key[1..]),
                    1 << 28,
                    "-wi-a-----",
                    None,
                ),
            ];
            for l in lvs {
                st.lvs.insert((l.vg.clone(), l.name.clone()), l);
            }
            st.refreshed = Some(Instant::now());
            // A dirty state is shown as it is, not refreshed.
            st.dirty = true;
        }
        let stats = agent.stats();
        assert!(stats.report_age.is_some());
        let thin = &stats.classes[0];
        assert_eq!(
            (thin.class.as_str(), thin.vg.as_str(), thin.pool.as_deref()),
            ("thin", "vg0", Some("pool0"))
        );
        assert_eq!(
            (thin.vg_size, thin.vg_free),
            (Some(2 << 30), Some(512 << 20))
        );
        assert_eq!(thin.pool_size, Some(1 << 30));
        assert_eq!(thin.pool_data_percent, Some(12.5));
        assert_eq!(thin.pool_metadata_percent, Some(3.0));
        assert_eq!((thin.volumes, thin.snapshots), (1, 1));
        // 5 x 1 GiB may be promised; two thin LVs of 256 MiB plus the
        // temporary one are.
        assert_eq!(thin.available, Some((5 << 30) - 3 * (1 << 28)));
        let thick = &stats.classes[1];
        assert_eq!((thick.pool.as_deref(), thick.pool_size), (None, None));
        assert_eq!((thick.volumes, thick.snapshots), (1, 0));
        assert_eq!(thick.available, Some(1 << 29));
        assert!(runner.spawn_counts().is_empty(), "a scrape ran a command");
    }

    #[test]
    fn unsafe_pools_get_fixed() {
        let mut pool = lv("vg0", "pool0", 1 << 30, "twi-a-tz--", None);
        pool.zeroing = true;
        pool.when_full = "error".into();
        assert!(pool_fixes(&pool).is_empty());
        pool.when_full = "queue".into();
        assert_eq!(pool_fixes(&pool), ["--errorwhenfull", "y"]);
        pool.zeroing = false;
        assert_eq!(pool_fixes(&pool), ["--errorwhenfull", "y", "--zero", "y"]);
        assert!(pool_problem(&pool).contains("zero"));
        pool.when_full = "error".into();
        assert_eq!(pool_fixes(&pool), ["--zero", "y"]);
    }

    #[test]
    fn maps_lvm_errors() {
        use crate::error::Error;
        use crate::runner::RunError;
        let failed = |stderr: &str| RunError::Failed {
            command: "lvm".into(),
            code: 5,
            stderr: stderr.into(),
            stdout: String::new(),
        };
        let cases = [
            (
                "  Volume group \"vg\" has insufficient free space (1 extents): 25 required.",
                "RE",
            ),
            (
                "  Insufficient suitable allocatable extents for logical volume",
                "RE",
            ),
            (
                "  Logical volume \"x\" already exists in volume group \"vg\"",
                "AE",
            ),
            ("  Logical volume vg/x contains a filesystem in use.", "FP"),
            ("  Failed to find logical volume \"vg/x\"", "NF"),
            ("  Something odd", "IN"),
        ];
        for (stderr, want) in cases {
            let got = match Error::from(crate::lvm::error::classify(failed(stderr))) {
                Error::ResourceExhausted(_) => "RE",
                Error::AlreadyExists(_) => "AE",
                Error::FailedPrecondition(_) => "FP",
                Error::NotFound(_) => "NF",
                Error::Internal(_) => "IN",
                other => panic!("{other:?}"),
            };
            assert_eq!(got, want, "{stderr}");
        }
    }
}
