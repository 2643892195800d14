//! Node service against real volumes (guest only, with
//! `LODESTONE_TEST_LVM=1`): stage, publish, data, read-only publication,
//! statistics, online expansion and teardown, for filesystem volumes (ext4,
//! xfs, btrfs) and raw block volumes, in both device classes.

use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileTypeExt;

use lodestone::csi;
use lodestone::csi::volume_usage::Unit;
use tonic::Code;

use crate::common::*;

const EROFS: i32 = 30;
const STAGING: &str = "staging";
const TARGET: &str = "target";

fn other_fs(fs: &str) -> &'static str {
    if fs == "ext4" {
        "xfs"
    } else {
        "ext4"
    }
}

#[track_caller]
fn check_usage(
    stats: &csi::NodeGetVolumeStatsResponse,
    capacity: i64,
    inodes: bool,
    what: &str,
) -> i64 {
    let bytes = usage(stats, Unit::Bytes).unwrap_or_else(|| panic!("{what}: no BYTES usage"));
    assert!(
        bytes.total > 0 && bytes.total <= capacity,
        "{what}: {bytes:?} for {capacity}"
    );
    assert!(
        bytes.total >= capacity / 2,
        "{what}: filesystem of {} on {capacity}",
        bytes.total
    );
    assert!(bytes.used >= 0 && bytes.available >= 0, "{what}: {bytes:?}");
    assert!(
        bytes.used <= bytes.total && bytes.available <= bytes.total,
        "{what}: {bytes:?}"
    );
    if inodes {
        let i = usage(stats, Unit::Inodes).unwrap_or_else(|| panic!("{what}: no INODES usage"));
        assert!(
            i.total > 0 && i.used >= 1 && i.used <= i.total,
            "{what}: {i:?}"
        );
        assert!(i.available >= 0 && i.available <= i.total, "{what}: {i:?}");
    }
    if let Some(cond) = &stats.volume_condition {
        assert!(
            !cond.abnormal,
            "{what}: volume reported abnormal: {}",
            cond.message
        );
    }
    bytes.total
}

/// The whole life of a filesystem volume on this node.
///
/// * NodeStageVolume formats and mounts at the staging path; repeating it
///   with the same arguments is OK, with an incompatible capability is
///   ALREADY_EXISTS.
/// * NodePublishVolume makes the volume usable at the target path (which the
///   plugin creates); repeating it is OK; the same target with another
///   `readonly` flag is ALREADY_EXISTS.
/// * Data written through the target survives unpublish/unstage and a new
///   stage/publish (the volume is not reformatted).
/// * `readonly` publication MUST be read-only: writes fail with EROFS.
/// * NodeGetVolumeStats reports bytes (and inodes where the filesystem has
///   them) and, with VOLUME_CONDITION, a normal condition.
/// * DeleteVolume of a staged volume is FAILED_PRECONDITION (in use).
/// * ControllerExpandVolume of a mounted volume asks for node expansion;
///   NodeExpandVolume then grows the filesystem online.
/// * NodeUnpublishVolume removes the target; NodeUnpublishVolume and
///   NodeUnstageVolume are idempotent.
async fn mount_lifecycle(class: &str, fs: &str, size: i64, grown: i64) {
    let d = Driver::start().await;
    let cap = mount_cap(fs);
    let v = d
        .create(
            &unique_name(&format!("{fs}-{class}")),
            class,
            cap.clone(),
            size,
            0,
        )
        .await;
    let id = v.volume_id.clone();

    d.stage(&id, STAGING, cap.clone()).await;
    assert!(
        is_mount_point(&d.path(STAGING)),
        "staging path is not a mount point"
    );
    d.stage(&id, STAGING, cap.clone()).await;
    let r = d
        .node()
        .node_stage_volume(d.stage_req(&id, STAGING, mount_cap(other_fs(fs))))
        .await;
    expect_code(
        r,
        Code::AlreadyExists,
        "NodeStageVolume with another fs_type",
    );

    d.publish(&id, STAGING, TARGET, cap.clone(), false).await;
    d.publish(&id, STAGING, TARGET, cap.clone(), false).await;
    let r = d
        .node()
        .node_publish_volume(d.publish_req(&id, STAGING, TARGET, cap.clone(), true))
        .await;
    expect_code(
        r,
        Code::AlreadyExists,
        "NodePublishVolume same target, readonly",
    );
    assert!(
        is_mount_point(&d.path(TARGET)),
        "target is not a mount point"
    );

    let file = d.path(TARGET).join("hello.txt");
    let payload = format!("lodestone {fs} on {class}\n").repeat(1000);
    {
        let mut f = std::fs::File::create(&file).expect("write through the target");
        f.write_all(payload.as_bytes()).unwrap();
        f.sync_all().unwrap();
    }

    let stats = d.stats(&id, TARGET).await;
    let total_before = check_usage(&stats, v.capacity_bytes, fs != "btrfs", "target stats");
    let staged_stats = d.stats(&id, STAGING).await;
    check_usage(
        &staged_stats,
        v.capacity_bytes,
        fs != "btrfs",
        "staging stats",
    );

    let r = d
        .controller()
        .delete_volume(csi::DeleteVolumeRequest {
            volume_id: id.clone(),
            ..Default::default()
        })
        .await;
    expect_code(r, Code::FailedPrecondition, "DeleteVolume while staged");

    d.unpublish(&id, TARGET).await;
    assert!(
        !d.path(TARGET).exists(),
        "NodeUnpublishVolume left the target path behind"
    );
    d.unpublish(&id, TARGET).await;
    d.unstage(&id, STAGING).await;
    assert!(
        !is_mount_point(&d.path(STAGING)),
        "still mounted after NodeUnstageVolume"
    );
    d.unstage(&id, STAGING).await;

    // Again, read-only this time: the data is there and cannot be changed.
    d.stage(&id, STAGING, cap.clone()).await;
    d.publish(&id, STAGING, "target-ro", cap.clone(), true)
        .await;
    let ro_file = d.path("target-ro").join("hello.txt");
    assert_eq!(
        std::fs::read_to_string(&ro_file).expect("read back"),
        payload
    );
    let err = std::fs::write(d.path("target-ro").join("new.txt"), b"x")
        .expect_err("write to a readonly publication succeeded");
    assert_eq!(err.raw_os_error(), Some(EROFS), "expected EROFS, got {err}");
    let err = OpenOptions::new()
        .append(true)
        .open(&ro_file)
        .expect_err("open for append");
    assert_eq!(err.raw_os_error(), Some(EROFS), "expected EROFS, got {err}");
    d.unpublish(&id, "target-ro").await;

    // Read-write again, then grow it while it is in use.
    d.publish(&id, STAGING, TARGET, cap.clone(), false).await;
    assert_eq!(std::fs::read_to_string(&file).expect("read back"), payload);
    let r = d
        .controller()
        .controller_expand_volume(csi::ControllerExpandVolumeRequest {
            volume_id: id.clone(),
            capacity_range: range(grown, 0),
            volume_capability: Some(cap.clone()),
            ..Default::default()
        })
        .await;
    let expanded = expect_ok(r, "ControllerExpandVolume");
    assert!(
        expanded.capacity_bytes >= grown,
        "expanded to {}",
        expanded.capacity_bytes
    );
    assert!(
        expanded.node_expansion_required,
        "a filesystem volume needs node expansion"
    );
    let r = d
        .node()
        .node_expand_volume(csi::NodeExpandVolumeRequest {
            volume_id: id.clone(),
            volume_path: d.path_str(TARGET),
            capacity_range: range(grown, 0),
            staging_target_path: d.path_str(STAGING),
            volume_capability: Some(cap.clone()),
            ..Default::default()
        })
        .await;
    let node_expanded = expect_ok(r, "NodeExpandVolume");
    assert!(
        node_expanded.capacity_bytes == 0 || node_expanded.capacity_bytes >= grown,
        "NodeExpandVolume reported {}",
        node_expanded.capacity_bytes
    );
    let stats = d.stats(&id, TARGET).await;
    let total_after = check_usage(
        &stats,
        expanded.capacity_bytes,
        fs != "btrfs",
        "after expand",
    );
    assert!(
        total_after > total_before,
        "filesystem did not grow: {total_before} -> {total_after}"
    );
    let got = d
        .controller()
        .controller_get_volume(csi::ControllerGetVolumeRequest {
            volume_id: id.clone(),
        })
        .await;
    let got = expect_ok(got, "ControllerGetVolume after expansion")
        .volume
        .expect("volume");
    assert_eq!(got.capacity_bytes, expanded.capacity_bytes);
    // Asking for less than the volume has is OK and changes nothing.
    let r = d
        .controller()
        .controller_expand_volume(csi::ControllerExpandVolumeRequest {
            volume_id: id.clone(),
            capacity_range: range(size, 0),
            volume_capability: Some(cap.clone()),
            ..Default::default()
        })
        .await;
    let same = expect_ok(r, "ControllerExpandVolume to a smaller size");
    assert_eq!(
        same.capacity_bytes, expanded.capacity_bytes,
        "volume shrank or grew"
    );
    assert_eq!(
        std::fs::read_to_string(&file).expect("read after expansion"),
        payload
    );

    d.unpublish(&id, TARGET).await;
    d.unstage(&id, STAGING).await;
    d.delete(&id).await;
    let r = d
        .controller()
        .controller_get_volume(csi::ControllerGetVolumeRequest { volume_id: id })
        .await;
    expect_code(r, Code::NotFound, "ControllerGetVolume after delete");
}

/// See `mount_lifecycle`: ext4 on a thin volume.
#[tokio::test]
async fn mount_lifecycle_thin_ext4() {
    if skip_without_lvm() {
        return;
    }
    mount_lifecycle(THIN, "ext4", 64 * MIB, 128 * MIB).await;
}

/// See `mount_lifecycle`: ext4 on a thick volume.
#[tokio::test]
async fn mount_lifecycle_thick_ext4() {
    if skip_without_lvm() {
        return;
    }
    mount_lifecycle(THICK, "ext4", 64 * MIB, 128 * MIB).await;
}

/// See `mount_lifecycle`: xfs (about 300 MiB at least) on a thick volume.
#[tokio::test]
async fn mount_lifecycle_thick_xfs() {
    if skip_without_lvm() {
        return;
    }
    mount_lifecycle(THICK, "xfs", 320 * MIB, 400 * MIB).await;
}

/// See `mount_lifecycle`: btrfs on a thin volume.
#[tokio::test]
async fn mount_lifecycle_thin_btrfs() {
    if skip_without_lvm() {
        return;
    }
    mount_lifecycle(THIN, "btrfs", 256 * MIB, 320 * MIB).await;
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 251) as u8).collect()
}

const OFFSET: u64 = 5 * (1 << 20) + 123;

fn device_size(path: &std::path::Path) -> i64 {
    let mut f = std::fs::File::open(path).expect("open device");
    f.seek(SeekFrom::End(0)).expect("seek end") as i64
}

fn read_at(path: &std::path::Path, offset: u64, len: usize) -> Vec<u8> {
    let mut f = std::fs::File::open(path).expect("open device for reading");
    f.seek(SeekFrom::Start(offset)).unwrap();
    let mut buf = vec![0; len];
    f.read_exact(&mut buf).unwrap();
    buf
}

/// The life of a raw block volume on this node.
///
/// * Stage and publish are idempotent; the target is a block device file of
///   the volume's size; bytes written at an offset survive unpublish,
///   unstage, stage and publish.
/// * NodeGetVolumeStats reports the device's size in bytes.
/// * DeleteVolume of a staged volume is FAILED_PRECONDITION.
/// * ControllerExpandVolume of a block volume needs no node step
///   (node_expansion_required = false) and the device grows.
/// * A `readonly` publication refuses writes.
async fn block_lifecycle(class: &str) {
    let d = Driver::start().await;
    let cap = block_cap();
    let v = d
        .create(
            &unique_name(&format!("block-{class}")),
            class,
            cap.clone(),
            16 * MIB,
            0,
        )
        .await;
    let id = v.volume_id.clone();
    let target = d.path(TARGET);

    d.stage(&id, STAGING, cap.clone()).await;
    d.stage(&id, STAGING, cap.clone()).await;
    d.publish(&id, STAGING, TARGET, cap.clone(), false).await;
    d.publish(&id, STAGING, TARGET, cap.clone(), false).await;
    let meta = std::fs::metadata(&target).expect("target exists");
    assert!(
        meta.file_type().is_block_device(),
        "target is not a block device: {meta:?}"
    );
    assert_eq!(device_size(&target), v.capacity_bytes);

    let data = pattern(4096 + 7);
    {
        let mut f = OpenOptions::new()
            .write(true)
            .open(&target)
            .expect("open device for write");
        f.seek(SeekFrom::Start(OFFSET)).unwrap();
        f.write_all(&data).unwrap();
        f.sync_all().unwrap();
    }
    assert_eq!(read_at(&target, OFFSET, data.len()), data);

    let stats = d.stats(&id, TARGET).await;
    let bytes = usage(&stats, Unit::Bytes).expect("BYTES usage for a block volume");
    assert_eq!(bytes.total, v.capacity_bytes, "{stats:?}");

    d.unpublish(&id, TARGET).await;
    assert!(
        !target.exists(),
        "NodeUnpublishVolume left the target file behind"
    );
    d.unpublish(&id, TARGET).await;
    d.unstage(&id, STAGING).await;
    d.unstage(&id, STAGING).await;
    d.stage(&id, STAGING, cap.clone()).await;
    d.publish(&id, STAGING, TARGET, cap.clone(), false).await;
    assert_eq!(
        read_at(&target, OFFSET, data.len()),
        data,
        "data lost across re-stage"
    );

    let r = d
        .controller()
        .controller_expand_volume(csi::ControllerExpandVolumeRequest {
            volume_id: id.clone(),
            capacity_range: range(32 * MIB, 0),
            volume_capability: Some(cap.clone()),
            ..Default::default()
        })
        .await;
    let expanded = expect_ok(r, "ControllerExpandVolume (block)");
    assert!(expanded.capacity_bytes >= 32 * MIB, "{expanded:?}");
    assert!(
        !expanded.node_expansion_required,
        "a block volume needs no node expansion"
    );
    assert_eq!(
        device_size(&target),
        expanded.capacity_bytes,
        "device did not grow"
    );
    assert_eq!(
        read_at(&target, OFFSET, data.len()),
        data,
        "data lost across expansion"
    );
    d.unpublish(&id, TARGET).await;

    d.publish(&id, STAGING, "target-ro", cap.clone(), true)
        .await;
    let ro = d.path("target-ro");
    assert_eq!(read_at(&ro, OFFSET, data.len()), data);
    let write = || -> std::io::Result<()> {
        let mut f = OpenOptions::new().write(true).open(&ro)?;
        f.seek(SeekFrom::Start(0))?;
        f.write_all(&[0xff; 4096])?;
        f.sync_all()
    };
    assert!(
        write().is_err(),
        "writing to a readonly block publication succeeded"
    );
    d.unpublish(&id, "target-ro").await;

    // Last, as a plugin that gets this wrong loses the volume here.
    let r = d
        .controller()
        .delete_volume(csi::DeleteVolumeRequest {
            volume_id: id.clone(),
            ..Default::default()
        })
        .await;
    expect_code(r, Code::FailedPrecondition, "DeleteVolume while staged");

    d.unstage(&id, STAGING).await;
    d.delete(&id).await;
}

/// See `block_lifecycle`: a thin raw block volume.
#[tokio::test]
async fn block_lifecycle_thin() {
    if skip_without_lvm() {
        return;
    }
    block_lifecycle(THIN).await;
}

/// See `block_lifecycle`: a thick raw block volume.
#[tokio::test]
async fn block_lifecycle_thick() {
    if skip_without_lvm() {
        return;
    }
    block_lifecycle(THICK).await;
}

/// NodePublishVolume of a plugin with STAGE_UNSTAGE_VOLUME: the spec's
/// error for a request without `staging_target_path` is FAILED_PRECONDITION
/// ("staging target path not set": the CO must stage first).
#[tokio::test]
async fn publish_without_staging_path_is_failed_precondition() {
    if skip_without_lvm() {
        return;
    }
    let d = Driver::start().await;
    let cap = block_cap();
    let v = d
        .create(&unique_name("unstaged"), THIN, cap.clone(), 8 * MIB, 0)
        .await;
    let mut req = d.publish_req(&v.volume_id, STAGING, TARGET, cap, false);
    req.staging_target_path.clear();
    let r = d.node().node_publish_volume(req).await;
    expect_code(
        r,
        Code::FailedPrecondition,
        "NodePublishVolume without staging path",
    );
    d.delete(&v.volume_id).await;
}

// ---------------------------------------------------------------------------
// Publication rules, the volume's own paths, symlinks and crash safety
// ---------------------------------------------------------------------------

/// The LV whose device the filesystem or device node at `path` is on, as
/// (VG, LV), found by device numbers.
fn lv_at(path: &std::path::Path) -> (String, String) {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).expect("stat");
    let dev = if meta.file_type().is_block_device() {
        meta.rdev()
    } else {
        meta.dev()
    };
    let (major, minor) = (nix::sys::stat::major(dev), nix::sys::stat::minor(dev));
    let out = std::process::Command::new("lvm")
        .args(["lvs", "--noheadings", "--separator", ","])
        .args(["-o", "vg_name,lv_name,lv_kernel_major,lv_kernel_minor"])
        .args([THIN_VG, THICK_VG])
        .output()
        .expect("run lvm lvs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    for line in text.lines() {
        let f: Vec<&str> = line.trim().split(',').collect();
        if f.len() == 4 && f[2] == major.to_string() && f[3] == minor.to_string() {
            return (f[0].to_string(), f[1].to_string());
        }
    }
    panic!("no LV with device {major}:{minor} in {text}");
}

fn lvm_ok(args: &[&str]) {
    let out = std::process::Command::new("lvm")
        .args(args)
        .output()
        .expect("run lvm");
    assert!(
        out.status.success(),
        "lvm {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Whether the kernel refuses writes to the block device behind `node` (a
/// device node or a bind of one), from sysfs.
fn device_read_only(node: &std::path::Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let rdev = std::fs::metadata(node).expect("stat device").rdev();
    let sys = format!(
        "/sys/dev/block/{}:{}/ro",
        nix::sys::stat::major(rdev),
        nix::sys::stat::minor(rdev)
    );
    std::fs::read_to_string(&sys).expect("read sysfs ro").trim() == "1"
}

nix::ioctl_write_ptr_bad!(
    blkroset,
    nix::request_code_none!(0x12, 93),
    nix::libc::c_int
);

/// Clears the device's read-only flag through a device node (BLKROSET 0).
fn make_device_writable(node: &std::path::Path) {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(node).expect("open device");
    let zero: nix::libc::c_int = 0;
    // SAFETY: BLKROSET reads one int through the pointer.
    unsafe { blkroset(f.as_raw_fd(), &zero) }.expect("BLKROSET 0");
}

/// NodePublishVolume with SINGLE_NODE_SINGLE_WRITER (the driver advertises
/// SINGLE_NODE_MULTI_WRITER): a second publication at another target path
/// while the first exists is FAILED_PRECONDITION and mounts nothing; the
/// same target again is OK; once the first is unpublished, the other target
/// may publish.
async fn single_writer_publishes_once(cap: csi::VolumeCapability) {
    use lodestone::csi::volume_capability::access_mode::Mode;
    let d = Driver::start().await;
    let cap = with_mode(cap, Mode::SingleNodeSingleWriter);
    let v = d
        .create(&unique_name("snsw"), THIN, cap.clone(), 16 * MIB, 0)
        .await;
    let id = v.volume_id.clone();
    d.stage(&id, STAGING, cap.clone()).await;
    d.publish(&id, STAGING, TARGET, cap.clone(), false).await;
    d.publish(&id, STAGING, TARGET, cap.clone(), false).await;
    let r = d
        .node()
        .node_publish_volume(d.publish_req(&id, STAGING, "other_target", cap.clone(), false))
        .await;
    expect_code(
        r,
        Code::FailedPrecondition,
        "second SINGLE_NODE_SINGLE_WRITER publication",
    );
    assert!(
        !is_mount_point(&d.path("other_target")),
        "the refused publication mounted something"
    );
    d.unpublish(&id, TARGET).await;
    d.publish(&id, STAGING, "other_target", cap.clone(), false)
        .await;
    d.unpublish(&id, "other_target").await;
    d.unstage(&id, STAGING).await;
    d.delete(&id).await;
}

/// See `single_writer_publishes_once`: a filesystem volume.
#[tokio::test]
async fn single_node_single_writer_second_target_mount() {
    if skip_without_lvm() {
        return;
    }
    single_writer_publishes_once(ext4()).await;
}

/// See `single_writer_publishes_once`: a raw block volume.
#[tokio::test]
async fn single_node_single_writer_second_target_block() {
    if skip_without_lvm() {
        return;
    }
    single_writer_publishes_once(block_cap()).await;
}

/// A read-only raw block publication must leave the device read-only
/// (BLKROSET): a read-only bind of a device node does not stop writes. The
/// driver dies right after the bind (fail point `node.publish.after_bind`);
/// the device's flag is then cleared (as a device-mapper table reload, or an
/// older driver that set it after the bind, would leave it); the retried
/// publish must answer OK only with the device read-only again, and writes
/// through the target must fail. Unstage makes the device writable again.
#[tokio::test]
async fn read_only_block_publish_retry_after_crash_sets_device_read_only() {
    if skip_without_lvm() {
        return;
    }
    let d = Driver::builder()
        .env("LODESTONE_FAILPOINTS", "node.publish.after_bind")
        .start()
        .await;
    let cap = block_cap();
    let v = d
        .create(&unique_name("ro-crash"), THIN, cap.clone(), 16 * MIB, 0)
        .await;
    let id = v.volume_id.clone();
    d.stage(&id, STAGING, cap.clone()).await;
    let r = d
        .node()
        .node_publish_volume(d.publish_req(&id, STAGING, "target-ro", cap.clone(), true))
        .await;
    assert!(r.is_err(), "the fail point did not fire: {r:?}");
    let (status, dir) = d.stop_and_keep_dir();
    assert!(
        status.is_some_and(|s| !s.success()),
        "the driver did not die at the fail point: {status:?}"
    );
    let d = Driver::builder().start_in(dir).await;
    d.track(&id);
    let ro = d.path("target-ro");
    assert!(
        is_mount_point(&ro),
        "the crash happened before the bind; the test proves nothing"
    );
    make_device_writable(&ro);
    assert!(!device_read_only(&ro));

    d.publish(&id, STAGING, "target-ro", cap.clone(), true)
        .await;
    assert!(
        device_read_only(&ro),
        "NodePublishVolume answered OK for a read-only block publication of a writable device"
    );
    let write = OpenOptions::new()
        .write(true)
        .open(&ro)
        .and_then(|mut f| f.write_all(&[0xff; 4096]).and_then(|_| f.sync_all()));
    assert!(
        write.is_err(),
        "writing through the read-only target worked"
    );
    // A read-write publication elsewhere must wait.
    let r = d
        .node()
        .node_publish_volume(d.publish_req(&id, STAGING, TARGET, cap.clone(), false))
        .await;
    expect_code(r, Code::FailedPrecondition, "read-write beside read-only");

    let staged = d.path(STAGING).join("device");
    d.unpublish(&id, "target-ro").await;
    assert!(device_read_only(&staged), "read-only until unstaged");
    // Keep a handle on the device to look at it after unstage.
    let dev = std::fs::canonicalize(format!("/sys/dev/block/{}", {
        use std::os::unix::fs::MetadataExt;
        let rdev = std::fs::metadata(&staged).unwrap().rdev();
        format!(
            "{}:{}",
            nix::sys::stat::major(rdev),
            nix::sys::stat::minor(rdev)
        )
    }))
    .unwrap();
    d.unstage(&id, STAGING).await;
    assert_eq!(
        std::fs::read_to_string(dev.join("ro")).unwrap().trim(),
        "0",
        "the device stayed read-only after unstage"
    );
    d.delete(&id).await;
}

/// A symlink planted at a target or staging path (to /etc, to another
/// volume's mount, to a file) is never followed: NodePublishVolume,
/// NodeUnpublishVolume and NodeStageVolume refuse with FAILED_PRECONDITION,
/// nothing is mounted or unmounted through the link, and the link stays.
#[tokio::test]
async fn symlink_at_target_or_staging_is_never_followed() {
    if skip_without_lvm() {
        return;
    }
    let d = Driver::start().await;
    let cap = ext4();
    let a = d
        .create(&unique_name("link-a"), THIN, cap.clone(), 16 * MIB, 0)
        .await;
    d.stage(&a.volume_id, STAGING, cap.clone()).await;
    d.publish(&a.volume_id, STAGING, TARGET, cap.clone(), false)
        .await;
    std::os::unix::fs::symlink("/etc", d.path("link-etc")).unwrap();
    std::os::unix::fs::symlink(d.path(TARGET), d.path("link-vol")).unwrap();
    for link in ["link-etc", "link-vol"] {
        let r = d
            .node()
            .node_publish_volume(d.publish_req(&a.volume_id, STAGING, link, cap.clone(), false))
            .await;
        expect_code(r, Code::FailedPrecondition, &format!("publish at {link}"));
        let r = d
            .node()
            .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                volume_id: a.volume_id.clone(),
                target_path: d.path_str(link),
            })
            .await;
        expect_code(r, Code::FailedPrecondition, &format!("unpublish at {link}"));
        assert!(std::fs::symlink_metadata(d.path(link))
            .unwrap()
            .file_type()
            .is_symlink());
    }
    assert!(!is_mount_point(std::path::Path::new("/etc")));
    assert!(
        is_mount_point(&d.path(TARGET)),
        "the volume behind the link was unmounted"
    );

    // Block: a link to a plain file at the target; a link as staging path.
    let b = d
        .create(&unique_name("link-b"), THIN, block_cap(), 16 * MIB, 0)
        .await;
    d.stage(&b.volume_id, "staging-b", block_cap()).await;
    std::fs::write(d.path("plain"), b"").unwrap();
    std::os::unix::fs::symlink(d.path("plain"), d.path("link-file")).unwrap();
    let r = d
        .node()
        .node_publish_volume(d.publish_req(
            &b.volume_id,
            "staging-b",
            "link-file",
            block_cap(),
            false,
        ))
        .await;
    expect_code(r, Code::FailedPrecondition, "block publish at a link");
    assert!(!is_mount_point(&d.path("plain")));
    std::fs::create_dir(d.path("elsewhere")).unwrap();
    std::os::unix::fs::symlink(d.path("elsewhere"), d.path("link-staging")).unwrap();
    let r = d
        .node()
        .node_stage_volume(d.stage_req(&b.volume_id, "link-staging", block_cap()))
        .await;
    expect_code(r, Code::FailedPrecondition, "stage at a link");
    assert!(std::fs::read_dir(d.path("elsewhere"))
        .unwrap()
        .next()
        .is_none());

    d.unstage(&b.volume_id, "staging-b").await;
    d.unpublish(&a.volume_id, TARGET).await;
    d.unstage(&a.volume_id, STAGING).await;
    d.delete(&a.volume_id).await;
    d.delete(&b.volume_id).await;
}

/// NodeGetVolumeStats and NodeExpandVolume answer only for a path where the
/// volume is staged or published: /etc, an empty directory and another
/// volume's paths are NOT_FOUND; the volume's own target and staging paths
/// answer (a block volume's staging directory with its device's size).
#[tokio::test]
async fn stats_and_expand_only_where_the_volume_is() {
    if skip_without_lvm() {
        return;
    }
    let d = Driver::start().await;
    let a = d
        .create(&unique_name("where-a"), THIN, ext4(), 16 * MIB, 0)
        .await;
    let b = d
        .create(&unique_name("where-b"), THIN, block_cap(), 16 * MIB, 0)
        .await;
    d.stage(&a.volume_id, STAGING, ext4()).await;
    d.publish(&a.volume_id, STAGING, TARGET, ext4(), false)
        .await;
    d.stage(&b.volume_id, "staging-b", block_cap()).await;
    d.publish(&b.volume_id, "staging-b", "target-b", block_cap(), false)
        .await;
    std::fs::create_dir(d.path("empty")).unwrap();
    let unrelated = [
        "/etc".to_string(),
        d.path_str("empty"),
        d.path_str("target-b"),
        d.path_str("staging-b"),
    ];
    for path in &unrelated {
        let r = d
            .node()
            .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
                volume_id: a.volume_id.clone(),
                volume_path: path.clone(),
                staging_target_path: String::new(),
            })
            .await;
        expect_code(r, Code::NotFound, &format!("NodeGetVolumeStats(a, {path})"));
        let r = d
            .node()
            .node_expand_volume(csi::NodeExpandVolumeRequest {
                volume_id: a.volume_id.clone(),
                volume_path: path.clone(),
                ..Default::default()
            })
            .await;
        expect_code(r, Code::NotFound, &format!("NodeExpandVolume(a, {path})"));
    }
    for path in [TARGET, STAGING] {
        let r = d
            .node()
            .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
                volume_id: b.volume_id.clone(),
                volume_path: d.path_str(path),
                staging_target_path: String::new(),
            })
            .await;
        expect_code(r, Code::NotFound, &format!("NodeGetVolumeStats(b, {path})"));
    }
    let stats = d.stats(&a.volume_id, TARGET).await;
    check_usage(&stats, a.capacity_bytes, true, "a at its target");
    d.stats(&a.volume_id, STAGING).await;
    for path in ["target-b", "staging-b"] {
        let stats = d.stats(&b.volume_id, path).await;
        let bytes = usage(&stats, Unit::Bytes).expect("BYTES");
        assert_eq!(bytes.total, b.capacity_bytes, "b at {path}: {stats:?}");
    }
    let r = d
        .node()
        .node_expand_volume(csi::NodeExpandVolumeRequest {
            volume_id: b.volume_id.clone(),
            volume_path: d.path_str("target-b"),
            volume_capability: Some(block_cap()),
            ..Default::default()
        })
        .await;
    expect_ok(r, "NodeExpandVolume(b, its target)");

    d.unpublish(&b.volume_id, "target-b").await;
    d.unstage(&b.volume_id, "staging-b").await;
    d.unpublish(&a.volume_id, TARGET).await;
    d.unstage(&a.volume_id, STAGING).await;
    d.delete(&a.volume_id).await;
    d.delete(&b.volume_id).await;
}

/// A volume whose LV vanished while it was mounted (here: renamed away, so
/// the driver no longer finds it and its device path is gone) is reported
/// by NodeGetVolumeStats with an abnormal condition rather than NOT_FOUND,
/// and can still be unpublished and unstaged.
#[tokio::test]
async fn stats_report_a_volume_whose_lv_vanished_while_mounted() {
    if skip_without_lvm() {
        return;
    }
    let d = Driver::start().await;
    let v = d
        .create(&unique_name("vanish"), THIN, ext4(), 16 * MIB, 0)
        .await;
    let id = v.volume_id.clone();
    d.stage(&id, STAGING, ext4()).await;
    d.publish(&id, STAGING, TARGET, ext4(), false).await;
    let (vg, lv) = lv_at(&d.path(TARGET));
    let gone = format!("{lv}-gone");
    lvm_ok(&["lvrename", &vg, &lv, &gone]);
    let (_, dir) = d.stop_and_keep_dir();
    let d = Driver::builder().start_in(dir).await;

    let stats = d.stats(&id, TARGET).await;
    let cond = stats.volume_condition.clone().expect("volume_condition");
    assert!(cond.abnormal, "vanished LV reported normal: {stats:?}");
    let r = d
        .node()
        .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
            volume_id: id.clone(),
            volume_path: "/etc".into(),
            staging_target_path: String::new(),
        })
        .await;
    expect_code(r, Code::NotFound, "NodeGetVolumeStats(vanished, /etc)");
    d.unpublish(&id, TARGET).await;
    assert!(!is_mount_point(&d.path(TARGET)));
    d.unstage(&id, STAGING).await;
    assert!(!is_mount_point(&d.path(STAGING)));

    lvm_ok(&["lvrename", &vg, &gone, &lv]);
    let (_, dir) = d.stop_and_keep_dir();
    let d = Driver::builder().start_in(dir).await;
    d.delete(&id).await;
}
