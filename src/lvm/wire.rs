//! The inventory stream's own transport: the agent's `Watch` over a bare
//! mutual-TLS connection, without HTTP/2.
//!
//! The central controller keeps one inventory stream open to every node,
//! all the time. Over HTTP/2 each of those costs the controller about 40
//! KiB (h2's fixed read and write buffers and header table, hyper's
//! dispatch channel), 200 MiB at 5,000 nodes, for a stream that carries a
//! heartbeat every few seconds. Here it costs the TLS session and a task.
//!
//! The connection is the agent's port, told apart from gRPC by ALPN
//! ([`INVENTORY_ALPN`]). The controller sends one `WatchRequest`; the agent
//! answers with `WatchFrame`s (an update part, or the error that ends the
//! stream); every message is a 4-byte big-endian length and the protobuf.
//! What the messages mean is the Watch RPC's (`crate::lvm::inventory`):
//! the agent side runs the very handler the RPC runs. The agent admits
//! only a client certificate that names the controller, as the RPC does.

use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Code, Status};

use crate::agentpb as pb;
use crate::agentpb::agent_server::Agent as AgentApi;
use crate::tls::{admit_peer, TlsMaterial, INVENTORY_ALPN};

/// The largest message either end accepts (an update part holds a few KiB;
/// one LV with its tags may exceed a part, never this).
const MAX_MESSAGE: u32 = 4 << 20;

/// How long the agent waits for the request after the handshake.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

type ServerIo = tokio_rustls::server::TlsStream<TcpStream>;

async fn write_message(w: &mut (impl AsyncWrite + Unpin), m: &impl Message) -> std::io::Result<()> {
    let len = m.encoded_len();
    let mut buf = Vec::with_capacity(4 + len);
    buf.extend_from_slice(&(len as u32).to_be_bytes());
    m.encode(&mut buf).map_err(std::io::Error::other)?;
    w.write_all(&buf).await?;
    w.flush().await
}

/// The next message, or None at a clean end of the stream. The buffer is
/// the message's own, freed once it is decoded: an idle stream holds none.
async fn read_message<M: Message + Default>(
    r: &mut (impl AsyncRead + Unpin),
) -> std::io::Result<Option<M>> {
    let len = match r.read_u32().await {
        Ok(n) => n,
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    };
    if len > MAX_MESSAGE {
        return Err(std::io::Error::other(format!(
            "a message of {len} bytes (at most {MAX_MESSAGE})"
        )));
    }
    let mut buf = vec![0; len as usize];
    r.read_exact(&mut buf).await?;
    M::decode(buf.as_slice())
        .map(Some)
        .map_err(std::io::Error::other)
}

fn error_frame(s: &Status) -> pb::WatchFrame {
    pb::WatchFrame {
        frame: Some(pb::watch_frame::Frame::Error(pb::WatchError {
            code: s.code() as i32,
            message: s.message().to_string(),
        })),
    }
}

/// Agent side: takes the inventory connections out of the agent port's
/// accepted TLS connections and serves each with `api`'s `watch`; the rest
/// (HTTP/2) pass on to the gRPC server.
pub fn route<A: AgentApi>(
    accepted: impl Stream<Item = std::io::Result<ServerIo>>,
    api: Arc<A>,
    controller: String,
) -> impl Stream<Item = std::io::Result<ServerIo>> {
    let controller: Arc<str> = controller.into();
    accepted.filter_map(move |c| match c {
        Ok(io) if io.get_ref().1.alpn_protocol() == Some(INVENTORY_ALPN) => {
            tokio::spawn(serve(api.clone(), controller.clone(), io));
            None
        }
        other => Some(other),
    })
}

/// One inventory connection, until either end closes it.
async fn serve<A: AgentApi>(api: Arc<A>, controller: Arc<str>, mut io: ServerIo) {
    if let Err(refused) = admit_peer(io.get_ref().1.peer_certificates(), &controller) {
        let _ = write_message(&mut io, &error_frame(&refused)).await;
        return;
    }
    let request = match tokio::time::timeout(REQUEST_TIMEOUT, read_message(&mut io)).await {
        Ok(Ok(Some(r))) => r,
        _ => return,
    };
    let mut updates = match api.watch(tonic::Request::new(request)).await {
        Ok(r) => Box::pin(r.into_inner()),
        Err(s) => {
            let _ = write_message(&mut io, &error_frame(&s)).await;
            return;
        }
    };
    while let Some(item) = updates.next().await {
        let (frame, last) = match item {
            Ok(u) => (
                pb::WatchFrame {
                    frame: Some(pb::watch_frame::Frame::Update(u)),
                },
                false,
            ),
            Err(s) => (error_frame(&s), true),
        };
        if write_message(&mut io, &frame).await.is_err() || last {
            return;
        }
    }
}

/// Why a controller cannot use this transport with an agent: the agent
/// does not offer it (an agent of an earlier version refuses the ALPN).
pub fn not_offered(e: &std::io::Error) -> bool {
    use tokio_rustls::rustls::{AlertDescription, Error};
    e.get_ref()
        .and_then(|i| i.downcast_ref::<Error>())
        .is_some_and(|e| {
            matches!(
                e,
                Error::AlertReceived(AlertDescription::NoApplicationProtocol)
            )
        })
}

/// Controller side: opens the inventory stream of `node`'s agent at
/// `address` (TCP, TLS and the request, within `deadline`) and yields its
/// update parts until the agent ends it, an error ends it, or it is
/// dropped.
pub async fn watch(
    tls: &TlsMaterial,
    node: &str,
    address: &str,
    deadline: Duration,
    request: pb::WatchRequest,
) -> std::io::Result<impl Stream<Item = Result<pb::InventoryUpdate, Status>> + Send + 'static> {
    let open = async {
        let mut io = tls.connect_inventory(node, address, deadline).await?;
        if io.get_ref().1.alpn_protocol() != Some(INVENTORY_ALPN) {
            return Err(std::io::Error::other(
                "the agent did not agree to the inventory protocol",
            ));
        }
        write_message(&mut io, &request).await?;
        Ok(io)
    };
    let io = tokio::time::timeout(deadline, open)
        .await
        .map_err(|_| std::io::Error::other(format!("no inventory stream within {deadline:?}")))??;
    Ok(futures_util::stream::unfold(Some(io), |io| async move {
        let mut io = io?;
        let item = match read_message::<pb::WatchFrame>(&mut io).await {
            Ok(None) => return None,
            Ok(Some(f)) => match f.frame {
                Some(pb::watch_frame::Frame::Update(u)) => return Some((Ok(u), Some(io))),
                Some(pb::watch_frame::Frame::Error(e)) => {
                    Err(Status::new(Code::from_i32(e.code), e.message))
                }
                None => Err(Status::internal("an empty frame on the inventory stream")),
            },
            Err(e) => Err(Status::unavailable(format!("inventory stream: {e}"))),
        };
        Some((item, None))
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    use tokio_rustls::rustls;

    /// An agent of an earlier version offers only HTTP/2: its handshake
    /// refuses the inventory protocol, and the controller can tell that
    /// apart from any other failure (to use the gRPC `Watch` instead).
    #[tokio::test]
    async fn an_agent_without_the_protocol_is_told_apart() {
        let (ca, issued) = crate::tls::test_pki(&["node-a", "controller"]);
        let (cert, key) = &issued[0];
        let chain = CertificateDer::pem_slice_iter(cert.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
        config.alpn_protocols = vec![b"h2".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let _ = acceptor.accept(tcp).await;
            }
        });

        let (cert, key) = &issued[1];
        let controller = TlsMaterial::from_pem(
            cert.clone().into_bytes(),
            key.clone().into_bytes(),
            ca.into_bytes(),
        )
        .unwrap();
        let open = |address: String| {
            let controller = controller.clone();
            async move {
                let deadline = Duration::from_secs(5);
                let request = pb::WatchRequest::default();
                watch(&controller, "node-a", &address, deadline, request)
                    .await
                    .map(|_| ())
            }
        };
        let Err(e) = open(address).await else {
            panic!("an agent without the protocol streamed");
        };
        assert!(not_offered(&e), "{e:?}");
        // Any other failure is not that.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let gone = closed.local_addr().unwrap().to_string();
        drop(closed);
        let Err(e) = open(gone).await else {
            panic!("streamed from a closed port");
        };
        assert!(!not_offered(&e), "{e:?}");
    }
}
