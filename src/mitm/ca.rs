//! The local certificate authority that signs every intercepted host's leaf.
//!
//! On first start an ECDSA P-256 CA is generated into `DATA_DIR/ca.pem` and
//! `DATA_DIR/ca-key.pem` (mode 0600); later starts reuse it, so clients trust
//! it once. Each installation's CA gets a random serial and a name with a
//! random suffix: two installations never present the same issuer name with
//! different keys, which NSS (Chromium) would reject.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::fsutil;

/// File name of the CA certificate (PEM) in the data directory.
pub const CA_CERT_FILE: &str = "ca.pem";
/// File name of the CA private key (PEM, mode 0600) in the data directory.
pub const CA_KEY_FILE: &str = "ca-key.pem";

/// CA certificates are valid this long from their creation.
const CA_VALIDITY_DAYS: i64 = 3650;

/// The CA could not be loaded or created.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Only one of the two CA files exists.
    #[error(
        "{present} exists but {missing} does not; restore the missing file or delete both \
         to generate a new CA (clients must then trust the new one)"
    )]
    HalfPresent {
        /// The file that exists.
        present: PathBuf,
        /// The file that is missing.
        missing: PathBuf,
    },
    /// The files exist but do not hold a usable CA.
    #[error("{path}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// rcgen failed to build a certificate.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
}

/// A loaded CA: its certificate and the issuer that signs leaves.
pub struct CertificateAuthority {
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// Path of the CA certificate in `data_dir`.
    pub fn cert_path(data_dir: &Path) -> PathBuf {
        data_dir.join(CA_CERT_FILE)
    }

    /// Loads the CA from `data_dir`, generating it on first start.
    pub fn load_or_create(data_dir: &Path) -> Result<CertificateAuthority, CaError> {
        let cert_path = data_dir.join(CA_CERT_FILE);
        let key_path = data_dir.join(CA_KEY_FILE);
        match (cert_path.exists(), key_path.exists()) {
            (true, true) => Self::load(&cert_path, &key_path),
            (false, false) => match Self::create(&cert_path, &key_path) {
                // Another process created it between our check and our write.
                Err(CaError::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::AlreadyExists =>
                {
                    Self::load(&cert_path, &key_path)
                }
                other => other,
            },
            (true, false) => Err(CaError::HalfPresent {
                present: cert_path,
                missing: key_path,
            }),
            (false, true) => Err(CaError::HalfPresent {
                present: key_path,
                missing: cert_path,
            }),
        }
    }

    fn load(cert_path: &Path, key_path: &Path) -> Result<CertificateAuthority, CaError> {
        let read = |path: &Path| {
            std::fs::read_to_string(path).map_err(|source| CaError::Io {
                path: path.to_owned(),
                source,
            })
        };
        let cert_pem = read(cert_path)?;
        let key_pem = read(key_path)?;
        let invalid = |path: &Path, reason: String| CaError::Invalid {
            path: path.to_owned(),
            reason,
        };
        let key = KeyPair::from_pem(&key_pem).map_err(|e| invalid(key_path, e.to_string()))?;
        let cert_der = rustls_pki_types::pem::PemObject::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e: rustls_pki_types::pem::Error| invalid(cert_path, e.to_string()))?;
        let issuer = Issuer::from_ca_cert_der(&cert_der, key)
            .map_err(|e| invalid(cert_path, e.to_string()))?;
        Ok(CertificateAuthority {
            cert_pem,
            cert_der,
            issuer,
        })
    }

    fn create(cert_path: &Path, key_path: &Path) -> Result<CertificateAuthority, CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let suffix: u32 = rand::random();
        let mut name = DistinguishedName::new();
        name.push(DnType::OrganizationName, "pinproxy");
        name.push(DnType::CommonName, format!("pinproxy CA {suffix:08x}"));
        params.distinguished_name = name;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.serial_number = Some(super::leaf::random_serial());
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::days(1);
        params.not_after = now + time::Duration::days(CA_VALIDITY_DAYS);
        let cert = params.self_signed(&key)?;

        let io_err = |path: &Path| {
            let path = path.to_owned();
            move |source| CaError::Io { path, source }
        };
        // Key first, created exclusively with mode 0600: if two processes
        // race, one fails here with AlreadyExists and loads the winner's CA.
        let mut key_file = fsutil::create_private(key_path).map_err(io_err(key_path))?;
        key_file
            .write_all(key.serialize_pem().as_bytes())
            .and_then(|()| key_file.sync_all())
            .map_err(io_err(key_path))?;
        let cert_pem = cert.pem();
        let tmp = cert_path.with_extension("pem.tmp");
        std::fs::write(&tmp, &cert_pem)
            .and_then(|()| std::fs::rename(&tmp, cert_path))
            .map_err(io_err(cert_path))?;
        tracing::info!(path = %cert_path.display(), "generated a new CA; clients must trust it");
        Ok(CertificateAuthority {
            cert_pem,
            cert_der: cert.der().clone(),
            issuer: Issuer::new(params, key),
        })
    }

    /// The CA certificate as PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate as DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// The issuer that signs leaves.
    pub(crate) fn issuer(&self) -> &Issuer<'static, KeyPair> {
        &self.issuer
    }
}

/// A fresh P-256 key for leaves, with its DER for rustls.
pub(crate) fn generate_leaf_key() -> Result<(KeyPair, PrivateKeyDer<'static>), rcgen::Error> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    Ok((key, der))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_is_created_once_then_reused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let first = CertificateAuthority::load_or_create(dir.path()).unwrap();
        let second = CertificateAuthority::load_or_create(dir.path()).unwrap();
        assert_eq!(first.cert_pem(), second.cert_pem());
        let mode = std::fs::metadata(dir.path().join(CA_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(first.cert_pem().starts_with("-----BEGIN CERTIFICATE-----"));
    }

    #[test]
    fn half_present_ca_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        CertificateAuthority::load_or_create(dir.path()).unwrap();
        std::fs::remove_file(dir.path().join(CA_KEY_FILE)).unwrap();
        assert!(matches!(
            CertificateAuthority::load_or_create(dir.path()),
            Err(CaError::HalfPresent { .. })
        ));
    }
}
