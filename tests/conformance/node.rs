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
