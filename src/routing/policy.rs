//! The policies that shape routing: what happens to a retired identity's
//! credentials, to credentials of several identities in one request, and
//! how long identities live.

use serde::{Deserialize, Serialize};

/// What happens to requests carrying a retired identity's credentials.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RetirePolicy {
    /// Answer 502 `identity-retired` until the client drops them.
    #[default]
    Fail,
    /// Remove them; the request goes out as a new, unpinned client.
    Strip,
}

/// What happens to requests carrying credentials of several identities.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ConflictPolicy {
    /// Answer 409 `pin-conflict`.
    #[default]
    Reject,
    /// Keep the identity created first; strip the other credentials.
    Oldest,
}

impl ConflictPolicy {
    /// A short, stable label (metrics).
    pub fn label(self) -> &'static str {
        match self {
            ConflictPolicy::Reject => "reject",
            ConflictPolicy::Oldest => "oldest",
        }
    }
}

/// Identity lifetimes and policies.
#[derive(Clone, Debug)]
pub struct Policies {
    /// Retired credentials.
    pub retire: RetirePolicy,
    /// Credentials of several identities.
    pub conflict: ConflictPolicy,
    /// Idle timeout (exits may override).
    pub idle_timeout_ms: u64,
    /// Maximum lifetime (exits may override).
    pub max_lifetime_ms: u64,
    /// How long retired credentials are remembered.
    pub keep_retired_ms: u64,
    /// Whether the store is shared with other replicas (Redis), whose
    /// exits may differ from this one's for a while (a rolling change of
    /// the configuration): an identity on an exit this replica does not
    /// have is then left to them (`exit-missing`), not retired for all.
    pub shared_store: bool,
}
