//! The RBD bench proper (feature `rbd`).

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lodestone::client::{self, Client};
use lodestone::csi::volume_capability::{access_mode, AccessMode, MountVolume};
use lodestone::csi::*;
use lodestone::rbd::{ConnectOptions, ConnectionPool, Credentials, ImageOptions, Secret};

#[path = "cephcsi.rs"]
mod cephcsi;

type R<T> = Result<T, String>;

const MIB: i64 = 1 << 20;
const SEQUENTIAL: usize = 30;
const SNAPSHOTS: usize = 10;
const BURSTS: [usize; 2] = [20, 50];

struct Env {
    monitors: String,
    pool: String,
    user: String,
    key: String,
}

fn env() -> R<Env> {
    let var = |k: &str| {
        std::env::var(k).map_err(|_| format!("{k} is not set (run scripts/bench-rbd.sh)"))
    };
    let keyring = std::fs::read_to_string(var("LODESTONE_CEPH_KEYRING")?)
        .map_err(|e| format!("keyring: {e}"))?;
    let key = keyring
        .lines()
        .map(str::trim)
        .find_map(|l| {
            l.strip_prefix("key")
                .map(|v| v.trim_start_matches([' ', '=']).trim())
        })
        .ok_or("no key in the keyring")?
        .to_string();
    Ok(Env {
        monitors: var("LODESTONE_CEPH_MON_HOST")?,
        pool: var("LODESTONE_CEPH_POOL")?,
        user: var("LODESTONE_CEPH_USER")?,
        key,
    })
}

struct Driver {
    child: Child,
    client: Client,
    /// The driver's log (a file: a pipe would wake this process on every
    /// line, just before the reply it is waiting for).
    log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

/// The handler's own time of each call that succeeded, from the driver's
/// log (`elapsed_ms` of lodestone::driver's "ok" lines), by subject (the
/// request name or volume id). Other lines go on to stderr, but for the
/// bench's own refused calls.
fn handled(log: &std::path::Path) -> HashMap<String, f64> {
    let field = |line: &str, key: &str| {
        let rest = &line[line.find(key)? + key.len()..];
        let rest = rest.trim_start_matches('"');
        let end = rest.find(['"', ' ']).unwrap_or(rest.len());
        Some(rest[..end].to_string())
    };
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut out = HashMap::new();
    for line in text.lines() {
        let ok = line.contains("lodestone::driver: ok ");
        let subject = field(line, "subject=");
        let elapsed = field(line, "elapsed_ms=").and_then(|v| v.parse::<f64>().ok());
        match (ok, subject, elapsed) {
            (true, Some(s), Some(t)) => {
                out.insert(s, t);
            }
            _ if line.contains("-refused-") => {}
            _ => eprintln!("{line}"),
        }
    }
    out
}

impl Driver {
    async fn start(env: &Env) -> R<Driver> {
        let dir = tempfile::Builder::new()
            .prefix("lodestone-rbd-bench-")
            .tempdir()
            .map_err(|e| e.to_string())?;
        let config = dir.path().join("config.json");
        let json = serde_json::json!([{"clusterID": "bench", "monitors": [env.monitors],
            "pools": [env.pool]}]);
        std::fs::write(&config, json.to_string()).map_err(|e| e.to_string())?;
        let secrets = dir.path().join("secret");
        std::fs::create_dir(&secrets).map_err(|e| e.to_string())?;
        std::fs::write(secrets.join("userID"), &env.user).map_err(|e| e.to_string())?;
        std::fs::write(secrets.join("userKey"), &env.key).map_err(|e| e.to_string())?;
        let socket = dir.path().join("csi.sock");
        let log = dir.path().join("driver.log");
        let bin = std::env::var("LODESTONE_BENCH_BIN")
            .unwrap_or_else(|_| "target/rbd/release/lodestone".into());
        let child = Command::new(&bin)
            .args([
                "--driver",
                "rbd",
                "--mode",
                "controller",
                "--node-id",
                "bench",
            ])
            .arg("--endpoint")
            .arg(format!("unix://{}", socket.display()))
            .arg("--rbd-config")
            .arg(&config)
            .arg("--rbd-secret-dir")
            .arg(&secrets)
            .env("RUST_LOG", "warn,lodestone::driver=info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(&log).map_err(|e| e.to_string())?,
            ))
            .spawn()
            .map_err(|e| format!("start {bin}: {e}"))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if socket.exists() {
                if let Ok(mut c) = client::connect(&socket).await {
                    if c.identity.probe(ProbeRequest {}).await.is_ok() {
                        return Ok(Driver {
                            child,
                            client: c,
                            log,
                            _dir: dir,
                        });
                    }
                }
            }
            if Instant::now() > deadline {
                return Err("the driver did not come up".into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn memory(&self) -> Mem {
        Mem::of(self.child.id())
    }
}

/// The driver's memory from /proc (KiB), threads.
struct Mem {
    rss: u64,
    anon: u64,
    file: u64,
    hwm: u64,
    threads: u64,
}

impl Mem {
    fn of(pid: u32) -> Mem {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        Mem {
            rss: field("VmRSS:"),
            anon: field("RssAnon:"),
            file: field("RssFile:"),
            hwm: field("VmHWM:"),
            threads: field("Threads:"),
        }
    }

    /// The process's resident memory by mapping (KiB): the file's name, or
    /// `[heap]`, `[stack]`, `anonymous`; largest first, with how much of it
    /// is anonymous (written by the process: heap, stacks, and a library's
    /// pages changed by relocation or its writable data).
    fn by_mapping(pid: u32) -> Vec<(String, u64, u64)> {
        let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
        let mut sums: std::collections::BTreeMap<String, (u64, u64)> = Default::default();
        let mut current = String::new();
        for line in smaps.lines() {
            let mut words = line.split_whitespace();
            let first = words.next().unwrap_or("");
            if first.contains('-') && !first.ends_with(':') {
                let name = line.split_whitespace().nth(5).unwrap_or("anonymous");
                current = name.rsplit('/').next().unwrap_or(name).to_string();
                continue;
            }
            let kib = words
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
            let entry = sums.entry(current.clone()).or_default();
            match first {
                "Rss:" => entry.0 += kib,
                "Anonymous:" => entry.1 += kib,
                _ => {}
            }
        }
        let mut rows: Vec<_> = sums.into_iter().map(|(n, (r, d))| (n, r, d)).collect();
        rows.sort_by_key(|r| std::cmp::Reverse(r.1));
        rows
    }

    fn row(&self, when: &str) -> String {
        let mib = |k: u64| k as f64 / 1024.0;
        format!(
            "| {when} | {:.1} | {:.1} | {:.1} | {:.1} | {} |\n",
            mib(self.rss),
            mib(self.anon),
            mib(self.file),
            mib(self.hwm),
            self.threads
        )
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An RBD node plugin (`--mode node`), for its memory and mapped libraries.
struct NodePlugin {
    child: Child,
    _dir: tempfile::TempDir,
}

impl NodePlugin {
    async fn start(env: &Env) -> R<NodePlugin> {
        let dir = tempfile::Builder::new()
            .prefix("lodestone-rbd-bench-node-")
            .tempdir()
            .map_err(|e| e.to_string())?;
        let config = dir.path().join("config.json");
        let json = serde_json::json!([{"clusterID": "bench", "monitors": [env.monitors],
            "pools": [env.pool]}]);
        std::fs::write(&config, json.to_string()).map_err(|e| e.to_string())?;
        let socket = dir.path().join("csi.sock");
        let bin = std::env::var("LODESTONE_BENCH_BIN")
            .unwrap_or_else(|_| "target/rbd/release/lodestone".into());
        let child = Command::new(&bin)
            .args(["--driver", "rbd", "--mode", "node", "--node-id", "bench"])
            .arg("--endpoint")
            .arg(format!("unix://{}", socket.display()))
            .arg("--rbd-config")
            .arg(&config)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| format!("start {bin}: {e}"))?;
        let node = NodePlugin { child, _dir: dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if socket.exists() {
                if let Ok(mut c) = client::connect(&socket).await {
                    if c.identity.probe(ProbeRequest {}).await.is_ok() {
                        // settle: the first requests' buffers
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        return Ok(node);
                    }
                }
            }
            if Instant::now() > deadline {
                return Err("the node plugin did not come up".into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn memory(&self) -> Mem {
        Mem::of(self.child.id())
    }

    /// librbd / librados / libceph-common files mapped (none expected).
    fn ceph_libraries(&self) -> Vec<String> {
        let maps =
            std::fs::read_to_string(format!("/proc/{}/maps", self.child.id())).unwrap_or_default();
        let mut libs: Vec<String> = maps
            .lines()
            .filter_map(|l| l.split_whitespace().nth(5))
            .filter(|p| {
                ["librbd", "librados", "libceph-common"]
                    .iter()
                    .any(|n| p.contains(n))
            })
            .map(str::to_string)
            .collect();
        libs.sort();
        libs.dedup();
        libs
    }
}

impl Drop for NodePlugin {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Direct librbd calls through a [`ConnectionPool`], timed.
#[derive(Clone)]
struct Direct {
    pool: Arc<ConnectionPool>,
    creds: Arc<Credentials>,
    pool_name: String,
}

/// Milliseconds of each librbd step inside one blocking call, and of the
/// whole closure.
type Steps = Vec<(&'static str, f64)>;

impl Direct {
    /// What the driver's plain CreateVolume asks of Ceph: create, then tag
    /// (rbd.get_id, one rbd.metadata_set of both keys). Returns the total
    /// (as an async caller sees it) and each step's time.
    async fn create(&self, name: &str) -> R<(f64, Steps)> {
        let t = Instant::now();
        let n = name.to_string();
        let steps = self
            .pool
            .run(&self.creds, &self.pool_name, move |io| {
                let inside = Instant::now();
                let mut steps = Steps::new();
                let mut step = |what, t: Instant| steps.push((what, ms(t.elapsed())));
                let t = Instant::now();
                io.create(&n, 16 << 20, &ImageOptions::default())?;
                step("rbd_create4", t);
                let t = Instant::now();
                let id = io.image_id(&n)?;
                step("rbd.get_id (rados_exec)", t);
                let t = Instant::now();
                io.metadata_set_unopened(
                    &id,
                    &[
                        ("lodestone.v1.name", &n),
                        ("lodestone.v1.params", "0123456789abcdef"),
                    ],
                )?;
                step("rbd.metadata_set, 2 keys (rados_exec)", t);
                steps.push(("inside the blocking call", ms(inside.elapsed())));
                Ok(steps)
            })
            .await
            .map_err(|e| e.to_string())?;
        Ok((ms(t.elapsed()), steps))
    }

    /// `rbd_remove` alone.
    async fn remove(&self, name: &str) -> R<f64> {
        let t = Instant::now();
        self.pool
            .remove_image(&self.creds, &self.pool_name, name)
            .await
            .map_err(|e| e.to_string())?;
        Ok(ms(t.elapsed()))
    }

    /// The driver's DeleteVolume steps for an image that is not a clone:
    /// its id, whether it has a parent (both through the rbd object class,
    /// no open), then `rbd_remove`.
    async fn checked_remove(&self, name: &str) -> R<(f64, Steps)> {
        let t = Instant::now();
        let n = name.to_string();
        let steps = self
            .pool
            .run(&self.creds, &self.pool_name, move |io| {
                let inside = Instant::now();
                let mut steps = Steps::new();
                let t = Instant::now();
                let id = io.image_id(&n)?;
                steps.push(("rbd.get_id (rados_exec)", ms(t.elapsed())));
                let t = Instant::now();
                let clone = io.has_parent_unopened(&id)?;
                steps.push(("rbd.parent_get (rados_exec)", ms(t.elapsed())));
                assert!(!clone);
                let t = Instant::now();
                io.remove(&n)?;
                steps.push(("rbd_remove", ms(t.elapsed())));
                steps.push(("inside the blocking call", ms(inside.elapsed())));
                Ok(steps)
            })
            .await
            .map_err(|e| e.to_string())?;
        Ok((ms(t.elapsed()), steps))
    }
}

fn p50(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// The paired sequential rounds.
#[derive(Default)]
struct Paired {
    driver_create: Vec<f64>,
    direct_create: Vec<f64>,
    driver_delete: Vec<f64>,
    direct_delete: Vec<f64>,
    checked_delete: Vec<f64>,
    create_steps: Vec<Steps>,
    delete_steps: Vec<Steps>,
    /// A Probe through the same client: the gRPC round trip alone.
    probe: Vec<f64>,
    /// The driver handler's own time (its log's elapsed_ms) of the paired
    /// driver calls.
    handler_create: Vec<f64>,
    handler_delete: Vec<f64>,
    /// The same CreateVolume with an unknown clusterID: refused by the
    /// backend after the CSI layer's checks and lock, before any Ceph call.
    refused_create: Vec<f64>,
}

/// p50 of each step over the rounds, in order.
fn step_p50s(rounds: &[Steps]) -> Vec<(&'static str, f64)> {
    let Some(first) = rounds.first() else {
        return Vec::new();
    };
    first
        .iter()
        .enumerate()
        .map(|(i, (what, _))| {
            let v: Vec<f64> = rounds.iter().map(|r| r[i].1).collect();
            (*what, p50(&v))
        })
        .collect()
}

impl Paired {
    fn report(&self) -> String {
        let ratio = |a: &[f64], b: &[f64]| {
            let pairs: Vec<f64> = a.iter().zip(b).map(|(x, y)| x / y).collect();
            (p50(a) / p50(b), p50(&pairs))
        };
        let mut out = String::new();
        out.push_str(&format!(
            "{SEQUENTIAL} paired rounds (driver and direct alternate, order flipped each round)\n\n"
        ));
        out.push_str("| call | driver p50 (ms) | direct p50 (ms) | direct = | p50 ratio | p50 of per-round ratios |\n|---|--:|--:|---|--:|--:|\n");
        let (r, pr) = ratio(&self.driver_create, &self.direct_create);
        out.push_str(&format!(
            "| CreateVolume (16 MiB) | {:.1} | {:.1} | create + rbd.get_id + rbd.metadata_set | {r:.2}x | {pr:.2}x |\n",
            p50(&self.driver_create),
            p50(&self.direct_create)
        ));
        let (r, pr) = ratio(&self.driver_delete, &self.direct_delete);
        out.push_str(&format!(
            "| DeleteVolume | {:.1} | {:.1} | rbd_remove | {r:.2}x | {pr:.2}x |\n",
            p50(&self.driver_delete),
            p50(&self.direct_delete)
        ));
        let (r, pr) = ratio(&self.driver_delete, &self.checked_delete);
        out.push_str(&format!(
            "| DeleteVolume | {:.1} | {:.1} | the driver's delete steps (below) | {r:.2}x | {pr:.2}x |\n",
            p50(&self.driver_delete),
            p50(&self.checked_delete)
        ));
        let breakdown = |out: &mut String,
                         call: &str,
                         driver: &[f64],
                         direct: &[f64],
                         handler: &[f64],
                         without_ceph: Option<&[f64]>,
                         steps: &[Steps]| {
            let steps = step_p50s(steps);
            let inside = steps.last().map(|s| s.1).unwrap_or(0.0);
            out.push_str(&format!("\n{call}, where the time goes (p50 of each part, ms):\n\n| part | ms |\n|---|--:|\n"));
            out.push_str(&format!(
                "| driver's own share: gRPC over the socket, validation, locks, reply (driver − direct) | {:.2} |\n",
                p50(driver) - p50(direct)
            ));
            out.push_str(&format!(
                "| of it, a bare gRPC round trip over the same socket (Probe) | {:.2} |\n",
                p50(&self.probe)
            ));
            if !handler.is_empty() {
                out.push_str(&format!(
                    "| of it, outside the driver's handler: client, socket, HTTP/2, tonic (driver − the handler's own elapsed_ms, {:.2}) | {:.2} |\n",
                    p50(handler),
                    p50(driver) - p50(handler)
                ));
            }
            if let Some(t) = without_ceph {
                out.push_str(&format!(
                    "| of it, the same call refused before any Ceph call (unknown clusterID): gRPC, decoding, validation, lock | {:.2} |\n",
                    p50(t)
                ));
            }
            out.push_str(&format!(
                "| pool: I/O context lookup, call slot, hop to the blocking thread and back (direct − inside) | {:.2} |\n",
                p50(direct) - inside
            ));
            for (what, t) in &steps {
                out.push_str(&format!("| {what} | {t:.2} |\n"));
            }
        };
        breakdown(
            &mut out,
            "CreateVolume",
            &self.driver_create,
            &self.direct_create,
            &self.handler_create,
            Some(&self.refused_create),
            &self.create_steps,
        );
        breakdown(
            &mut out,
            "DeleteVolume",
            &self.driver_delete,
            &self.checked_delete,
            &self.handler_delete,
            None,
            &self.delete_steps,
        );
        out
    }
}

/// One burst size: per-call latencies and the wall time of all calls.
#[derive(Default)]
struct Burst {
    n: usize,
    driver_create: Vec<f64>,
    direct_create: Vec<f64>,
    driver_delete: Vec<f64>,
    direct_delete: Vec<f64>,
    driver_create_wall: f64,
    direct_create_wall: f64,
    driver_delete_wall: f64,
    direct_delete_wall: f64,
}

impl Burst {
    fn rows(&self) -> String {
        let row = |call: &str, d: &[f64], r: &[f64], dw: f64, rw: f64| {
            format!(
                "| {} | {call} | {:.1} | {:.1} | {:.2}x | {dw:.0} | {rw:.0} |\n",
                self.n,
                p50(d),
                p50(r),
                p50(d) / p50(r)
            )
        };
        row(
            "CreateVolume",
            &self.driver_create,
            &self.direct_create,
            self.driver_create_wall,
            self.direct_create_wall,
        ) + &row(
            "DeleteVolume (direct: rbd_remove)",
            &self.driver_delete,
            &self.direct_delete,
            self.driver_delete_wall,
            self.direct_delete_wall,
        )
    }
}

fn secrets(env: &Env) -> HashMap<String, String> {
    [
        ("userID".to_string(), env.user.clone()),
        ("userKey".to_string(), env.key.clone()),
    ]
    .into()
}

fn create_req(env: &Env, name: &str, source: Option<VolumeContentSource>) -> CreateVolumeRequest {
    CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(CapacityRange {
            required_bytes: 16 * MIB,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![VolumeCapability {
            block: None,
            mount: Some(MountVolume {
                fs_type: "ext4".into(),
                ..Default::default()
            }),
            access_mode: Some(AccessMode {
                mode: access_mode::Mode::SingleNodeWriter as i32,
            }),
        }],
        parameters: [
            ("clusterID".to_string(), "bench".to_string()),
            ("pool".to_string(), env.pool.clone()),
        ]
        .into(),
        secrets: secrets(env),
        volume_content_source: source,
        ..Default::default()
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

struct Stats(Vec<f64>);

impl Stats {
    fn row(&self) -> String {
        let mut v = self.0.clone();
        v.sort_by(|a, b| a.total_cmp(b));
        format!("{:.1} | {:.1}–{:.1}", v[v.len() / 2], v[0], v[v.len() - 1])
    }
}

async fn timed<T, F: std::future::Future<Output = Result<T, tonic::Status>>>(
    what: &str,
    f: F,
) -> R<(T, f64)> {
    let t = Instant::now();
    let out = f
        .await
        .map_err(|s| format!("{what}: {:?}: {}", s.code(), s.message()))?;
    Ok((out, ms(t.elapsed())))
}

async fn run() -> R<String> {
    let env = env()?;
    let run = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
    let d = Driver::start(&env).await?;
    let idle_mem = d.memory();
    let mut c = d.client.clone();
    let mut out = String::new();
    let mut rows: Vec<(String, Stats, String, Option<Stats>)> = Vec::new();

    // Warm-up: the first call connects to the cluster.
    let (first, first_ms) = timed(
        "CreateVolume",
        c.controller
            .create_volume(create_req(&env, &format!("bench-{run}-warm"), None)),
    )
    .await?;
    let warm_id = first.into_inner().volume.unwrap().volume_id;

    // Snapshots of one volume, then restores of one snapshot.
    let mut snap = Vec::new();
    let mut snap_ids = Vec::new();
    for i in 0..SNAPSHOTS {
        let req = CreateSnapshotRequest {
            name: format!("bench-{run}-snap-{i}"),
            source_volume_id: warm_id.clone(),
            secrets: secrets(&env),
            ..Default::default()
        };
        let (r, t) = timed("CreateSnapshot", c.controller.create_snapshot(req)).await?;
        snap_ids.push(r.into_inner().snapshot.unwrap().snapshot_id);
        snap.push(t);
    }
    let mut restore = Vec::new();
    let mut restored = Vec::new();
    for i in 0..SNAPSHOTS {
        let source = VolumeContentSource {
            r#type: Some(volume_content_source::Type::Snapshot(
                volume_content_source::SnapshotSource {
                    snapshot_id: snap_ids[0].clone(),
                },
            )),
        };
        let req = create_req(&env, &format!("bench-{run}-restore-{i}"), Some(source));
        let (r, t) = timed(
            "CreateVolume from snapshot",
            c.controller.create_volume(req),
        )
        .await?;
        restored.push(r.into_inner().volume.unwrap().volume_id);
        restore.push(t);
    }
    for id in restored.iter().chain(std::iter::once(&warm_id)) {
        let req = DeleteVolumeRequest {
            volume_id: id.clone(),
            secrets: secrets(&env),
        };
        c.controller
            .delete_volume(req)
            .await
            .map_err(|e| e.to_string())?;
    }
    let mut del_snap = Vec::new();
    for id in &snap_ids {
        let req = DeleteSnapshotRequest {
            snapshot_id: id.clone(),
            secrets: secrets(&env),
        };
        del_snap.push(
            timed("DeleteSnapshot", c.controller.delete_snapshot(req))
                .await?
                .1,
        );
    }

    // The same librbd work in-process, one pooled connection (the same
    // pool type, call bound and blocking hop as the controller's).
    let pool = Arc::new(ConnectionPool::new(
        ConnectOptions::default(),
        Duration::from_secs(60),
    ));
    let direct = Direct {
        pool: Arc::clone(&pool),
        creds: Arc::new(Credentials {
            mon_host: env.monitors.clone(),
            user: env.user.clone(),
            key: Secret::new(env.key.clone()),
        }),
        pool_name: env.pool.clone(),
    };
    direct.create(&format!("bench-{run}-rawwarm")).await?;
    direct.remove(&format!("bench-{run}-rawwarm")).await?;

    // Paired: each round makes one volume through the driver and one
    // directly, then deletes both; the order flips every round so drift
    // (the cluster's own noise, cache warmth) falls on both sides alike.
    let mut p = Paired::default();
    let mut paired_ids = Vec::new();
    for i in 0..SEQUENTIAL {
        let driver_first = i % 2 == 0;
        let raw_name = format!("bench-{run}-raw-{i}");
        let mut vol_id = String::new();
        for driver in [driver_first, !driver_first] {
            if driver {
                let (r, t) = timed(
                    "CreateVolume",
                    c.controller.create_volume(create_req(
                        &env,
                        &format!("bench-{run}-seq-{i}"),
                        None,
                    )),
                )
                .await?;
                vol_id = r.into_inner().volume.unwrap().volume_id;
                paired_ids.push((format!("bench-{run}-seq-{i}"), vol_id.clone()));
                p.driver_create.push(t);
            } else {
                let (total, steps) = direct.create(&raw_name).await?;
                p.direct_create.push(total);
                p.create_steps.push(steps);
            }
        }
        for driver in [driver_first, !driver_first] {
            if driver {
                let req = DeleteVolumeRequest {
                    volume_id: vol_id.clone(),
                    secrets: secrets(&env),
                };
                p.driver_delete.push(
                    timed("DeleteVolume", c.controller.delete_volume(req))
                        .await?
                        .1,
                );
            } else {
                p.direct_delete.push(direct.remove(&raw_name).await?);
            }
        }
        p.probe
            .push(timed("Probe", c.identity.probe(ProbeRequest {})).await?.1);
        let mut refused = create_req(&env, &format!("bench-{run}-refused-{i}"), None);
        refused
            .parameters
            .insert("clusterID".into(), "bench-unknown".into());
        let t = Instant::now();
        match c.controller.create_volume(refused).await {
            Err(_) => p.refused_create.push(ms(t.elapsed())),
            Ok(_) => return Err("CreateVolume with an unknown clusterID succeeded".into()),
        }
        // The driver's delete steps, one by one, on a third image.
        let checked = format!("bench-{run}-chk-{i}");
        direct.create(&checked).await?;
        let (total, steps) = direct.checked_remove(&checked).await?;
        p.checked_delete.push(total);
        p.delete_steps.push(steps);
    }

    let handled = handled(&d.log);
    for (name, id) in &paired_ids {
        p.handler_create.extend(handled.get(name));
        p.handler_delete.extend(handled.get(id));
    }

    // Bursts: n concurrent driver calls, then n concurrent direct calls on
    // the pool (which, like the controller, runs at most 8 librbd calls at
    // once), creates then deletes.
    let mut bursts = Vec::new();
    for n in BURSTS {
        let mut b = Burst {
            n,
            ..Burst::default()
        };
        let t = Instant::now();
        let calls = (0..n).map(|i| {
            let mut c = d.client.clone();
            let req = create_req(&env, &format!("bench-{run}-burst{n}-{i}"), None);
            async move {
                let t = Instant::now();
                c.controller
                    .create_volume(req)
                    .await
                    .map(|r| (r, ms(t.elapsed())))
            }
        });
        let results = futures_join_all(calls).await;
        b.driver_create_wall = ms(t.elapsed());
        let mut ids = Vec::new();
        for r in results {
            let (r, t) = r.map_err(|s| format!("burst create: {s}"))?;
            ids.push(r.into_inner().volume.unwrap().volume_id);
            b.driver_create.push(t);
        }
        let t = Instant::now();
        let calls = (0..n).map(|i| {
            let direct = direct.clone();
            let name = format!("bench-{run}-rawburst{n}-{i}");
            async move { direct.create(&name).await.map(|(t, _)| t) }
        });
        for r in futures_join_all(calls).await {
            b.direct_create.push(r?);
        }
        b.direct_create_wall = ms(t.elapsed());

        let t = Instant::now();
        let calls = ids.into_iter().map(|id| {
            let mut c = d.client.clone();
            let req = DeleteVolumeRequest {
                volume_id: id,
                secrets: secrets(&env),
            };
            async move {
                let t = Instant::now();
                c.controller
                    .delete_volume(req)
                    .await
                    .map(|_| ms(t.elapsed()))
            }
        });
        for r in futures_join_all(calls).await {
            b.driver_delete
                .push(r.map_err(|s| format!("burst delete: {s}"))?);
        }
        b.driver_delete_wall = ms(t.elapsed());
        let t = Instant::now();
        let calls = (0..n).map(|i| {
            let direct = direct.clone();
            let name = format!("bench-{run}-rawburst{n}-{i}");
            async move { direct.remove(&name).await }
        });
        for r in futures_join_all(calls).await {
            b.direct_delete.push(r?);
        }
        b.direct_delete_wall = ms(t.elapsed());
        bursts.push(b);
    }
    let burst_mem = d.memory();
    // The pool hands freed heap back once calls stop (checked each second).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let settled_mem = d.memory();
    let settled_maps = Mem::by_mapping(d.child.id());
    let node = NodePlugin::start(&env).await?;
    let node_mem = node.memory();
    let node_libs = node.ceph_libraries();
    drop(node);

    rows.push((
        "CreateSnapshot (hidden clone + snapshot)".into(),
        Stats(snap),
        String::new(),
        None,
    ));
    rows.push((
        "CreateVolume from snapshot (clone v2)".into(),
        Stats(restore),
        String::new(),
        None,
    ));
    rows.push((
        "DeleteSnapshot".into(),
        Stats(del_snap),
        String::new(),
        None,
    ));

    out.push_str(&p.report());
    out.push_str("\n| call | driver p50 (ms) | driver min–max |\n|---|--:|--:|\n");
    for (what, s, _, _) in &rows {
        out.push_str(&format!("| {what} | {} |\n", s.row()));
    }
    out.push_str(&format!(
        "\nFirst call after start (connects to the cluster): {first_ms:.1} ms. {SNAPSHOTS} snapshots of one volume and {SNAPSHOTS} restores of one snapshot.\n\n"
    ));
    out.push_str(
        "| burst | call | driver p50 per call (ms) | direct p50 per call | ratio | driver, all done | direct, all done |\n|--:|---|--:|--:|--:|--:|--:|\n",
    );
    for b in &bursts {
        out.push_str(&b.rows());
    }
    out.push_str("\n| memory | VmRSS (MiB) | RssAnon | RssFile | VmHWM | threads |\n|---|--:|--:|--:|--:|--:|\n");
    out.push_str(&idle_mem.row("controller, idle after start"));
    out.push_str(&burst_mem.row("controller, right after the bursts"));
    out.push_str(&settled_mem.row("controller, 3 s later"));
    out.push_str(&node_mem.row("RBD node plugin, idle"));
    out.push_str("\nWhere the controller's resident memory is, 3 s after the bursts (the eight largest mappings):\n\n| mapping | RSS (MiB) | of it anonymous |\n|---|--:|--:|\n");
    for (name, rss, dirty) in settled_maps.iter().take(8) {
        let mib = |k: u64| k as f64 / 1024.0;
        out.push_str(&format!(
            "| {name} | {:.1} | {:.1} |\n",
            mib(*rss),
            mib(*dirty)
        ));
    }
    out.push_str(&format!(
        "\nCeph libraries mapped by the RBD node plugin: {}.\n",
        if node_libs.is_empty() {
            "none".to_string()
        } else {
            node_libs.join(", ")
        }
    ));
    if let Ok(bin) = std::env::var("LODESTONE_BENCH_CEPHCSI") {
        let report =
            cephcsi::side_by_side(&env, &run, &d.client, || d.memory(), node_mem, &bin).await?;
        out.push_str(&report);
    }
    Ok(out)
}

/// Runs the futures concurrently and collects their outputs in order.
async fn futures_join_all<F>(fs: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = fs.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.expect("task"));
    }
    out
}

pub fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    match rt.block_on(run()) {
        Ok(report) => print!("{report}"),
        Err(e) => {
            eprintln!("rbd-bench: {e}");
            std::process::exit(1);
        }
    }
}
