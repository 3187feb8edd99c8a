//! Limits and pacing: one client cannot starve the others (slowloris), a
//! client address is held to its connections and request rate, an identity
//! to its in-flight requests and its pace, and idle or slow connections end.
//!
//! Client addresses are distinct loopback sources (127.0.0.50, ...). Time
//! bounds are loose: they show order and spacing, never performance.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use support::client::read_head;
use support::{Jar, Setup};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::time::Instant;

/// A TCP connection to `proxy` from the loopback address `source`.
async fn connect_from(source: &str, proxy: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source.parse().unwrap(), 0))?;
    socket.connect(proxy).await
}

/// Sends one plain proxy GET on `tcp` and returns the response head.
async fn plain_get(tcp: &mut TcpStream, origin_port: u16, path: &str, extra: &str) -> String {
    let request = format!(
        "GET http://localhost:{origin_port}{path} HTTP/1.1\r\nHost: localhost:{origin_port}\r\n{extra}\r\n"
    );
    tcp.write_all(request.as_bytes()).await.unwrap();
    let head = tokio::time::timeout(Duration::from_secs(10), read_head(tcp))
        .await
        .expect("an answer");
    let length: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length: ")
                .map(|v| v.trim().to_owned())
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    tcp.read_exact(&mut body).await.unwrap();
    head
}

/// Sends a CONNECT to `host:port` on `tcp` and checks it is answered 200.
async fn open_tunnel(tcp: &mut TcpStream, host: &str, port: u16) {
    let connect = format!("CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n");
    tcp.write_all(connect.as_bytes()).await.unwrap();
    let head = tokio::time::timeout(Duration::from_secs(10), read_head(tcp))
        .await
        .unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{host}: {head}");
}

/// One exit, at most `connections` connections per client address.
async fn limited_per_client(connections: usize) -> Setup {
    Setup::builder()
        .exits(1)
        .config(|c| c.limits.max_connections_per_client = connections)
        .start()
        .await
}

/// A flood of connections over `limits.max_connections_per_client` from
/// one address holds a bounded number of the daemon's file descriptors:
/// each refusal holds its socket up to a second, and unbounded they would
/// take every descriptor the process may open (every client's accepts and
/// every upstream dial then fail). Past the bound they are closed
/// unanswered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_refused_connections_holds_few_descriptors() {
    let origin = support::Origin::start().await;
    let (_exits, exits) = support::exits(1).await;
    let dir = tempfile::tempdir().unwrap();
    let mut args = support::process_args(&origin, &exits);
    let config = dir.path().join("pinproxy.toml");
    std::fs::write(&config, "[limits]\nmax_connections_per_client = 1\n").unwrap();
    args.extend(["--config".to_owned(), config.display().to_string()]);
    let proxy = support::procs::PinproxyProcess::start(dir.path(), &args).await;
    // The one connection the address may have: a tunnel, opened.
    let mut held = TcpStream::connect(proxy.addr).await.unwrap();
    open_tunnel(&mut held, "localhost", origin.https.port()).await;
    let before = proxy.open_fds();

    // 400 more, all open at once, each read to its end (a 429 then the
    // close, or a close): by then the daemon has taken every one.
    let mut flood = Vec::new();
    for _ in 0..400 {
        flood.push(TcpStream::connect(proxy.addr).await.unwrap());
    }
    let mut answered = 0;
    for tcp in &mut flood {
        let mut reply = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut reply))
            .await
            .expect("each is answered or closed")
            .ok();
        if reply.starts_with(b"HTTP/1.1 429") {
            answered += 1;
        }
    }
    let held_fds = proxy.open_fds().saturating_sub(before);
    assert!(answered > 0, "none was answered 429");
    assert!(
        held_fds <= 64 + 8,
        "refusals held {held_fds} descriptors ({answered} answered)"
    );
    drop(flood);
    proxy.kill9().await;
}

/// Whether a new connection from `source` is refused at once for the
/// connection limits (`429 too-many-connections`).
async fn refused_for_connections(source: &str, proxy: SocketAddr) -> bool {
    let mut tcp = connect_from(source, proxy).await.unwrap();
    let head = tokio::time::timeout(Duration::from_secs(5), read_head(&mut tcp))
        .await
        .unwrap_or_default();
    head.starts_with("HTTP/1.1 429") && head.contains("too-many-connections")
}

/// Whether a new connection from `source` is served again within 50 tries
/// 50 ms apart (the daemon sees a connection's close shortly after it).
async fn admitted_again(source: &str, proxy: SocketAddr, port: u16) -> bool {
    for _ in 0..50 {
        let mut again = connect_from(source, proxy).await.unwrap();
        let reply = tokio::time::timeout(Duration::from_secs(5), async {
            let request =
                format!("GET http://localhost:{port}/again HTTP/1.1\r\nHost: localhost\r\n\r\n");
            again.write_all(request.as_bytes()).await.ok();
            read_head(&mut again).await
        })
        .await
        .unwrap();
        if reply.starts_with("HTTP/1.1 200") {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// Whether the peer closes `tcp` within `within`.
async fn closed_within(tcp: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let deadline = Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

/// A plain-HTTP origin that takes `delay` to answer and records when each
/// request arrived and how many were in progress at once.
struct SlowOrigin {
    addr: SocketAddr,
    arrivals: Arc<Mutex<Vec<(String, Instant)>>>,
    max_concurrent: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for SlowOrigin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl SlowOrigin {
    async fn start(delay: Duration) -> SlowOrigin {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let arrivals = Arc::new(Mutex::new(Vec::new()));
        let max_concurrent = Arc::new(AtomicUsize::new(0));
        let current = Arc::new(AtomicUsize::new(0));
        let (a, m) = (arrivals.clone(), max_concurrent.clone());
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (a, m, current) = (a.clone(), m.clone(), current.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |request: Request<Incoming>| {
                        let (a, m, current) = (a.clone(), m.clone(), current.clone());
                        async move {
                            let path = request.uri().path().to_owned();
                            a.lock().unwrap().push((path, Instant::now()));
                            let now = current.fetch_add(1, Ordering::SeqCst) + 1;
                            m.fetch_max(now, Ordering::SeqCst);
                            tokio::time::sleep(delay).await;
                            current.fetch_sub(1, Ordering::SeqCst);
                            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), service)
                        .await;
                });
            }
        });
        SlowOrigin {
            addr,
            arrivals,
            max_concurrent,
            task,
        }
    }

    fn arrivals(&self, prefix: &str) -> Vec<Instant> {
        let mut times: Vec<_> = self
            .arrivals
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, _)| p.starts_with(prefix))
            .map(|(_, t)| *t)
            .collect();
        times.sort();
        times
    }
}

/// GETs `path` of `origin` as a plain proxy request naming session `key`
/// (one identity), on a fresh connection; returns status and head.
async fn identity_get(proxy: SocketAddr, origin: SocketAddr, key: &str, path: String) -> String {
    let mut tcp = TcpStream::connect(proxy).await.unwrap();
    let head = plain_get(
        &mut tcp,
        origin.port(),
        &path,
        &format!("X-Pinproxy-Session: {key}\r\n"),
    )
    .await;
    head
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowloris_does_not_starve_a_well_behaved_client() {
    const ATTACKERS: usize = 500;
    const GOOD_REQUESTS: usize = 40;
    let s = Setup::builder()
        .exits(1)
        .config(|c| c.timeouts.header_read = Duration::from_secs(2))
        .start()
        .await;
    let proxy = s.proxy.daemon.local_addr();
    let origin_port = s.origin.http.port();
    // The attack goes on until the good client is done and every attacker
    // has been cut off once (a flag), and at most 90 s.
    let attack_ends = Instant::now() + Duration::from_secs(90);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let cut_off = Arc::new(AtomicUsize::new(0));
    let mut attackers = Vec::new();
    for _ in 0..ATTACKERS {
        let (cut_off, stop) = (cut_off.clone(), stop.clone());
        let attack_on = move || !stop.load(Ordering::Relaxed) && Instant::now() < attack_ends;
        attackers.push(tokio::spawn(async move {
            // Bounded: until the attack ends, reconnecting when cut off.
            while attack_on() {
                let Ok(mut tcp) = connect_from("127.0.0.50", proxy).await else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                let head = format!("GET http://localhost:{origin_port}/slow HTTP/1.1\r\nX-Slow: ");
                let mut bytes = head.into_bytes().into_iter().chain(std::iter::repeat(b'a'));
                while attack_on() {
                    let byte = [bytes.next().unwrap()];
                    if tcp.write_all(&byte).await.is_err() {
                        cut_off.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        }));
    }
    // Let the attack build up, then measure the good client during it.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut ok = 0;
    let started = Instant::now();
    for n in 0..GOOD_REQUESTS {
        let mut jar = Jar::default();
        let reply = tokio::time::timeout(
            Duration::from_secs(5),
            s.proxy.client.try_get(
                "localhost",
                s.origin.https.port(),
                &format!("/good/{n}"),
                &mut jar,
            ),
        )
        .await;
        if matches!(reply, Ok(Ok(ref r)) if r.status == 200) {
            ok += 1;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let during = started.elapsed();
    let attack_still_on = Instant::now() < attack_ends;
    // Every attacker cut off at least once (bounded by the attack's end).
    while cut_off.load(Ordering::Relaxed) < ATTACKERS && Instant::now() < attack_ends {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for attacker in attackers {
        attacker.await.unwrap();
    }
    let ratio = ok as f64 / GOOD_REQUESTS as f64;
    println!(
        "slowloris: {ATTACKERS} dribbling connections (cut off and reconnected {} times); \
         well-behaved client: {ok}/{GOOD_REQUESTS} requests succeeded ({:.1}%) over {:.1}s during the attack",
        cut_off.load(Ordering::Relaxed),
        ratio * 100.0,
        during.as_secs_f64()
    );
    assert!(
        attack_still_on,
        "the good client was measured during the attack"
    );
    assert!(ratio >= 0.95, "success ratio {ratio}");
    assert!(
        cut_off.load(Ordering::Relaxed) >= ATTACKERS,
        "dribbling heads are cut off after timeouts.header_read"
    );
    assert!(
        s.origin.seen().iter().all(|r| r.path != "/slow"),
        "no dribbled request was forwarded"
    );
    s.stop().await;
}

#[tokio::test]
async fn connections_per_client_address_are_limited() {
    let s = limited_per_client(2).await;
    let proxy = s.proxy.daemon.local_addr();
    let port = s.origin.http.port();
    let mut first = connect_from("127.0.0.60", proxy).await.unwrap();
    assert!(plain_get(&mut first, port, "/c1", "")
        .await
        .starts_with("HTTP/1.1 200"));
    let mut second = connect_from("127.0.0.60", proxy).await.unwrap();
    assert!(plain_get(&mut second, port, "/c2", "")
        .await
        .starts_with("HTTP/1.1 200"));

    // The third from the same address: 429 at once, closed, nothing read.
    let mut third = connect_from("127.0.0.60", proxy).await.unwrap();
    let head = tokio::time::timeout(Duration::from_secs(5), read_head(&mut third))
        .await
        .unwrap();
    assert!(head.starts_with("HTTP/1.1 429"), "{head}");
    assert!(
        head.contains("x-pinproxy-error: too-many-connections:"),
        "{head}"
    );
    assert!(head.contains("retry-after: 1"), "{head}");
    assert!(closed_within(&mut third, Duration::from_secs(5)).await);

    // Another address is not affected.
    let mut other = connect_from("127.0.0.61", proxy).await.unwrap();
    assert!(plain_get(&mut other, port, "/other", "")
        .await
        .starts_with("HTTP/1.1 200"));

    // A closed connection frees its place (the daemon sees the close
    // shortly after: bounded retries).
    drop(first);
    assert!(
        admitted_again("127.0.0.60", proxy, port).await,
        "a freed place is given to a new connection"
    );
    s.stop().await;
}

/// A tunnel is the connection that opened it: it keeps its place among the
/// connection limits while it is open, intercepted or passed through.
#[tokio::test]
async fn open_tunnels_count_against_the_connection_limit() {
    let s = Setup::builder()
        .exits(1)
        .config(|c| {
            c.limits.max_connections_per_client = 2;
            c.mitm.exclude = vec!["*.test".into()];
        })
        .start()
        .await;
    let proxy = s.proxy.daemon.local_addr();
    let port = s.origin.http.port();
    // One intercepted tunnel and one passed through, each used once and
    // held open.
    let mut tunnels = Vec::new();
    for host in ["localhost", "origin.test"] {
        let mut tcp = connect_from("127.0.0.63", proxy).await.unwrap();
        open_tunnel(&mut tcp, host, port).await;
        let inside = plain_get(&mut tcp, port, &format!("/in/{host}"), "").await;
        assert!(inside.starts_with("HTTP/1.1 200"), "{host}: {inside}");
        tunnels.push(tcp);
    }

    // A third connection from that address: refused while both are open.
    let mut third = connect_from("127.0.0.63", proxy).await.unwrap();
    let head = tokio::time::timeout(Duration::from_secs(5), read_head(&mut third))
        .await
        .unwrap();
    assert!(head.starts_with("HTTP/1.1 429"), "{head}");
    assert!(head.contains("too-many-connections"), "{head}");

    // Closing a tunnel gives its place back (the daemon sees the close
    // shortly after: bounded retries).
    drop(tunnels.pop());
    assert!(
        admitted_again("127.0.0.63", proxy, port).await,
        "a closed tunnel's place is given to a new connection"
    );
    s.stop().await;
}

/// A WebSocket is still the connection that opened its tunnel: the relay
/// keeps the connection's place once hyper has handed the stream over.
#[tokio::test]
async fn an_open_websocket_counts_against_the_connection_limit() {
    use futures_util::SinkExt;
    let s = limited_per_client(1).await;
    let proxy = s.proxy.daemon.local_addr();
    let mut ws = s.proxy.client.websocket(s.origin.https.port()).await;
    ws.send(tokio_tungstenite::tungstenite::Message::text("hello"))
        .await
        .unwrap();
    // Another connection from the WebSocket's address: refused while it
    // is open.
    assert!(
        refused_for_connections("127.0.0.1", proxy).await,
        "a second connection was served beside an open WebSocket"
    );
    // Closing it gives the place back.
    ws.close(None).await.unwrap();
    drop(ws);
    assert!(
        admitted_again("127.0.0.1", proxy, s.origin.http.port()).await,
        "a closed WebSocket's place is given to a new connection"
    );
    s.stop().await;
}

/// The same for a WebSocket asked of pinproxy as a plain HTTP proxy (an
/// absolute-form request, no tunnel): the relay keeps the connection's
/// place once the connection's own task has ended.
#[tokio::test]
async fn a_plain_proxied_websocket_counts_against_the_connection_limit() {
    let s = limited_per_client(1).await;
    let proxy = s.proxy.daemon.local_addr();
    let port = s.origin.http.port();
    let mut ws = connect_from("127.0.0.65", proxy).await.unwrap();
    let request = format!(
        "GET http://localhost:{port}/ws HTTP/1.1\r\nHost: localhost:{port}\r\n\
         Upgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    ws.write_all(request.as_bytes()).await.unwrap();
    let head = tokio::time::timeout(Duration::from_secs(10), read_head(&mut ws))
        .await
        .unwrap();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        refused_for_connections("127.0.0.65", proxy).await,
        "a second connection was served beside an open WebSocket"
    );
    drop(ws);
    assert!(
        admitted_again("127.0.0.65", proxy, port).await,
        "a closed WebSocket's place is given to a new connection"
    );
    s.stop().await;
}

#[tokio::test]
async fn requests_per_second_per_client_get_429_with_retry_after() {
    let s = Setup::builder()
        .exits(1)
        .config(|c| {
            c.limits.requests_per_second_per_client = 1;
            c.limits.requests_burst_per_client = 3;
        })
        .start()
        .await;
    let proxy = s.proxy.daemon.local_addr();
    let port = s.origin.http.port();
    let mut tcp = connect_from("127.0.0.70", proxy).await.unwrap();
    let mut statuses = Vec::new();
    for n in 0..4 {
        let head = plain_get(&mut tcp, port, &format!("/rate/{n}"), "").await;
        if n == 3 {
            assert!(head.contains("x-pinproxy-error: rate-limited:"), "{head}");
            let retry: u64 = head
                .lines()
                .find_map(|l| l.strip_prefix("retry-after: "))
                .expect("Retry-After")
                .trim()
                .parse()
                .unwrap();
            assert!((1..=2).contains(&retry), "{retry}");
        }
        statuses.push(head.lines().next().unwrap().to_owned());
    }
    println!("rate limit 1/s burst 3: {statuses:?}");
    assert!(statuses[..3].iter().all(|s| s.starts_with("HTTP/1.1 200")));
    assert!(statuses[3].starts_with("HTTP/1.1 429"));
    assert!(
        s.origin.seen().iter().all(|r| r.path != "/rate/3"),
        "the refused request was not forwarded"
    );

    // Inside a tunnel each request counts too (the CONNECT included), from
    // another address with its own bucket (this client's: 127.0.0.1).
    let mut tls = s
        .proxy
        .client
        .tls_stream("localhost", s.origin.https.port(), &[b"http/1.1"])
        .await;
    let mut statuses = Vec::new();
    for n in 0..3 {
        let request = format!(
            "GET /rate/tunnel/{n} HTTP/1.1\r\nHost: localhost:{}\r\n\r\n",
            s.origin.https.port()
        );
        tls.write_all(request.as_bytes()).await.unwrap();
        let head = read_tls_head(&mut tls).await;
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        let mut body = vec![0u8; length];
        tls.read_exact(&mut body).await.unwrap();
        statuses.push(head.lines().next().unwrap_or("").to_owned());
    }
    println!("in a tunnel (CONNECT + 3 requests, burst 3): {statuses:?}");
    assert!(statuses[..2].iter().all(|s| s.starts_with("HTTP/1.1 200")));
    assert!(statuses[2].starts_with("HTTP/1.1 429"), "{statuses:?}");
    s.stop().await;
}

/// Reads a response head from a TLS stream.
async fn read_tls_head<T: tokio::io::AsyncRead + Unpin>(io: &mut T) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match tokio::time::timeout(Duration::from_secs(10), io.read(&mut byte)).await {
            Ok(Ok(1)) => head.push(byte[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

#[tokio::test]
async fn an_identity_has_at_most_max_in_flight_requests_and_the_rest_queue() {
    let origin = SlowOrigin::start(Duration::from_millis(300)).await;
    let s = Setup::builder()
        .exits(1)
        .config(|c| {
            c.identities.max_in_flight = 1;
            c.identities.max_queue = 8;
            c.identities.queue_timeout = Duration::from_secs(20);
        })
        .start()
        .await;
    let proxy = s.proxy.daemon.local_addr();
    let tasks: Vec<_> = (0..3)
        .map(|n| {
            let addr = origin.addr;
            tokio::spawn(
                async move { identity_get(proxy, addr, "fleet-1", format!("/q/{n}")).await },
            )
        })
        .collect();
    for task in tasks {
        let head = task.await.unwrap();
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    }
    let arrivals = origin.arrivals("/q/");
    let gaps: Vec<_> = arrivals.windows(2).map(|w| w[1] - w[0]).collect();
    println!("max_in_flight 1, origin takes 300 ms: arrivals {gaps:?} apart");
    assert_eq!(arrivals.len(), 3);
    assert_eq!(
        origin.max_concurrent.load(Ordering::SeqCst),
        1,
        "one at a time"
    );
    // Loose: each waited for the one before to finish.
    assert!(
        gaps.iter().all(|g| *g >= Duration::from_millis(200)),
        "{gaps:?}"
    );
    s.stop().await;
}

#[tokio::test]
async fn an_identity_queue_is_bounded_in_length_and_time() {
    let origin = SlowOrigin::start(Duration::from_secs(2)).await;
    let s = Setup::builder()
        .exits(1)
        .config(|c| {
            c.identities.max_in_flight = 1;
            c.identities.max_queue = 1;
            c.identities.queue_timeout = Duration::from_millis(300);
        })
        .start()
        .await;
    let proxy = s.proxy.daemon.local_addr();
    // The first takes the slot (and the origin holds it 2 s).
    let first = tokio::spawn(identity_get(
        proxy,
        origin.addr,
        "fleet-2",
        "/b/first".into(),
    ));
    let deadline = Instant::now() + Duration::from_secs(5);
    while origin.arrivals("/b/first").is_empty() {
        assert!(Instant::now() < deadline, "the first request arrives");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // One waits in line and times out; one finds the line full.
    let waiting = tokio::spawn(identity_get(
        proxy,
        origin.addr,
        "fleet-2",
        "/b/waits".into(),
    ));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let full = identity_get(proxy, origin.addr, "fleet-2", "/b/full".into()).await;
    let waited = waiting.await.unwrap();
    for (what, head) in [("queue full", &full), ("queue timeout", &waited)] {
        println!("{what}: {}", head.lines().next().unwrap());
        assert!(head.starts_with("HTTP/1.1 429"), "{what}: {head}");
        assert!(head.contains("x-pinproxy-error: identity-busy:"), "{head}");
        assert!(head.contains("retry-after: "), "{head}");
    }
    assert!(first.await.unwrap().starts_with("HTTP/1.1 200"));
    assert!(origin.arrivals("/b/waits").is_empty() && origin.arrivals("/b/full").is_empty());
    s.stop().await;
}

#[tokio::test]
async fn pacing_spaces_an_identity_s_requests_at_the_origin() {
    let origin = SlowOrigin::start(Duration::ZERO).await;
    let s = Setup::builder()
        .exits(1)
        .config(|c| c.identities.min_interval = Duration::from_millis(300))
        .start()
        .await;
    let proxy = s.proxy.daemon.local_addr();
    // Four at once from one identity, and one from another identity.
    let tasks: Vec<_> = (0..4)
        .map(|n| tokio::spawn(identity_get(proxy, origin.addr, "paced", format!("/p/{n}"))))
        .collect();
    let other = identity_get(proxy, origin.addr, "someone-else", "/other/0".into()).await;
    assert!(other.starts_with("HTTP/1.1 200"));
    for task in tasks {
        assert!(task.await.unwrap().starts_with("HTTP/1.1 200"));
    }
    let arrivals = origin.arrivals("/p/");
    let gaps: Vec<_> = arrivals.windows(2).map(|w| w[1] - w[0]).collect();
    println!("min_interval 300 ms: the origin saw one identity's requests {gaps:?} apart");
    assert_eq!(arrivals.len(), 4);
    assert!(
        gaps.iter().all(|g| *g >= Duration::from_millis(250)),
        "{gaps:?}"
    );
    s.stop().await;
}

#[tokio::test]
async fn an_idle_http2_connection_is_closed_but_not_while_a_stream_is_open() {
    let s = Setup::builder()
        .exits(1)
        .config(|c| c.timeouts.client_idle = Duration::from_millis(600))
        .start()
        .await;
    let port = s.origin.https.port();
    // Idle after a request: closed (GOAWAY) within the limit and a quarter.
    let mut idle = s.proxy.client.tunnel_h2("localhost", port).await;
    assert_eq!(idle.get("/", &[]).await.status, 200);
    let started = Instant::now();
    assert!(idle.closed_within(Duration::from_secs(5)).await);
    println!(
        "an idle HTTP/2 connection was closed {:?} after its last answer (client_idle 600 ms)",
        started.elapsed()
    );
    // A connection that never sent a request is closed too.
    let silent = s.proxy.client.tunnel_h2("localhost", port).await;
    assert!(silent.closed_within(Duration::from_secs(5)).await);
    // So is one whose client sends only PINGs (every 100 ms, while idle):
    // frames that carry no request are not activity.
    let mut pings = hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
    pings
        .timer(hyper_util::rt::TokioTimer::new())
        .keep_alive_interval(Duration::from_millis(100))
        .keep_alive_while_idle(true);
    let pinging = s
        .proxy
        .client
        .tunnel_h2_with("localhost", port, &pings)
        .await;
    assert!(pinging.closed_within(Duration::from_secs(5)).await);
    // A response whose body takes 2 s (past the limit, with the client
    // sending nothing meanwhile) holds the connection open: the next
    // request goes on it (after a GOAWAY it could not).
    let mut busy = s.proxy.client.tunnel_h2("localhost", port).await;
    let reply = busy.get("/pause?head_ms=0&body_ms=2000", &[]).await;
    assert_eq!((reply.status.as_u16(), reply.body.as_str()), (200, "ab"));
    assert_eq!(busy.get("/", &[]).await.status, 200);
    assert!(busy.closed_within(Duration::from_secs(5)).await);
    s.stop().await;
}

#[tokio::test]
async fn idle_and_slow_client_connections_are_closed() {
    let s = Setup::builder()
        .exits(1)
        .config(|c| {
            c.timeouts.client_idle = Duration::from_millis(600);
            c.timeouts.header_read = Duration::from_millis(600);
        })
        .start()
        .await;
    let proxy = s.proxy.daemon.local_addr();
    let port = s.origin.http.port();
    // Idle after a request: closed after client_idle.
    let mut idle = TcpStream::connect(proxy).await.unwrap();
    assert!(plain_get(&mut idle, port, "/idle", "")
        .await
        .starts_with("HTTP/1.1 200"));
    assert!(closed_within(&mut idle, Duration::from_secs(5)).await);
    // And in an intercepted tunnel (plain HTTP inside), which would park
    // only after a second: the idle limit comes first.
    let mut tunnel = TcpStream::connect(proxy).await.unwrap();
    open_tunnel(&mut tunnel, "localhost", port).await;
    let inside = plain_get(&mut tunnel, port, "/idle-in-tunnel", "").await;
    assert!(inside.starts_with("HTTP/1.1 200"), "{inside}");
    let started = Instant::now();
    assert!(closed_within(&mut tunnel, Duration::from_secs(5)).await);
    println!(
        "an idle tunnel was closed {:?} after its last answer (client_idle 600 ms)",
        started.elapsed()
    );
    s.stop().await;

    // A head started and stalled: closed after header_read, long before
    // the (much longer) idle limit.
    let s = Setup::builder()
        .exits(1)
        .config(|c| {
            c.timeouts.client_idle = Duration::from_secs(60);
            c.timeouts.header_read = Duration::from_millis(500);
        })
        .start()
        .await;
    let proxy = s.proxy.daemon.local_addr();
    let mut slow = TcpStream::connect(proxy).await.unwrap();
    let started = Instant::now();
    slow.write_all(b"GET http://localhost/ HTTP/1.1\r\nX-Sl")
        .await
        .unwrap();
    assert!(closed_within(&mut slow, Duration::from_secs(10)).await);
    let took = started.elapsed();
    println!("a stalled head was cut off after {took:?} (header_read 500 ms, client_idle 60 s)");
    assert!(took < Duration::from_secs(10));
    // Empty lines before a request line begin its head: a lone CR, or a
    // CRLF now and then, does not hold the connection until client_idle.
    for (prelude, pings) in [(&b"\r"[..], 0), (&b"\r\n"[..], 3)] {
        let mut blank = TcpStream::connect(proxy).await.unwrap();
        blank.write_all(prelude).await.unwrap();
        for _ in 0..pings {
            // Each within header_read of the last: only the first counts.
            tokio::time::sleep(Duration::from_millis(200)).await;
            if blank.write_all(b"\r\n").await.is_err() {
                break;
            }
        }
        assert!(closed_within(&mut blank, Duration::from_secs(10)).await);
    }
    // An idle connection that has sent nothing is kept (client_idle).
    let mut quiet = TcpStream::connect(proxy).await.unwrap();
    assert!(!closed_within(&mut quiet, Duration::from_secs(1)).await);
    s.stop().await;
}
