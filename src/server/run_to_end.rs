//! Every gRPC call, once started, runs to its own end.
//!
//! tonic drops a handler's future when its client goes away: a CSI deadline
//! that expires, a sidecar that restarts, an RST_STREAM. Dropped halfway, a
//! handler would release its operation lock while the work it started (an
//! lvm command, mkfs, a mount) still runs, so a retry could race it, and it
//! would skip whatever it meant to do after that work (record it, bind the
//! mount, grow the filesystem). This layer spawns each call's future as a
//! task of its own and only awaits it: a caller that leaves drops the
//! waiting, never the work. Each step still has its own timeout (the
//! runner's), so a call cannot run forever.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tower::{Layer, Service};

/// The layer for `tonic::transport::Server::builder().layer(..)`.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct RunToEndLayer;

impl<S> Layer<S> for RunToEndLayer {
    type Service = RunToEnd<S>;
    fn layer(&self, inner: S) -> RunToEnd<S> {
        RunToEnd(inner)
    }
}

#[derive(Debug, Clone)]
pub(super) struct RunToEnd<S>(S);

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, R> Service<R> for RunToEnd<S>
where
    S: Service<R>,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: R) -> Self::Future {
        let task = tokio::spawn(self.0.call(req));
        Box::pin(async move {
            let mut waiting = Waiting(true);
            let reply = task.await;
            waiting.0 = false;
            match reply {
                Ok(reply) => reply,
                // The task is never aborted, so this is a panic: pass it on.
                Err(e) => std::panic::resume_unwind(e.into_panic()),
            }
        })
    }
}

/// Notes a client that left before its call ended.
struct Waiting(bool);

impl Drop for Waiting {
    fn drop(&mut self) {
        if self.0 {
            tracing::debug!("the client left before its call ended; the call runs to its end");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn a_call_whose_caller_left_runs_to_its_end() {
        let done = Arc::new(AtomicBool::new(false));
        let flag = done.clone();
        let inner = tower::service_fn(move |_: ()| {
            let flag = flag.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(200)).await;
                flag.store(true, Ordering::SeqCst);
                Ok::<_, std::convert::Infallible>(())
            }
        });
        let mut svc = RunToEndLayer.layer(inner);
        let call = svc.call(());
        // The caller gives up after 20 ms...
        assert!(tokio::time::timeout(Duration::from_millis(20), call)
            .await
            .is_err());
        // ...and the work still finishes.
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(done.load(Ordering::SeqCst));
    }
}
