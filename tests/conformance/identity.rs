//! Identity service: GetPluginInfo, GetPluginCapabilities, Probe.

use lodestone::csi;
use lodestone::csi::plugin_capability::service::Type as ServiceType;
use lodestone::csi::plugin_capability::volume_expansion::Type as ExpansionType;
use lodestone::csi::plugin_capability::Type as CapType;

use crate::common::{expect_ok, lvm_enabled, Driver, DRIVER_NAME};

/// GetPluginInfo: `name` is REQUIRED, in domain-name notation, at most 63
/// characters; `vendor_version` is REQUIRED. Lodestone's LVM driver is
/// `lvm.lodestone.dev` and reports the crate version.
#[tokio::test]
async fn plugin_info_reports_name_and_version() {
    let d = Driver::start().await;
    let info = expect_ok(
        d.identity()
            .get_plugin_info(csi::GetPluginInfoRequest {})
            .await,
        "GetPluginInfo",
    );
    assert_eq!(info.name, DRIVER_NAME);
    assert!(info.name.len() <= 63);
    assert!(
        info.name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-'),
        "name {:?} is not in domain-name notation",
        info.name
    );
    assert!(
        !info.vendor_version.is_empty(),
        "vendor_version is REQUIRED"
    );
    assert!(
        info.vendor_version.contains(env!("CARGO_PKG_VERSION")),
        "vendor_version {:?} should carry the crate version {}",
        info.vendor_version,
        env!("CARGO_PKG_VERSION")
    );
}

/// GetPluginCapabilities: a plugin with a controller service MUST say so
/// (CONTROLLER_SERVICE); a plugin whose volumes are not equally reachable
/// from every node reports VOLUME_ACCESSIBILITY_CONSTRAINTS; Lodestone grows
/// volumes while they are in use, i.e. VolumeExpansion ONLINE.
#[tokio::test]
async fn plugin_capabilities() {
    let d = Driver::start().await;
    let caps = expect_ok(
        d.identity()
            .get_plugin_capabilities(csi::GetPluginCapabilitiesRequest {})
            .await,
        "GetPluginCapabilities",
    )
    .capabilities;
    let services: Vec<ServiceType> = caps
        .iter()
        .filter_map(|c| match &c.r#type {
            Some(CapType::Service(s)) => Some(s.r#type()),
            _ => None,
        })
        .collect();
    let expansion: Vec<ExpansionType> = caps
        .iter()
        .filter_map(|c| match &c.r#type {
            Some(CapType::VolumeExpansion(e)) => Some(e.r#type()),
            _ => None,
        })
        .collect();
    assert!(
        services.contains(&ServiceType::ControllerService),
        "got {caps:?}"
    );
    assert!(
        services.contains(&ServiceType::VolumeAccessibilityConstraints),
        "got {caps:?}"
    );
    assert!(expansion.contains(&ExpansionType::Online), "got {caps:?}");
    assert!(
        !services.contains(&ServiceType::Unknown),
        "UNKNOWN capability reported: {caps:?}"
    );
}

/// Probe: the plugin reports whether it is ready. Without the configured
/// volume groups (the host) Lodestone starts but answers `ready = false`;
/// with them (the guest) `ready = true`.
#[tokio::test]
async fn probe_reports_readiness() {
    let d = Driver::start().await;
    let reply = expect_ok(d.identity().probe(csi::ProbeRequest {}).await, "Probe");
    let expected = lvm_enabled();
    assert_eq!(
        reply.ready,
        Some(expected),
        "Probe.ready should be {expected} (volume groups present: {expected})"
    );
}

/// Probe MAY be called many times and at any time; it is cheap and stable.
#[tokio::test]
async fn probe_is_repeatable() {
    let d = Driver::start().await;
    let mut id = d.identity();
    let first = expect_ok(id.probe(csi::ProbeRequest {}).await, "Probe #1").ready;
    for i in 2..=5 {
        let again = expect_ok(id.probe(csi::ProbeRequest {}).await, "Probe again").ready;
        assert_eq!(again, first, "Probe #{i} changed its answer");
    }
}
