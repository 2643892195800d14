//! Mutual TLS for the controller-to-agent API.
//!
//! Both ends present a certificate signed by one private CA. The controller
//! connects to an agent with the agent's node name as the TLS server name,
//! so it only talks to the node it meant; the agent requires a client
//! certificate from that CA and then checks that it names the controller's
//! identity before any LVM work.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls_pki_types::{CertificateDer, ServerName};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};
use tonic::{Request, Status};

/// The PEM files of one end.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

/// Loaded PEM material. The key stays in memory only.
#[derive(Clone)]
pub struct TlsMaterial {
    identity: Identity,
    ca: Certificate,
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read the TLS {what} {}: {e}", path.display()))
}

impl TlsMaterial {
    pub fn load(files: &TlsFiles) -> Result<Self, String> {
        let cert = read(&files.cert, "certificate")?;
        let key = read(&files.key, "key")?;
        let ca = read(&files.ca, "CA bundle")?;
        Ok(Self::from_pem(cert, key, ca))
    }

    pub fn from_pem(cert: Vec<u8>, key: Vec<u8>, ca: Vec<u8>) -> Self {
        TlsMaterial {
            identity: Identity::from_pem(cert, key),
            ca: Certificate::from_pem(ca),
        }
    }

    /// Agent side: a client certificate signed by the CA is mandatory.
    pub fn server(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(self.identity.clone())
            .client_ca_root(self.ca.clone())
    }

    /// Controller side: the agent must prove it is `node`.
    pub fn client(&self, node: &str) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(self.ca.clone())
            .identity(self.identity.clone())
            .domain_name(node)
    }
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
        let certs = req.peer_certs().ok_or_else(|| {
            Status::unauthenticated("the agent API needs a client certificate (mutual TLS)")
        })?;
        match certs.first() {
            Some(leaf) if cert_names(leaf, &identity) => Ok(req),
            Some(_) => {
                tracing::warn!(
                    expected = %identity,
                    "refused an agent API call: the client certificate does not name the controller"
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
}

/// Whether `node` can be a TLS server name (a DNS name); node names in
/// Kubernetes are DNS subdomains, so this only rejects odd static setups.
pub fn valid_server_name(node: &str) -> bool {
    ServerName::try_from(node)
        .map(|n| matches!(n, ServerName::DnsName(_)))
        .unwrap_or(false)
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
}
