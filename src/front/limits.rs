//! Per-client limits at the front door: concurrent connections and
//! requests per second per client address.
//!
//! - `limits.max_connections_per_client`: a connection beyond it is
//!   answered `429 too-many-connections` at once and closed, before any of
//!   its bytes are read, so one address cannot take every one of
//!   `limits.max_connections`.
//! - `limits.requests_per_second_per_client` with
//!   `limits.requests_burst_per_client`: a token bucket per address;
//!   every request counts (a CONNECT, and each request inside a tunnel,
//!   over HTTP/1.1 or HTTP/2). Beyond it: `429 rate-limited` with
//!   `Retry-After`, and the request is not forwarded.
//!
//! One lock-free map entry per address (sharded `DashMap`), no global lock.
//! Memory stays bounded: a connection count leaves the map when it drops
//! to zero, and a bucket that has refilled carries no information, so a
//! periodic sweep removes it.

use std::convert::Infallible;
use std::future::Future;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::{service_fn, Service};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::body::Body;
use crate::proxy::pacing::Throttle;
use crate::proxy::ProxyError;

/// How often (in requests) full buckets are swept.
const SWEEP_EVERY: u64 = 4096;

/// The per-client settings (`limits.*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ClientLimitSettings {
    /// Most connections per client address; 0: no limit.
    pub max_connections: usize,
    /// Requests per second per client address; 0: no limit.
    pub requests_per_second: u32,
    /// Requests a client may send at once above the rate.
    pub burst: u32,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Whom `ip` is counted as: itself, an IPv4-mapped IPv6 address as the
/// IPv4 address it maps (a dual-stack listener sees IPv4 clients so).
/// IPv6 clients are not grouped by prefix: a /64 is as often a shared
/// subnet (a Kubernetes node's pods, a Docker network) as one host.
fn client_key(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

/// The per-client state of the front door.
#[derive(Debug, Default)]
pub struct ClientLimits {
    settings: ClientLimitSettings,
    connections: DashMap<IpAddr, usize>,
    buckets: DashMap<IpAddr, Bucket>,
    requests: AtomicU64,
}

/// One open client connection, counted until dropped.
#[derive(Debug)]
pub struct ClientConnection {
    limits: Arc<ClientLimits>,
    client: IpAddr,
}

impl Drop for ClientConnection {
    fn drop(&mut self) {
        if self.limits.settings.max_connections == 0 {
            return;
        }
        self.limits
            .connections
            .remove_if_mut(&self.client, |_, open| {
                *open = open.saturating_sub(1);
                *open == 0
            });
    }
}

impl ClientLimits {
    /// Limits by `settings`.
    pub fn new(settings: ClientLimitSettings) -> Arc<ClientLimits> {
        Arc::new(ClientLimits {
            settings,
            ..ClientLimits::default()
        })
    }

    /// Client addresses tracked (open connections or a bucket not full).
    pub fn tracked(&self) -> usize {
        self.connections.len() + self.buckets.len()
    }

    /// Counts a new connection from `client`, unless it has too many.
    pub fn connect(self: &Arc<Self>, client: IpAddr) -> Result<ClientConnection, Throttle> {
        let client = client_key(client);
        let limit = self.settings.max_connections;
        if limit > 0 {
            let mut open = self.connections.entry(client).or_insert(0);
            if *open >= limit {
                return Err(Throttle::ClientConnections {
                    client,
                    open: *open,
                    limit,
                });
            }
            *open += 1;
        }
        Ok(ClientConnection {
            limits: self.clone(),
            client,
        })
    }

    /// Takes a token for one request from `client`.
    pub fn request(&self, client: IpAddr) -> Result<(), Throttle> {
        let rate = self.settings.requests_per_second;
        if rate == 0 {
            return Ok(());
        }
        let client = client_key(client);
        self.sweep_now_and_then();
        let rate_f = f64::from(rate);
        let burst = f64::from(self.settings.burst.max(1));
        let now = Instant::now();
        let mut bucket = self.buckets.entry(client).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        let refill = now.duration_since(bucket.at).as_secs_f64() * rate_f;
        bucket.tokens = (bucket.tokens + refill).min(burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            return Ok(());
        }
        let retry_after = Duration::from_secs_f64((1.0 - bucket.tokens) / rate_f);
        Err(Throttle::ClientRate {
            client,
            rate,
            burst: self.settings.burst,
            retry_after,
        })
    }

    /// Removes full buckets every [`SWEEP_EVERY`] requests.
    fn sweep_now_and_then(&self) {
        if self.requests.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY != SWEEP_EVERY - 1 {
            return;
        }
        let rate = f64::from(self.settings.requests_per_second);
        let burst = f64::from(self.settings.burst.max(1));
        let now = Instant::now();
        self.buckets.retain(|_, bucket| {
            bucket.tokens + now.duration_since(bucket.at).as_secs_f64() * rate < burst
        });
    }
}

/// `inner`, with one rate-limit token taken from `client` per request;
/// without one the answer is `429 rate-limited` and `inner` is not called.
pub fn rated<S>(
    limits: Arc<ClientLimits>,
    client: IpAddr,
    inner: S,
) -> impl Service<
    Request<Incoming>,
    Response = Response<Body>,
    Error = Infallible,
    Future = impl Future<Output = Result<Response<Body>, Infallible>> + Send,
> + Clone
where
    S: Service<Request<Incoming>, Response = Response<Body>, Error = Infallible> + Clone,
    S::Future: Send,
{
    service_fn(move |request: Request<Incoming>| {
        let served = limits.request(client).map(|()| inner.call(request));
        async move {
            match served {
                Ok(future) => future.await,
                Err(throttle) => {
                    tracing::debug!(%throttle, "refused");
                    Ok(ProxyError::Throttled(throttle).to_response())
                }
            }
        }
    })
}

/// How many connections over `limits.max_connections_per_client` are
/// answered at once (see [`refuse_connection`]); more are closed at once.
pub const REFUSALS_AT_ONCE: usize = 64;

/// Answers a connection over `limits.max_connections_per_client` with a
/// 429 and closes it, without reading its request (bounded in time),
/// holding `_turn` (one of [`REFUSALS_AT_ONCE`]) meanwhile.
pub async fn refuse_connection(
    mut stream: TcpStream,
    throttle: Throttle,
    _turn: tokio::sync::OwnedSemaphorePermit,
) {
    let message = format!("pinproxy: {throttle}\n{}\n", throttle.advice());
    let head = format!(
        "HTTP/1.1 429 Too Many Requests\r\nretry-after: {}\r\nx-pinproxy-error: {}: {throttle}\r\n\
         content-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        throttle.retry_after_secs(),
        throttle.code(),
        message.len()
    );
    let answer = async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(message.as_bytes()).await?;
        stream.shutdown().await?;
        // Read (and drop) what the client already sent, briefly, so the
        // close is not a reset that could destroy the answer in flight.
        let mut sink = [0u8; 4096];
        while stream.read(&mut sink).await? > 0 {}
        Ok::<_, std::io::Error>(())
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), answer).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_bucket_refills_at_the_rate() {
        let limits = ClientLimits::new(ClientLimitSettings {
            max_connections: 0,
            requests_per_second: 10,
            burst: 5,
        });
        let ip: IpAddr = "127.0.0.9".parse().unwrap();
        for _ in 0..5 {
            limits.request(ip).unwrap();
        }
        let refused = limits.request(ip).unwrap_err();
        assert_eq!(refused.retry_after_secs(), 1);
        tokio::time::advance(Duration::from_millis(100)).await;
        limits.request(ip).unwrap();
        assert!(limits.request(ip).is_err());
        let other: IpAddr = "127.0.0.10".parse().unwrap();
        limits.request(other).unwrap();
    }

    #[tokio::test]
    async fn connections_are_counted_per_address() {
        let limits = ClientLimits::new(ClientLimitSettings {
            max_connections: 2,
            ..ClientLimitSettings::default()
        });
        let ip: IpAddr = "127.0.0.9".parse().unwrap();
        let a = limits.connect(ip).unwrap();
        let _b = limits.connect(ip).unwrap();
        assert!(limits.connect(ip).is_err());
        assert!(limits.connect("127.0.0.10".parse().unwrap()).is_ok());
        drop(a);
        let _c = limits.connect(ip).unwrap();
        drop(_c);
        drop(_b);
        assert_eq!(limits.tracked(), 0, "counts leave the map at zero");
    }

    /// An IPv4-mapped address is the IPv4 client it maps: a dual-stack
    /// listener does not give an IPv4 client a second allowance.
    #[tokio::test]
    async fn an_ipv4_mapped_client_is_its_ipv4_address() {
        let limits = ClientLimits::new(ClientLimitSettings {
            max_connections: 1,
            ..ClientLimitSettings::default()
        });
        let _one = limits.connect("2001:db8::1".parse().unwrap()).unwrap();
        assert!(limits.connect("2001:db8::2".parse().unwrap()).is_ok());
        let _v4 = limits.connect("127.0.0.9".parse().unwrap()).unwrap();
        assert!(limits.connect("::ffff:127.0.0.9".parse().unwrap()).is_err());
    }
}
