//! Pipeline stage 5, fingerprint: a request of an identity is compared
//! with the fingerprint the identity recorded when it was founded: its
//! header values, and (where pinproxy terminated the client's TLS) its
//! ClientHello and HTTP/2 preface.
//!
//! Pinning one identity across two fingerprints is the inverse of the leak
//! pinproxy prevents (one cookie, two browsers), so drift is counted and,
//! by policy, let through (`warn`), refused with 409 (`reject`, nothing is
//! sent), or rewritten back to the recording (`restore`). The TLS and
//! HTTP/2 parts always leave as the identity's: its connections are its
//! own and present what it recorded, so `warn` and `restore` differ only
//! in the headers.

use super::{Pipeline, ProxyError};
use std::sync::atomic::Ordering;

use crate::fingerprint::{ClientConnection, FingerprintPolicy};
use crate::identity::Identity;
use crate::metrics::Policy;
use crate::routing::Route;
use crate::upstream::FingerprintMode;

impl Pipeline {
    /// Applies the fingerprint policy to a request of `identity` from the
    /// client connection `client`; may rewrite `headers` (restore).
    pub(crate) fn check_fingerprint(
        &self,
        identity: &Identity,
        client: &ClientConnection,
        headers: &mut http::HeaderMap,
    ) -> Result<(), ProxyError> {
        let mut drifted = identity.fingerprint.drifted(headers);
        let recorded = &identity.fingerprint;
        if let Some(then) = &recorded.tls {
            if client.hello.is_some() && !client.hello_matches(then) {
                drifted.push("tls-clienthello");
            }
        }
        if let (Some(then), Some(now)) = (&recorded.h2, client.preface.get()) {
            if then != now {
                drifted.push("http2-preface");
            }
        }
        if drifted.is_empty() {
            return Ok(());
        }
        let policy = self.fingerprint_policy;
        self.metrics
            .fingerprint_drift
            .get_or_create(&Policy {
                policy: policy.label(),
            })
            .inc();
        match policy {
            FingerprintPolicy::Warn => {
                tracing::info!(identity = %identity.id, headers = ?drifted, "fingerprint drift");
                Ok(())
            }
            FingerprintPolicy::Restore => {
                identity.fingerprint.restore(headers);
                Ok(())
            }
            FingerprintPolicy::Reject => Err(ProxyError::FingerprintDrift {
                identity: identity.id,
                exit: identity.exit.clone(),
                headers: drifted,
            }),
        }
    }

    /// Chrome mode sends a Chrome's ClientHello and HTTP/2 preface: a
    /// request whose User-Agent is not a Chrome's gives itself away, so it
    /// is counted (and logged once).
    pub(crate) fn note_chrome_user_agent(&self, route: &Route, headers: &http::HeaderMap) {
        if route.exit.spec.options.fingerprint != FingerprintMode::Chrome {
            return;
        }
        let chrome = headers
            .get(http::header::USER_AGENT)
            .is_some_and(|ua| memchr_find(ua.as_bytes(), b"Chrome/"));
        if chrome {
            return;
        }
        self.metrics.chrome_user_agent_mismatches.inc();
        if !self.warned_chrome_user_agent.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                exit = %route.exit.id(),
                "exit in chrome mode carries a request whose User-Agent is not Chrome's: \
                 send a Chrome User-Agent (and client hints) with this mode, or use mirror mode"
            );
        }
    }
}

fn memchr_find(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}
