//! A driver that cannot start says why once, on stderr, and exits 1 before
//! touching anything.

use std::process::Command;

/// Runs `lodestone ARGS` with a clean environment; (exit code, stderr).
fn lodestone(args: &[&str]) -> (Option<i32>, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_lodestone"));
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().into_owned();
        if k.starts_with("LODESTONE_") || k == "CSI_ENDPOINT" || k == "RUST_LOG" {
            cmd.env_remove(&k);
        }
    }
    let out = cmd.args(args).output().expect("run lodestone");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_startup_error_is_printed_once() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("csi.sock");
    let endpoint = format!("unix://{}", socket.display());
    let missing = dir.path().join("missing.json");
    let cases = [
        (
            vec!["--endpoint", "relative.sock"],
            "--endpoint \"relative.sock\": expected an absolute unix socket path".to_string(),
        ),
        (
            vec![
                "--endpoint",
                &endpoint,
                "--lvm-config",
                missing.to_str().unwrap(),
            ],
            format!("cannot read LVM config {}: ", missing.display()),
        ),
        (
            vec!["--endpoint", &endpoint, "--device-class", "Bad=vg0"],
            "device class name \"Bad\" must be".to_string(),
        ),
    ];
    for (args, want) in cases {
        let (code, stderr) = lodestone(&args);
        assert_eq!(code, Some(1), "{args:?}: {stderr}");
        assert_eq!(stderr.matches(&want).count(), 1, "{args:?}: {stderr}");
        assert!(!socket.exists(), "{args:?}: the socket was created");
    }
}
