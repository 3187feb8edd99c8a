//! A TLS origin that records how each client looks on the wire.
//!
//! It listens on 127.0.0.1:0 and serves HTTPS with a leaf of the test PKI
//! ([`TestPki`]: give pinproxy its `ca_file` as `upstream_ca`), offering
//! ALPN `h2` and `http/1.1` (or `http/1.1` only, see [`OriginOptions`],
//! which can also make it close every connection after one response, or
//! issue no session tickets). For every connection it records the
//! ClientHello as it arrived (read off the socket before rustls with
//! [`read_client_hello`], which puts the bytes back), its size and JA4,
//! whether it resumed a session and which connection that session was
//! issued on (the origin keeps its sessions, so a ticket names them), the
//! ALPN protocol rustls agreed on and, for HTTP/2, the connection preface
//! ([`PrefaceRecorder`]) with its Akamai string, the frames it sent up to
//! its first request and every header block as the client's HPACK encoder
//! sent it with its HEADERS frame's priority fields and the WINDOW_UPDATEs
//! it sent after its first request ([`Blocks`]), and the type and length of
//! the first TLS records it sent ([`TlsRecords`]: how it wrote its bytes,
//! as a network observer sees it). For every request it
//! records the method, path, version, header names in order (for HTTP/1.1
//! the first request of a connection keeps the names' case, read off the
//! raw head with [`h1_order::header_names`]; later requests on the same
//! connection have hyper's lowercase names), the `cookie` header and the
//! peer address.
//!
//! Every request is answered 200 with a short body (`/large`: 8 MiB of
//! text, [`LARGE_BODY`], which `/large-page` fetches and then `/after`);
//! `/login` also sets a fresh `datadome=<random>`
//! cookie, so an identity can be founded through pinproxy's Set-Cookie
//! capture. `/page` sets one too (`/page?crumbs` two
//! more, `theme` and `lang`, which pinproxy does not track, so that a
//! browser sends its cookies as several `cookie` fields), and is an HTML page
//! whose script fetches `/fetched?1`, `?2` and `?3` one after another (a
//! browser's later requests to the host, with its cookie) and then writes
//! `fetched` and their answers into the page.
//!
//! Readiness: the listener is bound before [`FingerprintOrigin::start`]
//! returns. A request is recorded before its response is written, so once a
//! client has its answer, the request is in [`FingerprintOrigin::records`].

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use pinproxy::fingerprint::client_hello::ClientHello;
use pinproxy::fingerprint::h2_preface::{H2Fingerprint, PREFACE};
use pinproxy::fingerprint::hpack::{BlockReader, EncodedField};
use pinproxy::fingerprint::{h1_order, ja4, ClientConnection};
use pinproxy::front::fingerprint::{read_client_hello, HelloRead, PrefaceRecorder};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::origin::TestPki;

/// Most bytes the HTTP/1.1 head tap buffers before it gives up.
const MAX_HEAD: usize = 64 * 1024;
/// Deadline for a client's ClientHello and TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// One TLS connection as the origin saw it.
#[derive(Clone, Debug)]
pub struct ConnRecord {
    /// 0-based, in accept order.
    pub index: usize,
    /// TCP peer.
    pub peer: SocketAddr,
    /// The ClientHello as sent (`None`: it did not parse).
    pub hello: Option<Arc<ClientHello>>,
    /// Length of the TLS records that carried the hello, in bytes.
    pub hello_len: usize,
    /// JA4 of `hello`.
    pub ja4: Option<String>,
    /// The hello offered a pre_shared_key (the client tried to resume a
    /// session).
    pub resumed: bool,
    /// The origin accepted the resumption: the session was one it had
    /// issued on an earlier connection.
    pub resumption_accepted: bool,
    /// The connection the origin issued the session (ticket) this one
    /// resumed on, by [`ConnRecord::index`].
    pub resumed_from: Option<usize>,
    /// The protocol agreed by ALPN (`None` until the handshake is done, or
    /// when none was agreed).
    pub alpn: Option<String>,
    /// The HTTP/2 preface, once its first request is in (h2 only).
    pub h2: Option<Arc<H2Fingerprint>>,
    /// Each header block the client sent, in order, as its HPACK encoder
    /// sent it (h2 only; see [`Blocks`]).
    pub blocks: Vec<Vec<EncodedField>>,
    /// The frames the client sent after its preface, up to and including
    /// its first HEADERS, by type (`SETTINGS`, `SETTINGS+ACK`,
    /// `WINDOW_UPDATE`, `PRIORITY`, `HEADERS`, ...), in order (h2 only):
    /// whether it acknowledged the origin's SETTINGS before its first
    /// request says whether it read them first.
    pub opening: Vec<&'static str>,
    /// Each HEADERS frame's priority fields, block by block as
    /// [`ConnRecord::blocks`]: (exclusive, the stream it depends on, weight
    /// 1 to 256), `None` when the frame has none.
    pub priorities: Vec<Option<(bool, u32, u16)>>,
    /// The WINDOW_UPDATE frames the client sent after its first request,
    /// as (stream, increment), the first [`WINDOW_UPDATES_KEPT`]: when it
    /// tells the origin it has read what it was sent.
    pub window_updates: Vec<(u32, u32)>,
    /// The TLS records the client sent, as (content type, length), in
    /// order: the first [`RECORDS_KEPT`], the hello's included. Their
    /// boundaries are what a network observer sees of how the client wrote
    /// its bytes.
    pub records: Vec<(u8, u16)>,
}

/// The size of `/large`'s body.
pub const LARGE_BODY: usize = 8 << 20;

/// How many WINDOW_UPDATE frames [`ConnRecord::window_updates`] keeps.
pub const WINDOW_UPDATES_KEPT: usize = 64;

/// How many of a connection's TLS records [`ConnRecord::records`] keeps.
pub const RECORDS_KEPT: usize = 12;

impl ConnRecord {
    /// The Akamai string of the HTTP/2 preface, if one was read.
    pub fn akamai(&self) -> Option<String> {
        self.h2.as_deref().map(H2Fingerprint::akamai)
    }
}

/// One request, with the fingerprint of the connection it came on.
#[derive(Clone, Debug)]
pub struct Record {
    /// The connection (as recorded when the request arrived).
    pub conn: ConnRecord,
    /// HTTP version.
    pub version: http::Version,
    /// Method.
    pub method: String,
    /// Path and query.
    pub path: String,
    /// Header names in order: the client's case for the first HTTP/1.1
    /// request of a connection, lowercase otherwise.
    pub header_names: Vec<String>,
    /// The `cookie` header values, joined with `; `.
    pub cookie: Option<String>,
}

impl Record {
    /// JA4 of the request's connection.
    pub fn ja4(&self) -> Option<&str> {
        self.conn.ja4.as_deref()
    }

    /// ALPN of the request's connection.
    pub fn alpn(&self) -> Option<&str> {
        self.conn.alpn.as_deref()
    }

    /// Akamai string of the request's connection (h2 only).
    pub fn akamai(&self) -> Option<String> {
        self.conn.akamai()
    }

    /// The value of cookie `name` the request carried.
    pub fn cookie_value(&self, name: &str) -> Option<String> {
        self.cookie.as_deref()?.split(';').find_map(|pair| {
            let (n, v) = pair.trim().split_once('=')?;
            (n == name).then(|| v.to_owned())
        })
    }
}

/// How a [`FingerprintOrigin`] serves.
#[derive(Clone, Debug)]
pub struct OriginOptions {
    /// ALPN protocols offered, in order.
    pub alpn: Vec<Vec<u8>>,
    /// Close every connection once its first response is sent (HTTP/1.1:
    /// `Connection: close`; HTTP/2: GOAWAY), so that every request of a
    /// client (or of pinproxy's pools) arrives on a fresh connection with a
    /// fresh ClientHello.
    pub close_after_response: bool,
    /// Issue TLS 1.3 session tickets (as rustls does by default), so
    /// clients may resume.
    pub tickets: bool,
    /// The HPACK table size stated in the HTTP/2 SETTINGS
    /// (`SETTINGS_HEADER_TABLE_SIZE`; `None`: not stated, 4,096).
    pub header_table_size: Option<u32>,
}

impl Default for OriginOptions {
    fn default() -> Self {
        OriginOptions {
            alpn: vec![b"h2".to_vec(), b"http/1.1".to_vec()],
            close_after_response: false,
            tickets: true,
            header_table_size: None,
        }
    }
}

impl OriginOptions {
    /// Offers `http/1.1` only.
    pub fn http1_only(mut self) -> Self {
        self.alpn = vec![b"http/1.1".to_vec()];
        self
    }

    /// Issues no session tickets: every connection is a full handshake.
    pub fn without_tickets(mut self) -> Self {
        self.tickets = false;
        self
    }

    /// Closes every connection after its first response.
    pub fn closing(mut self) -> Self {
        self.close_after_response = true;
        self
    }

    /// States an HPACK table of `size` bytes to HTTP/2 clients.
    pub fn header_table_size(mut self, size: u32) -> Self {
        self.header_table_size = Some(size);
        self
    }
}

#[derive(Debug, Default)]
struct Log {
    /// Indexed by [`ConnRecord::index`].
    conns: Vec<ConnRecord>,
    requests: Vec<Record>,
    /// Requests since the start, [`FingerprintOrigin::clear`] or not.
    total: usize,
}

/// A running fingerprint-recording origin.
pub struct FingerprintOrigin {
    /// Where it listens (HTTPS).
    pub addr: SocketAddr,
    /// Its PKI: `pki.ca_file` is the CA that signed its leaf.
    pub pki: Arc<TestPki>,
    log: Arc<Mutex<Log>>,
    requests: watch::Receiver<usize>,
    /// How many recorded connections have ended (see [`EndOnDrop`]).
    ended: watch::Receiver<usize>,
    task: JoinHandle<()>,
}

impl Drop for FingerprintOrigin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FingerprintOrigin {
    /// An origin offering `h2` and `http/1.1`, with a fresh test PKI.
    pub async fn start() -> FingerprintOrigin {
        FingerprintOrigin::start_with(Arc::new(TestPki::new()), OriginOptions::default()).await
    }

    /// An origin offering `http/1.1` only, with a fresh test PKI.
    pub async fn start_http1_only() -> FingerprintOrigin {
        FingerprintOrigin::start_with(
            Arc::new(TestPki::new()),
            OriginOptions::default().http1_only(),
        )
        .await
    }

    /// An origin serving `pki`'s leaf as `options` say.
    pub async fn start_with(pki: Arc<TestPki>, options: OriginOptions) -> FingerprintOrigin {
        let alpn: Vec<&[u8]> = options.alpn.iter().map(Vec::as_slice).collect();
        let mut config = (*pki.server_config(&alpn)).clone();
        if !options.tickets {
            config.send_tls13_tickets = 0;
            config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        }
        let tickets = options.tickets.then(|| Arc::new(Tickets::default()));
        let config = Arc::new(config);
        let close = options.close_after_response;
        let table = options.header_table_size;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let log = Arc::new(Mutex::new(Log::default()));
        let (count, requests) = watch::channel(0usize);
        let count = Arc::new(count);
        let (ended_count, ended) = watch::channel(0usize);
        let ended_count = Arc::new(ended_count);
        let shared = log.clone();
        let task = tokio::spawn(async move {
            while let Ok((tcp, peer)) = listener.accept().await {
                let (config, log, count) = (config.clone(), shared.clone(), count.clone());
                let tickets = tickets.clone();
                let ended = ended_count.clone();
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(
                        Duration::from_secs(300),
                        serve(
                            tcp,
                            peer,
                            (config, tickets),
                            (log, count, ended),
                            (close, table),
                        ),
                    )
                    .await;
                });
            }
        });
        FingerprintOrigin {
            addr,
            pki,
            log,
            requests,
            ended,
            task,
        }
    }

    /// Its port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `https://localhost:PORT{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.port())
    }

    /// Every request so far, in arrival order.
    pub fn records(&self) -> Vec<Record> {
        self.log.lock().unwrap().requests.clone()
    }

    /// Every connection so far (including those that sent no request), in
    /// accept order.
    pub fn connections(&self) -> Vec<ConnRecord> {
        self.log.lock().unwrap().conns.clone()
    }

    /// The requests whose path is `path` (query included).
    pub fn requests_to(&self, path: &str) -> Vec<Record> {
        self.records()
            .into_iter()
            .filter(|r| r.path == path)
            .collect()
    }

    /// JA4 of the last request's connection.
    pub fn last_ja4(&self) -> Option<String> {
        self.records().last()?.conn.ja4.clone()
    }

    /// The last request.
    pub fn last(&self) -> Option<Record> {
        self.records().last().cloned()
    }

    /// Forgets the requests recorded so far (connections stay: their
    /// indexes are stable).
    pub fn clear(&self) {
        self.log.lock().unwrap().requests.clear();
    }

    /// How many requests have arrived since the start (those forgotten by
    /// [`FingerprintOrigin::clear`] too).
    pub fn requests_so_far(&self) -> usize {
        *self.requests.borrow()
    }

    /// Waits (at most `within`) until every connection accepted so far has
    /// ended on the origin's side (its socket dropped); panics otherwise.
    /// With a closing origin, a client that waits for this before its next
    /// request cannot send it on a connection the origin is closing.
    pub async fn wait_until_connections_end(&self, within: Duration) {
        let accepted = self.log.lock().unwrap().conns.len();
        let mut ended = self.ended.clone();
        let waited = tokio::time::timeout(within, ended.wait_for(|n| *n >= accepted)).await;
        assert!(
            matches!(waited, Ok(Ok(_))),
            "{} of {accepted} connection(s) ended within {within:?}",
            *self.ended.borrow()
        );
    }

    /// Waits (at most `within`) until `n` requests in all have arrived
    /// since the start; panics otherwise.
    pub async fn wait_for_requests(&self, n: usize, within: Duration) {
        let mut requests = self.requests.clone();
        let waited = tokio::time::timeout(within, requests.wait_for(|seen| *seen >= n)).await;
        assert!(
            matches!(waited, Ok(Ok(_))),
            "the origin saw {} request(s), not {n}, within {within:?}",
            self.records().len()
        );
    }
}

/// The sessions the origin issued (it keeps them: a TLS 1.3 ticket is a
/// key into this store), with the connection each was issued on.
#[derive(Debug, Default)]
struct Tickets {
    by_ticket: Mutex<HashMap<Vec<u8>, Issued>>,
}

/// A session as [`Tickets`] keeps it: its value, and the connection it
/// was issued on.
type Issued = (Vec<u8>, usize);

/// Most sessions [`Tickets`] keeps (a test issues a few dozen).
const MAX_TICKETS: usize = 10_000;

/// One connection's view of [`Tickets`]: what it issues is recorded as
/// its own, and a session it resumes is recorded in its
/// [`ConnRecord::resumed_from`].
#[derive(Debug)]
struct ConnTickets {
    index: usize,
    tickets: Arc<Tickets>,
    log: Arc<Mutex<Log>>,
}

impl rustls::server::StoresServerSessions for ConnTickets {
    fn put(&self, key: Vec<u8>, value: Vec<u8>) -> bool {
        let mut by_ticket = self.tickets.by_ticket.lock().unwrap();
        if by_ticket.len() >= MAX_TICKETS {
            return false;
        }
        by_ticket.insert(key, (value, self.index));
        true
    }

    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        let by_ticket = self.tickets.by_ticket.lock().unwrap();
        let (value, issuer) = by_ticket.get(key)?.clone();
        self.log.lock().unwrap().conns[self.index].resumed_from = Some(issuer);
        Some(value)
    }

    fn take(&self, key: &[u8]) -> Option<Vec<u8>> {
        let (value, issuer) = self.tickets.by_ticket.lock().unwrap().remove(key)?;
        self.log.lock().unwrap().conns[self.index].resumed_from = Some(issuer);
        Some(value)
    }

    fn can_cache(&self) -> bool {
        true
    }
}

async fn serve(
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    (config, tickets): (Arc<rustls::ServerConfig>, Option<Arc<Tickets>>),
    (log, count, ended): (Arc<Mutex<Log>>, Counter, Counter),
    (close, table): (bool, Option<u32>),
) {
    let Ok((io, read)) = tokio::time::timeout(HANDSHAKE_TIMEOUT, read_client_hello(tcp)).await
    else {
        return;
    };
    let hello = match read {
        HelloRead::Hello(hello) => hello.map(|h| Arc::new(*h)),
        HelloRead::Closed => return,
    };
    let hello_len = io.prefix().len();
    let index = {
        let mut log = log.lock().unwrap();
        let index = log.conns.len();
        log.conns.push(ConnRecord {
            index,
            peer,
            hello_len,
            ja4: hello.as_deref().map(ja4::ja4),
            resumed: hello.as_deref().is_some_and(ClientHello::pre_shared_key),
            hello,
            resumption_accepted: false,
            resumed_from: None,
            alpn: None,
            h2: None,
            blocks: Vec::new(),
            opening: Vec::new(),
            priorities: Vec::new(),
            window_updates: Vec::new(),
            records: Vec::new(),
        });
        index
    };
    let _ended = EndOnDrop(ended);
    let io = Tap::new(io, TlsRecords::new(index, log.clone()));
    let acceptor = match tickets {
        Some(tickets) => {
            let mut config = (*config).clone();
            config.session_storage = Arc::new(ConnTickets {
                index,
                tickets,
                log: log.clone(),
            });
            tokio_rustls::TlsAcceptor::from(Arc::new(config))
        }
        None => tokio_rustls::TlsAcceptor::from(config),
    };
    let Ok(Ok(tls)) = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(io)).await else {
        return;
    };
    let alpn = tls
        .get_ref()
        .1
        .alpn_protocol()
        .map(|p| String::from_utf8_lossy(p).into_owned());
    let resumed = tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    {
        let mut log = log.lock().unwrap();
        log.conns[index].alpn = alpn.clone();
        log.conns[index].resumption_accepted = resumed;
    }
    let recorder = Recorder {
        index,
        log,
        count,
        first_h1_head: Arc::new(OnceLock::new()),
        h1_requests: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
        client: Arc::new(ClientConnection::default()),
        close,
        answered: Arc::new(tokio::sync::Notify::new()),
    };
    if alpn.as_deref() == Some("h2") {
        let io = Tap::new(tls, Blocks::new(index, recorder.log.clone()));
        let io = PrefaceRecorder::new(io, recorder.client.clone());
        let answered = recorder.answered.clone();
        let service = service_fn(move |request: Request<Incoming>| {
            let recorder = recorder.clone();
            async move { Ok::<_, Infallible>(recorder.answer(request)) }
        });
        let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .header_table_size(table)
            // Room for a first request past the 64 KiB pinproxy reads of an
            // opening (hyper's own limit is 16 KiB).
            .max_header_list_size(1 << 20)
            // Answers without a `Date`, so that one added on the way shows.
            .auto_date_header(false)
            .serve_connection(TokioIo::new(io), service);
        let mut conn = std::pin::pin!(conn);
        // On the first answer of a closing origin: GOAWAY, then finish the
        // streams in flight.
        tokio::select! {
            _ = conn.as_mut() => return,
            () = answered.notified(), if close => {}
        }
        conn.as_mut().graceful_shutdown();
        let _ = conn.await;
    } else {
        let io = Tap::new(tls, HeadNames::new(recorder.first_h1_head.clone()));
        let service = service_fn(move |request: Request<Incoming>| {
            let recorder = recorder.clone();
            async move { Ok::<_, Infallible>(recorder.answer(request)) }
        });
        let _ = hyper::server::conn::http1::Builder::new()
            .auto_date_header(false)
            .serve_connection(TokioIo::new(io), service)
            .await;
    }
}

/// What a connection's requests are recorded with.
#[derive(Clone)]
struct Recorder {
    index: usize,
    log: Arc<Mutex<Log>>,
    count: Arc<watch::Sender<usize>>,
    /// Header names of the connection's first HTTP/1.1 head, as sent.
    first_h1_head: Arc<OnceLock<Vec<String>>>,
    h1_requests: Arc<std::sync::atomic::AtomicUsize>,
    /// Where the HTTP/2 preface is recorded.
    client: Arc<ClientConnection>,
    /// Close the connection after its first response.
    close: bool,
    /// Told when a request has been answered.
    answered: Arc<tokio::sync::Notify>,
}

impl Recorder {
    fn answer(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        let version = request.version();
        let first_h1 = version != http::Version::HTTP_2
            && self
                .h1_requests
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
                == 0;
        let header_names = match self.first_h1_head.get() {
            Some(names) if first_h1 => names.clone(),
            _ => request
                .headers()
                .iter()
                .map(|(name, _)| name.as_str().to_owned())
                .collect(),
        };
        let cookies: Vec<&str> = request
            .headers()
            .get_all(http::header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        let path = request
            .uri()
            .path_and_query()
            .map(|p| p.to_string())
            .unwrap_or_default();
        let index = {
            let mut log = self.log.lock().unwrap();
            if let Some(preface) = self.client.h2() {
                log.conns[self.index].h2 = Some(preface);
            }
            let conn = log.conns[self.index].clone();
            log.requests.push(Record {
                conn,
                version,
                method: request.method().to_string(),
                path: path.clone(),
                header_names,
                cookie: (!cookies.is_empty()).then(|| cookies.join("; ")),
            });
            log.total += 1;
            log.total
        };
        self.count.send_replace(index);
        let page = match path.split('?').next() {
            Some("/page") => Some(PAGE),
            Some("/large-page") => Some(LARGE_PAGE),
            _ => None,
        };
        let body = match page {
            Some(html) => html.to_owned(),
            None => format!("ok conn {} request {index}\n", self.index),
        };
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = StatusCode::OK;
        if page.is_some() {
            response
                .headers_mut()
                .insert(http::header::CONTENT_TYPE, "text/html".parse().unwrap());
        }
        if self.close {
            if version != http::Version::HTTP_2 {
                response
                    .headers_mut()
                    .insert(http::header::CONNECTION, "close".parse().unwrap());
            }
            self.answered.notify_one();
        }
        if path == "/large" {
            // Bigger than the stream windows browsers offer (Chromium's
            // 6 MiB): the client must tell the origin it has read.
            return Response::new(Full::new(Bytes::from(vec![b'x'; LARGE_BODY])));
        }
        if path == "/page?crumbs" {
            for cookie in ["theme=dark; Path=/; Secure", "lang=en-GB; Path=/; Secure"] {
                response
                    .headers_mut()
                    .append("set-cookie", cookie.parse().unwrap());
            }
        }
        if page == Some(PAGE) || path.split('?').next() == Some("/login") {
            let token: u128 = rand::random();
            response.headers_mut().append(
                "set-cookie",
                format!("datadome={token:032x}; Max-Age=3600; Path=/; Secure; SameSite=Lax")
                    .parse()
                    .unwrap(),
            );
        }
        response
    }
}

/// `/page`: three requests to the same host, each after the last answer
/// (and no favicon request, which could come before them).
/// `/large-page`: fetches `/large`, then `/after` (on the same connection),
/// then writes `fetched` and the large body's length into the page.
const LARGE_PAGE: &str = "<!doctype html><html><head><link rel=\"icon\" href=\"data:,\"></head>
<body><p id=\"out\">waiting</p><script>
(async () => {
  const large = await (await fetch('/large')).text();
  await (await fetch('/after')).text();
  document.getElementById('out').textContent = 'fetched ' + large.length;
})();
</script></body></html>
";

const PAGE: &str = "<!doctype html><html><head><link rel=\"icon\" href=\"data:,\"></head>
<body><p id=\"out\">waiting</p><script>
(async () => {
  const answers = [];
  for (const n of [1, 2, 3]) {
    const response = await fetch('/fetched?' + n);
    answers.push((await response.text()).trim());
  }
  document.getElementById('out').textContent = 'fetched ' + answers.join(' | ');
})();
</script></body></html>
";

/// What a [`Tap`] shows the bytes read through it.
trait Observer {
    /// The next bytes read.
    fn observe(&mut self, bytes: &[u8]);
    /// Whether it has seen all it wants (later bytes are not copied).
    fn done(&self) -> bool;
}

/// A stream that shows the bytes read through it to an [`Observer`] and
/// passes everything through unchanged.
struct Tap<T, O> {
    inner: T,
    observer: O,
}

impl<T, O> Tap<T, O> {
    fn new(inner: T, observer: O) -> Tap<T, O> {
        Tap { inner, observer }
    }
}

impl<T: AsyncRead + Unpin, O: Observer + Unpin> AsyncRead for Tap<T, O> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if !this.observer.done() {
            this.observer.observe(&buf.filled()[before..]);
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin, O: Unpin> AsyncWrite for Tap<T, O> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Reads the frames of an HTTP/2 client connection as they pass (a
/// [`Tap`]'s observer) and records each header block (HEADERS and its
/// CONTINUATIONs) in its connection's [`ConnRecord::blocks`], read by a
/// [`BlockReader`]: every field's name and representation, and whether its
/// value was Huffman-coded (values are not decoded). Frames other than HEADERS and
/// CONTINUATION are skipped; bytes that do not parse as frames end the
/// recording, not the connection.
struct Blocks {
    /// Read but not yet parsed: the preface, then at most one frame.
    pending: Vec<u8>,
    preface_seen: bool,
    /// The block being gathered, until its END_HEADERS.
    block: Vec<u8>,
    reader: BlockReader,
    index: usize,
    log: Arc<Mutex<Log>>,
    failed: bool,
    /// The first HEADERS has been read: [`ConnRecord::opening`] is whole.
    opened: bool,
}

/// A count the origin raises and tests wait on.
type Counter = Arc<watch::Sender<usize>>;

/// Counts its recorded connection as ended when dropped: when `serve`
/// returns, or its task is dropped.
struct EndOnDrop(Arc<watch::Sender<usize>>);

impl Drop for EndOnDrop {
    fn drop(&mut self) {
        self.0.send_modify(|ended| *ended += 1);
    }
}

/// Records the TLS records a client sends, as [`ConnRecord::records`].
struct TlsRecords {
    /// The header of the record being read, as far as it has come.
    head: Vec<u8>,
    /// Bytes of the current record's body still to skip.
    skip: usize,
    index: usize,
    log: Arc<Mutex<Log>>,
    seen: usize,
}

impl TlsRecords {
    fn new(index: usize, log: Arc<Mutex<Log>>) -> TlsRecords {
        TlsRecords {
            head: Vec::with_capacity(5),
            skip: 0,
            index,
            log,
            seen: 0,
        }
    }
}

impl Observer for TlsRecords {
    fn observe(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() && !self.done() {
            if self.skip > 0 {
                let n = self.skip.min(bytes.len());
                self.skip -= n;
                bytes = &bytes[n..];
                continue;
            }
            let n = (5 - self.head.len()).min(bytes.len());
            self.head.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            if self.head.len() == 5 {
                let len = u16::from_be_bytes([self.head[3], self.head[4]]);
                self.log.lock().unwrap().conns[self.index]
                    .records
                    .push((self.head[0], len));
                self.seen += 1;
                self.skip = usize::from(len);
                self.head.clear();
            }
        }
    }

    fn done(&self) -> bool {
        self.seen >= RECORDS_KEPT
    }
}

/// A frame's type as [`ConnRecord::opening`] lists it.
fn frame_label(kind: u8, flags: u8) -> &'static str {
    const ACK: u8 = 0x1;
    match (kind, flags & ACK != 0) {
        (0x0, _) => "DATA",
        (0x1, _) => "HEADERS",
        (0x2, _) => "PRIORITY",
        (0x3, _) => "RST_STREAM",
        (0x4, false) => "SETTINGS",
        (0x4, true) => "SETTINGS+ACK",
        (0x6, false) => "PING",
        (0x6, true) => "PING+ACK",
        (0x7, _) => "GOAWAY",
        (0x8, _) => "WINDOW_UPDATE",
        (0x9, _) => "CONTINUATION",
        _ => "OTHER",
    }
}

impl Blocks {
    fn new(index: usize, log: Arc<Mutex<Log>>) -> Blocks {
        Blocks {
            pending: Vec::new(),
            preface_seen: false,
            block: Vec::new(),
            reader: BlockReader::new(),
            index,
            log,
            failed: false,
            opened: false,
        }
    }

    /// One frame's payload.
    fn frame(
        &mut self,
        (kind, flags, stream): (u8, u8, u32),
        mut payload: &[u8],
    ) -> Result<(), &'static str> {
        const HEADERS: u8 = 0x1;
        const WINDOW_UPDATE: u8 = 0x8;
        const CONTINUATION: u8 = 0x9;
        const END_HEADERS: u8 = 0x4;
        const PADDED: u8 = 0x8;
        const PRIORITY: u8 = 0x20;
        if !self.opened {
            self.opened = kind == HEADERS;
            self.log.lock().unwrap().conns[self.index]
                .opening
                .push(frame_label(kind, flags));
        } else if kind == WINDOW_UPDATE {
            let bytes = payload.get(..4).ok_or("short WINDOW_UPDATE")?;
            let increment = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
            let mut log = self.log.lock().unwrap();
            let updates = &mut log.conns[self.index].window_updates;
            if updates.len() < WINDOW_UPDATES_KEPT {
                updates.push((stream, increment & 0x7fff_ffff));
            }
        }
        match kind {
            HEADERS => {
                if flags & PADDED != 0 {
                    let (&pad, rest) = payload.split_first().ok_or("short HEADERS")?;
                    let end = rest.len().checked_sub(usize::from(pad));
                    payload = &rest[..end.ok_or("bad padding")?];
                }
                let mut priority = None;
                if flags & PRIORITY != 0 {
                    let fields = payload.get(..5).ok_or("short HEADERS")?;
                    let word = u32::from_be_bytes([fields[0], fields[1], fields[2], fields[3]]);
                    priority = Some((
                        word >> 31 == 1,
                        word & 0x7fff_ffff,
                        u16::from(fields[4]) + 1,
                    ));
                    payload = &payload[5..];
                }
                self.log.lock().unwrap().conns[self.index]
                    .priorities
                    .push(priority);
                self.block = payload.to_vec();
            }
            CONTINUATION => self.block.extend_from_slice(payload),
            _ => return Ok(()),
        }
        if flags & END_HEADERS != 0 {
            let fields = self.reader.read(&self.block)?;
            self.log.lock().unwrap().conns[self.index]
                .blocks
                .push(fields);
        }
        Ok(())
    }
}

impl Observer for Blocks {
    fn observe(&mut self, bytes: &[u8]) {
        if self.failed {
            return;
        }
        self.pending.extend_from_slice(bytes);
        if !self.preface_seen {
            if self.pending.len() < PREFACE.len() {
                return;
            }
            if !self.pending.starts_with(PREFACE) {
                self.failed = true;
                return;
            }
            self.pending.drain(..PREFACE.len());
            self.preface_seen = true;
        }
        while self.pending.len() >= 9 {
            let len = usize::from(self.pending[0]) << 16
                | usize::from(self.pending[1]) << 8
                | usize::from(self.pending[2]);
            if self.pending.len() < 9 + len {
                return;
            }
            let (kind, flags) = (self.pending[3], self.pending[4]);
            let stream = u32::from_be_bytes([
                self.pending[5],
                self.pending[6],
                self.pending[7],
                self.pending[8],
            ]) & 0x7fff_ffff;
            let frame: Vec<u8> = self.pending.drain(..9 + len).collect();
            if let Err(e) = self.frame((kind, flags, stream), &frame[9..]) {
                eprintln!("origin: cannot read a header block: {e}");
                self.failed = true;
                return;
            }
        }
    }

    fn done(&self) -> bool {
        self.failed
    }
}

/// Keeps the bytes read (a [`Tap`]'s observer) until they hold a whole
/// HTTP/1.1 request head, then records that head's header names (in case
/// and order) and looks no further.
struct HeadNames {
    head: Option<Vec<u8>>,
    names: Arc<OnceLock<Vec<String>>>,
}

impl HeadNames {
    fn new(names: Arc<OnceLock<Vec<String>>>) -> HeadNames {
        HeadNames {
            head: Some(Vec::new()),
            names,
        }
    }
}

impl Observer for HeadNames {
    fn observe(&mut self, bytes: &[u8]) {
        let Some(head) = self.head.as_mut() else {
            return;
        };
        head.extend_from_slice(bytes);
        match h1_order::header_names(head) {
            Ok(None) if head.len() < MAX_HEAD => {}
            Ok(Some(names)) => {
                let _ = self.names.set(names);
                self.head = None;
            }
            Ok(None) | Err(_) => self.head = None,
        }
    }

    fn done(&self) -> bool {
        self.head.is_none()
    }
}
