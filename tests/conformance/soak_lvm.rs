//! Crash soak on real LVM: randomized `kill -9` of the driver in the middle
//! of every kind of multi-step call, in both device classes, then a restart
//! and a retry of the same request, which must converge; at the end a leak
//! audit of LVs, device-mapper devices, mounts and loop devices.
//!
//! The test command runs a small sample (`LODESTONE_SOAK_TRIALS`, default
//! 6); `scripts/crash-soak.sh N` runs N trials in the guest (1,000 by
//! default). `LODESTONE_SOAK_SEED` replays a run: the seed is printed first.
//!
//! Each trial picks an operation the current state allows (create, snapshot,
//! restore, clone, expand, delete, stage) in a random class, starts it, kills
//! the driver after a random delay (0 to 2.5 s: under emulation that lands
//! anywhere from before the first lvm command to after the reply), restarts
//! it on the same socket, and retries the same request until it answers OK
//! (ABORTED "in progress" is retried). The model then checks what the retry
//! says: the same id as any earlier answer, the requested size, and the data
//! a restore or clone must show (a marker written at offset 0 of each volume
//! when it was made).

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use lodestone::csi;
use lodestone::csi::volume_content_source::{SnapshotSource, Type as SourceType, VolumeSource};
use lodestone::lvm::ids::{Kind, LvmKind};
use tonic::Code;

use crate::common::*;

const SIZE: i64 = 64 * MIB;
/// Most volumes alive at once (the fixture's VGs hold 1.5 GiB each).
const MAX_VOLUMES: usize = 6;
const MAX_SNAPSHOTS: usize = 4;
/// How long a retried call may keep answering "in progress".
const CONVERGE: Duration = Duration::from_secs(600);

/// A small deterministic generator (xorshift64*), so a seed replays a run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

#[derive(Debug, Clone)]
struct Volume {
    name: String,
    id: String,
    class: &'static str,
    size: i64,
    /// What offset 0 of the volume holds.
    marker: String,
}

#[derive(Debug, Clone)]
struct Snapshot {
    name: String,
    id: String,
    class: &'static str,
    size: i64,
    marker: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Create,
    Snapshot,
    Restore,
    Clone,
    Expand,
    DeleteVolume,
    DeleteSnapshot,
    Stage,
}

fn device(class: &str, volume_name: &str) -> PathBuf {
    let vg = if class == THIN { THIN_VG } else { THICK_VG };
    let lv = Kind::Volume.lv_name(&Kind::Volume.key_for_name(volume_name));
    PathBuf::from(format!("/dev/{vg}/{lv}"))
}

/// The volume's device node, activated first if it is not (restores and
/// clones may be left inactive until they are staged).
fn active_device(v: &Volume) -> PathBuf {
    let dev = device(v.class, &v.name);
    if !dev.exists() {
        let lv = format!(
            "{}/{}",
            dev.parent().unwrap().file_name().unwrap().to_string_lossy(),
            dev.file_name().unwrap().to_string_lossy()
        );
        let st = std::process::Command::new("lvm")
            .args(["lvchange", "-ay", "-K", &lv])
            .status()
            .expect("run lvchange");
        assert!(st.success(), "lvchange -ay {lv} failed");
    }
    dev
}

fn write_marker(v: &Volume) {
    let mut block = vec![0u8; 4096];
    block[..v.marker.len()].copy_from_slice(v.marker.as_bytes());
    let dev = active_device(v);
    let mut f = OpenOptions::new()
        .write(true)
        .open(&dev)
        .unwrap_or_else(|e| panic!("open {}: {e}", dev.display()));
    f.write_all(&block).expect("write marker");
    f.sync_all().expect("sync marker");
}

fn read_marker(v: &Volume) -> String {
    let dev = active_device(v);
    let mut block = vec![0u8; 4096];
    OpenOptions::new()
        .read(true)
        .open(&dev)
        .and_then(|mut f| f.read_exact(&mut block))
        .unwrap_or_else(|e| panic!("read {}: {e}", dev.display()));
    let end = block.iter().position(|b| *b == 0).unwrap_or(block.len());
    String::from_utf8_lossy(&block[..end]).into_owned()
}

/// Device-mapper devices of Lodestone's LVs (and their layers: `-cow`,
/// `-real`) in the fixture's VGs. LVM escapes '-' as "--" in dm names; the
/// thin pool's own layers (`-tpool`, `_tdata`, `_tmeta`) come and go with
/// the pool's use and are not ours.
fn dm_devices() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir("/dev/mapper")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| {
                    ["lodestone--thin-", "lodestone--thick-"]
                        .iter()
                        .any(|vg| n.strip_prefix(vg).is_some_and(|lv| lv.starts_with("ld")))
                })
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn loop_devices() -> usize {
    std::fs::read_dir("/sys/block")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    name.starts_with("loop") && e.path().join("loop/backing_file").exists()
                })
                .count()
        })
        .unwrap_or(0)
}

fn env_u64(key: &str) -> Option<u64> {
    std::env::var(key).ok().and_then(|v| v.parse().ok())
}

struct Soak {
    rng: Rng,
    driver: Option<Driver>,
    volumes: Vec<Volume>,
    snapshots: Vec<Snapshot>,
    /// Request name -> the id an answer gave for it (a retry must agree).
    ids: BTreeMap<String, String>,
    kills: usize,
}

fn builder() -> DriverBuilder {
    Driver::builder().arg("--copy-wait-seconds").arg("1")
}

impl Soak {
    fn d(&self) -> &Driver {
        self.driver.as_ref().expect("driver running")
    }

    /// SIGKILL the driver and start a new one on the same directory.
    async fn kill_and_restart(&mut self) {
        let d = self.driver.take().expect("driver running");
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(d.pid()),
            nix::sys::signal::Signal::SIGKILL,
        );
        let (_, dir) = d.stop_and_keep_dir();
        self.kills += 1;
        let d = builder().start_in(dir).await;
        for v in &self.volumes {
            d.track(&v.id);
        }
        self.driver = Some(d);
    }

    /// Sends `call` once in the background, kills the driver after a random
    /// delay, restarts it, then retries `call` until it answers OK.
    async fn crash_then_converge<T, F, Fut>(&mut self, what: &str, call: F) -> T
    where
        F: Fn(
            csi::controller_client::ControllerClient<tonic::transport::Channel>,
            csi::node_client::NodeClient<tonic::transport::Channel>,
        ) -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>> + Send + 'static,
        T: Send + 'static,
    {
        let delay = Duration::from_millis(self.rng.below(2500));
        let first = tokio::spawn(call(self.d().controller(), self.d().node()));
        tokio::time::sleep(delay).await;
        self.kill_and_restart().await;
        let _ = first.await;
        let deadline = Instant::now() + CONVERGE;
        loop {
            match call(self.d().controller(), self.d().node()).await {
                Ok(r) => return r,
                Err(e) if e.code() == Code::Aborted && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(500)).await
                }
                Err(e) => panic!("{what} after a kill: {:?}: {}", e.code(), e.message()),
            }
        }
    }

    fn same_id(&mut self, name: &str, id: &str) {
        let first = self
            .ids
            .entry(name.to_string())
            .or_insert_with(|| id.to_string());
        assert_eq!(first, id, "request {name} answered with two ids");
    }

    fn choose(&mut self) -> Op {
        let mut ops = vec![Op::Create];
        if !self.volumes.is_empty() {
            ops.extend([
                Op::Snapshot,
                Op::Clone,
                Op::Expand,
                Op::DeleteVolume,
                Op::Stage,
            ]);
        }
        if !self.snapshots.is_empty() {
            ops.extend([Op::Restore, Op::DeleteSnapshot]);
        }
        if self.volumes.len() >= MAX_VOLUMES {
            ops.retain(|o| !matches!(o, Op::Create | Op::Clone | Op::Restore));
        }
        if self.snapshots.len() >= MAX_SNAPSHOTS {
            ops.retain(|o| *o != Op::Snapshot);
        }
        *self.rng.pick(&ops)
    }

    async fn new_volume(
        &mut self,
        what: &str,
        class: &'static str,
        size: i64,
        source: Option<SourceType>,
        expect_marker: Option<String>,
    ) {
        let name = unique_name("soak");
        let mut req = create_req(&name, class, block_cap(), size, 0);
        req.volume_content_source = source.map(|t| csi::VolumeContentSource { r#type: Some(t) });
        let v = self
            .crash_then_converge(what, move |mut c, _| {
                let req = req.clone();
                async move { c.create_volume(req).await.map(|r| r.into_inner()) }
            })
            .await
            .volume
            .expect("reply without volume");
        self.same_id(&name, &v.volume_id);
        self.d().track(&v.volume_id);
        assert!(
            v.capacity_bytes >= size,
            "{what}: {} < {size}",
            v.capacity_bytes
        );
        let mut vol = Volume {
            name: name.clone(),
            id: v.volume_id,
            class,
            size: v.capacity_bytes,
            marker: String::new(),
        };
        if let Some(m) = expect_marker {
            assert_eq!(
                read_marker(&vol),
                m,
                "{what}: the new volume shows other data"
            );
        }
        vol.marker = format!("soak:{name}");
        write_marker(&vol);
        self.volumes.push(vol);
    }

    async fn trial(&mut self) {
        let op = self.choose();
        let class = *self.rng.pick(&[THIN, THICK]);
        eprintln!("[soak] trial: {op:?} (class {class})");
        match op {
            Op::Create => {
                self.new_volume("CreateVolume", class, SIZE, None, None)
                    .await
            }
            Op::Clone => {
                let src = self.rng.pick(&self.volumes).clone();
                let source = SourceType::Volume(VolumeSource {
                    volume_id: src.id.clone(),
                });
                let m = src.marker.clone();
                self.new_volume("clone", src.class, src.size, Some(source), Some(m))
                    .await
            }
            Op::Restore => {
                let snap = self.rng.pick(&self.snapshots).clone();
                let source = SourceType::Snapshot(SnapshotSource {
                    snapshot_id: snap.id.clone(),
                });
                let m = snap.marker.clone();
                self.new_volume("restore", snap.class, snap.size, Some(source), Some(m))
                    .await
            }
            Op::Snapshot => {
                let src = self.rng.pick(&self.volumes).clone();
                let name = unique_name("soaksnap");
                let req = csi::CreateSnapshotRequest {
                    name: name.clone(),
                    source_volume_id: src.id.clone(),
                    ..Default::default()
                };
                let deadline = Instant::now() + CONVERGE;
                let mut s = self
                    .crash_then_converge("CreateSnapshot", |mut c, _| {
                        let req = req.clone();
                        async move { c.create_snapshot(req).await.map(|r| r.into_inner()) }
                    })
                    .await
                    .snapshot
                    .expect("reply without snapshot");
                while !s.ready_to_use {
                    assert!(Instant::now() < deadline, "snapshot never ready: {s:?}");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    let r = self.d().controller().create_snapshot(req.clone()).await;
                    s = expect_ok(r, "CreateSnapshot (waiting for ready)")
                        .snapshot
                        .expect("reply without snapshot");
                }
                self.same_id(&name, &s.snapshot_id);
                self.snapshots.push(Snapshot {
                    name,
                    id: s.snapshot_id,
                    class: src.class,
                    size: s.size_bytes,
                    marker: src.marker,
                });
            }
            Op::Expand => {
                let i = self.rng.below(self.volumes.len() as u64) as usize;
                let v = self.volumes[i].clone();
                let want = v.size + 32 * MIB;
                let req = csi::ControllerExpandVolumeRequest {
                    volume_id: v.id.clone(),
                    capacity_range: range(want, 0),
                    ..Default::default()
                };
                let r = self
                    .crash_then_converge("ControllerExpandVolume", |mut c, _| {
                        let req = req.clone();
                        async move {
                            c.controller_expand_volume(req)
                                .await
                                .map(|r| r.into_inner())
                        }
                    })
                    .await;
                assert!(r.capacity_bytes >= want, "expanded to {r:?}, wanted {want}");
                assert_eq!(read_marker(&v), v.marker, "expansion changed the data");
                self.volumes[i].size = r.capacity_bytes;
            }
            Op::DeleteVolume => {
                let i = self.rng.below(self.volumes.len() as u64) as usize;
                let v = self.volumes.remove(i);
                let id = v.id.clone();
                self.crash_then_converge("DeleteVolume", |mut c, _| {
                    let req = csi::DeleteVolumeRequest {
                        volume_id: id.clone(),
                        ..Default::default()
                    };
                    async move { c.delete_volume(req).await.map(|r| r.into_inner()) }
                })
                .await;
                assert!(
                    !device(v.class, &v.name).exists(),
                    "DeleteVolume answered OK but {} is still there",
                    v.id
                );
            }
            Op::DeleteSnapshot => {
                let i = self.rng.below(self.snapshots.len() as u64) as usize;
                let s = self.snapshots.remove(i);
                let id = s.id.clone();
                self.crash_then_converge("DeleteSnapshot", |mut c, _| {
                    let req = csi::DeleteSnapshotRequest {
                        snapshot_id: id.clone(),
                        ..Default::default()
                    };
                    async move { c.delete_snapshot(req).await.map(|r| r.into_inner()) }
                })
                .await;
                let left: Vec<_> = lodestone_lvs()
                    .into_iter()
                    .filter(|lv| {
                        lv.name == Kind::Snapshot.lv_name(&Kind::Snapshot.key_for_name(&s.name))
                    })
                    .collect();
                assert!(
                    left.is_empty(),
                    "DeleteSnapshot answered OK but left {left:?}"
                );
            }
            Op::Stage => {
                let v = self.rng.pick(&self.volumes).clone();
                let staging = self.d().path_str(&format!("stage-{}", v.name));
                std::fs::create_dir_all(&staging).expect("staging dir");
                let req = csi::NodeStageVolumeRequest {
                    volume_id: v.id.clone(),
                    staging_target_path: staging.clone(),
                    volume_capability: Some(block_cap()),
                    ..Default::default()
                };
                self.crash_then_converge("NodeStageVolume", |_, mut n| {
                    let req = req.clone();
                    async move { n.node_stage_volume(req).await.map(|r| r.into_inner()) }
                })
                .await;
                let unstage = csi::NodeUnstageVolumeRequest {
                    volume_id: v.id.clone(),
                    staging_target_path: staging.clone(),
                };
                self.crash_then_converge("NodeUnstageVolume", |_, mut n| {
                    let req = unstage.clone();
                    async move { n.node_unstage_volume(req).await.map(|r| r.into_inner()) }
                })
                .await;
                assert!(
                    !is_mount_point(&PathBuf::from(&staging).join("device")),
                    "unstage left the device bound"
                );
                assert_eq!(read_marker(&v), v.marker, "stage changed the data");
            }
        }
    }

    /// Deletes what the trials left. ABORTED is retried, as a CO does: a
    /// restarted driver may still be removing a temporary snapshot a crash
    /// left behind.
    async fn delete_everything(&mut self) {
        for s in std::mem::take(&mut self.snapshots) {
            let req = csi::DeleteSnapshotRequest {
                snapshot_id: s.id.clone(),
                ..Default::default()
            };
            let r = retry_aborted(|| async {
                let r = self.d().controller().delete_snapshot(req.clone()).await;
                r.map(|r| r.map(|_| ()))
            })
            .await;
            expect_ok(r, &format!("DeleteSnapshot({})", s.id));
        }
        for v in std::mem::take(&mut self.volumes) {
            let req = csi::DeleteVolumeRequest {
                volume_id: v.id.clone(),
                ..Default::default()
            };
            let r = retry_aborted(|| async {
                let r = self.d().controller().delete_volume(req.clone()).await;
                r.map(|r| r.map(|_| ()))
            })
            .await;
            expect_ok(r, &format!("DeleteVolume({})", v.id));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_soak() {
    if skip_without_lvm() {
        return;
    }
    let trials = env_u64("LODESTONE_SOAK_TRIALS").unwrap_or(6);
    let seed = env_u64("LODESTONE_SOAK_SEED").unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            | 1
    });
    eprintln!("[soak] {trials} trials, LODESTONE_SOAK_SEED={seed}");
    let dm_before = dm_devices();
    let loops_before = loop_devices();
    let mut soak = Soak {
        rng: Rng(seed),
        driver: Some(builder().start().await),
        volumes: Vec::new(),
        snapshots: Vec::new(),
        ids: BTreeMap::new(),
        kills: 0,
    };
    let started = Instant::now();
    for t in 0..trials {
        soak.trial().await;
        if (t + 1) % 10 == 0 {
            eprintln!("[soak] {} trials in {:?}", t + 1, started.elapsed());
        }
    }
    soak.delete_everything().await;
    eprintln!(
        "[soak] {trials} trials, {} kills, {:?}; auditing",
        soak.kills,
        started.elapsed()
    );
    drop(soak.driver.take());

    let lvs = lodestone_lvs();
    assert!(lvs.is_empty(), "LVs left behind: {lvs:#?}");
    let all = list_lvs();
    let temps: Vec<_> = all.iter().filter(|lv| lv.name.starts_with("ld")).collect();
    assert!(
        temps.is_empty(),
        "untagged LVs of ours left behind: {temps:#?}"
    );
    let dm_after = dm_devices();
    assert_eq!(dm_after, dm_before, "device-mapper devices leaked");
    assert_eq!(loop_devices(), loops_before, "loop devices leaked");
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let mounted: Vec<&str> = mountinfo
        .lines()
        .filter(|l| l.contains("lodestone-ct-") || l.contains(THIN_VG) || l.contains(THICK_VG))
        .collect();
    assert!(mounted.is_empty(), "mounts left behind: {mounted:#?}");
}

/// Calls `call` until it answers something other than ABORTED, for at
/// most two minutes.
async fn retry_aborted<F, Fut>(mut call: F) -> Result<tonic::Response<()>, tonic::Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<()>, tonic::Status>>,
{
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match call().await {
            Err(e) if e.code() == Code::Aborted && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(500)).await
            }
            r => return r,
        }
    }
}
