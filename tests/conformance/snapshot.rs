//! Snapshot RPCs that need no volume group: capabilities, argument
//! validation and error paths of CreateSnapshot, DeleteSnapshot,
//! ListSnapshots and GetSnapshot. These run on the host (and in the guest,
//! where they behave the same way).

use lodestone::csi;
use lodestone::csi::controller_service_capability::rpc::Type as Rpc;
use tonic::Code;

use crate::common::*;

/// A well-formed volume id of this node for a volume that does not exist.
fn absent_volume_id() -> String {
    format!("lvm1:{NODE_ID}:{THIN}:{}", uuid::Uuid::new_v4().simple())
}

/// A well-formed snapshot id of this node for a snapshot that does not exist.
fn absent_snapshot_id() -> String {
    format!("lvs1:{NODE_ID}:{THIN}:{}", uuid::Uuid::new_v4().simple())
}

fn snapshot_req(name: &str, source: &str) -> csi::CreateSnapshotRequest {
    csi::CreateSnapshotRequest {
        name: name.to_string(),
        source_volume_id: source.to_string(),
        ..Default::default()
    }
}

/// ControllerGetCapabilities: Lodestone snapshots volumes
/// (CREATE_DELETE_SNAPSHOT), lists snapshots (LIST_SNAPSHOTS) and clones
/// volumes (CLONE_VOLUME).
#[tokio::test]
async fn snapshot_capabilities_are_advertised() {
    let d = Driver::start().await;
    let rpcs = crate::controller::controller_rpcs(&d).await;
    for want in [
        Rpc::CreateDeleteSnapshot,
        Rpc::ListSnapshots,
        Rpc::CloneVolume,
    ] {
        assert!(rpcs.contains(&want), "missing {want:?} in {rpcs:?}");
    }
}

/// CreateSnapshot: `name` and `source_volume_id` are REQUIRED
/// (INVALID_ARGUMENT without them); a source volume that does not exist is
/// NOT_FOUND.
#[tokio::test]
async fn create_snapshot_validation() {
    let d = Driver::start().await;
    let mut c = d.controller();
    let r = c
        .create_snapshot(snapshot_req("", &absent_volume_id()))
        .await;
    expect_code(r, Code::InvalidArgument, "CreateSnapshot without name");
    let r = c.create_snapshot(snapshot_req("snap-1", "")).await;
    expect_code(
        r,
        Code::InvalidArgument,
        "CreateSnapshot without source_volume_id",
    );
    let r = c.create_snapshot(snapshot_req("", "")).await;
    expect_code(r, Code::InvalidArgument, "CreateSnapshot without anything");
    let r = c
        .create_snapshot(snapshot_req(&"n".repeat(129), &absent_volume_id()))
        .await;
    expect_code(
        r,
        Code::InvalidArgument,
        "CreateSnapshot with a 129-byte name",
    );
    let mut req = snapshot_req("snap-params", &absent_volume_id());
    req.parameters = params(&[("noSuchKey", "1")]);
    let r = c.create_snapshot(req).await;
    expect_code(
        r,
        Code::InvalidArgument,
        "CreateSnapshot with unknown parameter",
    );

    let id = absent_volume_id();
    let r = c.create_snapshot(snapshot_req("snap-absent", &id)).await;
    expect_code(r, Code::NotFound, &format!("CreateSnapshot of absent {id}"));
    let r = c
        .create_snapshot(snapshot_req("snap-garbage", "no-such-volume"))
        .await;
    expect_code(r, Code::NotFound, "CreateSnapshot of a malformed volume id");
}

/// DeleteSnapshot: `snapshot_id` is REQUIRED; a snapshot that does not
/// exist, or an id the plugin could never have issued, is OK (idempotent).
#[tokio::test]
async fn delete_snapshot_validation() {
    let d = Driver::start().await;
    let mut c = d.controller();
    let r = c
        .delete_snapshot(csi::DeleteSnapshotRequest::default())
        .await;
    expect_code(r, Code::InvalidArgument, "DeleteSnapshot without id");
    for id in [
        absent_snapshot_id(),
        "no-such-snapshot".to_string(),
        "lvs1:::".to_string(),
        absent_volume_id(),
        format!(
            "lvs1:{NODE_ID}:nosuchclass:{}",
            uuid::Uuid::new_v4().simple()
        ),
        "../../etc/passwd".to_string(),
        "$(id)".to_string(),
    ] {
        let r = c
            .delete_snapshot(csi::DeleteSnapshotRequest {
                snapshot_id: id.clone(),
                ..Default::default()
            })
            .await;
        expect_ok(r, &format!("DeleteSnapshot({id:?})"));
    }
}

/// ListSnapshots: a `starting_token` the plugin did not hand out is
/// ABORTED, a negative `max_entries` INVALID_ARGUMENT; filtering by a
/// snapshot id or source volume that does not exist gives an empty list.
#[tokio::test]
async fn list_snapshots_validation() {
    let d = Driver::start().await;
    let mut c = d.controller();
    for token in ["bogus", "-1", "lvs1:x:y:z", "\u{0}"] {
        let r = c
            .list_snapshots(csi::ListSnapshotsRequest {
                max_entries: 1,
                starting_token: token.to_string(),
                ..Default::default()
            })
            .await;
        expect_code(
            r,
            Code::Aborted,
            &format!("ListSnapshots(starting_token={token:?})"),
        );
    }
    let r = c
        .list_snapshots(csi::ListSnapshotsRequest {
            max_entries: -1,
            ..Default::default()
        })
        .await;
    expect_code(r, Code::InvalidArgument, "ListSnapshots(max_entries=-1)");

    for id in [absent_snapshot_id(), "no-such-snapshot".to_string()] {
        let r = c
            .list_snapshots(csi::ListSnapshotsRequest {
                snapshot_id: id.clone(),
                ..Default::default()
            })
            .await;
        let page = expect_ok(r, &format!("ListSnapshots(snapshot_id={id:?})"));
        assert!(
            page.entries.is_empty() && page.next_token.is_empty(),
            "ListSnapshots(snapshot_id={id:?}): {page:?}"
        );
    }
    let id = absent_volume_id();
    let r = c
        .list_snapshots(csi::ListSnapshotsRequest {
            source_volume_id: id.clone(),
            ..Default::default()
        })
        .await;
    let page = expect_ok(r, &format!("ListSnapshots(source_volume_id={id:?})"));
    assert!(
        page.entries.is_empty(),
        "ListSnapshots(source_volume_id={id:?}): {page:?}"
    );
}

/// GetSnapshot: `snapshot_id` is REQUIRED; a snapshot that does not exist is
/// NOT_FOUND.
#[tokio::test]
async fn get_snapshot_validation() {
    let d = Driver::start().await;
    let mut c = d.controller();
    let r = c.get_snapshot(csi::GetSnapshotRequest::default()).await;
    expect_code(r, Code::InvalidArgument, "GetSnapshot without id");
    for id in [absent_snapshot_id(), "no-such-snapshot".to_string()] {
        let r = c
            .get_snapshot(csi::GetSnapshotRequest {
                snapshot_id: id.clone(),
                ..Default::default()
            })
            .await;
        expect_code(r, Code::NotFound, &format!("GetSnapshot({id:?})"));
    }
}
