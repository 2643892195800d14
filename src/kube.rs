//! A minimal in-cluster Kubernetes API client: authenticated GETs of a few
//! JSON objects (the central controller finds node agents with it). It
//! speaks HTTP/2 over TLS through the same transport as the agent API.
//!
//! The service account token is read from its file on every call
//! (projected tokens rotate) and never logged.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Deserialize;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tower::ServiceExt;

/// Where a pod finds its service account's token and the cluster's CA.
pub(crate) const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// Why the API server cannot be reached or did not answer as expected.
/// Every call's error names its path; the text carries its source's.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("KUBERNETES_SERVICE_HOST is not set: not running in a cluster?")]
    NotInCluster,
    #[error("cannot read {}: {source}", path.display())]
    ReadCa {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("bad API server address {address}: {source}")]
    Address {
        address: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("API server TLS: {0}")]
    Tls(#[source] tonic::transport::Error),
    #[error("cannot read the service account token: {0}")]
    Token(#[source] std::io::Error),
    #[error("GET {path}: {source}")]
    Request {
        path: String,
        #[source]
        source: http::Error,
    },
    #[error("GET {path}: {source}")]
    Transport {
        path: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("GET {path}: reading the body: {source}")]
    Body {
        path: String,
        #[source]
        source: tonic::Status,
    },
    #[error("GET {path}: {status}: {body}")]
    Status {
        path: String,
        status: http::StatusCode,
        body: String,
    },
    #[error("GET {path}: bad JSON: {source}")]
    Json {
        path: String,
        #[source]
        source: serde_json::Error,
    },
}

pub(crate) struct Kube {
    channel: Channel,
    token: PathBuf,
}

impl Kube {
    /// The API server from `KUBERNETES_SERVICE_HOST`/`_PORT`, trusted by the
    /// CA in `sa_dir` (`ca.crt`), authenticated with its `token`.
    pub(crate) fn in_cluster(sa_dir: &Path) -> Result<Kube, KubeError> {
        let host = std::env::var("KUBERNETES_SERVICE_HOST").map_err(|_| KubeError::NotInCluster)?;
        let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
        Kube::at(host, &port, sa_dir)
    }

    /// The API server at `host`:`port`, with the service account of `sa_dir`.
    fn at(host: String, port: &str, sa_dir: &Path) -> Result<Kube, KubeError> {
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host
        };
        let ca_path = sa_dir.join("ca.crt");
        let ca = std::fs::read(&ca_path).map_err(|source| KubeError::ReadCa {
            path: ca_path,
            source,
        })?;
        let endpoint = Endpoint::from_shared(format!("https://{host}:{port}"))
            .map_err(|source| KubeError::Address {
                address: format!("{host}:{port}"),
                source,
            })?
            .tls_config(
                ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(ca))
                    .domain_name("kubernetes.default.svc"),
            )
            .map_err(KubeError::Tls)?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(15));
        Ok(Kube {
            channel: endpoint.connect_lazy(),
            token: sa_dir.join("token"),
        })
    }

    /// GET `path` (e.g. `/api/v1/nodes/x`) as JSON.
    pub(crate) async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, KubeError> {
        let token = std::fs::read_to_string(&self.token).map_err(KubeError::Token)?;
        let req = http::Request::get(path)
            .header("authorization", format!("Bearer {}", token.trim()))
            .header("accept", "application/json")
            .body(tonic::body::Body::empty())
            .map_err(|source| KubeError::Request {
                path: path.to_string(),
                source,
            })?;
        let resp =
            self.channel
                .clone()
                .oneshot(req)
                .await
                .map_err(|source| KubeError::Transport {
                    path: path.to_string(),
                    source,
                })?;
        let status = resp.status();
        let body = http_body_util::BodyExt::collect(resp.into_body())
            .await
            .map_err(|source| KubeError::Body {
                path: path.to_string(),
                source,
            })?
            .to_bytes();
        if !status.is_success() {
            return Err(KubeError::Status {
                path: path.to_string(),
                status,
                body: String::from_utf8_lossy(&body).trim().to_string(),
            });
        }
        serde_json::from_slice(&body).map_err(|source| KubeError::Json {
            path: path.to_string(),
            source,
        })
    }
}

#[derive(Debug, Deserialize)]
#[serde(bound = "T: DeserializeOwned")]
pub(crate) struct List<T> {
    #[serde(default)]
    pub items: Vec<T>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct Meta {
    pub name: String,
}

/// `storage.k8s.io/v1` CSINode: which CSI drivers registered on a node,
/// and the node id each reported.
#[derive(Debug, Deserialize)]
pub(crate) struct CsiNode {
    pub metadata: Meta,
    pub spec: CsiNodeSpec,
}

#[derive(Debug, Deserialize)]
pub(crate) struct CsiNodeSpec {
    #[serde(default)]
    pub drivers: Option<Vec<CsiNodeDriver>>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct CsiNodeDriver {
    pub name: String,
    #[serde(rename = "nodeID")]
    pub node_id: String,
}

#[derive(Debug, Deserialize)]
pub(crate) struct Node {
    #[serde(default)]
    pub status: Option<NodeStatus>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct NodeStatus {
    #[serde(default)]
    pub addresses: Vec<NodeAddress>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct NodeAddress {
    #[serde(rename = "type")]
    pub kind: String,
    pub address: String,
}

impl Node {
    /// The node's InternalIP (the agent listens on the host network).
    pub(crate) fn internal_ip(&self) -> Option<&str> {
        let addresses = &self.status.as_ref()?.addresses;
        addresses
            .iter()
            .find(|a| a.kind == "InternalIP")
            .map(|a| a.address.as_str())
    }
}

/// host:port, with brackets for IPv6.
pub(crate) fn host_port(ip: &str, port: u16) -> String {
    if ip.contains(':') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_csinodes_and_nodes() {
        let list: List<CsiNode> = serde_json::from_str(
            r#"{"kind":"CSINodeList","items":[
              {"metadata":{"name":"w1","uid":"x"},"spec":{"drivers":[
                {"name":"lvm.lodestone.dev","nodeID":"w1","topologyKeys":["k"]}]}},
              {"metadata":{"name":"w2"},"spec":{"drivers":null}}]}"#,
        )
        .unwrap();
        assert_eq!(list.items.len(), 2);
        let d = list.items[0].spec.drivers.as_ref().unwrap();
        assert_eq!(
            (d[0].name.as_str(), d[0].node_id.as_str()),
            ("lvm.lodestone.dev", "w1")
        );
        assert!(list.items[1].spec.drivers.is_none());
        let node: Node = serde_json::from_str(
            r#"{"metadata":{"name":"w1"},"status":{"addresses":[
              {"type":"Hostname","address":"w1"},{"type":"InternalIP","address":"fd00::5"}]}}"#,
        )
        .unwrap();
        assert_eq!(node.internal_ip(), Some("fd00::5"));
        assert_eq!(host_port("fd00::5", 7441), "[fd00::5]:7441");
        assert_eq!(host_port("10.0.0.5", 7441), "10.0.0.5:7441");
        let bare: Node = serde_json::from_str(r#"{"metadata":{"name":"w3"}}"#).unwrap();
        assert_eq!(bare.internal_ip(), None);
    }

    #[tokio::test]
    async fn errors_name_the_file_or_address_and_keep_their_source() {
        use std::error::Error as _;
        let dir = tempfile::tempdir().unwrap();
        let e = Kube::at("10.0.0.1".into(), "443", dir.path())
            .err()
            .unwrap();
        let KubeError::ReadCa { path, source } = &e else {
            panic!("{e:?}")
        };
        assert_eq!(path, &dir.path().join("ca.crt"));
        assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        assert!(e.source().is_some());
        std::fs::write(dir.path().join("ca.crt"), "not PEM").unwrap();
        let e = Kube::at("bad host".into(), "443", dir.path())
            .err()
            .unwrap();
        assert!(
            matches!(&e, KubeError::Address { address, .. } if address == "bad host:443"),
            "{e:?}"
        );
        // The token is read on every call; without it the call fails
        // before anything is sent.
        let kube = Kube::at("127.0.0.1".into(), "1", dir.path()).unwrap();
        let e = kube.get::<Node>("/api/v1/nodes/x").await.unwrap_err();
        assert!(matches!(&e, KubeError::Token(_)), "{e:?}");
        assert!(e.source().is_some());
    }
}
