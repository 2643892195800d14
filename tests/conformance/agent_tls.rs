//! The agent API's mutual TLS, on the host (no volume groups needed): an
//! agent answers only the controller's certificate from its own CA, and
//! the controller only trusts the node it meant to reach.

use std::time::Duration;

use lodestone::agentpb::agent_client::AgentClient;
use lodestone::agentpb::{CreateRequest, DescribeRequest};
use lodestone::lvm::agent::Agent as _;
use lodestone::lvm::remote::{Deadlines, RemoteAgent};
use lodestone::tls::TlsMaterial;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use tonic::Code;

use crate::common::cluster::NodeAgent;
use crate::common::pki::{Ca, TlsFiles, CONTROLLER_IDENTITY};
use crate::common::*;

fn read(p: &std::path::Path) -> Vec<u8> {
    std::fs::read(p).unwrap()
}

fn material(files: &TlsFiles) -> TlsMaterial {
    TlsMaterial::from_pem(read(&files.cert), read(&files.key), read(&files.ca))
}

/// A raw client of the agent at `address` that trusts `ca` for the server
/// and presents `identity` (if any).
async fn client(
    address: &str,
    server_name: &str,
    ca: &std::path::Path,
    identity: Option<&TlsFiles>,
) -> Result<AgentClient<tonic::transport::Channel>, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(ca)))
        .domain_name(server_name);
    if let Some(id) = identity {
        tls = tls.identity(Identity::from_pem(read(&id.cert), read(&id.key)));
    }
    let ch = Endpoint::from_shared(format!("https://{address}"))
        .unwrap()
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await?;
    Ok(AgentClient::new(ch))
}

fn create_req() -> CreateRequest {
    CreateRequest {
        class: THIN.into(),
        name: "lds-00000000000000000000000000000000".into(),
        size: 4 << 20,
        ..Default::default()
    }
}

async fn agent(ca: &Ca) -> NodeAgent {
    NodeAgent::start(ca, "node-a", "127.0.0.1", &default_class_args()).await
}

/// The controller's certificate is answered; the agent says who it is.
#[tokio::test]
async fn agent_answers_the_controller() {
    let dir = new_temp_dir();
    let ca = Ca::new(dir.path(), "good");
    let a = agent(&ca).await;
    let ctl = ca.issue(CONTROLLER_IDENTITY);
    let mut c = client(&a.address, "node-a", &ca.ca_path(), Some(&ctl))
        .await
        .expect("connect");
    let d = c
        .describe(DescribeRequest {})
        .await
        .expect("Describe")
        .into_inner();
    assert_eq!(d.node, "node-a");
    assert_eq!(d.classes, vec![THIN.to_string(), THICK.to_string()]);
}

/// No client certificate: the handshake or the call fails, and the agent
/// runs nothing.
#[tokio::test]
async fn agent_refuses_a_client_without_certificate() {
    let dir = new_temp_dir();
    let ca = Ca::new(dir.path(), "good");
    let a = agent(&ca).await;
    let refused = match client(&a.address, "node-a", &ca.ca_path(), None).await {
        Err(_) => true,
        Ok(mut c) => c.create(create_req()).await.is_err(),
    };
    assert!(
        refused,
        "an agent call without a client certificate was answered"
    );
    assert!(
        !a.driver.log().contains("agent: create"),
        "the agent worked for an unauthenticated peer:\n{}",
        a.driver.log()
    );
}

/// A client certificate from another CA, even one naming the controller,
/// is refused.
#[tokio::test]
async fn agent_refuses_a_certificate_from_another_ca() {
    let dir = new_temp_dir();
    let ca = Ca::new(dir.path(), "good");
    let rogue = Ca::new(dir.path(), "rogue");
    let a = agent(&ca).await;
    let fake = rogue.issue(CONTROLLER_IDENTITY);
    let refused = match client(&a.address, "node-a", &ca.ca_path(), Some(&fake)).await {
        Err(_) => true,
        Ok(mut c) => c.create(create_req()).await.is_err(),
    };
    assert!(refused, "a certificate from another CA was accepted");
    assert!(!a.driver.log().contains("agent: create"));
}

/// A certificate from the right CA that does not name the controller (say,
/// another node's) gets PERMISSION_DENIED before any LVM work.
#[tokio::test]
async fn agent_refuses_a_peer_that_is_not_the_controller() {
    let dir = new_temp_dir();
    let ca = Ca::new(dir.path(), "good");
    let a = agent(&ca).await;
    let other = ca.issue("node-b");
    let mut c = client(&a.address, "node-a", &ca.ca_path(), Some(&other))
        .await
        .expect("the TLS handshake itself succeeds");
    let e = c.create(create_req()).await.expect_err("answered node-b");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains(CONTROLLER_IDENTITY), "{}", e.message());
    assert!(!a.driver.log().contains("agent: create"));
}

/// The controller refuses an agent whose certificate names another node
/// (a wrong address in the map, or an impostor): UNAVAILABLE naming both.
#[tokio::test]
async fn controller_refuses_an_agent_that_is_another_node() {
    let dir = new_temp_dir();
    let ca = Ca::new(dir.path(), "good");
    let a = agent(&ca).await;
    let ctl = material(&ca.issue(CONTROLLER_IDENTITY));
    let deadlines = Deadlines {
        connect: Duration::from_secs(5),
        read: Duration::from_secs(10),
        write: Duration::from_secs(10),
    };
    // node-a's agent answers at the address the controller has for node-b.
    let wrong = RemoteAgent::new("node-b", &a.address, &ctl, deadlines).unwrap();
    let e = wrong
        .find(THIN, "lds-x")
        .await
        .expect_err("trusted node-a as node-b");
    assert!(
        matches!(e, lodestone::error::Error::Unavailable(_)),
        "{e:?}"
    );
    assert!(e.to_string().contains("node-b"), "{e}");
    // The right name works.
    let right = RemoteAgent::new("node-a", &a.address, &ctl, deadlines).unwrap();
    assert_eq!(right.describe().await.expect("describe").node, "node-a");
}

/// A controller without TLS files or without agents, or a node without TLS
/// files, refuses to start with a message saying what is missing.
#[test]
fn central_modes_need_tls_and_agents() {
    let dir = new_temp_dir();
    let ca = Ca::new(dir.path(), "good");
    let ctl = ca.issue(CONTROLLER_IDENTITY);
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<String>>();
    let cases: Vec<(&str, Vec<String>, &str)> = vec![
        ("node", vec![], "--tls-cert"),
        ("controller", s(&["--agent", "n=127.0.0.1:1"]), "--tls-cert"),
        ("controller", ctl.args(), "--agent NODE=HOST:PORT"),
        (
            "controller",
            [s(&["--agent", "n-1"]), ctl.args()].concat(),
            "expected NODE=HOST:PORT",
        ),
        ("node", s(&["--tls-cert", "/x"]), "go together"),
    ];
    for (mode, args, want) in cases {
        let (status, log) = Driver::builder()
            .mode(mode)
            .args(args.clone())
            .run_to_exit(Duration::from_secs(20));
        let status = status.unwrap_or_else(|| panic!("{args:?}: still running\n{log}"));
        assert!(!status.success(), "{args:?} started:\n{log}");
        assert!(log.contains(want), "{args:?}: log lacks {want:?}:\n{log}");
    }
}
