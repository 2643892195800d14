//! Crashes at every step boundary of the LVM multi-step operations (guest
//! only, with `LODESTONE_TEST_LVM=1`).
//!
//! Each test arms the fail points of one operation at once
//! (`LODESTONE_FAILPOINTS`), runs the operation against the real
//! `lodestone` binary (`--mode all`) and, each time the process dies at a
//! point, restarts it in the same directory with that point disarmed and
//! retries the same request, until the request succeeds. Then: the same id,
//! every armed point was reached, one LV per request (no `ldtmp-*` left), the
//! data exactly as written. A chain of restarts per operation keeps the
//! number of driver starts (seconds each under emulation) at one per point.
//!
//! Also here: thick temporary snapshots are zeroed before their extents go
//! back to the VG, and a thin pool made after the start is made safe (zero
//! new blocks, error when full) on its first use.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use lodestone::csi;
use lodestone::csi::controller_client::ControllerClient;
use lodestone::csi::volume_content_source::{SnapshotSource, Type as SourceType};
use lodestone::lvm::ids::{Kind, LvmKind};
use tonic::transport::Channel;
use tonic::Code;

use crate::common::*;

const SIZE: i64 = 64 * MIB;
/// How long one operation may take to converge in the guest.
const CONVERGE: Duration = Duration::from_secs(300);
/// How long a process that reached a fail point may take to die.
const DIE: Duration = Duration::from_secs(60);

/// `len` pseudo-random bytes from `seed`, every 4 KiB block stamped with its
/// index so a misplaced block is noticed.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    for (i, block) in out.chunks_mut(4096).enumerate() {
        block[..8].copy_from_slice(&(seed << 40 ^ i as u64).to_le_bytes());
    }
    out
}

/// Writes `data` at the start of a block device, bypassing the page cache.
fn write_dev(dev: &PathBuf, data: &[u8]) {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(nix::libc::O_DIRECT)
        .open(dev)
        .unwrap_or_else(|e| panic!("open {}: {e}", dev.display()));
    let mut buf = AlignedBuf::new(data.len());
    buf.as_mut().copy_from_slice(data);
    f.write_all(buf.as_mut()).expect("write device");
    f.sync_all().expect("fsync device");
}

/// The first `len` bytes of a block device, bypassing the page cache.
fn read_dev(dev: &PathBuf, len: usize) -> Vec<u8> {
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_DIRECT)
        .open(dev)
        .unwrap_or_else(|e| panic!("open {}: {e}", dev.display()));
    let mut buf = AlignedBuf::new(len);
    f.read_exact(buf.as_mut()).expect("read device");
    buf.as_mut().to_vec()
}

/// 4 KiB-aligned memory for O_DIRECT.
struct AlignedBuf {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl AlignedBuf {
    fn new(len: usize) -> Self {
        let layout = std::alloc::Layout::from_size_align(len, 4096).expect("layout");
        // SAFETY: len > 0 in every use; freed in Drop with the same layout.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null(), "allocation failed");
        AlignedBuf { ptr, layout }
    }
    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: ptr holds layout.size() initialized bytes, owned by self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in new() with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}

fn lvm(args: &[&str]) -> String {
    let out = Command::new("lvm")
        .args(args)
        .env("LVM_SUPPRESS_FD_WARNINGS", "1")
        .output()
        .expect("run lvm");
    assert!(
        out.status.success(),
        "lvm {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The device of the LV of a volume or snapshot id in `vg`.
fn dev_of(kind: Kind, vg: &str, id: &str) -> PathBuf {
    let key = id.rsplit(':').next().expect("id with a key");
    PathBuf::from(format!("/dev/{vg}/{}", kind.lv_name(key)))
}

/// LVs (in the fixture's VGs) created for request `name`.
fn lvs_named(name: &str) -> Vec<Lv> {
    let hexed: String = name.bytes().map(|b| format!("{b:02x}")).collect();
    let tag = format!("lodestone.v1.name={hexed}");
    list_lvs()
        .into_iter()
        .filter(|lv| lv.tags.contains(&tag))
        .collect()
}

fn temp_lvs() -> Vec<String> {
    list_lvs()
        .into_iter()
        .filter(|lv| lv.name.starts_with("ldtmp-"))
        .map(|lv| format!("{}/{}", lv.vg, lv.name))
        .collect()
}

/// Whether the process is gone or a zombie.
fn dead(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .and_then(|rest| rest.split_whitespace().next())
            .is_some_and(|state| state == "Z" || state == "X"),
    }
}

fn reached_in(log: &str) -> Vec<String> {
    log.lines()
        .filter_map(|l| l.split("lodestone: fail point ").nth(1))
        .filter_map(|l| l.strip_suffix(" reached"))
        .map(String::from)
        .collect()
}

/// A driver whose armed fail points are `armed`.
async fn start_armed(dir: tempfile::TempDir, armed: &[String]) -> Driver {
    try_start_armed(dir, armed)
        .await
        .unwrap_or_else(|log| panic!("the driver did not start: {log}"))
}

/// A driver whose armed fail points are `armed`, or, when it died while
/// starting (a point crossed by work the start does, e.g. removing leftover
/// temporary snapshots), what the fixture said about it, log included.
async fn try_start_armed(dir: tempfile::TempDir, armed: &[String]) -> Result<Driver, String> {
    let mut b = Driver::builder();
    if !armed.is_empty() {
        b = b.env("LODESTONE_FAILPOINTS", &armed.join(","));
    }
    match tokio::spawn(b.start_in(dir)).await {
        Ok(d) => Ok(d),
        Err(e) if e.is_panic() => {
            let p = e.into_panic();
            Err(p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default())
        }
        Err(e) => panic!("starting the driver: {e}"),
    }
}

/// One attempt of a request, on a fresh client of the current driver.
type Attempt<T> = std::pin::Pin<Box<dyn std::future::Future<Output = Option<T>>>>;

/// Runs `op` (one attempt of the same request: Some when it converged, None
/// to retry) against `d` with `points` armed; each time the driver dies at
/// one, restarts it without that point and retries. Returns the driver that
/// answered last and the result. Panics unless the process died with
/// SIGABRT at every point, one at a time.
async fn converge<T>(
    d: Driver,
    points: &[&str],
    what: &str,
    mut op: impl FnMut(ControllerClient<Channel>) -> Attempt<T>,
) -> (Driver, T) {
    let mut armed: Vec<String> = points.iter().map(|s| s.to_string()).collect();
    // Points an earlier operation reached are in the same (appended) log.
    let earlier = reached_in(&d.log());
    let mut reached: Vec<String> = Vec::new();
    let mut d = Some(d);
    let deadline = Instant::now() + CONVERGE;
    loop {
        assert!(
            Instant::now() < deadline,
            "{what}: no convergence in {CONVERGE:?} (reached {reached:?})"
        );
        let driver = match d.take() {
            Some(driver) => driver,
            None => match try_start_armed(new_temp_dir(), &armed).await {
                Ok(driver) => driver,
                Err(log) => {
                    let at = one_new_point(what, &log, &earlier, &reached);
                    assert!(
                        log.contains("SIGABRT") || log.contains("signal: 6"),
                        "{what}: the driver died while starting, at {at}, not by abort: {log}"
                    );
                    eprintln!("{what}: died while starting at {at} as armed; restarting");
                    armed.retain(|p| *p != at);
                    reached.push(at);
                    continue;
                }
            },
        };
        let answer = op(driver.controller()).await;
        if answer.is_none() {
            let until = Instant::now() + Duration::from_secs(3);
            while !dead(driver.pid()) && Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        if !dead(driver.pid()) {
            match answer {
                Some(t) => {
                    assert!(
                        armed.is_empty(),
                        "{what}: converged without reaching {armed:?} (reached {reached:?})"
                    );
                    return (driver, t);
                }
                None => {
                    d = Some(driver);
                    continue;
                }
            }
        }
        let log = driver.log();
        let (status, _) = driver.stop_and_keep_dir();
        let at = one_new_point(what, &log, &earlier, &reached);
        assert_eq!(
            status.and_then(|s| s.signal()),
            Some(nix::libc::SIGABRT),
            "{what}: the driver died at {at} with {status:?}"
        );
        eprintln!("{what}: died at {at} as armed; restarting");
        armed.retain(|p| *p != at);
        reached.push(at);
    }
}

/// The one fail point reached in `log` that was not reached before.
#[track_caller]
fn one_new_point(what: &str, log: &str, earlier: &[String], reached: &[String]) -> String {
    let now: Vec<String> = reached_in(log)
        .into_iter()
        .filter(|p| !reached.contains(p) && !earlier.contains(p))
        .collect();
    assert_eq!(
        now.len(),
        1,
        "{what}: the driver died at {now:?}, expected one new fail point; log:\n{log}"
    );
    now[0].clone()
}

/// Waits until a driver that reached a point in the background is dead.
async fn await_death(d: &Driver) {
    let until = Instant::now() + DIE;
    while !dead(d.pid()) && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn snapshot_source(id: &str) -> csi::VolumeContentSource {
    csi::VolumeContentSource {
        r#type: Some(SourceType::Snapshot(SnapshotSource {
            snapshot_id: id.to_string(),
        })),
    }
}

/// One attempt of a request: Some(reply) on OK, None on an error a CO
/// retries (ABORTED, or the connection gone with the process).
fn retryable<T>(r: Result<tonic::Response<T>, tonic::Status>, what: &str) -> Option<T> {
    match r {
        Ok(r) => Some(r.into_inner()),
        Err(e)
            if matches!(
                e.code(),
                Code::Aborted | Code::Unavailable | Code::Unknown | Code::Cancelled
            ) =>
        {
            eprintln!("{what}: {:?}: {}", e.code(), e.message());
            None
        }
        Err(e) => panic!("{what}: {:?}: {}", e.code(), e.message()),
    }
}

async fn delete_volume(d: &Driver, id: &str) {
    let deadline = Instant::now() + CONVERGE;
    loop {
        let r = d
            .controller()
            .delete_volume(csi::DeleteVolumeRequest {
                volume_id: id.to_string(),
                ..Default::default()
            })
            .await;
        match r {
            Err(e) if e.code() == Code::Aborted && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_secs(1)).await
            }
            r => {
                expect_ok(r, &format!("DeleteVolume({id})"));
                return;
            }
        }
    }
}

async fn delete_snapshot(d: &Driver, id: &str) {
    let deadline = Instant::now() + CONVERGE;
    loop {
        let r = d
            .controller()
            .delete_snapshot(csi::DeleteSnapshotRequest {
                snapshot_id: id.to_string(),
                ..Default::default()
            })
            .await;
        match r {
            Err(e) if e.code() == Code::Aborted && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_secs(1)).await
            }
            r => {
                expect_ok(r, &format!("DeleteSnapshot({id})"));
                return;
            }
        }
    }
}

/// Thin: a blank create, then a restore into a larger size (a thin snapshot
/// grown right after), crash at each step; then the same for deleting.
#[tokio::test]
async fn thin_create_and_larger_restore_converge_after_crashes() {
    if skip_without_lvm() {
        return;
    }
    let d = start_armed(new_temp_dir(), &["lvm.create.after_lvcreate".to_string()]).await;

    let src_name = unique_name("crashthin");
    let req = create_req(&src_name, THIN, block_cap(), SIZE, 0);
    let (d, src) = converge(
        d,
        &["lvm.create.after_lvcreate"],
        "thin CreateVolume",
        |mut c| {
            let req = req.clone();
            Box::pin(async move { retryable(c.create_volume(req).await, "create") })
        },
    )
    .await;
    let src = src.volume.expect("volume");
    d.track(&src.volume_id);
    assert_eq!(src.capacity_bytes, SIZE);
    assert_eq!(lvs_named(&src_name).len(), 1, "one LV for the source");
    let data = pattern(7, MIB as usize);
    let src_dev = dev_of(Kind::Volume, THIN_VG, &src.volume_id);
    write_dev(&src_dev, &data);

    let snap_name = unique_name("crashthinsnap");
    let snap = expect_ok(
        d.controller()
            .create_snapshot(csi::CreateSnapshotRequest {
                name: snap_name.clone(),
                source_volume_id: src.volume_id.clone(),
                ..Default::default()
            })
            .await,
        "CreateSnapshot",
    )
    .snapshot
    .expect("snapshot");
    assert!(snap.ready_to_use);

    // The restore, twice as large: snapshot, crash, grow, crash, answer.
    let points = ["lvm.thin_clone.after_snapshot", "lvm.expand.after_lvextend"];
    let (_, dir) = d.stop_and_keep_dir();
    let d = start_armed(dir, &points.map(String::from)).await;
    let name = unique_name("crashthinrestore");
    let mut req = create_req(&name, THIN, block_cap(), 2 * SIZE, 0);
    req.volume_content_source = Some(snapshot_source(&snap.snapshot_id));
    let (d, restored) = converge(d, &points, "larger thin restore", |mut c| {
        let req = req.clone();
        Box::pin(async move { retryable(c.create_volume(req).await, "restore") })
    })
    .await;
    let restored = restored.volume.expect("volume");
    d.track(&restored.volume_id);
    d.track(&src.volume_id);
    assert_eq!(restored.capacity_bytes, 2 * SIZE, "{restored:?}");
    let lvs = lvs_named(&name);
    assert_eq!(lvs.len(), 1, "one LV for the restore: {lvs:?}");
    assert_eq!(lvs[0].size_bytes, 2 * SIZE as u64, "{lvs:?}");
    // The same id again, and the data of the snapshot.
    let again = expect_ok(d.controller().create_volume(req.clone()).await, "retry")
        .volume
        .expect("volume");
    assert_eq!(again.volume_id, restored.volume_id);
    assert_eq!(again.capacity_bytes, 2 * SIZE);
    let dev = dev_of(Kind::Volume, THIN_VG, &restored.volume_id);
    assert!(
        read_dev(&dev, data.len()) == data,
        "the restore does not hold the snapshot's data"
    );

    delete_volume(&d, &restored.volume_id).await;
    delete_snapshot(&d, &snap.snapshot_id).await;
    delete_volume(&d, &src.volume_id).await;
    assert!(lvs_named(&name).is_empty() && lvs_named(&src_name).is_empty());
}

/// Thick: a snapshot of a live volume (target, cut, copy, untag, temporary
/// snapshot split and zeroed), crash at each step; the snapshot holds the
/// data at the cut, not writes made after it. Then deleting it, crash at
/// each step.
#[tokio::test]
async fn thick_snapshot_and_delete_converge_after_crashes() {
    if skip_without_lvm() {
        return;
    }
    let points = [
        "lvm.copy.after_target",
        "lvm.copy.after_temp_snapshot",
        "lvm.copy.after_blocks",
        "lvm.copy.after_untag",
        "lvm.temp_remove.after_split",
        "lvm.temp_remove.after_zero",
    ];
    let d = start_armed(new_temp_dir(), &points.map(String::from)).await;
    let src = d
        .create(&unique_name("crashthick"), THICK, block_cap(), SIZE, 0)
        .await;
    let src_dev = dev_of(Kind::Volume, THICK_VG, &src.volume_id);
    let at_cut = pattern(11, SIZE as usize);
    write_dev(&src_dev, &at_cut);
    let late = pattern(12, 4 * MIB as usize);

    let name = unique_name("crashthicksnap");
    let req = csi::CreateSnapshotRequest {
        name: name.clone(),
        source_volume_id: src.volume_id.clone(),
        ..Default::default()
    };
    let late = std::rc::Rc::new(late);
    let late_written = std::rc::Rc::new(std::cell::Cell::new(false));
    let (d, snap) = converge(d, &points, "thick CreateSnapshot", |mut c| {
        let (req, late, src_dev) = (req.clone(), late.clone(), src_dev.clone());
        let name = name.clone();
        let late_written = late_written.clone();
        Box::pin(async move {
            // Once the cut exists (its temporary snapshot) and its target
            // (so an answer may have been given), the application writes
            // again.
            if !late_written.get() && !temp_lvs().is_empty() && !lvs_named(&name).is_empty() {
                write_dev(&src_dev, &late);
                late_written.set(true);
            }
            let s = retryable(c.create_snapshot(req).await, "snapshot")?
                .snapshot
                .expect("snapshot");
            // Ready, and no temporary snapshot left (a restart removes
            // those of completed copies in the background).
            if !s.ready_to_use || !temp_lvs().is_empty() {
                tokio::time::sleep(Duration::from_secs(1)).await;
                return None;
            }
            Some(s)
        })
    })
    .await;
    d.track(&src.volume_id);
    assert!(late_written.get(), "the cut was never seen");
    let lvs = lvs_named(&name);
    assert_eq!(lvs.len(), 1, "one LV for the snapshot: {lvs:?}");
    assert!(
        !lvs[0]
            .tags
            .iter()
            .any(|t| t.contains("copying") || t.contains("copyfailed")),
        "{lvs:?}"
    );
    assert_eq!(temp_lvs(), Vec::<String>::new(), "temporary LVs left");
    let snap_dev = dev_of(Kind::Snapshot, THICK_VG, &snap.snapshot_id);
    assert!(
        read_dev(&snap_dev, at_cut.len()) == at_cut,
        "the snapshot does not hold the data at its cut"
    );

    // Deleting it: crash before and after lvremove.
    let points = ["lvm.delete.before_lvremove", "lvm.delete.after_lvremove"];
    let (_, dir) = d.stop_and_keep_dir();
    let d = start_armed(dir, &points.map(String::from)).await;
    let id = snap.snapshot_id.clone();
    let (d, ()) = converge(d, &points, "thick DeleteSnapshot", |mut c| {
        let id = id.clone();
        Box::pin(async move {
            let r = c
                .delete_snapshot(csi::DeleteSnapshotRequest {
                    snapshot_id: id,
                    ..Default::default()
                })
                .await;
            retryable(r, "delete snapshot").map(|_| ())
        })
    })
    .await;
    assert!(lvs_named(&name).is_empty(), "the snapshot's LV is left");
    delete_volume(&d, &src.volume_id).await;
}

/// A thick temporary snapshot's COW area holds the source's old blocks; it
/// is zeroed before its extents go back to the VG. The source is filled
/// with a marker, cut and its snapshot LV made (the driver dies right after),
/// overwritten (so the COW area holds the marker), and everything is deleted;
/// an LV over all free space of the VG then holds no marker.
#[tokio::test]
async fn thick_temporary_snapshot_is_zeroed_before_removal() {
    if skip_without_lvm() {
        return;
    }
    let point = "lvm.copy.after_target".to_string();
    let d = start_armed(new_temp_dir(), std::slice::from_ref(&point)).await;
    let src = d
        .create(&unique_name("cowleak"), THICK, block_cap(), SIZE, 0)
        .await;
    let src_dev = dev_of(Kind::Volume, THICK_VG, &src.volume_id);
    let marker: [u8; 16] = *b"LDS-COW-MARKER!\n";
    let mut marked = vec![0u8; SIZE as usize];
    for block in marked.chunks_mut(4096) {
        block[..16].copy_from_slice(&marker);
    }
    write_dev(&src_dev, &marked);
    let r = d
        .controller()
        .create_snapshot(csi::CreateSnapshotRequest {
            name: unique_name("cowleaksnap"),
            source_volume_id: src.volume_id.clone(),
            ..Default::default()
        })
        .await;
    await_death(&d).await;
    assert!(dead(d.pid()), "the driver did not die at {point}: {r:?}");
    let temps = temp_lvs();
    assert_eq!(temps.len(), 1, "one temporary snapshot after the cut");
    // Overwritten after the cut: the COW area now holds the marker.
    write_dev(&src_dev, &vec![0x5a; SIZE as usize]);

    let (_, dir) = d.stop_and_keep_dir();
    let d = start_armed(dir, &[]).await;
    d.track(&src.volume_id);
    let snaps = expect_ok(
        d.controller()
            .list_snapshots(csi::ListSnapshotsRequest::default())
            .await,
        "ListSnapshots",
    );
    for e in snaps.entries {
        let s = e.snapshot.expect("snapshot");
        if s.source_volume_id == src.volume_id {
            delete_snapshot(&d, &s.snapshot_id).await;
        }
    }
    delete_volume(&d, &src.volume_id).await;
    assert_eq!(temp_lvs(), Vec::<String>::new(), "temporary LVs left");
    drop(d);

    let scan = "lodestone-ct-scan";
    lvm(&["lvcreate", "--yes", "-n", scan, "-l", "100%FREE", THICK_VG]);
    let dev = PathBuf::from(format!("/dev/{THICK_VG}/{scan}"));
    let mut f = File::open(&dev).expect("open scan LV");
    let mut buf = vec![0u8; 4 << 20];
    let (mut offset, mut found) = (0u64, Vec::new());
    loop {
        let n = f.read(&mut buf).expect("read scan LV");
        if n == 0 {
            break;
        }
        for (i, block) in buf[..n].chunks(4096).enumerate() {
            if block.len() >= 16 && block[..16] == marker {
                found.push(offset + (i as u64) * 4096);
            }
        }
        offset += n as u64;
    }
    drop(f);
    lvm(&["lvremove", "--yes", &format!("{THICK_VG}/{scan}")]);
    assert!(
        found.is_empty(),
        "{} blocks of the free space of {THICK_VG} ({offset} bytes scanned) still hold the \
         source's old data, first at {:?}",
        found.len(),
        found.first()
    );
}

/// CreateVolume in a class whose pool was made after the driver started:
/// the agent looks for a missing pool again at each heartbeat (at most
/// every 2 s) and pushes it; until then the answer is UNAVAILABLE.
async fn until_the_class_shows(
    d: &Driver,
    req: &csi::CreateVolumeRequest,
) -> Result<tonic::Response<csi::CreateVolumeResponse>, tonic::Status> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = d.controller().create_volume(req.clone()).await;
        match &r {
            Err(s) if s.code() == Code::Unavailable && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(250)).await
            }
            _ => return r,
        }
    }
}

/// A thin pool made after the driver started, neither zeroing new blocks
/// nor failing writes when full: the first create in its class sets both.
#[tokio::test]
async fn thin_pool_made_later_is_made_safe_on_first_use() {
    if skip_without_lvm() {
        return;
    }
    let pool = "ldsct-latepool";
    let mut classes = default_class_args();
    classes.extend([
        "--device-class".to_string(),
        format!("late={THIN_VG}/{pool}"),
    ]);
    let d = Driver::builder().class_args(classes).start().await;
    lvm(&[
        "lvcreate",
        "--yes",
        "--type",
        "thin-pool",
        "-L",
        "64m",
        "--zero",
        "n",
        "-n",
        pool,
        THIN_VG,
    ]);
    let attrs = || {
        lvm(&[
            "lvs",
            "--noheadings",
            "-o",
            "lv_attr,lv_when_full",
            &format!("{THIN_VG}/{pool}"),
        ])
    };
    let before = attrs();
    let req = create_req(&unique_name("latepool"), "late", block_cap(), 16 * MIB, 0);
    let v = until_the_class_shows(&d, &req)
        .await
        .expect("create in the late pool")
        .into_inner()
        .volume
        .expect("volume");
    let after = attrs();
    delete_volume(&d, &v.volume_id).await;
    lvm(&["lvremove", "--yes", &format!("{THIN_VG}/{pool}")]);
    let fields: Vec<&str> = after.split_whitespace().collect();
    assert!(
        fields.len() == 2 && fields[0].chars().nth(7) == Some('z') && fields[1] == "error",
        "pool before the create: {before:?}; after: {after:?} (want zeroing and error when full)"
    );
}

/// A thick snapshot whose cut (its temporary snapshot) is lost after the
/// target was made fails for good, across restarts: no retry copies a later
/// state under the snapshot's identity and creation time.
#[tokio::test]
async fn thick_snapshot_with_lost_cut_fails_for_good() {
    if skip_without_lvm() {
        return;
    }
    let point = "lvm.copy.after_target".to_string();
    let d = start_armed(new_temp_dir(), std::slice::from_ref(&point)).await;
    let src = d
        .create(&unique_name("lostcut"), THICK, block_cap(), SIZE, 0)
        .await;
    write_dev(
        &dev_of(Kind::Volume, THICK_VG, &src.volume_id),
        &pattern(21, MIB as usize),
    );
    let name = unique_name("lostcutsnap");
    let req = csi::CreateSnapshotRequest {
        name: name.clone(),
        source_volume_id: src.volume_id.clone(),
        ..Default::default()
    };
    let r = d.controller().create_snapshot(req.clone()).await;
    await_death(&d).await;
    assert!(dead(d.pid()), "the driver did not die at {point}: {r:?}");
    let temps = temp_lvs();
    assert_eq!(
        temps.len(),
        1,
        "the cut exists before the target: {temps:?}"
    );
    assert_eq!(lvs_named(&name).len(), 1, "the target exists");
    // The cut is lost (as when a COW snapshot overflows).
    lvm(&["lvremove", "--yes", &temps[0]]);

    let (_, dir) = d.stop_and_keep_dir();
    let mut d = start_armed(dir, &[]).await;
    d.track(&src.volume_id);
    for round in 0..2 {
        let r = d.controller().create_snapshot(req.clone()).await;
        let status = expect_code(
            r,
            Code::FailedPrecondition,
            "CreateSnapshot without its cut",
        );
        assert!(
            status.message().contains("delete it"),
            "round {round}: {}",
            status.message()
        );
        let lvs = lvs_named(&name);
        assert!(
            lvs.len() == 1 && lvs[0].tags.iter().any(|t| t == "lodestone.v1.copyfailed"),
            "round {round}: the failure is not recorded in LVM: {lvs:?}"
        );
        assert_eq!(
            temp_lvs(),
            Vec::<String>::new(),
            "round {round}: a new cut was made"
        );
        if round == 0 {
            let (_, dir) = d.stop_and_keep_dir();
            d = start_armed(dir, &[]).await;
            d.track(&src.volume_id);
        }
    }
    let listed = expect_ok(
        d.controller()
            .list_snapshots(csi::ListSnapshotsRequest {
                source_volume_id: src.volume_id.clone(),
                ..Default::default()
            })
            .await,
        "ListSnapshots",
    );
    assert_eq!(listed.entries.len(), 1, "{listed:?}");
    let s = listed.entries[0].snapshot.clone().expect("snapshot");
    assert!(!s.ready_to_use, "a failed copy listed ready: {s:?}");
    delete_snapshot(&d, &s.snapshot_id).await;
    delete_volume(&d, &src.volume_id).await;
    assert!(lvs_named(&name).is_empty());
}

/// A thick clone whose cut is lost after its target was made: the target
/// (never reported) is removed, and the retried CreateVolume starts over
/// and completes with the source's data; one LV, no temporary LV left.
#[tokio::test]
async fn thick_clone_with_lost_cut_starts_over() {
    if skip_without_lvm() {
        return;
    }
    let point = "lvm.copy.after_target".to_string();
    let d = start_armed(new_temp_dir(), std::slice::from_ref(&point)).await;
    let src = d
        .create(&unique_name("lostcutsrc"), THICK, block_cap(), SIZE, 0)
        .await;
    let data = pattern(31, SIZE as usize);
    write_dev(&dev_of(Kind::Volume, THICK_VG, &src.volume_id), &data);
    let name = unique_name("lostcutclone");
    let mut req = create_req(&name, THICK, block_cap(), SIZE, 0);
    req.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(SourceType::Volume(
            csi::volume_content_source::VolumeSource {
                volume_id: src.volume_id.clone(),
            },
        )),
    });
    let r = d.controller().create_volume(req.clone()).await;
    await_death(&d).await;
    assert!(dead(d.pid()), "the driver did not die at {point}: {r:?}");
    let temps = temp_lvs();
    assert_eq!(
        temps.len(),
        1,
        "the cut exists before the target: {temps:?}"
    );
    lvm(&["lvremove", "--yes", &temps[0]]);

    let (_, dir) = d.stop_and_keep_dir();
    let d = start_armed(dir, &[]).await;
    d.track(&src.volume_id);
    let deadline = Instant::now() + CONVERGE;
    let clone = loop {
        assert!(Instant::now() < deadline, "the clone did not complete");
        match retryable(d.controller().create_volume(req.clone()).await, "clone") {
            Some(r) => break r.volume.expect("volume"),
            None => tokio::time::sleep(Duration::from_secs(1)).await,
        }
    };
    d.track(&clone.volume_id);
    let lvs = lvs_named(&name);
    assert_eq!(lvs.len(), 1, "one LV for the clone: {lvs:?}");
    assert_eq!(temp_lvs(), Vec::<String>::new(), "temporary LVs left");
    assert!(
        read_dev(
            &dev_of(Kind::Volume, THICK_VG, &clone.volume_id),
            data.len()
        ) == data,
        "the clone does not hold the source's data"
    );
    delete_volume(&d, &clone.volume_id).await;
    delete_volume(&d, &src.volume_id).await;
}

/// Thick restore from a thick snapshot (a frozen source: no cut is taken),
/// crash after the target is made, after the blocks are copied and after
/// the `copying` tag is dropped; the retried CreateVolume answers with one
/// volume holding the snapshot's data.
#[tokio::test]
async fn thick_restore_converges_after_crashes() {
    if skip_without_lvm() {
        return;
    }
    let d = start_armed(new_temp_dir(), &[]).await;
    let src = d
        .create(&unique_name("restoresrc"), THICK, block_cap(), SIZE, 0)
        .await;
    let data = pattern(41, SIZE as usize);
    write_dev(&dev_of(Kind::Volume, THICK_VG, &src.volume_id), &data);
    let snap = loop {
        let s = expect_ok(
            d.controller()
                .create_snapshot(csi::CreateSnapshotRequest {
                    name: unique_name("restoresnap"),
                    source_volume_id: src.volume_id.clone(),
                    ..Default::default()
                })
                .await,
            "CreateSnapshot",
        )
        .snapshot
        .expect("snapshot");
        if s.ready_to_use {
            break s;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    // Overwritten after the snapshot: the restore must not see this.
    write_dev(
        &dev_of(Kind::Volume, THICK_VG, &src.volume_id),
        &vec![0x5a; SIZE as usize],
    );

    let points = [
        "lvm.copy.after_target",
        "lvm.copy.after_blocks",
        "lvm.copy.after_untag",
    ];
    let (_, dir) = d.stop_and_keep_dir();
    let d = start_armed(dir, &points.map(String::from)).await;
    d.track(&src.volume_id);
    let name = unique_name("restore");
    let mut req = create_req(&name, THICK, block_cap(), SIZE, 0);
    req.volume_content_source = Some(snapshot_source(&snap.snapshot_id));
    let (d, restored) = converge(d, &points, "thick restore", |mut c| {
        let req = req.clone();
        Box::pin(async move { retryable(c.create_volume(req).await, "restore")?.volume })
    })
    .await;
    d.track(&restored.volume_id);
    let lvs = lvs_named(&name);
    assert_eq!(lvs.len(), 1, "one LV for the restore: {lvs:?}");
    assert!(
        !lvs[0].tags.iter().any(|t| t.contains("copying")),
        "{lvs:?}"
    );
    assert_eq!(temp_lvs(), Vec::<String>::new(), "temporary LVs left");
    assert!(
        read_dev(
            &dev_of(Kind::Volume, THICK_VG, &restored.volume_id),
            data.len()
        ) == data,
        "the restore does not hold the snapshot's data"
    );
    delete_volume(&d, &restored.volume_id).await;
    delete_snapshot(&d, &snap.snapshot_id).await;
    delete_volume(&d, &src.volume_id).await;
}

/// A thin pool made after the start without zeroing or error-when-full: the
/// first create in its class sets both, and the driver dies right after `lvchange` fixed it, before its own view knew;
/// the retried CreateVolume on a restarted driver answers, and the pool is
/// safe.
#[tokio::test]
async fn thin_pool_fix_converges_after_a_crash() {
    if skip_without_lvm() {
        return;
    }
    let point = "lvm.pool_safety.after_lvchange";
    let pool = "ldsct-fixpool";
    let mut classes = default_class_args();
    classes.extend([
        "--device-class".to_string(),
        format!("fixed={THIN_VG}/{pool}"),
    ]);
    let d = Driver::builder()
        .class_args(classes.clone())
        .env("LODESTONE_FAILPOINTS", point)
        .start()
        .await;
    // Made after the start (the start fixes the pools it finds), so the fix
    // happens in the create; the driver looks for a missing pool again at
    // most every 2 s.
    lvm(&[
        "lvcreate",
        "--yes",
        "--type",
        "thin-pool",
        "-L",
        "64m",
        "--zero",
        "n",
        "-n",
        pool,
        THIN_VG,
    ]);
    let name = unique_name("fixpool");
    let req = create_req(&name, "fixed", block_cap(), 16 * MIB, 0);
    let r = until_the_class_shows(&d, &req).await;
    await_death(&d).await;
    assert!(dead(d.pid()), "the driver did not die at {point}: {r:?}");
    assert_eq!(reached_in(&d.log()), vec![point.to_string()]);
    assert!(
        lvs_named(&name).is_empty(),
        "a volume was made before the pool was safe"
    );

    let (_, dir) = d.stop_and_keep_dir();
    let d = Driver::builder().class_args(classes).start_in(dir).await;
    let deadline = Instant::now() + CONVERGE;
    let v = loop {
        assert!(Instant::now() < deadline, "the create did not converge");
        match retryable(d.controller().create_volume(req.clone()).await, "create") {
            Some(r) => break r.volume.expect("volume"),
            None => tokio::time::sleep(Duration::from_secs(1)).await,
        }
    };
    let attrs = lvm(&[
        "lvs",
        "--noheadings",
        "-o",
        "lv_attr,lv_when_full",
        &format!("{THIN_VG}/{pool}"),
    ]);
    assert_eq!(lvs_named(&name).len(), 1, "one LV for the request");
    delete_volume(&d, &v.volume_id).await;
    lvm(&["lvremove", "--yes", &format!("{THIN_VG}/{pool}")]);
    let fields: Vec<&str> = attrs.split_whitespace().collect();
    assert!(
        fields.len() == 2 && fields[0].chars().nth(7) == Some('z') && fields[1] == "error",
        "pool after the retried create: {attrs:?} (want zeroing and error when full)"
    );
}

/// An lvextend left running by a killed driver commits after the restarted
/// driver read its report: the retried ControllerExpandVolume finds the LV
/// already at the size (its own lvextend fails on an unchanged size) and
/// answers OK. Played deterministically: the LV is grown behind the
/// driver's back, then the expansion is asked for.
#[tokio::test]
async fn expand_finished_by_an_earlier_attempt_is_ok() {
    if skip_without_lvm() {
        return;
    }
    let d = start_armed(new_temp_dir(), &[]).await;
    for (class, vg) in [(THIN, THIN_VG), (THICK, THICK_VG)] {
        let v = d
            .create(&unique_name("lateextend"), class, block_cap(), SIZE, 0)
            .await;
        let key = v.volume_id.rsplit(':').next().expect("volume id");
        let lv = format!("{vg}/{}", Kind::Volume.lv_name(key));
        lvm(&["lvextend", "--size", &format!("{}b", 2 * SIZE), &lv]);
        let r = expect_ok(
            d.controller()
                .controller_expand_volume(csi::ControllerExpandVolumeRequest {
                    volume_id: v.volume_id.clone(),
                    capacity_range: range(2 * SIZE, 0),
                    ..Default::default()
                })
                .await,
            &format!("ControllerExpandVolume ({class})"),
        );
        assert!(r.capacity_bytes >= 2 * SIZE, "{class}: {r:?}");
        delete_volume(&d, &v.volume_id).await;
    }
}
