//! A scraper-like client that goes through pinproxy: CONNECT tunnels with
//! TLS trusting pinproxy's CA, or plain absolute-form requests; keep-alive
//! connections; and a minimal cookie jar.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A response, fully read.
#[derive(Debug)]
pub struct Reply {
    /// Status.
    pub status: StatusCode,
    /// Headers.
    pub headers: HeaderMap,
    /// Body as text.
    pub body: String,
    /// Trailers, if the response had any.
    pub trailers: Option<HeaderMap>,
}

impl Reply {
    /// The `X-Pinproxy-Error` header, if any.
    pub fn pinproxy_error(&self) -> Option<String> {
        self.headers
            .get("x-pinproxy-error")
            .map(|v| v.to_str().unwrap().to_owned())
    }
}

/// Opens connections through pinproxy.
#[derive(Clone)]
pub struct ProxyClient {
    /// pinproxy's address.
    pub proxy: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
}

/// One keep-alive connection: inside a tunnel, or a plain proxy connection.
pub struct Conn {
    sender: SendRequest<Full<Bytes>>,
    /// `Some("http://host:port")` for plain proxy connections (absolute-form).
    absolute_base: Option<String>,
    host: String,
}

/// A TLS client configuration that trusts the CA `ca_pem` and no other.
pub fn trusting(ca_pem: &str) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    let der: CertificateDer<'static> =
        rustls::pki_types::pem::PemObject::from_pem_slice(ca_pem.as_bytes()).unwrap();
    roots.add(der).unwrap();
    rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth()
}

impl ProxyClient {
    /// A client for the pinproxy at `proxy` whose CA is `ca_pem`.
    pub fn new(proxy: SocketAddr, ca_pem: &str) -> ProxyClient {
        ProxyClient {
            proxy,
            tls: Arc::new(trusting(ca_pem)),
        }
    }

    /// The same client, except that it never resumes a TLS session with
    /// pinproxy (as curl's and Python's single runs never do); the
    /// default one resumes on its later tunnels to a host, as rustls does.
    pub fn without_resumption(&self) -> ProxyClient {
        let mut tls = (*self.tls).clone();
        tls.resumption = rustls::client::Resumption::disabled();
        ProxyClient {
            proxy: self.proxy,
            tls: Arc::new(tls),
        }
    }

    /// Sends CONNECT `target` and returns the raw tunnel and the status line.
    pub async fn raw_connect(&self, target: &str) -> (TcpStream, String) {
        let mut tcp = TcpStream::connect(self.proxy).await.unwrap();
        tcp.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let head = read_head(&mut tcp).await;
        (tcp, head)
    }

    /// Opens a TLS tunnel to `host:port` through pinproxy, naming `user`
    /// (e.g. `session-KEY`) in the CONNECT's `Proxy-Authorization`.
    pub async fn tunnel_as(&self, user: &str, host: &str, port: u16) -> Conn {
        use base64::Engine as _;
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:x"));
        let target = format!("{host}:{port}");
        let mut tcp = TcpStream::connect(self.proxy).await.unwrap();
        tcp.write_all(
            format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nProxy-Authorization: Basic {token}\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
        let head = read_head(&mut tcp).await;
        assert!(
            head.starts_with("HTTP/1.1 200"),
            "CONNECT answered {head:?}"
        );
        self.tls_over(tcp, host, target).await
    }

    /// A raw TLS stream through a tunnel to `host:port`, offering `alpn`.
    pub async fn tls_stream(
        &self,
        host: &str,
        port: u16,
        alpn: &[&[u8]],
    ) -> tokio_rustls::client::TlsStream<TcpStream> {
        let (tcp, head) = self.raw_connect(&format!("{host}:{port}")).await;
        assert!(
            head.starts_with("HTTP/1.1 200"),
            "CONNECT answered {head:?}"
        );
        let mut config = (*self.tls).clone();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from(host.to_owned()).unwrap(), tcp)
            .await
            .expect("TLS through pinproxy")
    }

    /// A WebSocket to `wss://localhost:{port}/ws` through a tunnel (HTTP/1.1
    /// upgrade, no cookies), once the origin has answered `101`.
    pub async fn websocket(
        &self,
        port: u16,
    ) -> tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let tls = self.tls_stream("localhost", port, &[b"http/1.1"]).await;
        let request = format!("wss://localhost:{port}/ws")
            .into_client_request()
            .unwrap();
        let (ws, response) = tokio_tungstenite::client_async(request, tls).await.unwrap();
        assert_eq!(response.status(), 101);
        ws
    }

    async fn tls_over(&self, tcp: TcpStream, host: &str, target: String) -> Conn {
        let name = ServerName::try_from(host.to_owned()).unwrap();
        let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(name, tcp)
            .await
            .expect("TLS through pinproxy");
        Conn::handshake(TokioIo::new(tls), None, target).await
    }

    /// Opens a TLS tunnel to `host:port` through pinproxy.
    pub async fn tunnel(&self, host: &str, port: u16) -> Conn {
        let target = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        let (tcp, head) = self.raw_connect(&target).await;
        assert!(
            head.starts_with("HTTP/1.1 200"),
            "CONNECT answered {head:?}"
        );
        self.tls_over(tcp, host, target).await
    }

    /// A plain proxy connection for absolute-form `http://host:port` requests.
    pub async fn plain(&self, host: &str, port: u16) -> Conn {
        let tcp = TcpStream::connect(self.proxy).await.unwrap();
        let authority = format!("{host}:{port}");
        Conn::handshake(
            TokioIo::new(tcp),
            Some(format!("http://{authority}")),
            authority,
        )
        .await
    }
}

/// Reads an HTTP head (up to the blank line) byte by byte.
pub async fn read_head(tcp: &mut TcpStream) -> String {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        // A closed or reset connection ends the head (the caller checks it).
        if !matches!(tcp.read(&mut byte).await, Ok(1)) {
            break;
        }
        head.push(byte[0]);
    }
    String::from_utf8_lossy(&head).into_owned()
}

impl Conn {
    async fn handshake<T>(io: TokioIo<T>, absolute_base: Option<String>, host: String) -> Conn
    where
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(conn);
        Conn {
            sender,
            absolute_base,
            host,
        }
    }

    /// A request builder for `path` on this connection's origin.
    pub fn request(&self, method: &str, path: &str) -> http::request::Builder {
        let uri = match &self.absolute_base {
            Some(base) => format!("{base}{path}"),
            None => path.to_owned(),
        };
        Request::builder()
            .method(method)
            .uri(uri)
            .header("host", &self.host)
    }

    /// Sends a request and reads the whole reply.
    pub async fn send(&mut self, request: Request<Full<Bytes>>) -> Result<Reply, hyper::Error> {
        within_answer_limit(async {
            self.sender.ready().await?;
            let response = self.sender.send_request(request).await?;
            let (parts, body) = response.into_parts();
            let collected = body.collect().await?;
            let trailers = collected.trailers().cloned();
            let body = collected.to_bytes();
            Ok(Reply {
                status: parts.status,
                headers: parts.headers,
                body: String::from_utf8_lossy(&body).into_owned(),
                trailers,
            })
        })
        .await
    }

    /// GET `path` with extra headers.
    pub async fn get(&mut self, path: &str, headers: &[(&str, &str)]) -> Reply {
        let mut builder = self.request("GET", path);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        self.send(builder.body(Full::default()).unwrap())
            .await
            .unwrap()
    }

    /// GET `path` with the jar's cookies, storing what the reply sets.
    pub async fn get_with_jar(&mut self, path: &str, jar: &mut Jar) -> Reply {
        let cookie = jar.header();
        let mut headers = Vec::new();
        if let Some(cookie) = &cookie {
            headers.push(("cookie", cookie.as_str()));
        }
        let reply = self.get(path, &headers).await;
        jar.store(&reply.headers);
        reply
    }
}

/// An HTTP/2 connection inside a tunnel; clone it to send concurrent streams.
#[derive(Clone)]
pub struct H2Conn {
    sender: hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    authority: String,
    /// Cancelled when the connection ends (pinproxy or the client closed it).
    closed: tokio_util::sync::CancellationToken,
}

impl ProxyClient {
    /// Opens a TLS tunnel to `host:port` offering `h2` and `http/1.1` (as
    /// browsers do), and speaks HTTP/2 in it.
    pub async fn tunnel_h2(&self, host: &str, port: u16) -> H2Conn {
        self.tunnel_h2_with(
            host,
            port,
            &hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new()),
        )
        .await
    }

    /// [`ProxyClient::tunnel_h2`] with the HTTP/2 settings of `builder`
    /// (the same ClientHello whatever they are).
    pub async fn tunnel_h2_with(
        &self,
        host: &str,
        port: u16,
        builder: &hyper::client::conn::http2::Builder<hyper_util::rt::TokioExecutor>,
    ) -> H2Conn {
        let target = format!("{host}:{port}");
        let (tcp, head) = self.raw_connect(&target).await;
        assert!(
            head.starts_with("HTTP/1.1 200"),
            "CONNECT answered {head:?}"
        );
        let mut config = (*self.tls).clone();
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let name = ServerName::try_from(host.to_owned()).unwrap();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .expect("TLS through pinproxy");
        assert_eq!(
            tls.get_ref().1.alpn_protocol(),
            Some(&b"h2"[..]),
            "pinproxy speaks h2"
        );
        let (sender, conn) = builder.handshake(TokioIo::new(tls)).await.unwrap();
        let closed = tokio_util::sync::CancellationToken::new();
        let ended = closed.clone();
        tokio::spawn(async move {
            let _ = conn.await;
            ended.cancel();
        });
        H2Conn {
            sender,
            authority: target,
            closed,
        }
    }
}

impl H2Conn {
    /// Whether the connection ends within `wait` (pinproxy closed it).
    pub async fn closed_within(&self, wait: std::time::Duration) -> bool {
        tokio::time::timeout(wait, self.closed.cancelled())
            .await
            .is_ok()
    }

    /// The underlying sender (extended CONNECT and other special requests).
    pub fn sender(&mut self) -> &mut hyper::client::conn::http2::SendRequest<Full<Bytes>> {
        &mut self.sender
    }

    /// GET `path` with extra headers (each pair sent as its own field, so
    /// several `cookie` pairs arrive as several h2 cookie headers).
    pub async fn get(&mut self, path: &str, headers: &[(&str, &str)]) -> Reply {
        let mut builder = Request::builder()
            .method("GET")
            .uri(format!("https://{}{path}", self.authority))
            .version(http::Version::HTTP_2);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        within_answer_limit(async {
            self.sender.ready().await.unwrap();
            let response = self
                .sender
                .send_request(builder.body(Full::default()).unwrap())
                .await
                .unwrap();
            let (parts, body) = response.into_parts();
            let collected = body.collect().await.unwrap();
            let trailers = collected.trailers().cloned();
            let body = collected.to_bytes();
            Reply {
                status: parts.status,
                headers: parts.headers,
                body: String::from_utf8_lossy(&body).into_owned(),
                trailers,
            }
        })
        .await
    }
}

/// How long the test clients wait for a whole answer: far past anything a
/// test waits for on purpose, so that a hang fails its test instead of
/// holding the run until CI's own limit.
const ANSWER_LIMIT: std::time::Duration = std::time::Duration::from_secs(150);

/// `exchange`, failing the test if it takes longer than [`ANSWER_LIMIT`].
async fn within_answer_limit<T>(exchange: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(ANSWER_LIMIT, exchange).await {
        Ok(done) => done,
        Err(_) => panic!("no whole answer within {ANSWER_LIMIT:?}"),
    }
}

/// A minimal cookie jar: one value per name, all sent together.
#[derive(Default, Debug, Clone)]
pub struct Jar {
    cookies: Vec<(String, String)>,
}

impl Jar {
    /// Stores the cookies a response sets.
    pub fn store(&mut self, headers: &HeaderMap) {
        for value in headers.get_all("set-cookie") {
            let text = value.to_str().unwrap();
            let pair = text.split(';').next().unwrap();
            let (name, value) = pair.split_once('=').unwrap();
            self.set(name.trim(), value.trim());
        }
    }

    /// Sets one cookie.
    pub fn set(&mut self, name: &str, value: &str) {
        self.cookies.retain(|(n, _)| n != name);
        self.cookies.push((name.to_owned(), value.to_owned()));
    }

    /// The value of cookie `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.cookies
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The `Cookie` header for all cookies.
    pub fn header(&self) -> Option<String> {
        if self.cookies.is_empty() {
            return None;
        }
        Some(
            self.cookies
                .iter()
                .map(|(n, v)| format!("{n}={v}"))
                .collect::<Vec<_>>()
                .join("; "),
        )
    }
}

impl ProxyClient {
    /// GETs `path` on `host:port` in a fresh tunnel with `jar`, reporting
    /// every failure instead of panicking (for runs where pinproxy may die).
    pub async fn try_get(
        &self,
        host: &str,
        port: u16,
        path: &str,
        jar: &mut Jar,
    ) -> Result<Reply, String> {
        let target = format!("{host}:{port}");
        let mut tcp = TcpStream::connect(self.proxy)
            .await
            .map_err(|e| e.to_string())?;
        tcp.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let head = read_head(&mut tcp).await;
        if !head.starts_with("HTTP/1.1 200") {
            return Err(format!("CONNECT answered {head:?}"));
        }
        let name = ServerName::try_from(host.to_owned()).map_err(|e| e.to_string())?;
        let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| e.to_string())?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let mut request = Request::get(path).header("host", &target);
        if let Some(cookie) = jar.header() {
            request = request.header("cookie", cookie);
        }
        let response = sender
            .send_request(
                request
                    .body(Full::<Bytes>::default())
                    .map_err(|e| e.to_string())?,
            )
            .await
            .map_err(|e| e.to_string())?;
        let (parts, body) = response.into_parts();
        let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
        // Only a complete answer counts: then its cookies are the client's.
        jar.store(&parts.headers);
        Ok(Reply {
            status: parts.status,
            headers: parts.headers,
            body: String::from_utf8_lossy(&body).into_owned(),
            trailers: None,
        })
    }
}
