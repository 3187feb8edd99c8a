//! TLS material: the test origin's own CA and leaf, and the client settings
//! the load generator uses.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::client::Resumption;
use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// HTTP/1.1's ALPN name: what the suite's clients offer unless asked for HTTP/2.
pub const ALPN_HTTP1: &[u8] = b"http/1.1";
/// HTTP/2's ALPN name.
pub const ALPN_H2: &[u8] = b"h2";

/// Names on the origin's certificate.
pub const ORIGIN_NAMES: &[&str] = &["localhost", "127.0.0.1"];

/// The crypto provider for every TLS endpoint of the suite (the same one pinproxy uses).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Creates a fresh CA, writes its certificate (PEM) to `ca_path` and returns
/// a server configuration presenting a leaf for [`ORIGIN_NAMES`] signed by it.
/// Without `resumption` it keeps no sessions and issues no tickets, so no
/// handshake can resume. With `http2` it offers h2 before HTTP/1.1 (a client
/// offering both gets h2); without, HTTP/1.1 only.
pub fn origin_server_config(
    ca_path: &Path,
    resumption: bool,
    http2: bool,
) -> Result<Arc<ServerConfig>> {
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "pinproxy bench origin CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);

    let leaf_key = KeyPair::generate()?;
    let names: Vec<String> = ORIGIN_NAMES.iter().map(|n| n.to_string()).collect();
    let leaf = CertificateParams::new(names)?.signed_by(&leaf_key, &issuer)?;
    std::fs::write(ca_path, ca_cert.pem())
        .with_context(|| format!("writing {}", ca_path.display()))?;

    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(vec![leaf.der().clone(), ca_cert.der().clone()], key)?;
    config.alpn_protocols = if http2 {
        vec![ALPN_H2.to_vec(), ALPN_HTTP1.to_vec()]
    } else {
        vec![ALPN_HTTP1.to_vec()]
    };
    if !resumption {
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
    }
    Ok(Arc::new(config))
}

/// A client configuration trusting only the CA certificates in `ca_files`,
/// offering HTTP/1.1 (or, with `http2`, h2 alone, as a browser that will
/// only speak h2 to this origin), with session resumption off so that every
/// new connection pays a full handshake (the worst case, and the same for
/// every setup).
pub fn client_config(ca_files: &[PathBuf], http2: bool) -> Result<Arc<ClientConfig>> {
    let mut roots = RootCertStore::empty();
    for path in ca_files {
        let certs = CertificateDer::pem_file_iter(path)
            .with_context(|| format!("reading CA file {}", path.display()))?;
        for cert in certs {
            let cert = cert.with_context(|| format!("parsing CA file {}", path.display()))?;
            roots
                .add(cert)
                .with_context(|| format!("using CA file {}", path.display()))?;
        }
    }
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![if http2 { ALPN_H2 } else { ALPN_HTTP1 }.to_vec()];
    config.resumption = Resumption::disabled();
    Ok(Arc::new(config))
}
