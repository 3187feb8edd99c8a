//! The idle limit (`timeouts.client_idle`) for HTTP/2 client connections.
//!
//! An HTTP/1.1 connection's guard ([`super::framing`]) ends it once it holds
//! no exchange and the client has sent nothing for the limit. hyper's
//! HTTP/2 server has no such limit (its keep-alive pings find dead peers,
//! not idle ones), so without this a client could hold any number of
//! connections, each a place among `limits.max_connections`, by opening
//! them and sending nothing, or only frames that carry no request (PINGs,
//! WINDOW_UPDATEs, half a header block), ever after.
//!
//! [`Activity`] counts the streams open on the connection: a request from
//! its arrival until its response body is done or dropped ([`counted`]).
//! Frames alone are not activity. [`drive`] checks every quarter of the
//! limit and, after four checks in a row that found no open stream, ends
//! the connection gracefully (`GOAWAY`), and drops it if it has not ended
//! a limit later (a stream hyper still holds that no request counts, such
//! as a request body that never ends after its answer).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper::service::{service_fn, Service};
use tokio_util::sync::CancellationToken;

use crate::body::{Body, BoxError};
use crate::net::streams::{OpenStream, OpenStreams};
use crate::net::tasks::Stopping;

/// Checks of the limit per limit: the limit holds to within one check.
const CHECKS: u32 = 4;

/// What a connection has been doing: the streams open on it. Cheap to
/// clone.
#[derive(Debug, Clone, Default)]
pub struct Activity(OpenStreams);

impl Activity {
    fn open(&self) -> usize {
        self.0.count()
    }

    fn opened(&self) -> u64 {
        self.0.opened()
    }

    fn stream_opened(&self) -> OpenStream {
        self.0.open()
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
/// `limit` (no open stream, checked [`CHECKS`] times per limit), ends it
/// gracefully with `drain` and waits for that (after idling, a limit at
/// most).
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
    let mut quiet = 0;
    let mut opened = activity.opened();
    // Polled with every poll of the connection: the lock-free wait, made once.
    let mut stopping = Stopping::new(shutdown.clone());
    let idled = loop {
        tokio::select! {
            result = conn.as_mut() => return result,
            () = &mut stopping => break false,
            _ = checks.tick() => {
                // A stream open now, or one that came and went since.
                let now = activity.opened();
                if activity.open() > 0 || now != opened {
                    opened = now;
                    quiet = 0;
                    continue;
                }
                quiet += 1;
                if quiet >= CHECKS {
                    tracing::debug!(idle = ?limit, "closing an HTTP/2 client connection idle for timeouts.client_idle");
                    break true;
                }
            }
        }
    };
    drain(conn.as_mut());
    if !idled {
        // The shutdown's own grace period bounds this wait.
        return conn.await;
    }
    // Streams that began before the GOAWAY finish; a connection that holds
    // none that pinproxy counts (a request body that never ends after its
    // answer, say) is dropped once it has held none for a limit.
    let mut quiet = 0;
    loop {
        tokio::select! {
            result = conn.as_mut() => return result,
            _ = checks.tick() => {
                if activity.open() > 0 {
                    quiet = 0;
                    continue;
                }
                quiet += 1;
                if quiet >= CHECKS {
                    tracing::debug!("dropping an idle HTTP/2 client connection that did not end after GOAWAY");
                    return Ok(());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

        // An open stream holds it, and so does a hold taken from it (a
        // WebSocket's relay).
        let activity = Activity::default();
        let open = activity.stream_opened();
        let kept = tokio::time::timeout(limit * 3, drive_for(activity.clone())).await;
        assert!(kept.is_err(), "an open stream holds the connection");
        drop(open);
        let relay = activity.0.clone().open();
        let kept = tokio::time::timeout(limit * 3, drive_for(activity.clone())).await;
        assert!(kept.is_err(), "a relay's hold keeps the connection");
        drop(relay);

        // So do requests that come and go between two checks: one every
        // 5 s for 200 s, then none.
        let activity = Activity::default();
        let client = activity.clone();
        tokio::spawn(async move {
            for _ in 0..40 {
                tokio::time::sleep(Duration::from_secs(5)).await;
                drop(client.stream_opened());
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

    /// Frames that carry no request (PINGs, say) are not activity; and a
    /// connection that does not end after its GOAWAY is dropped a limit
    /// later.
    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_that_does_not_end_is_dropped() {
        let shutdown = CancellationToken::new();
        let limit = Duration::from_secs(60);
        let never_ends = std::future::pending::<hyper::Result<()>>();
        let started = tokio::time::Instant::now();
        drive(never_ends, &shutdown, &Activity::default(), limit, |_| {})
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let lasted = started.elapsed();
        assert!(
            (limit * 2..=limit * 2 + limit / CHECKS).contains(&lasted),
            "dropped after {lasted:?}"
        );
    }
}
