//! The RBD bench proper (feature `rbd`).

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lodestone::client::{self, Client};
use lodestone::csi::volume_capability::{access_mode, AccessMode, MountVolume};
use lodestone::csi::*;
use lodestone::rbd::{ConnectOptions, ConnectionPool, Credentials, ImageOptions, Secret};

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
    _dir: tempfile::TempDir,
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
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
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
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
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

    let mut create = Vec::new();
    let mut ids = Vec::new();
    for i in 0..SEQUENTIAL {
        let (r, t) = timed(
            "CreateVolume",
            c.controller
                .create_volume(create_req(&env, &format!("bench-{run}-seq-{i}"), None)),
        )
        .await?;
        ids.push(r.into_inner().volume.unwrap().volume_id);
        create.push(t);
    }
    let mut delete = Vec::new();
    for id in &ids {
        let req = DeleteVolumeRequest {
            volume_id: id.clone(),
            secrets: secrets(&env),
        };
        delete.push(
            timed("DeleteVolume", c.controller.delete_volume(req))
                .await?
                .1,
        );
    }

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

    // Bursts of concurrent creates and deletes.
    let mut bursts = Vec::new();
    for n in BURSTS {
        let t = Instant::now();
        let calls = (0..n).map(|i| {
            let mut c = d.client.clone();
            let req = create_req(&env, &format!("bench-{run}-burst{n}-{i}"), None);
            async move { c.controller.create_volume(req).await }
        });
        let results = futures_join_all(calls).await;
        let created_ms = ms(t.elapsed());
        let mut ids = Vec::new();
        for r in results {
            ids.push(
                r.map_err(|s| format!("burst create: {s}"))?
                    .into_inner()
                    .volume
                    .unwrap()
                    .volume_id,
            );
        }
        let t = Instant::now();
        let calls = ids.into_iter().map(|id| {
            let mut c = d.client.clone();
            let req = DeleteVolumeRequest {
                volume_id: id,
                secrets: secrets(&env),
            };
            async move { c.controller.delete_volume(req).await }
        });
        for r in futures_join_all(calls).await {
            r.map_err(|s| format!("burst delete: {s}"))?;
        }
        bursts.push((n, created_ms, ms(t.elapsed())));
    }
    let burst_mem = d.memory();
    // The pool hands freed heap back once calls stop (checked each second).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let settled_mem = d.memory();

    // The same librbd work in-process, one pooled connection.
    let pool = Arc::new(ConnectionPool::new(
        ConnectOptions::default(),
        Duration::from_secs(60),
    ));
    let creds = || Credentials {
        mon_host: env.monitors.clone(),
        user: env.user.clone(),
        key: Secret::new(env.key.clone()),
    };
    pool.create_image(
        &creds(),
        &env.pool,
        &format!("bench-{run}-rawwarm"),
        16 << 20,
        &ImageOptions::default(),
    )
    .await
    .map_err(|e| e.to_string())?;
    pool.remove_image(&creds(), &env.pool, &format!("bench-{run}-rawwarm"))
        .await
        .map_err(|e| e.to_string())?;
    // Three ways to make a tagged image: the driver's (create, then the
    // rbd object class: get_id + one metadata_set of every key), librbd's
    // image API (open, one metadata_set per key), and create alone.
    let (mut raw_create, mut raw_delete) = (Vec::new(), Vec::new());
    let (mut api_create, mut bare_create) = (Vec::new(), Vec::new());
    for i in 0..SEQUENTIAL {
        for (way, times) in [
            (0, &mut raw_create),
            (1, &mut api_create),
            (2, &mut bare_create),
        ] {
            let name = format!("bench-{run}-raw{way}-{i}");
            let t = Instant::now();
            let n2 = name.clone();
            pool.run(&creds(), &env.pool, move |io| {
                io.create(&n2, 16 << 20, &ImageOptions::default())?;
                let (k1, k2) = ("lodestone.v1.name", "lodestone.v1.params");
                match way {
                    0 => io.metadata_set_unopened(
                        &io.image_id(&n2)?,
                        &[(k1, &n2), (k2, "0123456789abcdef")],
                    ),
                    1 => {
                        let img = io.open(&n2)?;
                        img.metadata_set(k1, &n2)?;
                        img.metadata_set(k2, "0123456789abcdef")
                    }
                    _ => Ok(()),
                }
            })
            .await
            .map_err(|e| e.to_string())?;
            times.push(ms(t.elapsed()));
            let t = Instant::now();
            pool.remove_image(&creds(), &env.pool, &name)
                .await
                .map_err(|e| e.to_string())?;
            if way == 0 {
                raw_delete.push(ms(t.elapsed()));
            }
        }
    }

    rows.push((
        "CreateVolume (16 MiB)".into(),
        Stats(create),
        "create + rbd.get_id + rbd.metadata_set (2 keys)".into(),
        Some(Stats(raw_create)),
    ));
    rows.push((
        "DeleteVolume".into(),
        Stats(delete),
        "remove".into(),
        Some(Stats(raw_delete)),
    ));
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

    out.push_str("| call | driver p50 (ms) | driver min–max | same librbd calls in-process | direct p50 | direct min–max |\n");
    out.push_str("|---|--:|--:|---|--:|--:|\n");
    for (what, s, raw_what, raw) in &rows {
        let raw = raw
            .as_ref()
            .map(|r| r.row())
            .unwrap_or_else(|| "– | –".into());
        out.push_str(&format!("| {what} | {} | {raw_what} | {raw} |\n", s.row()));
    }
    out.push_str(&format!(
        "\nFirst call after start (connects to the cluster): {first_ms:.1} ms. {SEQUENTIAL} sequential calls each; {SNAPSHOTS} snapshots of one volume and {SNAPSHOTS} restores of one snapshot.\n\n"
    ));
    out.push_str(
        "| burst | CreateVolume, all done (ms) | DeleteVolume, all done (ms) |\n|--:|--:|--:|\n",
    );
    for (n, c, d) in bursts {
        out.push_str(&format!("| {n} concurrent | {c:.0} | {d:.0} |\n"));
    }
    let brief = |v: Vec<f64>| {
        let row = Stats(v).row();
        let (p50, range) = row.split_once(" | ").unwrap_or((&row, ""));
        format!("{p50} ({range})")
    };
    out.push_str(&format!(
        "\nOther ways to make the same tagged 16 MiB image, direct p50 (min–max) in ms: \
         create + open + 2 × metadata_set (librbd's image API) {}; create alone {}.\n",
        brief(api_create),
        brief(bare_create)
    ));
    out.push_str("\n| driver memory | VmRSS (MiB) | RssAnon | RssFile | VmHWM | threads |\n|---|--:|--:|--:|--:|--:|\n");
    out.push_str(&idle_mem.row("idle after start"));
    out.push_str(&burst_mem.row("right after the bursts"));
    out.push_str(&settled_mem.row("3 s later"));
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
