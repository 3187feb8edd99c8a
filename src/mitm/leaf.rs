//! Minting leaf certificates for intercepted hosts.
//!
//! A leaf names exactly one host (a DNS SAN, or an IP SAN when the client
//! connected to an IP literal), is signed by the local CA, carries a random
//! serial (rcgen would otherwise derive it from the shared leaf key, giving
//! every host the same serial) and a bounded validity that browsers accept.

use std::fmt;
use std::net::IpAddr;

use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber,
};
use rustls_pki_types::CertificateDer;

use super::ca::CertificateAuthority;

/// Leaves are valid this long (under the 200-day ceiling browsers enforce
/// for publicly trusted certificates; private CAs get the same courtesy).
pub const LEAF_VALIDITY_DAYS: i64 = 199;

/// The single name a leaf certificate is minted for.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum LeafName {
    /// A DNS name, lowercased.
    Dns(String),
    /// An IP literal.
    Ip(IpAddr),
}

impl LeafName {
    /// Classifies a host as an IP literal or a DNS name.
    pub fn from_host(host: &str) -> LeafName {
        let trimmed = crate::net::unbracket(host);
        match trimmed.parse::<IpAddr>() {
            Ok(ip) => LeafName::Ip(ip),
            Err(_) => LeafName::Dns(trimmed.to_ascii_lowercase()),
        }
    }
}

impl fmt::Display for LeafName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LeafName::Dns(name) => f.write_str(name),
            LeafName::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

/// A random positive 128-bit serial number.
pub(crate) fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    // Serials are positive DER integers; a clear top bit keeps them so.
    bytes[0] &= 0x7f;
    SerialNumber::from_slice(&bytes)
}

/// Signs a leaf for `name` with the CA, for the public half of `leaf_key`.
pub fn mint(
    ca: &CertificateAuthority,
    leaf_key: &KeyPair,
    name: &LeafName,
) -> Result<CertificateDer<'static>, rcgen::Error> {
    let mut params = CertificateParams::default();
    let san = match name {
        LeafName::Dns(dns) => SanType::DnsName(dns.clone().try_into()?),
        LeafName::Ip(ip) => SanType::IpAddress(*ip),
    };
    params.subject_alt_names = vec![san];
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name.to_string());
    params.distinguished_name = dn;
    params.serial_number = Some(random_serial());
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(LEAF_VALIDITY_DAYS);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    let cert = params.signed_by(leaf_key, ca.issuer())?;
    Ok(cert.der().clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaf_names_classify_hosts() {
        assert_eq!(
            LeafName::from_host("Example.COM"),
            LeafName::Dns("example.com".into())
        );
        assert_eq!(
            LeafName::from_host("127.0.0.1"),
            LeafName::Ip("127.0.0.1".parse().unwrap())
        );
        assert_eq!(
            LeafName::from_host("[::1]"),
            LeafName::Ip("::1".parse().unwrap())
        );
    }

    #[test]
    fn leaves_get_distinct_serials() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::load_or_create(dir.path()).unwrap();
        let (key, _) = super::super::ca::generate_leaf_key().unwrap();
        let name = LeafName::Dns("a.test".into());
        let serial = |der: &CertificateDer<'_>| {
            let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
            cert.serial.clone()
        };
        let a = mint(&ca, &key, &name).unwrap();
        let b = mint(&ca, &key, &name).unwrap();
        assert_ne!(serial(&a), serial(&b));
        let c = mint(&ca, &key, &LeafName::Ip("127.0.0.1".parse().unwrap())).unwrap();
        assert!(!c.is_empty());
    }
}
