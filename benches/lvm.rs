//! Lodestone LVM benchmark: each CSI call of the release driver against the
//! raw commands it wraps, the `lvm` processes it spawns per call, and the
//! driver's memory.
//!
//! It needs real LVM: device-mapper and the volume groups that
//! `tests/vm/lvm-fixture.sh setup` makes (`lodestone-thin` with thin pool
//! `pool0`, `lodestone-thick`). `scripts/bench.sh` builds it and runs it in
//! the QEMU guest. A markdown report goes to stdout, progress to stderr.
//!
//! How it measures: the driver (`target/release/lodestone`) runs as its own
//! process with JSON logs; with `lodestone::runner=debug` every external
//! command it spawns is a log line ("ran command", with the command line and
//! its elapsed time). The bench reads the new lines after each call, so it
//! knows which processes each call spawned. Beside every driver call it runs
//! the same commands directly (the argv copied from the driver's log, only
//! the LV name changed) with `std::process::Command`. Rounds alternate which
//! side goes first; round 0 is a warm-up and is not counted.
//!
//! Options (each also an environment variable; flags win):
//!
//! ```text
//!   --iterations N    LODESTONE_BENCH_ITERATIONS    timed rounds per class (10)
//!   --list-volumes N  LODESTONE_BENCH_LIST_VOLUMES  volumes present for ListVolumes (20)
//!   --rss-volumes N   LODESTONE_BENCH_RSS_VOLUMES   thin volumes for the memory test (200)
//!   --classes LIST    LODESTONE_BENCH_CLASSES       device classes to measure (thin,thick)
//!   --snapshots N     LODESTONE_BENCH_SNAPSHOTS     timed snapshot + restore rounds per class (3)
//!   --snapshot-mib N  LODESTONE_BENCH_SNAPSHOT_MIB  size of the (filled) source volume (128)
//!   --volumes-only / --snapshots-only: skip the other half (flag, or
//!                     LODESTONE_BENCH_ONLY=volumes|snapshots)
//!   --dir PATH        LODESTONE_BENCH_DIR           work dir (default: a new dir in /tmp)
//! ```

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use lodestone::client::{self, Client};
use lodestone::csi::volume_capability::{access_mode, AccessMode, MountVolume};
use lodestone::csi::*;

type R<T> = Result<T, String>;

const THIN_VG: &str = "lodestone-thin";
const THICK_VG: &str = "lodestone-thick";
const NODE_ID: &str = "bench";
const MIB: i64 = 1 << 20;
/// Size of the volumes that are staged (the timed rounds).
const VOLUME_BYTES: i64 = 64 * MIB;
/// Size of the volumes that only have to exist (ListVolumes, memory): the
/// ext4 minimum, so 200 of them fit the fixture's thin pool promise.
const FILLER_BYTES: i64 = 16 * MIB;
/// The driver is fast at everything but the commands it runs: at most this
/// times the raw commands.
const LATENCY_TARGET: f64 = 1.1;
const RSS_TARGET_KB: u64 = 15 * 1024;
/// The stage+publish row again, against raw commands without the blank check.
const NO_BLKID: &str = "NodeStage+NodePublish, raw without blkid";

// ---------------------------------------------------------------- options

struct Opts {
    iterations: usize,
    list_volumes: usize,
    rss_volumes: usize,
    classes: Vec<String>,
    dir: Option<PathBuf>,
    snapshots: usize,
    snapshot_mib: usize,
    /// Run the volume rounds (create/stage/publish/list/memory).
    volumes: bool,
}

fn usage() -> ! {
    eprintln!(
        "usage: lvm-bench [--iterations N] [--list-volumes N] [--rss-volumes N] \
         [--classes thin,thick] [--dir PATH] [--snapshots N] [--snapshot-mib N] \
         [--volumes-only|--snapshots-only]\n\
         needs the tests/vm/lvm-fixture.sh volume groups; run it through scripts/bench.sh"
    );
    std::process::exit(2)
}

impl Opts {
    fn parse() -> Opts {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let mut opts = Opts {
            iterations: 10,
            list_volumes: 20,
            rss_volumes: 200,
            classes: vec!["thin".into(), "thick".into()],
            dir: env("LODESTONE_BENCH_DIR").map(PathBuf::from),
            snapshots: 3,
            snapshot_mib: 128,
            volumes: true,
        };
        match env("LODESTONE_BENCH_ONLY").as_deref() {
            Some("volumes") => opts.snapshots = 0,
            Some("snapshots") => opts.volumes = false,
            _ => {}
        }
        let set = |name: &str, value: &str, opts: &mut Opts| {
            let num = || value.parse::<usize>().unwrap_or_else(|_| usage());
            match name {
                "iterations" => opts.iterations = num().max(1),
                "list-volumes" => opts.list_volumes = num(),
                "rss-volumes" => opts.rss_volumes = num(),
                "classes" => {
                    opts.classes = value
                        .split(',')
                        .filter(|c| !c.is_empty())
                        .map(str::to_string)
                        .collect()
                }
                "dir" => opts.dir = Some(PathBuf::from(value)),
                "snapshots" => opts.snapshots = num(),
                "snapshot-mib" => opts.snapshot_mib = num().max(16),
                _ => usage(),
            }
        };
        for name in [
            "iterations",
            "list-volumes",
            "rss-volumes",
            "classes",
            "snapshots",
            "snapshot-mib",
        ] {
            let var = format!("LODESTONE_BENCH_{}", name.to_uppercase().replace('-', "_"));
            if let Some(v) = env(&var) {
                set(name, &v, &mut opts);
            }
        }
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            match arg.as_str() {
                // cargo bench passes --bench to every bench binary
                "--bench" => {}
                "-h" | "--help" => usage(),
                "--volumes-only" => opts.snapshots = 0,
                "--snapshots-only" => opts.volumes = false,
                a if a.starts_with("--") => {
                    let (name, value) = match a[2..].split_once('=') {
                        Some((n, v)) => (n.to_string(), v.to_string()),
                        None => (a[2..].to_string(), args.next().unwrap_or_else(|| usage())),
                    };
                    set(&name, &value, &mut opts);
                }
                _ => usage(),
            }
        }
        for c in &opts.classes {
            if c != "thin" && c != "thick" {
                eprintln!("unknown class {c:?}: the fixture has thin and thick");
                usage();
            }
        }
        opts
    }
}

// ---------------------------------------------------------------- statistics

fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

fn min(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::NEG_INFINITY, f64::max)
}

fn ms(x: f64) -> String {
    if x.is_nan() || x.is_infinite() {
        "–".into()
    } else if x < 10.0 {
        format!("{x:.2}")
    } else if x < 100.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.0}")
    }
}

fn range(v: &[f64]) -> String {
    if v.is_empty() {
        "–".into()
    } else {
        format!("{}–{}", ms(min(v)), ms(max(v)))
    }
}

fn count_range(v: &[u32]) -> String {
    match (v.iter().min(), v.iter().max()) {
        (Some(a), Some(b)) if a == b => a.to_string(),
        (Some(a), Some(b)) => format!("{a}–{b}"),
        _ => "–".into(),
    }
}

/// One row of the latency table: a CSI call (or a pair) of one class.
#[derive(Default)]
struct Op {
    /// Milliseconds per driver call, as the client saw it.
    driver: Vec<f64>,
    /// Milliseconds the driver spent waiting for its child processes.
    children: Vec<f64>,
    /// Milliseconds of the raw commands that do the same work.
    raw: Vec<f64>,
    /// lvm processes per driver call.
    lvm: Vec<u32>,
    /// Other processes per driver call, by program.
    other: BTreeMap<String, Vec<u32>>,
    /// Calls recorded (for `other`, whose vectors only hold calls that ran it).
    calls: u32,
    /// What the raw side runs, for the table.
    raw_what: String,
    /// lvm processes the design promises per call.
    expected_lvm: u32,
}

#[derive(Default)]
struct Table {
    order: Vec<(String, String)>,
    ops: HashMap<(String, String), Op>,
}

impl Table {
    fn op(&mut self, class: &str, name: &str) -> &mut Op {
        let key = (class.to_string(), name.to_string());
        if !self.ops.contains_key(&key) {
            self.order.push(key.clone());
        }
        self.ops.entry(key).or_default()
    }

    fn driver(&mut self, class: &str, name: &str, call: &Call) {
        let op = self.op(class, name);
        op.driver.push(call.ms);
        op.children
            .push(call.ran.iter().map(|r| r.elapsed_ms).sum());
        op.lvm
            .push(call.ran.iter().filter(|r| r.program() == "lvm").count() as u32);
        op.calls += 1;
        let mut by_program: BTreeMap<String, u32> = BTreeMap::new();
        for r in call.ran.iter().filter(|r| r.program() != "lvm") {
            *by_program.entry(r.program().to_string()).or_default() += 1;
        }
        for (p, n) in by_program {
            op.other.entry(p).or_default().push(n);
        }
    }

    fn raw(&mut self, class: &str, name: &str, what: &str, expected_lvm: u32, ms: f64) {
        let op = self.op(class, name);
        op.raw.push(ms);
        op.raw_what = what.to_string();
        op.expected_lvm = expected_lvm;
    }
}

/// Per external command: the raw run's time and the time of the same
/// command inside the driver (from its log).
#[derive(Default)]
struct CmdTimes {
    raw: Vec<f64>,
    driver: Vec<f64>,
}

// ---------------------------------------------------------------- the driver

/// One external command the driver ran, from its log.
#[derive(Debug, Clone)]
struct Ran {
    line: String,
    argv: Vec<String>,
    elapsed_ms: f64,
    code: i64,
}

impl Ran {
    fn program(&self) -> &str {
        let p = self.argv.first().map(String::as_str).unwrap_or("");
        p.rsplit('/').next().unwrap_or(p)
    }

    /// `lvm lvcreate`, `mkfs.ext4`, ...
    fn short(&self) -> String {
        if self.program() == "lvm" {
            format!("lvm {}", self.argv.get(1).map(String::as_str).unwrap_or(""))
        } else {
            self.program().to_string()
        }
    }
}

/// Splits a logged command line (argv joined by spaces) back into argv. Only
/// the value of `--config` holds spaces: it runs to the first ` -` outside
/// braces and quotes.
fn split_logged(line: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut rest = line;
    while !rest.is_empty() {
        let end = if out.last().map(String::as_str) == Some("--config") {
            let (mut depth, mut quoted, mut end) = (0i32, false, rest.len());
            for (i, c) in rest.char_indices() {
                match c {
                    '"' => quoted = !quoted,
                    '{' if !quoted => depth += 1,
                    '}' if !quoted => depth -= 1,
                    ' ' if !quoted && depth == 0 && rest[i + 1..].starts_with('-') => {
                        end = i;
                        break;
                    }
                    _ => {}
                }
            }
            end
        } else {
            rest.find(' ').unwrap_or(rest.len())
        };
        out.push(rest[..end].to_string());
        rest = rest[end..].strip_prefix(' ').unwrap_or(&rest[end..]);
    }
    out
}

/// What one driver call cost.
struct Call {
    ms: f64,
    ran: Vec<Ran>,
}

struct Driver {
    child: Child,
    pid: u32,
    log_path: PathBuf,
    log_pos: u64,
    client: Client,
    /// WARN and ERROR lines of the driver's log.
    complaints: Vec<String>,
    start_ms: f64,
    start_commands: Vec<Ran>,
}

impl Driver {
    async fn start(dir: &Path) -> R<Driver> {
        let socket = dir.join("csi.sock");
        let log_path = dir.join("driver.log");
        let log = File::create(&log_path).map_err(|e| format!("create driver.log: {e}"))?;
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_lodestone"));
        cmd.arg("--endpoint")
            .arg(format!("unix://{}", socket.display()))
            .args(["--node-id", NODE_ID])
            .args(["--device-class", &format!("thin={THIN_VG}/pool0")])
            .args(["--device-class", &format!("thick={THICK_VG}")])
            .args(["--lvm-refresh-seconds", "0", "--log-format", "json"])
            .env("RUST_LOG", "info,lodestone::runner=debug")
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log);
        // Only the flags above configure the driver.
        for (k, _) in std::env::vars() {
            if k.starts_with("LODESTONE_") || k == "CSI_ENDPOINT" {
                cmd.env_remove(&k);
            }
        }
        let started = Instant::now();
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("start {}: {e}", env!("CARGO_BIN_EXE_lodestone")))?;
        let pid = child.id();
        let client = loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!(
                    "the driver exited at start ({status}):\n{}",
                    std::fs::read_to_string(&log_path).unwrap_or_default()
                ));
            }
            if socket.exists() {
                if let Ok(mut c) = client::connect(&socket).await {
                    let ready = c
                        .identity
                        .probe(ProbeRequest {})
                        .await
                        .map(|r| r.into_inner().ready.unwrap_or(true))
                        .unwrap_or(false);
                    if ready {
                        break c;
                    }
                }
            }
            if started.elapsed() > Duration::from_secs(180) {
                let _ = child.kill();
                return Err("the driver did not become ready within 180 s".into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let start_ms = started.elapsed().as_secs_f64() * 1000.0;
        let mut d = Driver {
            child,
            pid,
            log_path,
            log_pos: 0,
            client,
            complaints: Vec::new(),
            start_ms,
            start_commands: Vec::new(),
        };
        d.start_commands = d.take_log()?;
        Ok(d)
    }

    /// The commands the driver logged since the last call.
    fn take_log(&mut self) -> R<Vec<Ran>> {
        let mut f = File::open(&self.log_path).map_err(|e| e.to_string())?;
        f.seek(SeekFrom::Start(self.log_pos))
            .map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf).map_err(|e| e.to_string())?;
        // only whole lines; a line being written is read next time
        let Some(last_nl) = buf.iter().rposition(|&b| b == b'\n') else {
            return Ok(Vec::new());
        };
        self.log_pos += last_nl as u64 + 1;
        let text = String::from_utf8_lossy(&buf[..=last_nl]);
        let mut ran = Vec::new();
        for line in text.lines() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                self.complaints.push(format!("(not JSON) {line}"));
                continue;
            };
            let fields = v.get("fields").unwrap_or(&v);
            let level = v.get("level").and_then(|l| l.as_str()).unwrap_or("");
            if level == "WARN" || level == "ERROR" {
                self.complaints.push(line.to_string());
            }
            if fields.get("message").and_then(|m| m.as_str()) != Some("ran command") {
                continue;
            }
            let command = fields
                .get("command")
                .and_then(|c| c.as_str())
                .unwrap_or("")
                .to_string();
            ran.push(Ran {
                argv: split_logged(&command),
                line: command,
                elapsed_ms: fields
                    .get("elapsed_ms")
                    .and_then(|e| e.as_f64())
                    .unwrap_or(0.0),
                code: fields.get("code").and_then(|c| c.as_i64()).unwrap_or(-1),
            });
        }
        Ok(ran)
    }

    /// (VmRSS, VmHWM) in kB.
    fn memory(&self) -> R<(u64, u64)> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid))
            .map_err(|e| format!("read the driver's /proc status: {e}"))?;
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        Ok((field("VmRSS:"), field("VmHWM:")))
    }

    /// Times one call and collects the commands it ran.
    async fn call<T, F>(&mut self, what: &str, f: F) -> R<(T, Call)>
    where
        F: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let t = Instant::now();
        let out = f.await;
        let ms = t.elapsed().as_secs_f64() * 1000.0;
        let ran = self.take_log()?;
        match out {
            Ok(r) => Ok((r.into_inner(), Call { ms, ran })),
            Err(s) => Err(format!(
                "{what}: {:?}: {}\ncommands it ran: {:#?}",
                s.code(),
                s.message(),
                ran.iter().map(|r| &r.line).collect::<Vec<_>>()
            )),
        }
    }

    /// SIGTERM, then waits; true when it exited by itself and cleanly.
    fn stop(&mut self) -> bool {
        let pid = nix::unistd::Pid::from_raw(self.pid as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        false
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.stop();
        }
    }
}

// ---------------------------------------------------------------- raw side

/// Runs one command the way the driver's runner does (argv, stdin closed,
/// output captured, `LVM_SUPPRESS_FD_WARNINGS=1` for lvm) and times it.
fn run_raw(argv: &[String], ok_codes: &[i32]) -> R<f64> {
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..]).stdin(Stdio::null());
    if argv[0].rsplit('/').next() == Some("lvm") {
        cmd.env("LVM_SUPPRESS_FD_WARNINGS", "1");
    }
    let t = Instant::now();
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {}: {e}", argv[0]))?;
    let ms = t.elapsed().as_secs_f64() * 1000.0;
    let code = out.status.code().unwrap_or(-1);
    if !ok_codes.contains(&code) {
        return Err(format!(
            "{} failed ({code}): {}",
            argv.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(ms)
}

/// Writes `bytes` of non-zero data to a device (so no copy can skip it).
fn fill(dev: &str, bytes: usize) -> R<()> {
    use std::io::Write;
    let mut f = File::options()
        .write(true)
        .open(dev)
        .map_err(|e| format!("open {dev}: {e}"))?;
    let chunk: Vec<u8> = (0..1 << 20)
        .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 13) as u8 | 1)
        .collect();
    for _ in 0..bytes / chunk.len() {
        f.write_all(&chunk)
            .map_err(|e| format!("write {dev}: {e}"))?;
    }
    f.sync_all().map_err(|e| format!("fsync {dev}: {e}"))
}

/// Whether a reply means the work is complete.
trait Ready {
    fn ready(&self) -> bool;
}

impl Ready for CreateSnapshotResponse {
    fn ready(&self) -> bool {
        self.snapshot.as_ref().is_some_and(|s| s.ready_to_use)
    }
}

impl Ready for CreateVolumeResponse {
    fn ready(&self) -> bool {
        true
    }
}

fn argv(parts: &[&str]) -> Vec<String> {
    parts.iter().map(|s| s.to_string()).collect()
}

/// The LV a create made: the value of `--name` in the driver's lvcreate.
fn lv_of_create(ran: &[Ran]) -> R<String> {
    ran.iter()
        .filter(|r| r.short() == "lvm lvcreate")
        .find_map(|r| {
            let at = r.argv.iter().position(|a| a == "--name")?;
            r.argv.get(at + 1).cloned()
        })
        .ok_or_else(|| {
            format!(
                "CreateVolume ran no lvcreate --name; it ran: {:?}",
                ran.iter().map(|r| &r.line).collect::<Vec<_>>()
            )
        })
}

/// A command the driver ran, to be run again on another LV.
#[derive(Clone)]
struct Template {
    argv: Vec<String>,
    lv: String,
}

impl Template {
    fn find(ran: &[Ran], lv: &str, short: &str) -> R<Template> {
        let r = ran.iter().find(|r| r.short() == short).ok_or_else(|| {
            format!(
                "the driver ran no {short}; it ran: {:?}",
                ran.iter().map(|r| &r.line).collect::<Vec<_>>()
            )
        })?;
        Ok(Template {
            argv: r.argv.clone(),
            lv: lv.to_string(),
        })
    }

    fn on(&self, lv: &str) -> Vec<String> {
        self.argv.iter().map(|a| a.replace(&self.lv, lv)).collect()
    }
}

#[derive(Clone)]
struct Templates {
    lvcreate: Template,
    lvremove: Template,
    blkid: Template,
    mkfs: Template,
}

// ---------------------------------------------------------------- CSI requests

fn mount_cap() -> VolumeCapability {
    VolumeCapability {
        block: None,
        mount: Some(MountVolume {
            fs_type: "ext4".into(),
            mount_flags: vec![],
            volume_mount_group: String::new(),
        }),
        access_mode: Some(AccessMode {
            mode: access_mode::Mode::SingleNodeWriter as i32,
        }),
    }
}

fn create_req(name: &str, class: &str, bytes: i64) -> CreateVolumeRequest {
    CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![mount_cap()],
        parameters: HashMap::from([("deviceClass".to_string(), class.to_string())]),
        ..Default::default()
    }
}

fn vg_of(class: &str) -> &'static str {
    if class == "thin" {
        THIN_VG
    } else {
        THICK_VG
    }
}

// ---------------------------------------------------------------- the run

struct Bench {
    opts: Opts,
    dir: PathBuf,
    run_id: String,
    driver: Driver,
    table: Table,
    /// Per external command, by (class, command), in order of first use.
    cmds: Vec<((String, String), CmdTimes)>,
    /// Distinct command lines per (class, call), LV names replaced by `<lv>`.
    shapes: Vec<((String, String), Vec<String>)>,
    memory: Vec<(String, u64, u64)>,
    notes: Vec<String>,
    /// The driver's own report, copied for the raw side of ListVolumes.
    fullreport: Option<Template>,
    /// Volumes that only have to exist (ListVolumes, memory).
    filler_ids: Vec<String>,
}

impl Bench {
    fn new(opts: Opts, dir: PathBuf, driver: Driver) -> Bench {
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        Bench {
            opts,
            dir,
            run_id: format!("{:06x}", (secs ^ u64::from(std::process::id())) & 0xff_ffff),
            driver,
            table: Table::default(),
            cmds: Vec::new(),
            shapes: Vec::new(),
            memory: Vec::new(),
            notes: Vec::new(),
            fullreport: None,
            filler_ids: Vec::new(),
        }
    }

    fn progress(&self, msg: &str) {
        eprintln!("lvm-bench: {msg}");
    }

    fn shape(&mut self, class: &str, call: &str, lv: &str, ran: &[Ran]) {
        let key = (class.to_string(), call.to_string());
        let at = match self.shapes.iter().position(|(k, _)| *k == key) {
            Some(at) => at,
            None => {
                self.shapes.push((key, Vec::new()));
                self.shapes.len() - 1
            }
        };
        let list = &mut self.shapes[at].1;
        for r in ran {
            let shown: Vec<String> = r
                .argv
                .iter()
                .map(|a| {
                    let a = if lv.is_empty() {
                        a.clone()
                    } else {
                        a.replace(lv, "<lv>")
                    };
                    let a = match a.split_once('=') {
                        Some((k, _)) if k == "lodestone.v1.name" || k == "lodestone.v1.params" => {
                            format!("{k}=<…>")
                        }
                        _ => a,
                    };
                    if a.contains(' ') {
                        format!("'{a}'")
                    } else {
                        a
                    }
                })
                .collect();
            let line = format!("{}   # exit {}", shown.join(" "), r.code);
            if !list.contains(&line) {
                list.push(line);
            }
        }
    }

    fn cmd_times(&mut self, class: &str, short: &str) -> &mut CmdTimes {
        let key = (class.to_string(), short.to_string());
        let at = match self.cmds.iter().position(|(k, _)| *k == key) {
            Some(at) => at,
            None => {
                self.cmds.push((key, CmdTimes::default()));
                self.cmds.len() - 1
            }
        };
        &mut self.cmds[at].1
    }

    fn driver_cmd_times(&mut self, class: &str, ran: &[Ran]) {
        for r in ran {
            self.cmd_times(class, &r.short()).driver.push(r.elapsed_ms);
        }
    }

    fn raw_cmd(&mut self, class: &str, short: &str, argv: &[String], ok: &[i32]) -> R<f64> {
        let t = run_raw(argv, ok)?;
        self.cmd_times(class, short).raw.push(t);
        Ok(t)
    }

    fn remember_memory(&mut self, moment: &str) -> R<()> {
        let (rss, hwm) = self.driver.memory()?;
        self.progress(&format!(
            "driver memory {moment}: VmRSS {rss} kB, VmHWM {hwm} kB"
        ));
        self.memory.push((moment.to_string(), rss, hwm));
        Ok(())
    }

    async fn create(&mut self, name: &str, class: &str, bytes: i64) -> R<(String, Call)> {
        let mut c = self.driver.client.clone();
        let (resp, call) = self
            .driver
            .call(
                "CreateVolume",
                c.controller.create_volume(create_req(name, class, bytes)),
            )
            .await?;
        let vol = resp.volume.ok_or("CreateVolume returned no volume")?;
        Ok((vol.volume_id, call))
    }

    async fn delete(&mut self, id: &str) -> R<Call> {
        let mut c = self.driver.client.clone();
        let req = DeleteVolumeRequest {
            volume_id: id.to_string(),
            secrets: HashMap::new(),
        };
        let (_, call) = self
            .driver
            .call("DeleteVolume", c.controller.delete_volume(req))
            .await?;
        Ok(call)
    }

    /// One volume through the driver: create, stage, publish, unpublish,
    /// unstage, delete. Returns the commands it ran, as templates.
    async fn driver_round(&mut self, class: &str, i: usize, record: bool) -> R<Templates> {
        let name = format!("bench-{}-{class}-{i}", self.run_id);
        let staging = self.dir.join(format!("d-{class}-{i}-staging"));
        let target = self.dir.join(format!("d-{class}-{i}-target"));
        // kubelet makes the staging dir; the driver makes the target
        std::fs::create_dir_all(&staging).map_err(|e| e.to_string())?;
        let (s, t) = (staging.display().to_string(), target.display().to_string());

        let (id, create) = self.create(&name, class, VOLUME_BYTES).await?;
        let lv = lv_of_create(&create.ran)?;
        let mut c = self.driver.client.clone();
        let req = NodeStageVolumeRequest {
            volume_id: id.clone(),
            staging_target_path: s.clone(),
            volume_capability: Some(mount_cap()),
            ..Default::default()
        };
        let (_, stage) = self
            .driver
            .call("NodeStageVolume", c.node.node_stage_volume(req))
            .await?;
        let req = NodePublishVolumeRequest {
            volume_id: id.clone(),
            staging_target_path: s.clone(),
            target_path: t.clone(),
            volume_capability: Some(mount_cap()),
            ..Default::default()
        };
        let (_, publish) = self
            .driver
            .call("NodePublishVolume", c.node.node_publish_volume(req))
            .await?;
        let req = NodeUnpublishVolumeRequest {
            volume_id: id.clone(),
            target_path: t,
        };
        let (_, unpublish) = self
            .driver
            .call("NodeUnpublishVolume", c.node.node_unpublish_volume(req))
            .await?;
        let req = NodeUnstageVolumeRequest {
            volume_id: id.clone(),
            staging_target_path: s,
        };
        let (_, unstage) = self
            .driver
            .call("NodeUnstageVolume", c.node.node_unstage_volume(req))
            .await?;
        let delete = self.delete(&id).await?;
        let _ = std::fs::remove_dir(&staging);

        let templates = Templates {
            lvcreate: Template::find(&create.ran, &lv, "lvm lvcreate")?,
            lvremove: Template::find(&delete.ran, &lv, "lvm lvremove")?,
            blkid: Template::find(&stage.ran, &lv, "blkid")?,
            mkfs: Template::find(&stage.ran, &lv, "mkfs.ext4")?,
        };
        let calls = [
            ("CreateVolume", &create),
            ("NodeStageVolume", &stage),
            ("NodePublishVolume", &publish),
            ("NodeUnpublishVolume", &unpublish),
            ("NodeUnstageVolume", &unstage),
            ("DeleteVolume", &delete),
        ];
        for (call, c) in calls {
            self.shape(class, call, &lv, &c.ran);
        }
        if record {
            let both = |a: &Call, b: &Call| Call {
                ms: a.ms + b.ms,
                ran: a.ran.iter().chain(&b.ran).cloned().collect(),
            };
            let tb = &mut self.table;
            tb.driver(class, "CreateVolume", &create);
            tb.driver(class, "DeleteVolume", &delete);
            tb.driver(class, "NodeStageVolume (mkfs)", &stage);
            tb.driver(class, "NodePublishVolume", &publish);
            tb.driver(class, "NodeStage+NodePublish", &both(&stage, &publish));
            tb.driver(class, NO_BLKID, &both(&stage, &publish));
            tb.driver(
                class,
                "NodeUnpublish+NodeUnstage",
                &both(&unpublish, &unstage),
            );
            for (_, c) in calls {
                self.driver_cmd_times(class, &c.ran);
            }
        }
        Ok(templates)
    }

    /// The same work as `driver_round`, with the raw commands.
    fn raw_round(&mut self, class: &str, i: usize, tpl: &Templates, record: bool) -> R<()> {
        let vg = vg_of(class);
        let lv = format!("bench-raw-{}-{i}", self.run_id);
        let dev = format!("/dev/{vg}/{lv}");
        let staging = self.dir.join(format!("r-{class}-{i}-staging"));
        let target = self.dir.join(format!("r-{class}-{i}-target"));
        for d in [&staging, &target] {
            std::fs::create_dir_all(d).map_err(|e| e.to_string())?;
        }
        let (s, t) = (staging.display().to_string(), target.display().to_string());
        let create = self.raw_cmd(class, "lvm lvcreate", &tpl.lvcreate.on(&lv), &[0])?;
        // blkid -p exits 2 on a blank device
        let blkid = self.raw_cmd(class, "blkid", &tpl.blkid.on(&lv), &[0, 2])?;
        let mkfs = self.raw_cmd(class, "mkfs.ext4", &tpl.mkfs.on(&lv), &[0])?;
        let mount = argv(&["mount", "-t", "ext4", &dev, &s]);
        let mount = self.raw_cmd(class, "mount -t ext4", &mount, &[0])?;
        let bind = argv(&["mount", "--bind", &s, &t]);
        let bind = self.raw_cmd(class, "mount --bind", &bind, &[0])?;
        let umount_t = self.raw_cmd(class, "umount", &argv(&["umount", &t]), &[0])?;
        let umount_s = self.raw_cmd(class, "umount", &argv(&["umount", &s]), &[0])?;
        let zero = if class == "thick" {
            let z = argv(&["blkdiscard", "-z", &dev]);
            self.raw_cmd(class, "blkdiscard -z", &z, &[0])?
        } else {
            0.0
        };
        let remove = self.raw_cmd(class, "lvm lvremove", &tpl.lvremove.on(&lv), &[0])?;
        for d in [&staging, &target] {
            let _ = std::fs::remove_dir(d);
        }
        if record {
            let tb = &mut self.table;
            tb.raw(class, "CreateVolume", "lvcreate", 1, create);
            let delete_what = if class == "thick" {
                "blkdiscard -z, lvremove"
            } else {
                "lvremove"
            };
            tb.raw(class, "DeleteVolume", delete_what, 1, zero + remove);
            let stage_what = "blkid, mkfs.ext4, mount";
            tb.raw(
                class,
                "NodeStageVolume (mkfs)",
                stage_what,
                0,
                blkid + mkfs + mount,
            );
            tb.raw(class, "NodePublishVolume", "mount --bind", 0, bind);
            let both_what = "blkid, mkfs.ext4, mount, mount --bind";
            let both = blkid + mkfs + mount + bind;
            tb.raw(class, "NodeStage+NodePublish", both_what, 0, both);
            let what = "mkfs.ext4, mount, mount --bind (no blkid)";
            tb.raw(class, NO_BLKID, what, 0, mkfs + mount + bind);
            let un = umount_t + umount_s;
            tb.raw(class, "NodeUnpublish+NodeUnstage", "umount, umount", 0, un);
        }
        Ok(())
    }

    /// Calls `f` until it answers (a copy in progress answers ABORTED, or a
    /// snapshot not yet ready); returns the last answer and one Call
    /// spanning them all, with every command run meanwhile.
    async fn until_done<T, F, Fut>(&mut self, what: &str, mut f: F) -> R<(T, Call)>
    where
        F: FnMut(Client) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
        T: Ready,
    {
        let t = Instant::now();
        let mut ran = Vec::new();
        loop {
            let c = self.driver.client.clone();
            let out = f(c).await;
            ran.extend(self.driver.take_log()?);
            match out {
                Ok(r) if r.get_ref().ready() => {
                    let ms = t.elapsed().as_secs_f64() * 1000.0;
                    return Ok((r.into_inner(), Call { ms, ran }));
                }
                Ok(_) => {}
                Err(s) if s.code() == tonic::Code::Aborted => {}
                Err(s) => return Err(format!("{what}: {:?}: {}", s.code(), s.message())),
            }
            if t.elapsed() > Duration::from_secs(600) {
                return Err(format!("{what}: not done after 10 minutes"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// One snapshot and one restore through the driver, then the same lvm
    /// commands run directly (for a thick class with `dd` copying the data,
    /// where the driver copies in-process).
    async fn snapshot_round(&mut self, class: &str, i: usize, record: bool) -> R<()> {
        let bytes = self.opts.snapshot_mib as i64 * MIB;
        let vg = vg_of(class);
        let base = format!("bench-{}-{class}-s{i}", self.run_id);
        let (src, create) = self.create(&format!("{base}-src"), class, bytes).await?;
        let src_lv = lv_of_create(&create.ran)?;
        fill(&format!("/dev/{vg}/{src_lv}"), bytes as usize)?;

        let snap_name = format!("{base}-snap");
        let (snap, snap_call) = self
            .until_done("CreateSnapshot", |mut c| {
                let req = CreateSnapshotRequest {
                    name: snap_name.clone(),
                    source_volume_id: src.clone(),
                    ..Default::default()
                };
                async move { c.controller.create_snapshot(req).await }
            })
            .await?;
        let snap = snap.snapshot.ok_or("CreateSnapshot returned no snapshot")?;
        let restore_name = format!("{base}-restore");
        let source = VolumeContentSource {
            r#type: Some(volume_content_source::Type::Snapshot(
                volume_content_source::SnapshotSource {
                    snapshot_id: snap.snapshot_id.clone(),
                },
            )),
        };
        let (restored, restore_call) = self
            .until_done("CreateVolume from a snapshot", |mut c| {
                let mut req = create_req(&restore_name, class, 0);
                req.capacity_range = None;
                req.volume_content_source = Some(source.clone());
                async move { c.controller.create_volume(req).await }
            })
            .await?;
        let restored = restored.volume.ok_or("CreateVolume returned no volume")?;

        // The raw side: every lvm command of the two calls again, with the
        // driver's LV names swapped for fresh ones (and dd for the copies).
        let key = |id: &str| id.rsplit(':').next().unwrap_or_default().to_string();
        let names: Vec<(String, String)> = [
            (format!("ldsnap-{}", key(&snap.snapshot_id)), "raws"),
            (format!("lds-{}", key(&restored.volume_id)), "rawr"),
            (format!("ldtmp-{}", key(&snap.snapshot_id)), "rawts"),
            (format!("ldtmp-{}", key(&restored.volume_id)), "rawtr"),
        ]
        .into_iter()
        .map(|(lv, tag)| (lv, format!("bench-{tag}-{}-{i}", self.run_id)))
        .collect();
        let (raw_snap, dd_snap) = self.replay(class, &snap_call.ran, &names, bytes)?;
        let (raw_restore, dd_restore) = self.replay(class, &restore_call.ran, &names, bytes)?;
        for (_, raw) in &names {
            let lv = format!("{vg}/{raw}");
            let _ = run_raw(&argv(&["lvm", "lvremove", "--yes", &lv]), &[0, 5]);
        }

        let mut c = self.driver.client.clone();
        let (_, del_restore) = self
            .driver
            .call(
                "DeleteVolume",
                c.controller.delete_volume(DeleteVolumeRequest {
                    volume_id: restored.volume_id.clone(),
                    secrets: HashMap::new(),
                }),
            )
            .await?;
        let (_, del_snap) = self
            .driver
            .call(
                "DeleteSnapshot",
                c.controller.delete_snapshot(DeleteSnapshotRequest {
                    snapshot_id: snap.snapshot_id.clone(),
                    secrets: HashMap::new(),
                }),
            )
            .await?;
        self.delete(&src).await?;
        if !record {
            return Ok(());
        }
        let thick = class == "thick";
        let (snap_what, restore_what) = if thick {
            (
                "the driver's lvm commands, dd of the COW snapshot",
                "the driver's lvm commands, dd of the snapshot",
            )
        } else {
            ("lvcreate --snapshot", "lvcreate --snapshot")
        };
        let lvm_of = |c: &Call| c.ran.iter().filter(|r| r.program() == "lvm").count() as u32;
        let tb = &mut self.table;
        tb.driver(class, "CreateSnapshot (until ready)", &snap_call);
        tb.raw(
            class,
            "CreateSnapshot (until ready)",
            snap_what,
            lvm_of(&snap_call),
            raw_snap,
        );
        tb.driver(
            class,
            "CreateVolume from snapshot (until done)",
            &restore_call,
        );
        tb.raw(
            class,
            "CreateVolume from snapshot (until done)",
            restore_what,
            lvm_of(&restore_call),
            raw_restore,
        );
        tb.driver(class, "DeleteSnapshot", &del_snap);
        tb.driver(class, "DeleteVolume (restored)", &del_restore);
        // What the design promises: thin snapshot/restore one lvcreate;
        // thick snapshot: COW snapshot (the cut), target, COW fullness
        // check, untag, split the COW from its origin (so it can be zeroed),
        // remove COW; thick restore: target and untag; deletes one
        // lvremove (a thick read-only snapshot first turns writable).
        let expect = [
            ("CreateSnapshot (until ready)", if thick { 6 } else { 1 }),
            (
                "CreateVolume from snapshot (until done)",
                if thick { 2 } else { 1 },
            ),
            ("DeleteSnapshot", if thick { 2 } else { 1 }),
            ("DeleteVolume (restored)", 1),
        ];
        for (op, n) in expect {
            tb.op(class, op).expected_lvm = n;
        }
        let shape_lv = format!("ldsnap-{}", key(&snap.snapshot_id));
        self.shape(class, "CreateSnapshot", &shape_lv, &snap_call.ran);
        if thick {
            let mib = bytes as f64 / MIB as f64;
            let lvm_ms = |c: &Call| c.ran.iter().map(|r| r.elapsed_ms).sum::<f64>();
            for (what, call, dd) in [
                ("snapshot", &snap_call, dd_snap),
                ("restore", &restore_call, dd_restore),
            ] {
                let copy_ms = (call.ms - lvm_ms(call)).max(1.0);
                self.notes.push(format!(
                    "thick {what} copy of {mib:.0} MiB: driver {:.0} MiB/s ({:.0} ms beside its \
                     lvm commands), dd bs=1M direct {:.0} MiB/s ({:.0} ms)",
                    mib / (copy_ms / 1000.0),
                    copy_ms,
                    mib / (dd.max(1.0) / 1000.0),
                    dd
                ));
            }
        }
        Ok(())
    }

    /// Runs the lvm commands of `ran` directly with LV names swapped by
    /// `names`; for a thick copy, `dd` copies the data right before the
    /// command that removes the temporary snapshot (or the copying tag).
    /// Returns the total ms and the dd's ms.
    fn replay(
        &mut self,
        class: &str,
        ran: &[Ran],
        names: &[(String, String)],
        bytes: i64,
    ) -> R<(f64, f64)> {
        let swap = |a: &str| {
            names
                .iter()
                .fold(a.to_string(), |a, (from, to)| a.replace(from.as_str(), to))
        };
        let vg = vg_of(class);
        let lvm: Vec<Vec<String>> = ran
            .iter()
            .filter(|r| r.program() == "lvm" && r.short() != "lvm fullreport")
            .map(|r| r.argv.iter().map(|a| swap(a)).collect())
            .collect();
        // The copy's source and target: the temporary snapshot (or the
        // snapshot being restored) and the LV the lvcreate with the
        // copying tag made.
        let created: Vec<String> = lvm
            .iter()
            .filter(|a| a.get(1).map(String::as_str) == Some("lvcreate"))
            .filter_map(|a| {
                let at = a.iter().position(|x| x == "--name")?;
                a.get(at + 1).cloned()
            })
            .collect();
        let copies = class == "thick"
            && ran
                .iter()
                .any(|r| r.argv.iter().any(|a| a.contains("lodestone.v1.copying")));
        let mut total = 0.0;
        let mut dd_ms = 0.0;
        let mut copied = !copies;
        for a in &lvm {
            let is_finish = a.iter().any(|x| x.contains("lodestone.v1.copying"))
                && a.get(1).map(String::as_str) == Some("lvchange");
            if !copied && is_finish {
                let target = created.first().ok_or("no target LV to copy into")?;
                let source = created.get(1).cloned().unwrap_or_else(|| {
                    // a restore reads the snapshot directly
                    names[0].1.clone()
                });
                let dd = argv(&[
                    "dd",
                    &format!("if=/dev/{vg}/{source}"),
                    &format!("of=/dev/{vg}/{target}"),
                    "bs=1M",
                    &format!("count={}", bytes / MIB),
                    "iflag=direct",
                    "oflag=direct",
                    "status=none",
                ]);
                dd_ms = self.raw_cmd(class, "dd", &dd, &[0])?;
                total += dd_ms;
                copied = true;
            }
            total += self.raw_cmd(class, &format!("lvm {}", a[1]), a, &[0])?;
        }
        Ok((total, dd_ms))
    }

    /// Creates `n` small volumes; returns the create calls.
    async fn create_fillers(&mut self, class: &str, tag: &str, n: usize) -> R<Vec<Call>> {
        let mut calls = Vec::new();
        for i in 0..n {
            let name = format!("bench-{}-{tag}-{i}", self.run_id);
            let (id, call) = self.create(&name, class, FILLER_BYTES).await?;
            self.filler_ids.push(id);
            calls.push(call);
            if (i + 1) % 50 == 0 {
                self.progress(&format!("  created {} of {n}", i + 1));
            }
        }
        Ok(calls)
    }

    async fn delete_fillers(&mut self) -> R<Vec<Call>> {
        let ids = std::mem::take(&mut self.filler_ids);
        let mut calls = Vec::new();
        for (i, id) in ids.iter().enumerate() {
            calls.push(self.delete(id).await?);
            if (i + 1) % 50 == 0 {
                self.progress(&format!("  deleted {} of {}", i + 1, ids.len()));
            }
        }
        Ok(calls)
    }

    /// `rounds` ListVolumes calls beside as many raw reports (plus a warm-up
    /// round), recorded under `class`/`name`.
    async fn list_rounds(&mut self, class: &str, rounds: usize, present: usize) -> R<()> {
        let report = self
            .fullreport
            .clone()
            .ok_or("the driver ran no lvm fullreport at start")?;
        let name = format!("ListVolumes ({present} volumes)");
        let cmd_class = format!("{class}, {present} volumes");
        for i in 0..=rounds {
            let raw_first = i % 2 == 1;
            let mut raw_ms = 0.0;
            if raw_first {
                raw_ms = self.raw_cmd(&cmd_class, "lvm fullreport", &report.argv, &[0])?;
            }
            let mut c = self.driver.client.clone();
            let req = ListVolumesRequest {
                max_entries: 0,
                starting_token: String::new(),
            };
            let (resp, call) = self
                .driver
                .call("ListVolumes", c.controller.list_volumes(req))
                .await?;
            if !raw_first {
                raw_ms = self.raw_cmd(&cmd_class, "lvm fullreport", &report.argv, &[0])?;
            }
            if resp.entries.len() != present {
                let note = format!(
                    "ListVolumes returned {} entries with {present} volumes present",
                    resp.entries.len()
                );
                if !self.notes.contains(&note) {
                    self.notes.push(note);
                }
            }
            self.shape(class, "ListVolumes", "", &call.ran);
            if i > 0 {
                self.table.driver(class, &name, &call);
                self.table
                    .raw(class, &name, "lvm fullreport (one report)", 0, raw_ms);
                self.driver_cmd_times(&cmd_class, &call.ran);
            }
        }
        Ok(())
    }

    async fn measure(&mut self) -> R<()> {
        let n = self.opts.iterations;
        self.progress(&format!(
            "driver ready in {:.0} ms (pid {})",
            self.driver.start_ms, self.driver.pid
        ));
        tokio::time::sleep(Duration::from_millis(500)).await;
        self.remember_memory("idle after start")?;
        let start = self.driver.start_commands.clone();
        self.shape("–", "driver start", "", &start);
        self.fullreport = start
            .iter()
            .rev()
            .find(|r| r.short() == "lvm fullreport")
            .map(|r| Template {
                argv: r.argv.clone(),
                lv: String::new(),
            });

        let classes = self.opts.classes.clone();
        let volume_classes = if self.opts.volumes {
            classes.clone()
        } else {
            Vec::new()
        };
        for class in &volume_classes {
            let mut tpl: Option<Templates> = None;
            for i in 0..=n {
                let record = i > 0;
                self.progress(&format!(
                    "{class}: round {i} of {n}{}",
                    if record { "" } else { " (warm-up)" }
                ));
                match (&tpl, i % 2) {
                    (Some(t), 1) => {
                        let t = t.clone();
                        self.raw_round(class, i, &t, record)?;
                        tpl = Some(self.driver_round(class, i, record).await?);
                    }
                    _ => {
                        let t = self.driver_round(class, i, record).await?;
                        self.raw_round(class, i, &t, record)?;
                        tpl = Some(t);
                    }
                }
            }
            let l = self.opts.list_volumes;
            if l > 0 {
                self.progress(&format!("{class}: ListVolumes with {l} volumes"));
                self.create_fillers(class, &format!("list-{class}"), l)
                    .await?;
                self.list_rounds(class, n, l).await?;
                self.delete_fillers().await?;
            }
        }
        self.remember_memory("after the timed rounds")?;

        for class in &classes {
            let rounds = self.opts.snapshots;
            for i in (0..=rounds).take_while(|_| rounds > 0) {
                let record = i > 0;
                self.progress(&format!(
                    "{class}: snapshot round {i} of {}{}",
                    self.opts.snapshots,
                    if record { "" } else { " (warm-up)" }
                ));
                self.snapshot_round(class, i, record).await?;
            }
        }

        let r = if self.opts.volumes {
            self.opts.rss_volumes
        } else {
            0
        };
        if r > 0 {
            self.progress(&format!("memory: creating {r} thin volumes"));
            let calls = self.create_fillers("thin", "rss", r).await?;
            let name = format!("CreateVolume (0 → {r} volumes, 16 MiB)");
            for c in &calls {
                self.table.driver("thin", &name, c);
            }
            self.table.op("thin", &name).expected_lvm = 1;
            self.remember_memory(&format!("after creating {r} thin volumes"))?;
            self.list_rounds("thin", n.min(5), r).await?;
            self.remember_memory(&format!("after ListVolumes with {r} volumes"))?;
            self.progress(&format!("memory: deleting {r} thin volumes"));
            let calls = self.delete_fillers().await?;
            let name = format!("DeleteVolume ({r} → 0 volumes)");
            for c in &calls {
                self.table.driver("thin", &name, c);
            }
            self.table.op("thin", &name).expected_lvm = 1;
            self.remember_memory(&format!("after deleting the {r} volumes"))?;
        }
        Ok(())
    }

    /// Best effort after a failure: unmount what the bench mounted.
    fn unmount_all(&self) {
        let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else {
            return;
        };
        let prefix = self.dir.display().to_string();
        let mut points: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1))
            .filter(|p| p.starts_with(&prefix))
            .collect();
        points.sort_by_key(|p| std::cmp::Reverse(p.len()));
        for p in points {
            let _ = Command::new("umount").arg(p).status();
        }
    }
}

// ---------------------------------------------------------------- report

fn command_output(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn first_line_with(path: &str, prefix: &str) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_default()
}

fn mib(kb: u64) -> String {
    format!("{:.1} MiB", kb as f64 / 1024.0)
}

impl Bench {
    fn report(&self, header: &str, stopped_cleanly: bool) -> String {
        let mut o = String::new();
        let n = self.opts.iterations;
        let _ = writeln!(o, "## Results\n");
        o.push_str(header);
        let _ = writeln!(
            o,
            "- rounds: {n} per class after one warm-up round (not counted); driver and raw \
             sides alternate which goes first; {} volumes present for ListVolumes; memory \
             test with {} thin volumes",
            self.opts.list_volumes, self.opts.rss_volumes
        );
        let _ = writeln!(
            o,
            "- driver: `{}` (release), ready {:.0} ms after spawn\n",
            // Relative to the checkout: a report names no machine's paths.
            std::path::Path::new(env!("CARGO_BIN_EXE_lodestone"))
                .strip_prefix(env!("CARGO_MANIFEST_DIR"))
                .unwrap_or(std::path::Path::new("lodestone"))
                .display(),
            self.driver.start_ms
        );

        // latency
        let _ = writeln!(o, "### Latency per CSI call (ms)\n");
        let _ = writeln!(
            o,
            "| class | call | driver p50 | driver min–max | raw commands | raw p50 | \
             raw min–max | driver/raw (p50s) | ≤ {LATENCY_TARGET}× | driver/raw (paired, p50) \
             | driver's own time p50 |"
        );
        let _ = writeln!(o, "|---|---|--:|--:|---|--:|--:|--:|:-:|--:|--:|");
        for key in &self.table.order {
            let op = &self.table.ops[key];
            if op.raw.is_empty() {
                continue;
            }
            let (d, r) = (median(&op.driver), median(&op.raw));
            let ratio = d / r;
            let own: Vec<f64> = op
                .driver
                .iter()
                .zip(&op.children)
                .map(|(a, b)| a - b)
                .collect();
            // rounds pair a driver call with its raw commands
            let paired: Vec<f64> = op.driver.iter().zip(&op.raw).map(|(a, b)| a / b).collect();
            let met = if key.1.starts_with("ListVolumes") {
                "n/a"
            } else if ratio <= LATENCY_TARGET {
                "yes"
            } else {
                "**no**"
            };
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} | {} | {} | {} | {:.2} | {met} | {:.2} | {} |",
                key.0,
                key.1,
                ms(d),
                range(&op.driver),
                op.raw_what,
                ms(r),
                range(&op.raw),
                ratio,
                median(&paired),
                ms(median(&own))
            );
        }
        let _ = writeln!(
            o,
            "\n\"paired\" is the median of the per-round ratios (each round runs one driver call \
             and its raw commands back to back, so a slow spell of the host hits both). \
             \"driver's own time\" is the call's latency minus the time the driver waited for \
             its child processes (from its log): gRPC, validation, locks, mount syscalls, the \
             thick delete's BLKZEROOUT, process spawning.\n"
        );
        let scale: Vec<_> = self
            .table
            .order
            .iter()
            .filter(|k| self.table.ops[*k].raw.is_empty())
            .collect();
        if !scale.is_empty() {
            let _ = writeln!(o, "At scale (no raw side):\n");
            let _ = writeln!(
                o,
                "| class | call | calls | driver p50 | driver min–max | in children p50 | \
                 driver's own time p50 |"
            );
            let _ = writeln!(o, "|---|---|--:|--:|--:|--:|--:|");
            for key in scale {
                let op = &self.table.ops[key];
                let own: Vec<f64> = op
                    .driver
                    .iter()
                    .zip(&op.children)
                    .map(|(a, b)| a - b)
                    .collect();
                let _ = writeln!(
                    o,
                    "| {} | {} | {} | {} | {} | {} | {} |",
                    key.0,
                    key.1,
                    op.calls,
                    ms(median(&op.driver)),
                    range(&op.driver),
                    ms(median(&op.children)),
                    ms(median(&own))
                );
            }
            o.push('\n');
        }

        // processes
        let _ = writeln!(
            o,
            "### Processes spawned per call (from the driver's log)\n"
        );
        let _ = writeln!(
            o,
            "| class | call | calls | lvm per call | expected | met | other programs per call |"
        );
        let _ = writeln!(o, "|---|---|--:|--:|--:|:-:|---|");
        for key in &self.table.order {
            let op = &self.table.ops[key];
            if op.driver.is_empty() || key.1 == NO_BLKID {
                continue;
            }
            let lvm_max = op.lvm.iter().copied().max().unwrap_or(0);
            let lvm_min = op.lvm.iter().copied().min().unwrap_or(0);
            // a combined row (A+B) expects the sum of its parts: all are 0 here
            let met = if lvm_min == op.expected_lvm && lvm_max == op.expected_lvm {
                "yes"
            } else {
                "**no**"
            };
            let other: Vec<String> = op
                .other
                .iter()
                .map(|(p, v)| {
                    let mut v = v.clone();
                    v.resize(op.calls as usize, 0);
                    format!("{p} {}", count_range(&v))
                })
                .collect();
            let other = if other.is_empty() {
                "none".to_string()
            } else {
                other.join(", ")
            };
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} | {} | {met} | {other} |",
                key.0,
                key.1,
                op.calls,
                count_range(&op.lvm),
                op.expected_lvm
            );
        }
        let start: Vec<String> = self
            .driver
            .start_commands
            .iter()
            .map(|r| r.short())
            .collect();
        let _ = writeln!(
            o,
            "\nAt start the driver ran {} process(es): {}.\n",
            start.len(),
            start.join(", ")
        );

        // memory
        let _ = writeln!(o, "### Driver memory (/proc/<pid>/status)\n");
        let _ = writeln!(o, "| moment | VmRSS | VmHWM |");
        let _ = writeln!(o, "|---|--:|--:|");
        for (moment, rss, hwm) in &self.memory {
            let _ = writeln!(o, "| {moment} | {} | {} |", mib(*rss), mib(*hwm));
        }
        if let Some((_, rss, _)) = self.memory.first() {
            let _ = writeln!(
                o,
                "\nIdle target < {}: {}.\n",
                mib(RSS_TARGET_KB),
                if *rss < RSS_TARGET_KB {
                    "met"
                } else {
                    "**missed**"
                }
            );
        }

        // per command
        let _ = writeln!(
            o,
            "### External commands: run directly vs inside the driver (ms)\n"
        );
        let _ = writeln!(
            o,
            "| class | command | raw p50 | raw min–max | in driver p50 | in driver min–max | runs (raw/driver) |"
        );
        let _ = writeln!(o, "|---|---|--:|--:|--:|--:|--:|");
        for ((class, short), t) in &self.cmds {
            let (inside, inside_range) = match (t.driver.is_empty(), short.as_str()) {
                (true, "blkdiscard -z") => ("ioctl".to_string(), String::new()),
                (true, s) if s.contains("mount") => ("syscall".to_string(), String::new()),
                (true, s) if s.contains("fullreport") => ("not run".to_string(), String::new()),
                _ => (ms(median(&t.driver)), range(&t.driver)),
            };
            let _ = writeln!(
                o,
                "| {class} | {short} | {} | {} | {inside} | {inside_range} | {}/{} |",
                ms(median(&t.raw)),
                range(&t.raw),
                t.raw.len(),
                t.driver.len()
            );
        }
        let _ = writeln!(
            o,
            "\nThe raw side runs the argv the driver logged (only the LV name differs) with \
             std::process::Command; mount, bind mount and umount, which the driver does with \
             syscalls, are mount(8)/umount(8) processes on the raw side, and the thick LV's \
             BLKZEROOUT ioctl is `blkdiscard -z`.\n"
        );

        // shapes
        let _ = writeln!(o, "### Commands the driver ran, per call\n");
        let _ = writeln!(o, "```text");
        for ((class, call), lines) in &self.shapes {
            let _ = writeln!(o, "{class} {call}:");
            if lines.is_empty() {
                let _ = writeln!(o, "  (none)");
            }
            for l in lines {
                let _ = writeln!(o, "  {l}");
            }
        }
        let _ = writeln!(o, "```\n");

        // notes
        let _ = writeln!(o, "### Run notes\n");
        let _ = writeln!(
            o,
            "- driver stopped cleanly on SIGTERM: {}",
            if stopped_cleanly { "yes" } else { "**no**" }
        );
        for n in &self.notes {
            let _ = writeln!(o, "- {n}");
        }
        let c = &self.driver.complaints;
        let _ = writeln!(o, "- warnings/errors in the driver's log: {}", c.len());
        for l in c.iter().take(10) {
            let _ = writeln!(o, "  - `{}`", l.replace('`', "'"));
        }
        o
    }
}

fn header() -> String {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let model = first_line_with("/proc/cpuinfo", "model name");
    let mem = first_line_with("/proc/meminfo", "MemTotal");
    let lvm = command_output("lvm", &["version"]);
    let lvm = lvm.lines().next().unwrap_or("").trim().to_string();
    let mkfs = command_output("sh", &["-c", "mkfs.ext4 -V 2>&1 | head -n 1"]);
    let loadavg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    format!(
        "- date: {}\n- guest: kernel {}, {cpus} CPU(s) ({model}), {mem}; load average at start \
         {}\n- tools: {lvm}; {mkfs}\n",
        command_output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        kernel.trim(),
        loadavg
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    )
}

fn preflight() -> R<()> {
    if !Path::new("/dev/mapper/control").exists() {
        return Err(
            "this kernel has no device-mapper: run the benchmark through \
                    scripts/bench.sh, which runs it in a QEMU guest"
                .into(),
        );
    }
    for vg in [THIN_VG, THICK_VG] {
        let cfg = "devices { obtain_device_list_from_udev = 0 }";
        run_raw(&argv(&["lvm", "vgs", "--config", cfg, vg]), &[0]).map_err(|e| {
            format!("volume group {vg} is missing (tests/vm/lvm-fixture.sh setup): {e}")
        })?;
    }
    Ok(())
}

async fn run(opts: Opts) -> R<String> {
    preflight()?;
    let header = header();
    let temp;
    let dir = match &opts.dir {
        Some(d) => {
            std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
            d.clone()
        }
        None => {
            temp = tempfile::Builder::new()
                .prefix("lodestone-bench-")
                .tempdir_in("/tmp")
                .map_err(|e| e.to_string())?;
            temp.path().to_path_buf()
        }
    };
    let driver = Driver::start(&dir).await?;
    let mut bench = Bench::new(opts, dir, driver);
    let started = Instant::now();
    let result = bench.measure().await;
    bench.unmount_all();
    let stopped = bench.driver.stop();
    let _ = bench.driver.take_log();
    if let Err(e) = result {
        let log = std::fs::read_to_string(&bench.driver.log_path).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        return Err(format!(
            "{e}\n--- last lines of the driver's log:\n{}",
            tail.join("\n")
        ));
    }
    let loadavg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let header = format!(
        "{header}- bench duration {:.0} s; guest load average at the end {}\n",
        started.elapsed().as_secs_f64(),
        loadavg
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    Ok(bench.report(&header, stopped))
}

fn main() {
    let opts = Opts::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(run(opts)) {
        Ok(report) => print!("{report}"),
        Err(e) => {
            eprintln!("lvm-bench: {e}");
            std::process::exit(1);
        }
    }
}
