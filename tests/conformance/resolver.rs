//! The central controller finds node agents through the Kubernetes API
//! (CSINode objects, Node InternalIPs), here a fake API server on
//! loopback speaking HTTP/2 over TLS like the real one.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http_body_util::Full;
use lodestone::csi;
use tonic::codegen::Bytes;
use tonic::server::NamedService;
use tonic::transport::{Identity, Server, ServerTlsConfig};
use tonic::Code;

use crate::common::cluster::NodeAgent;
use crate::common::pki::{free_port, Ca, CONTROLLER_IDENTITY};
use crate::common::*;

const TOKEN: &str = "fake-sa-token-5f3a";

#[derive(Default)]
struct Seen {
    paths: Vec<String>,
    unauthorized: usize,
}

/// The fake API: `/api/...` and `/apis/...` (tonic routes by first path
/// segment, so each is its own service type).
#[derive(Clone)]
struct Fake<const GROUPS: bool> {
    seen: Arc<Mutex<Seen>>,
}

impl NamedService for Fake<false> {
    const NAME: &'static str = "api";
}
impl NamedService for Fake<true> {
    const NAME: &'static str = "apis";
}

fn answer(path: &str) -> (u16, String) {
    let body = match path {
        "/apis/storage.k8s.io/v1/csinodes" => {
            r#"{"kind":"CSINodeList","items":[
              {"metadata":{"name":"w1"},"spec":{"drivers":[{"name":"lvm.lodestone.dev","nodeID":"w1"}]}},
              {"metadata":{"name":"w2"},"spec":{"drivers":[{"name":"other.csi.example","nodeID":"w2"}]}},
              {"metadata":{"name":"w3"},"spec":{"drivers":[{"name":"lvm.lodestone.dev","nodeID":"w3"}]}},
              {"metadata":{"name":"w4"},"spec":{}}]}"#
        }
        "/api/v1/nodes/w1" => {
            r#"{"metadata":{"name":"w1"},"status":{"addresses":[
              {"type":"Hostname","address":"w1"},{"type":"InternalIP","address":"127.0.0.1"}]}}"#
        }
        "/api/v1/nodes/w3" => r#"{"metadata":{"name":"w3"},"status":{"addresses":[]}}"#,
        _ => return (404, r#"{"kind":"Status","code":404}"#.to_string()),
    };
    (200, body.to_string())
}

impl<const G: bool> tower::Service<http::Request<tonic::body::Body>> for Fake<G> {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let path = req.uri().path().to_string();
        let authorized = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            == Some(&format!("Bearer {TOKEN}"));
        let (status, body) = {
            let mut seen = self.seen.lock().unwrap();
            seen.paths.push(path.clone());
            if authorized {
                answer(&path)
            } else {
                seen.unauthorized += 1;
                (401, r#"{"kind":"Status","code":401}"#.to_string())
            }
        };
        let resp = http::Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(tonic::body::Body::new(Full::new(Bytes::from(body))))
            .unwrap();
        std::future::ready(Ok(resp))
    }
}

/// CSINodes of this driver are resolved to `InternalIP:agent-port`; other
/// drivers' nodes are ignored, a node without InternalIP is skipped with a
/// warning; the token is sent and never logged. An id naming a node the
/// controller does not know is UNAVAILABLE, not "already deleted".
#[tokio::test]
async fn kubernetes_resolver_finds_agents() {
    let dir = new_temp_dir();
    let ca = Ca::new(dir.path(), "cluster");
    let agent = NodeAgent::start(&ca, "w1", "127.0.0.1", &default_class_args()).await;
    let agent_port = agent.address.rsplit(':').next().unwrap().to_string();

    // The fake API server, with a certificate for kubernetes.default.svc.
    let api_tls = ca.issue("kubernetes.default.svc");
    let seen = Arc::new(Mutex::new(Seen::default()));
    let api_port = free_port("127.0.0.1");
    let server = Server::builder()
        .tls_config(ServerTlsConfig::new().identity(Identity::from_pem(
            std::fs::read(&api_tls.cert).unwrap(),
            std::fs::read(&api_tls.key).unwrap(),
        )))
        .unwrap()
        .add_service(Fake::<false> { seen: seen.clone() })
        .add_service(Fake::<true> { seen: seen.clone() })
        .serve(format!("127.0.0.1:{api_port}").parse().unwrap());
    tokio::spawn(server);

    let sa = dir.path().join("sa");
    std::fs::create_dir(&sa).unwrap();
    std::fs::write(sa.join("token"), format!("{TOKEN}\n")).unwrap();
    std::fs::copy(ca.ca_path(), sa.join("ca.crt")).unwrap();

    let tls = ca.issue(CONTROLLER_IDENTITY);
    let ctl = Driver::builder()
        .mode("controller")
        .node_id("controller")
        .args(tls.args())
        .args([
            "--agent-resolver",
            "kubernetes",
            "--agent-port",
            &agent_port,
        ])
        .args(["--service-account-dir", sa.to_str().unwrap()])
        .env("KUBERNETES_SERVICE_HOST", "127.0.0.1")
        .env("KUBERNETES_SERVICE_PORT", &api_port.to_string())
        .start()
        .await;

    let deadline = Instant::now() + Duration::from_secs(30);
    while !ctl.log().contains("node inventory received") {
        assert!(
            Instant::now() < deadline,
            "the controller never reached w1's agent:\n{}",
            ctl.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = ctl.log();
    assert!(log.contains("node=w1"), "{log}");
    assert!(
        log.contains(&format!("address=127.0.0.1:{agent_port}")),
        "{log}"
    );
    assert!(
        log.contains("no InternalIP"),
        "w3 should be reported:\n{log}"
    );
    assert!(
        !log.contains("node=w2") && !log.contains("/nodes/w2"),
        "{log}"
    );
    assert!(!log.contains(TOKEN), "the token reached the log");
    {
        let seen = seen.lock().unwrap();
        assert_eq!(
            seen.unauthorized, 0,
            "requests without the token: {:?}",
            seen.paths
        );
        assert!(
            seen.paths.iter().any(|p| p == "/api/v1/nodes/w1"),
            "{:?}",
            seen.paths
        );
        assert!(
            !seen.paths.iter().any(|p| p.ends_with("/w2")),
            "{:?}",
            seen.paths
        );
    }

    // A volume on a node this controller does not know: not "deleted".
    let r = ctl
        .controller()
        .delete_volume(csi::DeleteVolumeRequest {
            volume_id: "lvm1:w9:thin:0123456789abcdef0123456789abcdef".into(),
            ..Default::default()
        })
        .await;
    let e = expect_code(r, Code::Unavailable, "DeleteVolume on an unknown node");
    assert!(e.message().contains("w9"), "{}", e.message());
}
