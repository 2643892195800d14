//! A caller that gives up does not cut a mutation short (guest only, with
//! `LODESTONE_TEST_LVM=1`).
//!
//! The test holds the volume group's LVM lock, so the driver's `lvcreate`
//! waits for it; a CreateVolume with a short deadline then ends while lvm is
//! running. Once the lock is released the create must still happen, exactly
//! once, leave no device-mapper device suspended, and be in the driver's
//! in-memory state (ListVolumes answers from it; the DeleteVolume that
//! follows must really remove the LV).

use std::fs::File;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use lodestone::lvm::ids::{Kind, LvId, LvmKind};
use nix::fcntl::{Flock, FlockArg};
use tonic::Code;

use crate::common::cluster::{start_controller, NodeAgent};
use crate::common::pki::Ca;
use crate::common::*;

/// Where lvm keeps its file locks.
fn locking_dir() -> PathBuf {
    let out = Command::new("lvm")
        .args(["config", "--type", "full", "global/locking_dir"])
        .output()
        .expect("run lvm config");
    let text = String::from_utf8_lossy(&out.stdout);
    let dir = text
        .trim()
        .strip_prefix("locking_dir=")
        .map(|d| d.trim_matches('"').to_string())
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| "/run/lock/lvm".to_string());
    PathBuf::from(dir)
}

/// Takes the write lock lvm takes on a volume group; lvm commands on the VG
/// wait until the returned file is dropped.
fn hold_vg_lock(vg: &str) -> Flock<File> {
    let dir = locking_dir();
    std::fs::create_dir_all(&dir).expect("create lvm locking dir");
    let file = File::options()
        .create(true)
        .append(true)
        .open(dir.join(format!("V_{vg}")))
        .expect("open the VG lock file");
    Flock::lock(file, FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .expect("lock the VG")
}

/// Device-mapper devices that are suspended, as `dmsetup` shows them.
fn suspended_dm_devices() -> Vec<String> {
    let out = Command::new("dmsetup")
        .args(["info", "-c", "--noheadings", "-o", "name,suspended"])
        .output()
        .expect("run dmsetup");
    assert!(
        out.status.success(),
        "dmsetup failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("Suspended"))
        .map(String::from)
        .collect()
}

fn lvs_named(name: &str) -> usize {
    list_lvs().iter().filter(|lv| lv.name == name).count()
}

async fn wait_for(what: &str, limit: Duration, mut ok: impl AsyncFnMut() -> bool) {
    let started = Instant::now();
    while !ok().await {
        assert!(started.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// CreateVolume through `d` of a volume on `node`, abandoned while its
/// lvcreate waits for the VG lock; then the checks of the module comment.
async fn abandoned_create_completes(d: &Driver, node: &str, class: &str, vg: &str) {
    let name = unique_name("cancel");
    let id = LvId {
        kind: Kind::Volume,
        node: node.to_string(),
        class: class.to_string(),
        key: Kind::Volume.key_for_name(&name),
    };
    let (volume_id, lv_name) = (id.encode(), id.lv_name());
    d.track(&volume_id);

    let lock = hold_vg_lock(vg);
    let mut req = tonic::Request::new(create_req(&name, class, ext4(), 64 * MIB, 0));
    req.set_timeout(Duration::from_secs(2));
    let mut client = d.controller();
    // Either the deadline ends the call or the client gives up itself.
    let call = tokio::time::timeout(Duration::from_secs(10), client.create_volume(req));
    if let Ok(r) = call.await {
        expect_one_of(
            r,
            &[Code::DeadlineExceeded, Code::Cancelled],
            "CreateVolume",
        );
    }
    // lvcreate is still waiting for the lock when the call is gone.
    tokio::time::sleep(Duration::from_secs(1)).await;
    drop(lock);

    wait_for(
        &format!("{class}: the LV of the abandoned create"),
        Duration::from_secs(60),
        async || lvs_named(&lv_name) == 1,
    )
    .await;
    // The agent's state recorded it: ListVolumes answers from memory.
    wait_for(
        &format!("{class}: ListVolumes shows the abandoned create"),
        Duration::from_secs(30),
        async || d.list_all(0).await.iter().any(|v| v.volume_id == volume_id),
    )
    .await;
    let suspended = suspended_dm_devices();
    assert!(suspended.is_empty(), "{class}: suspended: {suspended:?}");

    // A retry finds it: same id, still one LV.
    let v = d
        .create_ok(create_req(&name, class, ext4(), 64 * MIB, 0))
        .await;
    assert_eq!(v.volume_id, volume_id);
    assert_eq!(lvs_named(&lv_name), 1, "{class}: LVs named {lv_name}");

    d.delete(&volume_id).await;
    assert_eq!(lvs_named(&lv_name), 0, "{class}: DeleteVolume left the LV");
}

/// `--mode all`: the controller calls the agent in the same process.
#[tokio::test]
async fn a_create_whose_caller_gave_up_completes() {
    if skip_without_lvm() {
        return;
    }
    // The check of the log below needs the debug lines.
    let d = Driver::builder().env("RUST_LOG", "debug").start().await;
    for (class, vg) in [(THICK, THICK_VG), (THIN, THIN_VG)] {
        abandoned_create_completes(&d, NODE_ID, class, vg).await;
    }
    let log = d.log();
    // The gRPC server runs each call to its end (so the handler itself never
    // sees its caller leave); the agent's own detaching is the second line.
    assert!(
        log.contains("the client left before its call ended; the call runs to its end")
            || log.contains("the caller left; the call goes on"),
        "the calls were never abandoned mid-way:\n{log}"
    );
}

/// `--mode controller` and `--mode node`: the controller's call to the
/// agent is cancelled with the CSI call, and the agent carries on.
#[tokio::test]
async fn an_agent_call_the_controller_gave_up_completes() {
    if skip_without_lvm() {
        return;
    }
    let dir = new_temp_dir();
    let ca = Ca::new(dir.path(), "cluster");
    let agent = NodeAgent::start(&ca, "node-a", "127.0.0.1", &default_class_args()).await;
    let ctl = start_controller(&ca, &[&agent], &default_class_args()).await;
    for (class, vg) in [(THICK, THICK_VG), (THIN, THIN_VG)] {
        abandoned_create_completes(&ctl, "node-a", class, vg).await;
    }
}
