//! The controller's connection to one agent: one HTTP/2 connection over
//! mutual TLS, made when a call first needs it and made again after it
//! breaks.
//!
//! tonic's `Channel` does the same, plus a request queue in front of the
//! connection (tower's `Buffer`) that lets many tasks share one connection
//! through a single owner. That queue costs about 9 KiB per connection
//! whether it is used or not, and the central controller keeps one
//! connection per node (5,000 nodes: 45 MiB). An HTTP/2 connection already
//! takes concurrent requests from any number of handles, so here the
//! handles share the connection itself.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

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
}

impl AgentChannel {
    pub(crate) fn new(address: &str, connector: AgentConnector) -> Result<Self, String> {
        let origin = address
            .parse()
            .map_err(|e| format!("bad agent address {address:?}: {e}"))?;
        Ok(AgentChannel {
            inner: Arc::new(Inner {
                origin,
                connector,
                sender: tokio::sync::Mutex::new(None),
            }),
        })
    }
}

impl Inner {
    /// The live connection, or a new one (TCP, TLS and the HTTP/2
    /// handshake, within the connector's deadline).
    async fn sender(&self) -> Result<http2::SendRequest<Body>, Status> {
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
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "agent connection ended");
            }
        });
        *slot = Some(sender.clone());
        Ok(sender)
    }
}

impl tower::Service<http::Request<Body>> for AgentChannel {
    type Response = http::Response<hyper::body::Incoming>;
    type Error = Status;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Status>> + Send>>;

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
            let mut sender = inner.sender().await?;
            sender.ready().await.map_err(unreachable)?;
            sender.send_request(req).await.map_err(unreachable)
        })
    }
}

/// A connection that could not be made or broke: the agent is unreachable
/// (UNAVAILABLE, as tonic's own transport answers).
fn unreachable(e: impl std::fmt::Display) -> Status {
    Status::unavailable(format!("transport error: {e}"))
}
