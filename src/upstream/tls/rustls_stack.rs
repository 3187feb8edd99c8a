//! The rustls upstream stack: the configurations offering `http/1.1` and
//! `h2, http/1.1`, and the handshake.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::TlsConnector;

use super::tap::{HelloTap, SentHello};
use super::{TlsConn, TlsSetupError, ALPN_H2_HTTP1, ALPN_HTTP1};

/// rustls client configurations, one per ALPN offer.
pub struct RustlsClient {
    http1: TlsConnector,
    h2: TlsConnector,
}

impl std::fmt::Debug for RustlsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RustlsClient")
    }
}

impl RustlsClient {
    /// Both configurations, trusting the public web roots plus
    /// `extra_ca_files`.
    pub fn new(
        provider: Arc<CryptoProvider>,
        extra_ca_files: &[PathBuf],
    ) -> Result<RustlsClient, TlsSetupError> {
        let mut roots = RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        for path in extra_ca_files {
            add_ca_file(&mut roots, path)?;
        }
        let mut http1 = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        // No session resumption: one cache shared by every exit would let
        // an origin link two exits (or two identities) through a ticket
        // it issued to one of them.
        http1.resumption = rustls::client::Resumption::disabled();
        http1.alpn_protocols = ALPN_HTTP1.iter().map(|p| p.to_vec()).collect();
        let mut h2 = http1.clone();
        h2.alpn_protocols = ALPN_H2_HTTP1.iter().map(|p| p.to_vec()).collect();
        Ok(RustlsClient {
            http1: TlsConnector::from(Arc::new(http1)),
            h2: TlsConnector::from(Arc::new(h2)),
        })
    }

    /// Runs the handshake with `host` over `transport`.
    pub async fn connect<T>(&self, host: &str, transport: T, h2: bool) -> io::Result<TlsConn>
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let name = ServerName::try_from(host.to_owned())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{host:?}: {e}")))?;
        let connector = if h2 { &self.h2 } else { &self.http1 };
        let sent = SentHello::default();
        let stream = connector
            .connect(name, HelloTap::new(transport, sent.clone()))
            .await?;
        let negotiated_h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
        let sent = sent.lock().ok().and_then(|mut s| s.take());
        Ok(TlsConn::new(Box::new(stream), negotiated_h2).with_sent_hello(sent))
    }
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
