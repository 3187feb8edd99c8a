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
/// request; `/close` it closes on at once. It records each request's path
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

/// An HTTP/2 stream the origin refused (`REFUSED_STREAM`: not processed)
/// on a connection no request had taken since the pool's last sweep is
/// sent again on that connection; a GET whose connection the origin closed
/// (after a `GOAWAY`) before answering goes on a new connection. In either fingerprint mode (each
/// speaks HTTP/2 through a stack of its own).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_http2_stream_is_sent_again_in_either_mode() {
    let cases = [
        (FingerprintMode::Mirror, Refusal::Stream),
        (FingerprintMode::Rustls, Refusal::Stream),
        (FingerprintMode::Mirror, Refusal::GoAwayAndClose),
        (FingerprintMode::Rustls, Refusal::GoAwayAndClose),
    ];
    for (mode, refusal) in cases {
        let s = Setup::builder()
            .exits(1)
            .config(|c| c.upstream.fingerprint = mode)
            .start()
            .await;
        let origin = RefusingH2Origin::start(&s.origin.pki, refusal).await;
        let mut tunnel = s.proxy.client.tunnel_h2("localhost", origin.port).await;
        let first = tunnel.get("/a", &[]).await;
        assert_eq!(first.status, 200, "{mode:?}: {:?}", first.pinproxy_error());
        // Long enough for a sweep (every second) to find the connection
        // untaken.
        tokio::time::sleep(Duration::from_millis(2_500)).await;
        let second = tunnel.get("/b", &[]).await;
        assert_eq!(
            second.status,
            200,
            "{mode:?}: {:?}",
            second.pinproxy_error()
        );
        let case = format!("{mode:?}, {refusal:?}");
        assert_eq!(origin.streams(), 3, "{case}");
        let connections = match refusal {
            Refusal::Stream => 1,
            Refusal::GoAwayAndClose => 2,
        };
        assert_eq!(origin.accepted(), connections, "{case}");
        assert_eq!(replayed(&s), 1, "{case}");
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

/// An HTTPS origin speaking HTTP/2 only that turns down the second stream
/// of each connection (see [`Refusal`]) and answers the others `200 ok`.
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
                let (tls, streams) = (tls.clone(), streams_by_task.clone());
                tokio::spawn(async move {
                    let Ok(stream) = tls.accept(tcp).await else {
                        return;
                    };
                    let Ok(mut conn) = h2::server::handshake(stream).await else {
                        return;
                    };
                    let mut on_this = 0;
                    // Bounded: a test opens a few streams.
                    for _ in 0..100 {
                        let Some(Ok((_request, mut respond))) = conn.accept().await else {
                            return;
                        };
                        *streams.lock().unwrap() += 1;
                        on_this += 1;
                        if on_this == 2 {
                            match refusal {
                                Refusal::Stream => {
                                    respond.send_reset(h2::Reason::REFUSED_STREAM);
                                    continue;
                                }
                                Refusal::GoAwayAndClose => {
                                    conn.abrupt_shutdown(h2::Reason::NO_ERROR);
                                    // Driven until the GOAWAY is out and the
                                    // connection closes (bounded by the loop).
                                    drop(respond);
                                    continue;
                                }
                            }
                        }
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
