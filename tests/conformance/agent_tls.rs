//! The agent API's mutual TLS, on the host (no volume groups needed): an
//! agent answers only the controller's certificate from its own CA, and
//! the controller only trusts the node it meant to reach.

use std::time::Duration;

use lodestone::agentpb::agent_client::AgentClient;
use lodestone::agentpb::{
    CreateRequest, DescribeRequest, ExtendRequest, LvRef, Origin, ResumeRequest,
};
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
    TlsMaterial::from_pem(read(&files.cert), read(&files.key), read(&files.ca)).unwrap()
}

/// A raw client of the agent at `address` that trusts `ca` for the server
/// and presents `identity` (if any).
pub async fn client(
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
        matches!(e, lodestone::lvm::error::LvmError::Unavailable(_)),
        "{e:?}"
    );
    assert!(e.to_string().contains("node-b"), "{e}");
    // The right name works.
    let right = RemoteAgent::new("node-a", &a.address, &ctl, deadlines).unwrap();
    assert_eq!(right.describe().await.expect("describe").node, "node-a");
}

/// The inventory stream has its own transport on the agent's port (ALPN
/// `lodestone-inventory/1`, no HTTP/2): the controller's certificate gets
/// the node's full inventory and then heartbeats; another certificate of
/// the same CA gets PERMISSION_DENIED and nothing of the inventory; gRPC
/// on the same port still answers.
#[tokio::test]
async fn the_inventory_stream_has_its_own_transport_for_the_controller_only() {
    use lodestone::agentpb::WatchRequest;
    use tokio_stream::StreamExt;
    let dir = new_temp_dir();
    let ca = Ca::new(dir.path(), "good");
    let a = agent(&ca).await;
    let request = WatchRequest {
        heartbeat_ms: 200,
        part_bytes: 1024,
        ..Default::default()
    };
    let watch = |m: TlsMaterial| {
        let (address, request) = (a.address.clone(), request.clone());
        async move {
            lodestone::lvm::wire::watch(&m, "node-a", &address, Duration::from_secs(5), request)
                .await
        }
    };
    let ctl = material(&ca.issue(CONTROLLER_IDENTITY));
    let mut updates = Box::pin(watch(ctl.clone()).await.expect("the controller's watch"));
    let first = updates
        .next()
        .await
        .expect("an update")
        .expect("not an error");
    assert!(first.full && !first.epoch.is_empty(), "{first:?}");
    // Heartbeats follow: the same epoch, nothing new.
    let mut last = first;
    while last.more {
        last = updates
            .next()
            .await
            .expect("the parts")
            .expect("not an error");
    }
    let beat = tokio::time::timeout(Duration::from_secs(5), updates.next())
        .await
        .expect("a heartbeat within 5 s")
        .expect("the stream goes on")
        .expect("not an error");
    assert_eq!(
        (beat.epoch.as_str(), beat.full, beat.lvs.len()),
        (last.epoch.as_str(), false, 0)
    );

    let other = material(&ca.issue("node-b"));
    let mut refused = Box::pin(
        watch(other)
            .await
            .expect("the TLS handshake itself succeeds"),
    );
    let e = refused
        .next()
        .await
        .expect("an answer")
        .expect_err("node-b's certificate was sent the inventory");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains(CONTROLLER_IDENTITY), "{e:?}");
    assert!(refused.next().await.is_none(), "the stream ends there");

    let deadlines = Deadlines {
        connect: Duration::from_secs(5),
        read: Duration::from_secs(10),
        write: Duration::from_secs(10),
    };
    let right = RemoteAgent::new("node-a", &a.address, &ctl, deadlines).unwrap();
    assert_eq!(right.describe().await.expect("gRPC too").node, "node-a");
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

/// Copies `from` to `live` (written beside and renamed in, as a renewal
/// does) and returns the live paths.
fn install(from: &TlsFiles, live: &std::path::Path) -> TlsFiles {
    std::fs::create_dir_all(live).unwrap();
    let to = TlsFiles {
        cert: live.join("tls.crt"),
        key: live.join("tls.key"),
        ca: live.join("ca.crt"),
    };
    for (src, dst) in [
        (&from.cert, &to.cert),
        (&from.key, &to.key),
        (&from.ca, &to.ca),
    ] {
        let tmp = dst.with_extension("new");
        std::fs::copy(src, &tmp).unwrap();
        std::fs::rename(&tmp, dst).unwrap();
    }
    to
}

async fn start_agent_with(node: &str, files: &TlsFiles) -> (Driver, String) {
    let address = format!("127.0.0.1:{}", crate::common::pki::free_port("127.0.0.1"));
    let d = Driver::builder()
        .mode("node")
        .node_id(node)
        .class_args(default_class_args())
        .args(["--agent-listen", address.as_str()])
        .args(files.args())
        .start()
        .await;
    (d, address)
}

/// Whether the controller receives `node`'s inventory within 15 s.
async fn inventory_from(controller: &Driver, node: &str) -> bool {
    let line = format!("node inventory received node={node}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while std::time::Instant::now() < deadline {
        if controller.log().contains(&line) {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    false
}

/// Certificates are re-read when their files change, with no restart: a
/// whole new CA, node and controller certificates replace the old files;
/// new connections to the running agent need the new CA, and the running
/// controller's new connections present the new certificate and trust only
/// the new CA.
#[tokio::test]
async fn certificates_are_reloaded_without_a_restart() {
    let dir = new_temp_dir();
    let old = Ca::new(dir.path(), "old");
    let new = Ca::new(dir.path(), "new");
    let agent_files = install(&old.issue("node-a"), &dir.path().join("agent"));
    let ctl_files = install(
        &old.issue(CONTROLLER_IDENTITY),
        &dir.path().join("controller"),
    );
    let (agent_a, address_a) = start_agent_with("node-a", &agent_files).await;
    let address_b = format!("127.0.0.1:{}", crate::common::pki::free_port("127.0.0.1"));
    let address_c = format!("127.0.0.1:{}", crate::common::pki::free_port("127.0.0.1"));
    let controller = Driver::builder()
        .mode("controller")
        .node_id("controller")
        .args(ctl_files.args())
        .args(["--agent", &format!("node-a={address_a}")])
        .args(["--agent", &format!("node-b={address_b}")])
        .args(["--agent", &format!("node-c={address_c}")])
        .start()
        .await;
    assert!(
        inventory_from(&controller, "node-a").await,
        "before the change: {}",
        controller.log()
    );

    // The renewal: a new CA and new certificates under the same paths.
    install(&new.issue("node-a"), &dir.path().join("agent"));
    install(
        &new.issue(CONTROLLER_IDENTITY),
        &dir.path().join("controller"),
    );

    // The running agent: the new controller certificate is answered ...
    let mut c = client(
        &address_a,
        "node-a",
        &new.ca_path(),
        Some(&new.issue(CONTROLLER_IDENTITY)),
    )
    .await
    .expect("connect with the new CA");
    let d = c
        .describe(DescribeRequest {})
        .await
        .expect("Describe with the new CA");
    assert_eq!(d.into_inner().node, "node-a");
    // ... and the old one is not, from either side's point of view.
    let old_ctl = old.issue(CONTROLLER_IDENTITY);
    let refused = match client(&address_a, "node-a", &old.ca_path(), Some(&old_ctl)).await {
        Err(_) => true,
        Ok(mut c) => c.describe(DescribeRequest {}).await.is_err(),
    };
    assert!(refused, "the agent still serves the old CA");
    assert!(agent_a.log().contains("reloaded"), "{}", agent_a.log());

    // The running controller: a node that comes up with the new CA is
    // reached, one still on the old CA is refused.
    let b_files = install(&new.issue("node-b"), &dir.path().join("agent-b"));
    let c_files = install(&old.issue("node-c"), &dir.path().join("agent-c"));
    let _b = Driver::builder()
        .mode("node")
        .node_id("node-b")
        .class_args(default_class_args())
        .args(["--agent-listen", address_b.as_str()])
        .args(b_files.args())
        .start()
        .await;
    let _c = Driver::builder()
        .mode("node")
        .node_id("node-c")
        .class_args(default_class_args())
        .args(["--agent-listen", address_c.as_str()])
        .args(c_files.args())
        .start()
        .await;
    assert!(
        inventory_from(&controller, "node-b").await,
        "the controller did not reach the new node: {}",
        controller.log()
    );
    assert!(
        !inventory_from(&controller, "node-c").await,
        "the controller still trusts the old CA: {}",
        controller.log()
    );
    assert!(
        controller.log().contains("reloaded"),
        "{}",
        controller.log()
    );
}

/// A renewal that leaves files that do not load (here a key that does
/// not match the certificate) changes nothing: the agent keeps serving with
/// the last good material, and picks up the files once they are whole.
#[tokio::test]
async fn a_broken_renewal_keeps_the_last_good_certificate() {
    let dir = new_temp_dir();
    let ca = Ca::new(dir.path(), "ca");
    let live = dir.path().join("agent");
    let files = install(&ca.issue("node-a"), &live);
    let (agent_a, address) = start_agent_with("node-a", &files).await;
    let other = ca.issue("node-a");
    std::fs::copy(&other.key, live.join("tls.key.new")).unwrap();
    std::fs::rename(live.join("tls.key.new"), &files.key).unwrap();
    let ctl = ca.issue(CONTROLLER_IDENTITY);
    let mut c = client(&address, "node-a", &ca.ca_path(), Some(&ctl))
        .await
        .expect("connect");
    c.describe(DescribeRequest {})
        .await
        .expect("served with the last good certificate");
    assert!(agent_a.log().contains("do not load"), "{}", agent_a.log());
    install(&other, &live);
    let mut c = client(&address, "node-a", &ca.ca_path(), Some(&ctl))
        .await
        .expect("connect");
    c.describe(DescribeRequest {})
        .await
        .expect("served with the new certificate");
    assert!(agent_a.log().contains("reloaded"), "{}", agent_a.log());
}

/// The agent API acts on Lodestone's LVs only, even for the controller's
/// own certificate: names that are not a volume's or a snapshot's (the thin
/// pool, another program's LV, a temporary copy source) are refused with
/// PERMISSION_DENIED before any LVM work. (The tag check on real LVs is in
/// `agent_scope_lvm`.)
#[tokio::test]
async fn agent_refuses_lvs_that_are_not_lodestones() {
    let dir = new_temp_dir();
    let ca = Ca::new(dir.path(), "good");
    let a = agent(&ca).await;
    let ctl = ca.issue(CONTROLLER_IDENTITY);
    let mut c = client(&a.address, "node-a", &ca.ca_path(), Some(&ctl))
        .await
        .expect("connect");
    let r = |name: &str| LvRef {
        class: THIN.into(),
        name: name.into(),
    };
    for name in [
        "pool0",
        "pool0_tdata",
        "root",
        "lds-x",
        "ldtmp-00000000000000000000000000000000",
        "lds-0000000000000000000000000000000G",
        "../lds-00000000000000000000000000000000",
    ] {
        let codes = [
            c.remove(r(name)).await.map(drop),
            c.extend(ExtendRequest {
                class: THIN.into(),
                name: name.into(),
                size: 1 << 30,
            })
            .await
            .map(drop),
            c.find(r(name)).await.map(drop),
            c.resume(ResumeRequest {
                class: THIN.into(),
                name: name.into(),
                pull: None,
            })
            .await
            .map(drop),
            c.copy_progress(r(name)).await.map(drop),
            c.create(CreateRequest {
                name: name.into(),
                tags: vec!["lodestone.v1.vol".into()],
                ..create_req()
            })
            .await
            .map(drop),
            c.create(CreateRequest {
                tags: vec!["lodestone.v1.vol".into()],
                origin: Some(Origin {
                    class: THIN.into(),
                    lv: name.into(),
                    frozen: false,
                }),
                ..create_req()
            })
            .await
            .map(drop),
        ];
        for (i, got) in codes.into_iter().enumerate() {
            let e = got.expect_err(name);
            assert_eq!(e.code(), Code::PermissionDenied, "{name} call {i}: {e:?}");
        }
    }
    // A new LV must carry its kind's tag.
    let e = c.create(create_req()).await.expect_err("untagged create");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let log = a.driver.log();
    for work in ["agent: create", "agent: remove", "agent: extend"] {
        assert!(
            !log.contains(work),
            "the agent worked on a foreign LV:\n{log}"
        );
    }
}
