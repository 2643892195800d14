//! The librados / librbd binding (`lodestone::rbd`) against a real
//! single-node Ceph cluster (`tests/ceph/cluster.sh`, its own directory and
//! ports). Needs the packages of `tests/ceph/packages.sh`.
//!
//! `cargo test --features rbd --test rbd_ffi -- --nocapture`
//!
//! Knobs: `LODESTONE_RBD_FFI_DIR` (cluster directory, default
//! `<repo>/target/ceph-rbd-ffi`), `LODESTONE_CEPH_MON_V2_PORT` /
//! `LODESTONE_CEPH_MON_V1_PORT` (default 3317 / 6797, so as not to collide
//! with a cluster on the default ports), `LODESTONE_CEPH_MGR=0` (faster
//! start; pool usage then reads zero and is not checked).
#![cfg(feature = "rbd")]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lodestone::error::Error;
use lodestone::rbd::client::DEFAULT_FEATURES;
use lodestone::rbd::pool::MAX_CALLS;
use lodestone::rbd::{
    ffi, ConnectOptions, ConnectionPool, Credentials, ImageOptions, IoCtx, RbdError, Secret,
};
use tonic::Code;

const MIB: u64 = 1 << 20;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn ports() -> (String, String) {
    (
        std::env::var("LODESTONE_CEPH_MON_V2_PORT").unwrap_or_else(|_| "3317".into()),
        std::env::var("LODESTONE_CEPH_MON_V1_PORT").unwrap_or_else(|_| "6797".into()),
    )
}

fn cluster_sh(args: &[&str], dir: &Path) -> std::process::Output {
    let (v2, v1) = ports();
    Command::new("bash")
        .arg(repo().join("tests/ceph/cluster.sh"))
        .args(args)
        .arg(dir)
        .env("LODESTONE_CEPH_MON_V2_PORT", v2)
        .env("LODESTONE_CEPH_MON_V1_PORT", v1)
        .output()
        .expect("run tests/ceph/cluster.sh")
}

/// Stops the cluster when the test ends, passed or not.
struct ClusterGuard {
    dir: PathBuf,
}

impl Drop for ClusterGuard {
    fn drop(&mut self) {
        let out = cluster_sh(&["stop"], &self.dir);
        eprintln!(
            "cluster.sh stop: {}{}",
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
}

/// `cluster.sh env` output: `export NAME=value` lines (values shell-quoted
/// with single quotes where needed; never key material).
fn env_value(env: &str, name: &str) -> String {
    let prefix = format!("export {name}=");
    let v = env
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("{name} missing from cluster.sh env"));
    v.trim_matches('\'').to_string()
}

/// The `key = ...` of the keyring file, without printing or keeping other
/// copies (the file's bytes are zeroed).
fn read_key(keyring: &Path) -> Secret {
    let mut text = std::fs::read(keyring).expect("read keyring");
    let key = {
        let s = std::str::from_utf8(&text).expect("keyring is text");
        let line = s
            .lines()
            .map(str::trim)
            .find(|l| l.starts_with("key"))
            .expect("keyring has a key line");
        let v = line.split_once('=').expect("key = value").1.trim();
        Secret::from_bytes(v.as_bytes().to_vec())
    };
    text.iter_mut().for_each(|b| *b = 0);
    key
}

struct Timings(Vec<(&'static str, Vec<Duration>)>);

impl Timings {
    fn add(&mut self, what: &'static str, d: Duration) {
        match self.0.iter_mut().find(|(w, _)| *w == what) {
            Some((_, v)) => v.push(d),
            None => self.0.push((what, vec![d])),
        }
    }

    fn print(&self) {
        println!(
            "\n{:<44} {:>5} {:>9} {:>9} {:>9}",
            "FFI call (one pooled connection)", "n", "min", "median", "max"
        );
        for (what, v) in &self.0 {
            let mut v = v.clone();
            v.sort();
            let ms = |d: Duration| format!("{:.2}ms", d.as_secs_f64() * 1000.0);
            println!(
                "{:<44} {:>5} {:>9} {:>9} {:>9}",
                what,
                v.len(),
                ms(v[0]),
                ms(v[v.len() / 2]),
                ms(v[v.len() - 1])
            );
        }
    }
}

async fn timed<T>(
    t: &mut Timings,
    what: &'static str,
    fut: impl std::future::Future<Output = T>,
) -> T {
    let start = Instant::now();
    let out = fut.await;
    t.add(what, start.elapsed());
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rbd_ffi_against_a_real_cluster() {
    let dir = std::env::var_os("LODESTONE_RBD_FFI_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target/ceph-rbd-ffi"));
    std::fs::create_dir_all(&dir).unwrap();
    let _guard = ClusterGuard { dir: dir.clone() };
    let t0 = Instant::now();
    let out = cluster_sh(&["start"], &dir);
    assert!(
        out.status.success(),
        "cluster.sh start failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("cluster.sh start: {:.1}s", t0.elapsed().as_secs_f64());
    let env = cluster_sh(&["env"], &dir);
    assert!(env.status.success());
    let env = String::from_utf8(env.stdout).unwrap();
    let mon_host = env_value(&env, "LODESTONE_CEPH_MON_HOST");
    let user = env_value(&env, "LODESTONE_CEPH_USER");
    let pool_name = env_value(&env, "LODESTONE_CEPH_POOL");
    let keyring = PathBuf::from(env_value(&env, "LODESTONE_CEPH_KEYRING"));
    let with_mgr = std::env::var("LODESTONE_CEPH_MGR").map_or(true, |v| v != "0");
    let (major, minor, extra) = lodestone::rbd::client::librbd_version();
    println!("librbd {major}.{minor}.{extra}, mon_host {mon_host}, user {user}");

    let creds = Credentials {
        mon_host: mon_host.clone(),
        user: user.clone(),
        key: read_key(&keyring),
    };
    let opts = ConnectOptions {
        connect_timeout: Duration::from_secs(20),
        ..ConnectOptions::default()
    };
    let pool = ConnectionPool::new(opts, Duration::from_secs(2));
    let mut t = Timings(Vec::new());

    // connect (first use) and reuse
    let start = Instant::now();
    let io = pool.ioctx(&creds, &pool_name).await.expect("connect");
    println!(
        "connect + ioctx: {:.1}ms",
        start.elapsed().as_secs_f64() * 1000.0
    );
    let start = Instant::now();
    let io2 = pool.ioctx(&creds, &pool_name).await.unwrap();
    println!(
        "pooled ioctx: {:.3}ms",
        start.elapsed().as_secs_f64() * 1000.0
    );
    assert!(Arc::ptr_eq(&io, &io2));
    assert_eq!(pool.len(), 1);
    assert!(io.pool_id() > 0);
    assert_eq!(io.cluster().pool_lookup(&pool_name).unwrap(), io.pool_id());
    assert!(io
        .cluster()
        .pool_lookup("no-such-pool")
        .unwrap_err()
        .is_not_found());
    assert!(!io.cluster().fsid().unwrap().is_empty());
    drop((io, io2));

    // At most MAX_CALLS librbd calls run at once (each holds a blocking
    // thread); the others wait for a slot and then run.
    {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let bounded = Arc::new(ConnectionPool::new(
            ConnectOptions::default(),
            Duration::from_secs(60),
        ));
        let (running, peak, done) = (
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicUsize::new(0)),
        );
        let tasks: Vec<_> = (0..3 * MAX_CALLS)
            .map(|_| {
                let (bounded, running, peak, done) =
                    (bounded.clone(), running.clone(), peak.clone(), done.clone());
                let creds = Credentials {
                    mon_host: creds.mon_host.clone(),
                    user: creds.user.clone(),
                    key: read_key(&keyring),
                };
                let pool_name = pool_name.clone();
                tokio::spawn(async move {
                    bounded
                        .run(&creds, &pool_name, move |_io| {
                            let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                            peak.fetch_max(now, Ordering::SeqCst);
                            std::thread::sleep(Duration::from_millis(50));
                            running.fetch_sub(1, Ordering::SeqCst);
                            done.fetch_add(1, Ordering::SeqCst);
                            Ok(())
                        })
                        .await
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        assert_eq!(done.load(Ordering::SeqCst), 3 * MAX_CALLS);
        assert_eq!(peak.load(Ordering::SeqCst), MAX_CALLS, "calls in flight");
        bounded.close_all().await;
    }

    // a wrong key neither connects nor reuses the good connection
    let bad = Credentials {
        mon_host: mon_host.clone(),
        user: user.clone(),
        key: Secret::new("AQAAAAAAAAAAABAAAAAAAAAAAAAAAAAAAAAAAA==".into()),
    };
    let start = Instant::now();
    let e = pool.ioctx(&bad, &pool_name).await.unwrap_err();
    println!(
        "wrong key: {e} ({:.1}ms)",
        start.elapsed().as_secs_f64() * 1000.0
    );
    assert!(matches!(e, RbdError::PermissionDenied { .. }), "{e:?}");
    assert!(!format!("{e:?}").contains("AQAAAAAA"));
    assert_eq!(Error::from(e).code(), Code::Internal);
    assert_eq!(pool.len(), 1, "the good connection stays");

    // create: timed through the pool (a pooled connection, spawn_blocking)
    let layering = ImageOptions {
        features: Some(DEFAULT_FEATURES),
        ..ImageOptions::default()
    };
    let plain = ImageOptions {
        features: Some(ffi::RBD_FEATURE_LAYERING),
        order: Some(22),
        data_pool: None,
    };
    for i in 0..5 {
        let name = format!("ffi-lat-{i}");
        let opts = if i % 2 == 0 { &layering } else { &plain };
        timed(
            &mut t,
            "create (rbd_create4)",
            pool.create_image(&creds, &pool_name, &name, 64 * MIB, opts),
        )
        .await
        .unwrap();
    }
    for i in 0..5 {
        let name = format!("ffi-lat-{i}");
        timed(
            &mut t,
            "remove (rbd_remove)",
            pool.remove_image(&creds, &pool_name, &name),
        )
        .await
        .unwrap();
    }

    // the image under test
    pool.create_image(&creds, &pool_name, "ffi-a", 64 * MIB, &layering)
        .await
        .unwrap();
    let e = pool
        .create_image(&creds, &pool_name, "ffi-a", 64 * MIB, &layering)
        .await
        .unwrap_err();
    assert!(matches!(e, RbdError::Exists { .. }), "{e:?}");
    assert_eq!(Error::from(e).code(), Code::AlreadyExists);
    let e = pool
        .run(&creds, &pool_name, |io| io.open("ffi-missing").map(drop))
        .await
        .unwrap_err();
    assert!(matches!(e, RbdError::NotFound { .. }), "{e:?}");
    assert_eq!(
        e.to_string(),
        format!("rbd_open {pool_name}/ffi-missing: not found")
    );
    assert_eq!(Error::from(e).code(), Code::NotFound);
    let e = pool
        .remove_image(&creds, &pool_name, "ffi-missing")
        .await
        .unwrap_err();
    assert!(e.is_not_found(), "{e:?}");
    let e = pool
        .create_image(&creds, &pool_name, "bad\0name", MIB, &plain)
        .await
        .unwrap_err();
    assert!(matches!(e, RbdError::InvalidArgument { .. }), "{e:?}");

    let io = pool.ioctx(&creds, &pool_name).await.unwrap();
    let report = tokio::task::spawn_blocking(move || image_lifecycle(&io))
        .await
        .unwrap();
    for (what, d) in report {
        t.add(what, d);
    }

    // pool usage (needs the mgr; eventually consistent)
    let stat = pool.pool_stat(&creds, &pool_name).await.unwrap();
    println!("pool stat: {stat:?}");
    if with_mgr {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut stat = stat;
        while stat.objects == 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(500)).await;
            stat = pool.pool_stat(&creds, &pool_name).await.unwrap();
        }
        assert!(stat.objects > 0, "pool stats stayed zero: {stat:?}");
        let cs = pool
            .run(&creds, &pool_name, |io| io.cluster().stat())
            .await
            .unwrap();
        println!("cluster stat: {cs:?}");
        assert!(cs.total_bytes > 0);
    }

    // nothing of ours is left
    let left = pool.list_images(&creds, &pool_name).await.unwrap();
    assert!(left.iter().all(|s| !s.name.starts_with("ffi-")), "{left:?}");

    // the reaper shuts the idle connection down
    let deadline = Instant::now() + Duration::from_secs(10);
    while !pool.is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(pool.is_empty(), "idle connection not reaped");
    // and the next call connects again
    let start = Instant::now();
    pool.list_images(&creds, &pool_name).await.unwrap();
    println!(
        "reconnect + list: {:.1}ms",
        start.elapsed().as_secs_f64() * 1000.0
    );
    assert_eq!(pool.close_all().await, 1);

    t.print();
}

/// The blocking API step by step (runs in a blocking thread).
fn image_lifecycle(io: &IoCtx) -> Vec<(&'static str, Duration)> {
    let mut t = Vec::new();
    let mut time = |what: &'static str, start: Instant| t.push((what, start.elapsed()));
    let pool = io.pool().to_string();

    let a = io.open("ffi-a").unwrap();
    assert_eq!(a.size().unwrap(), 64 * MIB);
    assert_eq!(a.features().unwrap() & DEFAULT_FEATURES, DEFAULT_FEATURES);
    let info = a.stat().unwrap();
    assert_eq!(
        (info.size, info.order, info.object_size),
        (64 * MIB, 22, 4 * MIB)
    );
    assert!(a.created().unwrap() > 1_600_000_000);
    let a_id = a.id().unwrap();
    assert!(!a_id.is_empty());
    // the id and metadata paths that skip an image open (rbd object class)
    let start = Instant::now();
    assert_eq!(io.image_id("ffi-a").unwrap(), a_id);
    time("image_id (rbd.get_id)", start);
    assert!(io.image_id("ffi-none").unwrap_err().is_not_found());
    let start = Instant::now();
    io.metadata_set_unopened(&a_id, &[("lodestone.x", "1"), ("lodestone.y", "two")])
        .unwrap();
    time("metadata_set_unopened (2 keys)", start);
    assert_eq!(io.image_size_unopened(&a_id).unwrap(), 64 * MIB);
    let created = io.image_created_unopened(&a_id).unwrap();
    assert!((created - a.created().unwrap()).abs() <= 1, "{created}");
    a.metadata_set("other.key", "not ours").unwrap();
    assert_eq!(
        io.metadata_unopened(&a_id, "lodestone.").unwrap(),
        vec![
            ("lodestone.x".to_string(), "1".to_string()),
            ("lodestone.y".to_string(), "two".to_string())
        ]
    );
    a.metadata_remove("other.key").unwrap();
    assert!(io.image_size_unopened("0000").unwrap_err().is_not_found());
    assert!(!io.has_parent_unopened(&a_id).unwrap(), "ffi-a is no clone");
    assert!(io.has_parent_unopened("0000").unwrap_err().is_not_found());
    for (k, v) in [("lodestone.x", "1"), ("lodestone.y", "two")] {
        let fresh = io.open_read_only("ffi-a", None).unwrap();
        assert_eq!(fresh.metadata_get(k).unwrap().as_deref(), Some(v));
        fresh.metadata_remove(k).unwrap_err(); // read-only handle
        a.metadata_remove(k).unwrap();
    }

    // metadata
    assert_eq!(a.metadata_get("lodestone.name").unwrap(), None);
    let start = Instant::now();
    a.metadata_set("lodestone.name", "pvc-1234").unwrap();
    time("metadata_set", start);
    let long = "x".repeat(1000); // beyond the first 256-byte buffer
    a.metadata_set("lodestone.long", &long).unwrap();
    let start = Instant::now();
    assert_eq!(
        a.metadata_get("lodestone.name").unwrap().as_deref(),
        Some("pvc-1234")
    );
    time("metadata_get", start);
    assert_eq!(a.metadata_get("lodestone.long").unwrap(), Some(long));
    a.metadata_remove("lodestone.long").unwrap();
    assert_eq!(a.metadata_get("lodestone.long").unwrap(), None);
    assert!(a
        .metadata_remove("lodestone.long")
        .unwrap_err()
        .is_not_found());

    // resize
    let start = Instant::now();
    a.resize(128 * MIB).unwrap();
    time("resize (rbd_resize)", start);
    assert_eq!(a.size().unwrap(), 128 * MIB);

    // snapshot
    let start = Instant::now();
    a.snap_create("snap-1").unwrap();
    time("snap create (rbd_snap_create)", start);
    let e = a.snap_create("snap-1").unwrap_err();
    assert!(matches!(e, RbdError::Exists { .. }), "{e:?}");
    let snaps = a.snap_list().unwrap();
    assert_eq!(snaps.len(), 1);
    assert_eq!(
        (snaps[0].name.as_str(), snaps[0].size),
        ("snap-1", 128 * MIB)
    );
    let snap_id = a.snap_id("snap-1").unwrap();
    assert_eq!(snap_id, snaps[0].id);
    assert!(a.snap_timestamp(snap_id).unwrap() > 1_600_000_000);
    assert!(a.snap_id("nope").unwrap_err().is_not_found());
    // many snapshots: beyond the first snap_list buffer (16)
    for i in 0..20 {
        a.snap_create(&format!("many-{i}")).unwrap();
    }
    assert_eq!(a.snap_list().unwrap().len(), 21);
    for i in 0..20 {
        let start = Instant::now();
        a.snap_remove(&format!("many-{i}")).unwrap();
        time("snap remove (rbd_snap_remove)", start);
    }
    assert!(a.parent().unwrap().is_none());

    // clone v2 of the snapshot, then a clone of the clone
    let plain = ImageOptions::default();
    let start = Instant::now();
    io.clone_image("ffi-a", "snap-1", io, "ffi-b", &plain)
        .unwrap();
    time("clone v2 (rbd_clone3)", start);
    let e = io
        .clone_image("ffi-a", "snap-1", io, "ffi-b", &plain)
        .unwrap_err();
    assert!(matches!(e, RbdError::Exists { .. }), "{e:?}");
    let e = io
        .clone_image("ffi-a", "no-snap", io, "ffi-x", &plain)
        .unwrap_err();
    assert!(e.is_not_found(), "{e:?}");
    let b = io.open("ffi-b").unwrap();
    assert!(
        io.has_parent_unopened(&b.id().unwrap()).unwrap(),
        "ffi-b is a clone"
    );
    let p = b.parent().unwrap().expect("ffi-b has a parent");
    assert_eq!(
        (
            p.image.image_name.as_str(),
            p.image.image_id.as_str(),
            p.snap_name.as_str()
        ),
        ("ffi-a", a_id.as_str(), "snap-1")
    );
    assert_eq!(
        (p.snap_id, p.image.pool_name.as_str()),
        (snap_id, pool.as_str())
    );
    assert_eq!(p.snap_namespace, ffi::RBD_SNAP_NAMESPACE_TYPE_USER);
    let children = io
        .open_read_only("ffi-a", Some("snap-1"))
        .unwrap()
        .children()
        .unwrap();
    assert_eq!(children.len(), 1);
    assert_eq!(children[0].image_name, "ffi-b");
    b.snap_create("snap-b").unwrap();
    io.clone_image("ffi-b", "snap-b", io, "ffi-c", &plain)
        .unwrap();
    assert_eq!(io.clone_depth("ffi-a").unwrap(), 0);
    assert_eq!(io.clone_depth("ffi-b").unwrap(), 1);
    assert_eq!(io.clone_depth("ffi-c").unwrap(), 2);

    // the parent cannot go while it has snapshots
    let e = io.remove("ffi-a").unwrap_err();
    println!("remove of an image with snapshots and clones: {e}");
    assert!(
        matches!(e, RbdError::NotEmpty { .. } | RbdError::Busy { .. }),
        "{e:?}"
    );
    assert_eq!(Error::from(e).code(), Code::FailedPrecondition);
    // ...but its snapshot can (clone v2: it moves to the trash namespace)
    let start = Instant::now();
    a.snap_remove("snap-1").unwrap();
    time("snap remove with a clone (to trash ns)", start);
    assert!(a.user_snapshots().unwrap().is_empty());
    let all = a.snap_list().unwrap();
    println!("snap_list after removing a snapshot a clone uses: {all:?}");
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].namespace, ffi::RBD_SNAP_NAMESPACE_TYPE_TRASH);
    // the open handle of the child still reports the parent snapshot as it
    // was when opened; a fresh handle sees it in the trash namespace
    let stale = b.parent().unwrap().unwrap();
    let fresh = io
        .open_read_only("ffi-b", None)
        .unwrap()
        .parent()
        .unwrap()
        .unwrap();
    println!(
        "parent snapshot namespace after its removal: open handle {}, fresh handle {}",
        stale.snap_namespace, fresh.snap_namespace
    );
    assert_eq!(fresh.snap_namespace, ffi::RBD_SNAP_NAMESPACE_TYPE_TRASH);
    assert_eq!(fresh.snap_id, snap_id);
    assert_eq!(io.clone_depth("ffi-c").unwrap(), 2);

    // flatten
    let c = io.open("ffi-c").unwrap();
    let start = Instant::now();
    c.flatten().unwrap();
    time("flatten (rbd_flatten, 128 MiB, no data)", start);
    assert!(c.parent().unwrap().is_none());
    assert_eq!(io.clone_depth("ffi-c").unwrap(), 0);
    drop(c);
    let start = Instant::now();
    b.flatten().unwrap();
    time("flatten (rbd_flatten, 128 MiB, no data)", start);
    assert_eq!(io.clone_depth("ffi-b").unwrap(), 0);

    // list (ids match)
    let start = Instant::now();
    let list = io.list().unwrap();
    time("list (rbd_list2)", start);
    let names: Vec<&str> = list.iter().map(|s| s.name.as_str()).collect();
    for n in ["ffi-a", "ffi-b", "ffi-c"] {
        assert!(names.contains(&n), "{names:?}");
    }
    assert_eq!(list.iter().find(|s| s.name == "ffi-a").unwrap().id, a_id);

    // trash move + remove (ffi-a: its trashed snapshot went with b's flatten)
    drop(a);
    let start = Instant::now();
    io.trash_move("ffi-a", Duration::ZERO).unwrap();
    time("trash move (rbd_trash_move)", start);
    assert!(io.open("ffi-a").unwrap_err().is_not_found());
    assert!(
        io.open_by_id_read_only(&a_id).is_ok(),
        "trashed image opens by id"
    );
    assert!(!io.list().unwrap().iter().any(|s| s.name == "ffi-a"));
    let start = Instant::now();
    io.trash_remove(&a_id, false).unwrap();
    time("trash remove (rbd_trash_remove)", start);
    assert!(io.trash_remove(&a_id, false).unwrap_err().is_not_found());

    // remove the rest: b has a snapshot, so not before it is gone
    drop(b);
    let e = io.remove("ffi-b").unwrap_err();
    assert!(matches!(e, RbdError::NotEmpty { .. }), "{e:?}");
    io.open("ffi-b").unwrap().snap_remove("snap-b").unwrap();
    let start = Instant::now();
    io.remove("ffi-b").unwrap();
    time("remove (rbd_remove, direct)", start);
    io.remove("ffi-c").unwrap();
    t
}
