//! `lodestone ctl` against a running driver (host and guest): `info` and
//! `list-volumes` in text and JSON, exit codes (1 for a failed call, 2 for a
//! command line that cannot be used), `CSI_ENDPOINT`, and secrets that come
//! from a file or standard input and are never printed. The full volume lifecycle through ctl is in `ctl_lvm`.

use std::process::{Command, Output, Stdio};

use crate::common::*;

/// What one `lodestone ctl` run left behind.
pub struct Ctl {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Ctl {
    /// stdout as JSON; the run must have succeeded.
    #[track_caller]
    pub fn json(&self) -> serde_json::Value {
        assert_eq!(self.code, 0, "ctl failed: {}", self.stderr);
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("ctl printed no JSON ({e}): {:?}", self.stdout))
    }

    /// The run must have succeeded; returns stdout.
    #[track_caller]
    pub fn ok(&self) -> &str {
        assert_eq!(self.code, 0, "ctl failed: {}{}", self.stdout, self.stderr);
        &self.stdout
    }
}

/// `lodestone ctl` with a clean environment (no LODESTONE_* or CSI_ENDPOINT).
fn ctl_command() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lodestone"));
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().into_owned();
        if k.starts_with("LODESTONE_") || k == "CSI_ENDPOINT" {
            cmd.env_remove(&k);
        }
    }
    cmd.env_remove("RUST_LOG").stdin(Stdio::null());
    cmd.arg("ctl");
    cmd
}

fn finish(out: Output) -> Ctl {
    Ctl {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs `lodestone ctl --endpoint <the driver's socket> ARGS...`.
pub fn ctl(d: &Driver, args: &[&str]) -> Ctl {
    let endpoint = format!("unix://{}", d.socket.display());
    let out = ctl_command()
        .args(["--endpoint", endpoint.as_str(), "--timeout", "120"])
        .args(args)
        .output()
        .expect("run lodestone ctl");
    finish(out)
}

/// `info` names the plugin, its readiness, the services' capabilities and
/// this node; the JSON form has the same content under stable names.
#[tokio::test]
async fn info_in_text_and_json() {
    let d = Driver::start().await;
    let text = ctl(&d, &["info"]);
    let out = text.ok();
    assert!(out.contains(DRIVER_NAME), "{out}");
    assert!(out.contains("CREATE_DELETE_VOLUME"), "{out}");
    assert!(out.contains("STAGE_UNSTAGE_VOLUME"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("node id") && l.ends_with(NODE_ID)),
        "{out}"
    );

    let doc = ctl(&d, &["--output", "json", "info"]).json();
    assert_eq!(doc["name"], DRIVER_NAME);
    assert_eq!(doc["vendor_version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(doc["ready"], lvm_enabled());
    let has = |field: &str, cap: &str| {
        doc[field]
            .as_array()
            .unwrap_or_else(|| panic!("{field} is not a list: {doc}"))
            .iter()
            .any(|c| c == cap)
    };
    assert!(has("plugin_capabilities", "CONTROLLER_SERVICE"), "{doc}");
    assert!(has("controller_capabilities", "LIST_VOLUMES"), "{doc}");
    assert!(has("node_capabilities", "GET_VOLUME_STATS"), "{doc}");
    assert_eq!(doc["node"]["node_id"], NODE_ID);
    assert_eq!(doc["node"]["accessible_topology"][TOPOLOGY_KEY], NODE_ID);
}

/// `list-volumes` prints a table (or says there are none) and, as JSON,
/// one document with a `volumes` list.
#[tokio::test]
async fn list_volumes_in_text_and_json() {
    let d = Driver::start().await;
    let text = ctl(&d, &["list-volumes"]);
    let out = text.ok();
    assert!(
        out == "no volumes\n" || out.starts_with("VOLUME_ID"),
        "{out}"
    );
    let doc = ctl(&d, &["list-volumes", "-o", "json", "--page-size", "1"]).json();
    let volumes = doc["volumes"].as_array().expect("volumes list");
    for v in volumes {
        assert!(
            v["volume_id"].is_string() && v["capacity_bytes"].is_i64(),
            "{v}"
        );
    }
    let doc = ctl(&d, &["-o", "json", "list-snapshots"]).json();
    assert!(doc["snapshots"].is_array(), "{doc}");
}

/// A failed call prints its gRPC code and message on stderr, nothing on
/// stdout, and exits 1.
#[tokio::test]
async fn a_failed_call_exits_1_with_its_code() {
    let d = Driver::start().await;
    let missing = format!("lvm1:{NODE_ID}:{THIN}:{}", uuid::Uuid::new_v4().simple());
    for output in ["text", "json"] {
        let r = ctl(&d, &["-o", output, "get-volume", &missing]);
        assert_eq!(r.code, 1, "{}{}", r.stdout, r.stderr);
        assert!(r.stdout.is_empty(), "{}", r.stdout);
        assert!(
            r.stderr.contains("ControllerGetVolume: NOT_FOUND: "),
            "{}",
            r.stderr
        );
    }
    let r = ctl(&d, &["create-volume", "x", "--param", "deviceClass=nosuch"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("INVALID_ARGUMENT"), "{}", r.stderr);
}

/// A command line that cannot be used exits 2 before calling anything.
#[tokio::test]
async fn usage_errors_exit_2() {
    let d = Driver::start().await;
    for args in [
        &["create-volume"][..],
        &["create-volume", "x", "--size", "1Xi"],
        &["create-volume", "x", "--block", "--fs-type", "ext4"],
        &["create-volume", "x", "--param", "novalue"],
        &["delete-volume", "v", "--secret", "novalue"],
        &[
            "delete-volume",
            "v",
            "--secrets-file",
            "/nonexistent/secrets",
        ],
        &["no-such-command"],
        &["--output", "yaml", "info"],
    ] {
        let r = ctl(&d, args);
        assert_eq!(r.code, 2, "{args:?}: {}{}", r.stdout, r.stderr);
        assert!(r.stdout.is_empty(), "{args:?}: {}", r.stdout);
    }
    let r = ctl_command()
        .args(["--endpoint", "relative.sock", "info"])
        .output()
        .map(finish)
        .unwrap();
    assert_eq!(r.code, 2, "{}", r.stderr);
}

/// `ctl` with `input` on its standard input.
fn ctl_stdin(d: &Driver, args: &[&str], input: &str) -> Ctl {
    use std::io::Write as _;
    let endpoint = format!("unix://{}", d.socket.display());
    let mut child = ctl_command()
        .args(["--endpoint", endpoint.as_str(), "--timeout", "120"])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run lodestone ctl");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    finish(child.wait_with_output().unwrap())
}

/// Secrets come from a file or standard input, never from the command
/// line (`--secret` is refused before any call, its text not shown); they
/// are never printed: not by ctl (success, failure, a malformed file), not
/// in the driver's log.
#[tokio::test]
async fn secrets_come_from_a_file_and_are_never_printed() {
    let d = Driver::start().await;
    let file = d.path("secrets");
    std::fs::write(&file, "# ceph user\npassword=hunter2\n").unwrap();
    let json = d.path("secrets.json");
    std::fs::write(&json, r#"{"token": "hunter2"}"#).unwrap();
    let bad = d.path("bad-secrets");
    std::fs::write(&bad, "hunter2\n").unwrap();
    let file = file.to_str().unwrap();
    let runs = [
        ctl(
            &d,
            &[
                "create-volume",
                "secret-test",
                "--param",
                "deviceClass=nosuch",
                "--secrets-file",
                file,
            ],
        ),
        ctl(
            &d,
            &[
                "delete-volume",
                "no-such-volume",
                "--secrets-file",
                json.to_str().unwrap(),
            ],
        ),
        ctl(
            &d,
            &[
                "delete-volume",
                "no-such-volume",
                "--secrets-file",
                bad.to_str().unwrap(),
            ],
        ),
        ctl_stdin(
            &d,
            &["-o", "json", "delete-snapshot", "x", "--secrets-file", "-"],
            "k=hunter2\n",
        ),
        ctl(
            &d,
            &["delete-volume", "no-such-volume", "--secret", "k=hunter2"],
        ),
        ctl(&d, &["delete-volume", "no-such-volume", "--secret=hunter2"]),
    ];
    for r in &runs {
        assert!(
            !r.stdout.contains("hunter2") && !r.stderr.contains("hunter2"),
            "a secret was printed: {}{}",
            r.stdout,
            r.stderr
        );
    }
    assert_eq!(runs[0].code, 1, "{}", runs[0].stderr);
    assert!(
        runs[0].stderr.contains("INVALID_ARGUMENT"),
        "{}",
        runs[0].stderr
    );
    assert_eq!(runs[1].code, 0, "{}", runs[1].stderr);
    assert_eq!(runs[2].code, 2, "{}", runs[2].stderr);
    assert!(runs[2].stderr.contains("line 1"), "{}", runs[2].stderr);
    assert_eq!(runs[3].json()["deleted"], true);
    for r in &runs[4..] {
        assert_eq!(r.code, 2, "{}", r.stderr);
        assert!(r.stderr.contains("--secrets-file"), "{}", r.stderr);
        assert!(r.stdout.is_empty(), "{}", r.stdout);
    }
    let log = d.log();
    assert!(!log.contains("hunter2"), "the driver logged a secret");
}

/// The endpoint comes from CSI_ENDPOINT when --endpoint is not given; a
/// socket nobody serves is a failed call (exit 1).
#[tokio::test]
async fn endpoint_from_the_environment() {
    let d = Driver::start().await;
    let r = ctl_command()
        .env("CSI_ENDPOINT", format!("unix://{}", d.socket.display()))
        .args(["-o", "json", "info"])
        .output()
        .map(finish)
        .unwrap();
    assert_eq!(r.json()["name"], DRIVER_NAME);
    let nowhere = d.path_str("nobody-here.sock");
    let r = ctl_command()
        .args(["--endpoint", nowhere.as_str(), "info"])
        .output()
        .map(finish)
        .unwrap();
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("cannot connect"), "{}", r.stderr);
}
