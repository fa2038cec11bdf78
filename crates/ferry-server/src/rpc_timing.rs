//! Each fleet RPC's duration, by method, as the `ferry_rpc_seconds` summary in `/metrics`:
//! what an operator (and `ferry bench fleet`) reads to see whether the server keeps up.
//!
//! A unary call is timed to its answer, a client stream (`Upload`) until its last chunk is
//! in, a server stream (`Download`) to the start of its answer, and a `PullTask` long-poll
//! includes its wait.

use std::{
    task::{Context, Poll},
    time::Instant,
};

use futures::future::BoxFuture;
use tower::{Layer, Service};

/// Times every request of the service it wraps.
#[derive(Debug, Clone, Copy, Default)]
pub struct RpcTiming;

impl<S> Layer<S> for RpcTiming {
    type Service = Timed<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Timed(inner)
    }
}

/// A service whose requests are timed.
#[derive(Debug, Clone)]
pub struct Timed<S>(S);

/// The method of a gRPC path (`/ferry.v1.Fleet/PullTask` gives `PullTask`).
fn method_of(path: &str) -> String {
    path.rsplit('/').next().unwrap_or(path).to_string()
}

impl<S, B> Service<http::Request<B>> for Timed<S>
where
    S: Service<http::Request<B>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let method = method_of(request.uri().path());
        let started = Instant::now();
        let answer = self.0.call(request);
        Box::pin(async move {
            let answered = answer.await;
            metrics::histogram!("ferry_rpc_seconds", "method" => method)
                .record(started.elapsed().as_secs_f64());
            answered
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_are_the_last_path_segment() {
        assert_eq!(method_of("/ferry.v1.Fleet/PullTask"), "PullTask");
        assert_eq!(method_of("Enrol"), "Enrol");
    }
}
