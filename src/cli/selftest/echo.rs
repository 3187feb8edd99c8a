//! The echo origin `pinproxy selftest` sends its canaries to: an HTTPS
//! server with a throw-away CA that answers every request with what it
//! received, as JSON: the peer address (the exit's egress address), the TLS
//! version, ALPN and JA4 of the ClientHello that reached it, and every
//! header, in order.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::body::{self, Body};
use crate::fingerprint::ja4::ja4;
use crate::front::fingerprint::{read_client_hello, HelloRead};
use crate::mitm::ca::CertificateAuthority;
use crate::mitm::leaf::{mint, LeafName};

/// What the echo origin saw of one request.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Echo {
    /// The address the connection came from.
    pub peer: String,
    /// `TLSv1_3`, `TLSv1_2`.
    pub tls_version: String,
    /// The negotiated ALPN protocol, if any.
    pub alpn: Option<String>,
    /// The JA4 of the ClientHello that reached it.
    pub ja4: Option<String>,
    /// Every request header, in order (name, value).
    pub headers: Vec<(String, String)>,
}

/// A running echo origin.
pub struct EchoOrigin {
    /// Where it listens.
    pub addr: SocketAddr,
    /// The name to reach it by (its certificate's name).
    pub host: String,
    /// The PEM file of its CA, for `upstream_ca`.
    pub ca_file: PathBuf,
    stop: CancellationToken,
    _dir: tempfile::TempDir,
}

impl Drop for EchoOrigin {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl EchoOrigin {
    /// Listens on `listen`, with a certificate for `host`.
    pub async fn start(listen: SocketAddr, host: &str) -> anyhow::Result<EchoOrigin> {
        let dir = tempfile::tempdir().context("cannot create a scratch directory")?;
        let ca = CertificateAuthority::load_or_create(dir.path())
            .context("cannot create the echo origin's CA")?;
        let key = rcgen::KeyPair::generate().context("cannot generate the echo origin's key")?;
        let leaf = mint(&ca, &key, &LeafName::from_host(host))
            .context("cannot sign the echo origin's certificate")?;
        let der = rustls_pki_types::PrivateKeyDer::try_from(key.serialize_der())
            .map_err(|e| anyhow::anyhow!("echo origin key: {e}"))?;
        let mut tls = rustls::ServerConfig::builder_with_provider(crate::daemon::crypto_provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(vec![leaf], der)?;
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let listener = TcpListener::bind(listen)
            .await
            .with_context(|| format!("the echo origin cannot listen on {listen}"))?;
        let addr = listener.local_addr()?;
        let stop = CancellationToken::new();
        tokio::spawn(serve(
            listener,
            TlsAcceptor::from(Arc::new(tls)),
            stop.clone(),
        ));
        Ok(EchoOrigin {
            addr,
            host: host.to_owned(),
            ca_file: CertificateAuthority::cert_path(dir.path()),
            stop,
            _dir: dir,
        })
    }
}

async fn serve(listener: TcpListener, acceptor: TlsAcceptor, stop: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let Ok((tcp, peer)) = accepted else { continue };
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let (rewound, hello) = read_client_hello(tcp).await;
            let ja4 = match hello {
                HelloRead::Hello(Some(hello)) => Some(ja4(&hello)),
                _ => None,
            };
            let Ok(tls) = acceptor.accept(rewound).await else {
                return;
            };
            let (_, connection) = tls.get_ref();
            let seen = Echo {
                peer: peer.ip().to_string(),
                tls_version: connection
                    .protocol_version()
                    .map(|v| format!("{v:?}"))
                    .unwrap_or_default(),
                alpn: connection
                    .alpn_protocol()
                    .map(|p| String::from_utf8_lossy(p).into_owned()),
                ja4,
                headers: Vec::new(),
            };
            let service = service_fn(move |request: Request<Incoming>| {
                let mut echo = seen.clone();
                echo.headers = request
                    .headers()
                    .iter()
                    .map(|(n, v)| {
                        (
                            n.as_str().to_owned(),
                            String::from_utf8_lossy(v.as_bytes()).into_owned(),
                        )
                    })
                    .collect();
                async move { Ok::<_, std::convert::Infallible>(answer(&echo)) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tls), service)
                .await;
        });
    }
}

fn answer(echo: &Echo) -> Response<Body> {
    let text = serde_json::to_string(echo).unwrap_or_default();
    let mut response = Response::new(body::full(text));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}
