//! TLS interception (MITM): the local CA, leaf certificates minted per host,
//! and serving the HTTP requests found inside CONNECT tunnels.
//!
//! Input: an upgraded CONNECT tunnel and its target. Output: each request in
//! the tunnel, handed to the pipeline as if it were a plain proxy request
//! for the tunnel's target.
//!
//! Invariant: opening a tunnel dials nothing upstream. The leaf is chosen
//! from the client's SNI (or the CONNECT host when there is none) alone.

pub mod ca;
pub mod cert_cache;
pub mod leaf;
pub mod nssdb;
mod serve;

pub use serve::serve_tunnel;

use cert_cache::CertCache;

/// Which CONNECT targets are intercepted and which are tunnelled raw.
#[derive(Debug, Default, Clone)]
pub struct InterceptPolicy {
    include: Vec<glob::Pattern>,
    exclude: Vec<glob::Pattern>,
}

/// A host pattern that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("mitm host pattern {pattern:?}: {reason}")]
pub struct HostPatternError {
    pattern: String,
    reason: String,
}

impl InterceptPolicy {
    /// A policy from `mitm.include` and `mitm.exclude` globs.
    pub fn new(
        include: &[String],
        exclude: &[String],
    ) -> Result<InterceptPolicy, HostPatternError> {
        let compile = |patterns: &[String]| {
            patterns
                .iter()
                .map(|p| {
                    glob::Pattern::new(&p.to_ascii_lowercase()).map_err(|e| HostPatternError {
                        pattern: p.clone(),
                        reason: e.to_string(),
                    })
                })
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(InterceptPolicy {
            include: compile(include)?,
            exclude: compile(exclude)?,
        })
    }

    /// Whether a tunnel to `host` is intercepted (else it is passed through).
    pub fn intercepts(&self, host: &str) -> bool {
        let host = host.to_ascii_lowercase();
        let matches = |patterns: &[glob::Pattern]| patterns.iter().any(|p| p.matches(&host));
        (self.include.is_empty() || matches(&self.include)) && !matches(&self.exclude)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn include_and_exclude() {
        let all =
            InterceptPolicy::new(&[], &["*.bank.example".into(), "pay.example".into()]).unwrap();
        assert!(all.intercepts("shop.example"));
        assert!(!all.intercepts("WWW.Bank.Example"));
        assert!(!all.intercepts("pay.example"));
        let only = InterceptPolicy::new(
            &["*.target.example".into()],
            &["login.target.example".into()],
        )
        .unwrap();
        assert!(only.intercepts("www.target.example"));
        assert!(!only.intercepts("login.target.example"));
        assert!(!only.intercepts("cdn.other.example"));
    }
}

/// ALPN protocols offered to clients inside tunnels, in preference order.
pub const CLIENT_ALPN: &[&[u8]] = &[b"h2", b"http/1.1"];

/// TLS interception state shared by all tunnels.
#[derive(Debug)]
pub struct Mitm {
    /// Leaf certificates per host.
    pub certs: CertCache,
    /// Which hosts are intercepted.
    pub policy: InterceptPolicy,
}
