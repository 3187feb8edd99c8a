//! The idle limit (`timeouts.client_idle`) for HTTP/2 client connections.
//!
//! An HTTP/1.1 connection's guard ([`super::framing`]) ends it once it holds
//! no exchange and the client has sent nothing for the limit. hyper's
//! HTTP/2 server has no such limit (its keep-alive pings find dead peers,
//! not idle ones), so without this a client could hold any number of
//! connections, each a place among `limits.max_connections`, by opening
//! them and sending nothing (or half a header block) ever after.
//!
//! [`Activity`] counts the reads of the client's stream ([`Watched`]) and
//! the streams open on the connection (a request from its arrival until
//! its response body is done or dropped, [`counted`]). [`drive`] checks
//! them every quarter of the limit and, after four checks in a row that
//! found no read and no open stream, ends the connection gracefully
//! (`GOAWAY`): the limit holds to within a quarter.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper::service::{service_fn, Service};
use tokio_util::sync::CancellationToken;

use crate::body::{Body, BoxError};
use crate::net::read_count::{ReadCounted, ReadCounter};
use crate::net::tasks::Stopping;

/// Checks of the limit per limit: the limit holds to within one check.
const CHECKS: u32 = 4;

/// What a connection has been doing: reads of the client's stream, and
/// streams open. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Activity(Arc<Counts>);

#[derive(Debug, Default)]
struct Counts {
    reads: AtomicU64,
    open: AtomicUsize,
}

impl Activity {
    /// `io`, its reads counted.
    pub fn watch<T>(&self, io: T) -> Watched<T> {
        ReadCounted::new(io, self.clone())
    }

    fn read_count(&self) -> u64 {
        self.0.reads.load(Ordering::Relaxed)
    }

    fn open(&self) -> usize {
        self.0.open.load(Ordering::Relaxed)
    }

    fn stream_opened(&self) -> OpenStream {
        self.0.open.fetch_add(1, Ordering::Relaxed);
        OpenStream(self.clone())
    }
}

/// A stream counted open until dropped.
#[derive(Debug)]
struct OpenStream(Activity);

impl Drop for OpenStream {
    fn drop(&mut self) {
        (self.0).0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A client's stream whose reads count as activity.
pub type Watched<T> = ReadCounted<T, Activity>;

impl ReadCounter for Activity {
    fn reads(&self) -> &AtomicU64 {
        &self.0.reads
    }
}

/// A response body that holds its stream open until it is done or dropped.
#[derive(Debug)]
pub struct CountedBody {
    body: Body,
    _open: OpenStream,
}

impl http_body::Body for CountedBody {
    type Data = bytes::Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// `inner`, each request counted as an open stream of `activity` from its
/// arrival until its response body is done or dropped.
pub fn counted<S>(
    activity: Activity,
    inner: S,
) -> impl Service<
    Request<Incoming>,
    Response = Response<CountedBody>,
    Error = Infallible,
    Future = impl Future<Output = Result<Response<CountedBody>, Infallible>> + Send,
> + Clone
where
    S: Service<Request<Incoming>, Response = Response<Body>, Error = Infallible> + Clone,
    S::Future: Send,
{
    service_fn(move |request: Request<Incoming>| {
        let open = activity.stream_opened();
        let answer = inner.call(request);
        async move {
            let response = answer.await?;
            Ok(response.map(|body| CountedBody { body, _open: open }))
        }
    })
}

/// Serves `conn` until it ends; on `shutdown`, or once it has been idle for
/// `limit` (no read, no open stream, checked [`CHECKS`] times per limit),
/// ends it gracefully with `drain` and waits for that.
pub async fn drive<C>(
    conn: C,
    shutdown: &CancellationToken,
    activity: &Activity,
    limit: Duration,
    drain: impl FnOnce(Pin<&mut C>),
) -> hyper::Result<()>
where
    C: Future<Output = hyper::Result<()>>,
{
    tokio::pin!(conn);
    let period = (limit / CHECKS).max(Duration::from_millis(1));
    let mut checks = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    checks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut reads = activity.read_count();
    let mut quiet = 0;
    // Polled with every poll of the connection: the lock-free wait, made once.
    let mut stopping = Stopping::new(shutdown.clone());
    loop {
        tokio::select! {
            result = conn.as_mut() => return result,
            () = &mut stopping => break,
            _ = checks.tick() => {
                let now = activity.read_count();
                if now != reads || activity.open() > 0 {
                    reads = now;
                    quiet = 0;
                    continue;
                }
                quiet += 1;
                if quiet >= CHECKS {
                    tracing::debug!(idle = ?limit, "closing an HTTP/2 client connection idle for timeouts.client_idle");
                    break;
                }
            }
        }
    }
    drain(conn.as_mut());
    conn.await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    #[tokio::test]
    async fn reads_count_and_open_streams_hold_until_dropped() {
        let activity = Activity::default();
        let (client, server) = tokio::io::duplex(64);
        let mut watched = activity.watch(server);
        let mut client = client;
        client
            .write_all(b"abc")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let mut got = [0u8; 3];
        watched
            .read_exact(&mut got)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(activity.read_count() >= 1);
        let open = activity.stream_opened();
        let other = activity.stream_opened();
        assert_eq!(activity.open(), 2);
        drop(open);
        drop(other);
        assert_eq!(activity.open(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_connection_is_drained_after_the_limit_and_a_busy_one_is_not() {
        let shutdown = CancellationToken::new();
        let limit = Duration::from_secs(60);
        let drive_for = |activity: Activity| {
            let shutdown = shutdown.clone();
            async move {
                let (end, ended) = tokio::sync::oneshot::channel::<()>();
                let conn = async move {
                    let _ = ended.await;
                    Ok(())
                };
                drive(conn, &shutdown, &activity, limit, move |_| {
                    let _ = end.send(());
                })
                .await
            }
        };

        // Quiet from the start: drained within a quarter past the limit.
        let started = tokio::time::Instant::now();
        drive_for(Activity::default())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let idle = started.elapsed();
        assert!(
            (limit..=limit + limit / CHECKS).contains(&idle),
            "drained after {idle:?}"
        );

        // An open stream holds it.
        let activity = Activity::default();
        let open = activity.stream_opened();
        let kept = tokio::time::timeout(limit * 3, drive_for(activity.clone())).await;
        assert!(kept.is_err(), "an open stream holds the connection");
        drop(open);

        // So do reads: one every 10 s for 200 s, then quiet.
        let activity = Activity::default();
        let reader = activity.clone();
        tokio::spawn(async move {
            for _ in 0..20 {
                tokio::time::sleep(Duration::from_secs(10)).await;
                reader.0.reads.fetch_add(1, Ordering::Relaxed);
            }
        });
        let started = tokio::time::Instant::now();
        drive_for(activity).await.unwrap_or_else(|e| panic!("{e}"));
        let lasted = started.elapsed();
        assert!(
            (Duration::from_secs(200) + limit..=Duration::from_secs(200) + limit + limit / CHECKS)
                .contains(&lasted),
            "drained after {lasted:?}"
        );
    }
}
