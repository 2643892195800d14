//! The RBD driver's controller (`--driver rbd --mode controller`) against a
//! real single-node Ceph cluster: the CSI calls through the real binary,
//! checked against what Ceph then holds.
//!
//! ```text
//! tests/ceph/cluster.sh start && eval "$(tests/ceph/cluster.sh env)"
//! LODESTONE_TEST_RBD=1 cargo test --features rbd --test rbd -- --test-threads=1
//! ```
//!
//! Without `LODESTONE_TEST_RBD=1` (and the cluster's environment) every test
//! says "skipped" and passes.
#![cfg(feature = "rbd")]

#[path = "common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::io::Seek;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use lodestone::client::{block_pages, BlockQuery};
use lodestone::csi;
use lodestone::csi::volume_content_source::{SnapshotSource, Type as SourceType, VolumeSource};
use tonic::Code;

struct Ceph {
    conf: PathBuf,
    monitors: String,
    pool: String,
    user: String,
    key: String,
    admin_keyring: PathBuf,
}

fn ceph() -> Option<Ceph> {
    if std::env::var("LODESTONE_TEST_RBD").as_deref() != Ok("1") {
        eprintln!("skipped: needs LODESTONE_TEST_RBD=1 and a cluster (tests/ceph/cluster.sh)");
        return None;
    }
    let var = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("{k} is not set"));
    let keyring = std::fs::read_to_string(var("LODESTONE_CEPH_KEYRING")).expect("keyring");
    let key = keyring
        .lines()
        .map(str::trim)
        .find_map(|l| {
            l.strip_prefix("key")
                .map(|v| v.trim_start_matches([' ', '=']).trim())
        })
        .expect("key line")
        .to_string();
    Some(Ceph {
        conf: var("CEPH_CONF").into(),
        monitors: var("LODESTONE_CEPH_MON_HOST"),
        pool: var("LODESTONE_CEPH_POOL"),
        user: var("LODESTONE_CEPH_USER"),
        key,
        admin_keyring: var("LODESTONE_CEPH_ADMIN_KEYRING").into(),
    })
}

const CLUSTER: &str = "test-ceph";

impl Ceph {
    /// The driver's config and secret dir in `dir`.
    fn write_config(&self, dir: &Path, pools: &[&str]) -> (PathBuf, PathBuf) {
        let config = dir.join("rbd-config.json");
        let json = serde_json::json!([{
            "clusterID": CLUSTER,
            "monitors": [self.monitors],
            "pools": pools,
        }]);
        std::fs::write(&config, json.to_string()).unwrap();
        let secrets = dir.join("rbd-secrets");
        std::fs::create_dir_all(&secrets).unwrap();
        std::fs::write(secrets.join("userID"), &self.user).unwrap();
        std::fs::write(secrets.join("userKey"), &self.key).unwrap();
        (config, secrets)
    }

    async fn driver(&self, extra: &[&str]) -> Driver {
        self.driver_for_pools(&[&self.pool], extra).await
    }

    async fn driver_for_pools(&self, pools: &[&str], extra: &[&str]) -> Driver {
        let dir = new_temp_dir();
        let (config, secrets) = self.write_config(dir.path(), pools);
        Driver::builder()
            .mode("controller")
            .class_args(Vec::<String>::new())
            .args(["--driver", "rbd"])
            .args(["--rbd-config", config.to_str().unwrap()])
            .args(["--rbd-secret-dir", secrets.to_str().unwrap()])
            .args(extra.iter().copied())
            .start_in(dir)
            .await
    }

    fn secrets(&self) -> HashMap<String, String> {
        [
            ("userID".to_string(), self.user.clone()),
            ("userKey".to_string(), self.key.clone()),
        ]
        .into()
    }

    fn params(&self) -> HashMap<String, String> {
        params(&[("clusterID", CLUSTER), ("pool", &self.pool)])
    }

    fn create_req(&self, name: &str, size: i64) -> csi::CreateVolumeRequest {
        csi::CreateVolumeRequest {
            name: name.to_string(),
            capacity_range: range(size, 0),
            volume_capabilities: vec![mount_cap("ext4")],
            parameters: self.params(),
            secrets: self.secrets(),
            ..Default::default()
        }
    }

    /// A restore or clone request: no size (the source's), from `source`.
    fn copy_req(
        &self,
        name: &str,
        source: Option<csi::VolumeContentSource>,
    ) -> csi::CreateVolumeRequest {
        let mut r = self.create_req(name, 0);
        r.capacity_range = None;
        r.volume_content_source = source;
        r
    }

    /// `rbd <args>` as the admin (test-side inspection only).
    fn rbd(&self, args: &[&str]) -> String {
        String::from_utf8(self.admin("rbd", args)).expect("utf-8")
    }

    /// `<program> <args>` (rbd, ceph) as the admin: test-side set-up and
    /// inspection only; stdout.
    fn admin(&self, program: &str, args: &[&str]) -> Vec<u8> {
        let out = Command::new(program)
            .env("CEPH_CONF", &self.conf)
            .arg("--id")
            .arg("admin")
            .arg("--keyring")
            .arg(&self.admin_keyring)
            .args(args)
            .output()
            .expect("run an admin command");
        assert!(
            out.status.success(),
            "{program} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    fn images(&self) -> Vec<String> {
        self.images_in(&self.pool)
    }

    fn images_in(&self, pool: &str) -> Vec<String> {
        let v: serde_json::Value =
            serde_json::from_str(&self.rbd(&["ls", "--format", "json", pool])).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect()
    }

    fn trash(&self) -> Vec<String> {
        let v: serde_json::Value =
            serde_json::from_str(&self.rbd(&["trash", "ls", "--format", "json", &self.pool]))
                .unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|e| e["name"].as_str().unwrap_or_default().to_string())
            .collect()
    }

    /// The image's parent image name, if it is a clone.
    fn parent(&self, image: &str) -> Option<String> {
        self.parent_in(&self.pool, image)
    }

    fn parent_in(&self, pool: &str, image: &str) -> Option<String> {
        let spec = format!("{pool}/{image}");
        let v: serde_json::Value =
            serde_json::from_str(&self.rbd(&["info", "--format", "json", &spec])).unwrap();
        v.get("parent")
            .and_then(|p| p["image"].as_str())
            .map(String::from)
    }
}

fn image_of(id: &str) -> String {
    let key = id.rsplit(':').next().unwrap();
    if id.starts_with("rbds1:") {
        format!("ldsnap-{key}")
    } else {
        format!("lds-{key}")
    }
}

async fn snapshot(d: &Driver, ceph: &Ceph, name: &str, source: &str) -> csi::Snapshot {
    let r = d
        .controller()
        .create_snapshot(csi::CreateSnapshotRequest {
            name: name.to_string(),
            source_volume_id: source.to_string(),
            secrets: ceph.secrets(),
            parameters: params(&[("clusterID", CLUSTER)]),
        })
        .await;
    expect_ok(r, &format!("CreateSnapshot({name})"))
        .snapshot
        .expect("snapshot")
}

async fn delete_volume(d: &Driver, ceph: &Ceph, id: &str) {
    let r = d
        .controller()
        .delete_volume(csi::DeleteVolumeRequest {
            volume_id: id.to_string(),
            secrets: ceph.secrets(),
        })
        .await;
    expect_ok(r, &format!("DeleteVolume({id})"));
}

async fn delete_snapshot(d: &Driver, ceph: &Ceph, id: &str) {
    let r = d
        .controller()
        .delete_snapshot(csi::DeleteSnapshotRequest {
            snapshot_id: id.to_string(),
            secrets: ceph.secrets(),
        })
        .await;
    expect_ok(r, &format!("DeleteSnapshot({id})"));
}

fn from_snapshot(id: &str) -> Option<csi::VolumeContentSource> {
    Some(csi::VolumeContentSource {
        r#type: Some(SourceType::Snapshot(SnapshotSource {
            snapshot_id: id.to_string(),
        })),
    })
}

fn from_volume(id: &str) -> Option<csi::VolumeContentSource> {
    Some(csi::VolumeContentSource {
        r#type: Some(SourceType::Volume(VolumeSource {
            volume_id: id.to_string(),
        })),
    })
}

/// Create (idempotent by name, ALREADY_EXISTS on a conflict), get, list,
/// expand and delete (idempotent) a volume; the image and its metadata in
/// Ceph follow. The key never reaches the driver's log.
#[tokio::test]
async fn volume_lifecycle() {
    let Some(ceph) = ceph() else { return };
    let d = ceph.driver(&[]).await;
    let name = unique_name("rbd-vol");
    let v = d.create_ok(ceph.create_req(&name, 64 * MIB)).await;
    assert!(v.volume_id.starts_with("rbd1:test-ceph:"), "{v:?}");
    assert!(v.volume_id.len() <= 128);
    assert_eq!(v.capacity_bytes, 64 * MIB);
    assert_eq!(
        v.volume_context.get("imageName"),
        Some(&image_of(&v.volume_id))
    );
    assert!(ceph.images().contains(&image_of(&v.volume_id)));
    let meta = ceph.rbd(&[
        "image-meta",
        "get",
        &format!("{}/{}", ceph.pool, image_of(&v.volume_id)),
        "lodestone.v1.name",
    ]);
    assert_eq!(meta.trim(), name);

    // A retry returns the same volume; another size is a conflict.
    let again = d.create_ok(ceph.create_req(&name, 64 * MIB)).await;
    assert_eq!(again.volume_id, v.volume_id);
    let r = d
        .controller()
        .create_volume(ceph.create_req(&name, 128 * MIB))
        .await;
    expect_code(r, Code::AlreadyExists, "same name, other size");

    let got = expect_ok(
        d.controller()
            .controller_get_volume(csi::ControllerGetVolumeRequest {
                volume_id: v.volume_id.clone(),
            })
            .await,
        "ControllerGetVolume",
    );
    assert_eq!(got.volume.unwrap().capacity_bytes, 64 * MIB);
    let listed = d.list_all(0).await;
    assert!(listed.iter().any(|l| l.volume_id == v.volume_id));
    // GetCapacity with the StorageClass's parameters, and with none (every
    // configured cluster). The figures come from the mgr's statistics;
    // without a mgr they are unknown: UNAVAILABLE (see
    // capacity_is_what_the_pool_can_take).
    let with_stats = ceph_df(&ceph).0 > 0;
    for p in [ceph.params(), HashMap::new()] {
        let r = d
            .controller()
            .get_capacity(csi::GetCapacityRequest {
                parameters: p.clone(),
                ..Default::default()
            })
            .await;
        if !with_stats {
            expect_code(r, Code::Unavailable, "GetCapacity without a mgr");
            continue;
        }
        let cap = expect_ok(r, &format!("GetCapacity({p:?})"));
        assert!(cap.available_capacity >= 0, "{cap:?}");
        assert_eq!(cap.minimum_volume_size, Some(MIB), "{cap:?}");
    }

    let r = d
        .controller()
        .controller_expand_volume(csi::ControllerExpandVolumeRequest {
            volume_id: v.volume_id.clone(),
            capacity_range: range(100 * MIB, 0),
            secrets: ceph.secrets(),
            volume_capability: Some(mount_cap("ext4")),
        })
        .await;
    let e = expect_ok(r, "ControllerExpandVolume");
    assert_eq!(e.capacity_bytes, 100 * MIB);
    assert!(e.node_expansion_required);

    delete_volume(&d, &ceph, &v.volume_id).await;
    delete_volume(&d, &ceph, &v.volume_id).await;
    assert!(!ceph.images().contains(&image_of(&v.volume_id)));
    let r = d
        .controller()
        .controller_get_volume(csi::ControllerGetVolumeRequest {
            volume_id: v.volume_id.clone(),
        })
        .await;
    expect_code(r, Code::NotFound, "ControllerGetVolume after delete");
    assert!(!d.log().contains(&ceph.key), "the key reached the log");
}

/// A snapshot is a hidden clone's snapshot: it outlives its source and
/// stays restorable; restores and clones are clone v2 children; deleting a
/// parent that still has children moves it to the trash, and the last
/// delete empties the trash of ours.
#[tokio::test]
async fn snapshots_restores_and_clones() {
    let Some(ceph) = ceph() else { return };
    let d = ceph.driver(&[]).await;
    let v = d
        .create_ok(ceph.create_req(&unique_name("rbd-src"), 32 * MIB))
        .await;
    let s = snapshot(&d, &ceph, &unique_name("rbd-snap"), &v.volume_id).await;
    assert!(
        s.ready_to_use && s.snapshot_id.starts_with("rbds1:"),
        "{s:?}"
    );
    assert_eq!(s.source_volume_id, v.volume_id);
    assert_eq!(s.size_bytes, 32 * MIB);
    let snap_name = unique_name("rbd-snap-2");
    let s2 = snapshot(&d, &ceph, &snap_name, &v.volume_id).await;
    let again = snapshot(&d, &ceph, &snap_name, &v.volume_id).await;
    assert_eq!(again.snapshot_id, s2.snapshot_id, "CreateSnapshot retry");
    assert_eq!(
        ceph.parent(&image_of(&s.snapshot_id)).as_deref(),
        Some(image_of(&v.volume_id).as_str())
    );
    // No temporary snapshot stays on the source.
    let snaps = ceph.rbd(&[
        "snap",
        "ls",
        "--format",
        "json",
        &format!("{}/{}", ceph.pool, image_of(&v.volume_id)),
    ]);
    assert!(!snaps.contains("ldtmp-"), "{snaps}");

    // Restore into a larger volume, and clone the volume.
    let mut r = ceph.create_req(&unique_name("rbd-restore"), 48 * MIB);
    r.volume_content_source = from_snapshot(&s.snapshot_id);
    let restored = d.create_ok(r).await;
    assert_eq!(restored.capacity_bytes, 48 * MIB);
    assert_eq!(restored.content_source, from_snapshot(&s.snapshot_id));
    let r = ceph.copy_req(&unique_name("rbd-clone"), from_volume(&v.volume_id));
    let cloned = d.create_ok(r).await;
    assert_eq!(cloned.capacity_bytes, 32 * MIB);

    // The source goes; its snapshots stay restorable.
    delete_volume(&d, &ceph, &v.volume_id).await;
    let r = ceph.copy_req(
        &unique_name("rbd-restore-after"),
        from_snapshot(&s.snapshot_id),
    );
    let late = d.create_ok(r).await;
    let listed = expect_ok(
        d.controller()
            .list_snapshots(csi::ListSnapshotsRequest {
                snapshot_id: s.snapshot_id.clone(),
                ..Default::default()
            })
            .await,
        "ListSnapshots",
    );
    assert_eq!(listed.entries.len(), 1);

    // A restore from a snapshot that does not exist.
    let mut r = ceph.create_req(&unique_name("rbd-nosnap"), 0);
    r.volume_content_source = from_snapshot("rbds1:test-ceph:1:0123456789abcdef0123456789abcdef");
    expect_code(
        d.controller().create_volume(r).await,
        Code::NotFound,
        "restore from a missing snapshot",
    );

    for id in [&restored.volume_id, &cloned.volume_id, &late.volume_id] {
        delete_volume(&d, &ceph, id).await;
    }
    delete_snapshot(&d, &ceph, &s.snapshot_id).await;
    delete_snapshot(&d, &ceph, &s2.snapshot_id).await;
    delete_snapshot(&d, &ceph, &s2.snapshot_id).await;
    let mine: Vec<String> = [
        &v.volume_id,
        &restored.volume_id,
        &cloned.volume_id,
        &late.volume_id,
        &s.snapshot_id,
        &s2.snapshot_id,
    ]
    .iter()
    .map(|id| image_of(id))
    .collect();
    let left: Vec<String> = ceph
        .images()
        .into_iter()
        .filter(|i| mine.contains(i))
        .collect();
    assert!(left.is_empty(), "images left: {left:?}");
    // A deleted snapshot's image leaves the trash right after the answer,
    // and the source volume that waited there for it with it.
    wait_for_empty_trash(&ceph, &mine).await;
    assert!(!d.log().contains(&ceph.key), "the key reached the log");
}

/// Past the hard depth a new clone is flattened before the call returns.
#[tokio::test]
async fn clone_chain_past_hard_depth_is_flattened() {
    let Some(ceph) = ceph() else { return };
    let d = ceph
        .driver(&["--rbd-soft-clone-depth", "2", "--rbd-hard-clone-depth", "2"])
        .await;
    let v = d
        .create_ok(ceph.create_req(&unique_name("rbd-chain"), 16 * MIB))
        .await;
    // snapshot (depth 1) -> restore (depth 2: flattened) -> snapshot ...
    let s = snapshot(&d, &ceph, &unique_name("rbd-chain-s"), &v.volume_id).await;
    assert!(ceph.parent(&image_of(&s.snapshot_id)).is_some());
    let r = ceph.copy_req(&unique_name("rbd-chain-r"), from_snapshot(&s.snapshot_id));
    let restored = d.create_ok(r).await;
    assert_eq!(
        ceph.parent(&image_of(&restored.volume_id)),
        None,
        "a clone at the hard depth must be flattened"
    );
    delete_volume(&d, &ceph, &restored.volume_id).await;
    delete_snapshot(&d, &ceph, &s.snapshot_id).await;
    delete_volume(&d, &ceph, &v.volume_id).await;
}

/// At the soft depth a new clone is usable at once and flattened in the
/// background: the call returns with the parent still linked, and the link
/// goes soon after.
#[tokio::test]
async fn clone_at_soft_depth_is_flattened_in_the_background() {
    let Some(ceph) = ceph() else { return };
    let d = ceph
        .driver(&["--rbd-soft-clone-depth", "2", "--rbd-hard-clone-depth", "8"])
        .await;
    let v = d
        .create_ok(ceph.create_req(&unique_name("rbd-soft"), 64 * MIB))
        .await;
    // the snapshot's hidden clone is depth 1 (below soft: stays a clone)
    let s = snapshot(&d, &ceph, &unique_name("rbd-soft-s"), &v.volume_id).await;
    let r = ceph.copy_req(&unique_name("rbd-soft-r"), from_snapshot(&s.snapshot_id));
    let restored = d.create_ok(r).await;
    let image = image_of(&restored.volume_id);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while ceph.parent(&image).is_some() {
        assert!(
            std::time::Instant::now() < deadline,
            "a clone at the soft depth was not flattened within 60 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert!(
        ceph.parent(&image_of(&s.snapshot_id)).is_some(),
        "the snapshot's hidden clone (depth 1) must stay a clone"
    );
    while !d.log().contains("flattened in the background") {
        assert!(
            std::time::Instant::now() < deadline,
            "no flatten in the log"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    delete_volume(&d, &ceph, &restored.volume_id).await;
    delete_snapshot(&d, &ceph, &s.snapshot_id).await;
    delete_volume(&d, &ceph, &v.volume_id).await;
}

/// A second pool the test user may use (made once; idempotent).
fn second_pool(ceph: &Ceph) -> &'static str {
    const POOL2: &str = "lodestone-b";
    static MADE: std::sync::Once = std::sync::Once::new();
    MADE.call_once(|| {
        ceph.admin("ceph", &["osd", "pool", "create", POOL2, "8"]);
        ceph.rbd(&["pool", "init", POOL2]);
        let user = format!("client.{}", ceph.user.trim_start_matches("client."));
        let both = format!("profile rbd pool={}, profile rbd pool={POOL2}", ceph.pool);
        ceph.admin(
            "ceph",
            &[
                "auth",
                "caps",
                &user,
                "mon",
                "profile rbd",
                "osd",
                &both,
                "mgr",
                &both,
            ],
        );
    });
    POOL2
}

/// Data gravity across pools: a restore whose topology allows the source's
/// pool stays there as a clone, against the scheduler's preference; one
/// whose topology excludes it is copied into an allowed pool (flattened, so
/// it does not depend on the other pool) with the snapshot's data.
#[tokio::test]
async fn restore_stays_in_the_source_pool_unless_topology_forbids() {
    let Some(ceph) = ceph() else { return };
    let pool2 = second_pool(&ceph);
    let d = ceph.driver_for_pools(&[&ceph.pool, pool2], &[]).await;
    let key = "topology.lodestone.dev/zone";
    let pools = serde_json::json!([
        {"poolName": ceph.pool, "domainSegments": [{"domainLabel": key, "value": "a"}]},
        {"poolName": pool2, "domainSegments": [{"domainLabel": key, "value": "b"}]},
    ])
    .to_string();
    let zone = |z: &str| csi::Topology {
        segments: [(key.to_string(), z.to_string())].into(),
    };
    let req = |name: &str, preferred: &[&str], requisite: &[&str]| {
        let mut r = ceph.create_req(name, 16 * MIB);
        r.parameters = params(&[("clusterID", CLUSTER), ("topologyConstrainedPools", &pools)]);
        r.accessibility_requirements = Some(csi::TopologyRequirement {
            preferred: preferred.iter().map(|z| zone(z)).collect(),
            requisite: requisite.iter().map(|z| zone(z)).collect(),
        });
        r
    };
    let v = d
        .create_ok(req(&unique_name("rbd-grav"), &["a"], &["a", "b"]))
        .await;
    assert_eq!(v.accessible_topology, vec![zone("a")]);
    let img = image_of(&v.volume_id);
    assert!(ceph.images().contains(&img));
    let spec = format!("{}/{img}", ceph.pool);
    ceph.rbd(&[
        "bench",
        "--io-type",
        "write",
        "--io-size",
        "65536",
        "--io-total",
        "4M",
        "--io-pattern",
        "rand",
        &spec,
    ]);
    let s = snapshot(&d, &ceph, &unique_name("rbd-grav-s"), &v.volume_id).await;
    let snap_data = ceph.admin(
        "rbd",
        &[
            "export",
            &format!("{}/{}@csi", ceph.pool, image_of(&s.snapshot_id)),
            "-",
        ],
    );

    // preferred b, but a is allowed: stays next to its source, as a clone
    let mut r = req(&unique_name("rbd-grav-near"), &["b", "a"], &["a", "b"]);
    r.volume_content_source = from_snapshot(&s.snapshot_id);
    let near = d.create_ok(r).await;
    assert_eq!(near.accessible_topology, vec![zone("a")]);
    assert!(ceph.images().contains(&image_of(&near.volume_id)));
    assert!(
        ceph.parent(&image_of(&near.volume_id)).is_some(),
        "a same-pool restore is a clone"
    );

    // only b allowed: copied into pool b, flattened, same data
    let mut r = req(&unique_name("rbd-grav-far"), &[], &["b"]);
    r.volume_content_source = from_snapshot(&s.snapshot_id);
    let far = d.create_ok(r).await;
    assert_eq!(far.accessible_topology, vec![zone("b")]);
    let far_img = image_of(&far.volume_id);
    assert!(ceph.images_in(pool2).contains(&far_img));
    assert_eq!(
        ceph.parent_in(pool2, &far_img),
        None,
        "a cross-pool copy is flattened"
    );
    let far_data = ceph.admin("rbd", &["export", &format!("{pool2}/{far_img}"), "-"]);
    assert!(far_data == snap_data, "the copy differs from the snapshot");

    for id in [&far.volume_id, &near.volume_id] {
        delete_volume(&d, &ceph, id).await;
    }
    delete_snapshot(&d, &ceph, &s.snapshot_id).await;
    delete_volume(&d, &ceph, &v.volume_id).await;
    assert!(!ceph.images_in(pool2).contains(&far_img));
}

/// The spec's codes and idempotency rules on the RBD controller: paging
/// through ListVolumes and ListSnapshots, bad page tokens, ids that do not
/// exist (NOT_FOUND where the spec says so, success for deletes),
/// capability validation, snapshot idempotency and name conflicts.
#[tokio::test]
async fn spec_codes_and_paging() {
    let Some(ceph) = ceph() else { return };
    let d = ceph.driver(&[]).await;
    let mut vols = Vec::new();
    for i in 0..3 {
        vols.push(
            d.create_ok(ceph.create_req(&unique_name(&format!("rbd-page{i}")), 16 * MIB))
                .await,
        );
    }
    // (other tests create and delete volumes in the pool meanwhile: compare
    // ours, and see that no page repeats an entry)
    let ours = |l: &[csi::Volume]| -> Vec<String> {
        l.iter()
            .map(|v| v.volume_id.clone())
            .filter(|id| vols.iter().any(|o| &o.volume_id == id))
            .collect()
    };
    let all = d.list_all(0).await;
    let paged = d.list_all(1).await;
    assert_eq!(ours(&all).len(), 3, "{all:?}");
    assert_eq!(
        ours(&all),
        ours(&paged),
        "paging by one lists what one page does"
    );
    let distinct: std::collections::HashSet<_> = paged.iter().map(|v| &v.volume_id).collect();
    assert_eq!(distinct.len(), paged.len(), "a volume listed twice");
    let r = d
        .controller()
        .list_volumes(csi::ListVolumesRequest {
            max_entries: 1,
            starting_token: "not-a-token".into(),
        })
        .await;
    expect_code(r, Code::Aborted, "ListVolumes with a bad token");

    let missing = {
        let id = &vols[0].volume_id;
        let (head, _) = id.rsplit_once(':').unwrap();
        format!("{head}:{}", "0".repeat(32))
    };
    let r = d
        .controller()
        .validate_volume_capabilities(csi::ValidateVolumeCapabilitiesRequest {
            volume_id: missing.clone(),
            volume_capabilities: vec![mount_cap("ext4")],
            ..Default::default()
        })
        .await;
    expect_code(
        r,
        Code::NotFound,
        "ValidateVolumeCapabilities of a missing volume",
    );
    let ok = expect_ok(
        d.controller()
            .validate_volume_capabilities(csi::ValidateVolumeCapabilitiesRequest {
                volume_id: vols[0].volume_id.clone(),
                volume_capabilities: vec![mount_cap("ext4"), block_cap()],
                ..Default::default()
            })
            .await,
        "ValidateVolumeCapabilities",
    );
    assert!(ok.confirmed.is_some(), "{ok:?}");
    let r = d
        .controller()
        .controller_expand_volume(csi::ControllerExpandVolumeRequest {
            volume_id: missing.clone(),
            capacity_range: range(32 * MIB, 0),
            secrets: ceph.secrets(),
            ..Default::default()
        })
        .await;
    expect_code(
        r,
        Code::NotFound,
        "ControllerExpandVolume of a missing volume",
    );
    delete_volume(&d, &ceph, &missing).await;

    // Snapshots: idempotent by name, ALREADY_EXISTS for another source,
    // NOT_FOUND for a missing source, paged listing, filters.
    let sname = unique_name("rbd-page-s");
    let s = snapshot(&d, &ceph, &sname, &vols[0].volume_id).await;
    let again = snapshot(&d, &ceph, &sname, &vols[0].volume_id).await;
    assert_eq!(again.snapshot_id, s.snapshot_id);
    let r = d
        .controller()
        .create_snapshot(csi::CreateSnapshotRequest {
            name: sname.clone(),
            source_volume_id: vols[1].volume_id.clone(),
            secrets: ceph.secrets(),
            ..Default::default()
        })
        .await;
    expect_code(
        r,
        Code::AlreadyExists,
        "snapshot name reused for another source",
    );
    let r = d
        .controller()
        .create_snapshot(csi::CreateSnapshotRequest {
            name: unique_name("rbd-page-s2"),
            source_volume_id: missing.clone(),
            secrets: ceph.secrets(),
            ..Default::default()
        })
        .await;
    expect_code(r, Code::NotFound, "snapshot of a missing volume");
    let s2 = snapshot(&d, &ceph, &unique_name("rbd-page-s3"), &vols[1].volume_id).await;
    let mut token = String::new();
    let mut listed = Vec::new();
    loop {
        let page = expect_ok(
            d.controller()
                .list_snapshots(csi::ListSnapshotsRequest {
                    max_entries: 1,
                    starting_token: token.clone(),
                    ..Default::default()
                })
                .await,
            "ListSnapshots",
        );
        assert!(page.entries.len() <= 1);
        listed.extend(page.entries.into_iter().filter_map(|e| e.snapshot));
        if page.next_token.is_empty() {
            break;
        }
        token = page.next_token;
    }
    for want in [&s, &s2] {
        assert!(listed.iter().any(|l| l.snapshot_id == want.snapshot_id));
    }
    let by_source = expect_ok(
        d.controller()
            .list_snapshots(csi::ListSnapshotsRequest {
                source_volume_id: vols[1].volume_id.clone(),
                ..Default::default()
            })
            .await,
        "ListSnapshots by source",
    );
    let ids: Vec<_> = by_source
        .entries
        .iter()
        .filter_map(|e| e.snapshot.as_ref().map(|s| s.snapshot_id.clone()))
        .collect();
    assert_eq!(ids, vec![s2.snapshot_id.clone()]);
    let by_id = expect_ok(
        d.controller()
            .list_snapshots(csi::ListSnapshotsRequest {
                snapshot_id: s.snapshot_id.clone(),
                ..Default::default()
            })
            .await,
        "ListSnapshots by id",
    );
    assert_eq!(by_id.entries.len(), 1);

    for snap in [&s, &s2] {
        delete_snapshot(&d, &ceph, &snap.snapshot_id).await;
        delete_snapshot(&d, &ceph, &snap.snapshot_id).await;
    }
    for v in &vols {
        delete_volume(&d, &ceph, &v.volume_id).await;
    }
}

/// Bad input gets a clear code; a wrong key is refused and never logged.
#[tokio::test]
async fn bad_requests() {
    let Some(ceph) = ceph() else { return };
    let d = ceph.driver(&[]).await;
    type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, Code);
    let cases: Vec<Case> = vec![
        (
            "unknown cluster",
            vec![("clusterID", "nope"), ("pool", "rbd")],
            Code::InvalidArgument,
        ),
        ("no cluster", vec![("pool", "rbd")], Code::InvalidArgument),
        (
            "no pool",
            vec![("clusterID", CLUSTER)],
            Code::InvalidArgument,
        ),
        (
            "bad features",
            vec![
                ("clusterID", CLUSTER),
                ("pool", "rbd"),
                ("imageFeatures", "journaling"),
            ],
            Code::InvalidArgument,
        ),
        (
            "bad mounter",
            vec![("clusterID", CLUSTER), ("pool", "rbd"), ("mounter", "fuse")],
            Code::InvalidArgument,
        ),
        (
            "mkfsOptions naming a device",
            vec![
                ("clusterID", CLUSTER),
                ("pool", "rbd"),
                ("mkfsOptions", "-E x /dev/sda"),
            ],
            Code::InvalidArgument,
        ),
        (
            "unknown parameter",
            vec![("clusterID", CLUSTER), ("pool", "rbd"), ("pools", "x")],
            Code::InvalidArgument,
        ),
        (
            "a pool the config does not list",
            vec![("clusterID", CLUSTER), ("pool", "unlisted")],
            Code::InvalidArgument,
        ),
        (
            "topologyConstrainedPools not JSON",
            vec![("clusterID", CLUSTER), ("topologyConstrainedPools", "[{")],
            Code::InvalidArgument,
        ),
    ];
    for (what, p, code) in cases {
        let mut r = ceph.create_req(&unique_name("rbd-bad"), 16 * MIB);
        r.parameters = params(&p);
        expect_code(d.controller().create_volume(r).await, code, what);
    }
    let mut r = ceph.create_req(&unique_name("rbd-badkey"), 16 * MIB);
    let wrong = "AQBzZXJ2ZXJzZWNyZXRub3RyZWFsbHlhbmtleQ==";
    r.secrets.insert("userKey".into(), wrong.into());
    let e = d
        .controller()
        .create_volume(r)
        .await
        .expect_err("a wrong key was accepted");
    assert_ne!(e.code(), Code::Ok);
    let mut r = ceph.create_req(&unique_name("rbd-halfsecret"), 16 * MIB);
    r.secrets.remove("userKey");
    expect_code(
        d.controller().create_volume(r).await,
        Code::InvalidArgument,
        "secrets without userKey",
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    let log = d.log();
    assert!(
        !log.contains(wrong) && !log.contains(&ceph.key),
        "a key reached the log"
    );
}

// ---------------------------------------------------------------------------
// Capacity, topology, races with watchers, crashes at fail points.
// ---------------------------------------------------------------------------

/// `ceph df` as the admin: (raw total bytes, pool -> MAX AVAIL).
fn ceph_df(ceph: &Ceph) -> (u64, HashMap<String, u64>) {
    let v: serde_json::Value =
        serde_json::from_slice(&ceph.admin("ceph", &["df", "--format", "json"])).unwrap();
    let pools = v["pools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_string(),
                p["stats"]["max_avail"].as_u64().unwrap(),
            )
        })
        .collect();
    (v["stats"]["total_bytes"].as_u64().unwrap(), pools)
}

/// GetCapacity answers what the pool can take as Ceph computes it (MAX
/// AVAIL of `ceph df`: replication and full ratio included), never the raw
/// free space of the cluster; without usage statistics (no ceph-mgr) it is
/// UNAVAILABLE with a reason, never a zero.
#[tokio::test]
async fn capacity_is_what_the_pool_can_take() {
    let Some(ceph) = ceph() else { return };
    let d = ceph.driver(&[]).await;
    let (total, pools) = ceph_df(&ceph);
    let ask = |parameters: HashMap<String, String>| {
        let mut c = d.controller();
        async move {
            c.get_capacity(csi::GetCapacityRequest {
                parameters,
                ..Default::default()
            })
            .await
        }
    };
    for parameters in [ceph.params(), HashMap::new()] {
        let r = ask(parameters.clone()).await;
        if total == 0 {
            println!("no usage statistics (no mgr): {r:?}");
            let e = r.expect_err("capacity without usage statistics");
            assert_eq!(e.code(), Code::Unavailable, "{e:?}");
            assert!(e.message().contains("mgr"), "{e:?}");
            continue;
        }
        let got = r.expect("GetCapacity").into_inner();
        let want = pools[&ceph.pool];
        println!(
            "capacity {} bytes, ceph df MAX AVAIL {want}",
            got.available_capacity
        );
        assert!(got.available_capacity > 0);
        let (got_b, want_b) = (got.available_capacity as f64, want as f64);
        assert!(
            (got_b - want_b).abs() <= want_b * 0.05,
            "GetCapacity {got_b} vs MAX AVAIL {want_b}"
        );
    }
}

/// A requisite topology no node of the cluster can lie in (keys its nodes
/// never report) cannot be served: RESOURCE_EXHAUSTED (the CSI spec's code
/// for a valid topology it cannot provision in), and nothing is created.
/// A requisite in the nodes' keys is served by a plain pool.
#[tokio::test]
async fn unsatisfiable_requisite_topology_is_resource_exhausted() {
    let Some(ceph) = ceph() else { return };
    let d = ceph.driver(&[]).await;
    let before = ceph.images();
    let garbage = csi::Topology {
        segments: [("example.com/garbage".to_string(), "nowhere".to_string())].into(),
    };
    let zone = csi::Topology {
        segments: [("topology.kubernetes.io/zone".to_string(), "a".to_string())].into(),
    };
    let req = |name: &str, requisite: Vec<csi::Topology>, params: HashMap<String, String>| {
        let mut r = ceph.create_req(name, 64 * MIB);
        r.parameters = params;
        r.accessibility_requirements = Some(csi::TopologyRequirement {
            requisite,
            preferred: vec![],
        });
        r
    };
    let r = d
        .controller()
        .create_volume(req(
            &unique_name("rbd-topo"),
            vec![garbage.clone()],
            ceph.params(),
        ))
        .await;
    expect_code(r, Code::ResourceExhausted, "plain pool, garbage requisite");
    let pools = serde_json::json!([{
        "poolName": ceph.pool,
        "domainSegments": [{"domainLabel": "topology.kubernetes.io/zone", "value": "a"}],
    }])
    .to_string();
    let constrained = params(&[("clusterID", CLUSTER), ("topologyConstrainedPools", &pools)]);
    let r = d
        .controller()
        .create_volume(req(&unique_name("rbd-topo"), vec![garbage], constrained))
        .await;
    expect_code(
        r,
        Code::ResourceExhausted,
        "constrained pools, garbage requisite",
    );
    assert_eq!(ceph.images(), before, "an image was made");
    let v = d
        .create_ok(req(&unique_name("rbd-topo"), vec![zone], ceph.params()))
        .await;
    delete_volume(&d, &ceph, &v.volume_id).await;
}

/// Waits (up to 30 s) until none of `images` is in the trash.
async fn wait_for_empty_trash(ceph: &Ceph, images: &[String]) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let trashed: Vec<String> = ceph
            .trash()
            .into_iter()
            .filter(|i| images.contains(i))
            .collect();
        if trashed.is_empty() {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "images left in the trash: {trashed:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// How many things in Ceph make up `image`: pool listing, trash and its
/// snapshots (a fresh volume: exactly one).
fn backend_objects(ceph: &Ceph, image: &str) -> usize {
    let listed = ceph.images().iter().filter(|i| *i == image).count();
    let trashed = ceph.trash().iter().filter(|i| *i == image).count();
    let snaps = if listed > 0 {
        let spec = format!("{}/{image}", ceph.pool);
        let v: serde_json::Value =
            serde_json::from_str(&ceph.rbd(&["snap", "ls", "--all", "--format", "json", &spec]))
                .unwrap();
        v.as_array().map_or(0, |a| a.len())
    } else {
        0
    };
    listed + trashed + snaps
}

/// A pseudo-random number below `n` (the clock's nanoseconds; no crate).
fn jitter(n: u64) -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    (t.subsec_nanos() as u64 ^ (t.as_secs() << 7)) % n.max(1)
}

/// DeleteVolume racing a client that opens the image (a watcher, as a
/// node's `rbd map` is), five rounds with a random stagger: every round
/// ends with the volume either fully gone (DeleteVolume OK) or exactly as it
/// was (FAILED_PRECONDITION, one object, its data and identity intact).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_racing_a_watcher_is_all_or_nothing() {
    let Some(ceph) = ceph() else { return };
    let d = ceph.driver(&[]).await;
    let (mut gone, mut kept) = (0, 0);
    for round in 0..5 {
        let name = unique_name("rbd-race");
        let v = d.create_ok(ceph.create_req(&name, 64 * MIB)).await;
        let image = image_of(&v.volume_id);
        assert_eq!(backend_objects(&ceph, &image), 1);
        let stagger = jitter(120);
        let holder = {
            let creds = lodestone::rbd::Credentials {
                mon_host: ceph.monitors.clone(),
                user: ceph.user.clone(),
                key: lodestone::rbd::Secret::new(ceph.key.clone()),
            };
            let (pool, image) = (ceph.pool.clone(), image.clone());
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(stagger));
                let c = std::sync::Arc::new(
                    lodestone::rbd::Cluster::connect(&creds, &Default::default()).unwrap(),
                );
                let io = c.ioctx(&pool).unwrap();
                // a read-write open watches the image, as a mapping does
                let opened = match io.open(&image) {
                    Ok(img) => {
                        std::thread::sleep(Duration::from_millis(700));
                        drop(img);
                        true
                    }
                    Err(_) => false,
                };
                opened
            })
        };
        tokio::time::sleep(Duration::from_millis(jitter(120))).await;
        let r = d
            .controller()
            .delete_volume(csi::DeleteVolumeRequest {
                volume_id: v.volume_id.clone(),
                secrets: ceph.secrets(),
            })
            .await;
        let opened = tokio::task::spawn_blocking(move || holder.join().unwrap())
            .await
            .unwrap();
        let objects = backend_objects(&ceph, &image);
        println!(
            "round {round}: stagger {stagger} ms, delete {:?}, opened {opened}, objects {objects}",
            r.as_ref().map(|_| ()).map_err(|e| e.code())
        );
        match r {
            Ok(_) => {
                assert_eq!(
                    objects, 0,
                    "round {round}: deleted, yet {objects} objects left"
                );
                gone += 1;
            }
            Err(e) => {
                assert_eq!(e.code(), Code::FailedPrecondition, "round {round}: {e:?}");
                assert_eq!(objects, 1, "round {round}: kept with {objects} objects");
                let got = d
                    .controller()
                    .controller_get_volume(csi::ControllerGetVolumeRequest {
                        volume_id: v.volume_id.clone(),
                    })
                    .await;
                let got = expect_ok(got, "ControllerGetVolume").volume.unwrap();
                assert_eq!(got.capacity_bytes, v.capacity_bytes, "round {round}");
                kept += 1;
                delete_volume(&d, &ceph, &v.volume_id).await;
                assert_eq!(backend_objects(&ceph, &image), 0);
            }
        }
    }
    println!("delete vs watcher: {gone} gone, {kept} kept");
}

impl Ceph {
    /// A controller armed with fail point `point`.
    async fn armed_driver(&self, dir: tempfile::TempDir, pools: &[&str], point: &str) -> Driver {
        let (config, secrets) = self.write_config(dir.path(), pools);
        Driver::builder()
            .mode("controller")
            .class_args(Vec::<String>::new())
            .args(["--driver", "rbd"])
            .args(["--rbd-config", config.to_str().unwrap()])
            .args(["--rbd-secret-dir", secrets.to_str().unwrap()])
            .env("LODESTONE_FAILPOINTS", point)
            .start_in(dir)
            .await
    }
}

/// Runs `call` on a driver armed with `point`, expects the process to die
/// there, and returns a fresh driver (no fail point) on the same directory.
async fn crash_at<F, Fut, T>(ceph: &Ceph, pools: &[&str], point: &str, call: F) -> Driver
where
    F: FnOnce(Driver) -> Fut,
    Fut: std::future::Future<Output = (Driver, Result<T, tonic::Status>)>,
    T: std::fmt::Debug,
{
    let d = ceph.armed_driver(new_temp_dir(), pools, point).await;
    let (mut d, r) = call(d).await;
    assert!(r.is_err(), "{point}: the call succeeded: {r:?}");
    let status = d.terminate(Duration::from_secs(10));
    assert!(
        d.log().contains(&format!("fail point {point} reached")),
        "{point} not reached; status {status:?}; log:\n{}",
        d.log()
    );
    let (_, dir) = d.stop_and_keep_dir();
    let (config, secrets) = ceph.write_config(dir.path(), pools);
    Driver::builder()
        .mode("controller")
        .class_args(Vec::<String>::new())
        .args(["--driver", "rbd"])
        .args(["--rbd-config", config.to_str().unwrap()])
        .args(["--rbd-secret-dir", secrets.to_str().unwrap()])
        .start_in(dir)
        .await
}

/// The driver dies at each step boundary of a plain create; after a
/// restart the same request converges: same id, one image, tagged.
#[tokio::test]
async fn create_killed_at_each_step_converges() {
    let Some(ceph) = ceph() else { return };
    for point in [
        "rbd.create.after_create",
        "rbd.tag.after",
        "rbd.create.after_tag",
    ] {
        let name = unique_name("rbd-fp");
        let req = ceph.create_req(&name, 64 * MIB);
        let r2 = req.clone();
        let d = crash_at(&ceph, &[&ceph.pool], point, |d| async move {
            let r = d.controller().create_volume(r2).await;
            (d, r)
        })
        .await;
        let v = d.create_ok(req.clone()).await;
        let again = d.create_ok(req).await;
        assert_eq!(v.volume_id, again.volume_id);
        let image = image_of(&v.volume_id);
        assert_eq!(
            ceph.images().iter().filter(|i| **i == image).count(),
            1,
            "{point}"
        );
        let meta = ceph.rbd(&["image-meta", "list", &format!("{}/{image}", ceph.pool)]);
        assert!(meta.contains(&name), "{point}: not tagged: {meta}");
        delete_volume(&d, &ceph, &v.volume_id).await;
        assert_eq!(backend_objects(&ceph, &image), 0, "{point}");
    }
}

/// A snapshot whose creation died before its own snapshot exists is listed
/// as not ready; the retry finishes it (ready, same id, one hidden image).
/// A DeleteSnapshot that dies after moving the image to the trash (before
/// its purge) has deleted the snapshot: the retry answers OK and the
/// restarted controller's sweep purges the image.
#[tokio::test]
async fn snapshot_killed_halfway_is_not_ready_until_retried() {
    let Some(ceph) = ceph() else { return };
    let d = ceph.driver(&[]).await;
    let v = d
        .create_ok(ceph.create_req(&unique_name("rbd-fps"), 64 * MIB))
        .await;
    drop(d);
    let sname = unique_name("rbd-fps-s");
    let req = csi::CreateSnapshotRequest {
        name: sname.clone(),
        source_volume_id: v.volume_id.clone(),
        secrets: ceph.secrets(),
        parameters: params(&[("clusterID", CLUSTER)]),
    };
    let r2 = req.clone();
    let d = crash_at(
        &ceph,
        &[&ceph.pool],
        "rbd.snapshot.after_clone",
        |d| async move {
            let r = d.controller().create_snapshot(r2).await;
            (d, r)
        },
    )
    .await;
    let listed = expect_ok(
        d.controller()
            .list_snapshots(csi::ListSnapshotsRequest::default())
            .await,
        "ListSnapshots",
    );
    let half: Vec<_> = listed
        .entries
        .iter()
        .filter_map(|e| e.snapshot.as_ref())
        .filter(|s| s.source_volume_id.is_empty() || s.source_volume_id == v.volume_id)
        .collect();
    assert!(
        half.iter().all(|s| !s.ready_to_use),
        "a half-made snapshot is listed ready: {half:?}"
    );
    let s = expect_ok(d.controller().create_snapshot(req.clone()).await, "retry")
        .snapshot
        .unwrap();
    assert!(s.ready_to_use);
    let hidden = image_of(&s.snapshot_id);
    assert_eq!(ceph.images().iter().filter(|i| **i == hidden).count(), 1);
    let s2 = expect_ok(d.controller().create_snapshot(req).await, "again")
        .snapshot
        .unwrap();
    assert_eq!(s2.snapshot_id, s.snapshot_id);

    // DeleteSnapshot dies right after moving the image to the trash,
    // before its purge: the snapshot is gone for CSI, a retry answers OK,
    // and the restarted controller's sweep purges the image.
    let (sid, secrets) = (s.snapshot_id.clone(), ceph.secrets());
    let d = crash_at(
        &ceph,
        &[&ceph.pool],
        "rbd.snapshot.after_trash_move",
        |d| async move {
            let r = d
                .controller()
                .delete_snapshot(csi::DeleteSnapshotRequest {
                    snapshot_id: sid,
                    secrets,
                })
                .await;
            (d, r)
        },
    )
    .await;
    assert!(!ceph.images().contains(&hidden));
    delete_snapshot(&d, &ceph, &s.snapshot_id).await;
    wait_for_empty_trash(&ceph, &[hidden]).await;
    delete_volume(&d, &ceph, &v.volume_id).await;
}

/// A restore into another pool is a copy (flattened) whether the first
/// attempt finished or died right after cloning; so is one past the hard
/// depth.
#[tokio::test]
async fn retried_create_applies_the_flatten_rules() {
    let Some(ceph) = ceph() else { return };
    let pool2 = second_pool(&ceph);
    let pools = [ceph.pool.as_str(), pool2];
    let d = ceph.driver_for_pools(&pools, &[]).await;
    let v = d
        .create_ok(ceph.create_req(&unique_name("rbd-fpf"), 64 * MIB))
        .await;
    let s = snapshot(&d, &ceph, &unique_name("rbd-fpf-s"), &v.volume_id).await;
    drop(d);
    // across pools
    let mut req = ceph.copy_req(&unique_name("rbd-fpf-x"), from_snapshot(&s.snapshot_id));
    req.parameters = params(&[("clusterID", CLUSTER), ("pool", pool2)]);
    let r2 = req.clone();
    let d = crash_at(&ceph, &pools, "rbd.create.after_clone", |d| async move {
        let r = d.controller().create_volume(r2).await;
        (d, r)
    })
    .await;
    let far = d.create_ok(req).await;
    let far_image = image_of(&far.volume_id);
    assert_eq!(
        ceph.parent_in(pool2, &far_image),
        None,
        "a retried cross-pool restore stayed a clone of the other pool"
    );
    delete_volume(&d, &ceph, &far.volume_id).await;
    drop(d);
    // hard depth 1: every clone is flattened before the call returns
    let req = ceph.copy_req(&unique_name("rbd-fpf-h"), from_snapshot(&s.snapshot_id));
    let r2 = req.clone();
    let dir = new_temp_dir();
    let (config, secrets) = ceph.write_config(dir.path(), &pools);
    let armed = Driver::builder()
        .mode("controller")
        .class_args(Vec::<String>::new())
        .args(["--driver", "rbd"])
        .args(["--rbd-config", config.to_str().unwrap()])
        .args(["--rbd-secret-dir", secrets.to_str().unwrap()])
        .args(["--rbd-soft-clone-depth", "1", "--rbd-hard-clone-depth", "1"])
        .env("LODESTONE_FAILPOINTS", "rbd.create.after_clone")
        .start_in(dir)
        .await;
    let r = armed.controller().create_volume(r2).await;
    assert!(r.is_err());
    let (_, dir) = armed.stop_and_keep_dir();
    let d = Driver::builder()
        .mode("controller")
        .class_args(Vec::<String>::new())
        .args(["--driver", "rbd"])
        .args(["--rbd-config", config.to_str().unwrap()])
        .args(["--rbd-secret-dir", secrets.to_str().unwrap()])
        .args(["--rbd-soft-clone-depth", "1", "--rbd-hard-clone-depth", "1"])
        .start_in(dir)
        .await;
    let deep = d.create_ok(req).await;
    assert_eq!(
        ceph.parent(&image_of(&deep.volume_id)),
        None,
        "a retried restore past the hard depth stayed a clone"
    );
    delete_volume(&d, &ceph, &deep.volume_id).await;
    delete_snapshot(&d, &ceph, &s.snapshot_id).await;
    delete_volume(&d, &ceph, &v.volume_id).await;
}

/// A node plugin killed during `rbd map` (after writing the private keyring
/// for it) leaves the keyring behind; the restarted plugin removes it.
#[tokio::test]
async fn keyrings_left_by_a_killed_map_are_swept_at_start() {
    let Some(ceph) = ceph() else { return };
    let dir = new_temp_dir();
    let (config, secrets) = ceph.write_config(dir.path(), &[&ceph.pool]);
    let node = |dir: tempfile::TempDir, point: Option<&str>| {
        let mut b = Driver::builder()
            .mode("all")
            .class_args(Vec::<String>::new())
            .args(["--driver", "rbd"])
            .args(["--rbd-config", config.to_str().unwrap()])
            .args(["--rbd-secret-dir", secrets.to_str().unwrap()]);
        if let Some(p) = point {
            b = b.env("LODESTONE_FAILPOINTS", p);
        }
        b.start_in(dir)
    };
    let d = node(dir, Some("rbd.map.after_keyring")).await;
    let v = d
        .create_ok(ceph.create_req(&unique_name("rbd-keys"), 64 * MIB))
        .await;
    std::fs::create_dir_all(d.path("staging")).unwrap();
    let r = d
        .node()
        .node_stage_volume(csi::NodeStageVolumeRequest {
            volume_id: v.volume_id.clone(),
            staging_target_path: d.path_str("staging"),
            volume_capability: Some(mount_cap("ext4")),
            secrets: ceph.secrets(),
            volume_context: v.volume_context.clone(),
            ..Default::default()
        })
        .await;
    assert!(r.is_err(), "{r:?}");
    let keys = d.path("keys");
    let count = |p: &Path| {
        std::fs::read_dir(p)
            .map(|it| {
                it.flatten()
                    .filter(|e| e.path().extension().is_some_and(|x| x == "keyring"))
                    .count()
            })
            .unwrap_or(0)
    };
    assert!(
        d.log().contains("fail point rbd.map.after_keyring reached"),
        "{}",
        d.log()
    );
    assert_eq!(count(&keys), 1, "the killed map left no keyring?");
    let (_, dir) = d.stop_and_keep_dir();
    let d = node(dir, None).await;
    assert_eq!(count(&keys), 0, "a stale keyring survived the restart");
    delete_volume(&d, &ceph, &v.volume_id).await;
}

// ---------------------------------------------------------------------------
// Node plugin (krbd): needs the kernel's rbd driver, i.e. the QEMU guest
// (scripts/guest-rbd.sh) with LODESTONE_TEST_RBD_NODE=1.
// ---------------------------------------------------------------------------

fn node_enabled() -> bool {
    if std::env::var("LODESTONE_TEST_RBD_NODE").as_deref() == Ok("1") {
        true
    } else {
        eprintln!("skipped: needs LODESTONE_TEST_RBD_NODE=1 (krbd, in the guest)");
        false
    }
}

impl Ceph {
    /// Controller and node plugin in one process.
    async fn node_driver(&self, dir: tempfile::TempDir) -> Driver {
        let (config, secrets) = self.write_config(dir.path(), &[&self.pool]);
        let (path, argv_log) = rbd_shim(dir.path());
        Driver::builder()
            .env("PATH", &path)
            .env("LODESTONE_TEST_RBD_ARGV_LOG", &argv_log)
            .mode("all")
            .class_args(Vec::<String>::new())
            .args(["--driver", "rbd"])
            .args(["--rbd-config", config.to_str().unwrap()])
            .args(["--rbd-secret-dir", secrets.to_str().unwrap()])
            .args(["--topology", "topology.kubernetes.io/zone=a"])
            .start_in(dir)
            .await
    }

    async fn stage(&self, d: &Driver, v: &csi::Volume, staging: &str, cap: csi::VolumeCapability) {
        std::fs::create_dir_all(d.path(staging)).unwrap();
        let r = d
            .node()
            .node_stage_volume(csi::NodeStageVolumeRequest {
                volume_id: v.volume_id.clone(),
                staging_target_path: d.path_str(staging),
                volume_capability: Some(cap),
                secrets: self.secrets(),
                volume_context: v.volume_context.clone(),
                ..Default::default()
            })
            .await;
        expect_ok(r, &format!("NodeStageVolume({})", v.volume_id));
    }
}

/// The mapped /dev/rbdN of an image, from sysfs.
fn mapped(image: &str) -> Option<String> {
    for e in std::fs::read_dir("/sys/bus/rbd/devices").ok()?.flatten() {
        let name = std::fs::read_to_string(e.path().join("name")).unwrap_or_default();
        if name.trim() == image {
            return Some(format!("/dev/rbd{}", e.file_name().to_string_lossy()));
        }
    }
    None
}

fn write_file(path: &Path, data: &[u8]) {
    std::fs::write(path, data).unwrap();
    std::fs::File::open(path).unwrap().sync_all().unwrap();
    nix::unistd::sync();
}

/// The recording `rbd` of [`rbd_shim`] (test only; REAL is the real one).
const SHIM: &str = r#"#!/bin/sh
{ printf 'argv:'; printf ' %s' "$@"; printf '\n'
  prev=
  for a in "$@"; do
    [ "$prev" = --keyring ] && printf 'keyring: %s %s\n' "$(stat -c %a "$a")" "$a"
    prev=$a
  done
  env | sed 's/^/env: /'
} >>"$LODESTONE_TEST_RBD_ARGV_LOG"
exec REAL "$@"
"#;

/// A PATH whose `rbd` first records its argv, its environment and the mode
/// of the keyring file it is given into a log (the returned path), then
/// runs the real `rbd`: what any process listing would have shown.
fn rbd_shim(dir: &Path) -> (String, String) {
    let real = std::env::var("PATH")
        .unwrap()
        .split(':')
        .map(|d| Path::new(d).join("rbd"))
        .find(|p| p.is_file())
        .expect("rbd in PATH");
    let shim = dir.join("shim");
    std::fs::create_dir_all(&shim).unwrap();
    let log = dir.join("rbd-argv.log");
    let script = SHIM.replace("REAL", &real.display().to_string());
    std::fs::write(shim.join("rbd"), script).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(shim.join("rbd"), std::fs::Permissions::from_mode(0o755)).unwrap();
    (
        format!("{}:{}", shim.display(), std::env::var("PATH").unwrap()),
        log.display().to_string(),
    )
}

/// Map, format, mount, write; unstage unmaps; stage again reads the data
/// back; a snapshot restores the data it saw (not later writes); a clone
/// diverges from its source; unstage works after the plugin was killed and
/// restarted; no keyring file is left behind, and no rbd process ever saw
/// the key in its argv or environment.
#[tokio::test]
async fn node_map_mount_snapshot_restore() {
    let Some(ceph) = ceph() else { return };
    if !node_enabled() {
        return;
    }
    let d = ceph.node_driver(new_temp_dir()).await;
    let info = expect_ok(
        d.node().node_get_info(csi::NodeGetInfoRequest {}).await,
        "NodeGetInfo",
    );
    assert_eq!(
        info.accessible_topology
            .unwrap()
            .segments
            .get("topology.kubernetes.io/zone"),
        Some(&"a".to_string())
    );
    let v = d
        .create_ok(ceph.create_req(&unique_name("rbd-node"), 64 * MIB))
        .await;
    let image = image_of(&v.volume_id);
    ceph.stage(&d, &v, "staging", mount_cap("ext4")).await;
    assert!(mapped(&image).is_some(), "not mapped after stage");
    d.publish(&v.volume_id, "staging", "target", mount_cap("ext4"), false)
        .await;
    let first = b"written before the snapshot".repeat(1000);
    write_file(&d.path("target").join("data"), &first);
    d.unpublish(&v.volume_id, "target").await;

    // Snapshot while staged (the filesystem is synced), then overwrite.
    let s = snapshot(&d, &ceph, &unique_name("rbd-node-snap"), &v.volume_id).await;
    d.publish(&v.volume_id, "staging", "target", mount_cap("ext4"), false)
        .await;
    write_file(
        &d.path("target").join("data"),
        b"written after the snapshot",
    );
    d.unpublish(&v.volume_id, "target").await;
    d.unstage(&v.volume_id, "staging").await;
    assert_eq!(mapped(&image), None, "still mapped after unstage");

    // The restore holds what the snapshot saw.
    let r = ceph.copy_req(
        &unique_name("rbd-node-restore"),
        from_snapshot(&s.snapshot_id),
    );
    let restored = d.create_ok(r).await;
    ceph.stage(&d, &restored, "rstaging", mount_cap("ext4"))
        .await;
    let got = std::fs::read(d.path("rstaging").join("data")).unwrap();
    assert!(
        got == first,
        "the restore does not hold the snapshot's data"
    );
    d.unstage(&restored.volume_id, "rstaging").await;

    // Stage again, kill the plugin, restart it, unstage: unmapped.
    ceph.stage(&d, &v, "staging", mount_cap("ext4")).await;
    assert_eq!(
        std::fs::read(d.path("staging").join("data")).unwrap(),
        b"written after the snapshot"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(d.pid()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let (_, dir) = d.stop_and_keep_dir();
    let d = ceph.node_driver(dir).await;
    d.unstage(&v.volume_id, "staging").await;
    assert_eq!(
        mapped(&image),
        None,
        "still mapped after unstage by a restarted plugin"
    );

    // Raw block: the published path is the mapped device.
    ceph.stage(&d, &v, "bstaging", block_cap()).await;
    d.publish(&v.volume_id, "bstaging", "bdev", block_cap(), false)
        .await;
    let size = std::fs::File::open(d.path("bdev"))
        .unwrap()
        .seek(std::io::SeekFrom::End(0))
        .unwrap();
    assert_eq!(size, 64 * MIB as u64);
    d.unpublish(&v.volume_id, "bdev").await;
    d.unstage(&v.volume_id, "bstaging").await;

    let keys: Vec<_> = std::fs::read_dir(d.path("keys"))
        .map(|r| r.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(keys.is_empty(), "keyring files left behind: {keys:?}");
    assert!(!d.log().contains(&ceph.key), "the key reached the log");
    // Every rbd the driver ran: the key in no argv or environment, only in
    // a keyring file readable by its owner alone, gone afterwards.
    let argv = std::fs::read_to_string(d.path("rbd-argv.log")).unwrap();
    assert!(argv.contains("argv: map "), "no rbd map recorded:\n{argv}");
    assert!(
        !argv.contains(&ceph.key),
        "the key reached an rbd argv or environment"
    );
    let keyrings: Vec<&str> = argv
        .lines()
        .filter_map(|l| l.strip_prefix("keyring: "))
        .collect();
    assert!(
        !keyrings.is_empty(),
        "rbd map ran without a keyring file:\n{argv}"
    );
    for k in keyrings {
        let (mode, path) = k.split_once(' ').unwrap();
        assert_eq!(mode, "600", "keyring {path} mode");
        assert!(!Path::new(path).exists(), "keyring {path} left behind");
    }
    delete_volume(&d, &ceph, &restored.volume_id).await;
    delete_snapshot(&d, &ceph, &s.snapshot_id).await;
    delete_volume(&d, &ceph, &v.volume_id).await;
}

/// DeleteVolume racing NodeStageVolume of the same volume (a real krbd
/// map, then mkfs and mount or a raw block device), five rounds with a
/// random stagger: after each, the volume is either fully gone (and not
/// mapped) or exactly as it was (one object, still usable once unstaged).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_delete_racing_stage_is_all_or_nothing() {
    let Some(ceph) = ceph() else { return };
    if !node_enabled() {
        return;
    }
    let d = ceph.node_driver(new_temp_dir()).await;
    // The controller in a process of its own, as deployed: one process
    // serialises calls on the same volume, which would hide the race.
    let c = ceph.driver(&[]).await;
    let (mut gone, mut kept) = (0, 0);
    for round in 0..5 {
        let block = round % 2 == 1;
        let cap = if block {
            block_cap()
        } else {
            mount_cap("ext4")
        };
        let v = d
            .create_ok(ceph.create_req(&unique_name("rbd-nrace"), 64 * MIB))
            .await;
        let image = image_of(&v.volume_id);
        let staging = format!("staging{round}");
        std::fs::create_dir_all(d.path(&staging)).unwrap();
        let stage = {
            let mut node = d.node();
            let req = csi::NodeStageVolumeRequest {
                volume_id: v.volume_id.clone(),
                staging_target_path: d.path_str(&staging),
                volume_capability: Some(cap),
                secrets: ceph.secrets(),
                volume_context: v.volume_context.clone(),
                ..Default::default()
            };
            async move { node.node_stage_volume(req).await }
        };
        let delete = {
            let mut ctl = c.controller();
            let req = csi::DeleteVolumeRequest {
                volume_id: v.volume_id.clone(),
                secrets: ceph.secrets(),
            };
            let wait = Duration::from_millis(jitter(3000));
            async move {
                tokio::time::sleep(wait).await;
                ctl.delete_volume(req).await
            }
        };
        let (staged, deleted) = tokio::join!(stage, delete);
        let objects = backend_objects(&ceph, &image);
        println!(
            "round {round} ({}): stage {:?}, delete {:?}, objects {objects}, mapped {:?}",
            if block { "block" } else { "fs" },
            staged.as_ref().map(|_| ()).map_err(|e| e.code()),
            deleted.as_ref().map(|_| ()).map_err(|e| e.code()),
            mapped(&image)
        );
        match deleted {
            Ok(_) => {
                assert_eq!(objects, 0, "round {round}: deleted, yet {objects} objects");
                assert!(
                    staged.is_err(),
                    "round {round}: staged a volume that was deleted"
                );
                assert_eq!(mapped(&image), None, "round {round}: mapped after delete");
                gone += 1;
            }
            Err(e) => {
                assert_eq!(e.code(), Code::FailedPrecondition, "round {round}: {e:?}");
                assert_eq!(objects, 1, "round {round}: kept with {objects} objects");
                d.unstage(&v.volume_id, &staging).await;
                delete_volume(&c, &ceph, &v.volume_id).await;
                assert_eq!(backend_objects(&ceph, &image), 0, "round {round}");
                kept += 1;
            }
        }
    }
    println!("delete vs stage: {gone} gone, {kept} kept");
}

// ---------------------------------------------------------------------------
// Which process loads librbd: the controller only. Needs no cluster (neither
// mode connects before a request).
// ---------------------------------------------------------------------------

/// The Ceph libraries mapped into `pid` (from /proc/<pid>/maps).
fn ceph_libraries(pid: i32) -> Vec<String> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("maps");
    let mut libs: Vec<String> = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .filter(|p| {
            ["librbd", "librados", "libceph-common"]
                .iter()
                .any(|n| p.contains(n))
        })
        .map(str::to_string)
        .collect();
    libs.sort();
    libs.dedup();
    libs
}

/// Resident KiB of the main thread's stack (`[stack]` in smaps).
fn main_stack_kib(pid: i32) -> u64 {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).expect("smaps");
    let mut lines = smaps.lines().skip_while(|l| !l.ends_with("[stack]"));
    lines
        .find_map(|l| l.strip_prefix("Rss:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("[stack] Rss in smaps")
}

async fn rbd_driver_without_cluster(mode: &str) -> Driver {
    let dir = new_temp_dir();
    let config = dir.path().join("rbd-config.json");
    let json = serde_json::json!([{
        "clusterID": CLUSTER, "monitors": ["127.0.0.1:1"], "pools": ["rbd"],
    }]);
    std::fs::write(&config, json.to_string()).unwrap();
    Driver::builder()
        .mode(mode)
        .class_args(Vec::<String>::new())
        .args(["--driver", "rbd"])
        .args(["--rbd-config", config.to_str().unwrap()])
        .start_in(dir)
        .await
}

#[tokio::test]
async fn only_the_controller_maps_librbd() {
    let node = rbd_driver_without_cluster("node").await;
    assert_eq!(
        ceph_libraries(node.pid()),
        Vec::<String>::new(),
        "node plugin"
    );
    drop(node);
    let controller = rbd_driver_without_cluster("controller").await;
    let libs = ceph_libraries(controller.pid());
    for lib in ["librbd.so", "librados.so", "libceph-common.so"] {
        assert!(
            libs.iter().any(|l| l.contains(lib)),
            "controller lacks {lib}: {libs:?}"
        );
    }
    // libceph-common's initialisers use about 1 MiB of the loading
    // thread's stack: a thread of its own loads it, so the main thread's
    // stack does not keep that resident.
    let stack = main_stack_kib(controller.pid());
    assert!(stack < 900, "the main thread's stack holds {stack} KiB");
}

/// A node plugin process of its own (`--mode node`) maps 20 volumes: it
/// never loads a Ceph library, and its memory is printed (run with
/// `--nocapture`; LODESTONE_TEST_NODE_BIN picks the binary, e.g. the
/// release build, default: this build's).
#[tokio::test]
async fn node_plugin_maps_20_volumes_without_ceph_libraries() {
    let Some(ceph) = ceph() else { return };
    if !node_enabled() {
        return;
    }
    let controller = ceph.driver(&[]).await;
    let dir = new_temp_dir();
    let (config, _) = ceph.write_config(dir.path(), &[&ceph.pool]);
    let socket = dir.path().join("node.sock");
    let bin = std::env::var("LODESTONE_TEST_NODE_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_lodestone").to_string());
    let mut node = Command::new(&bin)
        .args(["--driver", "rbd", "--mode", "node", "--node-id", "rss"])
        .arg("--endpoint")
        .arg(format!("unix://{}", socket.display()))
        .arg("--rbd-config")
        .arg(&config)
        .env("RUST_LOG", "warn")
        .spawn()
        .expect("spawn the node plugin");
    let pid = node.id() as i32;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !socket.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the node plugin did not come up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut client = lodestone::csi::node_client::NodeClient::new(
        connect_unix(&socket)
            .await
            .expect("connect to the node plugin"),
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    eprintln!("node plugin {bin}: idle: {}", process_memory(pid));
    let mut volumes = Vec::new();
    for i in 0..20 {
        let v = controller
            .create_ok(ceph.create_req(&unique_name(&format!("rbd-rss-{i}")), 16 * MIB))
            .await;
        let staging = dir.path().join(format!("staging-{i}"));
        std::fs::create_dir_all(&staging).unwrap();
        let r = client
            .node_stage_volume(csi::NodeStageVolumeRequest {
                volume_id: v.volume_id.clone(),
                staging_target_path: staging.to_str().unwrap().to_string(),
                volume_capability: Some(block_cap()),
                secrets: ceph.secrets(),
                volume_context: v.volume_context.clone(),
                ..Default::default()
            })
            .await;
        expect_ok(r, &format!("NodeStageVolume({})", v.volume_id));
        volumes.push((v, staging));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    eprintln!(
        "node plugin {bin}: 20 volumes mapped: {}",
        process_memory(pid)
    );
    assert_eq!(ceph_libraries(pid), Vec::<String>::new(), "node plugin");
    for (v, staging) in &volumes {
        let r = client
            .node_unstage_volume(csi::NodeUnstageVolumeRequest {
                volume_id: v.volume_id.clone(),
                staging_target_path: staging.to_str().unwrap().to_string(),
            })
            .await;
        expect_ok(r, &format!("NodeUnstageVolume({})", v.volume_id));
        delete_volume(&controller, &ceph, &v.volume_id).await;
    }
    let _ = node.kill();
    let _ = node.wait();
}

/// The ranges of an RBD block-map listing, all messages together (each
/// VARIABLE_LENGTH).
async fn block_map(
    d: &Driver,
    ceph: &Ceph,
    query: BlockQuery<'_>,
) -> Result<Vec<(u64, u64)>, tonic::Status> {
    use lodestone::csi::snapshot_metadata_client::SnapshotMetadataClient;
    let mut client = SnapshotMetadataClient::new(d.channel());
    let secrets = ceph.secrets();
    let pages = block_pages(&mut client, query, 0, 0, secrets).await?;
    let kind = csi::BlockMetadataType::VariableLength as i32;
    assert!(pages.iter().all(|p| p.block_metadata_type == kind));
    Ok(pages
        .into_iter()
        .flat_map(|p| p.ranges)
        .map(|(o, l)| (o as u64, l as u64))
        .collect())
}

/// Adjacent ranges merged.
fn merged(mut ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    ranges.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (o, l) in ranges {
        match out.last_mut() {
            Some(last) if last.0 + last.1 >= o => last.1 = last.1.max(o + l - last.0),
            _ => out.push((o, l)),
        }
    }
    out
}

/// GetMetadataAllocated of an RBD snapshot lists exactly what the volume
/// held when it was taken (librbd's diff of the snapshot image, its parent
/// included): 1 MiB written from the start before, 4 MiB after, the map is
/// the first MiB, and `rbd diff` of the snapshot image agrees. (librbd
/// reports a new object's extent from the object's start: a map is exact
/// for sequential writes like these, and object-granular for sparse ones.)
/// A delta between two RBD snapshots (computed by comparing them) holds
/// what changed, and A's bytes plus the delta rebuild B exactly; snapshots
/// of two volumes are INVALID_ARGUMENT, unknown ids NOT_FOUND.
#[tokio::test]
async fn block_maps_of_rbd_snapshots() {
    let Some(ceph) = ceph() else { return };
    let d = ceph.driver(&[]).await;
    let v = d
        .create_ok(ceph.create_req(&unique_name("rbd-cbt"), 32 * MIB))
        .await;
    let spec = format!("{}/{}", ceph.pool, image_of(&v.volume_id));
    let write = |total: &str| {
        ceph.rbd(&[
            "bench",
            "--io-type",
            "write",
            "--io-size",
            "65536",
            "--io-threads",
            "1",
            "--io-total",
            total,
            "--io-pattern",
            "seq",
            &spec,
        ]);
    };
    write("1M");
    let s = snapshot(&d, &ceph, &unique_name("rbd-cbt-a"), &v.volume_id).await;
    write("4M");
    let s2 = snapshot(&d, &ceph, &unique_name("rbd-cbt-b"), &v.volume_id).await;

    let map = block_map(&d, &ceph, BlockQuery::Allocated(&s.snapshot_id))
        .await
        .unwrap();
    assert_eq!(map, vec![(0, MIB as u64)], "allocated(A)");
    assert_eq!(
        block_map(&d, &ceph, BlockQuery::Allocated(&s2.snapshot_id))
            .await
            .unwrap(),
        vec![(0, 4 * MIB as u64)],
        "allocated(B)"
    );
    #[derive(serde::Deserialize)]
    struct Diff {
        offset: u64,
        length: u64,
    }
    let cli = ceph.rbd(&[
        "diff",
        "--format",
        "json",
        &format!("{}/{}@csi", ceph.pool, image_of(&s.snapshot_id)),
    ]);
    let cli: Vec<Diff> = serde_json::from_str(&cli).expect("rbd diff json");
    assert_eq!(
        merged(cli.iter().map(|d| (d.offset, d.length)).collect()),
        map,
        "rbd diff of the snapshot image"
    );

    // The delta: every chunk the second write reached beyond the first
    // (the first MiB was written again, with data that may or may not
    // differ), and nothing past it.
    let query = BlockQuery::Delta {
        base: &s.snapshot_id,
        target: &s2.snapshot_id,
    };
    let delta = block_map(&d, &ceph, query).await.unwrap();
    let mib = MIB as u64;
    eprintln!("delta(A, B): {delta:?}");
    assert!(
        delta.iter().any(|&(o, l)| o <= mib && 4 * mib <= o + l),
        "delta {delta:?}"
    );
    assert!(
        delta.iter().all(|&(o, l)| o + l <= 4 * mib),
        "delta {delta:?}"
    );
    // Resumed inside the delta, one range per message: from there on.
    let mut client =
        lodestone::csi::snapshot_metadata_client::SnapshotMetadataClient::new(d.channel());
    let pages = block_pages(&mut client, query, 2 * MIB + 1000, 1, ceph.secrets())
        .await
        .unwrap();
    let resumed: Vec<(i64, i64)> = pages.into_iter().flat_map(|p| p.ranges).collect();
    let last = delta.last().unwrap();
    assert_eq!(
        resumed.last(),
        Some(&(2 * MIB, (last.0 + last.1) as i64 - 2 * MIB)),
        "resumed at 2 MiB + 1000: {resumed:?}"
    );
    // A backup tool rebuilds B from A's bytes and the delta: identical.
    let export = |id: &str| {
        let at = format!("{}/{}@csi", ceph.pool, image_of(id));
        ceph.admin("rbd", &["export", "--no-progress", &at, "-"])
    };
    let (a, b) = (export(&s.snapshot_id), export(&s2.snapshot_id));
    let mut rebuilt = a.clone();
    rebuilt.resize(b.len(), 0);
    for &(o, l) in &delta {
        let r = o as usize..(o + l) as usize;
        rebuilt[r.clone()].copy_from_slice(&b[r]);
    }
    assert!(rebuilt == b, "A plus the delta is not B");
    // Snapshots of two volumes: INVALID_ARGUMENT.
    let other = d
        .create_ok(ceph.create_req(&unique_name("rbd-cbt-o"), 32 * MIB))
        .await;
    let s3 = snapshot(&d, &ceph, &unique_name("rbd-cbt-c"), &other.volume_id).await;
    let query = BlockQuery::Delta {
        base: &s.snapshot_id,
        target: &s3.snapshot_id,
    };
    assert_eq!(
        block_map(&d, &ceph, query).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    delete_snapshot(&d, &ceph, &s3.snapshot_id).await;
    delete_volume(&d, &ceph, &other.volume_id).await;
    let (head, last) = s.snapshot_id.split_at(s.snapshot_id.len() - 1);
    let gone = format!("{head}{}", if last == "0" { "1" } else { "0" });
    assert_eq!(
        block_map(&d, &ceph, BlockQuery::Allocated(&gone))
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );

    delete_snapshot(&d, &ceph, &s.snapshot_id).await;
    delete_snapshot(&d, &ceph, &s2.snapshot_id).await;
    delete_volume(&d, &ceph, &v.volume_id).await;
}
