//! Argument validation: malformed requests are refused with INVALID_ARGUMENT
//! (or the code the spec names) before any storage is touched. These tests
//! run on the host, where no volume group exists, so a request that got past
//! validation would fail differently.

use lodestone::csi;
use lodestone::csi::controller_service_capability::rpc::Type as Rpc;
use lodestone::csi::volume_capability::access_mode::Mode;
use lodestone::csi::volume_capability::{AccessMode, BlockVolume, MountVolume};
use lodestone::csi::volume_content_source;
use tonic::Code;

use crate::common::*;

/// A valid CreateVolume request (which would need the volume group).
fn good_create(name: &str) -> csi::CreateVolumeRequest {
    create_req(name, THIN, ext4(), 64 * MIB, 0)
}

/// A well-formed volume id of this node for a volume that does not exist.
/// (Format `lvm1:<node>:<class>:<32 hex>`, as the driver encodes ids.)
fn absent_volume_id() -> String {
    format!("lvm1:{NODE_ID}:{THIN}:{}", uuid::Uuid::new_v4().simple())
}

async fn create_fails(d: &Driver, req: csi::CreateVolumeRequest, code: Code, what: &str) {
    expect_code(d.controller().create_volume(req).await, code, what);
}

/// CreateVolume: `name` is REQUIRED; an empty name is INVALID_ARGUMENT.
#[tokio::test]
async fn create_volume_requires_name() {
    let d = Driver::start().await;
    create_fails(&d, good_create(""), Code::InvalidArgument, "empty name").await;
}

/// The spec limits string fields to 128 bytes and lets the plugin refuse
/// longer ones; Lodestone refuses a 129-byte name (and a much longer one)
/// with INVALID_ARGUMENT. Multi-byte characters count in bytes.
#[tokio::test]
async fn create_volume_rejects_overlong_names() {
    let d = Driver::start().await;
    for name in ["n".repeat(129), "n".repeat(4096), "é".repeat(65)] {
        assert!(name.len() > 128);
        let what = format!("name of {} bytes", name.len());
        create_fails(&d, good_create(&name), Code::InvalidArgument, &what).await;
    }
}

/// Names should not contain control characters (other than common
/// whitespace, which Lodestone refuses too); a name carrying NUL or another
/// control character is INVALID_ARGUMENT.
#[tokio::test]
async fn create_volume_rejects_control_characters_in_names() {
    let d = Driver::start().await;
    for name in ["pvc\0x", "pvc\nx", "pvc\u{1b}[31m", "pvc\u{7f}", "\u{7}"] {
        create_fails(
            &d,
            good_create(name),
            Code::InvalidArgument,
            &format!("name {name:?}"),
        )
        .await;
    }
}

/// `volume_capabilities` is REQUIRED, and each capability needs an access
/// type (block or mount) and an access mode other than UNKNOWN.
#[tokio::test]
async fn create_volume_requires_complete_capabilities() {
    let d = Driver::start().await;
    let mut req = good_create("caps-empty");
    req.volume_capabilities.clear();
    create_fails(&d, req, Code::InvalidArgument, "no volume_capabilities").await;

    let mut req = good_create("caps-no-type");
    req.volume_capabilities[0].mount = None;
    create_fails(
        &d,
        req,
        Code::InvalidArgument,
        "capability without access_type",
    )
    .await;

    let mut req = good_create("caps-no-mode");
    req.volume_capabilities[0].access_mode = None;
    create_fails(
        &d,
        req,
        Code::InvalidArgument,
        "capability without access_mode",
    )
    .await;

    let mut req = good_create("caps-unknown-mode");
    req.volume_capabilities[0].access_mode = Some(AccessMode {
        mode: Mode::Unknown as i32,
    });
    create_fails(&d, req, Code::InvalidArgument, "access mode UNKNOWN").await;

    let mut req = good_create("caps-bogus-mode");
    req.volume_capabilities[0].access_mode = Some(AccessMode { mode: 4242 });
    create_fails(&d, req, Code::InvalidArgument, "access mode 4242").await;
}

/// A plugin MUST refuse capabilities it cannot provide. Local LVM volumes
/// are reachable from one node only: every MULTI_NODE access mode is
/// INVALID_ARGUMENT, also when listed next to a supported capability.
#[tokio::test]
async fn create_volume_rejects_multi_node_access_modes() {
    let d = Driver::start().await;
    for mode in [
        Mode::MultiNodeMultiWriter,
        Mode::MultiNodeReaderOnly,
        Mode::MultiNodeSingleWriter,
    ] {
        let req = create_req("multi", THIN, with_mode(ext4(), mode), 64 * MIB, 0);
        create_fails(&d, req, Code::InvalidArgument, &format!("mount {mode:?}")).await;
        let req = create_req("multi", THIN, block_cap_with(mode), 64 * MIB, 0);
        create_fails(&d, req, Code::InvalidArgument, &format!("block {mode:?}")).await;
        let mut req = good_create("multi-mixed");
        req.volume_capabilities.push(block_cap_with(mode));
        create_fails(
            &d,
            req,
            Code::InvalidArgument,
            &format!("ext4 + block {mode:?}"),
        )
        .await;
    }
}

/// Filesystems other than ext4, xfs and btrfs, and fs_type strings that are
/// not plain names, are INVALID_ARGUMENT.
#[tokio::test]
async fn create_volume_rejects_unsupported_fs_types() {
    let d = Driver::start().await;
    for fs in [
        "ntfs",
        "vfat",
        "ext4 ",
        "-t",
        "--type=ext4",
        "ext4;reboot",
        "../ext4",
    ] {
        let req = create_req("fs", THIN, mount_cap(fs), 64 * MIB, 0);
        create_fails(&d, req, Code::InvalidArgument, &format!("fs_type {fs:?}")).await;
    }
}

/// Mount flags end up on a mount command line or in mount(2) options: flags
/// that look like command-line options or carry shell metacharacters are
/// INVALID_ARGUMENT.
#[tokio::test]
async fn create_volume_rejects_dangerous_mount_flags() {
    let d = Driver::start().await;
    for flag in [
        "-o",
        "--bind",
        "noatime;reboot",
        "ro|sh",
        "$(id)",
        "`id`",
        "a&b",
        "x\ny",
    ] {
        let cap = mount_cap_with("ext4", &[flag], Mode::SingleNodeWriter);
        let req = create_req("flags", THIN, cap, 64 * MIB, 0);
        create_fails(
            &d,
            req,
            Code::InvalidArgument,
            &format!("mount flag {flag:?}"),
        )
        .await;
    }
}

/// StorageClass parameters are validated by the plugin: an unknown device
/// class, an unknown key (a typo must not silently give a default volume),
/// and values that look like command-line flags or carry shell
/// metacharacters are INVALID_ARGUMENT.
#[tokio::test]
async fn create_volume_rejects_bad_parameters() {
    let d = Driver::start().await;
    let mut cases: Vec<(Vec<(&str, &str)>, &str)> = vec![
        (
            vec![(DEVICE_CLASS_PARAM, "nosuchclass")],
            "unknown device class",
        ),
        (
            vec![(DEVICE_CLASS_PARAM, "THIN")],
            "device class in the wrong case",
        ),
        (vec![("deviceclass", THIN)], "misspelt key"),
        (vec![("fsType", "ext4")], "unknown key"),
        (
            vec![(DEVICE_CLASS_PARAM, THIN), ("volumeGroup", THIN_VG)],
            "unknown extra key",
        ),
        (
            vec![("csi.storage.k8s.io/pvc/name", "x"), ("bogus", "1")],
            "unknown key + sidecar",
        ),
    ];
    for bad in [
        "-x",
        "--foo",
        "thin;reboot",
        "thin|sh",
        "thin&",
        "$(id)",
        "`id`",
        "thin)",
        "(x",
    ] {
        cases.push((vec![(DEVICE_CLASS_PARAM, bad)], "suspicious value"));
    }
    for (pairs, what) in cases {
        let mut req = good_create("params");
        req.parameters = params(&pairs);
        let what = format!("{what}: {pairs:?}");
        create_fails(&d, req, Code::InvalidArgument, &what).await;
    }
}

/// CapacityRange values MUST NOT be negative (INVALID_ARGUMENT); a range
/// whose limit is below the required size cannot be satisfied, which the
/// spec reports as OUT_OF_RANGE.
#[tokio::test]
async fn create_volume_capacity_range_checks() {
    let d = Driver::start().await;
    let req = create_req("cap", THIN, ext4(), -1, 0);
    create_fails(&d, req, Code::InvalidArgument, "negative required_bytes").await;
    let req = create_req("cap", THIN, ext4(), 0, -MIB);
    create_fails(&d, req, Code::InvalidArgument, "negative limit_bytes").await;
    let req = create_req("cap", THIN, ext4(), 128 * MIB, 64 * MIB);
    create_fails(&d, req, Code::OutOfRange, "limit_bytes < required_bytes").await;
}

/// Volume content sources. A plugin without the matching capability
/// (CREATE_DELETE_SNAPSHOT for snapshots, CLONE_VOLUME for volumes) cannot
/// create a volume from that source, which the spec reports as
/// INVALID_ARGUMENT; a plugin with it reports a source that does not exist as
/// NOT_FOUND. The sources here are ids no volume or snapshot can have.
#[tokio::test]
async fn create_volume_from_missing_or_unsupported_source() {
    let d = Driver::start().await;
    let rpcs = crate::controller::controller_rpcs(&d).await;
    let sources = [
        (
            volume_content_source::Type::Snapshot(volume_content_source::SnapshotSource {
                snapshot_id: "no-such-snapshot".into(),
            }),
            rpcs.contains(&Rpc::CreateDeleteSnapshot),
        ),
        (
            volume_content_source::Type::Volume(volume_content_source::VolumeSource {
                volume_id: "no-such-volume".into(),
            }),
            rpcs.contains(&Rpc::CloneVolume),
        ),
    ];
    for (source, supported) in sources {
        let mut req = good_create("from-source");
        req.volume_content_source = Some(csi::VolumeContentSource {
            r#type: Some(source.clone()),
        });
        let code = if supported {
            Code::NotFound
        } else {
            Code::InvalidArgument
        };
        create_fails(&d, req, code, &format!("source {source:?}")).await;
    }
}

/// DeleteVolume: `volume_id` is REQUIRED.
#[tokio::test]
async fn delete_volume_requires_id() {
    let d = Driver::start().await;
    let r = d
        .controller()
        .delete_volume(csi::DeleteVolumeRequest::default())
        .await;
    expect_code(r, Code::InvalidArgument, "DeleteVolume without id");
}

/// ValidateVolumeCapabilities: `volume_id` and `volume_capabilities` are
/// REQUIRED; a malformed capability is INVALID_ARGUMENT.
#[tokio::test]
async fn validate_volume_capabilities_requires_fields() {
    let d = Driver::start().await;
    let mut c = d.controller();
    let r = c
        .validate_volume_capabilities(csi::ValidateVolumeCapabilitiesRequest {
            volume_capabilities: vec![ext4()],
            ..Default::default()
        })
        .await;
    expect_code(r, Code::InvalidArgument, "no volume_id");
    let r = c
        .validate_volume_capabilities(csi::ValidateVolumeCapabilitiesRequest {
            volume_id: absent_volume_id(),
            ..Default::default()
        })
        .await;
    expect_code(r, Code::InvalidArgument, "no volume_capabilities");
    let mut cap = ext4();
    cap.mount = None;
    let r = c
        .validate_volume_capabilities(csi::ValidateVolumeCapabilitiesRequest {
            volume_id: absent_volume_id(),
            volume_capabilities: vec![cap],
            ..Default::default()
        })
        .await;
    expect_code(r, Code::InvalidArgument, "capability without access_type");
}

/// ControllerExpandVolume: `volume_id` and `capacity_range` are REQUIRED;
/// negative sizes are INVALID_ARGUMENT and limit < required is OUT_OF_RANGE.
#[tokio::test]
async fn controller_expand_volume_validation() {
    let d = Driver::start().await;
    let mut c = d.controller();
    let r = c
        .controller_expand_volume(csi::ControllerExpandVolumeRequest {
            capacity_range: range(GIB, 0),
            ..Default::default()
        })
        .await;
    expect_code(r, Code::InvalidArgument, "no volume_id");
    let r = c
        .controller_expand_volume(csi::ControllerExpandVolumeRequest {
            volume_id: absent_volume_id(),
            ..Default::default()
        })
        .await;
    expect_code(r, Code::InvalidArgument, "no capacity_range");
    let r = c
        .controller_expand_volume(csi::ControllerExpandVolumeRequest {
            volume_id: absent_volume_id(),
            capacity_range: range(-GIB, 0),
            ..Default::default()
        })
        .await;
    expect_code(r, Code::InvalidArgument, "negative required_bytes");
    let r = c
        .controller_expand_volume(csi::ControllerExpandVolumeRequest {
            volume_id: absent_volume_id(),
            capacity_range: range(2 * GIB, GIB),
            ..Default::default()
        })
        .await;
    expect_code(r, Code::OutOfRange, "limit_bytes < required_bytes");
}

/// ControllerGetVolume: `volume_id` is REQUIRED.
#[tokio::test]
async fn controller_get_volume_requires_id() {
    let d = Driver::start().await;
    let r = d
        .controller()
        .controller_get_volume(csi::ControllerGetVolumeRequest::default())
        .await;
    expect_code(r, Code::InvalidArgument, "ControllerGetVolume without id");
}

/// GetCapacity: parameters are validated like CreateVolume's: an unknown
/// device class or unknown key is INVALID_ARGUMENT, as is a malformed
/// capability.
#[tokio::test]
async fn get_capacity_rejects_bad_parameters() {
    let d = Driver::start().await;
    let mut c = d.controller();
    for pairs in [
        vec![(DEVICE_CLASS_PARAM, "nosuchclass")],
        vec![("bogus", "1")],
        vec![(DEVICE_CLASS_PARAM, "--foo")],
    ] {
        let r = c
            .get_capacity(csi::GetCapacityRequest {
                parameters: params(&pairs),
                ..Default::default()
            })
            .await;
        expect_code(r, Code::InvalidArgument, &format!("GetCapacity {pairs:?}"));
    }
    let r = c
        .get_capacity(csi::GetCapacityRequest {
            volume_capabilities: vec![mount_cap("ntfs")],
            parameters: class_params(THIN),
            ..Default::default()
        })
        .await;
    expect_code(r, Code::InvalidArgument, "GetCapacity for ntfs");
}

// ---------------------------------------------------------------------------
// Node service
// ---------------------------------------------------------------------------

fn stage_req(
    d: &Driver,
    volume_id: &str,
    cap: csi::VolumeCapability,
) -> csi::NodeStageVolumeRequest {
    csi::NodeStageVolumeRequest {
        volume_id: volume_id.to_string(),
        staging_target_path: d.path_str("staging"),
        volume_capability: Some(cap),
        ..Default::default()
    }
}

fn publish_req(
    d: &Driver,
    volume_id: &str,
    cap: csi::VolumeCapability,
) -> csi::NodePublishVolumeRequest {
    csi::NodePublishVolumeRequest {
        volume_id: volume_id.to_string(),
        staging_target_path: d.path_str("staging"),
        target_path: d.path_str("target"),
        volume_capability: Some(cap),
        ..Default::default()
    }
}

/// Paths that are not absolute, normalized paths: relative paths and paths
/// with `.` or `..` components. CSI paths MUST be absolute; Lodestone also
/// refuses traversal components so a path cannot escape the directory the CO
/// meant.
fn bad_paths(d: &Driver) -> Vec<String> {
    let base = d.path_str("");
    vec![
        "staging".to_string(),
        "./staging".to_string(),
        "../staging".to_string(),
        format!("{base}/../staging"),
        format!("{base}/a/../../etc"),
    ]
}

/// NodeStageVolume: `volume_id`, `staging_target_path` and
/// `volume_capability` are REQUIRED; the path must be absolute without
/// traversal; the capability must be one the plugin supports.
#[tokio::test]
async fn node_stage_volume_validation() {
    let d = Driver::start().await;
    let mut n = d.node();
    let id = absent_volume_id();

    let r = n.node_stage_volume(stage_req(&d, "", ext4())).await;
    expect_code(r, Code::InvalidArgument, "no volume_id");
    let mut req = stage_req(&d, &id, ext4());
    req.staging_target_path.clear();
    expect_code(
        n.node_stage_volume(req).await,
        Code::InvalidArgument,
        "no staging path",
    );
    let mut req = stage_req(&d, &id, ext4());
    req.volume_capability = None;
    expect_code(
        n.node_stage_volume(req).await,
        Code::InvalidArgument,
        "no capability",
    );
    for path in bad_paths(&d) {
        let mut req = stage_req(&d, &id, ext4());
        req.staging_target_path = path.clone();
        let r = n.node_stage_volume(req).await;
        expect_code(r, Code::InvalidArgument, &format!("staging path {path:?}"));
    }
    let bad_caps = [
        mount_cap("ntfs"),
        with_mode(ext4(), Mode::MultiNodeMultiWriter),
        with_mode(block_cap(), Mode::MultiNodeReaderOnly),
        with_mode(ext4(), Mode::Unknown),
        mount_cap_with("ext4", &["--bind"], Mode::SingleNodeWriter),
    ];
    for cap in bad_caps {
        let r = n.node_stage_volume(stage_req(&d, &id, cap.clone())).await;
        expect_code(r, Code::InvalidArgument, &format!("capability {cap:?}"));
    }
}

/// NodeUnstageVolume: `volume_id` and `staging_target_path` are REQUIRED;
/// the path must be absolute without traversal.
#[tokio::test]
async fn node_unstage_volume_validation() {
    let d = Driver::start().await;
    let mut n = d.node();
    let r = n
        .node_unstage_volume(csi::NodeUnstageVolumeRequest {
            volume_id: String::new(),
            staging_target_path: d.path_str("staging"),
        })
        .await;
    expect_code(r, Code::InvalidArgument, "no volume_id");
    let r = n
        .node_unstage_volume(csi::NodeUnstageVolumeRequest {
            volume_id: absent_volume_id(),
            staging_target_path: String::new(),
        })
        .await;
    expect_code(r, Code::InvalidArgument, "no staging path");
    for path in bad_paths(&d) {
        let r = n
            .node_unstage_volume(csi::NodeUnstageVolumeRequest {
                volume_id: absent_volume_id(),
                staging_target_path: path.clone(),
            })
            .await;
        expect_code(r, Code::InvalidArgument, &format!("staging path {path:?}"));
    }
}

/// NodePublishVolume: `volume_id`, `target_path` and `volume_capability` are
/// REQUIRED; paths must be absolute without traversal; the capability must be
/// one the plugin supports.
#[tokio::test]
async fn node_publish_volume_validation() {
    let d = Driver::start().await;
    let mut n = d.node();
    let id = absent_volume_id();

    let r = n.node_publish_volume(publish_req(&d, "", ext4())).await;
    expect_code(r, Code::InvalidArgument, "no volume_id");
    let mut req = publish_req(&d, &id, ext4());
    req.target_path.clear();
    expect_code(
        n.node_publish_volume(req).await,
        Code::InvalidArgument,
        "no target path",
    );
    let mut req = publish_req(&d, &id, ext4());
    req.volume_capability = None;
    expect_code(
        n.node_publish_volume(req).await,
        Code::InvalidArgument,
        "no capability",
    );
    for path in bad_paths(&d) {
        let mut req = publish_req(&d, &id, ext4());
        req.target_path = path.clone();
        let r = n.node_publish_volume(req).await;
        expect_code(r, Code::InvalidArgument, &format!("target path {path:?}"));
        let mut req = publish_req(&d, &id, ext4());
        req.staging_target_path = path.clone();
        let r = n.node_publish_volume(req).await;
        expect_code(r, Code::InvalidArgument, &format!("staging path {path:?}"));
    }
    for cap in [
        mount_cap("ntfs"),
        with_mode(ext4(), Mode::MultiNodeMultiWriter),
        with_mode(block_cap(), Mode::MultiNodeSingleWriter),
    ] {
        let r = n
            .node_publish_volume(publish_req(&d, &id, cap.clone()))
            .await;
        expect_code(r, Code::InvalidArgument, &format!("capability {cap:?}"));
    }
}

/// NodeUnpublishVolume: `volume_id` and `target_path` are REQUIRED; the path
/// must be absolute without traversal.
#[tokio::test]
async fn node_unpublish_volume_validation() {
    let d = Driver::start().await;
    let mut n = d.node();
    let r = n
        .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
            volume_id: String::new(),
            target_path: d.path_str("target"),
        })
        .await;
    expect_code(r, Code::InvalidArgument, "no volume_id");
    let r = n
        .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
            volume_id: absent_volume_id(),
            target_path: String::new(),
        })
        .await;
    expect_code(r, Code::InvalidArgument, "no target path");
    for path in bad_paths(&d) {
        let r = n
            .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                volume_id: absent_volume_id(),
                target_path: path.clone(),
            })
            .await;
        expect_code(r, Code::InvalidArgument, &format!("target path {path:?}"));
    }
}

/// NodeGetVolumeStats: `volume_id` and `volume_path` are REQUIRED. A path
/// that cannot hold a published volume (relative) is NOT_FOUND, as
/// csi-sanity expects ("volume does not exist on the specified path").
#[tokio::test]
async fn node_get_volume_stats_validation() {
    let d = Driver::start().await;
    let mut n = d.node();
    let r = n
        .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
            volume_path: d.path_str(""),
            ..Default::default()
        })
        .await;
    expect_code(r, Code::InvalidArgument, "no volume_id");
    let r = n
        .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
            volume_id: absent_volume_id(),
            ..Default::default()
        })
        .await;
    expect_code(r, Code::InvalidArgument, "no volume_path");
    let r = n
        .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
            volume_id: absent_volume_id(),
            volume_path: "relative/path".into(),
            ..Default::default()
        })
        .await;
    expect_code(r, Code::NotFound, "relative volume_path");
}

/// NodeExpandVolume: `volume_id` and `volume_path` are REQUIRED; negative
/// sizes are INVALID_ARGUMENT; a relative path holds no volume (NOT_FOUND,
/// as for NodeGetVolumeStats).
#[tokio::test]
async fn node_expand_volume_validation() {
    let d = Driver::start().await;
    let mut n = d.node();
    let r = n
        .node_expand_volume(csi::NodeExpandVolumeRequest {
            volume_path: d.path_str("target"),
            ..Default::default()
        })
        .await;
    expect_code(r, Code::InvalidArgument, "no volume_id");
    let r = n
        .node_expand_volume(csi::NodeExpandVolumeRequest {
            volume_id: absent_volume_id(),
            ..Default::default()
        })
        .await;
    expect_code(r, Code::InvalidArgument, "no volume_path");
    let r = n
        .node_expand_volume(csi::NodeExpandVolumeRequest {
            volume_id: absent_volume_id(),
            volume_path: d.path_str("target"),
            capacity_range: range(-1, 0),
            ..Default::default()
        })
        .await;
    expect_code(r, Code::InvalidArgument, "negative required_bytes");
    let r = n
        .node_expand_volume(csi::NodeExpandVolumeRequest {
            volume_id: absent_volume_id(),
            volume_path: "target".into(),
            ..Default::default()
        })
        .await;
    expect_code(r, Code::NotFound, "relative volume_path");
}

/// A mount capability with an empty fs_type is valid (the plugin picks its
/// default); this guards the validation tests above against refusing every
/// mount capability. Checked through ValidateVolumeCapabilities' argument
/// handling: a well-formed request for a missing volume is NOT_FOUND, not
/// INVALID_ARGUMENT.
#[tokio::test]
async fn well_formed_requests_pass_validation() {
    let d = Driver::start().await;
    let cap = csi::VolumeCapability {
        block: None,
        mount: Some(MountVolume::default()),
        access_mode: access_mode(Mode::SingleNodeWriter),
    };
    for cap in [
        cap,
        ext4(),
        xfs(),
        btrfs(),
        block_cap(),
        with_mode(ext4(), Mode::SingleNodeReaderOnly),
    ] {
        let r = d
            .controller()
            .validate_volume_capabilities(csi::ValidateVolumeCapabilitiesRequest {
                volume_id: "no-such-volume".into(),
                volume_capabilities: vec![cap.clone()],
                ..Default::default()
            })
            .await;
        expect_code(
            r,
            Code::NotFound,
            &format!("ValidateVolumeCapabilities {cap:?}"),
        );
    }
}

/// `mutable_parameters` may only be sent to a plugin with MODIFY_VOLUME,
/// which Lodestone does not offer: CreateVolume with them is
/// INVALID_ARGUMENT rather than a volume that silently ignores them.
#[tokio::test]
async fn create_volume_rejects_mutable_parameters() {
    let d = Driver::start().await;
    let mut req = good_create("mutable-params");
    req.mutable_parameters = params(&[("iops", "1000")]);
    create_fails(&d, req, Code::InvalidArgument, "mutable_parameters").await;
}

/// A capability that sets both `block` and `mount`. The spec declares them
/// as a oneof, so a decoder that follows it would keep only the last one;
/// on the wire both are there, as this checks.
fn block_and_mount() -> csi::VolumeCapability {
    use prost::Message;
    let mut cap = ext4();
    cap.block = Some(BlockVolume {});
    let wire = cap.encode_to_vec();
    // field 1 (block, length-delimited, empty) then field 2 (mount)
    assert_eq!(wire[..3], [0x0a, 0x00, 0x12], "{wire:?}");
    cap
}

/// Exactly one access type is allowed: a capability with both block and
/// mount is INVALID_ARGUMENT in every RPC that takes capabilities, whatever
/// else the request says (here: an existing-looking but absent volume).
#[tokio::test]
async fn capabilities_with_both_access_types_are_invalid() {
    let d = Driver::start().await;
    let mut c = d.controller();
    let both = block_and_mount();
    let mut req = good_create("both-access-types");
    req.volume_capabilities = vec![both.clone()];
    create_fails(&d, req, Code::InvalidArgument, "CreateVolume block+mount").await;
    let mut req = good_create("both-access-types-2");
    req.volume_capabilities.push(both.clone());
    create_fails(
        &d,
        req,
        Code::InvalidArgument,
        "CreateVolume ext4, block+mount",
    )
    .await;
    let r = c
        .validate_volume_capabilities(csi::ValidateVolumeCapabilitiesRequest {
            volume_id: absent_volume_id(),
            volume_capabilities: vec![both.clone()],
            ..Default::default()
        })
        .await;
    expect_code(
        r,
        Code::InvalidArgument,
        "ValidateVolumeCapabilities block+mount",
    );
    let r = c
        .controller_expand_volume(csi::ControllerExpandVolumeRequest {
            volume_id: absent_volume_id(),
            capacity_range: range(GIB, 0),
            volume_capability: Some(both.clone()),
            ..Default::default()
        })
        .await;
    expect_code(
        r,
        Code::InvalidArgument,
        "ControllerExpandVolume block+mount",
    );
    let r = c
        .get_capacity(csi::GetCapacityRequest {
            volume_capabilities: vec![both.clone()],
            parameters: class_params(THIN),
            ..Default::default()
        })
        .await;
    expect_code(r, Code::InvalidArgument, "GetCapacity block+mount");

    let mut n = d.node();
    let id = absent_volume_id();
    let r = n.node_stage_volume(stage_req(&d, &id, both.clone())).await;
    expect_code(r, Code::InvalidArgument, "NodeStageVolume block+mount");
    let r = n
        .node_publish_volume(publish_req(&d, &id, both.clone()))
        .await;
    expect_code(r, Code::InvalidArgument, "NodePublishVolume block+mount");
    let r = n
        .node_expand_volume(csi::NodeExpandVolumeRequest {
            volume_id: id.clone(),
            volume_path: d.path_str("target"),
            capacity_range: range(GIB, 0),
            volume_capability: Some(both),
            ..Default::default()
        })
        .await;
    expect_code(r, Code::InvalidArgument, "NodeExpandVolume block+mount");
}
