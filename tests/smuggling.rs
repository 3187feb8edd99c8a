//! Request smuggling: a message whose framing two HTTP parsers could read
//! differently is refused, never forwarded, and its connection closed.
//!
//! Request side: exact bytes written on a raw client socket (plain proxy
//! requests) or on a raw TLS stream inside a CONNECT tunnel; every case
//! asserts `400`, the connection closed, and that the origin never saw the
//! request. Response side: a tiny raw origin writes malformed responses
//! over TLS (and plain HTTP); every case asserts `502` and that none of its
//! body reached the client. HTTP/2: raw frames show hyper's HTTP/2 server
//! already refuses connection-specific headers.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::{Origin, Proxy, Setup};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Malformed requests: (case name, bytes), `{P}` standing for the case's
/// unique request target and `{H}` for the Host.
/// Every one is a framing two parsers may disagree on, or a head no
/// parser should guess at.
const BAD_REQUESTS: &[(&str, &str)] = &[
    // RFC 9112 §6.1: a likely smuggling attempt.
    (
        "cl-and-te",
        "POST {P} HTTP/1.1\r\nHost: {H}\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ),
    (
        "te-and-cl",
        "POST {P} HTTP/1.1\r\nHost: {H}\r\nTransfer-Encoding: chunked\r\nContent-Length: 36\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nX: y\r\n\r\n",
    ),
    (
        "te-gzip-chunked",
        "POST {P} HTTP/1.1\r\nHost: {H}\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    ),
    (
        "te-identity",
        "POST {P} HTTP/1.1\r\nHost: {H}\r\nTransfer-Encoding: identity\r\n\r\n",
    ),
    (
        "te-chunked-twice",
        "POST {P} HTTP/1.1\r\nHost: {H}\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ),
    (
        "te-xchunked",
        "POST {P} HTTP/1.1\r\nHost: {H}\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
    ),
    (
        "te-space-before-colon",
        "POST {P} HTTP/1.1\r\nHost: {H}\r\nTransfer-Encoding : chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
    ),
    (
        "cl-differing",
        "POST {P} HTTP/1.1\r\nHost: {H}\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    ),
    (
        "cl-list-equal",
        "POST {P} HTTP/1.1\r\nHost: {H}\r\nContent-Length: 5, 5\r\n\r\nhello",
    ),
    (
        "cl-list-differing",
        "POST {P} HTTP/1.1\r\nHost: {H}\r\nContent-Length: 5, 6\r\n\r\nhello!",
    ),
    (
        "cl-signed",
        "POST {P} HTTP/1.1\r\nHost: {H}\r\nContent-Length: +5\r\n\r\nhello",
    ),
    // RFC 9112 §3.2: origins differ on which one counts.
    (
        "host-twice",
        "GET {P} HTTP/1.1\r\nHost: {H}\r\nX: y\r\nHost: elsewhere.test\r\n\r\n",
    ),
    (
        "obs-fold",
        "GET {P} HTTP/1.1\r\nHost: {H}\r\nX-Folded: a\r\n b\r\n\r\n",
    ),
    (
        "obs-fold-tab",
        "GET {P} HTTP/1.1\r\nHost: {H}\r\nX-Folded: a\r\n\tb\r\n\r\n",
    ),
    ("bare-lf", "GET {P} HTTP/1.1\nHost: {H}\n\n"),
    ("bare-lf-one-line", "GET {P} HTTP/1.1\r\nHost: {H}\nX-A: b\r\n\r\n"),
    ("bare-cr", "GET {P} HTTP/1.1\r\nHost: {H}\r\nX-A: b\rc\r\n\r\n"),
    ("nul-in-value", "GET {P} HTTP/1.1\r\nHost: {H}\r\nX-A: b\0c\r\n\r\n"),
    ("nul-in-name", "GET {P} HTTP/1.1\r\nHost: {H}\r\nX\0A: b\r\n\r\n"),
];

/// Waits (bounded) until the peer has closed `io`; true if it did.
async fn closed_by_peer<T: AsyncRead + Unpin>(io: &mut T) -> bool {
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match tokio::time::timeout_at(deadline, io.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

/// Reads one response head (to the blank line) from `io`.
async fn read_head<T: AsyncRead + Unpin>(io: &mut T) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    let read = async {
        while !head.ends_with(b"\r\n\r\n") {
            match io.read(&mut byte).await {
                Ok(1) => head.push(byte[0]),
                _ => break,
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(10), read).await;
    String::from_utf8_lossy(&head).into_owned()
}

/// Reads one whole response (head and `content-length` body) from `io`;
/// returns its status line.
async fn read_response<T: AsyncRead + Unpin>(io: &mut T) -> String {
    let head = read_head(io).await;
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    io.read_exact(&mut body).await.unwrap();
    head.lines().next().unwrap_or("").to_owned()
}

/// What one request case came to.
#[derive(Debug)]
struct Outcome {
    status_line: String,
    closed: bool,
    forwarded: bool,
}

impl Outcome {
    fn refused(&self) -> bool {
        self.status_line.starts_with("HTTP/1.1 400") && self.closed && !self.forwarded
    }
}

/// Writes `bytes` on `io`, reads the answer head and waits for the close.
async fn exchange<T: AsyncRead + AsyncWrite + Unpin>(io: &mut T, bytes: &[u8]) -> (String, bool) {
    io.write_all(bytes).await.unwrap();
    io.flush().await.unwrap();
    let head = read_head(io).await;
    let closed = closed_by_peer(io).await;
    (head.lines().next().unwrap_or("").to_owned(), closed)
}

fn forwarded(origin: &Origin, path: &str) -> bool {
    origin.seen().iter().any(|s| s.path.starts_with(path))
}

fn fill(template: &str, path: &str, host: &str) -> Vec<u8> {
    template
        .replace("{P}", path)
        .replace("{H}", host)
        .into_bytes()
}

/// A client stream of either kind.
trait Io: AsyncRead + AsyncWrite + Unpin {}
impl<T: AsyncRead + AsyncWrite + Unpin> Io for T {}

/// Every bad request, each on a fresh connection: as a plain proxy request
/// (absolute-form), or inside a MITM tunnel (HTTP/1.1 over TLS).
async fn outcomes(proxy: &Proxy, origin: &Origin, tunnel: bool) -> Vec<(&'static str, Outcome)> {
    let port = if tunnel {
        origin.https.port()
    } else {
        origin.http.port()
    };
    let host = format!("localhost:{port}");
    let mut outcomes = Vec::new();
    for (name, template) in BAD_REQUESTS {
        let path = format!(
            "/smuggle/{}-{name}",
            if tunnel { "tunnel" } else { "plain" }
        );
        let (mut io, target): (Box<dyn Io>, String) = if tunnel {
            let tls = proxy
                .client
                .tls_stream("localhost", port, &[b"http/1.1"])
                .await;
            (Box::new(tls), path.clone())
        } else {
            let tcp = TcpStream::connect(proxy.daemon.local_addr()).await.unwrap();
            (Box::new(tcp), format!("http://{host}{path}"))
        };
        let (status_line, closed) = exchange(&mut io, &fill(template, &target, &host)).await;
        outcomes.push((
            *name,
            Outcome {
                status_line,
                closed,
                forwarded: forwarded(origin, &path),
            },
        ));
    }
    outcomes
}

/// Prints every outcome (the record of what the parser does by itself) and
/// fails listing the cases that were not refused.
fn assert_all_refused(side: &str, outcomes: &[(&str, Outcome)]) {
    let mut not_refused = Vec::new();
    for (name, outcome) in outcomes {
        println!(
            "{side} {name:24} {:40} closed={} forwarded={} -> {}",
            outcome.status_line,
            outcome.closed,
            outcome.forwarded,
            if outcome.refused() {
                "refused"
            } else {
                "NOT REFUSED"
            }
        );
        if !outcome.refused() {
            not_refused.push(format!("{name}: {outcome:?}"));
        }
    }
    assert!(
        not_refused.is_empty(),
        "{side}: not refused:\n{}",
        not_refused.join("\n")
    );
}

/// Every case as a plain proxy request and inside a MITM tunnel.
#[tokio::test]
async fn smuggled_requests_get_400_and_are_never_forwarded() {
    let s = Setup::start(1).await;
    for (side, tunnel) in [("plain", false), ("tunnel", true)] {
        let outcomes = outcomes(&s.proxy, &s.origin, tunnel).await;
        assert_all_refused(side, &outcomes);
    }
    // Nor is a request a case hides behind its own (read as the next one
    // on the connection once the first was refused).
    assert!(
        !forwarded(&s.origin, "/smuggled"),
        "an embedded request reached the origin"
    );
    s.stop().await;
}

/// Keep-alive: every head on a connection is checked, not only the first,
/// and the framing of the messages before it (a chunked body included) is
/// followed to find it.
#[tokio::test]
async fn every_request_head_on_a_keep_alive_connection_is_checked() {
    let s = Setup::start(1).await;
    let (origin, proxy) = (&s.origin, &s.proxy);
    let host = format!("localhost:{}", origin.http.port());
    let base = format!("http://{host}");

    // Pipelined: a good GET, a good chunked POST, then a smuggling attempt.
    let pipelined = format!(
        "GET {base}/smuggle/ka-first HTTP/1.1\r\nHost: {host}\r\n\r\n\
         POST {base}/smuggle/ka-second HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n\
         5;ext=1\r\nhello\r\n0\r\nX-Trailer: t\r\n\r\n\
         POST {base}/smuggle/ka-third HTTP/1.1\r\nHost: {host}\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    );
    let mut tcp = TcpStream::connect(proxy.daemon.local_addr()).await.unwrap();
    tcp.write_all(pipelined.as_bytes()).await.unwrap();
    let mut heads = Vec::new();
    for _ in 0..3 {
        heads.push(read_response(&mut tcp).await);
    }
    assert!(heads[0].starts_with("HTTP/1.1 200"), "{heads:?}");
    assert!(heads[1].starts_with("HTTP/1.1 200"), "{heads:?}");
    assert!(heads[2].starts_with("HTTP/1.1 400"), "{heads:?}");
    assert!(closed_by_peer(&mut tcp).await, "closed after the 400");
    assert!(forwarded(origin, "/smuggle/ka-first"));
    assert!(forwarded(origin, "/smuggle/ka-second"));
    assert!(!forwarded(origin, "/smuggle/ka-third"), "never forwarded");

    // Not pipelined: a bare LF in the second head, after a full exchange.
    let mut tcp = TcpStream::connect(proxy.daemon.local_addr()).await.unwrap();
    let first = format!("GET {base}/smuggle/ka2-first HTTP/1.1\r\nHost: {host}\r\n\r\n");
    tcp.write_all(first.as_bytes()).await.unwrap();
    let status = read_response(&mut tcp).await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    let second = format!("GET {base}/smuggle/ka2-second HTTP/1.1\r\nHost: {host}\nX: y\r\n\r\n");
    let (status, closed) = exchange(&mut tcp, second.as_bytes()).await;
    assert!(status.starts_with("HTTP/1.1 400"), "{status}");
    assert!(closed);
    assert!(!forwarded(origin, "/smuggle/ka2-second"));
    s.stop().await;
}

/// The refusal names the reason, so a user can tell it from other 400s.
#[tokio::test]
async fn the_refusal_says_why() {
    let s = Setup::start(1).await;
    let host = format!("localhost:{}", s.origin.http.port());
    let mut tcp = TcpStream::connect(s.proxy.daemon.local_addr())
        .await
        .unwrap();
    let request = format!(
        "POST http://{host}/smuggle/why HTTP/1.1\r\nHost: {host}\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    );
    tcp.write_all(request.as_bytes()).await.unwrap();
    let head = read_head(&mut tcp).await;
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    assert!(
        head.contains("x-pinproxy-error: bad-request:") && head.contains("Transfer-Encoding"),
        "{head}"
    );
    assert!(
        head.to_ascii_lowercase().contains("connection: close"),
        "{head}"
    );
    s.stop().await;
}

/// Well-formed framing still works: chunked and Content-Length bodies reach
/// the origin, on one keep-alive connection inside a tunnel.
#[tokio::test]
async fn well_formed_bodies_still_pass() {
    let s = Setup::start(1).await;
    let host = format!("localhost:{}", s.origin.https.port());
    let mut tls = s
        .proxy
        .client
        .tls_stream("localhost", s.origin.https.port(), &[b"http/1.1"])
        .await;
    let requests = format!(
        "POST /smuggle/ok-chunked HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: Chunked\r\n\r\n\
         3\r\nabc\r\n0\r\n\r\n\
         POST /smuggle/ok-length HTTP/1.1\r\nHost: {host}\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc\
         GET /smuggle/ok-get HTTP/1.1\r\nHost: {host}\r\n\r\n"
    );
    tls.write_all(requests.as_bytes()).await.unwrap();
    for _ in 0..3 {
        let status = read_response(&mut tls).await;
        assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    }
    for path in [
        "/smuggle/ok-chunked",
        "/smuggle/ok-length",
        "/smuggle/ok-get",
    ] {
        assert!(forwarded(&s.origin, path), "{path}");
    }
    s.stop().await;
}

// ---------------------------------------------------------------------------
// Response side

/// The body every malformed response carries: it must never reach a client.
const LEAK: &str = "LEAKED-BODY";

/// Malformed responses: (case name, response bytes).
const BAD_RESPONSES: &[(&str, &str)] = &[
    (
        "cl-and-te",
        "HTTP/1.1 200 OK\r\nContent-Length: 11\r\nTransfer-Encoding: chunked\r\n\r\nb\r\nLEAKED-BODY\r\n0\r\n\r\n",
    ),
    (
        "te-gzip-chunked",
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\nb\r\nLEAKED-BODY\r\n0\r\n\r\n",
    ),
    (
        "te-identity",
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: identity\r\n\r\nLEAKED-BODY",
    ),
    (
        "cl-differing",
        "HTTP/1.1 200 OK\r\nContent-Length: 11\r\nContent-Length: 12\r\n\r\nLEAKED-BODY",
    ),
    (
        "cl-list",
        "HTTP/1.1 200 OK\r\nContent-Length: 11, 11\r\n\r\nLEAKED-BODY",
    ),
    (
        "obs-fold",
        "HTTP/1.1 200 OK\r\nContent-Length: 11\r\nX-Folded: a\r\n b\r\n\r\nLEAKED-BODY",
    ),
    (
        "bare-lf",
        "HTTP/1.1 200 OK\nContent-Length: 11\n\nLEAKED-BODY",
    ),
    (
        "bare-cr",
        "HTTP/1.1 200 OK\r\nContent-Length: 11\r\nX-A: b\rc\r\n\r\nLEAKED-BODY",
    ),
    (
        "nul",
        "HTTP/1.1 200 OK\r\nContent-Length: 11\r\nX-A: b\0c\r\n\r\nLEAKED-BODY",
    ),
    (
        "space-before-colon",
        "HTTP/1.1 200 OK\r\nContent-Length : 11\r\n\r\nLEAKED-BODY",
    ),
];

/// A raw origin: answers every request with `response` verbatim, then
/// closes; over TLS with `origin`'s certificate when `tls`.
struct RawResponder {
    addr: SocketAddr,
    requests: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RawResponder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn answer<T: AsyncRead + AsyncWrite + Unpin>(mut io: T, response: &[u8]) {
    let _ = read_head(&mut io).await;
    let _ = io.write_all(response).await;
    let _ = io.flush().await;
    let _ = io.shutdown().await;
}

impl RawResponder {
    async fn start(origin: &Origin, response: &'static str, tls: bool) -> RawResponder {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(AtomicUsize::new(0));
        let counted = requests.clone();
        let acceptor = tokio_rustls::TlsAcceptor::from(origin.pki.server_config(&[b"http/1.1"]));
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let counted = counted.clone();
                tokio::spawn(async move {
                    counted.fetch_add(1, Ordering::SeqCst);
                    if tls {
                        if let Ok(stream) = acceptor.accept(tcp).await {
                            answer(stream, response.as_bytes()).await;
                        }
                    } else {
                        answer(tcp, response.as_bytes()).await;
                    }
                });
            }
        });
        RawResponder {
            addr,
            requests,
            task,
        }
    }
}

#[tokio::test]
async fn malformed_origin_responses_get_502_and_are_never_relayed() {
    let s = Setup::builder().http1_only_origin().exits(1).start().await;
    let mut failures = Vec::new();
    for (name, response) in BAD_RESPONSES {
        for tls in [true, false] {
            let responder = RawResponder::start(&s.origin, response, tls).await;
            let mut conn = if tls {
                s.proxy
                    .client
                    .tunnel("localhost", responder.addr.port())
                    .await
            } else {
                s.proxy
                    .client
                    .plain("localhost", responder.addr.port())
                    .await
            };
            let reply = match tokio::time::timeout(
                Duration::from_secs(15),
                conn.send(
                    conn.request("GET", "/smuggle/response")
                        .body(Default::default())
                        .unwrap(),
                ),
            )
            .await
            {
                Ok(Ok(reply)) => format!("{} {}", reply.status.as_u16(), reply.body),
                Ok(Err(e)) => format!("error {e}"),
                Err(_) => "timeout".to_owned(),
            };
            let side = if tls { "tls" } else { "plain" };
            let refused = reply.starts_with("502 ") && !reply.contains(LEAK);
            println!(
                "response {side:5} {name:20} {} -> {}",
                reply.lines().next().unwrap_or(""),
                if refused { "refused" } else { "NOT REFUSED" }
            );
            assert!(
                responder.requests.load(Ordering::SeqCst) > 0,
                "{name}: reached"
            );
            if !refused {
                failures.push(format!("{side} {name}: {reply}"));
            }
        }
    }
    assert!(failures.is_empty(), "not refused:\n{}", failures.join("\n"));
    s.stop().await;
}

#[tokio::test]
async fn well_formed_origin_responses_still_pass() {
    let s = Setup::builder().http1_only_origin().exits(1).start().await;
    for response in [
        "HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\nLEAKED-BODY",
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nb;x=y\r\nLEAKED-BODY\r\n0\r\nX-T: 1\r\n\r\n",
        "HTTP/1.1 200 OK\r\nContent-Length: 11\r\nContent-Length: 11\r\n\r\nLEAKED-BODY",
        "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\nLEAKED-BODY",
        "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nLEAKED-BODY",
    ] {
        let responder = RawResponder::start(&s.origin, response, true).await;
        let mut conn = s.proxy.client.tunnel("localhost", responder.addr.port()).await;
        let reply = conn.get("/fine", &[]).await;
        assert_eq!(reply.status, 200, "{response:?}: {}", reply.body);
        assert_eq!(reply.body, LEAK, "{response:?}");
    }
    s.stop().await;
}

// ---------------------------------------------------------------------------
// HTTP/2

/// An HTTP/2 frame header and payload.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// HPACK: each header as a literal without indexing, new name, no Huffman.
fn hpack(headers: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in headers {
        out.push(0x00);
        assert!(name.len() < 127 && value.len() < 127);
        out.push(name.len() as u8);
        out.extend_from_slice(name.as_bytes());
        out.push(value.len() as u8);
        out.extend_from_slice(value.as_bytes());
    }
    out
}

/// Reads frames until stream 1 is reset, the connection goes away, or a
/// response HEADERS arrives; returns which.
async fn h2_verdict<T: AsyncRead + Unpin>(io: &mut T) -> String {
    let read = async {
        loop {
            let mut header = [0u8; 9];
            if io.read_exact(&mut header).await.is_err() {
                return "closed".to_owned();
            }
            let len = (usize::from(header[0]) << 16)
                | (usize::from(header[1]) << 8)
                | usize::from(header[2]);
            let mut payload = vec![0u8; len];
            if io.read_exact(&mut payload).await.is_err() {
                return "closed".to_owned();
            }
            let stream =
                u32::from_be_bytes([header[5], header[6], header[7], header[8]]) & 0x7fff_ffff;
            match (header[3], stream) {
                (3, 1) => return format!("rst_stream {:?}", &payload[..4]),
                (7, _) => return "goaway".to_owned(),
                (1, 1) => return "response headers".to_owned(),
                _ => continue,
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .unwrap_or_else(|_| "timeout".to_owned())
}

/// hyper's HTTP/2 server refuses what HTTP/2 forbids (RFC 9113 §8.2.2,
/// §8.1.1): connection-specific headers and a content-length that does not
/// match the data; none of it reaches the origin.
#[tokio::test]
async fn h2_refuses_connection_specific_headers_and_false_lengths() {
    let s = Setup::start(1).await;
    let authority = format!("localhost:{}", s.origin.https.port());
    let cases: &[(&str, &[(&str, &str)])] = &[
        ("transfer-encoding", &[("transfer-encoding", "chunked")]),
        ("connection", &[("connection", "keep-alive")]),
        ("te-gzip", &[("te", "gzip")]),
        ("content-length", &[("content-length", "5")]),
    ];
    for (name, extra) in cases {
        let path = format!("/smuggle/h2-{name}");
        let mut tls = s
            .proxy
            .client
            .tls_stream("localhost", s.origin.https.port(), &[b"h2"])
            .await;
        let mut headers = vec![
            (":method", "POST"),
            (":scheme", "https"),
            (":authority", authority.as_str()),
            (":path", path.as_str()),
        ];
        headers.extend_from_slice(extra);
        let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        bytes.extend(frame(4, 0, 0, &[]));
        // END_HEADERS | END_STREAM: no data, whatever content-length says.
        bytes.extend(frame(1, 0x5, 1, &hpack(&headers)));
        tls.write_all(&bytes).await.unwrap();
        let verdict = h2_verdict(&mut tls).await;
        println!("h2 {name:20} {verdict}");
        assert!(
            verdict.starts_with("rst_stream") || verdict == "goaway" || verdict == "closed",
            "{name}: {verdict}"
        );
        assert!(!forwarded(&s.origin, &path), "{name} was forwarded");
    }
    s.stop().await;
}
