//! The test origin: HTTPS with its own CA, answering every request with a
//! fixed body (1 KiB by default), keep-alive on.
//!
//! Two variants serve the upstream measurements: with `close`, every
//! response says `Connection: close` and the connection ends after it, so a
//! proxy in front can never reuse an upstream connection (each request pays
//! a full upstream TCP + TLS handshake); with `handshakes`, the time from
//! accepting each TCP connection to the end of its TLS handshake is recorded
//! and reported on request (see [`Handshakes`]). A connection whose TLS
//! handshake negotiated `h2` (offered when the server configuration lists
//! it, see `tls::origin_server_config`) is served over HTTP/2.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::ServerConfig;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

use crate::stats::percentile;

/// How the origin serves.
#[derive(Debug, Clone, Default)]
pub struct OriginOptions {
    /// Close every connection after one response (`Connection: close`).
    pub close: bool,
    /// Record handshake times, reported on stdin's `handshakes` command.
    pub handshakes: Option<Arc<Handshakes>>,
}

/// TLS handshake times as the origin sees them: from `accept` of the TCP
/// connection to the end of the TLS handshake. For a proxy dialling the
/// origin, that spans building and sending its ClientHello, the origin's
/// answer, and the proxy checking the certificate chain and finishing: the
/// handshake's cost on the proxy's side, plus the origin's, which is the
/// same for every proxy.
#[derive(Debug, Default)]
pub struct Handshakes {
    micros: Mutex<Vec<u32>>,
    /// Of those, handshakes that resumed an earlier session (no
    /// certificate sent, none for the client to verify).
    resumed: AtomicU64,
}

/// The handshake times since the previous report.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct HandshakeReport {
    /// Handshakes completed.
    pub count: u64,
    /// Median, microseconds.
    pub p50_us: u32,
    /// 90th percentile, microseconds.
    pub p90_us: u32,
    /// 99th percentile, microseconds.
    pub p99_us: u32,
    /// Of `count`, handshakes that resumed an earlier TLS session: cheaper
    /// for the client, which verifies no certificate.
    #[serde(default)]
    pub resumed: u64,
}

impl Handshakes {
    fn record(&self, took: Duration, resumed: bool) {
        if resumed {
            self.resumed.fetch_add(1, Ordering::Relaxed);
        }
        let us = u32::try_from(took.as_micros()).unwrap_or(u32::MAX);
        if let Ok(mut v) = self.micros.lock() {
            v.push(us);
        }
    }

    /// The times recorded since the last call, which forgets them.
    pub fn take(&self) -> HandshakeReport {
        let mut v = self
            .micros
            .lock()
            .map(|mut v| std::mem::take(&mut *v))
            .unwrap_or_default();
        let resumed = self.resumed.swap(0, Ordering::Relaxed);
        v.sort_unstable();
        HandshakeReport {
            resumed,
            count: v.len() as u64,
            p50_us: percentile(&v, 0.50),
            p90_us: percentile(&v, 0.90),
            p99_us: percentile(&v, 0.99),
        }
    }

    /// Answers `handshakes` lines on stdin with one JSON [`HandshakeReport`]
    /// line each, until stdin ends.
    pub async fn report_on_stdin(self: Arc<Self>) {
        let mut lines = BufReader::new(tokio::io::stdin()).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if line.trim() == "handshakes" {
                if let Ok(json) = serde_json::to_string(&self.take()) {
                    println!("{json}");
                }
            }
        }
    }
}

/// Serves HTTPS on `listener` until the process ends; every request gets
/// `200` with `body`.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    body: Bytes,
    options: OriginOptions,
) {
    let acceptor = TlsAcceptor::from(tls);
    loop {
        let (tcp, _) = match listener.accept().await {
            Ok(pair) => pair,
            Err(e) => {
                eprintln!("origin: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let accepted = Instant::now();
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let body = body.clone();
        let options = options.clone();
        tokio::spawn(async move {
            let Ok(Ok(stream)) =
                tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await
            else {
                return;
            };
            if let Some(handshakes) = &options.handshakes {
                let resumed =
                    stream.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
                handshakes.record(accepted.elapsed(), resumed);
            }
            let service = service_fn(move |_request: Request<Incoming>| {
                let mut response = Response::new(Full::new(body.clone()));
                response.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    HeaderValue::from_static("application/octet-stream"),
                );
                async move { Ok::<_, Infallible>(response) }
            });
            if stream.get_ref().1.alpn_protocol() == Some(crate::tls::ALPN_H2) {
                let _ = http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
                return;
            }
            // Without keep-alive, hyper answers `Connection: close` and
            // closes the connection after the response.
            let _ = http1::Builder::new()
                .keep_alive(!options.close)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
