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
