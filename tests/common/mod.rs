//! Shared fixtures for the Lodestone integration tests.
//!
//! [`Driver`] runs the real `lodestone` binary on a unix socket inside a
//! temporary directory and hands out CSI clients connected to it. The
//! driver's stdout and stderr go to `driver.log` in that directory; when a
//! test panics while a `Driver` is alive, the log is printed on drop so the
//! failure comes with the driver's side of the story.
//!
//! The rest of the module holds small builders for CSI messages and
//! assertions on gRPC status codes.

#![allow(dead_code)]

pub mod cluster;
pub mod pki;

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use lodestone::csi;
use lodestone::csi::controller_client::ControllerClient;
use lodestone::csi::identity_client::IdentityClient;
use lodestone::csi::node_client::NodeClient;
use lodestone::csi::volume_capability::access_mode::Mode;
use lodestone::csi::volume_capability::{AccessMode, BlockVolume, MountVolume};
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

/// The driver name Lodestone's LVM flavour reports.
pub const DRIVER_NAME: &str = "lvm.lodestone.dev";
/// The topology key whose value is the node id.
pub const TOPOLOGY_KEY: &str = "topology.lodestone.dev/node";
/// StorageClass parameter that picks a device class.
pub const DEVICE_CLASS_PARAM: &str = "deviceClass";
/// Node id the fixture uses unless told otherwise.
pub const NODE_ID: &str = "conformance-node";
/// Volume groups the guest fixture (`tests/vm/lvm-fixture.sh setup`) creates.
pub const THIN_VG: &str = "lodestone-thin";
pub const THICK_VG: &str = "lodestone-thick";
/// The second node's volume group in the multi-node tests.
pub const NODE2_VG: &str = "lodestone-node2";
/// Device class names the default fixture configures.
pub const THIN: &str = "thin";
pub const THICK: &str = "thick";
/// LVM extent size of the fixture's volume groups.
pub const EXTENT: i64 = 4 << 20;

pub const MIB: i64 = 1 << 20;
pub const GIB: i64 = 1 << 30;

/// Environment variables the driver reads itself (clap `env`); the fixture
/// clears them so the surrounding environment cannot change its flags.
const DRIVER_ENV: &[&str] = &["CSI_ENDPOINT"];

/// Whether the LVM backend is available (the QEMU guest run).
pub fn lvm_enabled() -> bool {
    std::env::var("LODESTONE_TEST_LVM").is_ok_and(|v| v == "1")
}

/// For tests that need real volume groups: true (after saying so) when they
/// should return early because the volume groups are not there.
pub fn skip_without_lvm() -> bool {
    if lvm_enabled() {
        false
    } else {
        eprintln!("skipped: needs LODESTONE_TEST_LVM=1");
        true
    }
}

/// The default device-class flags: `thin` (the default) and `thick`.
pub fn default_class_args() -> Vec<String> {
    vec![
        "--device-class".into(),
        format!("{THIN}={THIN_VG}/pool0"),
        "--device-class".into(),
        format!("{THICK}={THICK_VG}"),
    ]
}

/// How to start a driver. `Driver::start()` is `DriverBuilder::new().start()`.
#[derive(Debug, Clone)]
pub struct DriverBuilder {
    node_id: String,
    mode: String,
    /// Flags after endpoint/node-id/mode; defaults to the two device classes.
    class_args: Vec<String>,
    extra_args: Vec<String>,
    env: Vec<(String, String)>,
}

impl Default for DriverBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl DriverBuilder {
    pub fn new() -> Self {
        DriverBuilder {
            node_id: NODE_ID.to_string(),
            mode: "all".to_string(),
            class_args: default_class_args(),
            extra_args: vec!["--lvm-refresh-seconds".into(), "0".into()],
            env: Vec::new(),
        }
    }

    pub fn node_id(mut self, id: &str) -> Self {
        self.node_id = id.to_string();
        self
    }

    /// `all` (the default), `controller` or `node`.
    pub fn mode(mut self, mode: &str) -> Self {
        self.mode = mode.to_string();
        self
    }

    pub fn args<S: Into<String>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        let args: Vec<String> = args.into_iter().map(Into::into).collect();
        // A test that sets the refresh period replaces the default (off).
        if args.iter().any(|a| a == "--lvm-refresh-seconds") {
            if let Some(i) = self
                .extra_args
                .iter()
                .position(|a| a == "--lvm-refresh-seconds")
            {
                self.extra_args.drain(i..i + 2);
            }
        }
        self.extra_args.extend(args);
        self
    }

    /// Replace the device-class flags (pass an empty list for none).
    pub fn class_args<S: Into<String>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.class_args = args.into_iter().map(Into::into).collect();
        self
    }

    pub fn arg(mut self, arg: &str) -> Self {
        self.extra_args.push(arg.to_string());
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    fn command(&self, dir: &Path, log: &File) -> Command {
        let socket = dir.join("csi.sock");
        // A node process may be another build (a release binary, to measure
        // what every node runs).
        let bin = match std::env::var("LODESTONE_TEST_NODE_BIN") {
            // Absolute: the process starts in its own directory.
            Ok(bin) if self.mode == "node" && !bin.is_empty() => std::fs::canonicalize(&bin)
                .unwrap_or_else(|e| panic!("LODESTONE_TEST_NODE_BIN={bin}: {e}")),
            _ => PathBuf::from(env!("CARGO_BIN_EXE_lodestone")),
        };
        let mut cmd = Command::new(bin);
        cmd.arg("--endpoint")
            .arg(format!("unix://{}", socket.display()))
            .arg("--node-id")
            .arg(&self.node_id)
            .arg("--mode")
            .arg(&self.mode)
            .args(&self.class_args)
            .args(&self.extra_args)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log file"))
            .stderr(log.try_clone().expect("clone log file"));
        for (k, _) in std::env::vars_os() {
            let k = k.to_string_lossy().into_owned();
            if k.starts_with("LODESTONE_") || DRIVER_ENV.contains(&k.as_str()) {
                cmd.env_remove(&k);
            }
        }
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "debug");
        }
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd
    }

    /// Start the driver and wait until its socket answers.
    pub async fn start(self) -> Driver {
        self.start_in(new_temp_dir()).await
    }

    /// Start the driver in an existing directory (socket `csi.sock`, log
    /// `driver.log`, appended to).
    pub async fn start_in(self, dir: tempfile::TempDir) -> Driver {
        let log_path = dir.path().join("driver.log");
        let log = File::options()
            .create(true)
            .append(true)
            .open(&log_path)
            .expect("open driver.log");
        let socket = dir.path().join("csi.sock");
        let child = self
            .command(dir.path(), &log)
            .spawn()
            .expect("spawn lodestone");
        let mut driver = Driver {
            node_id: self.node_id.clone(),
            socket,
            log_path,
            child: Some(child),
            channel: None,
            client_rt: Some(
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .thread_name("lodestone-ct-client")
                    .enable_all()
                    .build()
                    .expect("client runtime"),
            ),
            created: std::sync::Mutex::new(Vec::new()),
            started: Instant::now(),
            dir,
        };
        driver.connect().await;
        driver
    }

    /// Run the driver expecting it to refuse to start: waits up to `timeout`
    /// for it to exit and returns its status and combined output. A driver
    /// that is still running after `timeout` is killed and `None` returned
    /// for the status.
    pub fn run_to_exit(self, timeout: Duration) -> (Option<ExitStatus>, String) {
        let dir = new_temp_dir();
        let log_path = dir.path().join("driver.log");
        let log = File::create(&log_path).expect("create driver.log");
        let mut child = self
            .command(dir.path(), &log)
            .spawn()
            .expect("spawn lodestone");
        let status = wait_timeout(&mut child, timeout);
        if status.is_none() {
            let _ = child.kill();
            let _ = child.wait();
        }
        (status, read_lossy(&log_path))
    }
}

/// A fresh temporary directory for a driver.
pub fn new_temp_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("lodestone-ct-")
        .tempdir()
        .expect("temp dir")
}

fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn read_lossy(path: &Path) -> String {
    let mut bytes = Vec::new();
    if let Ok(mut f) = File::open(path) {
        let _ = f.read_to_end(&mut bytes);
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

/// A running driver process in its own temporary directory.
pub struct Driver {
    pub node_id: String,
    pub socket: PathBuf,
    pub log_path: PathBuf,
    child: Option<Child>,
    channel: Option<Channel>,
    /// The client connection lives on its own runtime, so that it keeps
    /// answering the server (HTTP/2 GOAWAY/PING during graceful shutdown)
    /// while the test's runtime is blocked in `Drop` waiting for the process.
    client_rt: Option<tokio::runtime::Runtime>,
    /// Volumes created through `create_ok`, deleted again on drop when the
    /// test panicked (so one failure does not leak into the leak check).
    created: std::sync::Mutex<Vec<String>>,
    started: Instant,
    // Dropped last: the directory holds the socket, the log and mount points.
    dir: tempfile::TempDir,
}

/// How long a driver may take to open its socket (TCG guests are slow).
fn startup_timeout() -> Duration {
    if lvm_enabled() {
        Duration::from_secs(60)
    } else {
        Duration::from_secs(20)
    }
}

/// A channel to a unix socket.
pub async fn connect_unix(path: &Path) -> Result<Channel, tonic::transport::Error> {
    let path = path.to_path_buf();
    Endpoint::try_from("http://[::]:50051")
        .expect("static endpoint")
        .connect_with_connector(tower::service_fn(move |_| {
            let p = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(p).await?))
            }
        }))
        .await
}

impl Driver {
    /// Start a driver with the default flags (two device classes).
    pub async fn start() -> Driver {
        DriverBuilder::new().start().await
    }

    pub fn builder() -> DriverBuilder {
        DriverBuilder::new()
    }

    async fn connect(&mut self) {
        let deadline = Instant::now() + startup_timeout();
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().expect("try_wait"))
            {
                panic!(
                    "lodestone exited during startup ({status}); log:\n{}",
                    self.log()
                );
            }
            if self.socket.exists() {
                let socket = self.socket.clone();
                let rt = self.client_rt.as_ref().expect("client runtime");
                let attempt = rt.spawn(async move {
                    let ch = connect_unix(&socket).await.ok()?;
                    // A socket file may be stale; a real RPC proves the
                    // server is up.
                    let mut id = IdentityClient::new(ch.clone());
                    id.get_plugin_info(csi::GetPluginInfoRequest {})
                        .await
                        .ok()?;
                    Some(ch)
                });
                if let Ok(Some(ch)) = attempt.await {
                    self.channel = Some(ch);
                    return;
                }
            }
            if Instant::now() >= deadline {
                panic!(
                    "lodestone did not serve {} within {:?}; log:\n{}",
                    self.socket.display(),
                    startup_timeout(),
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Stop the driver (SIGTERM, waiting up to 10 s) and hand back its
    /// directory, e.g. to start another driver on the same socket path.
    pub fn stop_and_keep_dir(mut self) -> (Option<ExitStatus>, tempfile::TempDir) {
        let status = self.terminate(Duration::from_secs(10));
        let dir = std::mem::replace(&mut self.dir, new_temp_dir());
        (status, dir)
    }

    /// The temporary directory of this driver.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A fresh path under the driver's directory (not created).
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Path as a String (CSI paths are strings).
    pub fn path_str(&self, name: &str) -> String {
        self.path(name)
            .to_str()
            .expect("utf-8 temp dir")
            .to_string()
    }

    /// Everything the driver wrote to stdout and stderr so far.
    pub fn log(&self) -> String {
        read_lossy(&self.log_path)
    }

    pub fn channel(&self) -> Channel {
        self.channel.clone().expect("connected")
    }

    pub fn identity(&self) -> IdentityClient<Channel> {
        IdentityClient::new(self.channel())
    }

    pub fn controller(&self) -> ControllerClient<Channel> {
        ControllerClient::new(self.channel())
    }

    pub fn node(&self) -> NodeClient<Channel> {
        NodeClient::new(self.channel())
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    /// Send SIGTERM and wait up to `timeout` for the process to exit.
    pub fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        self.channel = None;
        let child = self.child.as_mut()?;
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let status = wait_timeout(child, timeout);
        if status.is_some() {
            self.child = None;
        }
        status
    }

    /// Detach every mount below the temporary directory (deepest first), so a
    /// test that failed half-way does not leave volumes mounted and removing
    /// the directory does not walk into them.
    fn unmount_leftovers(&self) {
        let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") else {
            return;
        };
        let root = self.dir.path();
        let mut points: Vec<PathBuf> = mountinfo
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .map(|p| PathBuf::from(unescape_mount_path(p)))
            .filter(|p| p.starts_with(root))
            .collect();
        points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for p in points {
            let _ = nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// `/proc/self/mountinfo` escapes space, tab, newline and backslash as \ooo.
pub fn unescape_mount_path(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| c.is_ascii_digit()) {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether `path` is a mount point (listed in /proc/self/mountinfo).
pub fn is_mount_point(path: &Path) -> bool {
    let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|p| Path::new(&unescape_mount_path(p)) == path)
}

impl Drop for Driver {
    fn drop(&mut self) {
        if std::thread::panicking() && lvm_enabled() {
            self.cleanup_after_panic();
        }
        self.channel = None;
        let status = self.terminate(Duration::from_secs(10));
        if let Some(child) = self.child.as_mut() {
            if status.is_none() {
                eprintln!("lodestone did not exit within 10s of SIGTERM; killing it");
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if std::thread::panicking() {
            eprintln!(
                "----- lodestone log ({}) -----\n{}\n----- end of lodestone log -----",
                self.log_path.display(),
                self.log()
            );
        }
        if lvm_enabled() {
            self.unmount_leftovers();
        }
        if let Some(rt) = self.client_rt.take() {
            rt.shutdown_background();
        }
        eprintln!(
            "[lodestone-ct] driver lifetime {:?}",
            self.started.elapsed()
        );
    }
}

impl Driver {
    /// After a failed guest test: detach what is mounted below our directory
    /// and delete (through the still running driver) every volume the test
    /// created, best effort.
    fn cleanup_after_panic(&mut self) {
        let ids = std::mem::take(&mut *self.created.lock().unwrap_or_else(|e| e.into_inner()));
        if ids.is_empty() || self.channel.is_none() || self.client_rt.is_none() {
            return;
        }
        self.unmount_leftovers();
        let (tx, rx) = std::sync::mpsc::channel();
        let mut c = self.controller();
        let rt = self.client_rt.as_ref().expect("client runtime");
        rt.spawn(async move {
            for id in ids {
                let r = c
                    .delete_volume(csi::DeleteVolumeRequest {
                        volume_id: id.clone(),
                        ..Default::default()
                    })
                    .await;
                if let Err(e) = r {
                    eprintln!(
                        "cleanup: DeleteVolume({id}): {:?}: {}",
                        e.code(),
                        e.message()
                    );
                }
            }
            let _ = tx.send(());
        });
        if rx.recv_timeout(Duration::from_secs(120)).is_err() {
            eprintln!("cleanup: deleting the test's volumes timed out");
        }
    }
}

// ---------------------------------------------------------------------------
// Message builders
// ---------------------------------------------------------------------------

pub fn access_mode(mode: Mode) -> Option<AccessMode> {
    Some(AccessMode { mode: mode as i32 })
}

/// A mount capability for `fs` (empty for the driver's default), single-node writer.
pub fn mount_cap(fs: &str) -> csi::VolumeCapability {
    mount_cap_with(fs, &[], Mode::SingleNodeWriter)
}

pub fn mount_cap_with(fs: &str, flags: &[&str], mode: Mode) -> csi::VolumeCapability {
    csi::VolumeCapability {
        block: None,
        mount: Some(MountVolume {
            fs_type: fs.to_string(),
            mount_flags: flags.iter().map(|s| s.to_string()).collect(),
            volume_mount_group: String::new(),
        }),
        access_mode: access_mode(mode),
    }
}

pub fn ext4() -> csi::VolumeCapability {
    mount_cap("ext4")
}

pub fn xfs() -> csi::VolumeCapability {
    mount_cap("xfs")
}

pub fn btrfs() -> csi::VolumeCapability {
    mount_cap("btrfs")
}

/// A raw block capability, single-node writer.
pub fn block_cap() -> csi::VolumeCapability {
    block_cap_with(Mode::SingleNodeWriter)
}

pub fn block_cap_with(mode: Mode) -> csi::VolumeCapability {
    csi::VolumeCapability {
        block: Some(BlockVolume {}),
        mount: None,
        access_mode: access_mode(mode),
    }
}

/// The same capability with another access mode.
pub fn with_mode(mut cap: csi::VolumeCapability, mode: Mode) -> csi::VolumeCapability {
    cap.access_mode = access_mode(mode);
    cap
}

pub fn params(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Parameters selecting device class `class`.
pub fn class_params(class: &str) -> HashMap<String, String> {
    params(&[(DEVICE_CLASS_PARAM, class)])
}

pub fn range(required: i64, limit: i64) -> Option<csi::CapacityRange> {
    Some(csi::CapacityRange {
        required_bytes: required,
        limit_bytes: limit,
    })
}

/// A CreateVolume request for `name` in `class` with one capability.
pub fn create_req(
    name: &str,
    class: &str,
    cap: csi::VolumeCapability,
    required: i64,
    limit: i64,
) -> csi::CreateVolumeRequest {
    csi::CreateVolumeRequest {
        name: name.to_string(),
        capacity_range: if required == 0 && limit == 0 {
            None
        } else {
            range(required, limit)
        },
        volume_capabilities: vec![cap],
        parameters: class_params(class),
        ..Default::default()
    }
}

/// A topology naming one node.
pub fn node_topology(node: &str) -> csi::Topology {
    csi::Topology {
        segments: params(&[(TOPOLOGY_KEY, node)]),
    }
}

/// A unique, valid volume name for this test run.
pub fn unique_name(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

// ---------------------------------------------------------------------------
// Assertions
// ---------------------------------------------------------------------------

/// Assert that an RPC failed with `code`; returns the status.
#[track_caller]
pub fn expect_code<T: std::fmt::Debug>(
    result: Result<tonic::Response<T>, tonic::Status>,
    code: Code,
    what: &str,
) -> tonic::Status {
    match result {
        Ok(resp) => panic!("{what}: expected {code:?}, got OK: {:?}", resp.into_inner()),
        Err(status) => {
            assert_eq!(
                status.code(),
                code,
                "{what}: expected {code:?}, got {:?}: {}",
                status.code(),
                status.message()
            );
            // The spec: the status `details` MUST be empty.
            assert!(
                status.details().is_empty(),
                "{what}: status details must be empty"
            );
            status
        }
    }
}

/// Assert that an RPC succeeded; returns the reply.
#[track_caller]
pub fn expect_ok<T>(result: Result<tonic::Response<T>, tonic::Status>, what: &str) -> T {
    match result {
        Ok(resp) => resp.into_inner(),
        Err(status) => {
            panic!(
                "{what}: expected OK, got {:?}: {}",
                status.code(),
                status.message()
            )
        }
    }
}

/// Assert that an RPC failed with one of `codes`.
#[track_caller]
pub fn expect_one_of<T: std::fmt::Debug>(
    result: Result<tonic::Response<T>, tonic::Status>,
    codes: &[Code],
    what: &str,
) -> tonic::Status {
    match result {
        Ok(resp) => panic!(
            "{what}: expected one of {codes:?}, got OK: {:?}",
            resp.into_inner()
        ),
        Err(status) => {
            assert!(
                codes.contains(&status.code()),
                "{what}: expected one of {codes:?}, got {:?}: {}",
                status.code(),
                status.message()
            );
            status
        }
    }
}

// ---------------------------------------------------------------------------
// LVM inspection (guest only)
// ---------------------------------------------------------------------------

/// One logical volume as `lvm lvs` reports it.
#[derive(Debug, Clone)]
pub struct Lv {
    pub vg: String,
    pub name: String,
    pub tags: Vec<String>,
    pub size_bytes: u64,
}

impl Lv {
    /// Whether the LV carries a tag that marks it as Lodestone's.
    pub fn is_lodestone(&self) -> bool {
        self.tags
            .iter()
            .any(|t| t.to_ascii_lowercase().contains("lodestone"))
    }
}

/// Every LV in the fixture's volume groups.
pub fn list_lvs() -> Vec<Lv> {
    let out = Command::new("lvm")
        .args([
            "lvs",
            "--reportformat",
            "json",
            "--units",
            "b",
            "--nosuffix",
            "-o",
            "vg_name,lv_name,lv_tags,lv_size",
            THIN_VG,
            THICK_VG,
            NODE2_VG,
        ])
        .output()
        .expect("run lvm lvs");
    assert!(
        out.status.success(),
        "lvm lvs failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("lvs json");
    let mut lvs = Vec::new();
    for report in v["report"].as_array().into_iter().flatten() {
        for lv in report["lv"].as_array().into_iter().flatten() {
            let s = |k: &str| lv[k].as_str().unwrap_or_default().to_string();
            lvs.push(Lv {
                vg: s("vg_name"),
                name: s("lv_name"),
                tags: s("lv_tags")
                    .split(',')
                    .filter(|t| !t.is_empty())
                    .map(String::from)
                    .collect(),
                size_bytes: s("lv_size").parse().unwrap_or(0),
            });
        }
    }
    lvs
}

/// LVs that Lodestone created.
pub fn lodestone_lvs() -> Vec<Lv> {
    list_lvs().into_iter().filter(Lv::is_lodestone).collect()
}

// ---------------------------------------------------------------------------
// Volume helpers (guest tests)
// ---------------------------------------------------------------------------

impl Driver {
    /// CreateVolume that must succeed; returns the volume.
    pub async fn create_ok(&self, req: csi::CreateVolumeRequest) -> csi::Volume {
        let what = format!("CreateVolume({:?}, {:?})", req.name, req.parameters);
        let reply = expect_ok(self.controller().create_volume(req).await, &what);
        let volume = reply
            .volume
            .unwrap_or_else(|| panic!("{what}: reply without volume"));
        self.track(&volume.volume_id);
        volume
    }

    /// Remember a volume for deletion should the test fail.
    pub fn track(&self, volume_id: &str) {
        let mut created = self.created.lock().unwrap_or_else(|e| e.into_inner());
        if !created.iter().any(|id| id == volume_id) {
            created.push(volume_id.to_string());
        }
    }

    /// CreateVolume of `name` in `class`, must succeed.
    pub async fn create(
        &self,
        name: &str,
        class: &str,
        cap: csi::VolumeCapability,
        required: i64,
        limit: i64,
    ) -> csi::Volume {
        self.create_ok(create_req(name, class, cap, required, limit))
            .await
    }

    /// DeleteVolume that must succeed.
    pub async fn delete(&self, volume_id: &str) {
        let r = self
            .controller()
            .delete_volume(csi::DeleteVolumeRequest {
                volume_id: volume_id.to_string(),
                ..Default::default()
            })
            .await;
        expect_ok(r, &format!("DeleteVolume({volume_id})"));
    }

    /// A NodeStageVolume request for `volume_id` at `<dir>/<staging>`.
    pub fn stage_req(
        &self,
        volume_id: &str,
        staging: &str,
        cap: csi::VolumeCapability,
    ) -> csi::NodeStageVolumeRequest {
        csi::NodeStageVolumeRequest {
            volume_id: volume_id.to_string(),
            staging_target_path: self.path_str(staging),
            volume_capability: Some(cap),
            ..Default::default()
        }
    }

    /// NodeStageVolume that must succeed. Creates the staging directory first,
    /// as the CO does.
    pub async fn stage(&self, volume_id: &str, staging: &str, cap: csi::VolumeCapability) {
        std::fs::create_dir_all(self.path(staging)).expect("create staging dir");
        let r = self
            .node()
            .node_stage_volume(self.stage_req(volume_id, staging, cap))
            .await;
        expect_ok(r, &format!("NodeStageVolume({volume_id}, {staging})"));
    }

    pub async fn unstage(&self, volume_id: &str, staging: &str) {
        let r = self
            .node()
            .node_unstage_volume(csi::NodeUnstageVolumeRequest {
                volume_id: volume_id.to_string(),
                staging_target_path: self.path_str(staging),
            })
            .await;
        expect_ok(r, &format!("NodeUnstageVolume({volume_id}, {staging})"));
    }

    pub fn publish_req(
        &self,
        volume_id: &str,
        staging: &str,
        target: &str,
        cap: csi::VolumeCapability,
        readonly: bool,
    ) -> csi::NodePublishVolumeRequest {
        csi::NodePublishVolumeRequest {
            volume_id: volume_id.to_string(),
            staging_target_path: self.path_str(staging),
            target_path: self.path_str(target),
            volume_capability: Some(cap),
            readonly,
            ..Default::default()
        }
    }

    /// NodePublishVolume that must succeed. The target path itself is left
    /// for the plugin to create (the spec makes that the SP's job).
    pub async fn publish(
        &self,
        volume_id: &str,
        staging: &str,
        target: &str,
        cap: csi::VolumeCapability,
        readonly: bool,
    ) {
        let req = self.publish_req(volume_id, staging, target, cap, readonly);
        let r = self.node().node_publish_volume(req).await;
        expect_ok(
            r,
            &format!("NodePublishVolume({volume_id}, {target}, ro={readonly})"),
        );
    }

    pub async fn unpublish(&self, volume_id: &str, target: &str) {
        let r = self
            .node()
            .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                volume_id: volume_id.to_string(),
                target_path: self.path_str(target),
            })
            .await;
        expect_ok(r, &format!("NodeUnpublishVolume({volume_id}, {target})"));
    }

    pub async fn stats(&self, volume_id: &str, path: &str) -> csi::NodeGetVolumeStatsResponse {
        let r = self
            .node()
            .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
                volume_id: volume_id.to_string(),
                volume_path: self.path_str(path),
                staging_target_path: String::new(),
            })
            .await;
        expect_ok(r, &format!("NodeGetVolumeStats({volume_id}, {path})"))
    }

    pub async fn capacity(&self, class: &str) -> i64 {
        let r = self
            .controller()
            .get_capacity(csi::GetCapacityRequest {
                volume_capabilities: vec![],
                parameters: class_params(class),
                accessible_topology: Some(node_topology(&self.node_id)),
            })
            .await;
        expect_ok(r, &format!("GetCapacity({class})")).available_capacity
    }

    /// Every volume ListVolumes reports, following next_token.
    pub async fn list_all(&self, max_entries: i32) -> Vec<csi::Volume> {
        let mut out = Vec::new();
        let mut token = String::new();
        for _ in 0..10_000 {
            let r = self
                .controller()
                .list_volumes(csi::ListVolumesRequest {
                    max_entries,
                    starting_token: token.clone(),
                })
                .await;
            let page = expect_ok(r, &format!("ListVolumes(max {max_entries}, {token:?})"));
            if max_entries > 0 {
                assert!(
                    page.entries.len() <= max_entries as usize,
                    "page of {} entries for max_entries {max_entries}",
                    page.entries.len()
                );
            }
            out.extend(
                page.entries
                    .into_iter()
                    .map(|e| e.volume.expect("entry.volume")),
            );
            if page.next_token.is_empty() {
                return out;
            }
            token = page.next_token;
        }
        panic!("ListVolumes did not end after 10000 pages");
    }
}

/// The usage entry with `unit`.
pub fn usage(
    stats: &csi::NodeGetVolumeStatsResponse,
    unit: csi::volume_usage::Unit,
) -> Option<csi::VolumeUsage> {
    stats.usage.iter().find(|u| u.unit() == unit).cloned()
}

/// The value of this node's topology segment on a volume, if any.
pub fn volume_nodes(v: &csi::Volume) -> Vec<String> {
    v.accessible_topology
        .iter()
        .filter_map(|t| t.segments.get(TOPOLOGY_KEY).cloned())
        .collect()
}

/// VmRSS, RssAnon, RssFile, VmHWM and threads of a process, from /proc,
/// on one line (for memory figures the tests print).
pub fn process_memory(pid: i32) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .filter(|l| {
            ["VmRSS", "RssAnon", "RssFile", "VmHWM", "Threads"]
                .iter()
                .any(|k| l.starts_with(k))
        })
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join(", ")
}
