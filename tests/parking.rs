//! Parking: an HTTP/1.1 connection in a tunnel that stays idle gives its
//! HTTP server and buffers back until the client's next byte, and the client
//! never notices: the same connection carries its next request, and nothing
//! that is still being answered (a slow head, a stalled body, a WebSocket)
//! is ever cut. An idle upstream connection parks too: the same connection
//! carries the lane's next request, and one the origin closed meanwhile is
//! never sent a request.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use crate::support;

use futures_util::{SinkExt, StreamExt};
use support::{admin, Setup};
use tokio_tungstenite::tungstenite::protocol::Message;

const CLIENT_PARKED: &str = "pinproxy_client_connections_parked_total";
const UPSTREAM_PARKED: &str = "pinproxy_upstream_connections_parked_total";

/// pinproxy's count of parked client connections.
async fn parked(s: &Setup) -> u64 {
    counter(s, CLIENT_PARKED).await
}

/// One of pinproxy's counters.
async fn counter(s: &Setup, name: &str) -> u64 {
    let addr = s.proxy.daemon.admin_addr().unwrap();
    let text = admin::get(addr, "/metrics").await;
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .map(|v| v.trim().parse::<f64>().unwrap() as u64)
        .unwrap_or_else(|| panic!("no counter {name}"))
}

/// Waits (at most 10 s) until pinproxy has parked `n` client connections.
async fn wait_for_parked(s: &Setup, n: u64) {
    wait_for_count(s, CLIENT_PARKED, n).await;
}

/// Waits (at most 10 s) until counter `name` reaches `n`.
async fn wait_for_count(s: &Setup, name: &str, n: u64) {
    for _ in 0..200 {
        if counter(s, name).await >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{name} is {}, expected {n}", counter(s, name).await);
}

#[tokio::test]
async fn an_idle_connection_parks_and_its_next_request_uses_the_same_connection() {
    let s = Setup::start(1).await;
    let mut conn = s.tunnel().await;
    assert_eq!(conn.get("/", &[]).await.status, 200);
    wait_for_parked(&s, 1).await;
    // The client's connection is the one it had: hyper's client would fail
    // the request if pinproxy had closed it.
    for n in 2..=3 {
        let reply = conn.get("/", &[]).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        wait_for_parked(&s, n).await;
    }
    let seen: Vec<_> = s
        .origin
        .seen()
        .into_iter()
        .filter(|r| r.path == "/")
        .collect();
    assert_eq!(seen.len(), 3);
    s.stop().await;
}

#[tokio::test]
async fn an_answer_slower_than_the_park_time_is_never_cut() {
    let s = Setup::start(1).await;
    let mut conn = s.tunnel().await;
    // 1.5 s before the head, then 1.5 s between the body's two bytes: each
    // longer than a connection waits before it parks.
    let reply = conn.get("/pause?head_ms=1500&body_ms=1500", &[]).await;
    assert_eq!((reply.status.as_u16(), reply.body.as_str()), (200, "ab"));
    // And the connection still serves (parked or not).
    assert_eq!(conn.get("/", &[]).await.status, 200);
    s.stop().await;
}

#[tokio::test]
async fn a_websocket_in_a_tunnel_is_never_parked() {
    let s = Setup::start(1).await;
    let mut ws = s.proxy.client.websocket(s.origin.https.port()).await;
    ws.send(Message::text("before")).await.unwrap();
    assert!(matches!(ws.next().await, Some(Ok(Message::Text(_)))));
    // Idle for longer than the park time.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    ws.send(Message::text("after")).await.unwrap();
    match ws.next().await {
        Some(Ok(Message::Text(text))) => assert!(text.ends_with(" after"), "{text}"),
        other => panic!("no echo after an idle second and a half: {other:?}"),
    }
    assert_eq!(parked(&s).await, 0);
    ws.close(None).await.unwrap();
    s.stop().await;
}

#[tokio::test]
async fn an_idle_upstream_connection_parks_and_carries_the_lanes_next_request() {
    let s = Setup::start(1).await;
    let mut conn = s.tunnel().await;
    assert_eq!(conn.get("/", &[]).await.status, 200);
    wait_for_count(&s, UPSTREAM_PARKED, 1).await;
    let reply = conn.get("/", &[]).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    // Parked again once idle again: it runs after its unparking.
    wait_for_count(&s, UPSTREAM_PARKED, 2).await;
    let reply = s.get_with("/", &[]).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    // One upstream connection carried all three (the origin sees one TCP
    // peer port): parking released it to nobody and closed nothing.
    let ports: Vec<u16> = s
        .origin
        .seen()
        .into_iter()
        .filter(|r| r.path == "/")
        .map(|r| r.peer_port)
        .collect();
    assert_eq!(ports.len(), 3);
    assert!(ports.iter().all(|p| *p == ports[0]), "{ports:?}");
    s.stop().await;
}

#[tokio::test]
async fn upstream_connections_the_origin_closed_while_parked_are_never_sent_a_request() {
    let origin = KeepAliveOrigin::start().await;
    let s = Setup::builder()
        .exit_url("local", "direct://127.0.0.4")
        .start()
        .await;
    // Two requests at once: two upstream connections, both idle after.
    let mut first = s.proxy.client.plain("127.0.0.1", origin.port).await;
    let mut second = s.proxy.client.plain("127.0.0.1", origin.port).await;
    let (a, b) = tokio::join!(first.get("/slow", &[]), second.get("/slow", &[]));
    assert_eq!((a.body.as_str(), b.body.as_str()), ("ok", "ok"));
    assert_eq!(origin.accepted(), 2);
    wait_for_count(&s, UPSTREAM_PARKED, 2).await;
    origin.close_all().await;
    // Sent on a parked stream, this request would find it closed: hyper
    // hands an unwritten request back and the pool retries once, on the
    // other parked stream, closed too; the request would fail. Checked
    // before use, both are dropped and a new connection carries it.
    let reply = first.get("/", &[]).await;
    assert_eq!((reply.status.as_u16(), reply.body.as_str()), (200, "ok"));
    assert_eq!(origin.accepted(), 3);
    s.stop().await;
}

/// A plain-HTTP origin that keeps connections alive (answering `ok` to
/// every head, `/slow` after 300 ms) until told to close them all.
struct KeepAliveOrigin {
    port: u16,
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    close: tokio::sync::broadcast::Sender<tokio::sync::mpsc::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl KeepAliveOrigin {
    async fn start() -> KeepAliveOrigin {
        use std::sync::atomic::Ordering;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (close, _) = tokio::sync::broadcast::channel::<tokio::sync::mpsc::Sender<()>>(4);
        let (counted, closer) = (accepted.clone(), close.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                let mut closing = closer.subscribe();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        tokio::select! {
                            read = tcp.read(&mut chunk) => match read {
                                Ok(n) if n > 0 => head.extend_from_slice(&chunk[..n]),
                                _ => return,
                            },
                            done = closing.recv() => {
                                drop(tcp);
                                if let Ok(done) = done {
                                    let _ = done.send(()).await;
                                }
                                return;
                            }
                        }
                        while let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                            if head.starts_with(b"GET /slow ") {
                                // Long enough for a second request to need
                                // a connection of its own.
                                tokio::time::sleep(Duration::from_millis(300)).await;
                            }
                            head.drain(..end + 4);
                            let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                            if tcp.write_all(answer).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        KeepAliveOrigin {
            port,
            accepted,
            close,
            task,
        }
    }

    /// How many connections it accepted.
    fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Closes every open connection; returns once each has been closed.
    async fn close_all(&self) {
        let (done, mut closed) = tokio::sync::mpsc::channel(16);
        let open = self.close.send(done).unwrap_or(0);
        for _ in 0..open {
            closed.recv().await.unwrap();
        }
    }
}

impl Drop for KeepAliveOrigin {
    fn drop(&mut self) {
        self.task.abort();
    }
}
