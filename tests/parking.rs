//! Parking: an HTTP/1.1 connection in a tunnel that stays idle gives its
//! HTTP server and buffers back until the client's next byte, and the client
//! never notices: the same connection carries its next request, and nothing
//! that is still being answered (a slow head, a stalled body, a WebSocket)
//! is ever cut.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use crate::support;

use futures_util::{SinkExt, StreamExt};
use support::{admin, Setup};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::Message;

/// pinproxy's count of parked connections.
async fn parked(s: &Setup) -> u64 {
    let addr = s.proxy.daemon.admin_addr().unwrap();
    let text = admin::get(addr, "/metrics").await;
    text.lines()
        .find_map(|line| line.strip_prefix("pinproxy_client_connections_parked_total "))
        .map(|v| v.trim().parse::<f64>().unwrap() as u64)
        .expect("the parked-connections counter")
}

/// Waits (at most 10 s) until pinproxy has parked `n` connections in all.
async fn wait_for_parked(s: &Setup, n: u64) {
    for _ in 0..200 {
        if parked(s).await >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{} connections parked, expected {n}", parked(s).await);
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
    let port = s.origin.https.port();
    let tls = s
        .proxy
        .client
        .tls_stream("localhost", port, &[b"http/1.1"])
        .await;
    let request = format!("wss://localhost:{port}/ws")
        .into_client_request()
        .unwrap();
    let (mut ws, response) = tokio_tungstenite::client_async(request, tls).await.unwrap();
    assert_eq!(response.status(), 101);
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
