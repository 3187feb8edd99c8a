//! A request the origin never answered, on a connection that had been idle
//! (the origin's keep-alive timeout closing it as the request leaves, or an
//! HTTP/2 stream it refused), is sent again once, as a browser sends it
//! again, through the same exit; one that may have been acted on (a POST),
//! one with a body, and one on a connection dialled for it are answered
//! `502` as before.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support;

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use pinproxy::upstream::FingerprintMode;
use support::Setup;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Longer than pinproxy's threshold for a connection to count as idle
/// (100 ms), shorter than the second after which it parks: the request
/// goes out on the live idle connection.
const IDLE: Duration = Duration::from_millis(300);

/// How many requests pinproxy sent again, from its metrics.
fn replayed(s: &Setup) -> u64 {
    let metrics = s.proxy.daemon.admin().metrics.encode();
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("pinproxy_upstream_requests_replayed_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no replay counter in {metrics}"))
}

/// `method path` with `body` and the test's tracked cookie.
async fn send_with_cookie(
    tunnel: &mut support::client::Conn,
    method: &str,
    path: &str,
    body: &'static [u8],
) -> support::client::Reply {
    let request = tunnel
        .request(method, path)
        .header("cookie", "datadome=replay-token")
        .body(Full::new(Bytes::from_static(body)))
        .unwrap();
    tunnel.send(request).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_the_origin_closed_its_idle_connection_on_is_sent_again_once() {
    let s = Setup::builder().exits(2).start().await;
    let origin = ClosingOrigin::start(&s.origin.pki).await;
    let mut tunnel = s.proxy.client.tunnel("localhost", origin.port).await;
    let jar = [("cookie", "datadome=replay-token")];
    let status = |reply: &support::client::Reply| (reply.status.as_u16(), reply.pinproxy_error());

    // The first request dials; the second finds that connection idle, and
    // the origin closes it on reading the request: sent again on a new one.
    let first = tunnel.get("/a", &jar).await;
    assert_eq!(status(&first), (200, None));
    tokio::time::sleep(IDLE).await;
    let second = tunnel.get("/b", &jar).await;
    assert_eq!(status(&second), (200, None));
    assert_eq!(origin.paths(), ["/a", "/b", "/b"]);
    assert_eq!(origin.accepted(), 2);
    assert_eq!(replayed(&s), 1);

    // A POST (the origin may have acted on it) is not sent again.
    tokio::time::sleep(IDLE).await;
    let post = send_with_cookie(&mut tunnel, "POST", "/c", b"").await;
    assert_eq!(post.status, 502, "{:?}", post.pinproxy_error());
    assert_eq!(origin.count("/c"), 1);

    // Nor is a request with a body (it streamed once).
    assert_eq!(status(&tunnel.get("/d", &jar).await), (200, None));
    tokio::time::sleep(IDLE).await;
    let put = send_with_cookie(&mut tunnel, "PUT", "/e", b"x").await;
    assert_eq!(put.status, 502, "{:?}", put.pinproxy_error());
    assert_eq!(origin.count("/e"), 1);

    // Nor one the origin began to answer before it closed: it read it.
    assert_eq!(status(&tunnel.get("/g", &jar).await), (200, None));
    tokio::time::sleep(IDLE).await;
    let hinted = tunnel.get("/hints", &jar).await;
    assert_eq!(hinted.status, 502, "{:?}", hinted.pinproxy_error());
    assert_eq!(origin.count("/hints"), 1);

    // Once only: a request the new connection fails too is answered 502,
    // and one on a connection dialled for it is not sent again at all.
    assert_eq!(status(&tunnel.get("/f", &jar).await), (200, None));
    tokio::time::sleep(IDLE).await;
    let twice = tunnel.get("/close", &jar).await;
    assert_eq!(twice.status, 502, "{:?}", twice.pinproxy_error());
    assert_eq!(origin.count("/close"), 2);
    let dialled = tunnel.get("/close", &jar).await;
    assert_eq!(dialled.status, 502, "{:?}", dialled.pinproxy_error());
    assert_eq!(origin.count("/close"), 3);
    assert_eq!(replayed(&s), 2);

    // Every attempt, the replays too, left through the cookie's exit.
    let peers = origin.peers();
    assert!(peers.windows(2).all(|w| w[0] == w[1]), "{peers:?}");
    s.stop().await;
}

/// An HTTPS origin (HTTP/1.1) that answers the first request on each
/// connection (`200 ok`, kept alive) and closes the connection on reading
/// any later one, as an origin's keep-alive timeout does when it meets a
/// request (a later `/hints` after sending `103 Early Hints`); `/close` it
/// closes on at once. It records each request's path
/// and the address it came from.
struct ClosingOrigin {
    port: u16,
    seen: Arc<Mutex<Vec<(String, IpAddr)>>>,
    accepted: Arc<Mutex<usize>>,
    task: tokio::task::JoinHandle<()>,
}

impl ClosingOrigin {
    async fn start(pki: &support::origin::TestPki) -> ClosingOrigin {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let tls = tokio_rustls::TlsAcceptor::from(pki.server_config(&[b"http/1.1"]));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let accepted = Arc::new(Mutex::new(0));
        let (seen_by_task, accepted_by_task) = (seen.clone(), accepted.clone());
        let task = tokio::spawn(async move {
            while let Ok((tcp, peer)) = listener.accept().await {
                *accepted_by_task.lock().unwrap() += 1;
                let (tls, seen) = (tls.clone(), seen_by_task.clone());
                tokio::spawn(async move {
                    let Ok(stream) = tls.accept(tcp).await else {
                        return;
                    };
                    ClosingOrigin::serve(stream, peer.ip(), seen).await;
                });
            }
        });
        ClosingOrigin {
            port,
            seen,
            accepted,
            task,
        }
    }

    /// One connection: its first request answered (unless `/close`), the
    /// connection closed on reading any other.
    async fn serve<S>(mut stream: S, peer: IpAddr, seen: Arc<Mutex<Vec<(String, IpAddr)>>>)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let mut pending = Vec::new();
        let mut chunk = [0u8; 4096];
        let mut answered = false;
        // Bounded: two requests at most per connection.
        for _ in 0..1_000 {
            if let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&pending[..end]).into_owned();
                pending.drain(..end + 4);
                let path = head.split(' ').nth(1).unwrap_or_default().to_owned();
                seen.lock().unwrap().push((path.clone(), peer));
                if answered && path == "/hints" {
                    // It began to answer: it read the request.
                    let hints = b"HTTP/1.1 103 Early Hints\r\nlink: </s.css>\r\n\r\n";
                    let _ = stream.write_all(hints).await;
                    let _ = stream.flush().await;
                    return;
                }
                if answered || path == "/close" {
                    return;
                }
                answered = true;
                let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                if stream.write_all(answer).await.is_err() || stream.flush().await.is_err() {
                    return;
                }
                continue;
            }
            match stream.read(&mut chunk).await {
                Ok(n) if n > 0 => pending.extend_from_slice(&chunk[..n]),
                _ => return,
            }
        }
    }

    fn paths(&self) -> Vec<String> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .map(|(p, _)| p.clone())
            .collect()
    }

    fn count(&self, path: &str) -> usize {
        self.paths().iter().filter(|p| *p == path).count()
    }

    fn peers(&self) -> Vec<IpAddr> {
        self.seen.lock().unwrap().iter().map(|(_, p)| *p).collect()
    }

    fn accepted(&self) -> usize {
        *self.accepted.lock().unwrap()
    }
}

impl Drop for ClosingOrigin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The streams of a burst on an HTTP/2 connection no request had taken
/// for a sweep's interval, which the origin refused (`REFUSED_STREAM`: not
/// processed), are each sent again on that connection; GETs whose
/// connection the origin closed (after a `GOAWAY`) before answering go on
/// a new connection. In either fingerprint mode (each speaks HTTP/2
/// through a stack of its own).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_http2_streams_are_sent_again_in_either_mode() {
    let cases = [
        (FingerprintMode::Mirror, Refusal::Stream),
        (FingerprintMode::Rustls, Refusal::Stream),
        (FingerprintMode::Mirror, Refusal::GoAwayAndClose),
        (FingerprintMode::Rustls, Refusal::GoAwayAndClose),
    ];
    for (mode, refusal) in cases {
        let case = format!("{mode:?}, {refusal:?}");
        let s = Setup::builder()
            .exits(1)
            .config(|c| c.upstream.fingerprint = mode)
            .start()
            .await;
        let origin = RefusingH2Origin::start(&s.origin.pki, refusal).await;
        let mut tunnel = s.proxy.client.tunnel_h2("localhost", origin.port).await;
        let first = tunnel.get("/a", &[]).await;
        assert_eq!(first.status, 200, "{case}: {:?}", first.pinproxy_error());
        // Long enough for a sweep (every second) to find the connection
        // untaken for a whole interval.
        tokio::time::sleep(Duration::from_millis(2_500)).await;
        // Two at once: the origin turns both down once both have come.
        let sender = tunnel.sender().clone();
        let get = |path: &str| {
            let request = http::Request::get(format!("https://localhost:{}{path}", origin.port))
                .body(Full::default())
                .unwrap();
            sender.clone().send_request(request)
        };
        let (b, c) = tokio::join!(get("/b"), get("/c"));
        for reply in [b, c] {
            let reply = reply.unwrap();
            let error = reply.headers().get("x-pinproxy-error").cloned();
            assert_eq!(reply.status(), 200, "{case}: {error:?}");
        }
        assert_eq!(origin.streams(), 5, "{case}");
        let connections = match refusal {
            Refusal::Stream => 1,
            Refusal::GoAwayAndClose => 2,
        };
        assert_eq!(origin.accepted(), connections, "{case}");
        assert_eq!(replayed(&s), 2, "{case}");
        s.stop().await;
    }
}

/// How [`RefusingH2Origin`] turns down the second stream of a connection.
#[derive(Debug, Clone, Copy)]
enum Refusal {
    /// `RST_STREAM` with `REFUSED_STREAM`; the connection goes on.
    Stream,
    /// `GOAWAY` (naming the stream among those it took), then the
    /// connection closes before an answer: to pinproxy a broken connection,
    /// as when an origin's idle timeout meets the request.
    GoAwayAndClose,
}

/// An HTTPS origin speaking HTTP/2 only that turns down the second and
/// third streams of its first connection (see [`Refusal`]) once both have
/// come, and answers every other stream `200 ok`.
struct RefusingH2Origin {
    port: u16,
    streams: Arc<Mutex<usize>>,
    accepted: Arc<Mutex<usize>>,
    task: tokio::task::JoinHandle<()>,
}

impl RefusingH2Origin {
    async fn start(pki: &support::origin::TestPki, refusal: Refusal) -> RefusingH2Origin {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let tls = tokio_rustls::TlsAcceptor::from(pki.server_config(&[b"h2"]));
        let streams = Arc::new(Mutex::new(0));
        let accepted = Arc::new(Mutex::new(0));
        let (streams_by_task, accepted_by_task) = (streams.clone(), accepted.clone());
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                *accepted_by_task.lock().unwrap() += 1;
                let first = *accepted_by_task.lock().unwrap() == 1;
                let (tls, streams) = (tls.clone(), streams_by_task.clone());
                tokio::spawn(async move {
                    let Ok(stream) = tls.accept(tcp).await else {
                        return;
                    };
                    let Ok(mut conn) = h2::server::handshake(stream).await else {
                        return;
                    };
                    let mut on_this = 0;
                    let mut turned_down = Vec::new();
                    // Bounded: a test opens a few streams.
                    for _ in 0..100 {
                        let Some(Ok((_request, respond))) = conn.accept().await else {
                            return;
                        };
                        *streams.lock().unwrap() += 1;
                        on_this += 1;
                        if first && (on_this == 2 || on_this == 3) {
                            turned_down.push(respond);
                            if on_this == 2 {
                                continue;
                            }
                            match refusal {
                                Refusal::Stream => {
                                    for mut respond in turned_down.drain(..) {
                                        respond.send_reset(h2::Reason::REFUSED_STREAM);
                                    }
                                }
                                // Driven on until the GOAWAY is out and the
                                // connection closes (bounded by the loop).
                                Refusal::GoAwayAndClose => {
                                    conn.abrupt_shutdown(h2::Reason::NO_ERROR);
                                    turned_down.clear();
                                }
                            }
                            continue;
                        }
                        let mut respond = respond;
                        let Ok(mut body) = respond.send_response(http::Response::new(()), false)
                        else {
                            return;
                        };
                        let _ = body.send_data(Bytes::from_static(b"ok"), true);
                    }
                });
            }
        });
        RefusingH2Origin {
            port,
            streams,
            accepted,
            task,
        }
    }

    fn streams(&self) -> usize {
        *self.streams.lock().unwrap()
    }

    fn accepted(&self) -> usize {
        *self.accepted.lock().unwrap()
    }
}

impl Drop for RefusingH2Origin {
    fn drop(&mut self) {
        self.task.abort();
    }
}
