//! A gRPC channel to whichever of several coordinators leads. Under leader
//! election only the leader listens, so a call that cannot reach its
//! coordinator (refused, reset, timed out connecting) moves the channel on
//! to the next address; the caller's own retry then reaches the next one,
//! and within one round the leader. With one address it is a plain
//! channel.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tonic::body::Body;
use tonic::transport::Channel;

use crate::{ClientTls, SecurityError};

/// Channels to every address of a comma-separated list, used one at a time.
#[derive(Clone, Debug)]
pub struct Failover {
    channels: Arc<[Channel]>,
    addresses: Arc<[String]>,
    current: Arc<AtomicUsize>,
}

/// The addresses of a comma-separated list (`https://a:7070,https://b:7070`).
pub fn addresses(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .filter(|address| !address.is_empty())
        .map(String::from)
        .collect()
}

impl Failover {
    /// Lazy channels (nothing is connected before the first call) to every
    /// address of `list`, with mutual TLS under `tls` for `domain`.
    pub fn new(
        list: &str,
        tls: Option<&ClientTls>,
        domain: &str,
        connect_timeout: Duration,
        timeout: Option<Duration>,
    ) -> Result<Self, SecurityError> {
        Self::with_keep_alive(list, tls, domain, connect_timeout, timeout, None)
    }

    /// [`Failover::new`], and with `keep_alive` an HTTP/2 ping every that
    /// long (also on idle connections) that must be answered within it:
    /// a coordinator cut off by the network then ends the caller's streams
    /// within two periods instead of TCP's retransmission timeout.
    pub fn with_keep_alive(
        list: &str,
        tls: Option<&ClientTls>,
        domain: &str,
        connect_timeout: Duration,
        timeout: Option<Duration>,
        keep_alive: Option<Duration>,
    ) -> Result<Self, SecurityError> {
        let addresses = addresses(list);
        if addresses.is_empty() {
            return Err(SecurityError::Invalid {
                name: list.to_string(),
                message:
                    "names no address (like http://10.0.0.5:7070, or several, comma separated)"
                        .into(),
            });
        }
        let channels = addresses
            .iter()
            .map(|address| {
                let mut endpoint =
                    crate::endpoint(address, tls, domain)?.connect_timeout(connect_timeout);
                if let Some(timeout) = timeout {
                    endpoint = endpoint.timeout(timeout);
                }
                if let Some(period) = keep_alive {
                    endpoint = endpoint
                        .http2_keep_alive_interval(period)
                        .keep_alive_timeout(period)
                        .keep_alive_while_idle(true);
                }
                Ok(endpoint.connect_lazy())
            })
            .collect::<Result<Vec<_>, SecurityError>>()?;
        Ok(Self {
            channels: channels.into(),
            addresses: addresses.into(),
            current: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// The address calls go to now.
    pub fn current(&self) -> &str {
        &self.addresses[self.current.load(Ordering::Relaxed) % self.addresses.len()]
    }

    /// Moves on from `failed` (unless another call already did).
    fn next_after(current: &AtomicUsize, failed: usize, count: usize) {
        let _ = current.compare_exchange(
            failed,
            (failed + 1) % count,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }
}

impl tower::Service<http::Request<Body>> for Failover {
    type Response = http::Response<Body>;
    type Error = tonic::transport::Error;
    type Future =
        Pin<Box<dyn Future<Output = Result<http::Response<Body>, tonic::transport::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Readiness is awaited per call, on the channel the call uses.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let count = self.channels.len();
        let index = self.current.load(Ordering::Relaxed) % count;
        let mut channel = self.channels[index].clone();
        let current = self.current.clone();
        Box::pin(async move {
            let ready =
                std::future::poll_fn(|cx| tower::Service::poll_ready(&mut channel, cx)).await;
            let answer = match ready {
                Ok(()) => tower::Service::call(&mut channel, request).await,
                Err(error) => Err(error),
            };
            // An answer (even an error status) came from a listening
            // coordinator; a transport error did not.
            if answer.is_err() && count > 1 {
                Self::next_after(&current, index, count);
            }
            answer
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_are_split_and_trimmed() {
        assert_eq!(
            addresses(" http://a:1, http://b:2 ,,"),
            vec!["http://a:1".to_string(), "http://b:2".to_string()]
        );
        assert!(addresses("").is_empty());
    }

    #[tokio::test]
    async fn a_refused_call_moves_on_to_the_next_address() {
        // Two closed ports: every call fails, and each failure moves on.
        let closed = |port: u16| format!("http://127.0.0.1:{port}");
        let ports: Vec<u16> = (0..2)
            .map(|_| {
                std::net::TcpListener::bind("127.0.0.1:0")
                    .and_then(|listener| listener.local_addr())
                    .map(|address| address.port())
                    .expect("a free port")
            })
            .collect();
        let list = format!("{},{}", closed(ports[0]), closed(ports[1]));
        let mut failover =
            Failover::new(&list, None, "coordinator", Duration::from_secs(1), None).expect("list");
        assert_eq!(failover.current(), closed(ports[0]));
        let request = || {
            http::Request::builder()
                .uri("/flamingo.v1.JobService/ListJobs")
                .body(Body::empty())
                .expect("request")
        };
        assert!(tower::Service::call(&mut failover, request())
            .await
            .is_err());
        assert_eq!(failover.current(), closed(ports[1]));
        assert!(tower::Service::call(&mut failover, request())
            .await
            .is_err());
        assert_eq!(failover.current(), closed(ports[0]));
        assert!(Failover::new(" , ", None, "coordinator", Duration::from_secs(1), None).is_err());
    }
}
