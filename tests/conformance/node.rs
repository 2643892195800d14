//! Node service tests that need no volume group: capabilities, node info and
//! the idempotent teardown calls on paths where nothing is mounted.

use lodestone::csi;
use lodestone::csi::node_service_capability::rpc::Type as Rpc;
use lodestone::csi::node_service_capability::Type as CapType;
use tonic::Code;

use crate::common::*;

/// A well-formed id (the driver's `lvm1:<node>:<class>:<key>` format) of a
/// volume that does not exist.
fn absent_volume_id() -> String {
    format!("lvm1:{NODE_ID}:{THIN}:{}", uuid::Uuid::new_v4().simple())
}

/// NodeGetCapabilities: Lodestone stages volumes (STAGE_UNSTAGE_VOLUME),
/// reports usage (GET_VOLUME_STATS) and condition (VOLUME_CONDITION), and
/// grows filesystems on the node (EXPAND_VOLUME).
#[tokio::test]
async fn node_capabilities() {
    let d = Driver::start().await;
    let caps = expect_ok(
        d.node()
            .node_get_capabilities(csi::NodeGetCapabilitiesRequest {})
            .await,
        "NodeGetCapabilities",
    )
    .capabilities;
    let rpcs: Vec<Rpc> = caps
        .iter()
        .filter_map(|c| c.r#type.as_ref())
        .map(|CapType::Rpc(r)| r.r#type())
        .collect();
    for want in [
        Rpc::StageUnstageVolume,
        Rpc::GetVolumeStats,
        Rpc::ExpandVolume,
        Rpc::VolumeCondition,
    ] {
        assert!(rpcs.contains(&want), "missing {want:?} in {rpcs:?}");
    }
    assert!(
        !rpcs.contains(&Rpc::Unknown),
        "UNKNOWN capability in {rpcs:?}"
    );
}

/// NodeGetInfo: `node_id` is REQUIRED and is the id the plugin was started
/// with; a plugin with VOLUME_ACCESSIBILITY_CONSTRAINTS reports the node's
/// topology, here `topology.lodestone.dev/node = <node id>`. The volume limit
/// MUST NOT be negative (0 means no limit).
#[tokio::test]
async fn node_get_info_reports_id_and_topology() {
    let d = Driver::builder().node_id("worker-7.example").start().await;
    let info = expect_ok(
        d.node().node_get_info(csi::NodeGetInfoRequest {}).await,
        "NodeGetInfo",
    );
    assert_eq!(info.node_id, "worker-7.example");
    let topo = info
        .accessible_topology
        .expect("accessible_topology is reported");
    assert_eq!(
        topo.segments.get(TOPOLOGY_KEY).map(String::as_str),
        Some("worker-7.example")
    );
    assert!(
        info.max_volumes_per_node >= 0,
        "{}",
        info.max_volumes_per_node
    );
}

/// NodeUnstageVolume is idempotent: if nothing is staged at
/// `staging_target_path` the plugin MUST reply OK, whether the directory
/// exists or not.
#[tokio::test]
async fn node_unstage_of_unstaged_path_is_ok() {
    let d = Driver::start().await;
    let existing = d.path("staging-dir");
    std::fs::create_dir(&existing).unwrap();
    for path in [d.path_str("staging-dir"), d.path_str("never-created")] {
        let r = d
            .node()
            .node_unstage_volume(csi::NodeUnstageVolumeRequest {
                volume_id: absent_volume_id(),
                staging_target_path: path.clone(),
            })
            .await;
        expect_ok(r, &format!("NodeUnstageVolume({path})"));
        // and again: still OK
        let r = d
            .node()
            .node_unstage_volume(csi::NodeUnstageVolumeRequest {
                volume_id: absent_volume_id(),
                staging_target_path: path.clone(),
            })
            .await;
        expect_ok(r, &format!("second NodeUnstageVolume({path})"));
    }
}

/// NodeUnpublishVolume is idempotent: if the volume is not published at
/// `target_path` the plugin replies OK, whether the path exists or not.
#[tokio::test]
async fn node_unpublish_of_unpublished_path_is_ok() {
    let d = Driver::start().await;
    std::fs::create_dir(d.path("target-dir")).unwrap();
    for path in [d.path_str("target-dir"), d.path_str("never-created")] {
        for attempt in 1..=2 {
            let r = d
                .node()
                .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                    volume_id: absent_volume_id(),
                    target_path: path.clone(),
                })
                .await;
            expect_ok(r, &format!("NodeUnpublishVolume({path}) #{attempt}"));
        }
    }
}

/// NodeUnpublishVolume must not touch a file it did not publish: a regular
/// file with content at `target_path` (nothing mounted) survives with its
/// content, or the call fails; it is never silently deleted.
#[tokio::test]
async fn node_unpublish_keeps_foreign_files() {
    let d = Driver::start().await;
    let target = d.path("not-ours");
    std::fs::write(&target, b"precious").unwrap();
    let r = d
        .node()
        .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
            volume_id: absent_volume_id(),
            target_path: d.path_str("not-ours"),
        })
        .await;
    if r.is_ok() {
        assert_eq!(
            std::fs::read(&target).ok().as_deref(),
            Some(&b"precious"[..]),
            "NodeUnpublishVolume deleted or changed a non-empty file it did not create"
        );
    }
}

/// NodeStageVolume, NodePublishVolume, NodeExpandVolume and
/// NodeGetVolumeStats: a volume that does not exist is NOT_FOUND.
#[tokio::test]
async fn node_rpcs_on_impossible_ids_are_not_found() {
    let d = Driver::start().await;
    let mut n = d.node();
    std::fs::create_dir(d.path("existing")).unwrap();
    for id in ["no-such-volume", "lvm1:x:y:z", "../../dev/sda"] {
        let r = n
            .node_stage_volume(csi::NodeStageVolumeRequest {
                volume_id: id.into(),
                staging_target_path: d.path_str("staging"),
                volume_capability: Some(ext4()),
                ..Default::default()
            })
            .await;
        expect_code(r, Code::NotFound, &format!("NodeStageVolume({id})"));
        let r = n
            .node_publish_volume(csi::NodePublishVolumeRequest {
                volume_id: id.into(),
                staging_target_path: d.path_str("staging"),
                target_path: d.path_str("target"),
                volume_capability: Some(ext4()),
                ..Default::default()
            })
            .await;
        expect_code(r, Code::NotFound, &format!("NodePublishVolume({id})"));
        let r = n
            .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
                volume_id: id.into(),
                volume_path: d.path_str("existing"),
                staging_target_path: String::new(),
            })
            .await;
        expect_code(r, Code::NotFound, &format!("NodeGetVolumeStats({id})"));
        let r = n
            .node_expand_volume(csi::NodeExpandVolumeRequest {
                volume_id: id.into(),
                volume_path: d.path_str("existing"),
                capacity_range: range(GIB, 0),
                ..Default::default()
            })
            .await;
        expect_code(r, Code::NotFound, &format!("NodeExpandVolume({id})"));
    }
}

/// NodeGetVolumeStats: a volume path where nothing is staged or published is
/// NOT_FOUND ("volume does not exist on the specified volume_path"), also
/// for a path that does not exist at all.
#[tokio::test]
async fn node_get_volume_stats_on_missing_path_is_not_found() {
    let d = Driver::start().await;
    std::fs::create_dir(d.path("empty")).unwrap();
    for path in [d.path_str("empty"), d.path_str("missing")] {
        let r = d
            .node()
            .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
                volume_id: absent_volume_id(),
                volume_path: path.clone(),
                staging_target_path: String::new(),
            })
            .await;
        expect_code(r, Code::NotFound, &format!("NodeGetVolumeStats({path})"));
    }
}

/// Mounts a small tmpfs at `path` (made first), standing for another
/// volume's mount; false (after saying so) where this process cannot mount.
fn mount_tmpfs(path: &std::path::Path) -> bool {
    std::fs::create_dir_all(path).unwrap();
    match nix::mount::mount(
        Some("lodestone-ct"),
        path,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=1m"),
    ) {
        Ok(()) => true,
        Err(e) => {
            eprintln!("skipped: cannot mount a tmpfs here ({e})");
            false
        }
    }
}

fn unmount(path: &std::path::Path) {
    let _ = nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH);
}

/// NodeGetVolumeStats: a volume id that names no volume on this node is
/// NOT_FOUND whatever the path, also a path that is a mount point of
/// something else (/proc, /dev, a tmpfs) or an unrelated directory (/etc);
/// the driver never answers with the usage of a filesystem that is not the
/// volume's.
#[tokio::test]
async fn node_get_volume_stats_of_unknown_volume_on_unrelated_paths_is_not_found() {
    let d = Driver::start().await;
    let tmpfs = d.path("other-mount");
    let mounted = mount_tmpfs(&tmpfs);
    let mut paths = vec!["/etc".to_string(), "/proc".to_string(), "/dev".to_string()];
    if mounted {
        paths.push(d.path_str("other-mount"));
    }
    for path in paths {
        let r = d
            .node()
            .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
                volume_id: absent_volume_id(),
                volume_path: path.clone(),
                staging_target_path: String::new(),
            })
            .await;
        expect_code(r, Code::NotFound, &format!("NodeGetVolumeStats({path})"));
    }
    if mounted {
        unmount(&tmpfs);
    }
}

/// NodeUnpublishVolume and NodeUnstageVolume of a volume that is not there
/// leave a mount of another device at the path alone: the volume is not
/// published (staged) there, so the reply is OK and nothing is unmounted or
/// removed.
#[tokio::test]
async fn node_teardown_leaves_other_mounts_alone() {
    let d = Driver::start().await;
    for name in ["target", "staging"] {
        let path = d.path(name);
        if !mount_tmpfs(&path) {
            return;
        }
        std::fs::write(path.join("precious"), b"data").unwrap();
        let r = if name == "target" {
            d.node()
                .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                    volume_id: absent_volume_id(),
                    target_path: d.path_str(name),
                })
                .await
                .map(|_| ())
        } else {
            d.node()
                .node_unstage_volume(csi::NodeUnstageVolumeRequest {
                    volume_id: absent_volume_id(),
                    staging_target_path: d.path_str(name),
                })
                .await
                .map(|_| ())
        };
        let still = is_mount_point(&path);
        let content = std::fs::read(path.join("precious")).ok();
        unmount(&path);
        expect_ok(r.map(tonic::Response::new), &format!("teardown of {name}"));
        assert!(still, "the other mount at {name} was unmounted");
        assert_eq!(
            content.as_deref(),
            Some(&b"data"[..]),
            "{name}: content lost"
        );
    }
}

/// A symlink planted at a target or staging path (to /etc, or to another
/// volume's mount) is never followed: NodeUnpublishVolume,
/// NodeUnstageVolume and NodeStageVolume refuse with FAILED_PRECONDITION
/// (the request is well-formed; the node's state at the path is wrong), and
/// the link, what it points to and any mount there stay as they were.
#[tokio::test]
async fn node_rpcs_never_follow_a_symlink_at_the_path() {
    let d = Driver::start().await;
    let other = d.path("other-volume");
    let mounted = mount_tmpfs(&other);
    if mounted {
        std::fs::write(other.join("precious"), b"data").unwrap();
    }
    let mut links = vec![("to-etc", std::path::PathBuf::from("/etc"))];
    if mounted {
        links.push(("to-other", other.clone()));
    }
    for (name, to) in &links {
        std::os::unix::fs::symlink(to, d.path(name)).unwrap();
        let path = d.path_str(name);
        let r = d
            .node()
            .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                volume_id: absent_volume_id(),
                target_path: path.clone(),
            })
            .await;
        expect_code(r, Code::FailedPrecondition, &format!("unpublish {name}"));
        let r = d
            .node()
            .node_unstage_volume(csi::NodeUnstageVolumeRequest {
                volume_id: absent_volume_id(),
                staging_target_path: path.clone(),
            })
            .await;
        expect_code(r, Code::FailedPrecondition, &format!("unstage {name}"));
        let r = d
            .node()
            .node_stage_volume(csi::NodeStageVolumeRequest {
                volume_id: absent_volume_id(),
                staging_target_path: path.clone(),
                volume_capability: Some(ext4()),
                ..Default::default()
            })
            .await;
        expect_code(r, Code::FailedPrecondition, &format!("stage {name}"));
        let meta = std::fs::symlink_metadata(d.path(name)).expect("the link is still there");
        assert!(
            meta.file_type().is_symlink(),
            "{name} is no longer a symlink"
        );
    }
    assert!(std::path::Path::new("/etc").is_dir());
    if mounted {
        let still = is_mount_point(&other);
        let content = std::fs::read(other.join("precious")).ok();
        unmount(&other);
        assert!(still, "the mount behind the symlink was unmounted");
        assert_eq!(content.as_deref(), Some(&b"data"[..]));
    }
}
