//! Pipeline stage 7: learn from what the origin answers, before the answer
//! is released to the client.
//!
//! - Every tracked cookie in `Set-Cookie` (or DataDome's `X-Set-Cookie`) is
//!   pinned to the request's identity, or founds one on the exit and
//!   upstream session that carried the response; a rotated value thus
//!   inherits its exit, and the client never holds a tracked cookie that is
//!   not pinned. A pin never outlives the cookie's own `Max-Age`/`Expires`.
//! - An answer matching an [`invalidation`] rule retires the identity.
//!
//! The response itself passes through untouched.

pub mod invalidation;

use std::net::IpAddr;

use http::HeaderMap;

use crate::affinity::{Affinity, Route, StoreError};
use crate::cookies::{self, CookiePolicy, PinHasher};
use crate::fingerprint::Fingerprint;
use crate::identity::Identity;

/// Pins the tracked cookies a response sets; returns the identity the
/// response belongs to (possibly founded by it).
pub async fn pins_from_response(
    affinity: &Affinity,
    policy: &CookiePolicy,
    hasher: &PinHasher,
    route: &Route,
    fingerprint: &Fingerprint,
    headers: &HeaderMap,
    egress_ip: Option<IpAddr>,
) -> Result<Option<Identity>, StoreError> {
    let set = cookies::tracked_in_response(headers, policy, hasher, affinity.clock().now_ms());
    if set.is_empty() {
        return Ok(route.identity.clone());
    }
    affinity.learn(route, &set, fingerprint, egress_ip).await
}
