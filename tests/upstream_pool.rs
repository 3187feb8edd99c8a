//! The idle upstream connections of an exit stay within
//! `limits.max_idle_per_exit`: identities that churn (a fresh jar every few
//! pages) must not hold open tunnels through the exit's proxy until they
//! time out, since providers limit those. The longest idle close first.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::Setup;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

/// One exit whose idle connections are capped at `cap` and never time out.
async fn capped(cap: usize) -> Setup {
    Setup::builder()
        .http1_only_origin()
        .exits(1)
        .config(|c| {
            c.limits.max_idle_per_exit = cap;
            c.timeouts.pool_idle = Duration::from_secs(600);
        })
        .start()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exit_keeps_at_most_max_idle_connections_closing_the_longest_idle() {
    const CAP: usize = 3;
    let s = capped(CAP).await;
    let exit = &s.exits[0];

    // Ten identities, each with a connection of its own left idle.
    let mut jars = Vec::new();
    for _ in 0..10 {
        let (mut jar, _) = s.login("/login").await;
        assert_eq!(s.get("/", &mut jar).await.status, 200);
        jars.push(jar);
    }
    assert!(
        exit.open_tunnels() > CAP,
        "each identity opened its own tunnel"
    );

    // The sweeper (once a second) closes the excess.
    exit.assert_open_tunnels_fall_to(CAP).await;

    // The newest identity's connection was the last to go idle: it is kept
    // and reused, no new CONNECT.
    let connects = exit.connects().len();
    let newest = jars.last_mut().unwrap();
    let reply = s.tunnel().await.get_with_jar("/", newest).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(
        exit.connects().len(),
        connects,
        "the newest idle connection was reused"
    );
    s.stop().await;
}

/// Connections in steady use stay open whatever the cap: at a sweep most
/// of them are idle for a moment between requests, and closing one would
/// only make its identity open another tunnel (and TLS handshake) at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_reused_within_the_last_second_are_not_closed_for_the_cap() {
    const CAP: usize = 1;
    const IDENTITIES: usize = 3;
    let s = capped(CAP).await;
    let exit = &s.exits[0];
    let mut jars = Vec::new();
    for _ in 0..IDENTITIES {
        let (mut jar, _) = s.login("/login").await;
        assert_eq!(s.get("/", &mut jar).await.status, 200);
        jars.push(jar);
    }
    let connects = exit.connects().len();

    // One request at a time, round robin: at any sweep at least two of the
    // three connections are idle, over the cap, and each was used within
    // the last few milliseconds. The sweeper runs once a second, so 2.5 s
    // of traffic spans at least two sweeps.
    let until = Instant::now() + Duration::from_millis(2_500);
    let mut sent = 0;
    while Instant::now() < until && sent < 5_000 {
        let jar = &mut jars[sent % IDENTITIES];
        assert_eq!(s.get("/", jar).await.status, 200);
        sent += 1;
    }
    assert!(sent >= 2 * IDENTITIES, "{sent} requests");
    assert_eq!(
        exit.connects().len(),
        connects,
        "no identity had to open a new tunnel while its connection was in use"
    );

    // Left idle, the excess goes as before.
    exit.assert_open_tunnels_fall_to(CAP).await;
    s.stop().await;
}

/// An origin may answer a request before its body has arrived (a 413, a
/// redirect, a 401) and keep the connection: until the client has sent the
/// rest, the upstream connection is busy writing that body. Another request
/// must not wait behind the upload (until the response-head timeout, then
/// 504): it takes a connection of its own, and the busy one serves again
/// once its body is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_still_uploading_after_an_early_answer_is_not_handed_on() {
    const LENGTH: usize = 1_000_000;
    const SENT_FIRST: usize = 1024;
    let origin = EarlyAnswerOrigin::start().await;
    let s = Setup::builder()
        .exit_url("local", "direct://127.0.0.4")
        .config(|c| c.timeouts.response_head = Duration::from_secs(3))
        .start()
        .await;
    let target = format!("127.0.0.1:{}", origin.port);

    // An upload: its head and first kilobyte sent, the rest held back.
    let mut upload = tokio::net::TcpStream::connect(s.proxy.client.proxy)
        .await
        .unwrap();
    let head = format!(
        "POST http://{target}/upload HTTP/1.1\r\nHost: {target}\r\nContent-Length: {LENGTH}\r\n\r\n"
    );
    upload.write_all(head.as_bytes()).await.unwrap();
    upload.write_all(&[b'x'; SENT_FIRST]).await.unwrap();
    // Its answer has no body: pinproxy is done with the response once the
    // head is out, before the client reads it. (The raw socket's reads and
    // writes are bounded: a regression fails here rather than hang.)
    let limit = Duration::from_secs(30);
    let answer = tokio::time::timeout(limit, support::client::read_head(&mut upload))
        .await
        .expect("no answer to the upload");
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");

    // Another request to the same origin on the same (anonymous) lane.
    let mut other = s.proxy.client.plain("127.0.0.1", origin.port).await;
    let started = Instant::now();
    let reply = other.get("/", &[]).await;
    assert_eq!(
        (reply.status.as_u16(), reply.body.as_str()),
        (200, "ok"),
        "after {:?}: {:?}",
        started.elapsed(),
        reply.pinproxy_error()
    );
    assert_eq!(origin.accepted(), 2, "the upload's connection was busy");

    // The rest of the upload, then a request on the upload's own client
    // connection: served by a pooled connection, none dialled anew.
    let rest = vec![b'x'; LENGTH - SENT_FIRST];
    tokio::time::timeout(limit, upload.write_all(&rest))
        .await
        .expect("the rest of the upload was not taken")
        .unwrap();
    let request = format!("GET http://{target}/ HTTP/1.1\r\nHost: {target}\r\n\r\n");
    upload.write_all(request.as_bytes()).await.unwrap();
    let answer = tokio::time::timeout(limit, support::client::read_head(&mut upload))
        .await
        .expect("no answer on the upload's connection");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(origin.accepted(), 2);
    s.stop().await;
}

/// A plain-HTTP keep-alive origin that answers each request as soon as its
/// head has arrived: `413` (no body) to a POST, before a byte of its body,
/// which it then reads and discards; `200 ok` to anything else.
struct EarlyAnswerOrigin {
    port: u16,
    accepted: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl EarlyAnswerOrigin {
    async fn start() -> EarlyAnswerOrigin {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counted = accepted.clone();
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(EarlyAnswerOrigin::serve(tcp));
            }
        });
        EarlyAnswerOrigin {
            port,
            accepted,
            task,
        }
    }

    /// One connection: heads answered as they arrive, bodies skipped.
    async fn serve(mut tcp: tokio::net::TcpStream) {
        let (mut pending, mut skip) = (Vec::new(), 0usize);
        let mut chunk = vec![0u8; 64 * 1024];
        // Bounded: a test sends a few requests and one upload.
        for _ in 0..10_000 {
            let n = match tcp.read(&mut chunk).await {
                Ok(n) if n > 0 => n,
                _ => return,
            };
            let skipped = skip.min(n);
            skip -= skipped;
            pending.extend_from_slice(&chunk[skipped..n]);
            while let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&pending[..end]).to_ascii_lowercase();
                pending.drain(..end + 4);
                let length = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse::<usize>().ok())
                    .unwrap_or(0);
                let answer: &[u8] = if head.starts_with("post ") {
                    b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 0\r\n\r\n"
                } else {
                    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
                };
                if tcp.write_all(answer).await.is_err() {
                    return;
                }
                let now = length.min(pending.len());
                pending.drain(..now);
                skip = length - now;
            }
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for EarlyAnswerOrigin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An upstream HTTP/2 connection no request has taken for
/// `timeouts.pool_idle` is let go, though its lane stays busy with other
/// origins: a crawl through one lane kept one per host it ever visited
/// (a socket and a tunnel at the exit each) as long as the origins did
/// not close them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_upstream_http2_connection_is_let_go_while_its_lane_is_busy() {
    let s = Setup::builder()
        .exits(1)
        .config(|c| c.timeouts.pool_idle = Duration::from_secs(3))
        .start()
        .await;
    let other = h2_origin(&s.origin.pki).await;
    {
        // Once to another origin, on the one anonymous lane.
        let mut once = s.proxy.client.tunnel_h2("localhost", other.port()).await;
        let reply = once.get("/", &[]).await;
        assert_eq!(reply.status, 200, "{:?}", reply.pinproxy_error());
    }
    let mut busy = s
        .proxy
        .client
        .tunnel_h2("localhost", s.origin.https.port())
        .await;
    assert_eq!(busy.get("/", &[]).await.status, 200);
    assert_eq!(s.exits[0].open_tunnels(), 2);
    // The lane stays busy with the first origin (bounded: 20 s).
    let deadline = Instant::now() + Duration::from_secs(20);
    while s.exits[0].open_tunnels() > 1 && Instant::now() < deadline {
        assert_eq!(busy.get("/", &[]).await.status, 200);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(s.exits[0].open_tunnels(), 1, "the idle connection stayed");
    s.stop().await;
}

/// Another HTTPS origin (HTTP/2 only, `200` to everything, with the test
/// origin's certificate), on a port of its own; it never closes an idle
/// connection. Ends with the test's runtime.
async fn h2_origin(pki: &support::origin::TestPki) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let tls = tokio_rustls::TlsAcceptor::from(pki.server_config(&[b"h2"]));
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let tls = tls.clone();
            tokio::spawn(async move {
                let Ok(stream) = tls.accept(tcp).await else {
                    return;
                };
                let service = hyper::service::service_fn(|_request| async {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(
                        http_body_util::Full::new(bytes::Bytes::from_static(b"ok")),
                    ))
                });
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
            });
        }
    });
    addr
}
