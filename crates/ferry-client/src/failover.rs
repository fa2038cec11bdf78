//! One channel over several server addresses: the active coordinator and its standbys. Calls
//! go to the address that answered last; a connection that fails, or a standby's answer (which
//! names the active server), moves the next call to another address. The call that found out
//! fails as it would against one server, and the agent's usual retry sends it again.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
};

use tonic::{body::Body, transport::Channel};
use tower::{Service, ServiceExt};

/// The node's way to the server: one [`Channel`] per address, and which one is in use.
#[derive(Debug, Clone)]
pub struct Servers {
    channels: Arc<[(String, Channel)]>,
    current: Arc<AtomicUsize>,
}

impl Servers {
    /// The addresses `channels` (each with the address it dials), tried in this order.
    pub fn new(channels: Vec<(String, Channel)>) -> Self {
        Self {
            channels: channels.into(),
            current: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// The address calls go to now.
    pub fn current(&self) -> &str {
        &self.channels[self.current.load(Ordering::Relaxed) % self.channels.len()].0
    }

    /// Moves away from address `from` (unless another call already did): to the address that
    /// a standby named as active when it is one of ours, otherwise to the next in order.
    fn leave(&self, from: usize, active: Option<&str>) {
        let n = self.channels.len();
        let to = active
            .and_then(|active| {
                self.channels
                    .iter()
                    .position(|(address, _)| same_address(address, active))
            })
            .filter(|&to| to != from)
            .unwrap_or((from + 1) % n);
        let _ = self
            .current
            .compare_exchange(from, to, Ordering::Relaxed, Ordering::Relaxed);
    }
}

/// Whether two spellings of a server address name the same server (a trailing slash aside).
fn same_address(a: &str, b: &str) -> bool {
    a.trim_end_matches('/') == b.trim_end_matches('/')
}

impl Service<http::Request<Body>> for Servers {
    type Response = http::Response<Body>;
    type Error = tonic::transport::Error;
    type Future =
        Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send + 'static>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Each call readies the channel it is sent on.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let at = self.current.load(Ordering::Relaxed) % self.channels.len();
        let channel = self.channels[at].1.clone();
        let servers = self.clone();
        Box::pin(async move {
            let answered = channel.oneshot(request).await;
            match &answered {
                Err(_) if servers.channels.len() > 1 => servers.leave(at, None),
                Ok(response) => {
                    if let Some(active) = response.headers().get(ferry_proto::ACTIVE_SERVER) {
                        servers.leave(at, active.to_str().ok());
                    }
                }
                Err(_) => {}
            }
            answered
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn servers(addresses: &[&str]) -> Servers {
        Servers::new(
            addresses
                .iter()
                .map(|a| {
                    let channel = tonic::transport::Endpoint::from_shared(a.to_string())
                        .expect("address")
                        .connect_lazy();
                    (a.to_string(), channel)
                })
                .collect(),
        )
    }

    #[tokio::test]
    async fn a_standby_sends_calls_to_the_server_it_names() {
        let s = servers(&[
            "http://127.0.0.1:1",
            "http://127.0.0.1:2",
            "http://127.0.0.1:3",
        ]);
        s.leave(0, Some("http://127.0.0.1:3/"));
        assert_eq!(s.current(), "http://127.0.0.1:3");
        // An address that is not ours, or none: the next one in order.
        s.leave(2, Some("http://elsewhere:9"));
        assert_eq!(s.current(), "http://127.0.0.1:1");
        s.leave(0, None);
        assert_eq!(s.current(), "http://127.0.0.1:2");
        // A call that learned late (from address 0) does not undo a newer move.
        s.leave(0, None);
        assert_eq!(s.current(), "http://127.0.0.1:2");
    }

    #[tokio::test]
    async fn a_refused_connection_moves_to_the_next_address() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let closed = format!("http://{}", listener.local_addr().expect("addr"));
        drop(listener);
        let mut s = servers(&[&closed, "http://127.0.0.1:9"]);
        let request = http::Request::builder()
            .uri(format!("{closed}/ferry.v1.Fleet/PullTask"))
            .body(Body::empty())
            .expect("request");
        assert!(s.call(request).await.is_err());
        assert_eq!(s.current(), "http://127.0.0.1:9");
    }
}
