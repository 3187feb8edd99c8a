//! A request the origin never answered, on a connection that had been idle
//! (the origin's keep-alive timeout closing it as the request leaves), or
//! an HTTP/2 stream the origin said it did not process (refused, or past
//! the last stream of its `GOAWAY`, on a busy connection too), is sent
//! again once, as a browser sends it again, through the same exit; one
//! that may have been acted on (a POST), one with a body, and one on a
//! connection dialled for it or busy with others that the origin closed
//! are answered `502` as before.

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

/// How long a test waits for an answer: a regression that leaves a stream
/// unanswered fails here, not at pinproxy's response timeout.
const ANSWER: Duration = Duration::from_secs(20);

/// The tracked cookie of the HTTP/2 replay tests.
const H2_JAR: (&str, &str) = ("cookie", "datadome=h2-replay-token");

/// pinproxy with two exits in fingerprint `mode`, and the identity of
/// [`H2_JAR`] founded with a request to the test origin, so that the test's
/// requests to its own origin are pin hits: none waits for its pin to be
/// stored (a founding race's losers wait for the disk), and they reach the
/// pool at once. Answers the identity's exit's address too.
async fn founded_in(mode: FingerprintMode) -> (Setup, IpAddr) {
    let s = Setup::builder()
        .exits(2)
        .config(|c| c.upstream.fingerprint = mode)
        .start()
        .await;
    // Over HTTP/2, as the test's requests: an identity presents the
    // ClientHello it was founded with, ALPN included.
    let mut tunnel = s
        .proxy
        .client
        .tunnel_h2("localhost", s.origin.https.port())
        .await;
    let reply = tunnel.get("/", &[H2_JAR]).await;
    assert_eq!(reply.status, 200, "{:?}", reply.pinproxy_error());
    let exit = Setup::peer(&reply).expect("the origin reports the exit");
    (s, exit)
}

/// GETs with [`H2_JAR`] to an origin through an HTTP/2 tunnel, as many at
/// once as a test asks.
struct H2Gets {
    sender: hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    port: u16,
}

impl H2Gets {
    fn new(tunnel: &mut support::client::H2Conn, port: u16) -> H2Gets {
        let sender = tunnel.sender().clone();
        H2Gets { sender, port }
    }

    async fn get(&self, path: &str) -> http::Response<hyper::body::Incoming> {
        self.send("GET", path, Bytes::new()).await
    }

    /// `method` for `path` with `body` (none when empty).
    async fn send(
        &self,
        method: &str,
        path: &str,
        body: Bytes,
    ) -> http::Response<hyper::body::Incoming> {
        let request = http::Request::builder()
            .method(method)
            .uri(format!("https://localhost:{}{path}", self.port))
            .header("accept", "text/html")
            .header(H2_JAR.0, H2_JAR.1)
            .body(Full::new(body))
            .unwrap();
        let reply = tokio::time::timeout(ANSWER, self.sender.clone().send_request(request));
        reply.await.expect("an answer in time").unwrap()
    }
}

/// The streams of a burst on an HTTP/2 connection which the origin refused
/// (`REFUSED_STREAM`: not processed) are each sent again on that
/// connection, whether or not it had been idle; GETs whose connection the
/// origin closed (after a `GOAWAY`) before answering go on a new
/// connection when it had been idle (no request took it for a sweep's
/// interval), and answer `502` when it was busy (the origin may have
/// processed them). In either fingerprint mode (each speaks HTTP/2
/// through a stack of its own). A replay is the request as it came, and
/// leaves through its cookie's exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_http2_streams_are_sent_again_in_either_mode() {
    let cases = [
        (FingerprintMode::Mirror, Refusal::Stream, true),
        (FingerprintMode::Rustls, Refusal::Stream, true),
        (FingerprintMode::Mirror, Refusal::GoAwayAndClose, true),
        (FingerprintMode::Rustls, Refusal::GoAwayAndClose, true),
        (FingerprintMode::Mirror, Refusal::Stream, false),
        (FingerprintMode::Rustls, Refusal::Stream, false),
        (FingerprintMode::Mirror, Refusal::GoAwayAndClose, false),
        (FingerprintMode::Rustls, Refusal::GoAwayAndClose, false),
    ];
    for (mode, refusal, quiet) in cases {
        let case = format!("{mode:?}, {refusal:?}, quiet: {quiet}");
        let (s, exit) = founded_in(mode).await;
        let origin = RefusingH2Origin::start(&s.origin.pki, refusal).await;
        let mut tunnel = s.proxy.client.tunnel_h2("localhost", origin.port).await;
        let gets = H2Gets::new(&mut tunnel, origin.port);
        let replies = if quiet {
            let first = gets.get("/a").await;
            let error = first.headers().get("x-pinproxy-error");
            assert_eq!(first.status(), 200, "{case}: {error:?}");
            // Long enough for a sweep (every second) to find the
            // connection untaken for a whole interval.
            tokio::time::sleep(Duration::from_millis(2_500)).await;
            // Two at once: the origin turns both down once both have come.
            let (b, c) = tokio::join!(gets.get("/b"), gets.get("/c"));
            vec![b, c]
        } else {
            // Three at once (pin hits): one dial, which the first takes and
            // the others wait for, then share, within a sweep's interval;
            // the origin answers the first and turns the others down.
            let (a, b, c) = tokio::join!(gets.get("/a"), gets.get("/b"), gets.get("/c"));
            vec![a, b, c]
        };
        let sent_again = quiet || matches!(refusal, Refusal::Stream);
        let mut failed = 0;
        for reply in &replies {
            let error = reply.headers().get("x-pinproxy-error");
            if sent_again {
                assert_eq!(reply.status(), 200, "{case}: {error:?}");
            } else if reply.status() != 200 {
                assert_eq!(reply.status(), 502, "{case}: {error:?}");
                let error = error.unwrap().to_str().unwrap();
                assert!(error.starts_with("origin-failed: "), "{case}: {error}");
                failed += 1;
            }
        }
        if !sent_again {
            // At least the two the origin let go (the first may lose its
            // answer to the close too).
            assert!(failed >= 2, "{case}");
        }
        let (streams, connections, replays) = match (refusal, sent_again) {
            (Refusal::Stream, _) => (5, 1, 2),
            (Refusal::GoAwayAndClose, true) => (5, 2, 2),
            (Refusal::GoAwayAndClose, false) => (3, 1, 0),
        };
        let seen = origin.seen();
        assert_eq!(seen.len(), streams, "{case}");
        assert_eq!(origin.accepted(), connections, "{case}");
        assert_eq!(replayed(&s), replays, "{case}");
        // Every stream, the replays too, left through the cookie's exit,
        // and a replay is the request as it came (its head in its order).
        assert!(
            seen.iter().all(|s| s.peer == exit),
            "{case}: {exit} {seen:?}"
        );
        for stream in &seen {
            let same_path = seen.iter().filter(|s| s.path == stream.path);
            assert!(
                same_path.clone().all(|s| s.head == stream.head),
                "{case}: {seen:?}"
            );
            assert!(
                stream.head.iter().any(|(name, _)| name == "cookie"),
                "{case}"
            );
        }
        let twice = seen
            .iter()
            .filter(|s| seen.iter().filter(|t| t.path == s.path).count() == 2)
            .count();
        assert_eq!(twice as u64, 2 * replays, "{case}: {seen:?}");
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

/// A stream as an origin received it.
#[derive(Debug, Clone)]
struct SeenStream {
    path: String,
    /// Method, then each field in the order the origin read them.
    head: Vec<(String, String)>,
    peer: IpAddr,
}

/// An HTTPS origin speaking HTTP/2 only that turns down the second and
/// third streams of its first connection (see [`Refusal`]) once both have
/// come, and answers every other stream `200 ok`. It records every stream.
struct RefusingH2Origin {
    port: u16,
    seen: Arc<Mutex<Vec<SeenStream>>>,
    accepted: Arc<Mutex<usize>>,
    task: tokio::task::JoinHandle<()>,
}

impl RefusingH2Origin {
    async fn start(pki: &support::origin::TestPki, refusal: Refusal) -> RefusingH2Origin {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let tls = tokio_rustls::TlsAcceptor::from(pki.server_config(&[b"h2"]));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let accepted = Arc::new(Mutex::new(0));
        let (seen_by_task, accepted_by_task) = (seen.clone(), accepted.clone());
        let task = tokio::spawn(async move {
            while let Ok((tcp, peer)) = listener.accept().await {
                *accepted_by_task.lock().unwrap() += 1;
                let first = *accepted_by_task.lock().unwrap() == 1;
                let (tls, seen) = (tls.clone(), seen_by_task.clone());
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
                        let Some(Ok((request, respond))) = conn.accept().await else {
                            return;
                        };
                        let mut head = vec![(":method".to_owned(), request.method().to_string())];
                        head.extend(request.headers().iter().map(|(name, value)| {
                            let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
                            (name.to_string(), value)
                        }));
                        let path = request.uri().path().to_owned();
                        let peer = peer.ip();
                        seen.lock().unwrap().push(SeenStream { path, head, peer });
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
            seen,
            accepted,
            task,
        }
    }

    fn seen(&self) -> Vec<SeenStream> {
        self.seen.lock().unwrap().clone()
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

/// The streams a busy HTTP/2 connection had in flight past the last stream
/// of an origin's `GOAWAY` (an origin that closes a connection after so
/// many requests, as nginx does every 1,000) were not processed: each GET
/// is sent again on a new connection through its cookie's exit, in either
/// fingerprint mode, and the streams the origin kept are answered on the
/// old one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_past_an_origins_goaway_are_sent_again_on_a_new_connection() {
    // Three streams on the first connection, the last of them again on the
    // second.
    three_gets_are_answered_despite(GoingAway::AtTheThird, 4, 1).await;
}

/// Streams an origin refused (`REFUSED_STREAM`), sent again on their
/// connection, which the origin then closes with a `GOAWAY` that leaves
/// them out (an origin refusing streams as it shuts down), are sent once
/// more, on a new connection, through their cookie's exit: the client gets
/// its answers, as a browser would, not a `502`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_refused_then_left_out_of_a_goaway_are_sent_on_a_new_connection() {
    // Three streams, the refused two again on the first connection, and
    // those two once more on the second.
    three_gets_are_answered_despite(GoingAway::AfterRefusing, 7, 4).await;
}

/// A stream left out of an origin's `GOAWAY` and then refused
/// (`REFUSED_STREAM`) on the new connection it was sent again on (an origin
/// shedding load) is sent once more there: the origin said twice that it
/// did not process it, and the client gets its answer, not a `502`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_left_out_of_a_goaway_then_refused_is_sent_once_more() {
    // Three streams on the first connection, the left-out one twice on
    // the second.
    three_gets_are_answered_despite(GoingAway::ThenRefusing, 5, 2).await;
}

/// An origin that refuses every stream gets a GET three times in all (its
/// refusal's turn and the one replay), then the client gets `502` saying
/// that the origin did not process it and that a retry is safe; a POST
/// with a body, never sent twice by pinproxy, gets the same answer after
/// its one stream. Every stream leaves through the cookie's exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_an_origin_refuses_every_time_is_sent_three_times_at_most() {
    for mode in [FingerprintMode::Mirror, FingerprintMode::Rustls] {
        let (s, exit) = founded_in(mode).await;
        let origin = GoingAwayH2Origin::start(&s.origin.pki, GoingAway::RefusingEvery).await;
        let mut tunnel = s.proxy.client.tunnel_h2("localhost", origin.port).await;
        let requests = H2Gets::new(&mut tunnel, origin.port);
        let expect_refused = |reply: http::Response<hyper::body::Incoming>| async move {
            assert_eq!(reply.status(), 502, "{mode:?}");
            let error = reply.headers().get("x-pinproxy-error").unwrap();
            let error = error.to_str().unwrap().to_owned();
            assert!(error.starts_with("origin-failed: "), "{mode:?}: {error}");
            let body = http_body_util::BodyExt::collect(reply.into_body()).await;
            let body = String::from_utf8(body.unwrap().to_bytes().to_vec()).unwrap();
            assert!(
                body.contains("did not process it: retrying is safe"),
                "{mode:?}: {body}"
            );
        };
        expect_refused(requests.get("/refused").await).await;
        assert_eq!(origin.streams(), 3, "{mode:?}");
        assert_eq!(replayed(&s), 2, "{mode:?}");

        let post = requests
            .send("POST", "/form", Bytes::from_static(b"a=1"))
            .await;
        expect_refused(post).await;
        assert_eq!(origin.streams(), 4, "{mode:?}: the POST once");
        assert_eq!(replayed(&s), 2, "{mode:?}");
        assert_eq!(origin.accepted(), 1, "{mode:?}");
        assert!(origin.peers().iter().all(|p| *p == exit), "{mode:?}");
        s.stop().await;
    }
}

/// Three GETs at once (one dial, the connection busy with all of them)
/// through pinproxy, in either fingerprint mode, to an origin that goes
/// away on its first connection as `script` says: every one is answered
/// `200`, after `streams` streams on two connections and `replays`
/// requests sent again, every stream through the cookie's exit.
async fn three_gets_are_answered_despite(script: GoingAway, streams: usize, replays: u64) {
    for mode in [FingerprintMode::Mirror, FingerprintMode::Rustls] {
        let case = format!("{mode:?}, {script:?}");
        let (s, exit) = founded_in(mode).await;
        let origin = GoingAwayH2Origin::start(&s.origin.pki, script).await;
        let mut tunnel = s.proxy.client.tunnel_h2("localhost", origin.port).await;
        let gets = H2Gets::new(&mut tunnel, origin.port);
        let (a, b, c) = tokio::join!(gets.get("/a"), gets.get("/b"), gets.get("/c"));
        for reply in [a, b, c] {
            let error = reply.headers().get("x-pinproxy-error");
            assert_eq!(reply.status(), 200, "{case}: {error:?}");
        }
        assert_eq!(origin.streams(), streams, "{case}");
        assert_eq!(origin.accepted(), 2, "{case}");
        assert_eq!(replayed(&s), replays, "{case}");
        let peers = origin.peers();
        assert!(peers.iter().all(|p| *p == exit), "{case}: {exit} {peers:?}");
        s.stop().await;
    }
}

/// How [`GoingAwayH2Origin`] goes away on its first connection.
#[derive(Debug, Clone, Copy)]
enum GoingAway {
    /// Once three streams have come: a `GOAWAY` naming the second as its
    /// last stream, the first two answered, never the third.
    AtTheThird,
    /// Once three streams have come: the first answered, the other two
    /// refused (`REFUSED_STREAM`); once both have come again, a `GOAWAY`
    /// naming the first as its last stream, and no answer.
    AfterRefusing,
    /// As [`GoingAway::AtTheThird`]; then the second connection refuses
    /// its first stream (an origin shedding load) and answers the rest.
    ThenRefusing,
    /// Every stream of every connection refused.
    RefusingEvery,
}

/// An HTTPS origin speaking HTTP/2 frame by frame (`h2`'s server counts
/// every stream it has read as processed, so it cannot leave one out of
/// its `GOAWAY`): on its first connection it goes away as [`GoingAway`]
/// says, and its later connections as [`GoingAway::ThenRefusing`] and
/// [`GoingAway::RefusingEvery`] say; it answers every other stream of its
/// later connections `200 ok`. It
/// reads frame heads only (HEADERS are not decoded; these heads need no
/// CONTINUATION).
struct GoingAwayH2Origin {
    port: u16,
    streams: Arc<Mutex<usize>>,
    accepted: Arc<Mutex<usize>>,
    peers: Arc<Mutex<Vec<IpAddr>>>,
    task: tokio::task::JoinHandle<()>,
}

/// An HTTP/2 frame: its type, flags, stream and payload.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let length = u32::try_from(payload.len()).unwrap().to_be_bytes();
    let mut frame = vec![length[1], length[2], length[3], kind, flags];
    frame.extend_from_slice(&stream.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// `200 ok` on `stream`: `:status: 200` (HPACK's static entry 8) and the
/// body, ending the stream.
fn h2_ok(stream: u32) -> Vec<u8> {
    const END_HEADERS: u8 = 0x4;
    const END_STREAM: u8 = 0x1;
    let mut frames = h2_frame(0x1, END_HEADERS, stream, &[0x88]);
    frames.extend(h2_frame(0x0, END_STREAM, stream, b"ok"));
    frames
}

impl GoingAwayH2Origin {
    async fn start(pki: &support::origin::TestPki, script: GoingAway) -> GoingAwayH2Origin {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let tls = tokio_rustls::TlsAcceptor::from(pki.server_config(&[b"h2"]));
        let streams = Arc::new(Mutex::new(0));
        let accepted = Arc::new(Mutex::new(0));
        let peers = Arc::new(Mutex::new(Vec::new()));
        let (streams_by_task, accepted_by_task) = (streams.clone(), accepted.clone());
        let peers_by_task = peers.clone();
        let task = tokio::spawn(async move {
            while let Ok((tcp, peer)) = listener.accept().await {
                *accepted_by_task.lock().unwrap() += 1;
                peers_by_task.lock().unwrap().push(peer.ip());
                let nth = *accepted_by_task.lock().unwrap();
                let (tls, streams) = (tls.clone(), streams_by_task.clone());
                tokio::spawn(async move {
                    if let Ok(stream) = tls.accept(tcp).await {
                        // Ends when pinproxy closes the connection.
                        let _ = Self::serve(stream, script, nth, streams).await;
                    }
                });
            }
        });
        GoingAwayH2Origin {
            port,
            streams,
            accepted,
            peers,
            task,
        }
    }

    /// Serves the `nth` connection (from 1) as `script` says.
    async fn serve<S>(
        mut stream: S,
        script: GoingAway,
        nth: usize,
        streams: Arc<Mutex<usize>>,
    ) -> std::io::Result<()>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        const ACK: u8 = 0x1;
        let mut preface = [0; 24];
        stream.read_exact(&mut preface).await?;
        stream.write_all(&h2_frame(0x4, 0, 0, &[])).await?;
        let mut held = Vec::new();
        // Bounded: a test sends a few frames.
        for _ in 0..200 {
            let mut head = [0; 9];
            stream.read_exact(&mut head).await?;
            let length = u32::from_be_bytes([0, head[0], head[1], head[2]]);
            let (kind, flags) = (head[3], head[4]);
            let id = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
            let mut payload = vec![0; usize::try_from(length).unwrap()];
            stream.read_exact(&mut payload).await?;
            match kind {
                // SETTINGS and PING, acknowledged (a PING with its data).
                0x4 if flags & ACK == 0 => stream.write_all(&h2_frame(0x4, ACK, 0, &[])).await?,
                0x6 if flags & ACK == 0 => {
                    stream.write_all(&h2_frame(0x6, ACK, 0, &payload)).await?
                }
                // HEADERS: a new stream.
                0x1 => {
                    *streams.lock().unwrap() += 1;
                    held.push(id);
                    // RST_STREAM, REFUSED_STREAM (0x7).
                    let refused = 7u32.to_be_bytes();
                    if matches!(script, GoingAway::RefusingEvery) {
                        stream.write_all(&h2_frame(0x3, 0, id, &refused)).await?;
                        continue;
                    }
                    if nth > 1 {
                        match (script, &held[..]) {
                            (GoingAway::ThenRefusing, &[first]) if nth == 2 => {
                                stream.write_all(&h2_frame(0x3, 0, first, &refused)).await?;
                            }
                            _ => stream.write_all(&h2_ok(id)).await?,
                        }
                        continue;
                    }
                    let away = |last: u32| {
                        let mut payload = last.to_be_bytes().to_vec();
                        payload.extend_from_slice(&0u32.to_be_bytes());
                        h2_frame(0x7, 0, 0, &payload)
                    };
                    match (script, &held[..]) {
                        (GoingAway::AtTheThird | GoingAway::ThenRefusing, &[kept, last, _]) => {
                            stream.write_all(&away(last)).await?;
                            stream.write_all(&h2_ok(kept)).await?;
                            stream.write_all(&h2_ok(last)).await?;
                        }
                        (GoingAway::AfterRefusing, &[kept, second, third]) => {
                            stream.write_all(&h2_ok(kept)).await?;
                            stream
                                .write_all(&h2_frame(0x3, 0, second, &refused))
                                .await?;
                            stream.write_all(&h2_frame(0x3, 0, third, &refused)).await?;
                        }
                        (GoingAway::AfterRefusing, &[kept, _, _, _, _]) => {
                            stream.write_all(&away(kept)).await?;
                        }
                        _ => {}
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn streams(&self) -> usize {
        *self.streams.lock().unwrap()
    }

    fn accepted(&self) -> usize {
        *self.accepted.lock().unwrap()
    }

    /// The address each connection came from.
    fn peers(&self) -> Vec<IpAddr> {
        self.peers.lock().unwrap().clone()
    }
}

impl Drop for GoingAwayH2Origin {
    fn drop(&mut self) {
        self.task.abort();
    }
}
