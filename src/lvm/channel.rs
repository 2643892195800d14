//! The controller's connection to one agent: one HTTP/2 connection over
//! mutual TLS, made when a call first needs it, made again after it
//! breaks, and closed after [`IDLE_CLOSE`] without a call (the inventory
//! stream has a connection of its own, [`crate::lvm::wire`]; an HTTP/2
//! connection costs the controller about 40 KiB, and one kept to every
//! node of 5,000 would be 200 MiB for connections that carry a mutation
//! now and then).
//!
//! tonic's `Channel` does the same, plus a request queue in front of the
//! connection (tower's `Buffer`) that lets many tasks share one connection
//! through a single owner. That queue costs about 9 KiB per connection
//! whether it is used or not, and the central controller keeps one
//! connection per node (5,000 nodes: 45 MiB). An HTTP/2 connection already
//! takes concurrent requests from any number of handles, so here the
//! handles share the connection itself.

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::body::{Bytes, Frame, Incoming};

use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tonic::body::Body;
use tonic::Status;

use crate::tls::AgentConnector;

/// A cloneable handle on the connection to one agent (see the module).
#[derive(Clone)]
pub(crate) struct AgentChannel {
    inner: Arc<Inner>,
}

struct Inner {
    /// `http://host:port` of the agent: the scheme and authority of every
    /// request (tonic's generated client sets only the path).
    origin: http::uri::Authority,
    connector: AgentConnector,
    /// The live connection, if any.
    sender: tokio::sync::Mutex<Option<http2::SendRequest<Body>>>,
    /// Calls under way (until their answer's body is read or dropped), and
    /// when the last one ended.
    in_flight: AtomicUsize,
    last_call: Mutex<Instant>,
    /// [`IDLE_CLOSE`], shorter in tests.
    idle_close: Duration,
}

/// How long a connection stays open without a call.
pub(crate) const IDLE_CLOSE: Duration = Duration::from_secs(30);

impl AgentChannel {
    pub(crate) fn new(address: &str, connector: AgentConnector) -> Result<Self, String> {
        Self::closing_after(address, connector, IDLE_CLOSE)
    }

    fn closing_after(
        address: &str,
        connector: AgentConnector,
        idle_close: Duration,
    ) -> Result<Self, String> {
        let origin = address
            .parse()
            .map_err(|e| format!("bad agent address {address:?}: {e}"))?;
        Ok(AgentChannel {
            inner: Arc::new(Inner {
                origin,
                connector,
                sender: tokio::sync::Mutex::new(None),
                in_flight: AtomicUsize::new(0),
                last_call: Mutex::new(Instant::now()),
                idle_close,
            }),
        })
    }
}

impl Inner {
    /// The live connection, or a new one (TCP, TLS and the HTTP/2
    /// handshake, within the connector's deadline).
    async fn sender(self: &Arc<Self>) -> Result<http2::SendRequest<Body>, Status> {
        let mut slot = self.sender.lock().await;
        if let Some(s) = slot.as_ref().filter(|s| !s.is_closed()) {
            return Ok(s.clone());
        }
        *slot = None;
        let uri = http::Uri::builder()
            .scheme("http")
            .authority(self.origin.clone())
            .path_and_query("/")
            .build()
            .map_err(|e| Status::internal(e.to_string()))?;
        let io = tower::Service::call(&mut self.connector.clone(), uri)
            .await
            .map_err(unreachable)?;
        let (sender, connection) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10))
            .handshake(io)
            .await
            .map_err(unreachable)?;
        let inner = Arc::downgrade(self);
        let check_every = self.idle_close / 2;
        tokio::spawn(async move {
            tokio::pin!(connection);
            loop {
                tokio::select! {
                    ended = &mut connection => {
                        if let Err(e) = ended {
                            tracing::debug!(error = %e, "agent connection ended");
                        }
                        return;
                    }
                    _ = tokio::time::sleep(check_every) => {
                        let Some(inner) = inner.upgrade() else { return };
                        if inner.close_if_idle().await {
                            return;
                        }
                    }
                }
            }
        });
        *slot = Some(sender.clone());
        Ok(sender)
    }

    /// Forgets the connection if no call used it for [`IDLE_CLOSE`]; its
    /// task then drops it, which closes it. Decided under the slot's lock,
    /// which a call takes after counting itself in, so a call never gets a
    /// connection that is being closed.
    async fn close_if_idle(&self) -> bool {
        let mut slot = self.sender.lock().await;
        let idle = self.in_flight.load(Ordering::SeqCst) == 0
            && self.last_call.lock().expect("poisoned").elapsed() >= self.idle_close;
        if idle {
            *slot = None;
        }
        idle
    }
}

/// One call under way, counted until dropped.
struct InFlight(Arc<Inner>);

impl InFlight {
    fn start(inner: Arc<Inner>) -> Self {
        inner.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(inner)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        *self.0.last_call.lock().expect("poisoned") = Instant::now();
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// An answer's body, which keeps its call counted until it is read or
/// dropped (a streamed answer uses the connection until then).
pub(crate) struct Answer {
    body: Incoming,
    _call: InFlight,
}

impl hyper::body::Body for Answer {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

impl tower::Service<http::Request<Body>> for AgentChannel {
    type Response = http::Response<Answer>;
    type Error = Status;
    type Future = Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Status>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: http::Request<Body>) -> Self::Future {
        let inner = self.inner.clone();
        Box::pin(async move {
            let mut parts = req.uri().clone().into_parts();
            parts.scheme = Some(http::uri::Scheme::HTTP);
            parts.authority = Some(inner.origin.clone());
            *req.uri_mut() =
                http::Uri::from_parts(parts).map_err(|e| Status::internal(e.to_string()))?;
            let call = InFlight::start(inner.clone());
            let mut sender = inner.sender().await?;
            sender.ready().await.map_err(unreachable)?;
            let answer = sender.send_request(req).await.map_err(unreachable)?;
            Ok(answer.map(|body| Answer { body, _call: call }))
        })
    }
}

/// A connection that could not be made or broke: the agent is unreachable
/// (UNAVAILABLE, as tonic's own transport answers).
fn unreachable(e: impl std::fmt::Display) -> Status {
    Status::unavailable(format!("transport error: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::TlsMaterial;

    /// Two ends' TLS material from one CA: (node-a's, the controller's).
    fn materials() -> (TlsMaterial, TlsMaterial) {
        let (ca, issued) = crate::tls::test_pki(&["node-a", "controller"]);
        let mut m = issued.into_iter().map(|(cert, key)| {
            TlsMaterial::from_pem(cert.into_bytes(), key.into_bytes(), ca.clone().into_bytes())
                .unwrap()
        });
        (m.next().unwrap(), m.next().unwrap())
    }

    /// An HTTP/2 server over the agent's TLS that answers every request
    /// with an empty 200, counting the connections it accepted.
    async fn server(tls: TlsMaterial) -> (String, Arc<AtomicUsize>) {
        use tokio_stream::StreamExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            let mut incoming = tls.incoming(listener);
            while let Some(Ok(io)) = incoming.next().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let answer = hyper::service::service_fn(|_| async {
                        Ok::<_, std::convert::Infallible>(http::Response::new(
                            http_body_util::Empty::<Bytes>::new(),
                        ))
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(io), answer)
                        .await;
                });
            }
        });
        (address, accepted)
    }

    /// One connection serves every call; it closes after the idle time
    /// without a call, never while an answer is still being read; the
    /// next call opens a new one.
    #[tokio::test]
    async fn the_connection_is_shared_and_closed_when_idle() {
        use tower::Service;
        let (agent, controller) = materials();
        let (address, accepted) = server(agent).await;
        let idle = Duration::from_millis(300);
        let connector = controller.connector("node-a", Duration::from_secs(5));
        let mut channel = AgentChannel::closing_after(&address, connector, idle).unwrap();
        let call = |c: &mut AgentChannel| c.call(http::Request::new(Body::empty()));
        call(&mut channel).await.unwrap();
        call(&mut channel).await.unwrap();
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "one connection");

        // An answer not yet read keeps it open past the idle time.
        let held = call(&mut channel).await.unwrap();
        tokio::time::sleep(idle * 3).await;
        call(&mut channel).await.unwrap();
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "kept while in use");
        drop(held);

        tokio::time::sleep(idle * 3).await;
        assert!(
            channel.inner.sender.lock().await.is_none(),
            "closed when idle"
        );
        call(&mut channel).await.unwrap();
        assert_eq!(accepted.load(Ordering::SeqCst), 2, "a new one after");
    }
}
