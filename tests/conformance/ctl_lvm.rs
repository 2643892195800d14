//! `lodestone ctl` on real volumes (guest only, with `LODESTONE_TEST_LVM=1`):
//! a thin volume's whole life driven by ctl alone, with the LVM gauges of
//! `/metrics` following each create and delete; and a thick volume moving
//! its volume group's free bytes.

use crate::common::*;
use crate::ctl::ctl;
use crate::metrics::{counter, sample, scrape, start_with_metrics};

const STAGING: &str = "staging";
const TARGET: &str = "target";

fn lvm_gauge(page: &str, name: &str, class: &str, vg: &str, pool: &str) -> f64 {
    sample(page, name, &[("class", class), ("vg", vg), ("pool", pool)])
        .unwrap_or_else(|| panic!("no {name} for class {class}: {page}"))
}

fn lvm_commands(page: &str) -> f64 {
    counter(
        page,
        "lodestone_commands_total",
        &[("program", "lvm"), ("outcome", "success")],
    )
}

/// create-volume, stage, publish, a file written through the mount,
/// stats, unpublish, unstage, create-snapshot, list-snapshots,
/// delete-snapshot, delete-volume, all through `lodestone ctl`; the thin
/// class's volume and snapshot gauges move with each create and delete.
#[tokio::test]
async fn ctl_drives_a_thin_volume_through_its_life() {
    if skip_without_lvm() {
        return;
    }
    let (d, addr) = start_with_metrics().await;
    let gauge = |page: &str, name: &str| lvm_gauge(page, name, THIN, THIN_VG, "pool0");
    let before = scrape(&addr);
    let volumes = gauge(&before, "lodestone_lvm_volumes");
    let snapshots = gauge(&before, "lodestone_lvm_snapshots");
    assert!(gauge(&before, "lodestone_lvm_thin_pool_size_bytes") > 0.0);
    assert!(
        sample(
            &before,
            "lodestone_lvm_vg_size_bytes",
            &[("class", THIN), ("vg", THIN_VG)]
        )
        .is_some(),
        "{before}"
    );

    let name = unique_name("ctl-thin");
    let created = ctl(
        &d,
        &[
            "-o",
            "json",
            "create-volume",
            &name,
            "--size",
            "64Mi",
            "--param",
            &format!("{DEVICE_CLASS_PARAM}={THIN}"),
            "--fs-type",
            "ext4",
        ],
    )
    .json();
    let id = created["volume"]["volume_id"]
        .as_str()
        .expect("volume_id")
        .to_string();
    d.track(&id);
    assert_eq!(created["volume"]["capacity_bytes"], 64 * MIB);
    assert_eq!(
        created["volume"]["accessible_topology"][0][TOPOLOGY_KEY],
        NODE_ID
    );
    let page = scrape(&addr);
    assert_eq!(gauge(&page, "lodestone_lvm_volumes"), volumes + 1.0);
    assert!(lvm_commands(&page) > lvm_commands(&before), "{page}");

    let shown = ctl(&d, &["get-volume", &id]);
    assert!(shown.ok().contains(&id), "{}", shown.stdout);
    let listed = ctl(&d, &["-o", "json", "list-volumes"]).json();
    assert!(
        listed["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["volume_id"] == id.as_str()),
        "{listed}"
    );

    std::fs::create_dir_all(d.path(STAGING)).unwrap();
    let staging = d.path_str(STAGING);
    let target = d.path_str(TARGET);
    ctl(&d, &["stage", &id, &staging, "--fs-type", "ext4"]).ok();
    assert!(is_mount_point(&d.path(STAGING)), "not staged");
    ctl(
        &d,
        &["publish", &id, &staging, &target, "--fs-type", "ext4"],
    )
    .ok();
    assert!(is_mount_point(&d.path(TARGET)), "not published");
    let file = d.path(TARGET).join("hello.txt");
    std::fs::write(&file, b"written through ctl\n").unwrap();
    assert_eq!(std::fs::read(&file).unwrap(), b"written through ctl\n");

    let stats = ctl(&d, &["-o", "json", "stats", &id, &target]).json();
    let bytes = stats["usage"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["unit"] == "BYTES")
        .cloned()
        .unwrap_or_else(|| panic!("no BYTES usage: {stats}"));
    assert!(bytes["total"].as_i64().unwrap() > 0, "{stats}");
    assert_eq!(stats["volume_condition"]["abnormal"], false, "{stats}");

    ctl(&d, &["unpublish", &id, &target]).ok();
    assert!(!is_mount_point(&d.path(TARGET)));
    ctl(&d, &["unstage", &id, &staging]).ok();
    assert!(!is_mount_point(&d.path(STAGING)));

    let snap_name = unique_name("ctl-snap");
    let snap = ctl(&d, &["-o", "json", "create-snapshot", &snap_name, &id]).json();
    let snap_id = snap["snapshot"]["snapshot_id"]
        .as_str()
        .expect("snapshot_id")
        .to_string();
    assert_eq!(snap["snapshot"]["source_volume_id"], id.as_str());
    assert_eq!(snap["snapshot"]["ready_to_use"], true);
    assert!(snap["snapshot"]["creation_time"].is_string(), "{snap}");
    let page = scrape(&addr);
    assert_eq!(gauge(&page, "lodestone_lvm_snapshots"), snapshots + 1.0);

    let listed = ctl(&d, &["-o", "json", "list-snapshots", "--source", &id]).json();
    let entries = listed["snapshots"].as_array().unwrap();
    assert_eq!(entries.len(), 1, "{listed}");
    assert_eq!(entries[0]["snapshot_id"], snap_id.as_str());
    let table = ctl(&d, &["list-snapshots", "--source", &id]);
    assert!(table.ok().starts_with("SNAPSHOT_ID"), "{}", table.stdout);

    // The snapshot's allocated blocks: ext4's metadata and the file, a
    // small part of the volume, in order.
    let blocks = ctl(&d, &["-o", "json", "blocks", &snap_id]).json();
    let total = blocks["bytes"].as_i64().unwrap();
    let capacity = blocks["volume_capacity_bytes"].as_i64().unwrap();
    let ranges = blocks["ranges"].as_array().unwrap();
    assert!(
        !ranges.is_empty() && total > 0 && total < capacity / 2,
        "{blocks}"
    );
    let text = ctl(&d, &["blocks", &snap_id]);
    assert!(text.ok().starts_with("OFFSET"), "{}", text.stdout);
    let delta = ctl(&d, &["-o", "json", "blocks", &snap_id, "--base", &snap_id]).json();
    assert_eq!(delta["bytes"], 0, "{delta}");

    ctl(&d, &["delete-snapshot", &snap_id]).ok();
    let page = scrape(&addr);
    assert_eq!(gauge(&page, "lodestone_lvm_snapshots"), snapshots);

    ctl(&d, &["delete-volume", &id]).ok();
    let page = scrape(&addr);
    assert_eq!(gauge(&page, "lodestone_lvm_volumes"), volumes);
    let gone = ctl(&d, &["get-volume", &id]);
    assert_eq!(gone.code, 1, "{}", gone.stdout);
    assert!(gone.stderr.contains("NOT_FOUND"), "{}", gone.stderr);

    let calls = |method: &str| {
        counter(
            &page,
            "lodestone_csi_requests_total",
            &[("method", method), ("code", "OK")],
        )
    };
    for method in [
        "CreateVolume",
        "NodeStageVolume",
        "NodePublishVolume",
        "NodeUnpublishVolume",
        "NodeUnstageVolume",
        "CreateSnapshot",
        "DeleteSnapshot",
        "DeleteVolume",
    ] {
        assert_eq!(calls(method), 1.0, "{method}: {page}");
    }
}

/// A thick volume takes its size from the volume group's free bytes and
/// gives it back when deleted; `capacity` reports the class's room.
#[tokio::test]
async fn ctl_thick_volume_moves_vg_free() {
    if skip_without_lvm() {
        return;
    }
    let (d, addr) = start_with_metrics().await;
    let free = |page: &str| {
        sample(
            page,
            "lodestone_lvm_vg_free_bytes",
            &[("class", THICK), ("vg", THICK_VG)],
        )
        .unwrap_or_else(|| panic!("no vg_free for {THICK}: {page}"))
    };
    let first = scrape(&addr);
    let before = free(&first);
    let volumes = lvm_gauge(&first, "lodestone_lvm_volumes", THICK, THICK_VG, "");
    let capacity = ctl(
        &d,
        &[
            "-o",
            "json",
            "capacity",
            "--param",
            &format!("{DEVICE_CLASS_PARAM}={THICK}"),
        ],
    )
    .json();
    assert_eq!(
        capacity["available_capacity"].as_f64(),
        Some(before),
        "{capacity}"
    );

    let created = ctl(
        &d,
        &[
            "-o",
            "json",
            "create-volume",
            &unique_name("ctl-thick"),
            "--size",
            "32Mi",
            "--param",
            &format!("{DEVICE_CLASS_PARAM}={THICK}"),
            "--block",
        ],
    )
    .json();
    let id = created["volume"]["volume_id"].as_str().unwrap().to_string();
    d.track(&id);
    let page = scrape(&addr);
    assert_eq!(free(&page), before - (32 * MIB) as f64, "{page}");
    assert_eq!(
        lvm_gauge(&page, "lodestone_lvm_volumes", THICK, THICK_VG, ""),
        volumes + 1.0
    );
    ctl(&d, &["delete-volume", &id]).ok();
    let page = scrape(&addr);
    assert_eq!(free(&page), before);
    assert_eq!(
        lvm_gauge(&page, "lodestone_lvm_volumes", THICK, THICK_VG, ""),
        volumes
    );
}
