//! `hudsucker-peer`: setup (f) of pinproxy's benchmark suite, the peer that
//! answers "what does pinning cost over the fastest plain MITM I could run
//! instead?".
//!
//! A MITM HTTP(S) proxy on the published `hudsucker` crate (hyper 1,
//! rustls, rcgen: pinproxy's own client-facing stack) with a no-op handler:
//! it terminates every `CONNECT` with a leaf from its own CA, speaks
//! HTTP/1.1 and h2 on both legs, and forwards each request straight to the
//! origin (no exit, no pinning, no header policy), trusting only the CA
//! files it is given. It listens on loopback only, writes its CA certificate
//! to `--ca-out`, prints `READY ADDR` once listening, and shuts down
//! gracefully on SIGTERM or SIGINT (so a profiler running it, such as
//! callgrind, writes its output).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{ensure, Context, Result};
use clap::Parser;
use hudsucker::certificate_authority::RcgenAuthority;
use hudsucker::rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use hudsucker::Proxy;
use hyper_util::client::legacy::connect::HttpConnector;
use rustls::crypto::{aws_lc_rs, CryptoProvider};
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::CertificateDer;
use tokio::signal::unix::{signal, SignalKind};

/// A plain MITM proxy on hudsucker (no pinning, no exit), for pinproxy's
/// benchmark suite. Loopback only.
#[derive(Debug, Parser)]
#[command(name = "hudsucker-peer")]
struct Args {
    /// Listen address (loopback).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Where to write this proxy's CA certificate (PEM), which clients trust.
    #[arg(long)]
    ca_out: PathBuf,
    /// PEM file of CA certificates to trust for origins, repeatable.
    #[arg(long = "upstream-ca", required = true)]
    upstream_ca: Vec<PathBuf>,
    /// Leaf certificates kept in memory.
    #[arg(long, default_value_t = 10_000)]
    cert_cache: u64,
}

fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(
        args.listen.ip().is_loopback(),
        "{} is not a loopback address; the peer only listens on loopback",
        args.listen
    );
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(serve(args))
}

/// Binds, prints `READY ADDR` and proxies until asked to stop.
async fn serve(args: Args) -> Result<()> {
    let provider = aws_lc_rs::default_provider();
    let ca = authority(&args.ca_out, args.cert_cache, provider.clone())?;
    // TCP_NODELAY on both legs, as pinproxy sets it: without it, Nagle's
    // algorithm and delayed ACKs stall a new connection's first exchange
    // by 40 ms, which no user tuning a proxy would leave in place.
    let mut tcp = HttpConnector::new();
    tcp.set_nodelay(true);
    tcp.enforce_http(false);
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(upstream_tls(&args.upstream_ca, provider)?)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(tcp);
    let listener = listen(args.listen)?;
    let addr = listener.local_addr()?;
    let proxy = Proxy::builder()
        .with_listener(listener)
        .with_ca(ca)
        .with_http_connector(connector)
        .with_graceful_shutdown(stop_requested())
        .build()
        .context("building the proxy")?;
    println!("READY {addr}");
    proxy.start().await.context("running the proxy")
}

/// A fresh CA (P-256, as rcgen makes by default), its certificate written
/// to `ca_out`; hudsucker signs every leaf with it (and reuses its key for
/// the leaves).
fn authority(ca_out: &Path, cache: u64, provider: CryptoProvider) -> Result<RcgenAuthority> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(DnType::CommonName, "pinbench hudsucker peer CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let cert = params.self_signed(&key)?;
    std::fs::write(ca_out, cert.pem()).with_context(|| format!("writing {}", ca_out.display()))?;
    let issuer = Issuer::new(params, key);
    Ok(RcgenAuthority::new(issuer, cache, provider))
}

/// The upstream TLS client: trusts only the given CA files, offers h2 and
/// HTTP/1.1 (hyper-rustls sets the ALPN list from the enabled protocols).
fn upstream_tls(ca_files: &[PathBuf], provider: CryptoProvider) -> Result<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for path in ca_files {
        for cert in CertificateDer::pem_file_iter(path)
            .with_context(|| format!("reading CA file {}", path.display()))?
        {
            roots.add(cert.with_context(|| format!("parsing {}", path.display()))?)?;
        }
    }
    Ok(ClientConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// A listener with a deep accept queue (as the suite's origin and exit
/// have), so bursts of new connections are not dropped by the kernel, and
/// TCP_NODELAY, which Linux passes on to the connections it accepts
/// (hudsucker accepts them itself and sets nothing on them).
fn listen(addr: SocketAddr) -> Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_nodelay(true)?;
    socket.bind(addr)?;
    Ok(socket.listen(4096)?)
}

/// Resolves on SIGTERM or SIGINT (never, if neither can be listened for).
async fn stop_requested() {
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => std::future::pending().await,
    }
}
