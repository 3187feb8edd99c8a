//! TLS towards origins: which roots are trusted and the handshake itself.
//!
//! This is the narrow interface behind which another TLS stack (one that
//! imitates a browser's ClientHello) could be added: [`handshake`] takes a
//! connected transport and returns an encrypted one.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// ALPN protocols offered to origins by clients that speak HTTP/1.1 only.
pub const ALPN_HTTP1: &[&[u8]] = &[b"http/1.1"];
/// ALPN protocols offered to origins when the client offered HTTP/2.
pub const ALPN_H2_HTTP1: &[&[u8]] = &[b"h2", b"http/1.1"];

/// The two upstream TLS configurations: the origin is offered what the
/// client offered pinproxy.
#[derive(Clone, Debug)]
pub struct UpstreamTls {
    /// Offers `http/1.1` only.
    pub http1: Arc<ClientConfig>,
    /// Offers `h2` and `http/1.1`.
    pub h2: Arc<ClientConfig>,
}

impl UpstreamTls {
    /// The configuration offering `h2` or not.
    pub fn offering(&self, h2: bool) -> Arc<ClientConfig> {
        if h2 {
            self.h2.clone()
        } else {
            self.http1.clone()
        }
    }
}

/// Both upstream configurations, trusting the public web roots plus
/// `extra_ca_files`.
pub fn upstream_tls(
    provider: Arc<CryptoProvider>,
    extra_ca_files: &[PathBuf],
) -> Result<UpstreamTls, TlsSetupError> {
    let http1 = client_config(provider, extra_ca_files)?;
    let mut h2 = (*http1).clone();
    h2.alpn_protocols = ALPN_H2_HTTP1.iter().map(|p| p.to_vec()).collect();
    Ok(UpstreamTls {
        http1,
        h2: Arc::new(h2),
    })
}

/// The upstream trust store could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    /// An `--upstream-ca` file could not be read or holds no certificate.
    #[error("upstream CA file {path}: {reason}")]
    CaFile {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// rustls rejected the configuration.
    #[error("upstream TLS settings: {0}")]
    Rustls(#[from] rustls::Error),
}

/// A client configuration offering `http/1.1`, trusting the public web roots
/// plus the certificates in `extra_ca_files`.
pub fn client_config(
    provider: Arc<CryptoProvider>,
    extra_ca_files: &[PathBuf],
) -> Result<Arc<ClientConfig>, TlsSetupError> {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for path in extra_ca_files {
        add_ca_file(&mut roots, path)?;
    }
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = ALPN_HTTP1.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

fn add_ca_file(roots: &mut RootCertStore, path: &Path) -> Result<(), TlsSetupError> {
    let error = |reason: String| TlsSetupError::CaFile {
        path: path.to_owned(),
        reason,
    };
    let mut added = 0;
    for cert in CertificateDer::pem_file_iter(path).map_err(|e| error(e.to_string()))? {
        let cert = cert.map_err(|e| error(e.to_string()))?;
        roots.add(cert).map_err(|e| error(e.to_string()))?;
        added += 1;
    }
    if added == 0 {
        return Err(error("no PEM certificate in the file".into()));
    }
    Ok(())
}

/// Runs the TLS handshake with `host` over `transport`.
pub async fn handshake<T>(
    config: Arc<ClientConfig>,
    host: &str,
    transport: T,
) -> std::io::Result<TlsStream<T>>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let name = ServerName::try_from(host.to_owned()).map_err(|e| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{host:?}: {e}"))
    })?;
    TlsConnector::from(config).connect(name, transport).await
}
