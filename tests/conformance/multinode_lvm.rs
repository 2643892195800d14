//! One central controller and two node agents, on real LVM in the guest:
//! node-a owns VGs `lodestone-thin` (pool0) and `lodestone-thick`, node-b
//! owns `lodestone-node2` (pool0 and thick space). The agents listen on
//! 127.0.0.1 and 127.0.0.2 with their own certificates; the controller
//! reaches them over mutual TLS.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::time::{Duration, Instant};

use lodestone::csi;
use lodestone::csi::volume_content_source::{SnapshotSource, Type as SourceType};
use lodestone::lvm::ids::{self, Kind, LvmKind};
use tonic::Code;

use crate::common::cluster::{
    start_controller, start_controller_armed, start_controller_with, NodeAgent, Relay,
};
use crate::common::pki::Ca;
use crate::common::*;

const A: &str = "node-a";
const B: &str = "node-b";
const DATA: usize = 4 << 20;

fn b_class_args() -> Vec<String> {
    vec![
        "--device-class".into(),
        format!("{THIN}={NODE2_VG}/pool0"),
        "--device-class".into(),
        format!("{THICK}={NODE2_VG}"),
    ]
}

struct Cluster {
    _dir: tempfile::TempDir,
    ca: Ca,
    ctl: Driver,
    a: NodeAgent,
    b: NodeAgent,
}

async fn cluster() -> Cluster {
    let dir = new_temp_dir();
    let ca = Ca::new(dir.path(), "cluster");
    let a = NodeAgent::start(&ca, A, "127.0.0.1", &default_class_args()).await;
    let b = NodeAgent::start(&ca, B, "127.0.0.2", &b_class_args()).await;
    let ctl = start_controller(&ca, &[&a, &b], &default_class_args()).await;
    Cluster {
        _dir: dir,
        ca,
        ctl,
        a,
        b,
    }
}

/// What the external provisioner sends with strict topology off: every
/// node in requisite, the scheduler's pick first in preferred.
fn requirement(requisite: &[&str], preferred: &[&str]) -> Option<csi::TopologyRequirement> {
    Some(csi::TopologyRequirement {
        requisite: requisite.iter().map(|n| node_topology(n)).collect(),
        preferred: preferred.iter().map(|n| node_topology(n)).collect(),
    })
}

fn req(
    name: &str,
    class: &str,
    size: i64,
    topo: Option<csi::TopologyRequirement>,
) -> csi::CreateVolumeRequest {
    let mut r = create_req(name, class, block_cap(), size, 0);
    r.accessibility_requirements = topo;
    r
}

fn pattern(seed: u8) -> Vec<u8> {
    (0..DATA)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[i % 4] ^ seed)
        .collect()
}

/// Stages and publishes a block volume on `node`, runs `f` on its device.
async fn with_device(node: &Driver, volume_id: &str, f: impl FnOnce(&mut File)) {
    node.stage(volume_id, "staging", block_cap()).await;
    node.publish(volume_id, "staging", "dev", block_cap(), false)
        .await;
    {
        let mut dev = File::options()
            .read(true)
            .write(true)
            .open(node.path("dev"))
            .expect("open the published device");
        f(&mut dev);
    }
    node.unpublish(volume_id, "dev").await;
    node.unstage(volume_id, "staging").await;
}

async fn capacity(ctl: &Driver, class: &str, node: &str) -> i64 {
    let r = ctl
        .controller()
        .get_capacity(csi::GetCapacityRequest {
            volume_capabilities: vec![],
            parameters: class_params(class),
            accessible_topology: Some(node_topology(node)),
        })
        .await;
    expect_ok(r, &format!("GetCapacity({class}, {node})")).available_capacity
}

fn lvs_with_key(key: &str) -> Vec<Lv> {
    list_lvs()
        .into_iter()
        .filter(|l| l.name.ends_with(key))
        .collect()
}

/// Placement by the orchestrator's preferred order, data gravity for a
/// restore (even against the preferred node), a restore and a clone copied
/// to the other node when the source's node is excluded, a fallback when the preferred node has no
/// room, and GetCapacity per node exact right after each mutation.
#[tokio::test]
async fn placement_and_data_gravity_across_two_nodes() {
    if skip_without_lvm() {
        return;
    }
    let c = cluster().await;
    let both = [A, B];

    // A volume without a source goes to the first preferred node that fits.
    let v = c
        .ctl
        .create_ok(req(
            &unique_name("mn-src"),
            THIN,
            64 * MIB,
            requirement(&both, &[B, A]),
        ))
        .await;
    assert_eq!(volume_nodes(&v), vec![B.to_string()], "{v:?}");
    assert!(
        c.ctl.log().contains("rule=\"preferred-topology\"")
            || c.ctl.log().contains("rule=preferred-topology")
    );
    let data = pattern(7);
    with_device(&c.b.driver, &v.volume_id, |dev| {
        dev.write_all(&data).unwrap();
        dev.sync_all().unwrap();
    })
    .await;

    let snap = expect_ok(
        c.ctl
            .controller()
            .create_snapshot(csi::CreateSnapshotRequest {
                name: unique_name("mn-snap"),
                source_volume_id: v.volume_id.clone(),
                ..Default::default()
            })
            .await,
        "CreateSnapshot",
    )
    .snapshot
    .expect("snapshot");
    assert!(snap.snapshot_id.contains(":node-b:"), "{snap:?}");
    let source = csi::VolumeContentSource {
        r#type: Some(SourceType::Snapshot(SnapshotSource {
            snapshot_id: snap.snapshot_id.clone(),
        })),
    };

    // The scheduler preferred node-a; the data is on node-b, which the
    // requisite allows: the restore goes to node-b.
    let mut r = req(
        &unique_name("mn-restore"),
        THIN,
        0,
        requirement(&both, &[A, B]),
    );
    r.volume_content_source = Some(source.clone());
    let restored = c.ctl.create_ok(r).await;
    assert_eq!(volume_nodes(&restored), vec![B.to_string()], "{restored:?}");
    assert!(c.ctl.log().contains("source-locality"));
    with_device(&c.b.driver, &restored.volume_id, |dev| {
        let mut got = vec![0u8; DATA];
        dev.seek(SeekFrom::Start(0)).unwrap();
        dev.read_exact(&mut got).unwrap();
        assert!(
            got == data,
            "the restore on node-b does not hold the snapshot's data"
        );
    })
    .await;

    // A requisite without node-b: the snapshot's data is copied to node-a.
    let mut r = req(
        &unique_name("mn-excluded"),
        THIN,
        0,
        requirement(&[A], &[A]),
    );
    r.volume_content_source = Some(source);
    let moved = create_until_ok(&c.ctl, r).await;
    assert_eq!(volume_nodes(&moved), vec![A.to_string()], "{moved:?}");
    assert!(c.ctl.log().contains("cross-node-preferred"));
    assert_eq!(
        moved
            .content_source
            .as_ref()
            .and_then(|s| s.r#type.as_ref()),
        Some(&SourceType::Snapshot(SnapshotSource {
            snapshot_id: snap.snapshot_id.clone(),
        })),
        "a moved restore still names its snapshot"
    );
    with_device(&c.a.driver, &moved.volume_id, |dev| {
        let mut got = vec![0u8; DATA];
        dev.read_exact(&mut got).unwrap();
        assert!(got == data, "the restore on node-a does not hold the data");
    })
    .await;
    c.ctl.delete(&moved.volume_id).await;

    // A clone whose requisite excludes node-b: the source volume's point in
    // time (a hidden snapshot on node-b) is copied to node-a.
    let mut r = req(
        &unique_name("mn-clone-moved"),
        THIN,
        0,
        requirement(&[A], &[A]),
    );
    r.volume_content_source = Some(clone_source(&v.volume_id));
    let cloned = create_until_ok(&c.ctl, r).await;
    assert_eq!(volume_nodes(&cloned), vec![A.to_string()], "{cloned:?}");
    assert_eq!(
        cloned.content_source,
        Some(clone_source(&v.volume_id)),
        "a moved clone still names its source volume"
    );
    with_device(&c.a.driver, &cloned.volume_id, |dev| {
        let mut got = vec![0u8; DATA];
        dev.read_exact(&mut got).unwrap();
        assert!(got == data, "the clone on node-a does not hold the data");
    })
    .await;
    c.ctl.delete(&cloned.volume_id).await;

    // GetCapacity of node-b's thick space is exact right after a create
    // and a delete (no refresh, no lag).
    let before = capacity(&c.ctl, THICK, B).await;
    let before_a = capacity(&c.ctl, THICK, A).await;
    let t = c
        .ctl
        .create_ok(req(
            &unique_name("mn-thick"),
            THICK,
            64 * MIB,
            requirement(&both, &[B]),
        ))
        .await;
    assert_eq!(volume_nodes(&t), vec![B.to_string()]);
    assert_eq!(capacity(&c.ctl, THICK, B).await, before - 64 * MIB);
    assert_eq!(capacity(&c.ctl, THICK, A).await, before_a);
    c.ctl.delete(&t.volume_id).await;
    assert_eq!(capacity(&c.ctl, THICK, B).await, before);

    // node-b cannot hold more than it has: the next preferred node that fits.
    let big = before + 64 * MIB;
    assert!(big < before_a, "node-a must be able to take {big} bytes");
    let t = c
        .ctl
        .create_ok(req(
            &unique_name("mn-big"),
            THICK,
            big,
            requirement(&both, &[B, A]),
        ))
        .await;
    assert_eq!(volume_nodes(&t), vec![A.to_string()]);
    c.ctl.delete(&t.volume_id).await;
    // Nowhere fits: RESOURCE_EXHAUSTED, so the provisioner reschedules.
    expect_code(
        c.ctl
            .controller()
            .create_volume(req(
                &unique_name("mn-huge"),
                THICK,
                64 * GIB,
                requirement(&both, &[B]),
            ))
            .await,
        Code::ResourceExhausted,
        "a volume no node can hold",
    );

    // ListVolumes sees both nodes' volumes.
    let listed: Vec<String> = c
        .ctl
        .list_all(0)
        .await
        .into_iter()
        .map(|v| v.volume_id)
        .collect();
    assert!(listed.contains(&v.volume_id) && listed.contains(&restored.volume_id));

    c.ctl.delete(&restored.volume_id).await;
    expect_ok(
        c.ctl
            .controller()
            .delete_snapshot(csi::DeleteSnapshotRequest {
                snapshot_id: snap.snapshot_id.clone(),
                ..Default::default()
            })
            .await,
        "DeleteSnapshot",
    );
    c.ctl.delete(&v.volume_id).await;
    let _ = (&c.a, &c.b);
}

/// node-b's agent is killed while it creates a volume. While it is down, a
/// retry is UNAVAILABLE (the first attempt may sit there) instead of
/// creating a second copy on node-a; requests that do not involve node-b
/// still work. After the agent is back, the retry succeeds on node-b and
/// exactly one LV exists for the request.
#[tokio::test]
async fn agent_killed_mid_create_leaves_one_volume() {
    if skip_without_lvm() {
        return;
    }
    let c = cluster().await;
    let name = unique_name("mn-kill");
    let request = req(&name, THICK, 128 * MIB, requirement(&[A, B], &[B, A]));

    let mut client = c.ctl.controller();
    let first = tokio::spawn({
        let request = request.clone();
        async move { client.create_volume(request).await }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    while !c.b.driver.log().contains("agent: create") {
        assert!(
            Instant::now() < deadline,
            "node-b's agent never got the create"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    c.b.kill();
    let first = first.await.unwrap();
    eprintln!(
        "first attempt, agent killed mid-call: {:?}",
        first.as_ref().map(|_| ())
    );

    // node-b is down: the retry waits for it.
    let e = expect_code(
        c.ctl.controller().create_volume(request.clone()).await,
        Code::Unavailable,
        "retry while node-b is down",
    );
    assert!(e.message().contains(B), "{}", e.message());
    // A request that never touched node-b still works.
    let other = c
        .ctl
        .create_ok(req(
            &unique_name("mn-other"),
            THIN,
            8 * MIB,
            requirement(&[A, B], &[A]),
        ))
        .await;
    assert_eq!(volume_nodes(&other), vec![A.to_string()]);
    c.ctl.delete(&other.volume_id).await;

    let b = c.b.restart().await;
    let deadline = Instant::now() + Duration::from_secs(120);
    let v = loop {
        match c.ctl.controller().create_volume(request.clone()).await {
            Ok(r) => break r.into_inner().volume.expect("volume"),
            Err(e)
                if Instant::now() < deadline
                    && matches!(
                        e.code(),
                        Code::Unavailable | Code::Aborted | Code::DeadlineExceeded
                    ) =>
            {
                tokio::time::sleep(Duration::from_millis(500)).await
            }
            Err(e) => panic!(
                "retry after node-b is back: {:?}: {}",
                e.code(),
                e.message()
            ),
        }
    };
    c.ctl.track(&v.volume_id);
    assert_eq!(volume_nodes(&v), vec![B.to_string()], "{v:?}");
    let key = v.volume_id.rsplit(':').next().unwrap().to_string();
    let copies = lvs_with_key(&key);
    assert_eq!(copies.len(), 1, "LVs for one request: {copies:#?}");
    assert_eq!(copies[0].vg, NODE2_VG);

    c.ctl.delete(&v.volume_id).await;
    assert!(
        lvs_with_key(&key).is_empty(),
        "left behind: {:#?}",
        lvs_with_key(&key)
    );
    drop(b);
}

/// CreateVolume again while it answers "in progress" (ABORTED) or a node
/// is away (UNAVAILABLE), for up to five minutes.
async fn create_until_ok(ctl: &Driver, request: csi::CreateVolumeRequest) -> csi::Volume {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        match create_once(ctl, &request).await {
            Ok(r) => {
                let v = r.into_inner().volume.expect("volume");
                ctl.track(&v.volume_id);
                return v;
            }
            Err(e)
                if Instant::now() < deadline
                    && matches!(e.code(), Code::Aborted | Code::Unavailable) =>
            {
                tokio::time::sleep(Duration::from_millis(500)).await
            }
            Err(e) => panic!(
                "CreateVolume {}: {:?}: {}",
                request.name,
                e.code(),
                e.message()
            ),
        }
    }
}

/// One CreateVolume, which must answer within a minute (the controller
/// waits on an agent for at most its --agent-timeout-seconds).
async fn create_once(
    ctl: &Driver,
    request: &csi::CreateVolumeRequest,
) -> Result<tonic::Response<csi::CreateVolumeResponse>, tonic::Status> {
    tokio::time::timeout(
        Duration::from_secs(60),
        ctl.controller().create_volume(request.clone()),
    )
    .await
    .unwrap_or_else(|_| panic!("CreateVolume {} did not answer within 60 s", request.name))
}

/// Every volume and snapshot the controller answers for, by id.
async fn inventory_of(ctl: &Driver) -> (Vec<String>, Vec<String>) {
    let mut volumes: Vec<String> = ctl
        .list_all(0)
        .await
        .into_iter()
        .map(|v| v.volume_id)
        .collect();
    volumes.sort();
    let r = ctl
        .controller()
        .list_snapshots(csi::ListSnapshotsRequest::default())
        .await;
    let mut snapshots: Vec<String> = expect_ok(r, "ListSnapshots")
        .entries
        .into_iter()
        .filter_map(|e| e.snapshot.map(|s| s.snapshot_id))
        .collect();
    snapshots.sort();
    (volumes, snapshots)
}

fn snapshot_req(name: &str, source: &str) -> csi::CreateSnapshotRequest {
    csi::CreateSnapshotRequest {
        source_volume_id: source.to_string(),
        name: name.to_string(),
        ..Default::default()
    }
}

/// The controller keeps no state of its own: killed and started again, it
/// rebuilds its index from the agents' streams and answers for every
/// volume and snapshot as before. A retried CreateVolume finds its volume
/// (no second copy), and a delete after the restart removes the LV.
#[tokio::test]
async fn a_restarted_controller_finds_every_volume_again() {
    if skip_without_lvm() {
        return;
    }
    let mut c = cluster().await;
    let on_a = req(
        &unique_name("mn-ra"),
        THIN,
        8 * MIB,
        requirement(&[A], &[A]),
    );
    let on_b = req(
        &unique_name("mn-rb"),
        THICK,
        8 * MIB,
        requirement(&[B], &[B]),
    );
    let va = c.ctl.create_ok(on_a.clone()).await;
    let vb = c.ctl.create_ok(on_b.clone()).await;
    let snap = expect_ok(
        c.ctl
            .controller()
            .create_snapshot(snapshot_req(&unique_name("mn-rs"), &va.volume_id))
            .await,
        "CreateSnapshot",
    )
    .snapshot
    .expect("snapshot");
    let before = inventory_of(&c.ctl).await;
    assert!(before.0.contains(&va.volume_id) && before.0.contains(&vb.volume_id));
    assert!(before.1.contains(&snap.snapshot_id));

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(c.ctl.pid()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let started = Instant::now();
    c.ctl = start_controller(&c.ca, &[&c.a, &c.b], &default_class_args()).await;
    eprintln!("controller serving again after {:?}", started.elapsed());

    assert_eq!(
        inventory_of(&c.ctl).await,
        before,
        "what the restarted controller knows"
    );
    for v in [&va, &vb] {
        let r = c
            .ctl
            .controller()
            .controller_get_volume(csi::ControllerGetVolumeRequest {
                volume_id: v.volume_id.clone(),
            })
            .await;
        expect_ok(r, "ControllerGetVolume after the restart");
    }
    // Retries find what the first attempts made.
    assert_eq!(c.ctl.create_ok(on_a).await.volume_id, va.volume_id);
    assert_eq!(c.ctl.create_ok(on_b).await.volume_id, vb.volume_id);
    let key = |id: &str| id.rsplit(':').next().unwrap().to_string();
    assert_eq!(lvs_with_key(&key(&va.volume_id)).len(), 1);

    let r = c
        .ctl
        .controller()
        .delete_snapshot(csi::DeleteSnapshotRequest {
            snapshot_id: snap.snapshot_id.clone(),
            ..Default::default()
        })
        .await;
    expect_ok(r, "DeleteSnapshot after the restart");
    c.ctl.delete(&va.volume_id).await;
    c.ctl.delete(&vb.volume_id).await;
    for id in [&va.volume_id, &vb.volume_id, &snap.snapshot_id] {
        assert!(lvs_with_key(&key(id)).is_empty(), "{id} left behind");
    }
}

/// A network cut between the controller and node-b: while it lasts, node-b
/// is down (requests that need it are UNAVAILABLE and name it; others go
/// on, and placement skips it); a change made on node-b meanwhile (an LV
/// removed by hand, which the agent's own refresh notices) reaches the
/// controller when the link is back, through the same stream resumed from
/// where it stopped, not a second full inventory.
#[tokio::test]
async fn a_cut_stream_resumes_and_misses_nothing() {
    if skip_without_lvm() {
        return;
    }
    let dir = new_temp_dir();
    let ca = Ca::new(dir.path(), "cluster");
    let a = NodeAgent::start(&ca, A, "127.0.0.1", &default_class_args()).await;
    let mut b_args = b_class_args();
    b_args.extend(["--lvm-refresh-seconds".to_string(), "2".to_string()]);
    let b = NodeAgent::start(&ca, B, "127.0.0.2", &b_args).await;
    let relay = Relay::start("127.0.0.3", &b.address).await;
    let ctl = start_controller_with(
        &ca,
        &[a.agent_flag(), format!("{B}={}", relay.address)],
        &default_class_args(),
        &["--agent-heartbeat-ms", "300"],
    )
    .await;

    let on_b = |name: &str| req(&unique_name(name), THIN, 8 * MIB, requirement(&[B], &[B]));
    let keep = ctl.create_ok(on_b("mn-keep")).await;
    let lost = ctl.create_ok(on_b("mn-lost")).await;
    let grow_keep = || csi::ControllerExpandVolumeRequest {
        volume_id: keep.volume_id.clone(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: 16 * MIB,
            limit_bytes: 0,
        }),
        ..Default::default()
    };
    let received = |ctl: &Driver, how: &str| {
        ctl.log()
            .lines()
            .filter(|l| l.contains("node inventory received") && l.contains(B))
            .filter(|l| l.contains(&format!("how=\"{how}\"")))
            .count()
    };
    let fulls = |ctl: &Driver| received(ctl, "full");
    assert_eq!(fulls(&ctl), 1);

    relay.cut();
    // Silent past three heartbeats: down.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let e = expect_code(
        ctl.controller().controller_expand_volume(grow_keep()).await,
        Code::Unavailable,
        "expanding a volume of node-b while it is cut off",
    );
    assert!(e.message().contains(B), "{}", e.message());
    let started = Instant::now();
    let other = ctl
        .create_ok(req(
            &unique_name("mn-side"),
            THIN,
            8 * MIB,
            requirement(&[A, B], &[B, A]),
        ))
        .await;
    assert_eq!(
        volume_nodes(&other),
        vec![A.to_string()],
        "placed on the node cut off"
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    ctl.delete(&other.volume_id).await;

    // Behind everyone's back, while the link is down.
    let lost_lv = lost.volume_id.rsplit(':').next().unwrap().to_string();
    let lv = lvs_with_key(&lost_lv).pop().expect("the LV of mn-lost");
    let out = std::process::Command::new("lvm")
        .args(["lvremove", "--yes", &format!("{}/{}", lv.vg, lv.name)])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    tokio::time::sleep(Duration::from_secs(4)).await;

    relay.mend();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (volumes, _) = inventory_of(&ctl).await;
        if !volumes.contains(&lost.volume_id) {
            assert!(volumes.contains(&keep.volume_id));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the removal never reached the controller"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(
        fulls(&ctl),
        1,
        "the stream was not resumed: a second full inventory came"
    );
    // node-b takes requests again.
    let r = ctl.controller().controller_expand_volume(grow_keep()).await;
    expect_ok(r, "expand after the link is back");
    ctl.delete(&keep.volume_id).await;
    ctl.delete(&lost.volume_id).await;
    drop((a, b));
}

fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS")
}

/// What every node runs (the CSI node plugin and the LVM agent, one
/// process) stays small with 20 volumes staged: its memory idle and then
/// is printed (`--nocapture`; `LODESTONE_TEST_NODE_BIN` names a release
/// binary to measure), and staging 20 volumes may not grow it by more
/// than 4 MiB.
#[tokio::test]
async fn a_node_process_stays_small_with_20_volumes_staged() {
    if skip_without_lvm() {
        return;
    }
    let c = cluster().await;
    let pid = c.a.driver.pid();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle = rss_kib(pid);
    eprintln!("node process, idle: {}", process_memory(pid));
    let mut volumes = Vec::new();
    for i in 0..20 {
        let v = c
            .ctl
            .create_ok(req(
                &unique_name(&format!("mn-rss{i}")),
                THIN,
                8 * MIB,
                requirement(&[A], &[A]),
            ))
            .await;
        let staging = format!("staging-{i}");
        c.a.driver.stage(&v.volume_id, &staging, block_cap()).await;
        volumes.push((v.volume_id, staging));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let staged = rss_kib(pid);
    eprintln!("node process, 20 volumes staged: {}", process_memory(pid));
    for (id, staging) in &volumes {
        c.a.driver.unstage(id, staging).await;
        c.ctl.delete(id).await;
    }
    assert!(
        staged <= idle + 4096,
        "staging 20 volumes grew the node process from {idle} to {staged} KiB"
    );
}

/// Ranges of a block-map listing, all messages together.
async fn block_map(
    ctl: &Driver,
    base: Option<&str>,
    target: &str,
) -> Result<Vec<(i64, i64)>, tonic::Status> {
    use lodestone::client::{block_pages, BlockQuery};
    use lodestone::csi::snapshot_metadata_client::SnapshotMetadataClient;
    let query = match base {
        None => BlockQuery::Allocated(target),
        Some(base) => BlockQuery::Delta { base, target },
    };
    let mut client = SnapshotMetadataClient::new(ctl.channel());
    let pages = block_pages(&mut client, query, 0, 0, Default::default()).await?;
    Ok(pages.into_iter().flat_map(|p| p.ranges).collect())
}

/// The SnapshotMetadata service of the central controller answers from the
/// snapshot's node, through its agent over mutual TLS: node-b's thin
/// snapshots' allocated chunks and their delta are exactly what was
/// written (64 KiB pool chunks).
#[tokio::test]
async fn block_maps_come_from_the_snapshots_node() {
    if skip_without_lvm() {
        return;
    }
    let c = cluster().await;
    let v = c
        .ctl
        .create_ok(req(
            &unique_name("mn-cbt"),
            THIN,
            32 * MIB,
            requirement(&[B], &[B]),
        ))
        .await;
    assert_eq!(volume_nodes(&v), vec![B.to_string()], "{v:?}");
    let write = |at: u64, len: usize, seed: u8| {
        move |dev: &mut File| {
            dev.seek(SeekFrom::Start(at)).unwrap();
            dev.write_all(&pattern(seed)[..len]).unwrap();
            dev.sync_all().unwrap();
        }
    };
    with_device(&c.b.driver, &v.volume_id, write(1 << 20, 4096, 1)).await;
    let snap = |name: &str| {
        let ctl = &c.ctl;
        let req = snapshot_req(&unique_name(name), &v.volume_id);
        async move {
            expect_ok(
                ctl.controller().create_snapshot(req).await,
                "CreateSnapshot",
            )
            .snapshot
            .expect("snapshot")
            .snapshot_id
        }
    };
    let first = snap("mn-cbt-a").await;
    with_device(&c.b.driver, &v.volume_id, write(5 << 20, 200 << 10, 2)).await;
    let second = snap("mn-cbt-b").await;

    const K64: i64 = 64 << 10;
    assert_eq!(
        block_map(&c.ctl, None, &first).await.unwrap(),
        vec![(1 << 20, K64)]
    );
    assert_eq!(
        block_map(&c.ctl, None, &second).await.unwrap(),
        vec![(1 << 20, K64), (5 << 20, 4 * K64)]
    );
    assert_eq!(
        block_map(&c.ctl, Some(&first), &second).await.unwrap(),
        vec![(5 << 20, 4 * K64)]
    );

    for s in [&second, &first] {
        let r = c
            .ctl
            .controller()
            .delete_snapshot(csi::DeleteSnapshotRequest {
                snapshot_id: s.clone(),
                ..Default::default()
            })
            .await;
        expect_ok(r, "DeleteSnapshot");
    }
    c.ctl.delete(&v.volume_id).await;
}

/// Where known bytes go in the cross-node tests: (offset, length, seed).
type Regions = [(u64, u64, u8)];

fn region_bytes(len: u64, seed: u8) -> Vec<u8> {
    let p = pattern(seed);
    let mut out = Vec::with_capacity(len as usize);
    while out.len() < len as usize {
        let n = DATA.min(len as usize - out.len());
        out.extend_from_slice(&p[..n]);
    }
    out
}

fn write_regions(regions: &Regions) -> impl FnOnce(&mut File) + '_ {
    move |dev: &mut File| {
        for &(at, len, seed) in regions {
            dev.seek(SeekFrom::Start(at)).unwrap();
            dev.write_all(&region_bytes(len, seed)).unwrap();
        }
        dev.sync_all().unwrap();
    }
}

/// The whole device holds the regions and zeroes everywhere else.
fn check_regions(regions: &Regions, size: u64) -> impl FnOnce(&mut File) + '_ {
    move |dev: &mut File| {
        let mut expected = vec![0u8; size as usize];
        for &(at, len, seed) in regions {
            expected[at as usize..(at + len) as usize].copy_from_slice(&region_bytes(len, seed));
        }
        let mut got = vec![0u8; size as usize];
        dev.seek(SeekFrom::Start(0)).unwrap();
        dev.read_exact(&mut got).unwrap();
        // Slice comparisons (memcmp): quick in a debug build too.
        const MIB: usize = 1 << 20;
        let first = (0..got.len()).step_by(MIB).find(|&at| {
            got[at..(at + MIB).min(got.len())] != expected[at..(at + MIB).min(got.len())]
        });
        assert!(first.is_none(), "the copy differs in the MiB at {first:?}");
    }
}

/// A number logged as ` key=N`, in the last line that has `message`.
fn logged(log: &str, message: &str, key: &str) -> Option<u64> {
    let line = log.lines().rev().find(|l| l.contains(message))?;
    let at = line.find(&format!(" {key}="))? + key.len() + 2;
    line[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

async fn snapshot_of(ctl: &Driver, volume_id: &str) -> String {
    expect_ok(
        ctl.controller()
            .create_snapshot(snapshot_req(&unique_name("mn-xsnap"), volume_id))
            .await,
        "CreateSnapshot",
    )
    .snapshot
    .expect("snapshot")
    .snapshot_id
}

fn restore_req(name: &str, class: &str, snapshot_id: &str, node: &str) -> csi::CreateVolumeRequest {
    let mut r = req(name, class, 0, requirement(&[node], &[node]));
    r.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(SourceType::Snapshot(SnapshotSource {
            snapshot_id: snapshot_id.to_string(),
        })),
    });
    r
}

async fn delete_snapshot(ctl: &Driver, id: &str) -> Result<(), tonic::Status> {
    ctl.controller()
        .delete_snapshot(csi::DeleteSnapshotRequest {
            snapshot_id: id.to_string(),
            ..Default::default()
        })
        .await
        .map(drop)
}

/// A restore on another node than its snapshot's: node-b's agent reads the
/// snapshot from node-a's agent, and only its allocated ranges travel (the
/// bytes on the wire within 1% of them, far below the volume's size). Into
/// a thin and a thick volume, each identical to the snapshot: its data, and
/// zeroes everywhere else.
#[tokio::test]
async fn a_restore_on_another_node_sends_only_the_data() {
    if skip_without_lvm() {
        return;
    }
    let c = cluster().await;
    const SIZE: u64 = 256 << 20;
    let regions: &Regions = &[
        (0, 4 << 20, 1),
        (100 << 20, 8 << 20, 2),
        ((200 << 20) + (64 << 10), 4 << 20, 3),
    ];
    let v = c
        .ctl
        .create_ok(req(
            &unique_name("mn-xsrc"),
            THIN,
            SIZE as i64,
            requirement(&[A], &[A]),
        ))
        .await;
    with_device(&c.a.driver, &v.volume_id, write_regions(regions)).await;
    let snap = snapshot_of(&c.ctl, &v.volume_id).await;
    let allocated: i64 = block_map(&c.ctl, None, &snap)
        .await
        .unwrap()
        .iter()
        .map(|r| r.1)
        .sum();
    let written: u64 = regions.iter().map(|r| r.1).sum();
    eprintln!("snapshot: {allocated} bytes allocated, {written} written");

    for class in [THIN, THICK] {
        let started = Instant::now();
        let r = create_until_ok(&c.ctl, restore_req(&unique_name("mn-xr"), class, &snap, B)).await;
        eprintln!("{class} restore on node-b: {:?}", started.elapsed());
        assert_eq!(volume_nodes(&r), vec![B.to_string()], "{r:?}");
        let log = c.a.driver.log();
        let (sent, wire, header) = (
            logged(&log, "snapshot served", "bytes").expect("served bytes"),
            logged(&log, "snapshot served", "wire").expect("wire bytes"),
            logged(&log, "snapshot served", "allocated").expect("allocated"),
        );
        eprintln!("{class}: data {sent}, on the wire {wire}, allocated {header}");
        assert_eq!(header, allocated as u64);
        assert_eq!(sent, written, "every written byte, and nothing else");
        assert!(
            wire as f64 <= allocated as f64 * 1.01,
            "{wire} bytes sent for {allocated} allocated"
        );
        assert!(wire < SIZE / 10);
        with_device(&c.b.driver, &r.volume_id, check_regions(regions, SIZE)).await;
        let key = r.volume_id.rsplit(':').next().unwrap().to_string();
        let lv = &lvs_with_key(&key)[0];
        assert!(
            !lv.tags
                .iter()
                .any(|t| t.contains("copying") || t.contains("copied")),
            "{:?}",
            lv.tags
        );
        c.ctl.delete(&r.volume_id).await;
    }
    delete_snapshot(&c.ctl, &snap)
        .await
        .expect("DeleteSnapshot");
    c.ctl.delete(&v.volume_id).await;
}

/// The target agent of a cross-node restore dies at the two step boundaries
/// the checkpoint test does not reach (fail points): right after it made
/// the empty target LV, and after all the data is written and synced but
/// before the LV is marked complete. Each retry finds the unfinished LV
/// (never a second one), never reports it before it is complete, and the
/// final volume (thick: gaps and tail zeroed by the target) holds exactly
/// the snapshot's data.
#[tokio::test]
async fn a_cross_node_restore_survives_its_target_dying_before_and_after_the_data() {
    if skip_without_lvm() {
        return;
    }
    let dir = new_temp_dir();
    let ca = Ca::new(dir.path(), "cluster");
    let wait = ["--copy-wait-seconds".to_string(), "1".to_string()];
    let b_args: Vec<String> = b_class_args().into_iter().chain(wait).collect();
    let a = NodeAgent::start(&ca, A, "127.0.0.1", &default_class_args()).await;
    let b = NodeAgent::start_armed(&ca, B, "127.0.0.2", &b_args, "lvm.pull.after_target").await;
    let mut ctl = start_controller(&ca, &[&a, &b], &default_class_args()).await;

    const SIZE: u64 = 32 << 20;
    let regions: Vec<(u64, u64, u8)> = (0..6)
        .map(|i| (i * (5 << 20), 1 << 20, 0x40 + i as u8))
        .collect();
    let (v, snap) = written_snapshot_on_a(&ctl, &a, SIZE, &regions).await;
    let request = restore_req(&unique_name("mn-tr"), THICK, &snap, B);
    let key = Kind::Volume.key_for_name(&request.name);
    let unfinished = || {
        let lvs = lvs_with_key(&key);
        assert_eq!(lvs.len(), 1, "{lvs:#?}");
        assert_eq!(lvs[0].vg, NODE2_VG);
        assert!(
            lvs[0].tags.iter().any(|t| t.ends_with("copying")),
            "{:?}",
            lvs[0].tags
        );
        lvs[0].clone()
    };
    let wait_for = |b: &NodeAgent, point: &str| {
        let log = b.driver.log();
        log.contains(&format!("fail point {point} reached"))
    };

    // 1. Dies right after making the target: an empty LV marked copying.
    let first = create_once(&ctl, &request).await;
    assert!(first.is_err(), "reported a restore whose agent died");
    reaches(&b, "lvm.pull.after_target").await;
    let lv = unfinished();
    assert!(
        !lv.tags.iter().any(|t| t.contains("copied=")),
        "{:?}",
        lv.tags
    );
    let b = b.restart_armed("lvm.pull.after_data").await;

    // 2. Dies with every byte written and synced, before the LV is marked
    // complete: still unfinished, still not reported.
    let deadline = Instant::now() + Duration::from_secs(300);
    while !wait_for(&b, "lvm.pull.after_data") {
        assert!(
            Instant::now() < deadline,
            "no fail point: {}",
            b.driver.log()
        );
        let r = create_once(&ctl, &request).await;
        assert!(r.is_err(), "reported before the copy was marked complete");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    unfinished();
    let b = b.restart().await;
    // The controller too, for good measure: its index is rebuilt from the
    // streams and the unfinished LV is found again, not made twice.
    ctl = kill_and_restart_controller(ctl, &ca, &[&a, &b]).await;

    // 3. Converges: the copy runs once more and completes.
    let r = create_until_ok(&ctl, request.clone()).await;
    assert_eq!(volume_nodes(&r), vec![B.to_string()]);
    check_copy_and_clean_up(&ctl, &b, &r, &key, (&v, &snap), &regions, SIZE).await;
}

/// A cross-node restore survives a kill of each process it involves, and
/// each resumes from the checkpoint in LVM, never from zero: node-b's agent
/// dies right after its first checkpoint (fail point), node-a's agent dies
/// 8 pieces into the resumed stream (fail point; what node-b received past
/// its checkpoint is sent again), and the controller is
/// killed while the copy runs. Meanwhile the snapshot cannot be deleted,
/// and the volume is never reported before its data is complete.
#[tokio::test]
async fn a_cross_node_restore_resumes_from_its_checkpoint() {
    if skip_without_lvm() {
        return;
    }
    let dir = new_temp_dir();
    let ca = Ca::new(dir.path(), "cluster");
    // A short copy wait: CreateVolume answers "in progress" within a second;
    // a checkpoint once 64 MiB arrived and a second passed.
    let wait = [
        "--copy-wait-seconds".to_string(),
        "1".to_string(),
        "--copy-checkpoint-seconds".to_string(),
        "1".to_string(),
    ];
    let a_args: Vec<String> = default_class_args()
        .into_iter()
        .chain(wait.clone())
        .collect();
    let b_args: Vec<String> = b_class_args().into_iter().chain(wait).collect();
    let a = NodeAgent::start_armed(&ca, A, "127.0.0.1", &a_args, "lvm.serve.resumed_stream").await;
    let b = NodeAgent::start_armed(&ca, B, "127.0.0.2", &b_args, "lvm.pull.after_checkpoint").await;
    let mut ctl = start_controller(&ca, &[&a, &b], &default_class_args()).await;

    const SIZE: u64 = 256 << 20;
    let regions: Vec<(u64, u64, u8)> = (0..40).map(|i| (i << 22, 4 << 20, i as u8)).collect();
    let (v, snap) = written_snapshot_on_a(&ctl, &a, SIZE, &regions).await;
    let request = restore_req(&unique_name("mn-kr"), THIN, &snap, B);

    // 1. node-b's agent dies right after its first checkpoint.
    let first = create_once(&ctl, &request).await;
    eprintln!("first attempt: {:?}", first.as_ref().map(|_| ()));
    let deadline = Instant::now() + Duration::from_secs(300);
    while !b
        .driver
        .log()
        .contains("fail point lvm.pull.after_checkpoint reached")
    {
        assert!(
            Instant::now() < deadline,
            "node-b never reached its checkpoint"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let key = Kind::Volume.key_for_name(&request.name);
    let lvs = lvs_with_key(&key);
    assert_eq!(lvs.len(), 1, "{lvs:#?}");
    assert_eq!(lvs[0].vg, NODE2_VG);
    assert!(
        lvs[0].tags.iter().any(|t| t.ends_with("copying")),
        "{:?}",
        lvs[0].tags
    );
    // The checkpoint: every byte below it is on node-b's disk.
    let checkpoint: u64 = lvs[0]
        .tags
        .iter()
        .find_map(|t| t.rsplit_once("copied=")?.1.parse().ok())
        .unwrap_or_else(|| panic!("no checkpoint tag: {:?}", lvs[0].tags));
    assert!(
        checkpoint >= 64 << 20 && checkpoint % (1 << 20) == 0,
        "{checkpoint}"
    );
    let e = delete_snapshot(&ctl, &snap)
        .await
        .expect_err("snapshot in use");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    let b = b.restart().await;

    // 2. node-a's agent dies 8 pieces into node-b's resumed stream; node-b
    // keeps its checkpoint and is told to retry.
    let deadline = Instant::now() + Duration::from_secs(300);
    while !a
        .driver
        .log()
        .contains("fail point lvm.serve.resumed_stream reached")
    {
        assert!(
            Instant::now() < deadline,
            "node-b never resumed: {}",
            b.driver.log()
        );
        let r = create_once(&ctl, &request).await;
        assert!(r.is_err(), "reported before node-a served the rest");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // (node-b has read the header of that stream, most likely: counted.)
    let resumes = |log: &str| log.matches(&format!("resume_at={checkpoint}")).count();
    let before = resumes(&b.driver.log());
    let a = a.restart().await;

    // 3. The controller dies while the copy runs.
    let deadline = Instant::now() + Duration::from_secs(300);
    while resumes(&b.driver.log()) <= before {
        assert!(Instant::now() < deadline, "node-b never resumed again");
        let _ = create_once(&ctl, &request).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    ctl = kill_and_restart_controller(ctl, &ca, &[&a, &b]).await;
    let r = create_until_ok(&ctl, request.clone()).await;
    assert_eq!(volume_nodes(&r), vec![B.to_string()]);

    let log = b.driver.log();
    let starts: Vec<u64> = log
        .lines()
        .filter(|l| l.contains("copying from another node"))
        .filter_map(|l| logged(l, "copying", "resume_at"))
        .collect();
    eprintln!("node-b's streams started at {starts:?}");
    assert!(starts.len() >= 2 && starts[0] == 0, "{starts:?}");
    assert!(
        starts[1..].iter().all(|&s| s == checkpoint),
        "a resumed copy started over: {starts:?}"
    );
    eprintln!(
        "node-b: last stream resumed at {:?}, received {:?} bytes",
        logged(&log, "copy from another node complete", "resumed_at"),
        logged(&log, "copy from another node complete", "bytes"),
    );
    check_copy_and_clean_up(&ctl, &b, &r, &key, (&v, &snap), &regions, SIZE).await;
}

/// A thin volume on node-a with `regions` written, and a snapshot of it.
async fn written_snapshot_on_a(
    ctl: &Driver,
    a: &NodeAgent,
    size: u64,
    regions: &Regions,
) -> (csi::Volume, String) {
    let v = written_volume_on_a(ctl, &a.driver, size, regions).await;
    let snap = snapshot_of(ctl, &v.volume_id).await;
    (v, snap)
}

/// A thin volume on node-a (`a`: its node plugin) with `regions` written.
async fn written_volume_on_a(
    ctl: &Driver,
    a: &Driver,
    size: u64,
    regions: &Regions,
) -> csi::Volume {
    let v = ctl
        .create_ok(req(
            &unique_name("mn-xsrc"),
            THIN,
            size as i64,
            requirement(&[A], &[A]),
        ))
        .await;
    with_device(a, &v.volume_id, write_regions(regions)).await;
    v
}

/// SIGKILLs the controller and starts a new one for the same agents.
async fn kill_and_restart_controller(ctl: Driver, ca: &Ca, agents: &[&NodeAgent]) -> Driver {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(ctl.pid()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    drop(ctl);
    start_controller(ca, agents, &default_class_args()).await
}

/// The end of a cross-node restore: node-b's volume `r` (request key
/// `key`) holds exactly `regions`, is the only LV of its key and carries
/// no copy tag; then it, the snapshot and its source volume are deleted
/// and nothing of the key is left.
async fn check_copy_and_clean_up(
    ctl: &Driver,
    b: &NodeAgent,
    r: &csi::Volume,
    key: &str,
    (source, snap): (&csi::Volume, &str),
    regions: &Regions,
    size: u64,
) {
    with_device(&b.driver, &r.volume_id, check_regions(regions, size)).await;
    let lvs = lvs_with_key(key);
    assert_eq!(lvs.len(), 1, "{lvs:#?}");
    assert!(
        !lvs[0]
            .tags
            .iter()
            .any(|t| t.contains("copying") || t.contains("copied")),
        "{:?}",
        lvs[0].tags
    );
    ctl.delete(&r.volume_id).await;
    delete_snapshot(ctl, snap).await.expect("DeleteSnapshot");
    ctl.delete(&source.volume_id).await;
    assert!(lvs_with_key(key).is_empty());
}

fn clone_source(volume_id: &str) -> csi::VolumeContentSource {
    csi::VolumeContentSource {
        r#type: Some(SourceType::Volume(
            csi::volume_content_source::VolumeSource {
                volume_id: volume_id.to_string(),
            },
        )),
    }
}

fn clone_req(name: &str, class: &str, volume_id: &str, node: &str) -> csi::CreateVolumeRequest {
    let mut r = req(name, class, 0, requirement(&[node], &[node]));
    r.volume_content_source = Some(clone_source(volume_id));
    r
}

/// The LV name suffix of the hidden snapshot a clone request reads.
fn hidden_key(request: &csi::CreateVolumeRequest) -> String {
    ids::hidden_source_key(&Kind::Volume.key_for_name(&request.name))
}

/// A clone of a live volume on another node holds the source as it was
/// when the clone was asked for: the first call takes a hidden snapshot on
/// the source's node, and what is written to the source afterwards is not
/// in the clone. The hidden snapshot is no CSI snapshot (ListSnapshots
/// never shows it) and it is gone once the clone is complete. Into a thick
/// volume (gaps zeroed by the target) and a thin one.
#[tokio::test]
async fn a_clone_on_another_node_holds_its_source_as_it_was_when_asked() {
    if skip_without_lvm() {
        return;
    }
    let c = cluster().await;
    const SIZE: u64 = 64 << 20;
    let before: &Regions = &[
        (0, 2 << 20, 0x11),
        (20 << 20, 4 << 20, 0x12),
        (60 << 20, 1 << 20, 0x13),
    ];
    let after: &Regions = &[(0, 2 << 20, 0x21), (40 << 20, 4 << 20, 0x22)];
    for class in [THICK, THIN] {
        let v = written_volume_on_a(&c.ctl, &c.a.driver, SIZE, before).await;
        let request = clone_req(&unique_name("mn-xc"), class, &v.volume_id, B);
        let hidden = hidden_key(&request);
        let started = Instant::now();
        let first = create_once(&c.ctl, &request).await;
        eprintln!("{class} clone, first call: {:?}", first.as_ref().map(drop));
        let (_, listed) = inventory_of(&c.ctl).await;
        assert!(
            !listed.iter().any(|s| s.contains(&hidden)),
            "the hidden snapshot is listed: {listed:?}"
        );
        // Written after the request: not part of the clone.
        with_device(&c.a.driver, &v.volume_id, write_regions(after)).await;
        let r = create_until_ok(&c.ctl, request.clone()).await;
        eprintln!("{class} clone on node-b: {:?}", started.elapsed());
        assert_eq!(volume_nodes(&r), vec![B.to_string()], "{r:?}");
        with_device(&c.b.driver, &r.volume_id, check_regions(before, SIZE)).await;
        assert!(
            lvs_with_key(&hidden).is_empty(),
            "the hidden snapshot outlived its clone"
        );
        c.ctl.delete(&r.volume_id).await;
        c.ctl.delete(&v.volume_id).await;
    }
}

/// The two ends of a clone's hidden snapshot when things go wrong: a clone
/// deleted before its copy completed takes its hidden snapshot with it, and
/// a clone whose source volume is overwritten and deleted mid-copy still
/// completes, with the data of its own point in time. node-b's agent dies each time with every byte
/// written but the copy not marked complete (fail point).
#[tokio::test]
async fn a_clone_on_another_node_outlives_its_source_and_a_delete_mid_copy_leaves_nothing() {
    if skip_without_lvm() {
        return;
    }
    let dir = new_temp_dir();
    let ca = Ca::new(dir.path(), "cluster");
    let a = NodeAgent::start(&ca, A, "127.0.0.1", &default_class_args()).await;
    let point = "lvm.pull.after_data";
    let b = NodeAgent::start_armed(&ca, B, "127.0.0.2", &b_class_args(), point).await;
    let ctl = start_controller(&ca, &[&a, &b], &default_class_args()).await;
    const SIZE: u64 = 32 << 20;
    let regions: &Regions = &[(0, 1 << 20, 0x31), (17 << 20, 3 << 20, 0x32)];
    let v = written_volume_on_a(&ctl, &a.driver, SIZE, regions).await;

    // 1. Deleted mid-copy: the clone and its hidden snapshot both go.
    let first = clone_req(&unique_name("mn-cdel"), THICK, &v.volume_id, B);
    assert!(create_once(&ctl, &first).await.is_err());
    reaches(&b, point).await;
    assert_eq!(lvs_with_key(&hidden_key(&first)).len(), 1);
    let b = b.restart_armed(point).await;
    let key = Kind::Volume.key_for_name(&first.name);
    let id = format!("lvm1:{B}:{THICK}:{key}");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let r = ctl
            .controller()
            .delete_volume(csi::DeleteVolumeRequest {
                volume_id: id.clone(),
                ..Default::default()
            })
            .await;
        match r {
            Ok(_) => break,
            Err(e) if Instant::now() < deadline && e.code() == Code::Unavailable => {
                tokio::time::sleep(Duration::from_millis(300)).await
            }
            Err(e) => panic!("DeleteVolume {id}: {e:?}"),
        }
    }
    assert!(lvs_with_key(&key).is_empty());
    assert!(lvs_with_key(&hidden_key(&first)).is_empty());

    // 2. The source changes, then goes, mid-copy: the resumed copy reads
    // everything again (no checkpoint yet), from the hidden snapshot, so the
    // clone holds the source as it was when asked for; then the hidden
    // snapshot goes too.
    let second = clone_req(&unique_name("mn-corph"), THICK, &v.volume_id, B);
    assert!(create_once(&ctl, &second).await.is_err());
    reaches(&b, point).await;
    let later: &Regions = &[(0, 1 << 20, 0x41), (8 << 20, 1 << 20, 0x42)];
    with_device(&a.driver, &v.volume_id, write_regions(later)).await;
    ctl.delete(&v.volume_id).await;
    let b = b.restart().await;
    let r = create_until_ok(&ctl, second.clone()).await;
    assert_eq!(volume_nodes(&r), vec![B.to_string()]);
    with_device(&b.driver, &r.volume_id, check_regions(regions, SIZE)).await;
    assert!(lvs_with_key(&hidden_key(&second)).is_empty());
    ctl.delete(&r.volume_id).await;
    drop(a);
}

/// Waits (up to three minutes) until the agent's log says it reached the
/// fail point.
async fn reaches(b: &NodeAgent, point: &str) {
    let deadline = Instant::now() + Duration::from_secs(180);
    while !b
        .driver
        .log()
        .contains(&format!("fail point {point} reached"))
    {
        assert!(
            Instant::now() < deadline,
            "no fail point: {}",
            b.driver.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The controller dies at the two step boundaries a clone on another node
/// adds (fail points): right after it took the hidden snapshot (before any
/// stream), and once the copy is complete but before the hidden snapshot
/// is removed. Each restarted controller carries on from what is in LVM:
/// the first restart starts the stream from the same hidden snapshot, the
/// last answers the clone, and its sweep (every minute) removes the hidden
/// snapshot nobody else would.
#[tokio::test]
async fn a_clone_on_another_node_survives_its_controller_dying_at_each_step() {
    if skip_without_lvm() {
        return;
    }
    let dir = new_temp_dir();
    let ca = Ca::new(dir.path(), "cluster");
    let a = NodeAgent::start(&ca, A, "127.0.0.1", &default_class_args()).await;
    let b = NodeAgent::start(&ca, B, "127.0.0.2", &b_class_args()).await;
    let classes = default_class_args();
    let first_point = "lvm.clone.after_point_in_time";
    let ctl = start_controller_armed(&ca, &[&a, &b], &classes, first_point).await;
    const SIZE: u64 = 32 << 20;
    let regions: &Regions = &[(0, 1 << 20, 0x51), (9 << 20, 2 << 20, 0x52)];
    let v = written_volume_on_a(&ctl, &a.driver, SIZE, regions).await;
    let request = clone_req(&unique_name("mn-cctl"), THIN, &v.volume_id, B);
    let key = Kind::Volume.key_for_name(&request.name);
    let hidden = hidden_key(&request);
    let died_at =
        |ctl: &Driver, point: &str| ctl.log().contains(&format!("fail point {point} reached"));

    // 1. Dies right after taking the point in time: the clone's LV and the
    // hidden snapshot exist, nothing was streamed.
    assert!(create_once(&ctl, &request).await.is_err());
    assert!(died_at(&ctl, first_point), "{}", ctl.log());
    assert_eq!(lvs_with_key(&hidden).len(), 1);
    let target = lvs_with_key(&key);
    assert_eq!(target.len(), 1);
    assert!(target[0].tags.iter().any(|t| t.ends_with("copying")));
    drop(ctl);

    // 2. Dies once the copy is complete, before removing the hidden
    // snapshot: never reported before that.
    let last_point = "lvm.clone.before_dropping_point_in_time";
    let ctl = start_controller_armed(&ca, &[&a, &b], &classes, last_point).await;
    let deadline = Instant::now() + Duration::from_secs(180);
    while !died_at(&ctl, last_point) {
        assert!(Instant::now() < deadline, "no fail point: {}", ctl.log());
        assert!(
            create_once(&ctl, &request).await.is_err(),
            "reported before the controller died"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(lvs_with_key(&hidden).len(), 1);
    drop(ctl);

    // 3. A clean controller answers the clone; its sweep removes the
    // hidden snapshot within a minute or so.
    let ctl = start_controller(&ca, &[&a, &b], &classes).await;
    let r = create_until_ok(&ctl, request.clone()).await;
    assert_eq!(volume_nodes(&r), vec![B.to_string()]);
    with_device(&b.driver, &r.volume_id, check_regions(regions, SIZE)).await;
    let deadline = Instant::now() + Duration::from_secs(150);
    while !lvs_with_key(&hidden).is_empty() {
        assert!(
            Instant::now() < deadline,
            "the sweep left the hidden snapshot: {}",
            ctl.log()
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert!(ctl
        .log()
        .contains("removed a hidden snapshot whose clone is complete or gone"));
    ctl.delete(&r.volume_id).await;
    ctl.delete(&v.volume_id).await;
}
