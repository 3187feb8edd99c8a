//! A test origin that behaves like an anti-bot edge.
//!
//! It issues signed tokens bound to the TCP peer address that earned them
//! (`/login`, `/rotate`), answers 403 when a token comes back from another
//! address (and counts that as a leak), and records every request it sees:
//! peer address, path and headers, so tests can assert on what really
//! arrived. It serves HTTPS with its own test CA, and plain HTTP.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::TcpListener;

/// Cookie names the origin signs (and checks) by default.
pub const SIGNED_COOKIES: &[&str] = &[
    "datadome",
    "cf_clearance",
    "_abck",
    "bm_sz",
    "__cf_bm",
    "incap_ses_1_2",
    "_px3",
];

/// A test CA with a certificate for the origin.
pub struct TestPki {
    /// PEM of the test CA (give it to pinproxy as --upstream-ca).
    pub ca_pem: String,
    /// File holding `ca_pem`.
    pub ca_file: PathBuf,
    chain: Vec<CertificateDer<'static>>,
    key_der: Vec<u8>,
    _dir: tempfile::TempDir,
}

impl TestPki {
    /// A fresh CA and a leaf for localhost, origin.test, 127.0.0.1 and ::1.
    pub fn new() -> TestPki {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "pinproxy test origin CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);

        let leaf_key = KeyPair::generate().unwrap();
        let leaf_params = CertificateParams::new(vec![
            "localhost".to_string(),
            "origin.test".to_string(),
            "127.0.0.1".to_string(),
            "::1".to_string(),
        ])
        .unwrap();
        let leaf = leaf_params.signed_by(&leaf_key, &issuer).unwrap();

        let dir = tempfile::tempdir().unwrap();
        let ca_file = dir.path().join("origin-ca.pem");
        std::fs::write(&ca_file, ca_cert.pem()).unwrap();
        TestPki {
            ca_pem: ca_cert.pem(),
            ca_file,
            chain: vec![leaf.der().clone(), ca_cert.der().clone()],
            key_der: leaf_key.serialize_der(),
            _dir: dir,
        }
    }

    /// A rustls server configuration serving the leaf, offering `alpn`.
    pub fn server_config(&self, alpn: &[&[u8]]) -> Arc<rustls::ServerConfig> {
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            self.chain.clone(),
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone())),
        )
        .unwrap();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }
}

/// One request as the origin saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    /// TCP peer address (the exit's egress address).
    pub peer: IpAddr,
    /// TCP peer port: requests with the same one shared a connection.
    pub peer_port: u16,
    /// HTTP version of the request.
    pub version: http::Version,
    /// Method.
    pub method: String,
    /// Path and query.
    pub path: String,
    /// Every header, in order, names lowercased.
    pub headers: Vec<(String, String)>,
    /// Signed cookies presented, as (name, address they are bound to).
    pub tokens: Vec<(String, IpAddr)>,
}

impl Seen {
    /// Values of header `name`.
    pub fn header(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// What a test can observe of the origin.
#[derive(Default)]
pub struct OriginLog {
    /// Every request, in arrival order.
    pub seen: Vec<Seen>,
    /// Tokens presented from an address other than the one they are bound to.
    pub leaks: Vec<(String, IpAddr, IpAddr)>,
}

/// Headers that reveal a client address or a proxy chain: every name
/// pinproxy strips (tests/egress_headers.rs checks this list covers
/// production's), written out here so a name dropped from production's
/// list is still caught.
pub const FORWARDING_HEADERS: &[&str] = &[
    "forwarded",
    "forwarded-for",
    "x-forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-forwarded-port",
    "x-forwarded-server",
    "x-forwarded-scheme",
    "x-original-forwarded-for",
    "x-real-ip",
    "true-client-ip",
    "client-ip",
    "x-client-ip",
    "x-cluster-client-ip",
    "x-originating-ip",
    "x-remote-ip",
    "x-remote-addr",
    "cf-connecting-ip",
    "fastly-client-ip",
    "proxy-client-ip",
    "wl-proxy-client-ip",
    "x-proxyuser-ip",
    "x-envoy-external-address",
    "via",
    "proxy-authorization",
    "proxy-connection",
];

/// A running test origin.
pub struct Origin {
    /// HTTPS address.
    pub https: SocketAddr,
    /// Plain HTTP address.
    pub http: SocketAddr,
    /// The PKI (CA file for pinproxy's --upstream-ca).
    pub pki: Arc<TestPki>,
    log: Arc<Mutex<OriginLog>>,
    held: Arc<tokio::sync::Semaphore>,
    arrivals: tokio::sync::watch::Receiver<u64>,
    streamed: Arc<std::sync::atomic::AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Origin {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

struct State {
    secret: [u8; 32],
    log: Arc<Mutex<OriginLog>>,
    held: Arc<tokio::sync::Semaphore>,
    /// Counts requests seen, for waiting on one without polling.
    arrived: tokio::sync::watch::Sender<u64>,
    /// Bytes `/bytes` answers have handed to their connections.
    streamed: Arc<std::sync::atomic::AtomicU64>,
}

impl Origin {
    /// Starts an HTTPS origin (HTTP/2 and HTTP/1.1) and a plain HTTP one on 127.0.0.1.
    pub async fn start() -> Origin {
        Origin::start_offering(&[b"h2", b"http/1.1"]).await
    }

    /// Starts an origin whose HTTPS side speaks HTTP/1.1 only.
    pub async fn start_http1_only() -> Origin {
        Origin::start_offering(&[b"http/1.1"]).await
    }

    async fn start_offering(alpn: &[&[u8]]) -> Origin {
        let pki = Arc::new(TestPki::new());
        let log = Arc::new(Mutex::new(OriginLog::default()));
        let held = Arc::new(tokio::sync::Semaphore::new(0));
        let (arrived, arrivals) = tokio::sync::watch::channel(0);
        let streamed = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let state = Arc::new(State {
            secret: rand::random(),
            log: log.clone(),
            held: held.clone(),
            arrived,
            streamed: streamed.clone(),
        });
        let tls = tokio_rustls::TlsAcceptor::from(pki.server_config(alpn));

        let https_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let https = https_listener.local_addr().unwrap();
        let http = http_listener.local_addr().unwrap();

        let https_state = state.clone();
        let https_task = tokio::spawn(async move {
            loop {
                let Ok((tcp, peer)) = https_listener.accept().await else {
                    return;
                };
                let tls = tls.clone();
                let state = https_state.clone();
                tokio::spawn(async move {
                    let Ok(stream) = tls.accept(tcp).await else {
                        return;
                    };
                    serve(TokioIo::new(stream), peer, state).await;
                });
            }
        });
        let http_state = state.clone();
        let http_task = tokio::spawn(async move {
            loop {
                let Ok((tcp, peer)) = http_listener.accept().await else {
                    return;
                };
                let state = http_state.clone();
                tokio::spawn(async move { serve(TokioIo::new(tcp), peer, state).await });
            }
        });
        Origin {
            https,
            http,
            pki,
            log,
            held,
            arrivals,
            streamed,
            tasks: vec![https_task, http_task],
        }
    }

    /// How many bytes `/bytes` answers have handed to their connections
    /// so far (they stop when the reader stops reading).
    pub fn bytes_streamed(&self) -> u64 {
        self.streamed.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A snapshot of everything seen.
    pub fn seen(&self) -> Vec<Seen> {
        self.log.lock().unwrap().seen.clone()
    }

    /// Lets `n` requests held at `/held` answer.
    pub fn release_held(&self, n: usize) {
        self.held.add_permits(n);
    }

    /// Waits (bounded: 10 s) until a request for `path` has arrived, and
    /// returns it.
    pub async fn wait_for(&self, path: &str) -> Seen {
        let mut arrivals = self.arrivals.clone();
        let found = tokio::time::timeout(std::time::Duration::from_secs(10), async {
            loop {
                arrivals.borrow_and_update();
                if let Some(seen) = self.seen().into_iter().find(|s| s.path == path) {
                    return seen;
                }
                arrivals.changed().await.unwrap();
            }
        })
        .await;
        found.unwrap_or_else(|_| panic!("{path} never reached the origin"))
    }

    /// Waits (bounded: 10 s) until `n` requests for `path` have arrived.
    pub async fn wait_for_many(&self, path: &str, n: usize) {
        let mut arrivals = self.arrivals.clone();
        let arrived = tokio::time::timeout(std::time::Duration::from_secs(10), async {
            loop {
                arrivals.borrow_and_update();
                if self.seen().iter().filter(|s| s.path == path).count() >= n {
                    return;
                }
                arrivals.changed().await.unwrap();
            }
        })
        .await;
        arrived.unwrap_or_else(|_| panic!("{n} requests for {path} never reached the origin"));
    }

    /// Tokens presented from the wrong address: (cookie, bound to, seen from).
    pub fn leaks(&self) -> Vec<(String, IpAddr, IpAddr)> {
        self.log.lock().unwrap().leaks.clone()
    }

    /// Requests that arrived carrying a forwarding or proxy header.
    pub fn forwarded_header_hits(&self) -> Vec<(String, String)> {
        self.seen()
            .iter()
            .flat_map(|s| {
                s.headers
                    .iter()
                    .filter(|(n, _)| FORWARDING_HEADERS.contains(&n.as_str()))
                    .cloned()
                    .collect::<Vec<_>>()
            })
            .collect()
    }
}

async fn serve<T>(io: TokioIo<T>, peer: SocketAddr, state: Arc<State>)
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |request: Request<Incoming>| {
        let state = state.clone();
        async move { Ok::<_, Infallible>(handle(request, peer, &state).await) }
    });
    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
        .serve_connection_with_upgrades(io, service)
        .await;
}

fn sign(secret: &[u8; 32], ip: IpAddr, nonce: u64) -> String {
    let mac = blake3::keyed_hash(secret, format!("{ip}|{nonce}").as_bytes());
    format!("{ip}~{nonce:x}~{}", &mac.to_hex()[..16])
}

/// The address a token is bound to, if the token is genuine.
fn verify(secret: &[u8; 32], token: &str) -> Option<IpAddr> {
    let mut parts = token.split('~');
    let ip: IpAddr = parts.next()?.parse().ok()?;
    let nonce = u64::from_str_radix(parts.next()?, 16).ok()?;
    (sign(secret, ip, nonce) == token).then_some(ip)
}

fn query(path: &str) -> HashMap<String, String> {
    path.split_once('?')
        .map(|(_, q)| {
            q.split('&')
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect()
        })
        .unwrap_or_default()
}

/// The origin's response body.
type Out = BoxBody<Bytes, Infallible>;

/// 64 KiB of filler for streamed bodies.
static CHUNK: [u8; 64 * 1024] = [b'x'; 64 * 1024];

fn text(status: StatusCode, body: String) -> Response<Out> {
    let mut response = Response::new(Full::new(Bytes::from(body)).boxed());
    *response.status_mut() = status;
    response
}

fn html(body: &str) -> Response<Out> {
    let mut response = text(
        StatusCode::OK,
        format!("<!doctype html><html><body>{body}</body></html>\n"),
    );
    response
        .headers_mut()
        .insert("content-type", "text/html; charset=utf-8".parse().unwrap());
    response
}

async fn handle(
    mut request: Request<Incoming>,
    peer_addr: SocketAddr,
    state: &State,
) -> Response<Out> {
    let peer = peer_addr.ip();
    let path = request
        .uri()
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_default();
    let headers: Vec<(String, String)> = request
        .headers()
        .iter()
        .map(|(n, v)| {
            (
                n.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();

    // Every signed token presented, from cookies and DataDome's header.
    let mut presented: Vec<(String, String)> = Vec::new();
    for value in request.headers().get_all("cookie") {
        for pair in value.to_str().unwrap_or("").split(';') {
            if let Some((name, value)) = pair.trim().split_once('=') {
                if SIGNED_COOKIES.contains(&name) || name.starts_with("session_") {
                    presented.push((name.to_owned(), value.to_owned()));
                }
            }
        }
    }
    if let Some(v) = request.headers().get("x-datadome-clientid") {
        presented.push(("datadome".into(), v.to_str().unwrap_or("").to_owned()));
    }
    let mut tokens = Vec::new();
    let tokens_seen: Vec<(String, IpAddr)>;
    let mut leaked = false;
    {
        let mut log = state.log.lock().unwrap();
        for (name, token) in &presented {
            if let Some(bound) = verify(&state.secret, token) {
                tokens.push((name.clone(), bound));
                if bound != peer {
                    log.leaks.push((name.clone(), bound, peer));
                    leaked = true;
                }
            }
        }
        tokens_seen = tokens.clone();
        log.seen.push(Seen {
            peer,
            peer_port: peer_addr.port(),
            version: request.version(),
            method: request.method().to_string(),
            path: path.clone(),
            headers,
            tokens,
        });
    }
    state.arrived.send_modify(|n| *n += 1);
    if leaked {
        return text(
            StatusCode::FORBIDDEN,
            "blocked: token presented from another address\n".into(),
        );
    }

    let params = query(&path);
    let route = path.split('?').next().unwrap_or("/").to_owned();
    let mut response = match route.as_str() {
        "/login" | "/rotate" => {
            // `?held`: answered only once the test releases it (see `/held`).
            if params.contains_key("held") {
                wait_until_released(state).await;
            }
            let name = params
                .get("name")
                .cloned()
                .unwrap_or_else(|| "datadome".into());
            let token = sign(&state.secret, peer, rand::random());
            let mut response = text(StatusCode::OK, format!("ok {peer}\n"));
            response.headers_mut().append(
                "set-cookie",
                format!("{name}={token}; Max-Age=3600; Path=/; Secure; SameSite=Lax")
                    .parse()
                    .unwrap(),
            );
            response
                .headers_mut()
                .append("set-cookie", "_ga=untracked; Path=/".parse().unwrap());
            response
        }
        // Sets the `datadome` the request presented again, unchanged, for
        // another hour (a sliding session).
        "/refresh" => {
            let mut response = text(StatusCode::OK, format!("ok {peer}\n"));
            if let Some((_, token)) = presented.iter().find(|(name, _)| name == "datadome") {
                response.headers_mut().append(
                    "set-cookie",
                    format!("datadome={token}; Max-Age=3600; Path=/").parse().unwrap(),
                );
            }
            response
        }
        "/x-set-cookie" => {
            let token = sign(&state.secret, peer, rand::random());
            let mut response = text(StatusCode::OK, format!("ok {peer}\n"));
            response.headers_mut().insert(
                "x-set-cookie",
                format!("datadome={token}; Max-Age=3600").parse().unwrap(),
            );
            response
        }
        // Anti-bot verdicts, as the edges send them; a held one once the
        // test lets it answer ([`Origin::release_held`]).
        "/challenge" | "/held-challenge" => {
            if route == "/held-challenge" {
                wait_until_released(state).await;
            }
            text(
            StatusCode::FORBIDDEN,
            "<html><script>var dd={'rt':'c','cid':'AHrl','hsh':'2211','t':'fe','host':'geo.captcha-delivery.com'}</script>\
             <script src=\"https://ct.captcha-delivery.com/c.js\"></script></html>\n"
                .into(),
            )
        }
        "/blocked" => text(
            StatusCode::FORBIDDEN,
            "<html><script>var dd={'rt':'c','cid':'AHrl','hsh':'2211','t':'bv','host':'geo.captcha-delivery.com'}</script></html>\n".into(),
        ),
        "/cf-challenge" => {
            // `?held`: answered only once the test releases it.
            if params.contains_key("held") {
                wait_until_released(state).await;
            }
            let mut response = text(StatusCode::FORBIDDEN, "<title>Just a moment...</title>\n".into());
            response
                .headers_mut()
                .insert("cf-mitigated", "challenge".parse().unwrap());
            response
        }
        "/unauthorized" => text(StatusCode::UNAUTHORIZED, "log in again\n".into()),
        "/forbidden" => text(StatusCode::FORBIDDEN, "plain forbidden, no challenge\n".into()),
        // Sets `n` tracked cookies (`_px3_0`, `_px3_1`, ...) whose names
        // are `name_len` bytes long at least.
        "/set-many" => {
            let n: usize = params.get("n").and_then(|v| v.parse().ok()).unwrap_or(1);
            let len: usize = params.get("name_len").and_then(|v| v.parse().ok()).unwrap_or(0);
            let mut response = text(StatusCode::OK, "set\n".into());
            for i in 0..n {
                let mut name = format!("_px3_{i}");
                while name.len() < len {
                    name.push('x');
                }
                response
                    .headers_mut()
                    .append("set-cookie", format!("{name}=v; Max-Age=3600").parse().unwrap());
            }
            response
        }
        // A DataDome challenge after `pad` bytes of padding, each byte a
        // frame (a chunk) of its own: an edge that trickles its answer.
        "/challenge-dripped" => {
            let pad: usize = params.get("pad").and_then(|v| v.parse().ok()).unwrap_or(0);
            let mut page = vec![b' '; pad];
            page.extend_from_slice(b"<script src=\"https://ct.captcha-delivery.com/c.js\"></script>\n");
            let page = Bytes::from(page);
            let frames = (0..page.len()).map(move |i| Ok::<_, Infallible>(Frame::data(page.slice(i..i + 1))));
            let mut response = Response::new(StreamBody::new(futures_util::stream::iter(frames)).boxed());
            *response.status_mut() = StatusCode::FORBIDDEN;
            response
        }
        "/ip" => text(StatusCode::OK, format!("{peer}\n")),
        // A browser flow: a page that sets the IP-bound cookie, then a chain
        // of script-driven navigations, each page reporting what it saw.
        "/browser/start" => {
            let token = sign(&state.secret, peer, rand::random());
            let mut response = html(&format!(
                "<p>start from {peer}</p><script>location.href='/browser/next?n=1'</script>"
            ));
            response.headers_mut().append(
                "set-cookie",
                format!("datadome={token}; Max-Age=3600; Path=/; Secure; SameSite=Lax")
                    .parse()
                    .unwrap(),
            );
            response
        }
        "/browser/next" => {
            let n: u32 = params.get("n").and_then(|v| v.parse().ok()).unwrap_or(0);
            let next = if n >= 3 {
                "/browser/done".to_owned()
            } else {
                format!("/browser/next?n={}", n + 1)
            };
            html(&format!(
                "<p>step {n} from {peer} with {count} token(s)</p><script>location.href='{next}'</script>",
                count = presented.len()
            ))
        }
        "/browser/done" => html(&format!(
            "<p id=done>done from {peer} over {version:?} with {count} token(s)</p>",
            version = request.version(),
            count = presented.len()
        )),
        "/ws" => websocket_echo(&mut request, peer),
        // Counts the body as it streams in: never holds it.
        // The trailers the request's body ended with, a line each.
        "/echo-trailers" => {
            let mut body = request.into_body();
            let mut lines = String::new();
            while let Some(Ok(frame)) = body.frame().await {
                if let Some(trailers) = frame.trailers_ref() {
                    for (name, value) in trailers {
                        let value = value.to_str().unwrap_or("?");
                        lines.push_str(&format!("{name}: {value}\n"));
                    }
                }
            }
            text(StatusCode::OK, lines)
        }
        "/sink" => {
            let mut body = request.into_body();
            let mut received = 0usize;
            while let Some(Ok(frame)) = body.frame().await {
                received += frame.data_ref().map_or(0, |d| d.len());
            }
            text(StatusCode::OK, format!("{received}\n"))
        }
        // Streams `n` bytes, generated as they go.
        "/bytes" => {
            let n: usize = params.get("n").and_then(|v| v.parse().ok()).unwrap_or(0);
            let streamed = state.streamed.clone();
            let chunks = (0..n.div_ceil(CHUNK.len())).map(move |i| {
                let len = CHUNK.len().min(n - i * CHUNK.len());
                streamed.fetch_add(len as u64, std::sync::atomic::Ordering::Relaxed);
                Ok::<_, Infallible>(Frame::data(Bytes::from_static(&CHUNK[..len])))
            });
            Response::new(StreamBody::new(futures_util::stream::iter(chunks)).boxed())
        }
        // Waits `head_ms` before answering, sends "a", waits `body_ms`,
        // then sends "b": an answer that keeps its connection busy without
        // a byte moving.
        "/pause" => {
            let ms = |name: &str| -> u64 { params.get(name).and_then(|v| v.parse().ok()).unwrap_or(0) };
            let (head_ms, body_ms) = (ms("head_ms"), ms("body_ms"));
            tokio::time::sleep(std::time::Duration::from_millis(head_ms)).await;
            let frames = futures_util::StreamExt::then(futures_util::stream::iter([0u8, 1]), move |i| async move {
                if i == 1 {
                    tokio::time::sleep(std::time::Duration::from_millis(body_ms)).await;
                }
                Ok::<_, Infallible>(Frame::data(Bytes::from_static(if i == 0 { b"a" } else { b"b" })))
            });
            Response::new(StreamBody::new(frames).boxed())
        }
        // Answers once the test lets it ([`Origin::release_held`]), or
        // after 30 s: a request that is known to have arrived and whose
        // answer comes when the test has changed something.
        "/held" => {
            wait_until_released(state).await;
            text(StatusCode::OK, format!("ok {peer}\n"))
        }
        "/status" => {
            let code = params.get("code").and_then(|c| c.parse().ok()).unwrap_or(200);
            let mut response = Response::new(Empty::new().boxed());
            *response.status_mut() = StatusCode::from_u16(code).unwrap();
            response
        }
        // A body followed by trailers, two of them cookies set where
        // capture does not look.
        "/trailers" => {
            let mut trailers = http::HeaderMap::new();
            trailers.insert("set-cookie", "datadome=in-a-trailer".parse().unwrap());
            trailers.insert("x-checksum", "abc123".parse().unwrap());
            trailers.insert("x-set-cookie", "datadome=in-a-trailer".parse().unwrap());
            let frames = vec![
                Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"payload"))),
                Ok(Frame::trailers(trailers)),
            ];
            let mut response = Response::new(StreamBody::new(futures_util::stream::iter(frames)).boxed());
            response.headers_mut().insert("trailer", "x-checksum".parse().unwrap());
            response
        }
        _ => text(StatusCode::OK, format!("ok {peer}\n")),
    };
    // What the request carried, for the client to check (see `carried`):
    // a cookie routed by its pin but dropped on the way shows no leak.
    if !tokens_seen.is_empty() {
        let listed: Vec<String> = tokens_seen
            .iter()
            .map(|(name, bound)| format!("{name}@{bound}"))
            .collect();
        if let Ok(value) = listed.join(", ").parse() {
            response.headers_mut().insert(CARRIED_HEADER, value);
        }
    }
    response
}

/// The response header in which the origin lists the signed tokens a
/// request presented, as `name@address-it-is-bound-to`.
pub const CARRIED_HEADER: &str = "x-origin-tokens";

/// The signed tokens the origin saw on the request `reply` answers, as
/// (name, address each is bound to).
pub fn carried(reply: &super::client::Reply) -> Vec<(String, IpAddr)> {
    let Some(value) = reply.headers.get(CARRIED_HEADER) else {
        return Vec::new();
    };
    value
        .to_str()
        .unwrap()
        .split(", ")
        .map(|pair| {
            let (name, bound) = pair.rsplit_once('@').unwrap();
            (name.to_owned(), bound.parse().unwrap())
        })
        .collect()
}

/// Asserts that `reply` is the origin's 200 to a request that left from
/// `earned` and carried the token `name` earned there: routed by its pin
/// and delivered, not routed and dropped.
#[track_caller]
pub fn assert_carried(reply: &super::client::Reply, name: &str, earned: IpAddr) {
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(
        reported_peer(&reply.body),
        Some(earned),
        "left from another exit"
    );
    assert!(
        carried(reply).contains(&(name.to_owned(), earned)),
        "the origin saw no {name} earned at {earned}: {:?}",
        carried(reply)
    );
}

/// Accepts a WebSocket upgrade and echoes every message, prefixing text
/// with the peer address the upgrade came from.
fn websocket_echo(request: &mut Request<Incoming>, peer: IpAddr) -> Response<Out> {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::protocol::{Message, Role};
    let Some(key) = request.headers().get("sec-websocket-key").cloned() else {
        return text(StatusCode::BAD_REQUEST, "not a websocket upgrade\n".into());
    };
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let on_upgrade = hyper::upgrade::on(request);
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
            TokioIo::new(upgraded),
            Role::Server,
            None,
        )
        .await;
        while let Some(Ok(message)) = ws.next().await {
            let reply = match message {
                Message::Text(t) => Message::text(format!("{peer} {t}")),
                Message::Binary(b) => Message::Binary(b),
                Message::Close(_) => break,
                _ => continue,
            };
            if ws.send(reply).await.is_err() {
                break;
            }
        }
    });
    let mut response = Response::new(Full::new(Bytes::new()).boxed());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert("upgrade", "websocket".parse().unwrap());
    headers.insert("connection", "Upgrade".parse().unwrap());
    headers.insert("sec-websocket-accept", accept.parse().unwrap());
    response
}

/// Parses the peer address an origin reply reports (`ok 127.0.0.2`).
pub fn reported_peer(body: &str) -> Option<IpAddr> {
    body.trim().strip_prefix("ok ")?.parse().ok()
}

/// Waits (at most 30 s) until the test releases one held request
/// ([`Origin::release_held`]).
async fn wait_until_released(state: &State) {
    let permit =
        tokio::time::timeout(std::time::Duration::from_secs(30), state.held.acquire()).await;
    if let Ok(Ok(permit)) = permit {
        permit.forget();
    }
}
