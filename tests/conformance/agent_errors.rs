//! The agent API carries what went wrong on the node as the LVM error's
//! own variant, on the host (no volume groups needed): the controller's
//! client gets back the variant the agent had, and a plain gRPC client
//! still reads the code it always did.

use std::time::Duration;

use lodestone::agentpb::agent_client::AgentClient;
use lodestone::agentpb::{CreateRequest, LvRef};
use lodestone::error::Error;
use lodestone::lvm::agent::Agent as _;
use lodestone::lvm::error::LvmError;
use lodestone::lvm::remote::{Deadlines, RemoteAgent};
use lodestone::lvm::rpc::ERROR_KEY;
use lodestone::tls::TlsMaterial;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use tonic::Code;

use crate::common::cluster::NodeAgent;
use crate::common::pki::{Ca, TlsFiles, CONTROLLER_IDENTITY};
use crate::common::*;

fn read(p: &std::path::Path) -> Vec<u8> {
    std::fs::read(p).unwrap()
}

fn deadlines() -> Deadlines {
    Deadlines {
        connect: Duration::from_secs(5),
        read: Duration::from_secs(10),
        write: Duration::from_secs(10),
    }
}

async fn raw_client(
    a: &NodeAgent,
    ca: &Ca,
    id: &TlsFiles,
) -> AgentClient<tonic::transport::Channel> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(&ca.ca_path())))
        .domain_name(a.node.clone())
        .identity(Identity::from_pem(read(&id.cert), read(&id.key)));
    let ch = Endpoint::from_shared(format!("https://{}", a.address))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .expect("connect");
    AgentClient::new(ch)
}

fn variant(s: &tonic::Status) -> Option<&str> {
    s.metadata().get(ERROR_KEY).and_then(|v| v.to_str().ok())
}

#[tokio::test]
async fn agent_errors_arrive_as_their_variant() {
    let dir = new_temp_dir();
    let ca = Ca::new(dir.path(), "good");
    let a = NodeAgent::start(&ca, "node-a", "127.0.0.1", &default_class_args()).await;
    let ctl_files = ca.issue(CONTROLLER_IDENTITY);
    let ctl = TlsMaterial::from_pem(
        read(&ctl_files.cert),
        read(&ctl_files.key),
        read(&ctl_files.ca),
    )
    .unwrap();
    let remote = RemoteAgent::new("node-a", &a.address, &ctl, deadlines()).unwrap();

    // A class the node does not serve: the variant the controller skips
    // nodes on, not a missing LV.
    let e = remote
        .capacity("no-such-class")
        .await
        .expect_err("capacity of an unknown class");
    assert!(matches!(e, LvmError::NoSuchClass(_)), "{e:?}");
    assert_eq!(Error::from(e).code(), Code::NotFound);

    // An LV that is not Lodestone's: refused as such, not as a transport
    // failure; to CSI it stays UNAVAILABLE, as before.
    let e = remote
        .remove(THIN, "pool0")
        .await
        .expect_err("remove of a foreign LV");
    assert!(matches!(e, LvmError::PermissionDenied(_)), "{e:?}");
    assert!(e.to_string().contains("pool0"), "{e}");
    assert_eq!(Error::from(e).code(), Code::Unavailable);

    // A plain client: the same codes as ever, and the variant beside them.
    let mut c = raw_client(&a, &ca, &ctl_files).await;
    let s = c
        .find(LvRef {
            class: THIN.into(),
            name: "pool0".into(),
        })
        .await
        .expect_err("find of a foreign LV");
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    assert_eq!(variant(&s), Some("permission-denied"), "{s:?}");
    let s = c
        .create(CreateRequest {
            class: THIN.into(),
            name: "lds-00000000000000000000000000000000".into(),
            size: 4 << 20,
            ..Default::default()
        })
        .await
        .expect_err("untagged create");
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert_eq!(variant(&s), Some("bad-request"), "{s:?}");
    let s = c
        .capacity(lodestone::agentpb::CapacityRequest {
            class: "no-such-class".into(),
        })
        .await
        .expect_err("capacity of an unknown class");
    assert_eq!(s.code(), Code::NotFound, "{s:?}");
    assert_eq!(variant(&s), Some("no-such-class"), "{s:?}");
}
