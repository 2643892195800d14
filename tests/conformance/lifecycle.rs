//! The driver process: start-up checks, configuration file, stale sockets,
//! shutdown on SIGTERM, log format and secret hygiene.

use std::time::Duration;

use lodestone::csi;
use tonic::Code;

use crate::common::*;

const EXIT_TIMEOUT: Duration = Duration::from_secs(20);

#[track_caller]
fn assert_refuses_to_start(builder: DriverBuilder, needle: &str, what: &str) {
    let (status, output) = builder.run_to_exit(EXIT_TIMEOUT);
    let status = status.unwrap_or_else(|| {
        panic!("{what}: the driver kept running for {EXIT_TIMEOUT:?}; output:\n{output}")
    });
    assert!(
        !status.success(),
        "{what}: exited successfully ({status}); output:\n{output}"
    );
    assert!(
        output.to_lowercase().contains(needle),
        "{what}: the error should mention {needle:?}; output:\n{output}"
    );
}

/// The node id is the value of the topology label, so it must be a valid
/// Kubernetes label value (at most 63 characters). The driver refuses to
/// start with a longer one, with a non-zero exit and a message that names
/// the node id.
#[tokio::test]
async fn refuses_node_id_of_64_characters() {
    assert_refuses_to_start(
        DriverBuilder::new().node_id(&"n".repeat(64)),
        "node id",
        "64-character node id",
    );
    assert_refuses_to_start(
        DriverBuilder::new().node_id(&"n".repeat(300)),
        "node id",
        "300-character node id",
    );
}

/// Without any device class the LVM driver has nothing to provision from:
/// it refuses to start and says so.
#[tokio::test]
async fn refuses_to_start_without_device_class() {
    let builder = DriverBuilder::new().class_args(Vec::<String>::new());
    assert_refuses_to_start(builder, "device class", "no device class");
}

/// A configuration file with a misspelt key must not be half-understood: the
/// driver refuses to start and names the problem.
#[tokio::test]
async fn refuses_config_file_with_unknown_keys() {
    let dir = new_temp_dir();
    let path = dir.path().join("lvm.json");
    std::fs::write(
        &path,
        r#"{"deviceClasses":[{"name":"thin","volumeGroup":"lodestone-thin","thinpool":"pool0"}]}"#,
    )
    .unwrap();
    let builder = DriverBuilder::new().class_args(["--lvm-config", path.to_str().unwrap()]);
    assert_refuses_to_start(builder, "thinpool", "config file with unknown key thinpool");
}

/// A configuration file (`--lvm-config`) replaces the inline classes: the
/// driver starts, serves the classes of the file and refuses others.
#[tokio::test]
async fn starts_from_config_file() {
    let dir = new_temp_dir();
    let path = dir.path().join("lvm.json");
    std::fs::write(
        &path,
        r#"{"deviceClasses":[{"name":"thin","volumeGroup":"lodestone-thin","thinPool":"pool0",
            "default":true,"overprovisionRatio":5.0,"spareBytes":0,
            "poolFullThresholdPercent":90.0,"defaultSizeBytes":1073741824}]}"#,
    )
    .unwrap();
    let d = DriverBuilder::new()
        .class_args(["--lvm-config", path.to_str().unwrap()])
        .start()
        .await;
    expect_ok(d.identity().probe(csi::ProbeRequest {}).await, "Probe");
    let mut c = d.controller();
    let r = c
        .get_capacity(csi::GetCapacityRequest {
            parameters: class_params(THICK),
            ..Default::default()
        })
        .await;
    expect_code(
        r,
        Code::InvalidArgument,
        "GetCapacity(thick) with only `thin` configured",
    );
    let r = c
        .get_capacity(csi::GetCapacityRequest {
            parameters: class_params(THIN),
            accessible_topology: Some(node_topology("elsewhere")),
            ..Default::default()
        })
        .await;
    assert_eq!(
        expect_ok(r, "GetCapacity(thin, elsewhere)").available_capacity,
        0
    );
}

/// The driver exits on SIGTERM (promptly), and a new driver can then start
/// on the same socket path: a stale socket file is removed at start-up.
#[tokio::test]
async fn exits_on_sigterm_and_restarts_on_stale_socket() {
    let d = Driver::start().await;
    let (status, dir) = d.stop_and_keep_dir();
    let status = status.expect("driver did not exit within 10s of SIGTERM");
    eprintln!("driver exited with {status}");

    // Leave a stale socket behind whatever the driver did on exit: bind a
    // listener on the path and drop it (the file stays).
    let sock = dir.path().join("csi.sock");
    let _ = std::fs::remove_file(&sock);
    drop(std::os::unix::net::UnixListener::bind(&sock).expect("bind stale socket"));
    assert!(sock.exists());

    let d = Driver::builder().start_in(dir).await;
    let info = expect_ok(
        d.identity()
            .get_plugin_info(csi::GetPluginInfoRequest {})
            .await,
        "info",
    );
    assert_eq!(info.name, DRIVER_NAME);
}

/// `--log-format json`: every line the driver writes is a JSON object, so log
/// pipelines can parse it.
#[tokio::test]
async fn json_log_format() {
    let d = Driver::builder()
        .arg("--log-format")
        .arg("json")
        .env("RUST_LOG", "debug")
        .start()
        .await;
    expect_ok(d.identity().probe(csi::ProbeRequest {}).await, "Probe");
    let r = d
        .controller()
        .create_volume(csi::CreateVolumeRequest::default())
        .await;
    expect_code(r, Code::InvalidArgument, "CreateVolume without name");
    let (status, dir) = d.stop_and_keep_dir();
    assert!(status.is_some(), "driver did not exit on SIGTERM");
    let log = std::fs::read_to_string(dir.path().join("driver.log")).unwrap();
    assert!(
        !log.trim().is_empty(),
        "the driver logged nothing at debug level"
    );
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("log line is not JSON ({e}): {line}"));
        assert!(v.is_object(), "log line is not a JSON object: {line}");
    }
}

/// Fields marked `csi_secret` are sensitive and must not be logged, even at
/// the most verbose level and even when the request fails.
#[tokio::test]
async fn secrets_are_never_logged() {
    const CANARY: &str = "canary-s3cr3t-9f1c7e";
    let d = Driver::builder().env("RUST_LOG", "trace").start().await;
    let secrets = params(&[("password", CANARY), ("token", CANARY)]);
    let mut req = create_req(&unique_name("secret"), THIN, ext4(), 64 * MIB, 0);
    req.secrets = secrets.clone();
    if let Ok(created) = d.controller().create_volume(req).await {
        let id = created.into_inner().volume.expect("volume").volume_id;
        let r = d
            .controller()
            .delete_volume(csi::DeleteVolumeRequest {
                volume_id: id,
                secrets: secrets.clone(),
            })
            .await;
        expect_ok(r, "DeleteVolume of the volume just created");
    }
    let mut bad = create_req("", THIN, ext4(), 0, 0);
    bad.secrets = secrets.clone();
    let _ = d.controller().create_volume(bad).await;
    let _ = d
        .controller()
        .delete_volume(csi::DeleteVolumeRequest {
            volume_id: "no-such-volume".into(),
            secrets: secrets.clone(),
        })
        .await;
    let _ = d
        .node()
        .node_stage_volume(csi::NodeStageVolumeRequest {
            volume_id: "no-such-volume".into(),
            staging_target_path: d.path_str("staging"),
            volume_capability: Some(ext4()),
            secrets: secrets.clone(),
            ..Default::default()
        })
        .await;
    let _ = d
        .node()
        .node_publish_volume(csi::NodePublishVolumeRequest {
            volume_id: "no-such-volume".into(),
            staging_target_path: d.path_str("staging"),
            target_path: d.path_str("target"),
            volume_capability: Some(ext4()),
            secrets,
            ..Default::default()
        })
        .await;
    let log = d.log();
    assert!(
        !log.contains(CANARY),
        "a secret value appears in the driver log:\n{log}"
    );
}
