//! The local certificate authority that signs every intercepted host's leaf.
//!
//! On first start an ECDSA P-256 CA is generated into `ca.pem` and
//! `ca-key.pem` (mode 0600) in the CA directory (`ca.dir`, by default the
//! data directory); later starts reuse it, so clients trust it once. Each
//! CA gets a random serial and a name with a random suffix: two
//! installations never present the same issuer name with different keys,
//! which NSS (Chromium) would reject.
//!
//! Hygiene, because the key is a master key for every site the clients
//! visit:
//! - a key file that group or others may access is refused (the error says
//!   the `chmod 600` that fixes it), and so is a key that does not belong
//!   to the certificate;
//! - a new CA may carry X.509 name constraints (`ca.permitted_domains`):
//!   clients then reject any leaf outside those domains (and any leaf for
//!   an IP address), whoever minted it; pinproxy refuses to intercept such
//!   hosts ([`CertificateAuthority::permits`]);
//! - rotation is staged, so no client that still trusts the old CA breaks
//!   before it was given the new one: [`rotate`] makes the next CA
//!   (`ca-next.pem`) beside the current one, which keeps signing, and a
//!   bundle of both (`ca-bundle.pem`, what `pinproxy ca` hands out during
//!   the overlap); once clients trust the bundle, [`finish_rotation`]
//!   promotes the next CA (the old certificate stays as `ca-old.pem`, its
//!   key is deleted) and pinproxy signs with it from its next start.
//!   (Cross-signing cannot do this: pinproxy's CAs have path length 0, so
//!   an old CA cannot vouch for a new intermediate.)

use std::io::Write as _;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CidrSubnet, DistinguishedName, DnType, GeneralSubtree,
    IsCa, Issuer, KeyPair, KeyUsagePurpose, NameConstraints, PKCS_ECDSA_P256_SHA256,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use super::leaf::LeafName;
use crate::fsutil;

/// File name of the CA certificate (PEM) in the CA directory.
pub const CA_CERT_FILE: &str = "ca.pem";
/// File name of the CA private key (PEM, mode 0600) in the CA directory.
pub const CA_KEY_FILE: &str = "ca-key.pem";
/// During a rotation: the next CA's certificate.
pub const CA_NEXT_FILE: &str = "ca-next.pem";
/// During a rotation: the next CA's key (mode 0600).
pub const CA_NEXT_KEY_FILE: &str = "ca-next-key.pem";
/// During a rotation: the current and the next CA certificates, for
/// clients to trust both.
pub const CA_BUNDLE_FILE: &str = "ca-bundle.pem";
/// After a rotation: the previous CA's certificate, for reference.
pub const CA_OLD_FILE: &str = "ca-old.pem";

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
    /// A CA directory given explicitly (`ca.dir`) holds no CA.
    #[error(
        "{0} holds no CA (ca.pem and ca-key.pem): create one with `pinproxy ca --ca-dir {0}` \
         and give every replica that same directory"
    )]
    Missing(PathBuf),
    /// The key file can be read by group or others.
    #[error(
        "{path} is accessible to group or others (mode {mode:04o}); the CA key can sign a \
         certificate for any site your clients visit, so pinproxy will not use it: run \
         `chmod 600 {path}`"
    )]
    KeyPermissions {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The files exist but do not hold a usable CA.
    #[error("{path}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A permitted domain is not a DNS name.
    #[error(
        "ca.permitted_domains: {0:?} is not a domain name (write example.com: it covers the \
         domain and every name under it)"
    )]
    Domain(String),
    /// rcgen failed to build a certificate.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
}

/// A loaded CA: its certificate, what is served after each leaf, and the
/// issuer that signs leaves.
pub struct CertificateAuthority {
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    constraints: Option<Constraints>,
    issuer: Issuer<'static, KeyPair>,
}

/// A CA's X.509 name constraints, as far as leaves for hosts care.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Constraints {
    /// Permitted DNS subtrees (none: DNS names are not limited).
    permitted_dns: Vec<String>,
    /// Excluded DNS subtrees.
    excluded_dns: Vec<String>,
    /// Whether any subtree is about IP addresses (then no IP leaf is
    /// minted: pinproxy's own constrained CAs exclude every address).
    ip: bool,
}

impl Constraints {
    /// The constraints of a parsed certificate, `None` without any.
    fn of(path: &Path, cert: &CertificateDer<'_>) -> Result<Option<Constraints>, CaError> {
        use x509_parser::extensions::GeneralName;
        let (_, parsed) =
            x509_parser::parse_x509_certificate(cert).map_err(|e| invalid(path, e.to_string()))?;
        let Some(extension) = parsed
            .name_constraints()
            .map_err(|e| invalid(path, e.to_string()))?
        else {
            return Ok(None);
        };
        let mut constraints = Constraints {
            permitted_dns: Vec::new(),
            excluded_dns: Vec::new(),
            ip: false,
        };
        let trees = [
            (&extension.value.permitted_subtrees, true),
            (&extension.value.excluded_subtrees, false),
        ];
        for (subtrees, permitted) in trees {
            for subtree in subtrees.iter().flatten() {
                match &subtree.base {
                    GeneralName::DNSName(name) if permitted => {
                        constraints.permitted_dns.push(name.to_ascii_lowercase())
                    }
                    GeneralName::DNSName(name) => {
                        constraints.excluded_dns.push(name.to_ascii_lowercase())
                    }
                    GeneralName::IPAddress(_) => constraints.ip = true,
                    _ => {}
                }
            }
        }
        Ok(Some(constraints))
    }
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .finish_non_exhaustive()
    }
}

/// The files of a CA directory.
#[derive(Debug, Clone)]
pub struct CaFiles {
    /// The certificate clients trust.
    pub cert: PathBuf,
    /// Its key.
    pub key: PathBuf,
    /// During a rotation: the next CA's certificate.
    pub next: PathBuf,
    /// During a rotation: the next CA's key.
    pub next_key: PathBuf,
    /// During a rotation: both certificates.
    pub bundle: PathBuf,
    /// After a rotation: the previous CA's certificate.
    pub old: PathBuf,
}

impl CaFiles {
    /// The files in `dir`.
    pub fn in_dir(dir: &Path) -> CaFiles {
        CaFiles {
            cert: dir.join(CA_CERT_FILE),
            key: dir.join(CA_KEY_FILE),
            next: dir.join(CA_NEXT_FILE),
            next_key: dir.join(CA_NEXT_KEY_FILE),
            bundle: dir.join(CA_BUNDLE_FILE),
            old: dir.join(CA_OLD_FILE),
        }
    }
}

impl CertificateAuthority {
    /// Path of the CA certificate in `dir`.
    pub fn cert_path(dir: &Path) -> PathBuf {
        dir.join(CA_CERT_FILE)
    }

    /// Loads the CA from `dir`, generating an unconstrained one when there
    /// is none.
    pub fn load_or_create(dir: &Path) -> Result<CertificateAuthority, CaError> {
        Self::load_or_create_constrained(dir, &[])
    }

    /// Loads the CA from `dir`, generating it (constrained to
    /// `permitted_domains`, if any) when there is none.
    pub fn load_or_create_constrained(
        dir: &Path,
        permitted_domains: &[String],
    ) -> Result<CertificateAuthority, CaError> {
        let files = CaFiles::in_dir(dir);
        match (files.cert.exists(), files.key.exists()) {
            (false, false) => match Self::create(&files, permitted_domains) {
                // Another process created it between our check and our write.
                Err(CaError::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::AlreadyExists =>
                {
                    Self::load_once_written(dir, &files)
                }
                other => other,
            },
            // A key without its certificate: maybe another process writing
            // them right now.
            (false, true) => Self::load_once_written(dir, &files),
            _ => Self::load(dir),
        }
    }

    /// Loads the CA another process is creating in `dir`: it writes the
    /// key (exclusively, then synced) first and the certificate last,
    /// atomically, so a certificate there means a whole pair. A key still
    /// alone after [`CREATION_GRACE`] is a creation that died half way,
    /// refused as before.
    fn load_once_written(dir: &Path, files: &CaFiles) -> Result<CertificateAuthority, CaError> {
        let deadline = std::time::Instant::now() + CREATION_GRACE;
        while !files.cert.exists() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        Self::load(dir)
    }

    /// The CA of a daemon or tool, in `dir`: created there (with mode 0700
    /// for a new directory, constrained to `permitted_domains` if any) when
    /// `create` and it is missing; otherwise it must exist.
    pub fn open(
        dir: &Path,
        create: bool,
        permitted_domains: &[String],
    ) -> Result<CertificateAuthority, CaError> {
        if !create {
            return Self::load(dir);
        }
        fsutil::create_private_dir(dir).map_err(|source| CaError::Io {
            path: dir.to_owned(),
            source,
        })?;
        Self::load_or_create_constrained(dir, permitted_domains)
    }

    /// Loads the CA in `dir`; never creates one (a fleet's replicas share
    /// a provisioned directory, and one must not mint a CA of its own).
    pub fn load(dir: &Path) -> Result<CertificateAuthority, CaError> {
        let files = CaFiles::in_dir(dir);
        Self::load_pair(dir, &files.cert, &files.key)
    }

    /// The next CA of a rotation in progress in `dir`, if there is one.
    pub fn load_next(dir: &Path) -> Result<Option<CertificateAuthority>, CaError> {
        let files = CaFiles::in_dir(dir);
        if !files.next.exists() && !files.next_key.exists() {
            return Ok(None);
        }
        Self::load_pair(dir, &files.next, &files.next_key).map(Some)
    }

    fn load_pair(dir: &Path, cert: &Path, key: &Path) -> Result<CertificateAuthority, CaError> {
        match (cert.exists(), key.exists()) {
            (true, true) => {}
            (false, false) => return Err(CaError::Missing(dir.to_owned())),
            (true, false) => {
                return Err(CaError::HalfPresent {
                    present: cert.to_owned(),
                    missing: key.to_owned(),
                })
            }
            (false, true) => {
                return Err(CaError::HalfPresent {
                    present: key.to_owned(),
                    missing: cert.to_owned(),
                })
            }
        }
        check_key_permissions(key)?;
        let cert_pem = read(cert)?;
        let key_pem = read(key)?;
        let key_pair = KeyPair::from_pem(&key_pem).map_err(|e| invalid(key, e.to_string()))?;
        let cert_der = parse_pem(cert, &cert_pem)?;
        check_key_matches(cert, key, &cert_der, &key_pair)?;
        let constraints = Constraints::of(cert, &cert_der)?;
        let issuer = Issuer::from_ca_cert_der(&cert_der, key_pair)
            .map_err(|e| invalid(cert, e.to_string()))?;
        Ok(CertificateAuthority {
            cert_pem,
            cert_der,
            constraints,
            issuer,
        })
    }

    /// The file clients should trust for the CA in `dir` (see
    /// [`certificate_blocks`] for what of it to hand out): during a rotation
    /// the bundle of the current and the next CA, else the CA itself.
    pub fn trust_path(dir: &Path) -> PathBuf {
        let files = CaFiles::in_dir(dir);
        match files.bundle.exists() {
            true => files.bundle,
            false => files.cert,
        }
    }

    fn create(
        files: &CaFiles,
        permitted_domains: &[String],
    ) -> Result<CertificateAuthority, CaError> {
        let ca = Self::generate(&files.cert, &files.key, permitted_domains)?;
        tracing::info!(path = %files.cert.display(), "generated a new CA; clients must trust it");
        Ok(ca)
    }

    /// A new CA written to `cert_path` and `key_path`. The key goes first,
    /// created exclusively with mode 0600: if two processes race, one fails
    /// with AlreadyExists (and loads the winner's CA once its certificate
    /// is there).
    fn generate(
        cert_path: &Path,
        key_path: &Path,
        permitted_domains: &[String],
    ) -> Result<CertificateAuthority, CaError> {
        let (key, params) = new_ca(permitted_domains)?;
        let cert = params.self_signed(&key)?;
        write_key(key_path, &key)?;
        let cert_pem = cert.pem();
        write_public(cert_path, &cert_pem)?;
        Ok(CertificateAuthority {
            cert_pem,
            cert_der: cert.der().clone(),
            constraints: Constraints::of(cert_path, cert.der())?,
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

    /// The domains the CA is constrained to, `None` when unconstrained.
    pub fn permitted_domains(&self) -> Option<Vec<String>> {
        Some(self.constraints.as_ref()?.permitted_dns.clone())
    }

    /// Whether clients will accept a leaf for `name` from this CA: always
    /// for an unconstrained CA; for a constrained one, a DNS name within
    /// its permitted domains (and outside its excluded ones), and an IP
    /// address only when the constraints say nothing about addresses.
    pub fn permits(&self, name: &LeafName) -> bool {
        let Some(constraints) = &self.constraints else {
            return true;
        };
        match name {
            LeafName::Dns(host) => {
                let (permitted, excluded) = (&constraints.permitted_dns, &constraints.excluded_dns);
                (permitted.is_empty() || permitted.iter().any(|d| within(host, d)))
                    && !excluded.iter().any(|d| within(host, d))
            }
            LeafName::Ip(_) => !constraints.ip,
        }
    }

    /// The issuer that signs leaves.
    pub(crate) fn issuer(&self) -> &Issuer<'static, KeyPair> {
        &self.issuer
    }
}

/// A rotation in progress.
#[derive(Debug)]
pub struct Rotation {
    /// The next CA's certificate.
    pub next: PathBuf,
    /// The current and the next CA certificates: what clients should trust
    /// during the overlap.
    pub bundle: PathBuf,
}

/// Starts a rotation of the CA in `dir`: makes the next CA (constrained to
/// `permitted_domains`, if any) in `ca-next.pem` and `ca-next-key.pem`, and
/// the bundle of both certificates in `ca-bundle.pem`. The current CA keeps
/// signing, so clients that trust only it keep working; give clients the
/// bundle, then [`finish_rotation`].
pub fn rotate(dir: &Path, permitted_domains: &[String]) -> Result<Rotation, CaError> {
    let files = CaFiles::in_dir(dir);
    let current = CertificateAuthority::load(dir)?;
    if files.next.exists() || files.next_key.exists() {
        return Err(invalid(
            &files.next,
            "a rotation is already in progress: finish it first (`pinproxy ca rotate --finish`)"
                .into(),
        ));
    }
    let next = CertificateAuthority::generate(&files.next, &files.next_key, permitted_domains)?;
    write_public(
        &files.bundle,
        &format!("{}{}", current.cert_pem(), next.cert_pem()),
    )?;
    tracing::info!(next = %files.next.display(), "started a CA rotation");
    Ok(Rotation {
        next: files.next,
        bundle: files.bundle,
    })
}

/// Finishes the rotation in progress in `dir`: the next CA becomes the CA
/// (pinproxy signs with it from its next start), the old certificate is
/// kept as `ca-old.pem` and the old key is deleted. Clients that trust only
/// the old CA stop accepting leaves then. Returns the new CA's certificate,
/// or `None` when no rotation was in progress.
pub fn finish_rotation(dir: &Path) -> Result<Option<PathBuf>, CaError> {
    let files = CaFiles::in_dir(dir);
    if CertificateAuthority::load_next(dir)?.is_none() {
        return Ok(None);
    }
    let current = CertificateAuthority::load(dir)?;
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| CaError::Io { path, source }
    };
    write_public(&files.old, current.cert_pem())?;
    // The key, then the certificate; a crash in between leaves a pair that
    // `load` refuses as mismatched rather than one that signs leaves no
    // client can verify.
    std::fs::rename(&files.next_key, &files.key).map_err(io(&files.key))?;
    std::fs::rename(&files.next, &files.cert).map_err(io(&files.cert))?;
    match std::fs::remove_file(&files.bundle) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(CaError::Io {
                path: files.bundle,
                source: e,
            })
        }
        _ => {}
    }
    tracing::info!(path = %files.cert.display(), "finished the CA rotation");
    Ok(Some(files.cert))
}

/// Checks `ca.permitted_domains` entries and lowercases them.
pub fn permitted_domains(domains: &[String]) -> Result<Vec<String>, CaError> {
    domains
        .iter()
        .map(|d| {
            let d = d.trim().trim_end_matches('.').to_ascii_lowercase();
            let label_ok = |l: &str| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            };
            if d.parse::<std::net::IpAddr>().is_ok() || !d.split('.').all(label_ok) {
                return Err(CaError::Domain(d));
            }
            Ok(d)
        })
        .collect()
}

/// A fresh CA key and its parameters, constrained to `permitted_domains`
/// when there are any (then every IP address is excluded too: RFC 5280
/// leaves a name type without constraints unconstrained).
fn new_ca(domains: &[String]) -> Result<(KeyPair, CertificateParams), CaError> {
    let domains = permitted_domains(domains)?;
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
    if !domains.is_empty() {
        params.name_constraints = Some(NameConstraints {
            permitted_subtrees: domains.into_iter().map(GeneralSubtree::DnsName).collect(),
            excluded_subtrees: vec![
                GeneralSubtree::IpAddress(CidrSubnet::from_v4_prefix([0; 4], 0)),
                GeneralSubtree::IpAddress(CidrSubnet::from_v6_prefix([0; 16], 0)),
            ],
        });
    }
    params.serial_number = Some(super::leaf::random_serial());
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(CA_VALIDITY_DAYS);
    Ok((key, params))
}

/// Whether `host` is `domain` or a name under it (RFC 5280 DNS name
/// constraints; a leading dot means only names under it).
fn within(host: &str, domain: &str) -> bool {
    let host = host.trim_end_matches('.');
    match domain.strip_prefix('.') {
        Some(parent) => host.len() > parent.len() && host.ends_with(&format!(".{parent}")),
        None => {
            host.eq_ignore_ascii_case(domain)
                || host
                    .to_ascii_lowercase()
                    .ends_with(&format!(".{}", domain.to_ascii_lowercase()))
        }
    }
}

/// Refuses a key file that group or others may access.
fn check_key_permissions(path: &Path) -> Result<(), CaError> {
    use std::os::unix::fs::PermissionsExt as _;
    let metadata = std::fs::metadata(path).map_err(|source| CaError::Io {
        path: path.to_owned(),
        source,
    })?;
    let mode = metadata.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(CaError::KeyPermissions {
            path: path.to_owned(),
            mode,
        });
    }
    Ok(())
}

/// Refuses a key that is not the certificate's.
fn check_key_matches(
    cert_path: &Path,
    key_path: &Path,
    cert: &CertificateDer<'_>,
    key: &KeyPair,
) -> Result<(), CaError> {
    use rcgen::PublicKeyData as _;
    let (_, parsed) =
        x509_parser::parse_x509_certificate(cert).map_err(|e| invalid(cert_path, e.to_string()))?;
    if parsed.public_key().subject_public_key.data.as_ref() != key.der_bytes() {
        return Err(invalid(
            key_path,
            format!(
                "this key does not belong to {}; restore the matching pair (a rotation \
                 interrupted midway leaves the new key beside the old certificate: \
                 ca-old.pem is the old certificate)",
                cert_path.display()
            ),
        ));
    }
    Ok(())
}

fn read(path: &Path) -> Result<String, CaError> {
    std::fs::read_to_string(path).map_err(|source| CaError::Io {
        path: path.to_owned(),
        source,
    })
}

fn invalid(path: &Path, reason: String) -> CaError {
    CaError::Invalid {
        path: path.to_owned(),
        reason,
    }
}

fn parse_pem(path: &Path, pem: &str) -> Result<CertificateDer<'static>, CaError> {
    rustls_pki_types::pem::PemObject::from_pem_slice(pem.as_bytes())
        .map_err(|e: rustls_pki_types::pem::Error| invalid(path, e.to_string()))
}

/// Writes a new key file exclusively, with mode 0600 from the start.
fn write_key(path: &Path, key: &KeyPair) -> Result<(), CaError> {
    let mut file = fsutil::create_private(path).map_err(|source| CaError::Io {
        path: path.to_owned(),
        source,
    })?;
    file.write_all(key.serialize_pem().as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|source| CaError::Io {
            path: path.to_owned(),
            source,
        })
}

/// Writes a certificate, replacing the file atomically.
fn write_public(path: &Path, pem: &str) -> Result<(), CaError> {
    let tmp = path.with_extension("pem.tmp");
    std::fs::write(&tmp, pem)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|source| CaError::Io {
            path: path.to_owned(),
            source,
        })
}

/// How long a process that finds another creating the CA waits for its
/// certificate (generating and writing a P-256 CA takes milliseconds).
const CREATION_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// A fresh P-256 key for leaves, with its DER for rustls.
pub(crate) fn generate_leaf_key() -> Result<(KeyPair, PrivateKeyDer<'static>), rcgen::Error> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    Ok((key, der))
}

/// The `CERTIFICATE` blocks of `pem`, each as it is written there, one
/// after another: what of a CA's file may be handed to clients (a file
/// some tools write holds the key too).
pub fn certificate_blocks(pem: &str) -> String {
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    let mut out = String::new();
    let mut rest = pem;
    while let Some(start) = rest.find(BEGIN) {
        let Some(length) = rest[start..].find(END) else {
            break;
        };
        let end = start + length + END.len();
        out.push_str(&rest[start..end]);
        out.push('\n');
        rest = &rest[end..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What is handed to clients is the certificates alone, whatever else
    /// the file holds.
    #[test]
    fn only_certificates_are_handed_out() {
        let cert = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----";
        let key = "-----BEGIN PRIVATE KEY-----\nMC4C\n-----END PRIVATE KEY-----";
        let file = format!("{key}\n{cert}\n{cert}\n# trailing\n");
        assert_eq!(certificate_blocks(&file), format!("{cert}\n{cert}\n"));
        assert_eq!(certificate_blocks(key), "");
        assert_eq!(certificate_blocks("-----BEGIN CERTIFICATE-----\nMIIB"), "");
    }
    use std::os::unix::fs::PermissionsExt;

    fn create(dir: &Path) -> CertificateAuthority {
        CertificateAuthority::load_or_create(dir).unwrap()
    }

    /// Processes starting at once on a fresh directory end up with one CA:
    /// the ones that lose the race load the winner's once it is written.
    #[test]
    fn processes_creating_the_ca_at_once_share_one() {
        for _ in 0..10 {
            let dir = tempfile::tempdir().unwrap();
            let start = std::sync::Arc::new(std::sync::Barrier::new(8));
            let racers: Vec<_> = (0..8)
                .map(|_| {
                    let (dir, start) = (dir.path().to_owned(), start.clone());
                    std::thread::spawn(move || {
                        start.wait();
                        CertificateAuthority::load_or_create(&dir)
                            .map(|ca| ca.cert_pem().to_owned())
                            .map_err(|e| e.to_string())
                    })
                })
                .collect();
            let pems: Vec<String> = racers
                .into_iter()
                .map(|racer| racer.join().unwrap().unwrap())
                .collect();
            assert!(pems.iter().all(|pem| *pem == pems[0]), "two CAs");
        }
    }

    #[test]
    fn ca_is_created_once_then_reused() {
        let dir = tempfile::tempdir().unwrap();
        let first = create(dir.path());
        let second = create(dir.path());
        assert_eq!(first.cert_pem(), second.cert_pem());
        let mode = std::fs::metadata(dir.path().join(CA_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(first.cert_pem().starts_with("-----BEGIN CERTIFICATE-----"));
    }

    #[test]
    fn half_present_and_missing_cas_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            CertificateAuthority::load(dir.path()),
            Err(CaError::Missing(_))
        ));
        create(dir.path());
        std::fs::remove_file(dir.path().join(CA_KEY_FILE)).unwrap();
        assert!(matches!(
            CertificateAuthority::load_or_create(dir.path()),
            Err(CaError::HalfPresent { .. })
        ));
    }

    #[test]
    fn a_key_readable_by_others_is_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        create(dir.path());
        let key = dir.path().join(CA_KEY_FILE);
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let error = CertificateAuthority::load(dir.path()).unwrap_err();
        assert!(matches!(error, CaError::KeyPermissions { mode: 0o644, .. }));
        let text = error.to_string();
        assert!(
            text.contains(&format!("chmod 600 {}", key.display())),
            "{text}"
        );
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(CertificateAuthority::load(dir.path()).is_ok());
    }

    #[test]
    fn a_key_of_another_ca_is_refused() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        create(a.path());
        create(b.path());
        std::fs::copy(b.path().join(CA_KEY_FILE), a.path().join(CA_KEY_FILE)).unwrap();
        let error = CertificateAuthority::load(a.path())
            .unwrap_err()
            .to_string();
        assert!(error.contains("does not belong"), "{error}");
    }

    #[test]
    fn name_constraints_decide_what_may_be_minted() {
        let dir = tempfile::tempdir().unwrap();
        let domains = vec!["Example.com".to_owned(), "localhost".to_owned()];
        create_with(dir.path(), &domains);
        let ca = CertificateAuthority::load(dir.path()).unwrap();
        assert_eq!(
            ca.permitted_domains(),
            Some(vec!["example.com".to_owned(), "localhost".to_owned()])
        );
        for ok in ["example.com", "www.example.com", "localhost"] {
            assert!(ca.permits(&LeafName::from_host(ok)), "{ok}");
        }
        for refused in ["notexample.com", "example.org", "127.0.0.1", "[::1]"] {
            assert!(!ca.permits(&LeafName::from_host(refused)), "{refused}");
        }
        assert!(permitted_domains(&["*.example.com".into()]).is_err());
        assert!(permitted_domains(&["10.0.0.1".into()]).is_err());
    }

    fn create_with(dir: &Path, domains: &[String]) {
        CertificateAuthority::load_or_create_constrained(dir, domains).unwrap();
    }

    #[test]
    fn rotation_is_staged_through_a_bundle() {
        let dir = tempfile::tempdir().unwrap();
        let old = create(dir.path());
        assert_eq!(finish_rotation(dir.path()).unwrap(), None);
        let rotation = rotate(dir.path(), &[]).unwrap();
        assert!(rotate(dir.path(), &[]).is_err(), "one rotation at a time");
        // The current CA keeps signing; clients are handed both.
        let during = CertificateAuthority::load(dir.path()).unwrap();
        assert_eq!(during.cert_pem(), old.cert_pem());
        let next = CertificateAuthority::load_next(dir.path())
            .unwrap()
            .unwrap();
        assert_eq!(
            std::fs::read_to_string(&rotation.bundle).unwrap(),
            format!("{}{}", old.cert_pem(), next.cert_pem())
        );
        assert_eq!(
            CertificateAuthority::trust_path(dir.path()),
            rotation.bundle
        );
        let mode = std::fs::metadata(dir.path().join(CA_NEXT_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);

        let promoted = finish_rotation(dir.path()).unwrap().unwrap();
        let after = CertificateAuthority::load(dir.path()).unwrap();
        assert_eq!(after.cert_pem(), next.cert_pem());
        assert_eq!(
            std::fs::read_to_string(dir.path().join(CA_OLD_FILE)).unwrap(),
            old.cert_pem()
        );
        assert_eq!(CertificateAuthority::trust_path(dir.path()), promoted);
        assert!(!dir.path().join(CA_BUNDLE_FILE).exists());
        assert!(!dir.path().join(CA_NEXT_KEY_FILE).exists());
    }
}
