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
use tonic::Code;

use crate::common::cluster::{start_controller, start_controller_with, NodeAgent, Relay};
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
/// restore (even against the preferred node), a clear error when the
/// source's node is excluded, a fallback when the preferred node has no
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

    // A requisite without node-b: a clear error naming node-b.
    let mut r = req(
        &unique_name("mn-excluded"),
        THIN,
        0,
        requirement(&[A], &[A]),
    );
    r.volume_content_source = Some(source);
    let e = expect_code(
        c.ctl.controller().create_volume(r).await,
        Code::ResourceExhausted,
        "restore with node-b excluded",
    );
    assert!(e.message().contains(B), "{}", e.message());

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
