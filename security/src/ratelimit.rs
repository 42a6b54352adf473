//! Per-client request rate limits for flamingo's gRPC servers: a `tower`
//! layer with one token bucket per client. A client is its certificate
//! (every node, user and service holds its own) or, on a plain-text
//! loopback server, its IP address. A request past the client's budget is
//! answered at once with `RESOURCE_EXHAUSTED`, naming the limit and the
//! flag that raises it; it never reaches the service, so one runaway
//! client cannot take the server's time from the others.
//!
//! The bucket holds up to `burst` requests and refills at `per_second`.
//! Buckets of clients that have been quiet long enough to refill are
//! dropped when the table grows, so the table holds at most the clients
//! active in the last few seconds.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::transport::CertificateDer;

type Certificates = Arc<Vec<CertificateDer<'static>>>;

/// Past this many clients in the table, idle ones are dropped.
const PRUNE_AT: usize = 4096;

/// The budget: `per_second` sustained, `burst` at once. `per_second == 0`
/// turns the limit off.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateBudget {
    pub per_second: f64,
    pub burst: f64,
}

impl RateBudget {
    /// A sustained rate with a burst of twice as many (at least 1).
    pub fn per_second(per_second: u32) -> Self {
        let per_second = f64::from(per_second);
        Self {
            per_second,
            burst: (per_second * 2.0).max(1.0),
        }
    }

    pub fn is_off(&self) -> bool {
        self.per_second <= 0.0
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum ClientKey {
    /// A hash of the client's leaf certificate.
    Certificate(u64),
    Address(IpAddr),
    /// Neither is known (an in-process transport).
    Unknown,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

/// The shared state of one server's limit.
#[derive(Debug)]
pub struct RateLimiter {
    budget: RateBudget,
    /// The server's name and the flag that raises its limit, for messages.
    server: &'static str,
    flag: &'static str,
    hasher: std::collections::hash_map::RandomState,
    clients: Mutex<HashMap<ClientKey, Bucket>>,
}

impl RateLimiter {
    pub fn new(budget: RateBudget, server: &'static str, flag: &'static str) -> Arc<Self> {
        Arc::new(Self {
            budget,
            server,
            flag,
            hasher: std::collections::hash_map::RandomState::new(),
            clients: Mutex::default(),
        })
    }

    /// Takes one request from `key`'s bucket; false when it is empty.
    fn admit(&self, key: ClientKey, now: Instant) -> bool {
        let budget = self.budget;
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if clients.len() >= PRUNE_AT && !clients.contains_key(&key) {
            clients.retain(|_, bucket| {
                let idle = now.duration_since(bucket.updated).as_secs_f64();
                bucket.tokens + idle * budget.per_second < budget.burst
            });
        }
        let bucket = clients.entry(key).or_insert(Bucket {
            tokens: budget.burst,
            updated: now,
        });
        let idle = now.duration_since(bucket.updated).as_secs_f64();
        bucket.tokens = (bucket.tokens + idle * budget.per_second).min(budget.burst);
        bucket.updated = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Clients with a bucket now (for tests and metrics).
    pub fn clients(&self) -> usize {
        self.clients.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// The client of a request, and its certificates when it has any.
    fn key(&self, extensions: &http::Extensions) -> (ClientKey, Option<Certificates>) {
        if let Some(tls) = extensions.get::<TlsConnectInfo<TcpConnectInfo>>() {
            if let Some(certs) = tls.peer_certs().filter(|certs| !certs.is_empty()) {
                let key = ClientKey::Certificate(self.hasher.hash_one(certs[0].as_ref()));
                return (key, Some(certs));
            }
            if let Some(address) = tls.get_ref().remote_addr() {
                return (ClientKey::Address(address.ip()), None);
            }
        }
        match extensions
            .get::<TcpConnectInfo>()
            .and_then(TcpConnectInfo::remote_addr)
        {
            Some(address) => (ClientKey::Address(address.ip()), None),
            None => (ClientKey::Unknown, None),
        }
    }

    fn refusal(&self, key: ClientKey, leaf: Option<&[u8]>) -> tonic::Status {
        let who = match (key, leaf) {
            (ClientKey::Certificate(_), Some(der)) => match crate::PeerCertificate::from_der(der) {
                Ok(peer) => peer.identity.to_string(),
                Err(_) => "this client".to_string(),
            },
            (ClientKey::Address(address), _) => address.to_string(),
            _ => "this client".to_string(),
        };
        tonic::Status::resource_exhausted(format!(
            "rate limit: {who} sent more than {} requests per second (bursts of {}) to the {}; \
             slow down and retry, or raise the server's {}",
            self.budget.per_second, self.budget.burst, self.server, self.flag
        ))
    }
}

/// The `tower` layer: `Server::builder().layer(RateLimitLayer::new(..))`.
#[derive(Debug, Clone)]
pub struct RateLimitLayer(Option<Arc<RateLimiter>>);

impl RateLimitLayer {
    /// `None` (or a budget that is off) passes everything through.
    pub fn new(limiter: Option<Arc<RateLimiter>>) -> Self {
        Self(limiter.filter(|limiter| !limiter.budget.is_off()))
    }
}

impl<S> tower::Layer<S> for RateLimitLayer {
    type Service = RateLimited<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimited {
            inner,
            limiter: self.0.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct RateLimited<S> {
    inner: S,
    limiter: Option<Arc<RateLimiter>>,
}

impl<S, B, ResBody> tower::Service<http::Request<B>> for RateLimited<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = http::Response<ResBody>;
    type Error = S::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if let Some(limiter) = &self.limiter {
            let (key, leaf) = limiter.key(request.extensions());
            if !limiter.admit(key, Instant::now()) {
                let leaf = leaf.as_ref().and_then(|certs| certs.first());
                let status = limiter.refusal(key, leaf.map(|der| der.as_ref()));
                tracing::warn!(server = limiter.server, message = %status.message(), "request refused");
                return Box::pin(std::future::ready(Ok(status.into_http())));
            }
        }
        Box::pin(self.inner.call(request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let limiter = RateLimiter::new(RateBudget::per_second(10), "coordinator", "--flag");
        let client = ClientKey::Address("10.0.0.1".parse().expect("ip"));
        let other = ClientKey::Address("10.0.0.2".parse().expect("ip"));
        let start = Instant::now();
        let admitted = (0..100).filter(|_| limiter.admit(client, start)).count();
        assert_eq!(admitted, 20, "the burst is twice the rate");
        assert!(
            limiter.admit(other, start),
            "another client has its own bucket"
        );
        // Half a second refills five requests.
        let later = start + Duration::from_millis(500);
        let admitted = (0..100).filter(|_| limiter.admit(client, later)).count();
        assert_eq!(admitted, 5);
    }

    #[test]
    fn idle_clients_leave_the_table() {
        let limiter = RateLimiter::new(RateBudget::per_second(1), "coordinator", "--flag");
        let start = Instant::now();
        for n in 0..PRUNE_AT as u32 {
            assert!(limiter.admit(ClientKey::Certificate(u64::from(n)), start));
        }
        assert_eq!(limiter.clients(), PRUNE_AT);
        // Ten seconds on, every bucket has refilled: a new client prunes
        // them all.
        let later = start + Duration::from_secs(10);
        assert!(limiter.admit(ClientKey::Unknown, later));
        assert_eq!(limiter.clients(), 1);
    }

    #[test]
    fn the_refusal_names_the_limit_and_the_flag() {
        let limiter = RateLimiter::new(
            RateBudget::per_second(5),
            "coordinator",
            "--max-requests-per-second",
        );
        let status = limiter.refusal(ClientKey::Address("10.1.2.3".parse().expect("ip")), None);
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        let message = status.message();
        assert!(message.contains("10.1.2.3"), "{message}");
        assert!(message.contains("5 requests per second"), "{message}");
        assert!(message.contains("--max-requests-per-second"), "{message}");
    }
}
