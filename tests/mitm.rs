//! TLS interception: the local CA, per-host leaves, and what opening a
//! tunnel does (and does not do) upstream.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support;

use std::sync::Arc;
use std::time::Duration;

use pinproxy::upstream::FingerprintMode;
use rustls::pki_types::{CertificateDer, ServerName};
use support::{Proxy, Setup};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::*;

/// Opens a tunnel and a TLS session to `host`, offering `alpn`; returns the
/// leaf pinproxy presented and the protocol it chose.
async fn handshake(
    proxy: &Proxy,
    host: &str,
    port: u16,
    alpn: &[&[u8]],
) -> (CertificateDer<'static>, Option<Vec<u8>>) {
    let (tcp, head) = proxy.client.raw_connect(&format!("{host}:{port}")).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let mut roots = rustls::RootCertStore::empty();
    let ca: CertificateDer<'static> =
        rustls::pki_types::pem::PemObject::from_pem_slice(proxy.daemon.ca_cert_pem().as_bytes())
            .unwrap();
    roots.add(ca).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from(host.to_owned()).unwrap(), tcp)
        .await
        .expect("the leaf verifies against pinproxy's CA");
    let (_, session) = tls.get_ref();
    let leaf = session.peer_certificates().unwrap()[0].clone().into_owned();
    (leaf, session.alpn_protocol().map(|p| p.to_vec()))
}

fn sans(der: &CertificateDer<'_>) -> Vec<String> {
    let (_, cert) = parse_x509_certificate(der).unwrap();
    let san = cert.subject_alternative_name().unwrap().unwrap();
    san.value
        .general_names
        .iter()
        .map(|n| match n {
            GeneralName::DNSName(d) => format!("dns:{d}"),
            GeneralName::IPAddress(ip) => format!("ip:{ip:?}"),
            other => format!("{other:?}"),
        })
        .collect()
}

#[tokio::test]
async fn leaves_name_the_sni_host_or_the_ip_literal() {
    let s = Setup::start(1).await;
    let (origin, proxy) = (&s.origin, &s.proxy);

    let (leaf, _) = handshake(proxy, "localhost", origin.https.port(), &[]).await;
    assert_eq!(sans(&leaf), ["dns:localhost"]);
    let (_, cert) = parse_x509_certificate(&leaf).unwrap();
    let validity = cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
    assert!(validity <= 200 * 86_400, "validity {validity}s");
    let eku = cert.extended_key_usage().unwrap().unwrap();
    assert!(eku.value.server_auth);

    // An IP literal has no SNI: the leaf carries an IP SAN for it.
    let (leaf, _) = handshake(proxy, "127.0.0.1", origin.https.port(), &[]).await;
    assert_eq!(sans(&leaf), ["ip:[127, 0, 0, 1]"]);
    let mut conn = proxy.client.tunnel("127.0.0.1", origin.https.port()).await;
    assert_eq!(conn.get("/", &[]).await.status, 200);
}

/// A fully qualified name (`localhost.`, as curl keeps it in a CONNECT for
/// `https://localhost./`) reaches the origin in the default (mirror) mode,
/// and in rustls mode: its dot is not sent as SNI, and the origin's
/// certificate, which names `localhost`, verifies.
#[tokio::test]
async fn a_host_with_a_trailing_dot_is_dialled_without_it() {
    for mode in [None, Some(FingerprintMode::Rustls)] {
        let s = Setup::builder()
            .exits(1)
            .config(move |c| {
                if let Some(mode) = mode {
                    c.upstream.fingerprint = mode;
                }
            })
            .start()
            .await;
        let mut conn = s
            .proxy
            .client
            .tunnel("localhost.", s.origin.https.port())
            .await;
        let reply = conn.get("/", &[]).await;
        assert_eq!(reply.status, 200, "{mode:?}: {:?}", reply.pinproxy_error());
    }
}

#[tokio::test]
async fn leaves_are_cached_per_host_with_distinct_serials() {
    let s = Setup::start(1).await;
    let (_origin, proxy) = (&s.origin, &s.proxy);
    let (a1, _) = handshake(proxy, "localhost", 1, &[]).await;
    let (a2, _) = handshake(proxy, "localhost", 2, &[]).await;
    let (b, _) = handshake(proxy, "origin.test", 1, &[]).await;
    assert_eq!(a1, a2, "the same host reuses its cached leaf");
    let serial = |der: &CertificateDer<'_>| parse_x509_certificate(der).unwrap().1.serial.clone();
    assert_ne!(serial(&a1), serial(&b));
}

#[tokio::test]
async fn h2_is_offered_and_preferred() {
    let s = Setup::start(1).await;
    let (origin, proxy) = (&s.origin, &s.proxy);
    let (_, alpn) = handshake(
        proxy,
        "localhost",
        origin.https.port(),
        &[b"h2", b"http/1.1"],
    )
    .await;
    assert_eq!(alpn.as_deref(), Some(&b"h2"[..]));
}

#[tokio::test]
async fn opening_a_tunnel_dials_nothing_until_a_request_arrives() {
    let s = Setup::start(2).await;
    let (origin, proxy) = (&s.origin, &s.proxy);
    let running = &s.exits;

    let mut conn = proxy.client.tunnel("localhost", origin.https.port()).await;
    let connects = || running.iter().map(|e| e.connects().len()).sum::<usize>();
    assert_eq!(connects(), 0, "CONNECT + TLS alone must not reach any exit");
    assert!(origin.seen().is_empty());

    conn.get("/", &[]).await;
    assert_eq!(connects(), 1);
}

#[tokio::test]
async fn upstream_connections_are_kept_alive_per_exit() {
    let s = Setup::start(1).await;
    let (origin, proxy) = (&s.origin, &s.proxy);
    let running = &s.exits;

    for _ in 0..3 {
        let mut conn = proxy.client.tunnel("localhost", origin.https.port()).await;
        for _ in 0..3 {
            assert_eq!(conn.get("/", &[]).await.status, 200);
        }
    }
    assert_eq!(
        running[0].connects().len(),
        1,
        "nine requests, one upstream tunnel"
    );
}

#[tokio::test]
async fn the_ca_survives_restarts_and_the_cli_prints_it() {
    use std::os::unix::fs::PermissionsExt;
    let s = Setup::start(1).await;
    let dir = s.proxy.data_dir.path().to_owned();
    let first = s.proxy.daemon.ca_cert_pem().to_owned();
    let data_dir = s.proxy.stop_keeping_data_dir().await;

    let again = pinproxy::Daemon::start(&pinproxy::Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: Some(dir.clone()),
        admin: pinproxy::config::AdminConfig { listen: None },
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(again.ca_cert_pem(), first);
    again.shutdown(Duration::from_secs(5)).await;

    let key_mode = std::fs::metadata(dir.join("ca-key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(key_mode & 0o777, 0o600);

    let bin = env!("CARGO_BIN_EXE_pinproxy");
    let path = std::process::Command::new(bin)
        .args(["ca", "--data-dir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(path.status.success());
    assert_eq!(
        String::from_utf8(path.stdout).unwrap().trim(),
        dir.join("ca.pem").to_str().unwrap()
    );
    let pem = std::process::Command::new(bin)
        .args(["ca", "--pem", "--data-dir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8(pem.stdout).unwrap(), first);
    drop(data_dir);
}
