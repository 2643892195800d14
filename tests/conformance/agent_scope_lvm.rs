//! The agent API on real LVM (guest): whoever holds the controller's
//! certificate can act only on Lodestone's own LVs. The thin pool, another
//! program's LV and an LV that only looks like one of Lodestone's (its name,
//! not its tag) are refused and stay as they were.

use std::process::Command;

use lodestone::agentpb::{
    BlockMapRequest, CreateRequest, ExtendRequest, GrantRequest, ListRequest, LvRef, Origin,
    ResumeRequest,
};
use tonic::Code;

use crate::agent_tls::client;
use crate::common::cluster::NodeAgent;
use crate::common::pki::{Ca, CONTROLLER_IDENTITY};
use crate::common::*;

const FOREIGN: &str = "not-lodestone-scope";
/// Named like a Lodestone volume, but without its tag.
const LOOKALIKE: &str = "lds-5c0be5c0be5c0be5c0be5c0be5c0be5c";

const LVM_CONFIG: &str = "activation { udev_sync = 0 udev_rules = 0 monitoring = 0 } \
    devices { obtain_device_list_from_udev = 0 use_devicesfile = 0 }";

fn lvm_output(args: &[&str]) -> std::process::Output {
    Command::new("lvm")
        .arg(args[0])
        .args(["--config", LVM_CONFIG])
        .args(&args[1..])
        .output()
        .expect("run lvm")
}

fn lvm(args: &[&str]) {
    let out = lvm_output(args);
    assert!(
        out.status.success(),
        "lvm {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Removes the test's own LVs whatever happens.
struct Cleanup;

impl Drop for Cleanup {
    fn drop(&mut self) {
        for name in [FOREIGN, LOOKALIKE] {
            let _ = lvm_output(&["lvremove", "--yes", &format!("{THIN_VG}/{name}")]);
        }
    }
}

fn sizes() -> Vec<(String, u64)> {
    let mut v: Vec<_> = list_lvs()
        .into_iter()
        .filter(|l| l.vg == THIN_VG)
        .map(|l| (l.name, l.size_bytes))
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn agent_api_acts_only_on_lodestone_lvs() {
    if skip_without_lvm() {
        return;
    }
    let _cleanup = Cleanup;
    for name in [FOREIGN, LOOKALIKE] {
        let pool = format!("{THIN_VG}/pool0");
        lvm(&["lvcreate", "--yes", "-V", "8m", "-T", &pool, "-n", name]);
    }
    let before = sizes();
    let dir = new_temp_dir();
    let ca = Ca::new(dir.path(), "scope");
    let a = NodeAgent::start(&ca, "node-a", "127.0.0.1", &default_class_args()).await;
    let ctl = ca.issue(CONTROLLER_IDENTITY);
    let mut c = client(&a.address, "node-a", &ca.ca_path(), Some(&ctl))
        .await
        .expect("connect as the controller");
    let r = |name: &str| LvRef {
        class: THIN.into(),
        name: name.into(),
    };
    for name in ["pool0", FOREIGN, LOOKALIKE] {
        let e = c.remove(r(name)).await.expect_err(name);
        assert_eq!(e.code(), Code::PermissionDenied, "remove {name}: {e:?}");
        let e = c
            .extend(ExtendRequest {
                class: THIN.into(),
                name: name.into(),
                size: 64 << 20,
            })
            .await
            .expect_err(name);
        assert_eq!(e.code(), Code::PermissionDenied, "extend {name}: {e:?}");
        let e = c
            .resume(ResumeRequest {
                class: THIN.into(),
                name: name.into(),
                pull: None,
            })
            .await
            .expect_err(name);
        assert_eq!(e.code(), Code::PermissionDenied, "resume {name}: {e:?}");
        let e = c
            .create(CreateRequest {
                class: THIN.into(),
                name: "lds-00000000000000000000000000000001".into(),
                size: 8 << 20,
                tags: vec!["lodestone.v1.vol".into()],
                origin: Some(Origin {
                    class: THIN.into(),
                    lv: name.into(),
                    frozen: false,
                }),
                read_only: false,
                pull: None,
            })
            .await
            .expect_err(name);
        assert_eq!(e.code(), Code::PermissionDenied, "clone of {name}: {e:?}");
        let e = c
            .grant(GrantRequest {
                class: THIN.into(),
                name: name.into(),
                node: "node-b".into(),
            })
            .await
            .expect_err(name);
        assert_eq!(e.code(), Code::PermissionDenied, "grant of {name}: {e:?}");
        let map = |name: &str, base: Option<&str>| BlockMapRequest {
            class: THIN.into(),
            name: name.into(),
            base: base.map(String::from),
        };
        let e = c.block_map(map(name, None)).await.expect_err(name);
        assert_eq!(
            e.code(),
            Code::PermissionDenied,
            "block map of {name}: {e:?}"
        );
        let e = c
            .block_map(map("ldsnap-00000000000000000000000000000001", Some(name)))
            .await
            .expect_err(name);
        assert_eq!(
            e.code(),
            Code::PermissionDenied,
            "block map from {name}: {e:?}"
        );
    }
    // Reads: foreign names are refused, the look-alike is not there.
    let e = c.find(r(FOREIGN)).await.expect_err("find foreign");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let found = c.find(r(LOOKALIKE)).await.expect("find look-alike");
    assert!(found.into_inner().lv.is_none(), "an untagged LV was shown");
    let listed = c.list(ListRequest {}).await.expect("list").into_inner();
    let names: Vec<_> = listed
        .lvs
        .iter()
        .filter_map(|l| l.lv.as_ref())
        .map(|l| &l.name)
        .collect();
    assert!(
        !names
            .iter()
            .any(|n| *n == FOREIGN || *n == LOOKALIKE || *n == "pool0"),
        "{names:?}"
    );
    assert_eq!(sizes(), before, "an LV changed");
}
