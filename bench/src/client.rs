//! The client side shared by the load generator and the probes: reaching the
//! origin directly or through an HTTP proxy with `CONNECT`, TLS, and HTTP/1.1
//! (or HTTP/2, when TLS negotiated it) requests on the resulting connection.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use http::{HeaderValue, Request};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// Largest `CONNECT` answer head accepted.
const MAX_CONNECT_REPLY: usize = 16 * 1024;

/// How a client reaches the origin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// A TCP connection straight to the origin.
    Direct,
    /// A `CONNECT` tunnel through the HTTP proxy at this address.
    Proxy(SocketAddr),
}

/// The origin: the name used for `CONNECT`, SNI and `Host`, and the address
/// dialled when going direct.
#[derive(Debug, Clone)]
pub struct Target {
    /// Host name (or IP literal).
    pub host: String,
    /// Port.
    pub port: u16,
    /// Address dialled by [`Via::Direct`].
    pub addr: SocketAddr,
}

impl Target {
    /// `host:port`, as sent in `CONNECT` and `Host`.
    pub fn authority(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// A request sender on one connection, of the protocol its TLS handshake
/// negotiated.
pub enum Sender {
    /// HTTP/1.1: one request at a time.
    Http1(http1::SendRequest<Empty<Bytes>>),
    /// HTTP/2 (the suite's workers still send one request at a time each).
    Http2(http2::SendRequest<Empty<Bytes>>),
}

impl Sender {
    /// Another handle on the same connection, for HTTP/2 (whose streams
    /// share it); `None` for HTTP/1.1, which carries one request at a time.
    pub fn share(&self) -> Option<Sender> {
        match self {
            Sender::Http1(_) => None,
            Sender::Http2(sender) => Some(Sender::Http2(sender.clone())),
        }
    }

    async fn send(
        &mut self,
        request: Request<Empty<Bytes>>,
    ) -> hyper::Result<http::Response<hyper::body::Incoming>> {
        match self {
            Sender::Http1(sender) => {
                sender.ready().await?;
                sender.send_request(request).await
            }
            Sender::Http2(sender) => {
                sender.ready().await?;
                sender.send_request(as_http2(request)).await
            }
        }
    }
}

/// `request` as a browser sends it over HTTP/2: its `Host` moved into the
/// URI, which hyper sends as `:authority` (with `:scheme` https). A request
/// without an authority reaches an HTTP/2 server with none, which a proxy
/// forwarding it cannot route.
fn as_http2(mut request: Request<Empty<Bytes>>) -> Request<Empty<Bytes>> {
    let Some(host) = request.headers_mut().remove(http::header::HOST) else {
        return request;
    };
    let path = request
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    let absolute = host
        .to_str()
        .ok()
        .and_then(|host| format!("https://{host}{path}").parse().ok());
    if let Some(uri) = absolute {
        *request.uri_mut() = uri;
    }
    request
}

/// Opens a TCP connection to `target`, through the proxy when `via` says
/// so, its `CONNECT` naming `session` when given.
pub async fn dial(via: Via, target: &Target, session: Option<&str>) -> Result<TcpStream> {
    let stream = match via {
        Via::Direct => TcpStream::connect(target.addr)
            .await
            .with_context(|| format!("connecting to {}", target.addr))?,
        Via::Proxy(proxy) => {
            let mut stream = TcpStream::connect(proxy)
                .await
                .with_context(|| format!("connecting to proxy {proxy}"))?;
            connect_tunnel(&mut stream, &target.authority(), session).await?;
            stream
        }
    };
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Sends `CONNECT authority` on `stream` and reads the proxy's answer,
/// failing unless it is 2xx. With `session`, the `CONNECT` names that
/// session key (`X-Pinproxy-Session`), which every request inside carries.
pub async fn connect_tunnel(
    stream: &mut TcpStream,
    authority: &str,
    session: Option<&str>,
) -> Result<()> {
    let session = session
        .map(|key| format!("X-Pinproxy-Session: {key}\r\n"))
        .unwrap_or_default();
    let request = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n{session}\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 512];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            bail!("the proxy closed the connection before answering CONNECT");
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut response = httparse::Response::new(&mut headers);
        match response.parse(&buf)? {
            httparse::Status::Complete(len) => {
                let code = response.code.unwrap_or(0);
                if !(200..300).contains(&code) {
                    bail!("the proxy answered CONNECT with {code}");
                }
                if len != buf.len() {
                    bail!("the proxy sent data after its CONNECT answer");
                }
                return Ok(());
            }
            httparse::Status::Partial if buf.len() > MAX_CONNECT_REPLY => {
                bail!("the proxy's CONNECT answer is too long")
            }
            httparse::Status::Partial => {}
        }
    }
}

/// Opens an HTTP/1.1-over-TLS connection to `target` and returns its sender;
/// the connection is driven by a spawned task and closes when the sender is
/// dropped.
pub async fn open(
    via: Via,
    target: &Target,
    tls: Arc<ClientConfig>,
    session: Option<&str>,
) -> Result<Sender> {
    let tcp = dial(via, target, session).await?;
    open_tls(tcp, &target.host, tls).await
}

/// TLS with SNI `host` over an open stream (a direct connection or a tunnel),
/// then the HTTP/1.1 handshake, or HTTP/2's when TLS negotiated `h2`.
pub async fn open_tls(tcp: TcpStream, host: &str, tls: Arc<ClientConfig>) -> Result<Sender> {
    let name = ServerName::try_from(host.to_owned()).map_err(|e| anyhow!("{host:?}: {e}"))?;
    let stream = TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .context("TLS handshake")?;
    let h2 = stream.get_ref().1.alpn_protocol() == Some(crate::tls::ALPN_H2);
    if h2 {
        let (sender, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        return Ok(Sender::Http2(sender));
    }
    let (sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(Sender::Http1(sender))
}

/// A GET request for `path` on `target`, with extra headers.
pub fn get_request(
    target: &Target,
    path: &str,
    extra: &[(&'static str, HeaderValue)],
) -> Result<Request<Empty<Bytes>>> {
    let mut builder = Request::get(path)
        .header(http::header::HOST, target.authority())
        .header(http::header::USER_AGENT, "pinbench/0")
        .header(http::header::ACCEPT, "*/*");
    for (name, value) in extra {
        builder = builder.header(*name, value.clone());
    }
    Ok(builder.body(Empty::new())?)
}

/// Sends `request` and reads the whole body; fails unless the status is 200.
/// Returns the body length.
pub async fn fetch(sender: &mut Sender, request: Request<Empty<Bytes>>) -> Result<usize> {
    Ok(fetch_reusable(sender, request).await?.0)
}

/// As [`fetch`], also telling whether the connection may carry another
/// request (`false` when the response said `Connection: close`).
pub async fn fetch_reusable(
    sender: &mut Sender,
    request: Request<Empty<Bytes>>,
) -> Result<(usize, bool)> {
    let response = sender.send(request).await?;
    let status = response.status();
    if status != http::StatusCode::OK {
        let why = response
            .headers()
            .get("x-pinproxy-error")
            .and_then(|v| v.to_str().ok())
            .map(|v| format!(" ({v})"))
            .unwrap_or_default();
        bail!("status {status}{why}");
    }
    let closing = response
        .headers()
        .get_all(http::header::CONNECTION)
        .iter()
        .any(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
    let body = response.into_body().collect().await?.to_bytes();
    Ok((body.len(), !closing))
}

/// A copy of `request` (bodies are empty, so this is cheap).
pub fn clone_request(request: &Request<Empty<Bytes>>) -> Request<Empty<Bytes>> {
    let mut copy = Request::new(Empty::new());
    *copy.method_mut() = request.method().clone();
    *copy.uri_mut() = request.uri().clone();
    *copy.headers_mut() = request.headers().clone();
    copy
}
