//! Snapshots, restores and clones against real volume groups (guest only,
//! with `LODESTONE_TEST_LVM=1`), for the thin class (thin snapshots) and the
//! thick class (full copies through a temporary COW snapshot; CreateSnapshot
//! answers `ready_to_use = false` and CreateVolume ABORTED while a copy runs,
//! and the CO retries).
//!
//! Every test checks the data: a file with known content is written before
//! the snapshot, changed afterwards, and each restore or clone must show
//! exactly the content of its point in time.
//!
//! Snapshots are not tracked by the `Driver` fixture, so each test keeps a
//! [`Cleanup`] that, should the test panic, deletes the snapshots and volumes
//! it made (retrying while copies stop), and the leak check stays clean.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use lodestone::client::{block_pages, BlockQuery};
use lodestone::csi;
use lodestone::csi::controller_client::ControllerClient;
use lodestone::csi::snapshot_metadata_client::SnapshotMetadataClient;
use lodestone::csi::volume_content_source::{SnapshotSource, Type as SourceType, VolumeSource};
use lodestone::csi::volume_usage::Unit;
use tonic::Code;

use crate::common::*;

const SIZE: i64 = 64 * MIB;
/// How long a copy (a thick snapshot, restore or clone) may take in the
/// guest before the test gives up.
const COPY_TIMEOUT: Duration = Duration::from_secs(300);
const RETRY_PAUSE: Duration = Duration::from_secs(2);
const FILE: &str = "data.bin";
const FILE_LEN: usize = 1 << 20;

// ---------------------------------------------------------------------------
// Cleanup after a failed test
// ---------------------------------------------------------------------------

/// Snapshots and volumes a test made, deleted through the driver's socket
/// when the test panics (before the `Driver` itself is dropped: declare the
/// `Cleanup` after the `Driver`).
struct Cleanup {
    dir: PathBuf,
    socket: PathBuf,
    snapshots: std::sync::Mutex<Vec<String>>,
    volumes: std::sync::Mutex<Vec<String>>,
}

impl Cleanup {
    fn new(d: &Driver) -> Cleanup {
        Cleanup {
            dir: d.dir().to_path_buf(),
            socket: d.socket.clone(),
            snapshots: Default::default(),
            volumes: Default::default(),
        }
    }

    /// The same list, for a driver that replaced the old one in its
    /// directory (declared after that new driver).
    fn handover(self, d: &Driver) -> Cleanup {
        let new = Cleanup::new(d);
        *new.snapshots.lock().unwrap() = std::mem::take(&mut *self.snapshots.lock().unwrap());
        *new.volumes.lock().unwrap() = std::mem::take(&mut *self.volumes.lock().unwrap());
        new
    }

    fn snapshot(&self, id: &str) {
        let mut s = self.snapshots.lock().unwrap_or_else(|e| e.into_inner());
        if !s.iter().any(|x| x == id) {
            s.push(id.to_string());
        }
    }

    fn volume(&self, id: &str) {
        let mut v = self.volumes.lock().unwrap_or_else(|e| e.into_inner());
        if !v.iter().any(|x| x == id) {
            v.push(id.to_string());
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if !std::thread::panicking() || !lvm_enabled() {
            return;
        }
        let snapshots =
            std::mem::take(&mut *self.snapshots.lock().unwrap_or_else(|e| e.into_inner()));
        let mut volumes =
            std::mem::take(&mut *self.volumes.lock().unwrap_or_else(|e| e.into_inner()));
        if snapshots.is_empty() && volumes.is_empty() {
            return;
        }
        unmount_below(&self.dir);
        // Newest first: restores and clones before their sources.
        volumes.reverse();
        let socket = self.socket.clone();
        let worker = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("cleanup runtime");
            rt.block_on(async move {
                let Ok(ch) = connect_unix(&socket).await else {
                    eprintln!("cleanup: cannot connect to {}", socket.display());
                    return;
                };
                let mut c = ControllerClient::new(ch);
                let deadline = Instant::now() + Duration::from_secs(180);
                for id in snapshots {
                    loop {
                        let r = c
                            .delete_snapshot(csi::DeleteSnapshotRequest {
                                snapshot_id: id.clone(),
                                ..Default::default()
                            })
                            .await;
                        match r {
                            Err(e) if e.code() == Code::Aborted && Instant::now() < deadline => {
                                tokio::time::sleep(Duration::from_secs(1)).await
                            }
                            Err(e) => {
                                eprintln!("cleanup: DeleteSnapshot({id}): {e}");
                                break;
                            }
                            Ok(_) => break,
                        }
                    }
                }
                for id in volumes {
                    loop {
                        let r = c
                            .delete_volume(csi::DeleteVolumeRequest {
                                volume_id: id.clone(),
                                ..Default::default()
                            })
                            .await;
                        match r {
                            Err(e) if e.code() == Code::Aborted && Instant::now() < deadline => {
                                tokio::time::sleep(Duration::from_secs(1)).await
                            }
                            Err(e) => {
                                eprintln!("cleanup: DeleteVolume({id}): {e}");
                                break;
                            }
                            Ok(_) => break,
                        }
                    }
                }
            });
        });
        let _ = worker.join();
    }
}

/// Detach every mount below `dir`, deepest first.
fn unmount_below(dir: &Path) {
    let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut points: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape_mount_path(p)))
        .filter(|p| p.starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for p in points {
        let _ = nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH);
    }
}

// ---------------------------------------------------------------------------
// Data
// ---------------------------------------------------------------------------

/// `len` pseudo-random (incompressible, never all-zero) bytes from `seed`.
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
    out
}

/// FNV-1a, enough to tell contents apart in messages.
fn checksum(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325, |h, &c| {
        (h ^ c as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Writes `data` to `path` (replacing it) and makes it durable.
fn write_file(path: &Path, data: &[u8]) {
    let mut f = File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    f.write_all(data).expect("write");
    f.sync_all().expect("fsync");
    drop(f);
    nix::unistd::sync();
}

#[track_caller]
fn assert_content(path: &Path, want: &[u8], what: &str) {
    let got =
        std::fs::read(path).unwrap_or_else(|e| panic!("{what}: read {}: {e}", path.display()));
    assert!(
        got == want,
        "{what}: {} holds {} bytes with checksum {:016x}, expected {} bytes with checksum {:016x}",
        path.display(),
        got.len(),
        checksum(&got),
        want.len(),
        checksum(want)
    );
}

// ---------------------------------------------------------------------------
// RPC helpers
// ---------------------------------------------------------------------------

fn snapshot_source(id: &str) -> csi::VolumeContentSource {
    csi::VolumeContentSource {
        r#type: Some(SourceType::Snapshot(SnapshotSource {
            snapshot_id: id.to_string(),
        })),
    }
}

fn volume_source(id: &str) -> csi::VolumeContentSource {
    csi::VolumeContentSource {
        r#type: Some(SourceType::Volume(VolumeSource {
            volume_id: id.to_string(),
        })),
    }
}

fn snapshot_req(name: &str, source: &str) -> csi::CreateSnapshotRequest {
    csi::CreateSnapshotRequest {
        name: name.to_string(),
        source_volume_id: source.to_string(),
        ..Default::default()
    }
}

/// A new volume of `class`, tracked for cleanup.
async fn create_volume(
    d: &Driver,
    cl: &Cleanup,
    prefix: &str,
    class: &str,
    cap: csi::VolumeCapability,
    size: i64,
) -> csi::Volume {
    let v = d
        .create(
            &unique_name(&format!("{prefix}-{class}")),
            class,
            cap,
            size,
            0,
        )
        .await;
    cl.volume(&v.volume_id);
    v
}

/// CreateSnapshot once (tracked for cleanup).
async fn create_snapshot_once(d: &Driver, cl: &Cleanup, name: &str, source: &str) -> csi::Snapshot {
    let what = format!("CreateSnapshot({name}, {source})");
    let r = d
        .controller()
        .create_snapshot(snapshot_req(name, source))
        .await;
    let s = expect_ok(r, &what)
        .snapshot
        .unwrap_or_else(|| panic!("{what}: reply without snapshot"));
    cl.snapshot(&s.snapshot_id);
    s
}

/// CreateSnapshot, repeated with the same name (as the CO does) until the
/// snapshot is ready to use. Every reply names the same snapshot.
async fn snapshot_ready(d: &Driver, cl: &Cleanup, name: &str, source: &str) -> csi::Snapshot {
    let deadline = Instant::now() + COPY_TIMEOUT;
    let first = create_snapshot_once(d, cl, name, source).await;
    let mut s = first.clone();
    while !s.ready_to_use {
        assert!(
            Instant::now() < deadline,
            "snapshot {name} of {source} not ready after {COPY_TIMEOUT:?}: {s:?}"
        );
        tokio::time::sleep(RETRY_PAUSE).await;
        s = create_snapshot_once(d, cl, name, source).await;
        assert_eq!(
            s.snapshot_id, first.snapshot_id,
            "a retried CreateSnapshot({name}) named another snapshot"
        );
    }
    check_snapshot(&s, source);
    s
}

/// Fields every reported snapshot must have.
#[track_caller]
fn check_snapshot(s: &csi::Snapshot, source: &str) {
    assert!(!s.snapshot_id.is_empty(), "empty snapshot_id: {s:?}");
    assert!(
        s.snapshot_id.len() <= 128,
        "snapshot_id over 128 bytes: {s:?}"
    );
    assert_eq!(s.source_volume_id, source, "source_volume_id of {s:?}");
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let t = s
        .creation_time
        .as_ref()
        .unwrap_or_else(|| panic!("snapshot without creation_time: {s:?}"));
    assert!(
        t.seconds > now - 24 * 3600 && t.seconds <= now + 60,
        "creation_time {t:?} is not about now ({now}): {s:?}"
    );
}

/// CreateVolume from `source`, retried while it answers ABORTED (a copy is
/// running), as the CO does. Tracked for cleanup.
async fn create_from(
    d: &Driver,
    cl: &Cleanup,
    name: &str,
    class: &str,
    cap: csi::VolumeCapability,
    required: i64,
    source: csi::VolumeContentSource,
) -> csi::Volume {
    let mut req = create_req(name, class, cap, required, 0);
    req.volume_content_source = Some(source.clone());
    let what = format!("CreateVolume({name}, {class}) from {source:?}");
    let deadline = Instant::now() + COPY_TIMEOUT;
    loop {
        match d.controller().create_volume(req.clone()).await {
            Ok(r) => {
                let v = r
                    .into_inner()
                    .volume
                    .unwrap_or_else(|| panic!("{what}: reply without volume"));
                d.track(&v.volume_id);
                cl.volume(&v.volume_id);
                assert_eq!(
                    v.content_source.as_ref(),
                    Some(&source),
                    "{what}: content_source of the new volume"
                );
                assert_eq!(
                    volume_nodes(&v),
                    vec![d.node_id.clone()],
                    "{what}: accessible_topology"
                );
                assert!(v.capacity_bytes >= required, "{what}: {v:?}");
                return v;
            }
            Err(e) if e.code() == Code::Aborted && Instant::now() < deadline => {
                tokio::time::sleep(RETRY_PAUSE).await;
            }
            Err(e) => panic!("{what}: {:?}: {}", e.code(), e.message()),
        }
    }
}

/// DeleteVolume, retried while ABORTED (a copy stopping, zeroing).
async fn delete_volume(d: &Driver, id: &str) {
    let deadline = Instant::now() + COPY_TIMEOUT;
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
                tokio::time::sleep(RETRY_PAUSE).await
            }
            r => {
                expect_ok(r, &format!("DeleteVolume({id})"));
                return;
            }
        }
    }
}

/// DeleteSnapshot, retried while ABORTED.
async fn delete_snapshot(d: &Driver, id: &str) {
    let deadline = Instant::now() + COPY_TIMEOUT;
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
                tokio::time::sleep(RETRY_PAUSE).await
            }
            r => {
                expect_ok(r, &format!("DeleteSnapshot({id})"));
                return;
            }
        }
    }
}

async fn get_snapshot(d: &Driver, id: &str) -> csi::Snapshot {
    let r = d
        .controller()
        .get_snapshot(csi::GetSnapshotRequest {
            snapshot_id: id.to_string(),
            ..Default::default()
        })
        .await;
    expect_ok(r, &format!("GetSnapshot({id})"))
        .snapshot
        .expect("GetSnapshot reply without snapshot")
}

async fn list_snapshots(d: &Driver, snapshot_id: &str, source: &str) -> Vec<csi::Snapshot> {
    let r = d
        .controller()
        .list_snapshots(csi::ListSnapshotsRequest {
            snapshot_id: snapshot_id.to_string(),
            source_volume_id: source.to_string(),
            ..Default::default()
        })
        .await;
    let page = expect_ok(
        r,
        &format!("ListSnapshots(snapshot_id={snapshot_id:?}, source={source:?})"),
    );
    assert!(page.next_token.is_empty(), "one page without max_entries");
    page.entries
        .into_iter()
        .map(|e| e.snapshot.expect("entry.snapshot"))
        .collect()
}

/// Stage and publish a filesystem volume at `<tag>-staging` and `<tag>`;
/// returns the published directory.
async fn mount(d: &Driver, id: &str, tag: &str) -> PathBuf {
    let staging = format!("{tag}-staging");
    d.stage(id, &staging, ext4()).await;
    d.publish(id, &staging, tag, ext4(), false).await;
    d.path(tag)
}

async fn unmount(d: &Driver, id: &str, tag: &str) {
    d.unpublish(id, tag).await;
    d.unstage(id, &format!("{tag}-staging")).await;
}

// ---------------------------------------------------------------------------
// 1. Restore shows the data of the snapshot's point in time
// ---------------------------------------------------------------------------

/// A snapshot holds the data the volume had when it was taken:
/// * CreateSnapshot (retried until ready_to_use) reports the source volume,
///   the source's size and a creation time; ListSnapshots by source volume
///   and by snapshot id and GetSnapshot report the same snapshot.
/// * A volume restored from it (CreateVolume retried while ABORTED) names
///   the snapshot as its content_source and holds the file as it was when
///   the snapshot was taken, although the source has changed since; the
///   source keeps its new content.
async fn restore_matches(class: &str) {
    let d = Driver::start().await;
    let cl = Cleanup::new(&d);
    let src = create_volume(&d, &cl, "snapsrc", class, ext4(), SIZE).await;
    let dir = mount(&d, &src.volume_id, "src").await;
    let before = pattern(1, FILE_LEN);
    let after = pattern(2, FILE_LEN);
    write_file(&dir.join(FILE), &before);

    let name = unique_name("snap");
    let s = snapshot_ready(&d, &cl, &name, &src.volume_id).await;
    assert_eq!(
        s.size_bytes, src.capacity_bytes,
        "size_bytes of the snapshot is the source's size"
    );
    write_file(&dir.join(FILE), &after);

    let by_source = list_snapshots(&d, "", &src.volume_id).await;
    assert!(
        by_source.len() == 1 && by_source[0].snapshot_id == s.snapshot_id,
        "ListSnapshots(source_volume_id) of {}: {by_source:?}",
        src.volume_id
    );
    let by_id = list_snapshots(&d, &s.snapshot_id, "").await;
    assert_eq!(by_id.len(), 1, "ListSnapshots(snapshot_id): {by_id:?}");
    for listed in [&by_source[0], &by_id[0]] {
        assert!(listed.ready_to_use, "listed snapshot not ready: {listed:?}");
        assert_eq!(listed.size_bytes, src.capacity_bytes, "{listed:?}");
        check_snapshot(listed, &src.volume_id);
    }
    let all = list_snapshots(&d, "", "").await;
    assert!(
        all.iter().any(|x| x.snapshot_id == s.snapshot_id),
        "ListSnapshots without filter misses {}: {all:?}",
        s.snapshot_id
    );
    let got = get_snapshot(&d, &s.snapshot_id).await;
    assert!(got.ready_to_use, "GetSnapshot: {got:?}");
    assert_eq!(got.size_bytes, src.capacity_bytes, "GetSnapshot: {got:?}");
    assert_eq!(got.creation_time, s.creation_time, "GetSnapshot: {got:?}");
    check_snapshot(&got, &src.volume_id);

    let restored = create_from(
        &d,
        &cl,
        &unique_name("restore"),
        class,
        ext4(),
        SIZE,
        snapshot_source(&s.snapshot_id),
    )
    .await;
    let rdir = mount(&d, &restored.volume_id, "restored").await;
    assert_content(&rdir.join(FILE), &before, "restored volume");
    assert_content(&dir.join(FILE), &after, "source volume after the restore");

    unmount(&d, &restored.volume_id, "restored").await;
    unmount(&d, &src.volume_id, "src").await;
    delete_volume(&d, &restored.volume_id).await;
    delete_snapshot(&d, &s.snapshot_id).await;
    delete_volume(&d, &src.volume_id).await;
}

#[tokio::test]
async fn snapshot_restore_matches_data_at_snapshot_time_thin() {
    if skip_without_lvm() {
        return;
    }
    restore_matches(THIN).await;
}

#[tokio::test]
async fn snapshot_restore_matches_data_at_snapshot_time_thick() {
    if skip_without_lvm() {
        return;
    }
    restore_matches(THICK).await;
}

// ---------------------------------------------------------------------------
// 2. Clones are independent
// ---------------------------------------------------------------------------

/// CreateVolume with a volume content source copies the (staged and
/// published) source; afterwards the two volumes diverge: each reads back
/// what was written to it, never the other's data.
async fn clone_diverges(class: &str) {
    let d = Driver::start().await;
    let cl = Cleanup::new(&d);
    let src = create_volume(&d, &cl, "clonesrc", class, ext4(), SIZE).await;
    let sdir = mount(&d, &src.volume_id, "src").await;
    let original = pattern(11, FILE_LEN);
    write_file(&sdir.join(FILE), &original);

    let clone = create_from(
        &d,
        &cl,
        &unique_name("clone"),
        class,
        ext4(),
        SIZE,
        volume_source(&src.volume_id),
    )
    .await;
    let cdir = mount(&d, &clone.volume_id, "clone").await;
    assert_content(&cdir.join(FILE), &original, "clone right after cloning");

    let in_src = pattern(12, FILE_LEN);
    let in_clone = pattern(13, FILE_LEN);
    write_file(&sdir.join(FILE), &in_src);
    write_file(&cdir.join(FILE), &in_clone);
    write_file(&sdir.join("only-src"), b"source");
    write_file(&cdir.join("only-clone"), b"clone");
    assert_content(&sdir.join(FILE), &in_src, "source after both writes");
    assert_content(&cdir.join(FILE), &in_clone, "clone after both writes");
    assert!(
        !sdir.join("only-clone").exists(),
        "clone's file in the source"
    );
    assert!(
        !cdir.join("only-src").exists(),
        "source's file in the clone"
    );

    // Again from the devices, not the page cache.
    unmount(&d, &clone.volume_id, "clone").await;
    unmount(&d, &src.volume_id, "src").await;
    let sdir = mount(&d, &src.volume_id, "src").await;
    let cdir = mount(&d, &clone.volume_id, "clone").await;
    assert_content(&sdir.join(FILE), &in_src, "source after remount");
    assert_content(&cdir.join(FILE), &in_clone, "clone after remount");
    assert_content(&sdir.join("only-src"), b"source", "source after remount");
    assert_content(&cdir.join("only-clone"), b"clone", "clone after remount");

    unmount(&d, &clone.volume_id, "clone").await;
    unmount(&d, &src.volume_id, "src").await;
    delete_volume(&d, &clone.volume_id).await;
    delete_volume(&d, &src.volume_id).await;
}

#[tokio::test]
async fn clone_diverges_thin() {
    if skip_without_lvm() {
        return;
    }
    clone_diverges(THIN).await;
}

#[tokio::test]
async fn clone_diverges_thick() {
    if skip_without_lvm() {
        return;
    }
    clone_diverges(THICK).await;
}

// ---------------------------------------------------------------------------
// 3. Restore into a larger volume
// ---------------------------------------------------------------------------

/// A restore asking for more than the snapshot holds gets a larger volume,
/// and its filesystem grows to it on first stage.
async fn restore_into_larger_volume(class: &str) {
    let d = Driver::start().await;
    let cl = Cleanup::new(&d);
    let src = create_volume(&d, &cl, "growsrc", class, ext4(), SIZE).await;
    let dir = mount(&d, &src.volume_id, "src").await;
    let data = pattern(21, FILE_LEN);
    write_file(&dir.join(FILE), &data);
    let s = snapshot_ready(&d, &cl, &unique_name("snap"), &src.volume_id).await;
    unmount(&d, &src.volume_id, "src").await;

    let big = 128 * MIB;
    let restored = create_from(
        &d,
        &cl,
        &unique_name("bigger"),
        class,
        ext4(),
        big,
        snapshot_source(&s.snapshot_id),
    )
    .await;
    assert!(
        restored.capacity_bytes >= big,
        "restore of {} bytes for {big}",
        restored.capacity_bytes
    );
    let rdir = mount(&d, &restored.volume_id, "restored").await;
    let stats = d.stats(&restored.volume_id, "restored").await;
    let bytes = usage(&stats, Unit::Bytes).expect("BYTES usage");
    assert!(
        bytes.total > 100 * MIB && bytes.total <= restored.capacity_bytes,
        "filesystem of the 128 MiB restore was not grown: {bytes:?}"
    );
    assert_content(&rdir.join(FILE), &data, "grown restore");

    unmount(&d, &restored.volume_id, "restored").await;
    delete_volume(&d, &restored.volume_id).await;
    delete_snapshot(&d, &s.snapshot_id).await;
    delete_volume(&d, &src.volume_id).await;
}

#[tokio::test]
async fn restore_into_larger_volume_grows_filesystem_thin() {
    if skip_without_lvm() {
        return;
    }
    restore_into_larger_volume(THIN).await;
}

#[tokio::test]
async fn restore_into_larger_volume_grows_filesystem_thick() {
    if skip_without_lvm() {
        return;
    }
    restore_into_larger_volume(THICK).await;
}

// ---------------------------------------------------------------------------
// 4. Chains
// ---------------------------------------------------------------------------

/// A snapshot of a volume restored from a snapshot: every step holds the
/// data of its own point in time (v1 -> s1 -> r1 -> s2 -> r2).
async fn chain(class: &str) {
    let d = Driver::start().await;
    let cl = Cleanup::new(&d);
    let (a, b, c, e) = (
        pattern(31, FILE_LEN),
        pattern(32, FILE_LEN),
        pattern(33, FILE_LEN),
        pattern(34, FILE_LEN),
    );
    let v1 = create_volume(&d, &cl, "chain", class, ext4(), SIZE).await;
    let dir1 = mount(&d, &v1.volume_id, "v1").await;
    write_file(&dir1.join(FILE), &a);
    let s1 = snapshot_ready(&d, &cl, &unique_name("snap1"), &v1.volume_id).await;
    write_file(&dir1.join(FILE), &b);

    let r1 = create_from(
        &d,
        &cl,
        &unique_name("r1"),
        class,
        ext4(),
        SIZE,
        snapshot_source(&s1.snapshot_id),
    )
    .await;
    let dir_r1 = mount(&d, &r1.volume_id, "r1").await;
    assert_content(&dir_r1.join(FILE), &a, "r1 (restore of s1)");
    write_file(&dir_r1.join(FILE), &c);
    let s2 = snapshot_ready(&d, &cl, &unique_name("snap2"), &r1.volume_id).await;
    assert_eq!(s2.size_bytes, r1.capacity_bytes, "s2 size");
    write_file(&dir_r1.join(FILE), &e);

    let r2 = create_from(
        &d,
        &cl,
        &unique_name("r2"),
        class,
        ext4(),
        SIZE,
        snapshot_source(&s2.snapshot_id),
    )
    .await;
    let dir_r2 = mount(&d, &r2.volume_id, "r2").await;
    assert_content(&dir_r2.join(FILE), &c, "r2 (restore of s2)");
    assert_content(&dir_r1.join(FILE), &e, "r1 after s2");
    assert_content(&dir1.join(FILE), &b, "v1 at the end");

    let listed = list_snapshots(&d, "", &r1.volume_id).await;
    assert!(
        listed.len() == 1 && listed[0].snapshot_id == s2.snapshot_id,
        "ListSnapshots(source_volume_id = r1): {listed:?}"
    );

    unmount(&d, &r2.volume_id, "r2").await;
    unmount(&d, &r1.volume_id, "r1").await;
    unmount(&d, &v1.volume_id, "v1").await;
    delete_volume(&d, &r2.volume_id).await;
    delete_snapshot(&d, &s2.snapshot_id).await;
    delete_volume(&d, &r1.volume_id).await;
    delete_snapshot(&d, &s1.snapshot_id).await;
    delete_volume(&d, &v1.volume_id).await;
}

#[tokio::test]
async fn snapshot_chain_thin() {
    if skip_without_lvm() {
        return;
    }
    chain(THIN).await;
}

#[tokio::test]
async fn snapshot_chain_thick() {
    if skip_without_lvm() {
        return;
    }
    chain(THICK).await;
}

// ---------------------------------------------------------------------------
// 5. Snapshots outlive their source
// ---------------------------------------------------------------------------

/// After its source volume is deleted a snapshot is still listed (naming the
/// deleted source) and can be restored, with the data it was taken with.
async fn source_deleted(class: &str) {
    let d = Driver::start().await;
    let cl = Cleanup::new(&d);
    let src = create_volume(&d, &cl, "gonesrc", class, ext4(), SIZE).await;
    let dir = mount(&d, &src.volume_id, "src").await;
    let data = pattern(41, FILE_LEN);
    write_file(&dir.join(FILE), &data);
    let s = snapshot_ready(&d, &cl, &unique_name("snap"), &src.volume_id).await;
    unmount(&d, &src.volume_id, "src").await;
    delete_volume(&d, &src.volume_id).await;

    let got = get_snapshot(&d, &s.snapshot_id).await;
    assert!(got.ready_to_use, "snapshot after source deletion: {got:?}");
    check_snapshot(&got, &src.volume_id);
    let listed = list_snapshots(&d, &s.snapshot_id, "").await;
    assert_eq!(listed.len(), 1, "ListSnapshots after source deletion");

    let restored = create_from(
        &d,
        &cl,
        &unique_name("orphan"),
        class,
        ext4(),
        SIZE,
        snapshot_source(&s.snapshot_id),
    )
    .await;
    let rdir = mount(&d, &restored.volume_id, "restored").await;
    assert_content(
        &rdir.join(FILE),
        &data,
        "restore of a snapshot without source",
    );

    unmount(&d, &restored.volume_id, "restored").await;
    delete_volume(&d, &restored.volume_id).await;
    delete_snapshot(&d, &s.snapshot_id).await;
}

#[tokio::test]
async fn source_deleted_snapshot_still_restorable_thin() {
    if skip_without_lvm() {
        return;
    }
    source_deleted(THIN).await;
}

#[tokio::test]
async fn source_deleted_snapshot_still_restorable_thick() {
    if skip_without_lvm() {
        return;
    }
    source_deleted(THICK).await;
}

// ---------------------------------------------------------------------------
// 6. Idempotency and errors
// ---------------------------------------------------------------------------

/// CreateSnapshot is idempotent: the same name and source give the same
/// snapshot; the same name with another source is ALREADY_EXISTS.
/// DeleteVolume of a volume with snapshots works and leaves the snapshot
/// listed; DeleteSnapshot is idempotent and the snapshot is then gone.
async fn idempotency_and_errors(class: &str) {
    let d = Driver::start().await;
    let cl = Cleanup::new(&d);
    let v1 = create_volume(&d, &cl, "idem1", class, block_cap(), SIZE).await;
    let v2 = create_volume(&d, &cl, "idem2", class, block_cap(), SIZE).await;
    let name = unique_name("snap");
    let s = snapshot_ready(&d, &cl, &name, &v1.volume_id).await;
    let again = create_snapshot_once(&d, &cl, &name, &v1.volume_id).await;
    assert_eq!(again.snapshot_id, s.snapshot_id, "retried CreateSnapshot");
    assert!(again.ready_to_use, "retried CreateSnapshot: {again:?}");
    assert_eq!(again.size_bytes, s.size_bytes, "retried CreateSnapshot");
    assert_eq!(
        again.creation_time, s.creation_time,
        "retried CreateSnapshot"
    );

    let r = d
        .controller()
        .create_snapshot(snapshot_req(&name, &v2.volume_id))
        .await;
    expect_code(
        r,
        Code::AlreadyExists,
        "CreateSnapshot with the same name and another source",
    );

    delete_volume(&d, &v1.volume_id).await;
    let listed = list_snapshots(&d, &s.snapshot_id, "").await;
    assert!(
        listed.len() == 1 && listed[0].ready_to_use,
        "snapshot after DeleteVolume of its source: {listed:?}"
    );
    let by_source = list_snapshots(&d, "", &v1.volume_id).await;
    assert_eq!(
        by_source.len(),
        1,
        "ListSnapshots(source_volume_id) of the deleted source: {by_source:?}"
    );

    delete_snapshot(&d, &s.snapshot_id).await;
    delete_snapshot(&d, &s.snapshot_id).await;
    let r = d
        .controller()
        .get_snapshot(csi::GetSnapshotRequest {
            snapshot_id: s.snapshot_id.clone(),
            ..Default::default()
        })
        .await;
    expect_code(r, Code::NotFound, "GetSnapshot after DeleteSnapshot");
    assert!(
        list_snapshots(&d, &s.snapshot_id, "").await.is_empty(),
        "ListSnapshots after DeleteSnapshot"
    );
    let r = d
        .controller()
        .create_volume({
            let mut req = create_req(&unique_name("from-gone"), class, block_cap(), SIZE, 0);
            req.volume_content_source = Some(snapshot_source(&s.snapshot_id));
            req
        })
        .await;
    expect_code(r, Code::NotFound, "CreateVolume from a deleted snapshot");
    delete_volume(&d, &v2.volume_id).await;
}

#[tokio::test]
async fn snapshot_idempotency_and_errors_thin() {
    if skip_without_lvm() {
        return;
    }
    idempotency_and_errors(THIN).await;
}

#[tokio::test]
async fn snapshot_idempotency_and_errors_thick() {
    if skip_without_lvm() {
        return;
    }
    idempotency_and_errors(THICK).await;
}

// ---------------------------------------------------------------------------
// 7. A crash during a thick copy
// ---------------------------------------------------------------------------

/// Large enough that the copy outlasts the first CreateSnapshot call (which
/// waits for it about 40 s) under emulation; with the snapshot and its COW
/// space it still fits the fixture's 1.5 GiB thick VG, and the source is
/// deleted before the restore.
const CRASH_SIZE: i64 = 512 * MIB;
const CHUNK: usize = 1 << 20;
/// Written to the source after the snapshot was cut, while the driver is down.
const LATE_WRITE: usize = 4 * CHUNK;

/// Chunk `i` of the data set `base`: `base` with `(seed, i, block)` stamped
/// into every 4 KiB block, so every block of the device is distinct and
/// non-zero and a misplaced block is noticed.
fn chunk(base: &[u8], seed: u64, i: usize) -> Vec<u8> {
    let mut c = base.to_vec();
    for (j, block) in c.chunks_mut(4096).enumerate() {
        let stamp = (seed << 48) ^ ((i as u64) << 16) ^ j as u64;
        block[..8].copy_from_slice(&stamp.to_le_bytes());
    }
    c
}

/// Whether the LV behind snapshot `id` still carries the copying tag, and
/// the names of temporary LVs (`ldtmp-*`) in the fixture's VGs.
fn lvm_view(snapshot_id: &str) -> (Option<bool>, Vec<String>) {
    let key = snapshot_id.rsplit(':').next().unwrap_or_default();
    let lv_name = format!("ldsnap-{key}");
    let lvs = list_lvs();
    let copying = lvs
        .iter()
        .find(|lv| lv.name == lv_name)
        .map(|lv| lv.tags.iter().any(|t| t == "lodestone.v1.copying"));
    let temps = lvs
        .iter()
        .filter(|lv| lv.name.starts_with("ldtmp-"))
        .map(|lv| format!("{}/{}", lv.vg, lv.name))
        .collect();
    (copying, temps)
}

/// A snapshot reported ready must be complete in LVM (no copying tag).
#[track_caller]
fn check_ready_is_complete(s: &csi::Snapshot, what: &str) {
    let (copying, _) = lvm_view(&s.snapshot_id);
    assert!(
        copying.is_some(),
        "{what}: no LV for reported snapshot {s:?}"
    );
    if s.ready_to_use {
        assert_eq!(
            copying,
            Some(false),
            "{what}: reported ready while the LV is still marked copying: {s:?}"
        );
    }
}

fn write_chunks(dev: &Path, base: &[u8], seed: u64, count: usize) {
    let mut f = File::options().write(true).open(dev).expect("open source");
    for i in 0..count {
        f.write_all(&chunk(base, seed, i)).expect("write source");
    }
    f.sync_all().expect("fsync source");
}

/// The driver dies (SIGKILL) while a thick snapshot is being copied, right
/// after a CreateSnapshot answered `ready_to_use = false` (the snapshot is
/// cut, so the application writes to the source again). The new driver on the same
/// volume groups never reports the half copy ready (GetSnapshot,
/// ListSnapshots), a restore from it is ABORTED, and a retried
/// CreateSnapshot completes it. A restore then shows exactly the data the
/// source had when the snapshot was cut, not the later writes. No temporary
/// LV is left behind.
#[tokio::test]
async fn crash_during_copy_never_ready_thick() {
    if skip_without_lvm() {
        return;
    }
    let class = THICK;
    // The driver answers "in progress" as soon as the copy has started
    // (no wait: a 512 MiB copy under TCG took under a second in one CI
    // run), and the kill follows the answer at once, so it always lands
    // mid-copy.
    let d = Driver::builder()
        .arg("--copy-wait-seconds")
        .arg("0")
        .start()
        .await;
    let cl = Cleanup::new(&d);
    let src = create_volume(&d, &cl, "crashsrc", class, block_cap(), CRASH_SIZE).await;
    d.stage(&src.volume_id, "src-staging", block_cap()).await;
    d.publish(&src.volume_id, "src-staging", "src", block_cap(), false)
        .await;
    let dev = d.path("src");
    let chunks = src.capacity_bytes as usize / CHUNK;
    let (base1, base2) = (pattern(51, CHUNK), pattern(52, CHUNK));
    let filled = Instant::now();
    write_chunks(&dev, &base1, 1, chunks);
    eprintln!("filled {chunks} MiB in {:?}", filled.elapsed());

    let name = unique_name("crashsnap");
    let cut = Instant::now();
    let deadline = Instant::now() + COPY_TIMEOUT;
    let first = loop {
        match d
            .controller()
            .create_snapshot(snapshot_req(&name, &src.volume_id))
            .await
        {
            Ok(r) => break r.into_inner().snapshot.expect("reply without snapshot"),
            Err(e) if e.code() == Code::Aborted && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(500)).await
            }
            Err(e) => panic!("retried CreateSnapshot: {:?}: {}", e.code(), e.message()),
        }
    };
    cl.snapshot(&first.snapshot_id);
    let answered = cut.elapsed();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(d.pid()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("SIGKILL the driver");
    let (_, dir) = d.stop_and_keep_dir();
    let (copying, temps) = lvm_view(&first.snapshot_id);
    eprintln!(
        "first CreateSnapshot answered in {answered:?}: {first:?}; after the kill: copying \
         tag {copying:?}, temporary LVs {temps:?}"
    );
    // The snapshot is cut: the application writes again.
    write_chunks(&dev, &base2, 2, LATE_WRITE / CHUNK);

    let d = Driver::builder()
        .arg("--copy-wait-seconds")
        .arg("1")
        .start_in(dir)
        .await;
    let cl = cl.handover(&d);
    d.track(&src.volume_id);
    assert!(
        !first.ready_to_use && copying == Some(true),
        "the copy of {chunks} MiB was complete before the driver was killed ({answered:?}); \
         the crash cannot be tested (make CRASH_SIZE larger)"
    );
    check_snapshot(&first, &src.volume_id);

    for round in 0..2 {
        let got = get_snapshot(&d, &first.snapshot_id).await;
        assert!(
            !got.ready_to_use,
            "GetSnapshot after restart (round {round}) reports the half copy ready: {got:?}"
        );
        check_ready_is_complete(&got, "GetSnapshot after restart");
        let listed = list_snapshots(&d, &first.snapshot_id, "").await;
        assert!(
            listed.len() == 1 && !listed[0].ready_to_use,
            "ListSnapshots(snapshot_id) after restart (round {round}): {listed:?}"
        );
        let all = list_snapshots(&d, "", "").await;
        let entry = all
            .iter()
            .find(|s| s.snapshot_id == first.snapshot_id)
            .unwrap_or_else(|| panic!("ListSnapshots misses {}: {all:?}", first.snapshot_id));
        assert!(
            !entry.ready_to_use,
            "ListSnapshots after restart: {entry:?}"
        );
        let mut req = create_req(&unique_name("early"), class, block_cap(), 0, 0);
        req.volume_content_source = Some(snapshot_source(&first.snapshot_id));
        let r = d.controller().create_volume(req).await;
        expect_code(r, Code::Aborted, "CreateVolume from a half-copied snapshot");
        tokio::time::sleep(Duration::from_secs(3)).await;
    }

    // The CO retries CreateSnapshot; the copy is redone and completes.
    let retried = Instant::now();
    let deadline = retried + COPY_TIMEOUT;
    let done = loop {
        let s = create_snapshot_once(&d, &cl, &name, &src.volume_id).await;
        assert_eq!(s.snapshot_id, first.snapshot_id, "retried CreateSnapshot");
        check_ready_is_complete(&s, "retried CreateSnapshot");
        let got = get_snapshot(&d, &s.snapshot_id).await;
        check_ready_is_complete(&got, "GetSnapshot while retrying");
        if s.ready_to_use {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "snapshot not ready after {COPY_TIMEOUT:?}: {s:?}"
        );
        tokio::time::sleep(RETRY_PAUSE).await;
    };
    eprintln!("the retried copy completed in {:?}", retried.elapsed());
    check_snapshot(&done, &src.volume_id);
    assert_eq!(done.size_bytes, src.capacity_bytes, "snapshot size");
    let got = get_snapshot(&d, &done.snapshot_id).await;
    assert!(got.ready_to_use, "GetSnapshot after completion: {got:?}");
    let listed = list_snapshots(&d, &done.snapshot_id, "").await;
    assert!(
        listed.len() == 1 && listed[0].ready_to_use,
        "ListSnapshots after completion: {listed:?}"
    );
    let (_, temps) = lvm_view(&done.snapshot_id);
    assert!(temps.is_empty(), "temporary LVs after the copy: {temps:?}");

    // Room for the restore in the thick VG.
    d.unpublish(&src.volume_id, "src").await;
    d.unstage(&src.volume_id, "src-staging").await;
    delete_volume(&d, &src.volume_id).await;

    let restored = create_from(
        &d,
        &cl,
        &unique_name("crashrestore"),
        class,
        block_cap(),
        CRASH_SIZE,
        snapshot_source(&done.snapshot_id),
    )
    .await;
    d.stage(&restored.volume_id, "restored-staging", block_cap())
        .await;
    d.publish(
        &restored.volume_id,
        "restored-staging",
        "restored",
        block_cap(),
        false,
    )
    .await;
    let mut f = File::open(d.path("restored")).expect("open restore");
    f.seek(SeekFrom::Start(0)).unwrap();
    let (mut ok, mut late, mut other) = (0usize, Vec::new(), Vec::new());
    let mut buf = vec![0u8; CHUNK];
    for i in 0..chunks {
        f.read_exact(&mut buf).expect("read restore");
        if buf == chunk(&base1, 1, i) {
            ok += 1;
        } else if i < LATE_WRITE / CHUNK && buf == chunk(&base2, 2, i) {
            late.push(i);
        } else {
            other.push(i);
        }
    }
    drop(f);
    d.unpublish(&restored.volume_id, "restored").await;
    d.unstage(&restored.volume_id, "restored-staging").await;
    delete_volume(&d, &restored.volume_id).await;
    delete_snapshot(&d, &done.snapshot_id).await;
    let (_, temps) = lvm_view(&done.snapshot_id);
    assert!(temps.is_empty(), "temporary LVs left behind: {temps:?}");
    assert!(
        late.is_empty() && other.is_empty(),
        "restore of the snapshot: {ok} of {chunks} MiB as at the cut; MiB {late:?} hold data \
         written to the source after CreateSnapshot had returned (the snapshot was cut); MiB \
         {other:?} hold neither"
    );
}

// ---------------------------------------------------------------------------
// 8. Block maps (the SnapshotMetadata service)
// ---------------------------------------------------------------------------

/// The test pool's chunk size (lvm's default; the fixture sets none).
const POOL_CHUNK: u64 = 64 << 10;

/// Writes `data` at `offset` of a raw block device and makes it durable.
fn write_at(dev: &Path, offset: u64, data: &[u8]) {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(dev)
        .unwrap_or_else(|e| panic!("open {}: {e}", dev.display()));
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
}

fn read_all(dev: &Path) -> Vec<u8> {
    let mut out = vec![0; SIZE as usize];
    File::open(dev)
        .and_then(|mut f| f.read_exact(&mut out))
        .unwrap_or_else(|e| panic!("read {}: {e}", dev.display()));
    out
}

/// The whole chunks that writes at `(offset, length)` touch, merged.
fn chunks_of(writes: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut chunks: Vec<u64> = writes
        .iter()
        .flat_map(|&(o, l)| (o / POOL_CHUNK)..(o + l).div_ceil(POOL_CHUNK))
        .collect();
    chunks.sort_unstable();
    chunks.dedup();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for c in chunks {
        match out.last_mut() {
            Some(last) if last.0 + last.1 == c * POOL_CHUNK => last.1 += POOL_CHUNK,
            _ => out.push((c * POOL_CHUNK, POOL_CHUNK)),
        }
    }
    out
}

/// Every message of a listing: each must be VARIABLE_LENGTH with the
/// volume's size and at most `max` ranges (0: any number); returns the
/// ranges in order.
async fn listing(
    d: &Driver,
    query: BlockQuery<'_>,
    start: i64,
    max: i32,
) -> Result<Vec<(u64, u64)>, tonic::Status> {
    let mut client = SnapshotMetadataClient::new(d.channel());
    let pages = block_pages(&mut client, query, start, max, Default::default()).await?;
    let what = format!("{query:?}");
    let limit = if max == 0 { usize::MAX } else { max as usize };
    let mut out = Vec::new();
    for p in pages {
        let kind = csi::BlockMetadataType::VariableLength as i32;
        assert_eq!(p.block_metadata_type, kind, "{what}");
        assert_eq!(
            p.volume_capacity_bytes, SIZE,
            "{what}: volume_capacity_bytes"
        );
        let n = p.ranges.len();
        assert!(n > 0 && n <= limit, "{what}: {n} ranges");
        out.extend(p.ranges.iter().map(|&(o, l)| (o as u64, l as u64)));
    }
    assert!(
        out.windows(2).all(|w| w[0].0 + w[0].1 < w[1].0),
        "{what}: unordered or unmerged: {out:?}"
    );
    Ok(out)
}

async fn allocated(
    d: &Driver,
    id: &str,
    start: i64,
    max: i32,
) -> Result<Vec<(u64, u64)>, tonic::Status> {
    listing(d, BlockQuery::Allocated(id), start, max).await
}

async fn delta(
    d: &Driver,
    base: &str,
    target: &str,
    start: i64,
    max: i32,
) -> Result<Vec<(u64, u64)>, tonic::Status> {
    listing(d, BlockQuery::Delta { base, target }, start, max).await
}

/// A raw block volume published at `tag`; returns the device path.
async fn publish_block(d: &Driver, id: &str, tag: &str) -> PathBuf {
    let staging = format!("{tag}-staging");
    d.stage(id, &staging, block_cap()).await;
    d.publish(id, &staging, tag, block_cap(), false).await;
    d.path(tag)
}

async fn unpublish_block(d: &Driver, id: &str, tag: &str) {
    d.unpublish(id, tag).await;
    d.unstage(id, &format!("{tag}-staging")).await;
}

/// On a thin volume: blocks written, snapshot A, more written (one block
/// overwritten), snapshot B.
/// * The plugin advertises the SnapshotMetadata service.
/// * GetMetadataAllocated(A) is exactly the pool chunks written before A,
///   (B) those written before B; GetMetadataDelta(A, B) exactly the chunks
///   written in between. No unwritten chunk is listed.
/// * Paged by max_results = 1, and resumed at a starting_offset inside a
///   range, the listing is the same ranges (the resumed one from the
///   offset's chunk on).
/// * A backup-style rebuild (zeros, A's allocated ranges read from a
///   restore of A, then the delta read from a restore of B) is B, byte for
///   byte.
/// * Errors: no id INVALID_ARGUMENT, unknown or malformed id NOT_FOUND, an
///   offset at the end OUT_OF_RANGE, snapshots of two volumes
///   INVALID_ARGUMENT.
#[tokio::test]
async fn block_maps_of_thin_snapshots_are_exact() {
    if skip_without_lvm() {
        return;
    }
    let d = Driver::start().await;
    let cl = Cleanup::new(&d);
    let caps = expect_ok(
        d.identity()
            .get_plugin_capabilities(csi::GetPluginCapabilitiesRequest {})
            .await,
        "GetPluginCapabilities",
    );
    use csi::plugin_capability::{service, Service, Type as CapabilityType};
    let wanted = CapabilityType::Service(Service {
        r#type: service::Type::SnapshotMetadataService as i32,
    });
    assert!(
        caps.capabilities
            .iter()
            .any(|c| c.r#type.as_ref() == Some(&wanted)),
        "SNAPSHOT_METADATA_SERVICE not advertised: {caps:?}"
    );

    let src = create_volume(&d, &cl, "cbt", THIN, block_cap(), SIZE).await;
    let dev = publish_block(&d, &src.volume_id, "cbt").await;
    let before: [(u64, u64); 3] = [(0, 4096), (400 << 10, 4096), (10 << 20, 1 << 20)];
    let between: [(u64, u64); 3] = [
        (400 << 10, 4096),
        (20 << 20, 128 << 10),
        ((63 << 20) + 8192, 4096),
    ];
    for (i, &(o, l)) in before.iter().enumerate() {
        write_at(&dev, o, &pattern(10 + i as u64, l as usize));
    }
    let a = snapshot_ready(&d, &cl, &unique_name("cbt-a"), &src.volume_id).await;
    for (i, &(o, l)) in between.iter().enumerate() {
        write_at(&dev, o, &pattern(20 + i as u64, l as usize));
    }
    let b = snapshot_ready(&d, &cl, &unique_name("cbt-b"), &src.volume_id).await;
    unpublish_block(&d, &src.volume_id, "cbt").await;

    let all: Vec<(u64, u64)> = before.iter().chain(&between).copied().collect();
    let a_map = allocated(&d, &a.snapshot_id, 0, 0).await.unwrap();
    assert_eq!(a_map, chunks_of(&before), "allocated(A)");
    assert_eq!(
        allocated(&d, &b.snapshot_id, 0, 0).await.unwrap(),
        chunks_of(&all),
        "allocated(B)"
    );
    let ab = delta(&d, &a.snapshot_id, &b.snapshot_id, 0, 0)
        .await
        .unwrap();
    assert_eq!(ab, chunks_of(&between), "delta(A, B)");
    assert!(
        delta(&d, &b.snapshot_id, &b.snapshot_id, 0, 0)
            .await
            .unwrap()
            .is_empty(),
        "a snapshot differs from itself"
    );

    // Paging and resuming.
    assert_eq!(
        allocated(&d, &a.snapshot_id, 0, 1).await.unwrap(),
        a_map,
        "max_results=1"
    );
    let mid = (10 << 20) + 70_000;
    let resumed = allocated(&d, &a.snapshot_id, mid, 2).await.unwrap();
    let from = mid as u64 / POOL_CHUNK * POOL_CHUNK;
    assert_eq!(resumed, vec![(from, (11 << 20) - from)], "resumed at {mid}");
    assert_eq!(
        delta(&d, &a.snapshot_id, &b.snapshot_id, 20 << 20, 1)
            .await
            .unwrap(),
        ab[1..].to_vec(),
        "delta resumed"
    );

    // Errors.
    let code = |r: Result<Vec<(u64, u64)>, tonic::Status>| r.map(|_| ()).unwrap_err().code();
    assert_eq!(code(allocated(&d, "", 0, 0).await), Code::InvalidArgument);
    assert_eq!(
        code(allocated(&d, "no-such-snapshot", 0, 0).await),
        Code::NotFound
    );
    let gone = a
        .snapshot_id
        .replace(&a.snapshot_id[a.snapshot_id.len() - 4..], "0000");
    assert_eq!(code(allocated(&d, &gone, 0, 0).await), Code::NotFound);
    assert_eq!(
        code(allocated(&d, &a.snapshot_id, SIZE, 0).await),
        Code::OutOfRange
    );
    assert_eq!(
        code(allocated(&d, &a.snapshot_id, -1, 0).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(delta(&d, &a.snapshot_id, "", 0, 0).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(delta(&d, &gone, &b.snapshot_id, 0, 0).await),
        Code::NotFound
    );

    // A backup tool's rebuild of B from A's ranges and the delta.
    let ra = create_from(
        &d,
        &cl,
        &unique_name("cbt-ra"),
        THIN,
        block_cap(),
        SIZE,
        snapshot_source(&a.snapshot_id),
    )
    .await;
    let rb = create_from(
        &d,
        &cl,
        &unique_name("cbt-rb"),
        THIN,
        block_cap(),
        SIZE,
        snapshot_source(&b.snapshot_id),
    )
    .await;
    let ra_dev = publish_block(&d, &ra.volume_id, "ra").await;
    let rb_dev = publish_block(&d, &rb.volume_id, "rb").await;
    let (a_bytes, b_bytes) = (read_all(&ra_dev), read_all(&rb_dev));
    let mut rebuilt = vec![0u8; SIZE as usize];
    for (o, l) in a_map.iter().map(|&(o, l)| (o as usize, l as usize)) {
        rebuilt[o..o + l].copy_from_slice(&a_bytes[o..o + l]);
    }
    for (o, l) in ab.iter().map(|&(o, l)| (o as usize, l as usize)) {
        rebuilt[o..o + l].copy_from_slice(&b_bytes[o..o + l]);
    }
    assert!(
        rebuilt == b_bytes,
        "B rebuilt from A's allocated ranges and the delta differs from B"
    );
    unpublish_block(&d, &ra.volume_id, "ra").await;
    unpublish_block(&d, &rb.volume_id, "rb").await;

    // Another volume's snapshot is no base for these.
    let other = create_volume(&d, &cl, "cbt-other", THIN, block_cap(), SIZE).await;
    let c = snapshot_ready(&d, &cl, &unique_name("cbt-c"), &other.volume_id).await;
    assert_eq!(
        code(delta(&d, &c.snapshot_id, &b.snapshot_id, 0, 0).await),
        Code::InvalidArgument
    );

    for s in [&a, &b, &c] {
        delete_snapshot(&d, &s.snapshot_id).await;
    }
    for v in [&ra, &rb, &other, &src] {
        delete_volume(&d, &v.volume_id).await;
    }
}

/// A thick snapshot is a full copy: its allocated map is the whole volume,
/// and the delta between two is computed by comparing them: exactly the
/// 64 KiB chunks whose bytes changed in between. The comparison holds both
/// exclusively: while another holder has one, it is ABORTED.
#[tokio::test]
async fn block_maps_of_thick_snapshots_are_whole_and_deltas_compared() {
    if skip_without_lvm() {
        return;
    }
    let d = Driver::start().await;
    let cl = Cleanup::new(&d);
    let src = create_volume(&d, &cl, "cbt-thick", THICK, block_cap(), SIZE).await;
    let dev = publish_block(&d, &src.volume_id, "thick").await;
    write_at(&dev, 0, &pattern(40, 8192));
    let a = snapshot_ready(&d, &cl, &unique_name("cbt-ta"), &src.volume_id).await;
    let between: [(u64, u64); 2] = [(4096, 4096), ((30 << 20) + 100_000, 200_000)];
    for (i, &(o, l)) in between.iter().enumerate() {
        write_at(&dev, o, &pattern(50 + i as u64, l as usize));
    }
    let b = snapshot_ready(&d, &cl, &unique_name("cbt-tb"), &src.volume_id).await;
    unpublish_block(&d, &src.volume_id, "thick").await;
    assert_eq!(
        allocated(&d, &a.snapshot_id, 0, 0).await.unwrap(),
        vec![(0, SIZE as u64)]
    );
    assert_eq!(
        delta(&d, &a.snapshot_id, &b.snapshot_id, 0, 0)
            .await
            .unwrap(),
        chunks_of(&between),
        "delta(A, B) of thick snapshots"
    );
    // While something holds B exclusively (as a removal's zeroing does),
    // the comparison does not read it: ABORTED, and fine afterwards.
    let key = b.snapshot_id.rsplit(':').next().unwrap();
    let held = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_EXCL)
            .open(format!("/dev/{THICK_VG}/ldsnap-{key}"))
            .expect("hold snapshot B exclusively")
    };
    let r = delta(&d, &a.snapshot_id, &b.snapshot_id, 0, 0).await;
    assert_eq!(r.map(|_| ()).unwrap_err().code(), Code::Aborted);
    drop(held);
    assert!(delta(&d, &a.snapshot_id, &b.snapshot_id, 0, 0)
        .await
        .is_ok());
    delete_snapshot(&d, &b.snapshot_id).await;
    delete_snapshot(&d, &a.snapshot_id).await;
    delete_volume(&d, &src.volume_id).await;
}

/// The agent dies with the pool's metadata snapshot reserved (fail point
/// `lvm.block_map.after_reserve`); after a restart the same call releases
/// the leftover and answers.
#[tokio::test]
async fn a_block_map_after_a_crash_with_the_metadata_snapshot_held() {
    if skip_without_lvm() {
        return;
    }
    let d = Driver::builder()
        .env("LODESTONE_FAILPOINTS", "lvm.block_map.after_reserve")
        .start()
        .await;
    let cl = Cleanup::new(&d);
    let src = create_volume(&d, &cl, "cbt-crash", THIN, block_cap(), SIZE).await;
    let dev = publish_block(&d, &src.volume_id, "crash").await;
    write_at(&dev, 1 << 20, &pattern(30, 4096));
    let a = snapshot_ready(&d, &cl, &unique_name("cbt-crash"), &src.volume_id).await;
    unpublish_block(&d, &src.volume_id, "crash").await;
    assert!(
        allocated(&d, &a.snapshot_id, 0, 0).await.is_err(),
        "the fail point did not fire"
    );
    let (status, dir) = d.stop_and_keep_dir();
    assert!(
        status.is_some_and(|s| !s.success()),
        "the driver did not die: {status:?}"
    );

    let d = Driver::builder().start_in(dir).await;
    let cl = cl.handover(&d);
    d.track(&src.volume_id);
    assert_eq!(
        allocated(&d, &a.snapshot_id, 0, 0).await.unwrap(),
        chunks_of(&[(1 << 20, 4096)])
    );
    delete_snapshot(&d, &a.snapshot_id).await;
    delete_volume(&d, &src.volume_id).await;
    drop(cl);
}
