//! Controller service against real volume groups (guest only, with
//! `LODESTONE_TEST_LVM=1`): provisioning, sizes, idempotency, listing,
//! capacity, ControllerGetVolume and ValidateVolumeCapabilities.

use std::collections::BTreeSet;

use lodestone::csi;
use lodestone::csi::controller_service_capability::rpc::Type as Rpc;
use lodestone::csi::volume_capability::access_mode::Mode;
use tonic::Code;

use crate::common::*;
use crate::controller::controller_rpcs;

const CLASSES: [&str; 2] = [THIN, THICK];

fn vg_of(class: &str) -> &'static str {
    if class == THIN {
        THIN_VG
    } else {
        THICK_VG
    }
}

/// The LVs of ours whose size LVM reports, by name.
fn lv_sizes() -> Vec<(String, String, u64)> {
    lodestone_lvs()
        .into_iter()
        .map(|lv| (lv.vg, lv.name, lv.size_bytes))
        .collect()
}

#[track_caller]
fn assert_sane_volume(v: &csi::Volume, node: &str, what: &str) {
    assert!(!v.volume_id.is_empty(), "{what}: empty volume_id");
    assert!(
        v.volume_id.len() <= 128,
        "{what}: volume_id over 128 bytes: {}",
        v.volume_id
    );
    assert!(
        v.capacity_bytes > 0,
        "{what}: capacity {}",
        v.capacity_bytes
    );
    assert_eq!(
        volume_nodes(v),
        vec![node.to_string()],
        "{what}: accessible_topology must name exactly this node: {:?}",
        v.accessible_topology
    );
}

/// CreateVolume: the volume is at least `required_bytes` (LVM rounds up to
/// whole 4 MiB extents, never more than one extent over), is reachable from
/// this node only (accessible_topology), ignores the sidecars'
/// `csi.storage.k8s.io/` parameters, and without a capacity range gets the
/// class's default size (1 GiB). DeleteVolume removes the LV and is
/// idempotent; afterwards the id is NOT_FOUND for every RPC that needs the
/// volume.
#[tokio::test]
async fn create_rounds_up_defaults_and_deletes() {
    if skip_without_lvm() {
        return;
    }
    let d = Driver::start().await;
    for class in CLASSES {
        let mut req = create_req(&unique_name("round"), class, ext4(), 20 * MIB + 1, 0);
        req.parameters
            .insert("csi.storage.k8s.io/pvc/name".into(), "data-0".into());
        req.parameters
            .insert("csi.storage.k8s.io/pvc/namespace".into(), "default".into());
        req.parameters
            .insert("csi.storage.k8s.io/pv/name".into(), "pvc-1234".into());
        let small = d.create_ok(req).await;
        assert_sane_volume(&small, NODE_ID, class);
        assert_eq!(
            small.capacity_bytes,
            24 * MIB,
            "{class}: 20 MiB + 1 rounds up to 24 MiB"
        );

        let dflt = d
            .create(&unique_name("default"), class, block_cap(), 0, 0)
            .await;
        assert_sane_volume(&dflt, NODE_ID, class);
        assert_eq!(dflt.capacity_bytes, GIB, "{class}: default size");

        let lvs = lv_sizes();
        let in_vg: Vec<_> = lvs.iter().filter(|(vg, _, _)| vg == vg_of(class)).collect();
        for size in [24 * MIB as u64, GIB as u64] {
            assert!(
                in_vg.iter().any(|(_, _, s)| *s == size),
                "{class}: no LV of {size} bytes in {}: {lvs:?}",
                vg_of(class)
            );
        }

        for v in [&small, &dflt] {
            d.delete(&v.volume_id).await;
            d.delete(&v.volume_id).await; // idempotent
        }
        assert_eq!(
            lodestone_lvs()
                .iter()
                .filter(|lv| lv.vg == vg_of(class))
                .count(),
            in_vg.len() - 2,
            "{class}: DeleteVolume did not remove both LVs"
        );

        // The deleted (well-formed) id is now unknown.
        let gone = small.volume_id;
        let mut c = d.controller();
        let r = c
            .controller_get_volume(csi::ControllerGetVolumeRequest {
                volume_id: gone.clone(),
            })
            .await;
        expect_code(r, Code::NotFound, "ControllerGetVolume(deleted)");
        let r = c
            .validate_volume_capabilities(csi::ValidateVolumeCapabilitiesRequest {
                volume_id: gone.clone(),
                volume_capabilities: vec![ext4()],
                ..Default::default()
            })
            .await;
        expect_code(r, Code::NotFound, "ValidateVolumeCapabilities(deleted)");
        let r = c
            .controller_expand_volume(csi::ControllerExpandVolumeRequest {
                volume_id: gone.clone(),
                capacity_range: range(64 * MIB, 0),
                volume_capability: Some(ext4()),
                ..Default::default()
            })
            .await;
        expect_code(r, Code::NotFound, "ControllerExpandVolume(deleted)");
        std::fs::create_dir_all(d.path("staging-gone")).unwrap();
        let r = d
            .node()
            .node_stage_volume(d.stage_req(&gone, "staging-gone", ext4()))
            .await;
        expect_code(r, Code::NotFound, "NodeStageVolume(deleted)");
    }
}

/// Capacity ranges MUST be honoured: if rounding up to whole extents, or to
/// the filesystem's minimum size (xfs needs about 300 MiB), would exceed
/// `limit_bytes`, the range cannot be satisfied (OUT_OF_RANGE); if it fits,
/// the volume lies within [required, limit]. A limit alone bounds the size
/// (the default size does not override it). A request far larger than the
/// storage fails without creating anything.
#[tokio::test]
async fn create_honours_capacity_ranges() {
    if skip_without_lvm() {
        return;
    }
    let d = Driver::start().await;
    let before = lodestone_lvs().len();
    for class in CLASSES {
        let r = d
            .controller()
            .create_volume(create_req(&unique_name("r"), class, ext4(), MIB, 2 * MIB))
            .await;
        expect_code(r, Code::OutOfRange, &format!("{class}: [1 MiB, 2 MiB]"));

        let v = d
            .create(&unique_name("exact"), class, block_cap(), 8 * MIB, 8 * MIB)
            .await;
        assert_eq!(v.capacity_bytes, 8 * MIB, "{class}: [8 MiB, 8 MiB]");
        d.delete(&v.volume_id).await;

        let v = d
            .create(&unique_name("limit"), class, block_cap(), 0, 20 * MIB)
            .await;
        assert!(
            v.capacity_bytes > 0 && v.capacity_bytes <= 20 * MIB,
            "{class}: only limit 20 MiB, got {}",
            v.capacity_bytes
        );
        d.delete(&v.volume_id).await;

        let v = d
            .create(&unique_name("xfs-lim"), class, xfs(), 100 * MIB, 512 * MIB)
            .await;
        assert!(
            (300 * MIB..=512 * MIB).contains(&v.capacity_bytes),
            "{class}: xfs [100 MiB, 512 MiB] gave {}",
            v.capacity_bytes
        );
        d.delete(&v.volume_id).await;

        let r = d
            .controller()
            .create_volume(create_req(
                &unique_name("xfs-small"),
                class,
                xfs(),
                100 * MIB,
                200 * MIB,
            ))
            .await;
        expect_code(
            r,
            Code::OutOfRange,
            &format!("{class}: xfs limited to 200 MiB"),
        );

        let r = d
            .controller()
            .create_volume(create_req(&unique_name("huge"), class, ext4(), 1 << 50, 0))
            .await;
        expect_one_of(
            r,
            &[Code::OutOfRange, Code::ResourceExhausted],
            &format!("{class}: 1 PiB volume"),
        );
    }
    assert_eq!(
        lodestone_lvs().len(),
        before,
        "failed or deleted creates left LVs behind"
    );
}

/// CreateVolume is idempotent: the same name with compatible arguments
/// returns the same volume (a capacity range that the existing volume
/// satisfies counts as compatible); the same name with an incompatible
/// capacity or another device class is ALREADY_EXISTS — and never a second
/// LV.
#[tokio::test]
async fn create_is_idempotent_by_name() {
    if skip_without_lvm() {
        return;
    }
    let d = Driver::start().await;
    for (class, other) in [(THIN, THICK), (THICK, THIN)] {
        let name = unique_name("idem");
        let first = d.create(&name, class, ext4(), 8 * MIB, 0).await;
        let count = lodestone_lvs().len();
        let again = d.create(&name, class, ext4(), 8 * MIB, 0).await;
        assert_eq!(
            again.volume_id, first.volume_id,
            "{class}: same name, same id"
        );
        assert_eq!(again.capacity_bytes, first.capacity_bytes);
        let compatible = d.create(&name, class, ext4(), 4 * MIB, 16 * MIB).await;
        assert_eq!(
            compatible.volume_id, first.volume_id,
            "{class}: compatible range"
        );

        let r = d
            .controller()
            .create_volume(create_req(&name, class, ext4(), 64 * MIB, 0))
            .await;
        expect_code(
            r,
            Code::AlreadyExists,
            &format!("{class}: same name, 64 MiB"),
        );
        let r = d
            .controller()
            .create_volume(create_req(&name, class, ext4(), MIB, 4 * MIB))
            .await;
        expect_code(
            r,
            Code::AlreadyExists,
            &format!("{class}: same name, at most 4 MiB"),
        );
        let r = d
            .controller()
            .create_volume(create_req(&name, other, ext4(), 8 * MIB, 0))
            .await;
        expect_code(
            r,
            Code::AlreadyExists,
            &format!("{class}: same name in {other}"),
        );
        assert_eq!(lodestone_lvs().len(), count, "{class}: retries created LVs");

        d.delete(&first.volume_id).await;
    }
}

/// accessibility_requirements: a volume MUST be accessible from at least one
/// requisite topology; if none of them is this node the volume cannot be
/// provisioned there (RESOURCE_EXHAUSTED). Listing this node among others is
/// fine and the reply names this node.
#[tokio::test]
async fn create_respects_accessibility_requirements() {
    if skip_without_lvm() {
        return;
    }
    let d = Driver::start().await;
    let mut req = create_req(&unique_name("topo-else"), THIN, ext4(), 8 * MIB, 0);
    req.accessibility_requirements = Some(csi::TopologyRequirement {
        requisite: vec![node_topology("elsewhere")],
        preferred: vec![node_topology("elsewhere")],
    });
    let r = d.controller().create_volume(req).await;
    expect_code(r, Code::ResourceExhausted, "requisite: another node only");

    let mut req = create_req(&unique_name("topo-here"), THICK, ext4(), 8 * MIB, 0);
    req.accessibility_requirements = Some(csi::TopologyRequirement {
        requisite: vec![node_topology("elsewhere"), node_topology(NODE_ID)],
        preferred: vec![node_topology("elsewhere"), node_topology(NODE_ID)],
    });
    let v = d.create_ok(req).await;
    assert_sane_volume(&v, NODE_ID, "requisite includes this node");
    d.delete(&v.volume_id).await;
}

/// ListVolumes: with `max_entries` the plugin returns at most that many
/// entries and a `next_token` to continue; following the tokens yields every
/// volume exactly once (the same set as an unpaged listing). A token stays
/// usable after the last volume of its page is deleted.
#[tokio::test]
async fn list_volumes_paginates() {
    if skip_without_lvm() {
        return;
    }
    let d = Driver::start().await;
    let mut ours = Vec::new();
    for (i, class) in [THIN, THICK, THIN].into_iter().enumerate() {
        let v = d
            .create(
                &unique_name(&format!("list{i}")),
                class,
                block_cap(),
                4 * MIB,
                0,
            )
            .await;
        ours.push(v.volume_id);
    }

    let all = d.list_all(0).await;
    let all_ids: Vec<String> = all.iter().map(|v| v.volume_id.clone()).collect();
    let unique: BTreeSet<&String> = all_ids.iter().collect();
    assert_eq!(
        unique.len(),
        all_ids.len(),
        "duplicates in ListVolumes: {all_ids:?}"
    );
    for id in &ours {
        assert!(
            all_ids.contains(id),
            "{id} missing from ListVolumes: {all_ids:?}"
        );
    }
    for v in &all {
        assert!(v.capacity_bytes > 0, "{v:?}");
        if ours.contains(&v.volume_id) {
            assert_sane_volume(v, NODE_ID, "listed volume");
        }
    }

    for max in [1, 2] {
        let paged: Vec<String> = d
            .list_all(max)
            .await
            .into_iter()
            .map(|v| v.volume_id)
            .collect();
        assert_eq!(paged, all_ids, "paging by {max} differs from one listing");
    }

    // A page that ends with one of ours; delete it, then continue.
    let k = all_ids
        .iter()
        .position(|id| ours.contains(id))
        .expect("ours are listed");
    let page = expect_ok(
        d.controller()
            .list_volumes(csi::ListVolumesRequest {
                max_entries: (k + 1) as i32,
                starting_token: String::new(),
            })
            .await,
        "first page",
    );
    let last = page
        .entries
        .last()
        .and_then(|e| e.volume.as_ref())
        .expect("entries");
    assert_eq!(last.volume_id, all_ids[k]);
    if k + 1 < all_ids.len() {
        assert!(
            !page.next_token.is_empty(),
            "more volumes follow but next_token is empty"
        );
    }
    d.delete(&all_ids[k]).await;
    if !page.next_token.is_empty() {
        let r = d
            .controller()
            .list_volumes(csi::ListVolumesRequest {
                max_entries: 0,
                starting_token: page.next_token.clone(),
            })
            .await;
        let rest = expect_ok(r, "ListVolumes after deleting the page's last volume");
        let rest_ids: Vec<String> = rest
            .entries
            .iter()
            .filter_map(|e| e.volume.as_ref())
            .map(|v| v.volume_id.clone())
            .collect();
        assert_eq!(
            rest_ids,
            all_ids[k + 1..].to_vec(),
            "the rest of the listing changed"
        );
    }
    for id in ours.iter().filter(|id| **id != all_ids[k]) {
        d.delete(id).await;
    }
}

/// GetCapacity reports what can still be provisioned: creating a thick
/// volume lowers the thick class's available capacity by at least its size,
/// and deleting it gives the space back. Without a topology the answer is
/// this node's.
#[tokio::test]
async fn get_capacity_tracks_allocations() {
    if skip_without_lvm() {
        return;
    }
    let d = Driver::start().await;
    let thin = d.capacity(THIN).await;
    assert!(thin > 0, "thin capacity {thin}");
    let before = d.capacity(THICK).await;
    assert!(
        before >= 256 * MIB,
        "thick capacity {before} on a ~1.5 GiB VG"
    );
    let r = d
        .controller()
        .get_capacity(csi::GetCapacityRequest {
            parameters: class_params(THICK),
            ..Default::default()
        })
        .await;
    assert_eq!(
        expect_ok(r, "GetCapacity(thick, no topology)").available_capacity,
        before
    );

    let v = d
        .create(&unique_name("cap"), THICK, ext4(), 64 * MIB, 0)
        .await;
    let during = d.capacity(THICK).await;
    assert!(
        during <= before - 64 * MIB,
        "thick capacity went from {before} to {during} after a 64 MiB volume"
    );
    d.delete(&v.volume_id).await;
    let after = d.capacity(THICK).await;
    assert_eq!(after, before, "capacity not given back after DeleteVolume");
}

/// ControllerGetVolume returns the volume (id, capacity, topology) and its
/// status; with the VOLUME_CONDITION capability the condition is set.
/// ValidateVolumeCapabilities confirms capabilities the volume supports
/// (every filesystem, raw block, read-only use) and does not confirm
/// multi-node access, which is an answer (OK, no `confirmed`), not an error.
#[tokio::test]
async fn get_volume_and_validate_capabilities() {
    if skip_without_lvm() {
        return;
    }
    let d = Driver::start().await;
    let rpcs = controller_rpcs(&d).await;
    for class in CLASSES {
        let v = d
            .create(&unique_name("get"), class, ext4(), 8 * MIB, 0)
            .await;
        let mut c = d.controller();
        let got = expect_ok(
            c.controller_get_volume(csi::ControllerGetVolumeRequest {
                volume_id: v.volume_id.clone(),
            })
            .await,
            "ControllerGetVolume",
        );
        let gv = got.volume.expect("volume");
        assert_eq!(gv.volume_id, v.volume_id);
        assert_eq!(gv.capacity_bytes, v.capacity_bytes);
        assert_sane_volume(&gv, NODE_ID, "ControllerGetVolume");
        let status = got.status.expect("status is REQUIRED");
        if rpcs.contains(&Rpc::VolumeCondition) {
            let cond = status
                .volume_condition
                .expect("volume_condition with VOLUME_CONDITION");
            assert!(
                !cond.abnormal,
                "fresh volume reported abnormal: {}",
                cond.message
            );
        }

        for cap in [
            ext4(),
            xfs(),
            btrfs(),
            block_cap(),
            with_mode(ext4(), Mode::SingleNodeReaderOnly),
            with_mode(block_cap(), Mode::SingleNodeSingleWriter),
        ] {
            let r = c
                .validate_volume_capabilities(csi::ValidateVolumeCapabilitiesRequest {
                    volume_id: v.volume_id.clone(),
                    volume_capabilities: vec![cap.clone()],
                    volume_context: v.volume_context.clone(),
                    parameters: class_params(class),
                    ..Default::default()
                })
                .await;
            let reply = expect_ok(r, &format!("ValidateVolumeCapabilities({cap:?})"));
            let confirmed = reply
                .confirmed
                .unwrap_or_else(|| panic!("{cap:?} not confirmed: {}", reply.message));
            assert_eq!(confirmed.volume_capabilities, vec![cap]);
        }
        let r = c
            .validate_volume_capabilities(csi::ValidateVolumeCapabilitiesRequest {
                volume_id: v.volume_id.clone(),
                volume_capabilities: vec![with_mode(ext4(), Mode::MultiNodeMultiWriter)],
                ..Default::default()
            })
            .await;
        let reply = expect_ok(r, "ValidateVolumeCapabilities(MULTI_NODE_MULTI_WRITER)");
        assert!(
            reply.confirmed.is_none(),
            "multi-node access confirmed: {reply:?}"
        );
        d.delete(&v.volume_id).await;
    }
}

/// Concurrent CreateVolume calls with the same name (a CO that lost track
/// of an in-flight call) end with one volume: both succeed with the same id,
/// or one is told to retry (ABORTED) or that the name is taken
/// (ALREADY_EXISTS, when the other call used another class). Never two LVs.
#[tokio::test]
async fn concurrent_creates_with_one_name_make_one_volume() {
    if skip_without_lvm() {
        return;
    }
    let d = Driver::start().await;
    for (class_a, class_b) in [(THIN, THIN), (THICK, THIN)] {
        let before = lodestone_lvs().len();
        let name = unique_name("race");
        let (mut c1, mut c2) = (d.controller(), d.controller());
        let (r1, r2) = tokio::join!(
            c1.create_volume(create_req(&name, class_a, ext4(), 8 * MIB, 0)),
            c2.create_volume(create_req(&name, class_b, ext4(), 8 * MIB, 0)),
        );
        let what = format!("{class_a}+{class_b}");
        let ids: Vec<String> = [&r1, &r2]
            .iter()
            .filter_map(|r| r.as_ref().ok())
            .map(|resp| {
                resp.get_ref()
                    .volume
                    .as_ref()
                    .expect("volume")
                    .volume_id
                    .clone()
            })
            .collect();
        for r in [&r1, &r2] {
            if let Err(s) = r {
                let allowed: &[Code] = if class_a == class_b {
                    &[Code::Aborted]
                } else {
                    &[Code::Aborted, Code::AlreadyExists]
                };
                assert!(
                    allowed.contains(&s.code()),
                    "{what}: {:?}: {}",
                    s.code(),
                    s.message()
                );
            }
        }
        if ids.len() == 2 {
            assert_eq!(ids[0], ids[1], "{what}: two volumes for one name");
        }
        let after = lodestone_lvs().len();
        assert!(
            after <= before + 1,
            "{what}: {} LVs for one name",
            after - before
        );
        // Settle: a retry in the winner's class returns the one volume (or,
        // after a double ABORTED, creates it).
        let winner = if r1.is_ok() || r2.is_err() {
            class_a
        } else {
            class_b
        };
        let v = d.create(&name, winner, ext4(), 8 * MIB, 0).await;
        if let Some(id) = ids.first() {
            assert_eq!(&v.volume_id, id, "{what}: retry returned another volume");
        }
        assert_eq!(
            lodestone_lvs().len(),
            before + 1,
            "{what}: LV count after settling"
        );
        d.delete(&v.volume_id).await;
    }
}
