//! Controller service tests that need no volume group: capabilities,
//! unimplemented RPCs, ids that cannot exist, ListVolumes paging arguments
//! and GetCapacity topology handling.

use lodestone::csi;
use lodestone::csi::controller_service_capability::rpc::Type as Rpc;
use lodestone::csi::controller_service_capability::Type as CapType;
use tonic::Code;

use crate::common::*;

/// Ids that no Lodestone volume can have: not of the driver's id format,
/// or naming a device class that is not configured.
fn impossible_ids() -> Vec<String> {
    vec![
        "no-such-volume".to_string(),
        "lvm1".to_string(),
        "lvm1:::".to_string(),
        format!("lvm2:{NODE_ID}:{THIN}:{}", uuid::Uuid::new_v4().simple()),
        format!("lvm1:{NODE_ID}:{THIN}:not-hex"),
        format!(
            "lvm1:{NODE_ID}:nosuchclass:{}",
            uuid::Uuid::new_v4().simple()
        ),
        "../../../../etc/passwd".to_string(),
        "-rf".to_string(),
        "vol;reboot".to_string(),
        "$(id)".to_string(),
    ]
}

pub async fn controller_rpcs(d: &Driver) -> Vec<Rpc> {
    let caps = expect_ok(
        d.controller()
            .controller_get_capabilities(csi::ControllerGetCapabilitiesRequest {})
            .await,
        "ControllerGetCapabilities",
    )
    .capabilities;
    caps.iter()
        .filter_map(|c| c.r#type.as_ref())
        .map(|CapType::Rpc(r)| r.r#type())
        .collect()
}

/// ControllerGetCapabilities: Lodestone creates and deletes volumes, lists
/// them, reports capacity, expands volumes and answers ControllerGetVolume.
/// It has no attach step, so it MUST NOT claim PUBLISH_UNPUBLISH_VOLUME (a
/// CO would otherwise call ControllerPublishVolume, which is unimplemented).
#[tokio::test]
async fn controller_capabilities() {
    let d = Driver::start().await;
    let rpcs = controller_rpcs(&d).await;
    for want in [
        Rpc::CreateDeleteVolume,
        Rpc::ListVolumes,
        Rpc::GetCapacity,
        Rpc::ExpandVolume,
        Rpc::GetVolume,
    ] {
        assert!(rpcs.contains(&want), "missing {want:?} in {rpcs:?}");
    }
    assert!(!rpcs.contains(&Rpc::PublishUnpublishVolume), "got {rpcs:?}");
    assert!(
        !rpcs.contains(&Rpc::Unknown),
        "UNKNOWN capability in {rpcs:?}"
    );
}

/// ControllerPublishVolume and ControllerUnpublishVolume are only required
/// with PUBLISH_UNPUBLISH_VOLUME; an RPC the plugin does not implement
/// answers UNIMPLEMENTED.
#[tokio::test]
async fn controller_publish_and_unpublish_are_unimplemented() {
    let d = Driver::start().await;
    let mut c = d.controller();
    let r = c
        .controller_publish_volume(csi::ControllerPublishVolumeRequest {
            volume_id: "v".into(),
            node_id: NODE_ID.into(),
            volume_capability: Some(ext4()),
            ..Default::default()
        })
        .await;
    expect_code(r, Code::Unimplemented, "ControllerPublishVolume");
    let r = c
        .controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
            volume_id: "v".into(),
            node_id: NODE_ID.into(),
            ..Default::default()
        })
        .await;
    expect_code(r, Code::Unimplemented, "ControllerUnpublishVolume");
}

/// RPCs behind capabilities the plugin does not report (snapshots, volume
/// modification) answer UNIMPLEMENTED rather than pretending to work.
#[tokio::test]
async fn unadvertised_controller_rpcs_are_unimplemented() {
    let d = Driver::start().await;
    let rpcs = controller_rpcs(&d).await;
    let mut c = d.controller();
    if !rpcs.contains(&Rpc::CreateDeleteSnapshot) {
        let r = c
            .create_snapshot(csi::CreateSnapshotRequest {
                source_volume_id: "v".into(),
                name: "s".into(),
                ..Default::default()
            })
            .await;
        expect_code(r, Code::Unimplemented, "CreateSnapshot");
        let r = c
            .delete_snapshot(csi::DeleteSnapshotRequest {
                snapshot_id: "s".into(),
                ..Default::default()
            })
            .await;
        expect_code(r, Code::Unimplemented, "DeleteSnapshot");
    }
    if !rpcs.contains(&Rpc::ListSnapshots) {
        let r = c.list_snapshots(csi::ListSnapshotsRequest::default()).await;
        expect_code(r, Code::Unimplemented, "ListSnapshots");
    }
    if !rpcs.contains(&Rpc::ModifyVolume) {
        let r = c
            .controller_modify_volume(csi::ControllerModifyVolumeRequest {
                volume_id: "v".into(),
                mutable_parameters: params(&[("x", "y")]),
                ..Default::default()
            })
            .await;
        expect_code(r, Code::Unimplemented, "ControllerModifyVolume");
    }
}

/// DeleteVolume: if no volume has the given id the plugin MUST reply OK
/// (the volume is already gone as far as the CO is concerned). This holds
/// for ids the plugin could never have issued, too.
#[tokio::test]
async fn delete_volume_of_impossible_id_is_ok() {
    let d = Driver::start().await;
    let mut c = d.controller();
    for id in impossible_ids() {
        let r = c
            .delete_volume(csi::DeleteVolumeRequest {
                volume_id: id.clone(),
                ..Default::default()
            })
            .await;
        expect_ok(r, &format!("DeleteVolume({id:?})"));
    }
}

/// ControllerGetVolume, ValidateVolumeCapabilities and
/// ControllerExpandVolume: a volume that does not exist is NOT_FOUND.
#[tokio::test]
async fn controller_rpcs_on_impossible_ids_are_not_found() {
    let d = Driver::start().await;
    let mut c = d.controller();
    for id in impossible_ids() {
        let r = c
            .controller_get_volume(csi::ControllerGetVolumeRequest {
                volume_id: id.clone(),
            })
            .await;
        expect_code(r, Code::NotFound, &format!("ControllerGetVolume({id:?})"));
        let r = c
            .validate_volume_capabilities(csi::ValidateVolumeCapabilitiesRequest {
                volume_id: id.clone(),
                volume_capabilities: vec![ext4()],
                ..Default::default()
            })
            .await;
        expect_code(
            r,
            Code::NotFound,
            &format!("ValidateVolumeCapabilities({id:?})"),
        );
        let r = c
            .controller_expand_volume(csi::ControllerExpandVolumeRequest {
                volume_id: id.clone(),
                capacity_range: range(GIB, 0),
                volume_capability: Some(ext4()),
                ..Default::default()
            })
            .await;
        expect_code(
            r,
            Code::NotFound,
            &format!("ControllerExpandVolume({id:?})"),
        );
    }
}

/// ListVolumes: a `starting_token` the plugin did not hand out is ABORTED
/// (the CO restarts listing from the beginning).
#[tokio::test]
async fn list_volumes_rejects_unknown_tokens() {
    let d = Driver::start().await;
    let mut c = d.controller();
    for token in ["bogus", "-1", "99999999999999999999", "\u{0}", "lvm1:x:y:z"] {
        let r = c
            .list_volumes(csi::ListVolumesRequest {
                max_entries: 1,
                starting_token: token.to_string(),
            })
            .await;
        expect_code(
            r,
            Code::Aborted,
            &format!("ListVolumes(starting_token={token:?})"),
        );
    }
}

/// ListVolumes: `max_entries` MUST NOT be negative (INVALID_ARGUMENT).
#[tokio::test]
async fn list_volumes_rejects_negative_max_entries() {
    let d = Driver::start().await;
    let r = d
        .controller()
        .list_volumes(csi::ListVolumesRequest {
            max_entries: -1,
            starting_token: String::new(),
        })
        .await;
    expect_code(r, Code::InvalidArgument, "ListVolumes(max_entries=-1)");
}

/// GetCapacity: capacity is reported for the given topology; a segment naming
/// another node has no Lodestone storage of this node, so the available
/// capacity there is 0 (for every device class).
#[tokio::test]
async fn get_capacity_for_another_node_is_zero() {
    let d = Driver::start().await;
    let mut c = d.controller();
    for class in [None, Some(THIN), Some(THICK)] {
        let r = c
            .get_capacity(csi::GetCapacityRequest {
                volume_capabilities: vec![ext4()],
                parameters: class.map(class_params).unwrap_or_default(),
                accessible_topology: Some(node_topology("some-other-node")),
            })
            .await;
        let reply = expect_ok(r, &format!("GetCapacity(class {class:?}, other node)"));
        assert_eq!(reply.available_capacity, 0, "class {class:?}: {reply:?}");
    }
}

/// GetCapacity: an unknown device class is INVALID_ARGUMENT, whatever the
/// topology.
#[tokio::test]
async fn get_capacity_unknown_class_is_invalid() {
    let d = Driver::start().await;
    for topo in [
        None,
        Some(node_topology(NODE_ID)),
        Some(node_topology("other")),
    ] {
        let r = d
            .controller()
            .get_capacity(csi::GetCapacityRequest {
                volume_capabilities: vec![],
                parameters: class_params("nosuchclass"),
                accessible_topology: topo.clone(),
            })
            .await;
        expect_code(
            r,
            Code::InvalidArgument,
            &format!("GetCapacity(nosuchclass, {topo:?})"),
        );
    }
}

/// A well-formed id of this node for a snapshot that does not exist.
fn absent_snapshot_id() -> String {
    format!("lvs1:{NODE_ID}:{THIN}:{}", uuid::Uuid::new_v4().simple())
}

/// A well-formed id of this node for a volume that does not exist.
fn absent_volume_id() -> String {
    format!("lvm1:{NODE_ID}:{THIN}:{}", uuid::Uuid::new_v4().simple())
}

/// Snapshot ids no Lodestone snapshot can have: the impossible volume ids,
/// and volume ids (another kind).
fn impossible_snapshot_ids() -> Vec<String> {
    let mut ids = impossible_ids();
    ids.push(absent_volume_id());
    ids.push(format!("lvs1:{NODE_ID}:{THIN}:not-hex"));
    ids
}

/// ListSnapshots: filtering by a snapshot id or a source volume id that no
/// snapshot or volume has (malformed, of the wrong kind, or just absent) is
/// an empty list, not an error.
#[tokio::test]
async fn list_snapshots_filtered_by_unknown_ids_is_empty() {
    let d = Driver::start().await;
    let mut c = d.controller();
    let mut snapshot_ids = impossible_snapshot_ids();
    snapshot_ids.push(absent_snapshot_id());
    for id in snapshot_ids {
        let r = c
            .list_snapshots(csi::ListSnapshotsRequest {
                snapshot_id: id.clone(),
                ..Default::default()
            })
            .await;
        let page = expect_ok(r, &format!("ListSnapshots(snapshot_id={id:?})"));
        assert!(
            page.entries.is_empty() && page.next_token.is_empty(),
            "{id:?}: {page:?}"
        );
    }
    let mut volume_ids = impossible_ids();
    volume_ids.push(absent_snapshot_id());
    volume_ids.push(absent_volume_id());
    for id in volume_ids {
        let r = c
            .list_snapshots(csi::ListSnapshotsRequest {
                source_volume_id: id.clone(),
                ..Default::default()
            })
            .await;
        let page = expect_ok(r, &format!("ListSnapshots(source_volume_id={id:?})"));
        assert!(page.entries.is_empty(), "{id:?}: {page:?}");
    }
    // Both filters at once, neither known.
    let r = c
        .list_snapshots(csi::ListSnapshotsRequest {
            snapshot_id: absent_snapshot_id(),
            source_volume_id: absent_volume_id(),
            ..Default::default()
        })
        .await;
    assert!(expect_ok(r, "ListSnapshots(both filters)")
        .entries
        .is_empty());
}

/// GetSnapshot: a snapshot id no snapshot can have is NOT_FOUND;
/// DeleteSnapshot of it is OK (nothing to delete).
#[tokio::test]
async fn snapshot_rpcs_on_impossible_ids() {
    let d = Driver::start().await;
    let mut c = d.controller();
    for id in impossible_snapshot_ids() {
        let r = c
            .get_snapshot(csi::GetSnapshotRequest {
                snapshot_id: id.clone(),
                ..Default::default()
            })
            .await;
        expect_code(r, Code::NotFound, &format!("GetSnapshot({id:?})"));
        let r = c
            .delete_snapshot(csi::DeleteSnapshotRequest {
                snapshot_id: id.clone(),
                ..Default::default()
            })
            .await;
        expect_ok(r, &format!("DeleteSnapshot({id:?})"));
    }
}

/// CreateSnapshot from a source volume that does not exist (malformed id,
/// a snapshot id, or a well-formed absent id) is NOT_FOUND.
#[tokio::test]
async fn create_snapshot_from_unknown_source_is_not_found() {
    let d = Driver::start().await;
    let mut c = d.controller();
    let mut ids = impossible_ids();
    ids.push(absent_snapshot_id());
    ids.push(absent_volume_id());
    for (i, id) in ids.into_iter().enumerate() {
        let r = c
            .create_snapshot(csi::CreateSnapshotRequest {
                name: format!("snap-of-unknown-{i}"),
                source_volume_id: id.clone(),
                ..Default::default()
            })
            .await;
        expect_code(r, Code::NotFound, &format!("CreateSnapshot(source={id:?})"));
    }
}

/// CreateVolume from a snapshot or a volume that does not exist (malformed
/// id, an id of the other kind, or a well-formed absent id) is NOT_FOUND.
#[tokio::test]
async fn create_volume_from_unknown_source_is_not_found() {
    use csi::volume_content_source::{SnapshotSource, Type, VolumeSource};
    let d = Driver::start().await;
    let mut c = d.controller();
    let mut sources = Vec::new();
    for id in impossible_snapshot_ids()
        .into_iter()
        .chain([absent_snapshot_id()])
    {
        sources.push(Type::Snapshot(SnapshotSource { snapshot_id: id }));
    }
    for id in impossible_ids()
        .into_iter()
        .chain([absent_snapshot_id(), absent_volume_id()])
    {
        sources.push(Type::Volume(VolumeSource { volume_id: id }));
    }
    for (i, source) in sources.into_iter().enumerate() {
        let mut req = create_req(&format!("from-unknown-{i}"), THIN, ext4(), 64 * MIB, 0);
        req.volume_content_source = Some(csi::VolumeContentSource {
            r#type: Some(source.clone()),
        });
        let r = c.create_volume(req).await;
        expect_code(r, Code::NotFound, &format!("CreateVolume from {source:?}"));
    }
}

/// ValidateVolumeCapabilities, ControllerGetVolume and
/// ControllerExpandVolume of a well-formed id of a volume that does not
/// exist are NOT_FOUND, and so are they for a snapshot id; DeleteVolume of
/// either is OK.
#[tokio::test]
async fn controller_rpcs_on_absent_volumes() {
    let d = Driver::start().await;
    let mut c = d.controller();
    for id in [absent_volume_id(), absent_snapshot_id()] {
        let r = c
            .controller_get_volume(csi::ControllerGetVolumeRequest {
                volume_id: id.clone(),
            })
            .await;
        expect_code(r, Code::NotFound, &format!("ControllerGetVolume({id:?})"));
        let r = c
            .validate_volume_capabilities(csi::ValidateVolumeCapabilitiesRequest {
                volume_id: id.clone(),
                volume_capabilities: vec![ext4(), block_cap()],
                ..Default::default()
            })
            .await;
        expect_code(
            r,
            Code::NotFound,
            &format!("ValidateVolumeCapabilities({id:?})"),
        );
        // An unsupported (not malformed) capability does not hide NOT_FOUND.
        let r = c
            .validate_volume_capabilities(csi::ValidateVolumeCapabilitiesRequest {
                volume_id: id.clone(),
                volume_capabilities: vec![with_mode(
                    ext4(),
                    csi::volume_capability::access_mode::Mode::MultiNodeMultiWriter,
                )],
                ..Default::default()
            })
            .await;
        expect_code(
            r,
            Code::NotFound,
            &format!("ValidateVolumeCapabilities({id:?}, RWX)"),
        );
        let r = c
            .controller_expand_volume(csi::ControllerExpandVolumeRequest {
                volume_id: id.clone(),
                capacity_range: range(GIB, 0),
                ..Default::default()
            })
            .await;
        expect_code(
            r,
            Code::NotFound,
            &format!("ControllerExpandVolume({id:?})"),
        );
        let r = c
            .delete_volume(csi::DeleteVolumeRequest {
                volume_id: id.clone(),
                ..Default::default()
            })
            .await;
        expect_ok(r, &format!("DeleteVolume({id:?})"));
    }
}
