//! Mutual TLS for the controller-to-agent API.
//!
//! Both ends present a certificate signed by one private CA. The controller
//! connects to an agent with the agent's node name as the TLS server name,
//! so it only talks to the node it meant; the agent requires a client
//! certificate from that CA and then checks that it names the controller's
//! identity before any LVM work.
//!
//! Certificates are reloaded without a restart: before every new connection
//! (an agent accepting one, the controller opening one) the three files are
//! looked at (inode, size, modification time, one `stat` each); when any of
//! them changed, they are read and checked again, and the new certificate,
//! key and CA serve that connection and the ones after it. Connections
//! already open keep the material they were made with. A set of files that
//! does not load (a half-written renewal, a key that does not match its
//! certificate) is reported once and the last good material stays in use.

use std::future::Future;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore, ServerConfig};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tonic::{Request, Status};

/// TLS material that cannot be used: a file that cannot be read (with its
/// path), PEM that does not parse, a key that does not match its
/// certificate. The text carries its source's.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read the TLS {what} {}: {source}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the TLS {what} is not valid PEM: {source}")]
    Pem {
        what: &'static str,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("the TLS {what} holds no certificate")]
    NoCertificate { what: &'static str },
    #[error("the TLS key file holds no usable private key")]
    NoKey,
    #[error("a certificate of the TLS CA bundle is not usable: {0}")]
    CaCertificate(#[source] rustls::Error),
    #[error("the TLS CA bundle cannot verify clients: {0}")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
    #[error("TLS setup: {0}")]
    Setup(#[source] rustls::Error),
    #[error("the TLS certificate and key do not go together: {0}")]
    KeyMismatch(#[source] rustls::Error),
}

/// How long a TLS handshake may take before the connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The application protocol (ALPN) of the agent's inventory stream, beside
/// HTTP/2 (`h2`) on the same port (the protocol is in
/// `crate::lvm::inventory`).
pub const INVENTORY_ALPN: &[u8] = b"lodestone-inventory/1";

/// The PEM files of one end.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

/// One loaded set of certificate, key and CA, as rustls configurations of
/// both roles. The key stays in memory only and is never logged.
struct Loaded {
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    /// The client's, offering the inventory protocol instead of HTTP/2.
    inventory_client: Arc<ClientConfig>,
}

/// Identity of the three files' current contents, without reading them.
type Fingerprint = [(u64, u64, u64, i64, i64); 3];

struct Watched {
    files: TlsFiles,
    state: Mutex<WatchState>,
}

struct WatchState {
    seen: Fingerprint,
    current: Arc<Loaded>,
    /// The fingerprint of files that failed to load, reported once.
    failed: Option<Fingerprint>,
}

enum Source {
    Fixed(Arc<Loaded>),
    Files(Box<Watched>),
}

/// The TLS material of one end: fixed PEM, or files reloaded when they
/// change. Cheap to clone (shared).
#[derive(Clone)]
pub struct TlsMaterial {
    source: Arc<Source>,
}

fn read(path: &Path, what: &'static str) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn fingerprint(files: &TlsFiles) -> Fingerprint {
    let one = |p: &Path| match std::fs::metadata(p) {
        Ok(m) => (m.dev(), m.ino(), m.size(), m.mtime(), m.mtime_nsec()),
        Err(_) => (0, 0, 0, 0, 0),
    };
    [one(&files.cert), one(&files.key), one(&files.ca)]
}

impl Loaded {
    fn from_pem(cert: &[u8], key: &[u8], ca: &[u8]) -> Result<Loaded, TlsError> {
        let pem = |what| move |source| TlsError::Pem { what, source };
        let chain = CertificateDer::pem_slice_iter(cert)
            .collect::<Result<Vec<_>, _>>()
            .map_err(pem("certificate"))?;
        if chain.is_empty() {
            return Err(TlsError::NoCertificate {
                what: "certificate file",
            });
        }
        let key = PrivateKeyDer::from_pem_slice(key).map_err(|_| TlsError::NoKey)?;
        let mut roots = RootCertStore::empty();
        let mut any = false;
        for c in CertificateDer::pem_slice_iter(ca) {
            let c = c.map_err(pem("CA bundle"))?;
            roots.add(c).map_err(TlsError::CaCertificate)?;
            any = true;
        }
        if !any {
            return Err(TlsError::NoCertificate { what: "CA bundle" });
        }
        let roots = Arc::new(roots);
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
                .build()
                .map_err(TlsError::Verifier)?;
        let mut server = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Setup)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(TlsError::KeyMismatch)?;
        server.alpn_protocols = vec![b"h2".to_vec(), INVENTORY_ALPN.to_vec()];
        let mut client = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Setup)?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(TlsError::KeyMismatch)?;
        let mut inventory_client = client.clone();
        client.alpn_protocols = vec![b"h2".to_vec()];
        inventory_client.alpn_protocols = vec![INVENTORY_ALPN.to_vec()];
        Ok(Loaded {
            server: Arc::new(server),
            client: Arc::new(client),
            inventory_client: Arc::new(inventory_client),
        })
    }

    fn load(files: &TlsFiles) -> Result<Loaded, TlsError> {
        let cert = read(&files.cert, "certificate")?;
        let key = read(&files.key, "key")?;
        let ca = read(&files.ca, "CA bundle")?;
        Loaded::from_pem(&cert, &key, &ca)
    }
}

impl TlsMaterial {
    /// Loads the files now (an error stops the process at start) and
    /// reloads them whenever they change.
    pub fn load(files: &TlsFiles) -> Result<Self, TlsError> {
        let seen = fingerprint(files);
        let current = Arc::new(Loaded::load(files)?);
        Ok(TlsMaterial {
            source: Arc::new(Source::Files(Box::new(Watched {
                files: files.clone(),
                state: Mutex::new(WatchState {
                    seen,
                    current,
                    failed: None,
                }),
            }))),
        })
    }

    /// Material from PEM in memory, never reloaded.
    pub fn from_pem(cert: Vec<u8>, key: Vec<u8>, ca: Vec<u8>) -> Result<Self, TlsError> {
        Ok(TlsMaterial {
            source: Arc::new(Source::Fixed(Arc::new(Loaded::from_pem(&cert, &key, &ca)?))),
        })
    }

    /// The material for a new connection: the files are read again when
    /// they changed since the last look.
    fn current(&self) -> Arc<Loaded> {
        let w = match self.source.as_ref() {
            Source::Fixed(l) => return l.clone(),
            Source::Files(w) => w,
        };
        let now = fingerprint(&w.files);
        let mut st = w.state.lock().expect("TLS state poisoned");
        if now == st.seen || st.failed == Some(now) {
            return st.current.clone();
        }
        match Loaded::load(&w.files) {
            Ok(l) => {
                tracing::info!(cert = %w.files.cert.display(), ca = %w.files.ca.display(),
                    "reloaded the agent API's TLS certificate, key and CA");
                st.current = Arc::new(l);
                st.seen = now;
                st.failed = None;
            }
            Err(e) => {
                tracing::warn!(error = %e,
                    "the agent API's TLS files changed but do not load; keeping the previous ones");
                st.failed = Some(now);
            }
        }
        st.current.clone()
    }

    /// Agent side: every accepted TCP connection gets a TLS handshake with
    /// the current material (a client certificate signed by the CA is
    /// mandatory) in its own task; the stream yields the connections that
    /// completed it. tonic reads the peer's certificates from them.
    pub fn incoming(
        &self,
        listener: TcpListener,
    ) -> tokio_stream::wrappers::ReceiverStream<
        std::io::Result<tokio_rustls::server::TlsStream<TcpStream>>,
    > {
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let tls = self.clone();
        tokio::spawn(async move {
            loop {
                let (tcp, peer) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "agent API: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                if tx.is_closed() {
                    return;
                }
                let _ = tcp.set_nodelay(true);
                let acceptor = TlsAcceptor::from(tls.current().server.clone());
                let tx = tx.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            let _ = tx.send(Ok(stream)).await;
                        }
                        Ok(Err(e)) => {
                            tracing::warn!(%peer, error = %e, "agent API: TLS handshake failed")
                        }
                        Err(_) => tracing::warn!(%peer, "agent API: TLS handshake timed out"),
                    }
                });
            }
        });
        tokio_stream::wrappers::ReceiverStream::new(rx)
    }

    /// Controller side: a connector for tonic that opens TCP to the
    /// address of the URI and makes a TLS handshake with the current
    /// material, in which the agent must prove it is `node`; both within
    /// `deadline` (a peer that accepts and never answers fails then).
    pub fn connector(&self, node: &str, deadline: Duration) -> AgentConnector {
        AgentConnector {
            tls: self.clone(),
            node: node.to_string(),
            deadline,
        }
    }

    /// Controller side: a connection to the agent of `node` at `address`
    /// for its inventory stream (TCP and TLS as [`Self::connector`]'s,
    /// offering [`INVENTORY_ALPN`] instead of HTTP/2).
    pub async fn connect_inventory(
        &self,
        node: &str,
        address: &str,
        deadline: Duration,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let config = self.current().inventory_client.clone();
        connect(config, node, address, deadline).await
    }
}

/// See [`TlsMaterial::connector`].
#[derive(Clone)]
pub struct AgentConnector {
    tls: TlsMaterial,
    node: String,
    deadline: std::time::Duration,
}

type Connecting = Pin<
    Box<
        dyn Future<Output = std::io::Result<TokioIo<tokio_rustls::client::TlsStream<TcpStream>>>>
            + Send,
    >,
>;

impl tower::Service<http::Uri> for AgentConnector {
    type Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = std::io::Error;
    type Future = Connecting;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let config = self.tls.current().client.clone();
        let node = self.node.clone();
        let deadline = self.deadline;
        Box::pin(async move {
            let address = uri
                .authority()
                .map(|a| a.as_str().to_string())
                .ok_or_else(|| std::io::Error::other(format!("no address in {uri}")))?;
            Ok(TokioIo::new(
                connect(config, &node, &address, deadline).await?,
            ))
        })
    }
}

/// TCP to `address` and a TLS handshake in which the peer must prove it is
/// `node`, both within `deadline` (a peer that accepts and never answers
/// fails then).
async fn connect(
    config: Arc<ClientConfig>,
    node: &str,
    address: &str,
    deadline: Duration,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let name = ServerName::try_from(node.to_string())
        .map_err(|_| std::io::Error::other(format!("node name {node:?} is not a DNS name")))?;
    let connect = async move {
        let tcp = TcpStream::connect(address).await?;
        let _ = tcp.set_nodelay(true);
        TlsConnector::from(config).connect(name, tcp).await
    };
    tokio::time::timeout(deadline, connect).await.map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no TLS connection within {deadline:?}"),
        )
    })?
}

/// Whether a DER certificate is valid for `name` (a DNS subject alternative
/// name). The chain itself was already verified by the TLS handshake.
pub fn cert_names(der: &CertificateDer<'_>, name: &str) -> bool {
    let Ok(server_name) = ServerName::try_from(name) else {
        return false;
    };
    match webpki::EndEntityCert::try_from(der) {
        Ok(cert) => cert.verify_is_valid_for_subject_name(&server_name).is_ok(),
        Err(_) => false,
    }
}

/// A gRPC interceptor that admits only a peer whose client certificate
/// names `identity`. Runs before any handler.
pub fn require_peer(
    identity: String,
) -> impl Fn(Request<()>) -> Result<Request<()>, Status> + Clone + Send + Sync + 'static {
    let identity = Arc::new(identity);
    move |req: Request<()>| {
        let certs = req.peer_certs();
        admit_peer(certs.as_deref().map(Vec::as_slice), &identity)?;
        Ok(req)
    }
}

/// Admits a peer whose client certificate (the first of `certs`, already
/// verified against the CA by the handshake) names `identity`:
/// UNAUTHENTICATED without one, PERMISSION_DENIED for another name. The
/// agent API's one check, for its gRPC calls and its inventory stream.
pub fn admit_peer(certs: Option<&[CertificateDer<'_>]>, identity: &str) -> Result<(), Status> {
    match certs.and_then(|c| c.first()) {
        Some(leaf) if cert_names(leaf, identity) => Ok(()),
        Some(_) => {
            tracing::warn!(
                expected = %identity,
                "refused an agent API peer: the client certificate does not name the controller"
            );
            Err(Status::permission_denied(format!(
                "the client certificate does not name {identity}"
            )))
        }
        None => Err(Status::unauthenticated(
            "the agent API needs a client certificate (mutual TLS)",
        )),
    }
}

/// Whether `node` can be a TLS server name (a DNS name); node names in
/// Kubernetes are DNS subdomains, so this only rejects odd static setups.
pub fn valid_server_name(node: &str) -> bool {
    ServerName::try_from(node)
        .map(|n| matches!(n, ServerName::DnsName(_)))
        .unwrap_or(false)
}

/// For tests: a new CA's PEM, and a certificate and key (PEM) it issued
/// for each name (server and client use).
#[cfg(test)]
pub(crate) fn test_pki(names: &[&str]) -> (String, Vec<(String, String)>) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
    let issued = (names.iter())
        .map(|name| {
            let key = KeyPair::generate().unwrap();
            let params = CertificateParams::new(vec![name.to_string()]).unwrap();
            let cert = params.signed_by(&key, &ca).unwrap();
            (cert.pem(), key.serialize_pem())
        })
        .collect();
    (ca.pem(), issued)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_names_of_a_certificate() {
        let key = rcgen::KeyPair::generate().unwrap();
        let params =
            rcgen::CertificateParams::new(vec!["node-a".to_string(), "node-a.lan".to_string()])
                .unwrap();
        let cert = params.self_signed(&key).unwrap();
        let der = cert.der();
        assert!(cert_names(der, "node-a"));
        assert!(cert_names(der, "node-a.lan"));
        assert!(!cert_names(der, "node-b"));
        assert!(!cert_names(der, "not a name"));
        assert!(valid_server_name("worker-1.example"));
        assert!(!valid_server_name("under_score node"));
    }

    fn self_signed(name: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec![name.to_string()]).unwrap();
        params.is_ca = rcgen::IsCa::NoCa;
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn client_cert_of(m: &TlsMaterial) -> Vec<u8> {
        // The certificate a new client connection would present.
        let l = m.current();
        let resolver = l.client.client_auth_cert_resolver.clone();
        let key = resolver
            .resolve(&[], &[rustls::SignatureScheme::ECDSA_NISTP256_SHA256])
            .expect("a client certificate");
        key.cert[0].to_vec()
    }

    #[test]
    fn files_are_reloaded_when_they_change_and_bad_ones_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let files = TlsFiles {
            cert: dir.path().join("tls.crt"),
            key: dir.path().join("tls.key"),
            ca: dir.path().join("ca.crt"),
        };
        let write = |(cert, key): &(String, String)| {
            // A new inode each time, like a renewal that renames files in.
            for (path, text) in [(&files.cert, cert), (&files.key, key), (&files.ca, cert)] {
                let tmp = path.with_extension("tmp");
                std::fs::write(&tmp, text).unwrap();
                std::fs::rename(&tmp, path).unwrap();
            }
        };
        let first = self_signed("one");
        write(&first);
        let m = TlsMaterial::load(&files).unwrap();
        let a = client_cert_of(&m);
        assert_eq!(
            client_cert_of(&m),
            a,
            "unchanged files give the same material"
        );
        let second = self_signed("two");
        write(&second);
        let b = client_cert_of(&m);
        assert_ne!(a, b, "the new certificate was not picked up");
        // A key that does not match its certificate: the last good material stays.
        let third = self_signed("three");
        let tmp = files.key.with_extension("tmp");
        std::fs::write(&tmp, &third.1).unwrap();
        std::fs::rename(&tmp, &files.key).unwrap();
        assert_eq!(client_cert_of(&m), b);
        assert!(TlsMaterial::load(&files).is_err());
    }

    #[test]
    fn errors_name_the_file_and_keep_their_source() {
        use std::error::Error as _;
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = self_signed("one");
        let files = TlsFiles {
            cert: dir.path().join("tls.crt"),
            key: dir.path().join("tls.key"),
            ca: dir.path().join("ca.crt"),
        };
        std::fs::write(&files.cert, &cert).unwrap();
        std::fs::write(&files.ca, &cert).unwrap();
        let Err(e) = TlsMaterial::load(&files) else {
            panic!("loaded without a key")
        };
        let TlsError::Read { what, path, source } = &e else {
            panic!("{e:?}")
        };
        assert_eq!((*what, path), ("key", &files.key));
        assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        assert!(e.source().is_some());

        let pem = |c: &str, k: &str, ca: &str| {
            TlsMaterial::from_pem(c.into(), k.into(), ca.into())
                .err()
                .expect("refused")
        };
        assert!(matches!(
            pem("", &key, &cert),
            TlsError::NoCertificate { .. }
        ));
        assert!(matches!(pem(&cert, "", &cert), TlsError::NoKey));
        assert!(matches!(
            pem(&cert, &key, ""),
            TlsError::NoCertificate { what: "CA bundle" }
        ));
        let (_, other_key) = self_signed("two");
        assert!(matches!(
            pem(&cert, &other_key, &cert),
            TlsError::KeyMismatch(_)
        ));
    }
}
