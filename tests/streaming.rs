//! Bodies stream through in both directions without being collected: whole
//! uploads in tunnels and plain requests, and a gibibyte each way in bounded
//! memory.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support;

use std::sync::atomic::Ordering;

use bytes::Bytes;
use http_body::Frame;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper_util::rt::TokioIo;
use support::procs::PinproxyProcess;
use support::{Origin, ProxyClient, Setup};

const GIB: usize = 1 << 30;

#[tokio::test]
async fn uploads_reach_the_origin_whole_in_tunnels_and_plain() {
    let s = Setup::start(2).await;
    let (origin, proxy) = (&s.origin, &s.proxy);
    let body = Bytes::from(vec![b'x'; 8 * 1024 * 1024 + 3]);

    for plain in [false, true] {
        let mut conn = if plain {
            proxy.client.plain("localhost", origin.http.port()).await
        } else {
            proxy.client.tunnel("localhost", origin.https.port()).await
        };
        for _ in 0..2 {
            let request = conn
                .request("POST", "/sink")
                .body(Full::new(body.clone()))
                .unwrap();
            let reply = conn.send(request).await.unwrap();
            assert_eq!(reply.status, 200);
            assert_eq!(reply.body.trim(), (8 * 1024 * 1024 + 3).to_string());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gibibyte_each_way_streams_through_in_bounded_memory() {
    let origin = Origin::start().await;
    let (_exits, exits) = support::exits(1).await;
    let dir = tempfile::tempdir().unwrap();
    let args = support::process_args(&origin, &exits);
    let proxy = PinproxyProcess::start(dir.path(), &args).await;
    let client = ProxyClient::new(proxy.addr, &proxy.ca_pem());
    let port = origin.https.port();
    let idle_rss = proxy.peak_rss_kib();

    // Upload: 1 GiB generated as it is sent.
    let tls = client.tls_stream("localhost", port, &[b"http/1.1"]).await;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    static CHUNK: [u8; 64 * 1024] = [b'u'; 64 * 1024];
    let chunks = (0..GIB / CHUNK.len())
        .map(|_| Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from_static(&CHUNK))));
    let upload = http::Request::post("/sink")
        .header("host", format!("localhost:{port}"))
        .body(StreamBody::new(futures_util::stream::iter(chunks)))
        .unwrap();
    let response = sender.send_request(upload).await.unwrap();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(String::from_utf8_lossy(&body).trim(), GIB.to_string());
    let after_upload = proxy.peak_rss_kib();

    // Download: 1 GiB counted as it arrives.
    let tls = client.tls_stream("localhost", port, &[b"http/1.1"]).await;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake::<_, http_body_util::Empty<Bytes>>(TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let download = http::Request::get(format!("/bytes?n={GIB}"))
        .header("host", format!("localhost:{port}"))
        .body(http_body_util::Empty::new())
        .unwrap();
    let mut body = sender.send_request(download).await.unwrap().into_body();
    let mut received = 0usize;
    while let Some(frame) = body.frame().await {
        received += frame.unwrap().data_ref().map_or(0, |d| d.len());
    }
    assert_eq!(received, GIB);
    let peak = proxy.peak_rss_kib();
    eprintln!("pinproxy peak RSS: idle {idle_rss} KiB, after 1 GiB up {after_upload} KiB, after 1 GiB down {peak} KiB");
    assert!(
        peak < 96 * 1024,
        "peak RSS {peak} KiB: bodies are not streamed"
    );
    proxy.kill9().await;
}

/// A stream whose reads stop, for good, once `stopped` is set (its writes
/// go on): a client that sent its requests and no longer reads the socket.
struct StopsReading<S> {
    inner: S,
    stopped: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for StopsReading<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.stopped.load(std::sync::atomic::Ordering::Relaxed) {
            return std::task::Poll::Pending;
        }
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for StopsReading<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// An HTTP/2 client on `tls` offering 16 MiB a stream and a gibibyte in
/// all, which stops reading once the flag returned is set; with the task
/// driving its connection.
async fn greedy_h2_client<S>(
    tls: S,
) -> (
    hyper::client::conn::http2::SendRequest<http_body_util::Empty<Bytes>>,
    std::sync::Arc<std::sync::atomic::AtomicBool>,
    tokio::task::JoinHandle<Result<(), hyper::Error>>,
)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let stopped = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let io = StopsReading {
        inner: tls,
        stopped: stopped.clone(),
    };
    let (sender, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .initial_stream_window_size(16 << 20)
            .initial_connection_window_size(1 << 30)
            .handshake::<_, http_body_util::Empty<Bytes>>(TokioIo::new(io))
            .await
            .unwrap();
    (sender, stopped, tokio::spawn(conn))
}

/// An HTTP/2 client that offers a gibibyte of window, asks for 128 large
/// answers and stops reading holds a bounded amount of pinproxy's memory:
/// each stream's answer waits in pinproxy up to a small buffer (64 KiB;
/// hyper's default would hold 400 KiB a stream, 50 MiB here), the rest in
/// the origin's window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_client_that_stops_reading_holds_bounded_memory() {
    let origin = Origin::start().await;
    let (_exits, exits) = support::exits(1).await;
    let dir = tempfile::tempdir().unwrap();
    let mut args = support::process_args(&origin, &exits);
    // The upstream connection with hyper's own windows (5 MiB), not the
    // client's 1 GiB mirrored (capped at 64 MiB: what an origin may send
    // before pinproxy reads it, which the client's window vouches for).
    let config = dir.path().join("pinproxy.toml");
    std::fs::write(&config, "[upstream]\nfingerprint = \"rustls\"\n").unwrap();
    args.extend(["--config".to_owned(), config.display().to_string()]);
    let proxy = PinproxyProcess::start(dir.path(), &args).await;
    let client = ProxyClient::new(proxy.addr, &proxy.ca_pem());
    let port = origin.https.port();
    let before = proxy.peak_rss_kib();

    let tls = client.tls_stream("localhost", port, &[b"h2"]).await;
    let (mut sender, stopped, driver) = greedy_h2_client(tls).await;
    let mut asked = Vec::new();
    for _ in 0..128 {
        let request = http::Request::get(format!("https://localhost:{port}/bytes?n={}", 64 << 20))
            .body(http_body_util::Empty::new())
            .unwrap();
        asked.push(tokio::spawn(sender.send_request(request)));
    }
    // Once pinproxy has read them all (its server reads no more frames
    // while its writes wait), the client reads nothing more.
    origin
        .wait_for_many(&format!("/bytes?n={}", 64 << 20), 128)
        .await;
    stopped.store(true, std::sync::atomic::Ordering::Relaxed);
    // pinproxy's buffers are full once the origin hands its connections
    // no more bytes (pinproxy stopped reading them): read until the count
    // stands still across a reading (bounded: 80 readings, 250 ms apart).
    let mut streamed = origin.bytes_streamed();
    for _ in 0..80 {
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        let now = origin.bytes_streamed();
        if now == streamed {
            break;
        }
        streamed = now;
    }
    let peak = proxy.peak_rss_kib();
    let grown = peak.saturating_sub(before);
    eprintln!("pinproxy peak RSS grew {grown} KiB for 128 stalled HTTP/2 answers");
    assert!(
        grown < 40 * 1024,
        "a stalled HTTP/2 client made pinproxy hold {grown} KiB"
    );
    driver.abort();
    for request in asked {
        request.abort();
    }
    proxy.kill9().await;
}

/// One of pinproxy's counters of abandoned answers (`why`), 0 before any.
async fn abandoned(s: &Setup, why: &str) -> u64 {
    let addr = s.proxy.daemon.admin_addr().unwrap();
    let text = support::admin::get(addr, "/metrics").await;
    let name = format!("pinproxy_answers_abandoned_total{{why=\"{why}\"}} ");
    text.lines()
        .find_map(|line| line.strip_prefix(&name))
        .map_or(0, |v| v.trim().parse::<f64>().unwrap() as u64)
}

/// Waits (at most 30 s) until pinproxy has abandoned `n` answers for `why`.
async fn wait_for_abandoned(s: &Setup, why: &str, n: u64) {
    for _ in 0..300 {
        if abandoned(s, why).await >= n {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!(
        "pinproxy abandoned {} answers for {why} in 30 s, not {n}",
        abandoned(s, why).await
    );
}

/// An answer its client takes nothing of for `timeouts.client_stall` is
/// abandoned (the origin's side no longer fills pinproxy's memory, nor
/// holds an exit's connection), and its client, reading again, finds it
/// cut short; an origin that is slow to send is no stall.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_its_client_takes_nothing_of_for_the_stall_limit_is_abandoned() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = Setup::start_with(1, |c| {
        c.timeouts.client_stall = std::time::Duration::from_secs(2);
        c.limits.max_unread_bytes = 0;
    })
    .await;
    let port = s.origin.https.port();

    // The origin sends "a", then "b" four seconds later: pinproxy asks for
    // the rest all along, so the client is not stalling.
    let mut conn = s.proxy.client.tunnel("localhost", port).await;
    let reply = conn.get("/pause?body_ms=4000", &[]).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body, "ab");
    assert_eq!(abandoned(&s, "stall").await, 0);

    let mut tls = s
        .proxy
        .client
        .tls_stream("localhost", port, &[b"http/1.1"])
        .await;
    let n: u64 = 1 << 30;
    tls.write_all(
        format!("GET /bytes?n={n} HTTP/1.1\r\nHost: localhost:{port}\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut first = vec![0u8; 1 << 20];
    tls.read_exact(&mut first).await.unwrap();
    assert!(first.starts_with(b"HTTP/1.1 200"));
    // The client reads nothing more until pinproxy has given up.
    wait_for_abandoned(&s, "stall", 1).await;
    let mut rest = 0u64;
    let mut buf = vec![0u8; 1 << 16];
    let ended = tokio::time::timeout(std::time::Duration::from_secs(30), async {
        loop {
            match tls.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(read) => rest += read as u64,
            }
        }
    })
    .await;
    assert!(
        ended.is_ok(),
        "the abandoned answer's connection stayed open"
    );
    assert!(
        (first.len() as u64) + rest < n,
        "the whole answer arrived after it was abandoned"
    );
}

/// pinproxy's gauge of what answers behind their origins count against
/// the unread budget.
async fn unread_bytes(s: &Setup) -> u64 {
    let addr = s.proxy.daemon.admin_addr().unwrap();
    let text = support::admin::get(addr, "/metrics").await;
    text.lines()
        .find_map(|line| line.strip_prefix("pinproxy_answers_unread_bytes "))
        .map(|v| v.trim().parse::<f64>().unwrap() as u64)
        .expect("the unread gauge")
}

/// Waits (at most 30 s) until the unread gauge reads `bytes`.
async fn wait_for_unread_bytes(s: &Setup, bytes: u64) {
    for _ in 0..300 {
        if unread_bytes(s).await == bytes {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!(
        "the unread gauge reads {}, not {bytes}",
        unread_bytes(s).await
    );
}

/// HTTP/2 answers their client stopped reading count their upstream
/// windows (here the client's own 16 MiB, mirrored; each answer on its own
/// identity) against `limits.max_unread_bytes`: the first fits, the three
/// past it are abandoned at once, long before the stall limit, and the
/// count is given back when the client goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_answers_past_the_unread_budget_are_abandoned() {
    let s = Setup::start_with(1, |c| {
        c.limits.max_unread_bytes = 24 << 20;
    })
    .await;
    let port = s.origin.https.port();
    let tls = s.proxy.client.tls_stream("localhost", port, &[b"h2"]).await;
    let (mut sender, stopped, driver) = greedy_h2_client(tls).await;
    let path = format!("/bytes?n={}", 256 << 20);
    let mut asked = Vec::new();
    for k in 0..4 {
        let request = http::Request::get(format!("https://localhost:{port}{path}"))
            .header("x-pinproxy-session", format!("k{k}"))
            .body(http_body_util::Empty::new())
            .unwrap();
        asked.push(tokio::spawn(sender.send_request(request)));
    }
    s.origin.wait_for_many(&path, 4).await;
    stopped.store(true, std::sync::atomic::Ordering::Relaxed);
    wait_for_abandoned(&s, "unread-budget", 3).await;
    wait_for_unread_bytes(&s, 16 << 20).await;
    assert_eq!(abandoned(&s, "unread-budget").await, 3);
    assert_eq!(abandoned(&s, "stall").await, 0);
    driver.abort();
    for request in asked {
        request.abort();
    }
    wait_for_unread_bytes(&s, 0).await;
}

/// A client that reads a trickle (a frame every 50 ms, its stream windows
/// 64 KiB, mirrored) lets pinproxy write to it all along, so it never
/// stalls; but its origins are never the slower side, so each answer holds
/// its window in pinproxy and counts it: past the budget (one window and a
/// half) the others are abandoned, and the one counted goes on. Once its
/// client reads as fast as it can, its origin is the slower side again
/// and the count is given back, the answer still going.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_answers_read_a_trickle_count_against_the_unread_budget() {
    let s = Setup::start_with(1, |c| {
        c.limits.max_unread_bytes = 100_000;
    })
    .await;
    let port = s.origin.https.port();
    let mut builder =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
    builder
        .initial_stream_window_size(65_535)
        .initial_connection_window_size(1 << 30);
    let mut conn = s
        .proxy
        .client
        .tunnel_h2_with("localhost", port, &builder)
        .await;
    let path = format!("/bytes?n={}", 256 << 20);
    let mut readers = Vec::new();
    let fast = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for k in 0..4 {
        let request = http::Request::get(format!("https://localhost:{port}{path}"))
            .header("x-pinproxy-session", format!("t{k}"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let response = conn.sender().send_request(request).await.unwrap();
        assert_eq!(response.status(), 200);
        let mut body = response.into_body();
        let (fast, stop) = (fast.clone(), stop.clone());
        // Bounded: 600 frames 50 ms apart (30 s), then as fast as it can
        // for 30 s at most; answers the body if it is still going.
        readers.push(tokio::spawn(async move {
            for _ in 0..600 {
                if fast.load(Ordering::Relaxed) {
                    break;
                }
                body.frame().await?.ok()?;
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            let until = std::time::Instant::now() + std::time::Duration::from_secs(30);
            while !stop.load(Ordering::Relaxed) && std::time::Instant::now() < until {
                body.frame().await?.ok()?;
            }
            Some(body)
        }));
    }
    wait_for_abandoned(&s, "unread-budget", 3).await;
    wait_for_unread_bytes(&s, 65_535).await;
    assert_eq!(abandoned(&s, "unread-budget").await, 3);
    assert_eq!(abandoned(&s, "stall").await, 0);
    fast.store(true, Ordering::Relaxed);
    wait_for_unread_bytes(&s, 0).await;
    stop.store(true, Ordering::Relaxed);
    let mut going = 0;
    for reader in readers {
        going += usize::from(reader.await.unwrap().is_some());
    }
    assert_eq!(
        going, 1,
        "the answer counted was still going when given back"
    );
    assert_eq!(abandoned(&s, "unread-budget").await, 3);
}

/// An identity whose answer was abandoned for its stalled client gets its
/// in-flight place back at once (`identities.max_in_flight = 1` here):
/// the client's side of that answer, which holds the place, may stay until
/// the client reads again, and the identity's next request would wait in
/// line behind it, then be refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_answer_gives_its_identitys_place_back() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = Setup::start_with(1, |c| {
        c.timeouts.client_stall = std::time::Duration::from_secs(2);
        c.limits.max_unread_bytes = 0;
        c.identities.max_in_flight = 1;
        c.identities.queue_timeout = std::time::Duration::from_secs(5);
    })
    .await;
    let (mut jar, peer) = s.login("/login").await;
    let port = s.origin.https.port();
    let mut tls = s
        .proxy
        .client
        .tls_stream("localhost", port, &[b"http/1.1"])
        .await;
    let cookies = jar.header().unwrap();
    let head = format!(
        "GET /bytes?n={} HTTP/1.1\r\nHost: localhost:{port}\r\nCookie: {cookies}\r\n\r\n",
        1u64 << 30
    );
    tls.write_all(head.as_bytes()).await.unwrap();
    let mut first = vec![0u8; 1 << 20];
    tls.read_exact(&mut first).await.unwrap();
    assert!(first.starts_with(b"HTTP/1.1 200"));
    // The client reads nothing more.
    wait_for_abandoned(&s, "stall", 1).await;
    let reply = s.get("/page", &mut jar).await;
    assert_eq!(
        (reply.status.as_u16(), Setup::peer(&reply)),
        (200, Some(peer)),
        "{}",
        reply.body
    );
    drop(tls);
}
