//! Pipeline stage 5: learn pins from what the origin sets.
//!
//! Every tracked cookie in a response's `Set-Cookie` (or DataDome's
//! `X-Set-Cookie`) is pinned to the exit that carried the response, before
//! the response is released to the client, so a rotated value inherits its
//! exit and the client can never hold a tracked cookie pinproxy has not
//! pinned. Cookies being deleted are not pinned. The response itself passes
//! through untouched.

use http::HeaderMap;

use crate::affinity::{Affinity, StoreError};
use crate::cookies::{self, CookiePolicy, PinHasher};
use crate::exits::ExitId;

/// Pins the tracked cookies set by a response carried by `exit`; returns
/// how many tracked cookies it set.
pub async fn learn_from_response(
    affinity: &Affinity,
    policy: &CookiePolicy,
    hasher: &PinHasher,
    exit: &ExitId,
    headers: &HeaderMap,
) -> Result<usize, StoreError> {
    let set = cookies::tracked_in_response(headers, policy, hasher);
    if set.is_empty() {
        return Ok(0);
    }
    let kept_elsewhere = affinity.learn(exit, &set).await?;
    for (cookie, pinned_to) in &kept_elsewhere {
        // An origin handing out a value already pinned elsewhere (a shared
        // or replayed token): the first pin stands, the client will be routed
        // to it next time.
        tracing::warn!(
            %cookie, carried_by = %exit, %pinned_to,
            "origin set a cookie value already pinned to another exit; keeping the first pin"
        );
    }
    for cookie in set.iter().filter(|c| !c.deletes) {
        tracing::debug!(cookie = %cookie.cookie, %exit, "pinned from Set-Cookie");
    }
    Ok(set.len())
}
