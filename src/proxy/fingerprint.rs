//! Pipeline stage 5, fingerprint: a request of an identity is compared
//! with the fingerprint the identity recorded when it was founded.
//!
//! Pinning one identity across two fingerprints is the inverse of the leak
//! pinproxy prevents (one cookie, two browsers), so drift is counted and,
//! by policy, let through (`warn`), refused with 409 (`reject`, nothing is
//! sent), or rewritten back to the recording (`restore`).

use super::{Pipeline, ProxyError};
use crate::fingerprint::FingerprintPolicy;
use crate::identity::Identity;
use crate::metrics::Policy;

impl Pipeline {
    /// Applies the fingerprint policy to a request of `identity`; may
    /// rewrite `headers` (restore).
    pub(crate) fn check_fingerprint(
        &self,
        identity: &Identity,
        headers: &mut http::HeaderMap,
    ) -> Result<(), ProxyError> {
        let drifted = identity.fingerprint.drifted(headers);
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
}
