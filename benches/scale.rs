//! Lodestone scale benchmark: the real central LVM controller
//! (`target/release/lodestone --mode controller`, mutual TLS) against N
//! simulated node agents in this process, each on its own loopback address
//! with its own certificate, each speaking the agent API over gRPC with an
//! in-memory model of LVM (two device classes, a number of volumes per
//! node made before the controller starts).
//!
//! For each N it reports: CreateVolume and DeleteVolume latency p50/p99,
//! one after the other and 20 at once; agent RPCs per call, by RPC type
//! (counted by the simulated agents); the placement decision's own time
//! (the controller logs `placement_us` with each decision); controller RSS
//! and CPU; the time from a controller (re)start to its first successful
//! create (it answers UNAVAILABLE while any node's inventory is not in);
//! then the same latencies with 1% of the agents black-holed (every call
//! and the stream hang) and 1% killed (calls fail, the stream ends).
//!
//! The faults are made inside the simulated agent, at the gRPC level: a
//! black-holed node keeps its TCP connection and says nothing; a killed
//! one answers UNAVAILABLE. New TLS handshakes to a black-holed address are
//! not exercised here (the controller's connector has its own deadline).
//!
//! `scripts/bench-scale.sh` builds the release binary and runs this;
//! options: `--nodes 10,100,1000,5000 --volumes 20 --calls 30 --burst 20`.
//! `LODESTONE_SCALE_WRAP=heaptrack` (or another profiler's command) runs
//! the controller under it.
//! A markdown report goes to stdout, progress to stderr.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lodestone::agentpb as pb;
use lodestone::agentpb::agent_server::{Agent, AgentServer};
use lodestone::client::{self, Client};
use lodestone::csi;
use lodestone::lvm::ids::{self, Kind, LvmKind};
use lodestone::lvm::wire;
use lodestone::tls::{require_peer, TlsMaterial};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

const CONTROLLER: &str = "lodestone-controller";
const GIB: u64 = 1 << 30;
const EXTENT: u64 = 4 << 20;
const CLASSES: [(&str, &str, Option<&str>); 2] =
    [("thin", "vg0", Some("pool0")), ("thick", "vg1", None)];
const RPCS: [&str; 10] = [
    "describe", "create", "remove", "extend", "find", "list", "capacity", "resume", "progress",
    "watch",
];

type R<T> = Result<T, String>;

// ---------------------------------------------------------------------------
// The simulated agent
// ---------------------------------------------------------------------------

const NORMAL: u8 = 0;
const BLACK_HOLE: u8 = 1;
const KILLED: u8 = 2;

#[derive(Default)]
struct Counters([AtomicU64; RPCS.len()]);

impl Counters {
    fn count(&self, rpc: &str) {
        let i = RPCS.iter().position(|r| *r == rpc).expect("known rpc");
        self.0[i].fetch_add(1, Ordering::Relaxed);
    }

    fn snapshot(&self) -> [u64; RPCS.len()] {
        std::array::from_fn(|i| self.0[i].load(Ordering::Relaxed))
    }
}

#[derive(Default)]
struct Model {
    generation: u64,
    /// (class, name) -> (LV, generation of its last change).
    lvs: BTreeMap<(String, String), (pb::Lv, u64)>,
    /// Removed (class, name) -> generation of the removal.
    removed: BTreeMap<(String, String), u64>,
}

struct Sim {
    node: String,
    epoch: String,
    model: Mutex<Model>,
    changes: tokio::sync::watch::Sender<u64>,
    mode: Arc<AtomicU8>,
    counters: Arc<Counters>,
}

fn class_of(class: &str) -> Result<(&'static str, Option<&'static str>), Status> {
    CLASSES
        .iter()
        .find(|(c, _, _)| *c == class)
        .map(|(_, vg, pool)| (*vg, *pool))
        .ok_or_else(|| Status::not_found(format!("no class {class}")))
}

impl Sim {
    async fn gate(&self, rpc: &str) -> Result<(), Status> {
        self.counters.count(rpc);
        match self.mode.load(Ordering::Relaxed) {
            BLACK_HOLE => std::future::pending().await,
            KILLED => Err(Status::unavailable("connection refused (simulated)")),
            _ => Ok(()),
        }
    }

    fn stamp(&self, generation: u64) -> Option<pb::Stamp> {
        Some(pb::Stamp {
            epoch: self.epoch.clone(),
            generation,
        })
    }

    fn capacity(m: &Model, class: &str) -> pb::CapacityReply {
        let used: u64 = m
            .lvs
            .iter()
            .filter(|((c, _), _)| c == class)
            .map(|(_, (lv, _))| lv.size)
            .sum();
        let total = 1024 * GIB;
        pb::CapacityReply {
            available: total.saturating_sub(used),
            extent_size: EXTENT,
            pool_full: false,
            total,
            used_percent: used as f64 * 100.0 / total as f64,
        }
    }

    /// Everything, or the changes after `since`.
    fn update(&self, m: &Model, since: Option<u64>) -> pb::InventoryUpdate {
        let after = since.unwrap_or(0);
        let changed = |g: u64| since.is_none() || g > after;
        pb::InventoryUpdate {
            epoch: self.epoch.clone(),
            generation: m.generation,
            full: since.is_none(),
            lvs: m
                .lvs
                .iter()
                .filter(|(_, (_, g))| changed(*g))
                .map(|((class, _), (lv, _))| pb::ClassLv {
                    class: class.clone(),
                    lv: Some(lv.clone()),
                })
                .collect(),
            removed: match since {
                None => Vec::new(),
                Some(_) => m
                    .removed
                    .iter()
                    .filter(|(_, g)| changed(**g))
                    .map(|((class, name), _)| pb::LvRef {
                        class: class.clone(),
                        name: name.clone(),
                    })
                    .collect(),
            },
            classes: CLASSES
                .iter()
                .map(|(c, _, _)| pb::ClassInventory {
                    class: c.to_string(),
                    capacity: Some(Self::capacity(m, c)),
                })
                .collect(),
            problems: Vec::new(),
            more: false,
        }
    }

    fn change(&self, m: &mut Model) -> u64 {
        m.generation += 1;
        self.changes.send_replace(m.generation);
        m.generation
    }

    fn new_lv(class: &str, name: &str, size: u64, tags: Vec<String>) -> pb::Lv {
        let (vg, pool) = class_of(class).expect("known class");
        pb::Lv {
            vg: vg.into(),
            name: name.into(),
            size,
            attr: if pool.is_some() {
                "Vwi-a-tz--"
            } else {
                "-wi-a-----"
            }
            .into(),
            tags,
            pool: pool.map(String::from),
            data_percent: None,
            metadata_percent: None,
            when_full: String::new(),
            zeroing: false,
            created: Some(1),
        }
    }
}

type Updates = Pin<Box<dyn Stream<Item = Result<pb::InventoryUpdate, Status>> + Send>>;

/// The gRPC face of a simulated agent.
#[derive(Clone)]
struct Served(Arc<Sim>);

impl std::ops::Deref for Served {
    type Target = Sim;
    fn deref(&self) -> &Sim {
        &self.0
    }
}

#[tonic::async_trait]
impl Agent for Served {
    async fn describe(
        &self,
        _: Request<pb::DescribeRequest>,
    ) -> Result<Response<pb::DescribeReply>, Status> {
        self.gate("describe").await?;
        Ok(Response::new(pb::DescribeReply {
            node: self.node.clone(),
            classes: CLASSES.iter().map(|c| c.0.to_string()).collect(),
            version: "sim".into(),
        }))
    }

    async fn create(&self, r: Request<pb::CreateRequest>) -> Result<Response<pb::LvReply>, Status> {
        self.gate("create").await?;
        let r = r.into_inner();
        class_of(&r.class)?;
        let mut m = self.model.lock().unwrap();
        let key = (r.class.clone(), r.name.clone());
        if let Some((lv, g)) = m.lvs.get(&key) {
            let (lv, g) = (lv.clone(), *g);
            return Ok(Response::new(pb::LvReply {
                lv: Some(lv),
                stamp: self.stamp(g),
            }));
        }
        let lv = Sim::new_lv(&r.class, &r.name, r.size, r.tags);
        let g = self.change(&mut m);
        m.removed.remove(&key);
        m.lvs.insert(key, (lv.clone(), g));
        Ok(Response::new(pb::LvReply {
            lv: Some(lv),
            stamp: self.stamp(g),
        }))
    }

    async fn remove(&self, r: Request<pb::LvRef>) -> Result<Response<pb::RemoveReply>, Status> {
        self.gate("remove").await?;
        let r = r.into_inner();
        let mut m = self.model.lock().unwrap();
        let key = (r.class, r.name);
        let g = if m.lvs.contains_key(&key) {
            let g = self.change(&mut m);
            m.lvs.remove(&key);
            m.removed.insert(key, g);
            g
        } else {
            m.removed.get(&key).copied().unwrap_or(m.generation)
        };
        Ok(Response::new(pb::RemoveReply {
            stamp: self.stamp(g),
        }))
    }

    async fn extend(&self, r: Request<pb::ExtendRequest>) -> Result<Response<pb::LvReply>, Status> {
        self.gate("extend").await?;
        let r = r.into_inner();
        let mut m = self.model.lock().unwrap();
        let key = (r.class, r.name);
        if !m.lvs.contains_key(&key) {
            return Err(Status::not_found("no such LV"));
        }
        let g = self.change(&mut m);
        let entry = m.lvs.get_mut(&key).expect("checked");
        entry.0.size = entry.0.size.max(r.size);
        entry.1 = g;
        Ok(Response::new(pb::LvReply {
            lv: Some(entry.0.clone()),
            stamp: self.stamp(g),
        }))
    }

    async fn find(&self, r: Request<pb::LvRef>) -> Result<Response<pb::FindReply>, Status> {
        self.gate("find").await?;
        let r = r.into_inner();
        let m = self.model.lock().unwrap();
        Ok(Response::new(pb::FindReply {
            lv: m.lvs.get(&(r.class, r.name)).map(|(lv, _)| lv.clone()),
            stamp: None,
        }))
    }

    async fn list(&self, _: Request<pb::ListRequest>) -> Result<Response<pb::ListReply>, Status> {
        self.gate("list").await?;
        let m = self.model.lock().unwrap();
        Ok(Response::new(pb::ListReply {
            lvs: self.update(&m, None).lvs,
        }))
    }

    async fn capacity(
        &self,
        r: Request<pb::CapacityRequest>,
    ) -> Result<Response<pb::CapacityReply>, Status> {
        self.gate("capacity").await?;
        let r = r.into_inner();
        class_of(&r.class)?;
        let m = self.model.lock().unwrap();
        Ok(Response::new(Sim::capacity(&m, &r.class)))
    }

    async fn resume(
        &self,
        r: Request<pb::ResumeRequest>,
    ) -> Result<Response<pb::FindReply>, Status> {
        self.gate("resume").await?;
        let r = r.into_inner();
        let m = self.model.lock().unwrap();
        let found = m.lvs.get(&(r.class, r.name)).cloned();
        let g = found.as_ref().map_or(m.generation, |(_, g)| *g);
        Ok(Response::new(pb::FindReply {
            lv: found.map(|(lv, _)| lv),
            stamp: self.stamp(g),
        }))
    }

    async fn copy_progress(
        &self,
        _: Request<pb::LvRef>,
    ) -> Result<Response<pb::CopyProgressReply>, Status> {
        self.gate("progress").await?;
        Ok(Response::new(pb::CopyProgressReply::default()))
    }

    type WatchStream = Updates;

    async fn watch(
        &self,
        r: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        self.gate("watch").await?;
        let r = r.into_inner();
        let heartbeat = Duration::from_millis(u64::from(r.heartbeat_ms).clamp(100, 60_000));
        let sim = self.clone();
        let mut since = {
            let m = sim.model.lock().unwrap();
            (r.epoch == sim.epoch && r.generation <= m.generation).then_some(r.generation)
        };
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let mut changes = sim.changes.subscribe();
        tokio::spawn(async move {
            loop {
                match sim.mode.load(Ordering::Relaxed) {
                    KILLED => {
                        let _ = tx
                            .send(Err(Status::unavailable("killed (simulated)")))
                            .await;
                        return;
                    }
                    // Silence, with the connection open.
                    BLACK_HOLE => {
                        tokio::time::sleep(heartbeat).await;
                        if tx.is_closed() {
                            return;
                        }
                        continue;
                    }
                    _ => {}
                }
                changes.borrow_and_update();
                let update = {
                    let m = sim.model.lock().unwrap();
                    sim.update(&m, since)
                };
                since = Some(update.generation);
                // In parts, as the controller asks (the real agent's rule).
                for part in lodestone::lvm::rpc::split_update(update, r.part_bytes) {
                    if tx.send(Ok(part)).await.is_err() {
                        return;
                    }
                }
                tokio::select! {
                    _ = changes.changed() => {}
                    _ = tokio::time::sleep(heartbeat) => {}
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    type BlockMapStream = Pin<Box<dyn Stream<Item = Result<pb::BlockMapPiece, Status>> + Send>>;

    /// Not simulated: the scale run reads no block maps.
    async fn block_map(
        &self,
        _: Request<pb::BlockMapRequest>,
    ) -> Result<Response<Self::BlockMapStream>, Status> {
        Err(Status::unimplemented(
            "the simulated agent has no block maps",
        ))
    }

    async fn grant(
        &self,
        _: Request<pb::GrantRequest>,
    ) -> Result<Response<pb::GrantReply>, Status> {
        Err(Status::unimplemented(
            "the simulated agent serves no snapshots to other nodes",
        ))
    }
}

// ---------------------------------------------------------------------------
// Certificates, agents, controller
// ---------------------------------------------------------------------------

struct Pki {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Pki {
    fn new() -> Pki {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "scale bench CA");
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        Pki {
            issuer: CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap(),
        }
    }

    /// (certificate PEM, key PEM) naming `name`.
    fn issue(&self, name: &str) -> (String, String) {
        let mut params = CertificateParams::new(vec![name.to_string()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

struct Fleet {
    sims: Vec<Arc<Sim>>,
    addresses: Vec<String>,
    counters: Arc<Counters>,
}

/// The loopback address of node `i` (127.10.0.1, 127.10.0.2, ...).
fn address_of(i: usize) -> String {
    format!("127.10.{}.{}", i / 250, i % 250 + 1)
}

async fn start_fleet(pki: &Pki, n: usize, volumes: usize) -> R<Fleet> {
    let counters = Arc::new(Counters::default());
    let ca = pki.issuer.pem();
    let mut sims = Vec::with_capacity(n);
    let mut addresses = Vec::with_capacity(n);
    for i in 0..n {
        let node = format!("node-{i:05}");
        let (cert, key) = pki.issue(&node);
        let tls =
            TlsMaterial::from_pem(cert.into_bytes(), key.into_bytes(), ca.clone().into_bytes())
                .map_err(|e| e.to_string())?;
        let mut model = Model::default();
        for v in 0..volumes {
            let class = CLASSES[v % 2].0;
            let request = format!("pre-{node}-{v}");
            let lv = Kind::Volume.lv_name(&Kind::Volume.key_for_name(&request));
            let tags = ids::tags(Kind::Volume, &request, "bench", None, false);
            model.generation += 1;
            let g = model.generation;
            model.lvs.insert(
                (class.to_string(), lv.clone()),
                (Sim::new_lv(class, &lv, GIB, tags), g),
            );
        }
        let sim = Arc::new(Sim {
            node: node.clone(),
            epoch: format!("sim-{i}-{}", std::process::id()),
            changes: tokio::sync::watch::channel(model.generation).0,
            model: Mutex::new(model),
            mode: Arc::default(),
            counters: counters.clone(),
        });
        let listener = tokio::net::TcpListener::bind((address_of(i).as_str(), 0))
            .await
            .map_err(|e| format!("bind {}: {e}", address_of(i)))?;
        addresses.push(format!("{node}={}", listener.local_addr().unwrap()));
        let service =
            AgentServer::with_interceptor(Served(sim.clone()), require_peer(CONTROLLER.into()));
        // The inventory stream over its own transport, as a real agent
        // serves it.
        let api = Arc::new(Served(sim.clone()));
        tokio::spawn(async move {
            let incoming = wire::route(tls.incoming(listener), api, CONTROLLER.into());
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(incoming)
                .await;
        });
        sims.push(sim);
    }
    Ok(Fleet {
        sims,
        addresses,
        counters,
    })
}

struct Controller {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
}

impl Drop for Controller {
    fn drop(&mut self) {
        // A wrapped controller (a child of the wrapper) gets SIGTERM, so
        // that it exits normally and the profiler can finish.
        if std::env::var_os("LODESTONE_SCALE_WRAP").is_some() {
            let parent = self.child.id().to_string();
            let _ = Command::new("pkill")
                .args(["-TERM", "-P", &parent, "-x", "lodestone"])
                .status();
        } else {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

fn start_controller(dir: &Path, fleet: &Fleet, run: usize) -> R<Controller> {
    let socket = dir.join(format!("csi-{run}.sock"));
    let log = dir.join(format!("controller-{run}.log"));
    let out = std::fs::File::create(&log).map_err(|e| e.to_string())?;
    // LODESTONE_SCALE_WRAP runs the controller under a profiler, e.g.
    // "heaptrack" (its RSS and CPU are then the wrapper's).
    let wrap = std::env::var("LODESTONE_SCALE_WRAP").unwrap_or_default();
    let mut words = wrap.split_whitespace();
    let mut cmd = match words.next() {
        Some(w) => {
            let mut c = Command::new(w);
            c.args(words).arg("target/release/lodestone");
            c
        }
        None => Command::new("target/release/lodestone"),
    };
    cmd.args([
        "--driver",
        "lvm",
        "--mode",
        "controller",
        "--node-id",
        "controller",
    ])
    .arg("--endpoint")
    .arg(format!("unix://{}", socket.display()))
    .args([
        "--device-class",
        "thin=vg0/pool0",
        "--device-class",
        "thick=vg1",
    ])
    .arg("--tls-cert")
    .arg(dir.join("controller.pem"))
    .arg("--tls-key")
    .arg(dir.join("controller-key.pem"))
    .arg("--tls-ca")
    .arg(dir.join("ca.pem"))
    .env("RUST_LOG", "info");
    if wrap.is_empty() {
        for a in &fleet.addresses {
            cmd.args(["--agent", a]);
        }
    } else {
        // Profilers choke on a long argv; one variable holds up to 128 KiB
        // (about 4,000 agents).
        cmd.env("LODESTONE_AGENTS", fleet.addresses.join(";"));
    }
    let child = cmd
        .stdout(Stdio::from(out.try_clone().map_err(|e| e.to_string())?))
        .stderr(Stdio::from(out))
        .spawn()
        .map_err(|e| format!("start target/release/lodestone: {e}"))?;
    Ok(Controller { child, socket, log })
}

async fn connect(c: &Controller) -> R<Client> {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        if c.socket.exists() {
            if let Ok(client) = client::connect(&c.socket).await {
                return Ok(client);
            }
        }
        if Instant::now() > deadline {
            return Err(format!(
                "the controller never served; see {}",
                c.log.display()
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------
// Measurements
// ---------------------------------------------------------------------------

fn create_req(name: &str) -> csi::CreateVolumeRequest {
    use csi::volume_capability::{access_mode::Mode, AccessMode, BlockVolume};
    csi::CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: 64 << 20,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![csi::VolumeCapability {
            block: Some(BlockVolume {}),
            mount: None,
            access_mode: Some(AccessMode {
                mode: Mode::SingleNodeWriter as i32,
            }),
        }],
        ..Default::default()
    }
}

async fn create(client: &Client, name: &str) -> R<(Duration, String)> {
    let started = Instant::now();
    let r = tokio::time::timeout(
        Duration::from_secs(60),
        client.controller.clone().create_volume(create_req(name)),
    )
    .await
    .map_err(|_| "timed out (60 s)".to_string())?
    .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?;
    let id = r
        .into_inner()
        .volume
        .map(|v| v.volume_id)
        .unwrap_or_default();
    Ok((started.elapsed(), id))
}

async fn delete(client: &Client, id: &str) -> R<Duration> {
    let started = Instant::now();
    tokio::time::timeout(
        Duration::from_secs(60),
        client
            .controller
            .clone()
            .delete_volume(csi::DeleteVolumeRequest {
                volume_id: id.into(),
                ..Default::default()
            }),
    )
    .await
    .map_err(|_| "timed out (60 s)".to_string())?
    .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?;
    Ok(started.elapsed())
}

fn pct(mut v: Vec<Duration>, p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i].as_secs_f64() * 1000.0
}

#[derive(Default)]
struct Latencies {
    create_seq: Vec<Duration>,
    delete_seq: Vec<Duration>,
    create_burst: Vec<Duration>,
    delete_burst: Vec<Duration>,
    failed: Vec<String>,
}

/// `calls` creates then deletes one after the other, then `burst` of each
/// at once.
async fn round(client: &Client, tag: &str, calls: usize, burst: usize) -> Latencies {
    let mut l = Latencies::default();
    let mut ids = Vec::new();
    for i in 0..calls {
        match create(client, &format!("{tag}-s{i}")).await {
            Ok((d, id)) => {
                l.create_seq.push(d);
                ids.push(id);
            }
            Err(e) => l.failed.push(format!("create: {e}")),
        }
    }
    for id in ids.drain(..) {
        match delete(client, &id).await {
            Ok(d) => l.delete_seq.push(d),
            Err(e) => l.failed.push(format!("delete: {e}")),
        }
    }
    let tasks: Vec<_> = (0..burst)
        .map(|i| {
            let client = client.clone();
            let name = format!("{tag}-b{i}");
            tokio::spawn(async move { create(&client, &name).await })
        })
        .collect();
    for t in tasks {
        match t.await.expect("task") {
            Ok((d, id)) => {
                l.create_burst.push(d);
                ids.push(id);
            }
            Err(e) => l.failed.push(format!("create (burst): {e}")),
        }
    }
    let tasks: Vec<_> = ids
        .into_iter()
        .map(|id| {
            let client = client.clone();
            tokio::spawn(async move { delete(&client, &id).await })
        })
        .collect();
    for t in tasks {
        match t.await.expect("task") {
            Ok(d) => l.delete_burst.push(d),
            Err(e) => l.failed.push(format!("delete (burst): {e}")),
        }
    }
    l
}

/// (RSS in MiB, CPU seconds so far) of a process.
fn usage(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss_kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i).and_then(|v| v.parse::<f64>().ok()))
        .sum();
    (rss_kb / 1024.0, ticks / 100.0)
}

/// Waits for the first create that succeeds (UNAVAILABLE while nodes are
/// unseen); returns how long from `since`.
async fn first_create(client: &Client, since: Instant, tag: &str) -> R<Duration> {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        match create(client, tag).await {
            Ok((_, id)) => {
                let took = since.elapsed();
                delete(client, &id).await?;
                return Ok(took);
            }
            Err(e) if e.starts_with("Unavailable") && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(e) => return Err(e),
        }
    }
}

/// Agent RPCs per call, by type, between two counter snapshots.
fn per_call(before: &[u64], after: &[u64], calls: usize) -> String {
    let parts: Vec<String> = RPCS
        .iter()
        .enumerate()
        .filter(|(i, _)| after[*i] > before[*i])
        .map(|(i, r)| {
            format!(
                "{r} {:.2}",
                (after[i] - before[i]) as f64 / calls.max(1) as f64
            )
        })
        .collect();
    if parts.is_empty() {
        "0".into()
    } else {
        parts.join(", ")
    }
}

fn placement_us(log: &Path) -> (f64, f64) {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut v: Vec<Duration> = text
        .lines()
        .filter(|l| l.contains("placed volume"))
        .filter_map(|l| l.split("placement_us=").nth(1))
        .filter_map(|r| r.split_whitespace().next()?.parse::<u64>().ok())
        .map(Duration::from_micros)
        .collect();
    v.sort();
    (pct(v.clone(), 0.5) * 1000.0, pct(v, 0.99) * 1000.0)
}

fn row(n: usize, what: &str, l: &Latencies) -> String {
    format!(
        "| {n} | {what} | {:.1} / {:.1} | {:.1} / {:.1} | {:.1} / {:.1} | {:.1} / {:.1} | {} |",
        pct(l.create_seq.clone(), 0.5),
        pct(l.create_seq.clone(), 0.99),
        pct(l.delete_seq.clone(), 0.5),
        pct(l.delete_seq.clone(), 0.99),
        pct(l.create_burst.clone(), 0.5),
        pct(l.create_burst.clone(), 0.99),
        pct(l.delete_burst.clone(), 0.5),
        pct(l.delete_burst.clone(), 0.99),
        l.failed.len()
    )
}

async fn bench(dir: &Path, pki: &Pki, n: usize, opts: &Opts, out: &mut Vec<String>) -> R<()> {
    eprintln!("== {n} nodes: starting the simulated agents");
    let fleet = start_fleet(pki, n, opts.volumes).await?;
    let started = Instant::now();
    let ctl = start_controller(dir, &fleet, 1)?;
    let client = connect(&ctl).await?;
    let ready = first_create(&client, started, &format!("first-{n}")).await?;
    eprintln!("   first create after {ready:?}");

    // Reads: no agent call.
    let before = fleet.counters.snapshot();
    for _ in 0..10 {
        client
            .controller
            .clone()
            .get_capacity(csi::GetCapacityRequest::default())
            .await
            .map_err(|s| s.to_string())?;
    }
    let reads = per_call(&before, &fleet.counters.snapshot(), 10);

    let (_, cpu0) = usage(ctl.child.id());
    let t0 = Instant::now();
    let before = fleet.counters.snapshot();
    let clean = round(&client, &format!("c{n}"), opts.calls, opts.burst).await;
    let calls = 2 * (opts.calls + opts.burst);
    let rpcs = per_call(&before, &fleet.counters.snapshot(), calls);
    let (rss, cpu1) = usage(ctl.child.id());
    let cpu = (cpu1 - cpu0) / t0.elapsed().as_secs_f64() * 100.0;
    let (place50, place99) = placement_us(&ctl.log);

    // Restart: the index is rebuilt from the streams.
    drop(client);
    drop(ctl);
    let restarted = Instant::now();
    let ctl = start_controller(dir, &fleet, 2)?;
    let client = connect(&ctl).await?;
    let rebuilt = first_create(&client, restarted, &format!("again-{n}")).await?;
    eprintln!("   restarted: first create after {rebuilt:?}");

    // Faults: 1% black-holed, 1% killed (at least one each).
    let k = (n / 100).max(1);
    for sim in fleet
        .sims
        .iter()
        .skip(1)
        .step_by(n / (2 * k).max(1))
        .take(2 * k)
        .enumerate()
    {
        let mode = if sim.0 % 2 == 0 { BLACK_HOLE } else { KILLED };
        sim.1.mode.store(mode, Ordering::Relaxed);
    }
    // Let the controller judge them (three heartbeats and a margin).
    tokio::time::sleep(Duration::from_secs(8)).await;
    let faulty = round(&client, &format!("f{n}"), opts.calls, opts.burst).await;
    for sim in &fleet.sims {
        sim.mode.store(NORMAL, Ordering::Relaxed);
    }
    let (rss_after, _) = usage(ctl.child.id());

    out.push(row(n, "clean", &clean));
    out.push(row(n, &format!("{k} black-holed + {k} killed"), &faulty));
    out.push(format!(
        "<!-- {n}: reads {reads}; create+delete {rpcs}; placement p50 {place50:.0} us p99 \
         {place99:.0} us; RSS {rss:.1} MiB (after faults {rss_after:.1}); CPU {cpu:.0}% during \
         the round; first create {:.1} s after start, {:.1} s after restart -->",
        ready.as_secs_f64(),
        rebuilt.as_secs_f64()
    ));
    eprintln!(
        "   reads: {reads}\n   create+delete: {rpcs}\n   placement p50 {place50:.0} us p99 \
         {place99:.0} us\n   RSS {rss:.1} MiB, CPU {cpu:.0}%\n   failures: {:?} / {:?}",
        clean.failed.first(),
        faulty.failed.first()
    );
    Ok(())
}

struct Opts {
    nodes: Vec<usize>,
    volumes: usize,
    calls: usize,
    burst: usize,
}

fn opts() -> R<Opts> {
    let mut o = Opts {
        nodes: vec![10, 100, 1000, 5000],
        volumes: 20,
        calls: 30,
        burst: 20,
    };
    let mut args = std::env::args().skip(1).filter(|a| a != "--bench");
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--nodes" => {
                o.nodes = value()?
                    .split(',')
                    .map(|v| v.parse().map_err(|e| format!("--nodes: {e}")))
                    .collect::<R<_>>()?
            }
            "--volumes" => o.volumes = value()?.parse().map_err(|e| format!("{e}"))?,
            "--calls" => o.calls = value()?.parse().map_err(|e| format!("{e}"))?,
            "--burst" => o.burst = value()?.parse().map_err(|e| format!("{e}"))?,
            other => return Err(format!("unknown option {other}")),
        }
    }
    Ok(o)
}

fn main() -> R<()> {
    let opts = opts()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let pki = Pki::new();
        std::fs::write(dir.path().join("ca.pem"), pki.issuer.pem()).map_err(|e| e.to_string())?;
        let (cert, key) = pki.issue(CONTROLLER);
        std::fs::write(dir.path().join("controller.pem"), cert).map_err(|e| e.to_string())?;
        std::fs::write(dir.path().join("controller-key.pem"), key).map_err(|e| e.to_string())?;
        let mut out = vec![
            "| nodes | agents | create seq p50 / p99 (ms) | delete seq p50 / p99 | create x20 p50 / p99 | delete x20 p50 / p99 | failed |".to_string(),
            "|---|---|---|---|---|---|---|".to_string(),
        ];
        for &n in &opts.nodes {
            bench(dir.path(), &pki, n, &opts, &mut out).await?;
        }
        println!("{}", out.join("\n"));
        Ok(())
    })
}
