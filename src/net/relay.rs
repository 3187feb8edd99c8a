//! Relaying bytes both ways between two connections that pinproxy does not
//! read: a passed-through tunnel (client ↔ exit) and an upgraded WebSocket
//! (client ↔ origin).
//!
//! A relay ends when either side closes, when either fails, when its owner
//! ends it (its identity retired, see `routing::relays`), or when no byte
//! has moved either way for the relay's idle limit
//! (`timeouts.relay_idle`). Without that limit, a peer that vanished
//! without a FIN (a killed container, a dropped NAT mapping) would hold
//! its relay, two sockets and their buffers, for the daemon's whole life.
//!
//! Cost: a counter bumped on every read, and one timer per relay that
//! wakes every quarter of the limit, so a relay is closed between the
//! limit and a quarter more after its last byte (as `timeouts.client_idle`
//! closes a client connection).

use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};

use super::read_count::ReadCounted;

/// How a relay ended.
#[derive(Debug)]
pub enum RelayEnd {
    /// One side closed; the bytes relayed from `a` to `b` and from `b` to `a`.
    Closed {
        /// Bytes from `a` to `b`.
        a_to_b: u64,
        /// Bytes from `b` to `a`.
        b_to_a: u64,
    },
    /// Nothing moved either way for the idle limit; both sides are dropped
    /// by the caller.
    Idle(Duration),
    /// A read or a write failed.
    Failed(io::Error),
    /// Its owner ended it (see [`relay`]'s `until`); both sides are dropped
    /// by the caller.
    Ended,
}

impl RelayEnd {
    /// Says at debug level how the relay of `what` (a passed-through
    /// tunnel, a WebSocket) ended.
    pub fn log(&self, what: &'static str) {
        match self {
            RelayEnd::Closed { a_to_b, b_to_a } => {
                tracing::debug!(relay = what, up = a_to_b, down = b_to_a, "relay closed")
            }
            RelayEnd::Idle(limit) => tracing::debug!(
                relay = what,
                idle = ?limit,
                "relay closed: nothing moved for timeouts.relay_idle"
            ),
            RelayEnd::Failed(error) => tracing::debug!(relay = what, %error, "relay ended"),
            RelayEnd::Ended => tracing::debug!(relay = what, "relay ended by its owner"),
        }
    }
}

/// Checks of the counter in one idle limit: the relay is closed at the
/// first check that finds it unchanged this many times in a row.
const CHECKS_PER_LIMIT: u32 = 4;

/// Relays between `a` (the client's side, where there is one: its bytes
/// are logged as `up`) and `b` until one closes or fails, until nothing has
/// moved for `idle` (`None` or zero: no idle limit), or until `until`
/// completes (the relay's owner ends it: its identity retired). Every read
/// that brings bytes is counted in `reads`, which `until` may watch.
pub async fn relay<A, B, U>(
    a: &mut A,
    b: &mut B,
    idle: Option<Duration>,
    reads: &AtomicU64,
    until: U,
) -> RelayEnd
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
    U: Future<Output = ()>,
{
    // Every byte relayed is read from one side first, so counting reads
    // sees anything that moves.
    let mut a = ReadCounted::new(a, reads);
    let mut b = ReadCounted::new(b, reads);
    let copy = tokio::io::copy_bidirectional(&mut a, &mut b);
    let quiet = async {
        match idle.filter(|limit| !limit.is_zero()) {
            Some(limit) => quiet_for(reads, limit).await,
            None => std::future::pending().await,
        }
    };
    let outcome = tokio::select! {
        outcome = copy => outcome,
        () = quiet => return RelayEnd::Idle(idle.unwrap_or_default()),
        () = until => return RelayEnd::Ended,
    };
    match outcome {
        Ok((a_to_b, b_to_a)) => RelayEnd::Closed { a_to_b, b_to_a },
        Err(error) => RelayEnd::Failed(error),
    }
}

/// Returns once `moved` has not changed over [`CHECKS_PER_LIMIT`] checks a
/// quarter of `limit` apart: at least `limit` without a read that brought
/// bytes, at most a quarter more.
async fn quiet_for(moved: &AtomicU64, limit: Duration) {
    let every = (limit / CHECKS_PER_LIMIT).max(Duration::from_millis(1));
    let mut seen = moved.load(Ordering::Relaxed);
    let mut unchanged = 0;
    loop {
        tokio::time::sleep(every).await;
        let now = moved.load(Ordering::Relaxed);
        if now == seen {
            unchanged += 1;
            if unchanged >= CHECKS_PER_LIMIT {
                return;
            }
        } else {
            (seen, unchanged) = (now, 0);
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn an_idle_relay_ends_within_a_quarter_past_its_limit() {
        let (mut a, mut a_far) = duplex(64);
        let (mut b, mut b_far) = duplex(64);
        let limit = Duration::from_secs(60);
        let started = tokio::time::Instant::now();
        let relay = tokio::spawn(async move {
            relay(
                &mut a,
                &mut b,
                Some(limit),
                &AtomicU64::new(0),
                std::future::pending(),
            )
            .await
        });
        // Traffic for two limits' worth of time, a byte every 40 s: the
        // relay stays open throughout.
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_secs(40)).await;
            a_far.write_all(b"x").await.unwrap();
            let mut byte = [0u8];
            b_far.read_exact(&mut byte).await.unwrap();
        }
        let last = tokio::time::Instant::now();
        assert!(!relay.is_finished(), "closed while bytes were moving");
        let end = relay.await.unwrap();
        let quiet = last.elapsed();
        assert!(matches!(end, RelayEnd::Idle(l) if l == limit), "{end:?}");
        assert!(
            quiet >= limit && quiet <= limit + limit / 4 + Duration::from_secs(1),
            "closed {quiet:?} after the last byte ({:?} in all)",
            started.elapsed()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_limit_or_with_zero_a_quiet_relay_stays_open() {
        for idle in [None, Some(Duration::ZERO)] {
            let (mut a, mut a_far) = duplex(64);
            let (mut b, b_far) = duplex(64);
            let relay = tokio::spawn(async move {
                relay(
                    &mut a,
                    &mut b,
                    idle,
                    &AtomicU64::new(0),
                    std::future::pending(),
                )
                .await
            });
            tokio::time::sleep(Duration::from_secs(24 * 3600)).await;
            assert!(!relay.is_finished(), "{idle:?}: closed while quiet");
            // A side that closes still ends it.
            a_far.shutdown().await.unwrap();
            drop(a_far);
            drop(b_far);
            let end = relay.await.unwrap();
            assert!(!matches!(end, RelayEnd::Idle(_)), "{idle:?}: {end:?}");
        }
    }

    #[tokio::test]
    async fn a_relay_ends_when_its_owner_ends_it_and_counts_what_moved() {
        let (mut a, mut a_far) = duplex(64);
        let (mut b, mut b_far) = duplex(64);
        let reads = std::sync::Arc::new(AtomicU64::new(0));
        let ended = tokio_util::sync::CancellationToken::new();
        let relay = tokio::spawn({
            let (reads, ended) = (reads.clone(), ended.clone());
            async move { relay(&mut a, &mut b, None, &reads, ended.cancelled_owned()).await }
        });
        a_far.write_all(b"x").await.unwrap();
        let mut byte = [0u8];
        b_far.read_exact(&mut byte).await.unwrap();
        assert_eq!(reads.load(Ordering::Relaxed), 1);
        ended.cancel();
        assert!(matches!(relay.await.unwrap(), RelayEnd::Ended));
        // Both sides were dropped: their peers read the end.
        assert_eq!(a_far.read(&mut byte).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn bytes_are_relayed_and_counted_both_ways_until_a_side_closes() {
        let (mut a, mut a_far) = duplex(1024);
        let (mut b, mut b_far) = duplex(1024);
        let relay = tokio::spawn(async move {
            let reads = AtomicU64::new(0);
            relay(
                &mut a,
                &mut b,
                Some(Duration::from_secs(3600)),
                &reads,
                std::future::pending(),
            )
            .await
        });
        a_far.write_all(b"hello").await.unwrap();
        let mut got = [0u8; 5];
        b_far.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello");
        b_far.write_all(b"hi").await.unwrap();
        let mut got = [0u8; 2];
        a_far.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hi");
        a_far.shutdown().await.unwrap();
        b_far.shutdown().await.unwrap();
        match relay.await.unwrap() {
            RelayEnd::Closed { a_to_b, b_to_a } => assert_eq!((a_to_b, b_to_a), (5, 2)),
            other => panic!("{other:?}"),
        }
    }
}
