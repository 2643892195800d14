//! Side by side with ceph-csi: its RBD controller and node plugin, from a
//! `cephcsi` binary the user built from the ceph-csi repository
//! (`LODESTONE_BENCH_CEPHCSI=/path/to/cephcsi`), against the same cluster
//! in the same run. Each round makes, snapshots, restores and deletes one
//! volume through each driver, the order flipping every round; then bursts
//! of creates and deletes through each; then both drivers' memory.
//!
//! ceph-csi reads its cluster list from a fixed path,
//! `/etc/ceph-csi-config/config.json`. It runs here in a private mount
//! namespace with a temporary directory bound over that path, so the
//! host's `/etc` is never written (the directory is made, empty, if it is
//! missing: the mount needs a mount point). It writes each call's key to a
//! file under `/tmp/csi/keys` (made if missing) and removes it after.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lodestone::client::{self, Client};
use lodestone::csi::*;

use super::{create_req, futures_join_all, ms, secrets, timed, Env, Mem, R};

const CONFIG_DIR: &str = "/etc/ceph-csi-config";
const KEYS_DIR: &str = "/tmp/csi/keys";
const ROUNDS: usize = 20;
const BURST: usize = 20;

/// One cephcsi process (controller or node plugin).
pub struct CephCsi {
    child: Child,
    pub client: Client,
    _dir: tempfile::TempDir,
}

impl CephCsi {
    pub async fn start(env: &Env, bin: &str, controller: bool) -> R<CephCsi> {
        let dir = tempfile::Builder::new()
            .prefix("lodestone-bench-cephcsi-")
            .tempdir()
            .map_err(|e| e.to_string())?;
        let config = dir.path().join("config");
        std::fs::create_dir(&config).map_err(|e| e.to_string())?;
        let json = serde_json::json!([{"clusterID": "bench", "monitors": [env.monitors]}]);
        std::fs::write(config.join("config.json"), json.to_string()).map_err(|e| e.to_string())?;
        std::fs::create_dir_all(CONFIG_DIR).map_err(|e| format!("{CONFIG_DIR}: {e}"))?;
        // Where it writes a key file for each call (its image makes it).
        std::fs::create_dir_all(KEYS_DIR).map_err(|e| format!("{KEYS_DIR}: {e}"))?;
        let socket = dir.path().join("csi.sock");
        let role = if controller {
            "--controllerserver=true"
        } else {
            "--nodeserver=true"
        };
        let mut cmd = Command::new(bin);
        cmd.args([
            "--type=rbd",
            role,
            "--drivername=rbd.csi.ceph.com",
            "--nodeid=bench",
            "--instanceid=bench",
            "--pidlimit=-1",
            "--v=0",
        ])
        .arg(format!("--endpoint=unix://{}", socket.display()))
        .arg(format!("--metricsport={}", free_port()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(
            std::fs::File::create(dir.path().join("log")).map_err(|e| e.to_string())?,
        ));
        let source = CString::new(config.as_os_str().as_bytes()).map_err(|e| e.to_string())?;
        let target = CString::new(CONFIG_DIR).expect("no NUL");
        // SAFETY: between fork and exec this only makes system calls on
        // strings made before the fork (no allocation, no locks).
        unsafe {
            cmd.pre_exec(move || {
                use nix::libc;
                let check = |r: libc::c_int| match r {
                    0 => Ok(()),
                    _ => Err(std::io::Error::last_os_error()),
                };
                check(libc::unshare(libc::CLONE_NEWNS))?;
                check(libc::mount(
                    std::ptr::null(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ))?;
                check(libc::mount(
                    source.as_ptr(),
                    target.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND,
                    std::ptr::null(),
                ))
            });
        }
        let child = cmd.spawn().map_err(|e| format!("start {bin}: {e}"))?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if socket.exists() {
                if let Ok(mut c) = client::connect(&socket).await {
                    if c.identity.probe(ProbeRequest {}).await.is_ok() {
                        return Ok(CephCsi {
                            child,
                            client: c,
                            _dir: dir,
                        });
                    }
                }
            }
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(dir.path().join("log")).unwrap_or_default();
                return Err(format!("cephcsi did not come up: {log}"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn memory(&self) -> Mem {
        Mem::of(self.child.id())
    }
}

impl Drop for CephCsi {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

/// One driver's timings in the side-by-side run.
#[derive(Default)]
struct Times {
    create: Vec<f64>,
    snapshot: Vec<f64>,
    restore: Vec<f64>,
    delete: Vec<f64>,
    delete_snapshot: Vec<f64>,
    burst_create_wall: f64,
    burst_delete_wall: f64,
}

fn p50(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Create, snapshot, restore, then delete all three, through one driver.
async fn round(c: &mut Client, env: &Env, name: &str, t: &mut Times) -> R<()> {
    let (r, ms_) = timed(
        "CreateVolume",
        c.controller.create_volume(create_req(env, name, None)),
    )
    .await?;
    t.create.push(ms_);
    let vol = r.into_inner().volume.ok_or("no volume")?.volume_id;
    let req = CreateSnapshotRequest {
        name: format!("{name}-snap"),
        source_volume_id: vol.clone(),
        secrets: secrets(env),
        parameters: [("clusterID".to_string(), "bench".to_string())].into(),
    };
    let (r, ms_) = timed("CreateSnapshot", c.controller.create_snapshot(req)).await?;
    t.snapshot.push(ms_);
    let snap = r.into_inner().snapshot.ok_or("no snapshot")?.snapshot_id;
    let source = VolumeContentSource {
        r#type: Some(volume_content_source::Type::Snapshot(
            volume_content_source::SnapshotSource {
                snapshot_id: snap.clone(),
            },
        )),
    };
    let (r, ms_) = timed(
        "CreateVolume from snapshot",
        c.controller
            .create_volume(create_req(env, &format!("{name}-restore"), Some(source))),
    )
    .await?;
    t.restore.push(ms_);
    let restored = r.into_inner().volume.ok_or("no volume")?.volume_id;
    for id in [restored, vol] {
        let req = DeleteVolumeRequest {
            volume_id: id,
            secrets: secrets(env),
        };
        t.delete.push(
            timed("DeleteVolume", c.controller.delete_volume(req))
                .await?
                .1,
        );
    }
    let req = DeleteSnapshotRequest {
        snapshot_id: snap,
        secrets: secrets(env),
    };
    t.delete_snapshot.push(
        timed("DeleteSnapshot", c.controller.delete_snapshot(req))
            .await?
            .1,
    );
    Ok(())
}

/// BURST creates at once, then BURST deletes at once: wall times.
async fn burst(c: &Client, env: &Env, prefix: &str, t: &mut Times) -> R<()> {
    let start = Instant::now();
    let calls = (0..BURST).map(|i| {
        let mut c = c.clone();
        let req = create_req(env, &format!("{prefix}-{i}"), None);
        async move { c.controller.create_volume(req).await }
    });
    let mut ids = Vec::new();
    for r in futures_join_all(calls).await {
        let r = r.map_err(|s| format!("burst create: {s}"))?;
        ids.push(r.into_inner().volume.ok_or("no volume")?.volume_id);
    }
    t.burst_create_wall = ms(start.elapsed());
    let start = Instant::now();
    let calls = ids.into_iter().map(|id| {
        let mut c = c.clone();
        let req = DeleteVolumeRequest {
            volume_id: id,
            secrets: secrets(env),
        };
        async move { c.controller.delete_volume(req).await }
    });
    for r in futures_join_all(calls).await {
        r.map_err(|s| format!("burst delete: {s}"))?;
    }
    t.burst_delete_wall = ms(start.elapsed());
    Ok(())
}

/// The side-by-side report, Lodestone's controller (`lodestone`, already
/// up) against ceph-csi's.
pub async fn side_by_side(
    env: &Env,
    run: &str,
    lodestone: &Client,
    lodestone_mem: impl Fn() -> Mem,
    lodestone_node_mem: Mem,
    bin: &str,
) -> R<String> {
    let k = CephCsi::start(env, bin, true).await?;
    let idle = k.memory();
    let mut ours = Times::default();
    let mut theirs = Times::default();
    // The first call of each connects to the cluster: not counted.
    let mut warm = Times::default();
    round(
        &mut k.client.clone(),
        env,
        &format!("bench-{run}-kwarm"),
        &mut warm,
    )
    .await?;
    for i in 0..ROUNDS {
        let lodestone_first = i % 2 == 0;
        for ls in [lodestone_first, !lodestone_first] {
            if ls {
                let name = format!("bench-{run}-sbs-l{i}");
                round(&mut lodestone.clone(), env, &name, &mut ours).await?;
            } else {
                let name = format!("bench-{run}-sbs-k{i}");
                round(&mut k.client.clone(), env, &name, &mut theirs).await?;
            }
        }
    }
    burst(lodestone, env, &format!("bench-{run}-sbsb-l"), &mut ours).await?;
    burst(&k.client, env, &format!("bench-{run}-sbsb-k"), &mut theirs).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (ours_mem, theirs_mem) = (lodestone_mem(), k.memory());
    drop(k);
    // ceph-csi's node plugin loads the rbd kernel module at start: where
    // there is none (this host), it does not start.
    let theirs_node = match CephCsi::start(env, bin, false).await {
        Ok(node) => {
            tokio::time::sleep(Duration::from_secs(1)).await;
            format!("{:.1}", node.memory().rss as f64 / 1024.0)
        }
        Err(e) => {
            let why = e.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("");
            eprintln!("ceph-csi node plugin: {why}");
            "did not start here (no rbd kernel module)".to_string()
        }
    };

    let mib = |m: &Mem| m.rss as f64 / 1024.0;
    let mut out = format!(
        "\n### Side by side with ceph-csi\n\n{ROUNDS} rounds, each making, snapshotting, restoring \
         and deleting one 16 MiB volume through each driver (the order flips every round), \
         then {BURST} creates at once and {BURST} deletes at once through each:\n\n\
         | call (p50, ms) | Lodestone | ceph-csi | ratio |\n|---|--:|--:|--:|\n"
    );
    let rows: [(&str, &Vec<f64>, &Vec<f64>); 5] = [
        ("CreateVolume", &ours.create, &theirs.create),
        ("CreateSnapshot", &ours.snapshot, &theirs.snapshot),
        ("CreateVolume from snapshot", &ours.restore, &theirs.restore),
        ("DeleteVolume", &ours.delete, &theirs.delete),
        (
            "DeleteSnapshot",
            &ours.delete_snapshot,
            &theirs.delete_snapshot,
        ),
    ];
    for (what, a, b) in rows {
        let (a, b) = (p50(a), p50(b));
        out.push_str(&format!("| {what} | {a:.1} | {b:.1} | {:.2} |\n", a / b));
    }
    for (what, a, b) in [
        (
            format!("{BURST} creates at once, all done"),
            ours.burst_create_wall,
            theirs.burst_create_wall,
        ),
        (
            format!("{BURST} deletes at once, all done"),
            ours.burst_delete_wall,
            theirs.burst_delete_wall,
        ),
    ] {
        out.push_str(&format!("| {what} | {a:.1} | {b:.1} | {:.2} |\n", a / b));
    }
    out.push_str(&format!(
        "\n| memory (VmRSS, MiB) | Lodestone | ceph-csi |\n|---|--:|--:|\n\
         | controller, after the run | {:.1} | {:.1} |\n\
         | ceph-csi controller, idle after start | | {:.1} |\n\
         | node plugin, idle | {:.1} | {} |\n",
        mib(&ours_mem),
        mib(&theirs_mem),
        mib(&idle),
        mib(&lodestone_node_mem),
        theirs_node,
    ));
    Ok(out)
}
