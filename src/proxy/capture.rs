//! Pipeline stage 8, capture: learn from what the origin answers, before
//! the answer is released to the client.
//!
//! - Every tracked cookie in `Set-Cookie` (or DataDome's `X-Set-Cookie`) is
//!   pinned to the request's identity, or founds one on the exit and
//!   upstream session that carried the response; a rotated value thus
//!   inherits its exit, and the client never holds a tracked cookie that is
//!   not pinned. A pin never outlives the cookie's own `Max-Age`/`Expires`.
//! - The identity's use is recorded (last use, success, and the egress
//!   address its first tunnel revealed).
//! - An answer matching an [`invalidation`] rule retires the identity: at
//!   once for status and header rules, as the body streams for body
//!   markers (before the client can read the marker's frame).
//!
//! The response itself passes through untouched. A pin this stage cannot
//! store fails the request (the client must not hold an unpinned tracked
//! cookie); a use it cannot record is only logged.

pub mod invalidation;

use std::net::IpAddr;
use std::sync::Arc;

use http::HeaderMap;

use super::credentials::cookies::{self, SetTrackedCookie};
use super::{Pipeline, ProxyError};
use crate::body::Body;
use crate::credential::PinKey;
use crate::exits::sessions::AnonymousSession;
use crate::fingerprint::{Fingerprint, RequestFingerprint};
use crate::identity::{Identity, Pin, RetireReason, Retirement};
use crate::metrics::{ExitLabel, GapLabel, LabelValue};
use crate::routing::{Route, Router};
use crate::store::{Binding, Founding, PinStore as _, StoreError, StoreErrorKind, TimedStore};
use crate::upstream::conn::TunnelInfo;
use crate::upstream::error::ExchangeKind;
use crate::upstream::unread::Abandonable;
use crate::upstream::Origin;
use crate::upstream::UpstreamError;

impl Pipeline {
    /// Pins the tracked cookies a response sets; returns the identity the
    /// response belongs to (possibly founded by it, with `fingerprint`). A
    /// response setting more tracked cookies than pinproxy pins, or one
    /// with a giant tracked name, is refused: passed on, it would leave the
    /// client holding tracked cookies that are not pinned.
    pub(crate) async fn capture_pins(
        &self,
        route: &Route,
        fingerprint: &RequestFingerprint,
        headers: &HeaderMap,
        egress_ip: Option<IpAddr>,
        carried_by: Option<CarriedBy<'_>>,
    ) -> Result<Option<Arc<Identity>>, ProxyError> {
        let clock = self.router.clock();
        let set =
            cookies::tracked_in_response(headers, &self.cookies, &self.hasher, || clock.now_ms());
        if set.is_empty() {
            return Ok(route.identity.clone());
        }
        // The origin linked a cookie-less connection to whoever holds a
        // cookie it set there: whatever comes of the founding (refused
        // below, a store failure, the client gone meanwhile), it carries no
        // other visitor's request after (see `ExitClient::hand_over`).
        if route.identity.is_none() && set.iter().any(|c| !c.deletes) {
            if let Some(carried_by) = &carried_by {
                carried_by.tunnel.note_founding();
            }
        }
        if let Some(detail) = unpinnable(&set) {
            let error = UpstreamError::Exchange {
                kind: ExchangeKind::Unpinnable,
                detail,
            };
            return Err(ProxyError::upstream(&route.exit, error));
        }
        // A store that refuses requests (a Redis replica whose journal
        // stopped, under `store.on_unavailable = "fail-open"`, which let a
        // credential-less request through) pins nothing either: Redis
        // would take a pin the journal could not, and a restore miss it.
        if let Some(refusal) = self.router.store().refusal() {
            return Err(ProxyError::Store(refusal));
        }
        let record = fingerprint.record();
        // Boxed: founding and pinning make a large future that most
        // answers (no tracked Set-Cookie) never run; unboxed it would size
        // every request's future.
        let learning = learn(&self.router, route, &set, &record, egress_ip, carried_by);
        Ok(Box::pin(learning).await?)
    }

    /// Records a request of `identity` (and whether it got a 2xx), the
    /// egress address its tunnel revealed and the fingerprint its upstream
    /// connection sent (`tunnel`). The identity's first egress address is
    /// durable before the answer goes on (every later tunnel of the
    /// identity is checked against it: a crash that lost it would let the
    /// next tunnel's address stand unchecked); the use itself is written
    /// lazily. A first address the store cannot take fails the answer, as
    /// a pin it cannot take does; a lost use is only logged (it makes an
    /// identity look idle earlier, nothing worse).
    pub(crate) async fn capture_use(
        &self,
        identity: &Identity,
        worked: bool,
        egress_ip: Option<IpAddr>,
        tunnel: Option<&TunnelInfo>,
    ) -> Result<(), ProxyError> {
        let now = self.router.clock().now_ms();
        if let Some(tunnel) = tunnel {
            self.capture_sent_fingerprint(identity, tunnel, now);
        }
        let store = self.router.store();
        // A tunnel that left from another address than the one recorded
        // (a lane another replica opened before the address was recorded,
        // whose first request then failed before recording its own): the
        // identity has been seen from both, and retires.
        if let (Some(recorded), Some(ip)) = (identity.egress_ip, egress_ip) {
            if recorded != ip {
                let reason = RetireReason::ExitIpDrift {
                    expected: recorded,
                    observed: ip,
                };
                self.router
                    .retire_soon(self.exits.clone(), identity.clone(), reason);
            }
        }
        // The egress address only until one is recorded.
        if let Some(ip) = egress_ip.filter(|_| identity.egress_ip.is_none()) {
            // In a task of its own, as a retirement is (`retire_settled`):
            // a request dropped while Redis answers would leave the
            // address in Redis and not in the journal, and a restore after
            // a loss without it.
            let router = self.router.clone();
            let id = identity.id;
            let recorded = self
                .tasks
                .spawn(async move { router.store().record_egress(id, ip).await })
                .await
                .unwrap_or_else(|_| {
                    Err(StoreError::new(
                        crate::store::StoreErrorKind::Closed,
                        "the egress address's write was cut short",
                    ))
                });
            match recorded {
                // Two tunnels of the identity (its HTTP/1.1 and HTTP/2
                // connections, or two replicas' ones) opened before either
                // address was recorded, and left from two addresses: its
                // cookies have been seen from both. It retires, as a drift
                // on one tunnel does, rather than go on from two.
                Ok(Some(recorded)) if recorded != ip => {
                    let reason = RetireReason::ExitIpDrift {
                        expected: recorded,
                        observed: ip,
                    };
                    // Seen by routing at once, stored in the background.
                    self.router
                        .retire_soon(self.exits.clone(), identity.clone(), reason);
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(
                        error = %e, identity = %identity.id,
                        "could not record the identity's egress address; the answer is withheld"
                    );
                    return Err(ProxyError::Store(e));
                }
            }
        }
        if let Err(e) = store.touch(identity.id, now, 1, worked, None).await {
            tracing::warn!(error = %e, identity = %identity.id, "could not record the identity's use");
        }
        Ok(())
    }

    /// Compares what an identity's upstream connection sent with what its
    /// client sent: a difference (what the TLS stack cannot say) is logged
    /// once per identity, with both JA4s and what could not be said, and
    /// counted.
    fn capture_sent_fingerprint(&self, identity: &Identity, tunnel: &TunnelInfo, now_ms: u64) {
        let Some(sent) = &tunnel.sent_ja4 else {
            return;
        };
        if !self.router.observe_sent_ja4(identity.id, sent, now_ms) {
            return;
        }
        // The recorded hello as its client says it on this connection's
        // occasion (no SNI to an address, HTTP/1.1 alone for a WebSocket):
        // what the stack was asked to send.
        let Some(client) = identity
            .fingerprint
            .tls
            .as_deref()
            .map(|hello| crate::fingerprint::ja4::ja4(&hello.on(tunnel.occasion)))
        else {
            return;
        };
        for gap in tunnel.gaps.iter() {
            self.metrics
                .fingerprint_gaps
                .get_or_create(&GapLabel { kind: gap.kind })
                .inc();
        }
        let gaps: Vec<&str> = tunnel.gaps.iter().map(|g| g.detail.as_str()).collect();
        if client.as_str() == &**sent {
            if !gaps.is_empty() {
                tracing::debug!(identity = %identity.id, ja4 = %sent, ?gaps, "fingerprint mirrored (JA4 equal; not said: the listed parts)");
            }
            return;
        }
        self.metrics
            .fingerprint_mismatches
            .get_or_create(&ExitLabel {
                exit: identity.exit.to_string(),
            })
            .inc();
        tracing::warn!(
            identity = %identity.id, exit = %identity.exit, client_ja4 = %client, sent_ja4 = %sent, ?gaps,
            "the upstream ClientHello cannot say everything the client's says"
        );
    }

    /// Retires the identity if the answer (from `site`) is an
    /// invalidation: now for status and header rules, as the body streams
    /// for body markers (counted by exit, site and rule). A body scanned
    /// for markers keeps `hold` (the request's pacing slot) until the
    /// scan's verdict.
    pub(crate) async fn capture_invalidation_on(
        &self,
        identity: &Identity,
        site: Option<&LabelValue>,
        parts: &http::response::Parts,
        mut body: impl Abandonable,
        hold: Option<std::sync::Arc<dyn Send + Sync>>,
    ) -> Body {
        let verdict = self
            .invalidation
            .judge(parts.status, &parts.headers, identity.worked);
        match verdict {
            invalidation::Verdict::Clean => crate::body::boxed(body),
            invalidation::Verdict::Invalidated(rule) => {
                self.metrics.invalidated(&identity.exit, site, &rule);
                let reason = RetireReason::Invalidated { rule };
                // Stored before the answer goes on, so that the client's
                // next request finds it on every replica; a store that
                // cannot take it now gets it in the background, and this
                // process honours it meanwhile (a logged failure alone let
                // the burnt cookie out again on the next request).
                self.router
                    .retire_settled(self.exits.clone(), identity.clone(), reason)
                    .await;
                crate::body::boxed(body)
            }
            invalidation::Verdict::ScanBody(rules) => {
                let router = self.router.clone();
                let exits = self.exits.clone();
                let metrics = self.metrics.clone();
                let identity = identity.clone();
                let site = site.cloned();
                // The marker's frame is scanned before the client can read
                // it, so the client's next request already sees the retirement.
                let on_match = move |rule: String| {
                    metrics.invalidated(&identity.exit, site.as_ref(), &rule);
                    router.retire_soon(exits, identity, RetireReason::Invalidated { rule });
                };
                let limit = self.invalidation.scan_limit;
                match invalidation::Scan::begin(&parts.headers, rules, limit, on_match, hold) {
                    Some(scan) => {
                        let abandon = scan.on_abandon();
                        body.on_abandon(move || abandon.end());
                        scan.over(crate::body::boxed(body), &self.connections)
                    }
                    None => crate::body::boxed(body),
                }
            }
        }
    }
}

/// Why the tracked cookies a response sets cannot all be pinned, if they
/// cannot: more than [`cookies::MAX_TRACKED_PER_RESPONSE`] (deletions
/// aside), or a name longer than [`cookies::MAX_TRACKED_NAME`].
fn unpinnable(set: &[SetTrackedCookie]) -> Option<String> {
    // Cookies, not the keys they are pinned by.
    let pinned = set.iter().filter(|c| !c.deletes && !c.also).count();
    if pinned > cookies::MAX_TRACKED_PER_RESPONSE {
        return Some(format!(
            "the origin set {pinned} tracked cookies in one answer; pinproxy pins at most {} per answer and did not pass it on",
            cookies::MAX_TRACKED_PER_RESPONSE
        ));
    }
    let longest = set.iter().map(|c| c.cookie.name.len()).max().unwrap_or(0);
    (longest > cookies::MAX_TRACKED_NAME).then(|| {
        format!(
            "the origin set a tracked cookie whose name is {longest} bytes long; pinproxy tracks names of at most {} bytes and did not pass the answer on",
            cookies::MAX_TRACKED_NAME
        )
    })
}

/// The upstream connection a response came on, as an identity it founds
/// takes it over (see `ExitClient::hand_over`).
#[derive(Clone, Copy, Debug)]
pub struct CarriedBy<'a> {
    /// The origin the request went to.
    pub origin: &'a Origin,
    /// The connection.
    pub tunnel: &'a Arc<TunnelInfo>,
    /// The connection is HTTP/1.1 and was dialled for this request (it
    /// carried no other).
    pub dialled_for_it: bool,
}

/// Writes `pins` of `identity` (founding it first when `is_new`): the
/// winners, one per pin, and whether the identity went into the store (a
/// founding can lose).
async fn write_pins(
    store: &TimedStore,
    identity: &Identity,
    pins: &[(PinKey, Pin)],
    is_new: bool,
) -> Result<(Vec<Binding>, bool), StoreError> {
    if !is_new {
        return Ok((store.pin_all_if_absent(pins).await?, true));
    }
    // The identity and its pins in one store step (one round trip to
    // Redis), unless the first cookie is someone else's already: then the
    // identity is founded on the others, if any.
    match store.found_identity(identity, pins).await? {
        Founding::Founded(winners) => Ok((winners, true)),
        Founding::Lost(winner) => {
            let mut winners = vec![winner];
            let stored = pins.len() > 1;
            if let Some(rest) = pins.get(1..).filter(|rest| !rest.is_empty()) {
                store.create_identity(identity).await?;
                let bound = store.pin_all_if_absent(rest).await;
                // Refused before anything was written (a reload dropped a
                // name between the two steps): the identity no pin reaches
                // would hold its exit's place until it idled out. Not
                // after a store fault, which may have written some of the
                // pins (a disk that did not confirm them in time). Best
                // effort: the refusal is the answer.
                if bound
                    .as_ref()
                    .is_err_and(|e| e.kind == StoreErrorKind::Untracked)
                {
                    if let Err(e) = store.discard_identity(identity.id).await {
                        tracing::debug!(error = %e, identity = %identity.id, "could not discard an identity left without pins");
                    }
                }
                winners.extend(bound?);
            }
            Ok((winners, stored))
        }
    }
}

/// Pins the tracked cookies `set` by a response to the identity of
/// `route`; a route without one founds an identity (recording
/// `fingerprint`) on the exit and upstream session that carried the
/// response (from `egress_ip`), which takes over the connection that was
/// `carried_by` when it is HTTP/2 or was dialled for the request, and the
/// TLS session the origin issued on it (see `ExitClient::hand_over`: each
/// only if the connection's address is the identity's, and the identity
/// still stands). Returns the identity the response belongs to. A value
/// already pinned elsewhere keeps its first pin (pins never move).
pub async fn learn(
    router: &Router,
    route: &Route,
    set: &[SetTrackedCookie],
    fingerprint: &Fingerprint,
    egress_ip: Option<IpAddr>,
    carried_by: Option<CarriedBy<'_>>,
) -> Result<Option<Arc<Identity>>, StoreError> {
    let now = router.clock().now_ms();
    let live: Vec<&SetTrackedCookie> = set.iter().filter(|c| !c.deletes).collect();
    if live.is_empty() {
        return Ok(route.identity.clone());
    }
    let store = router.store();
    let (identity, is_new) = match &route.identity {
        Some(identity) => (identity.clone(), false),
        None => {
            // (Its connection is marked founding: `capture_pins`.)
            let session = route.anonymous.unwrap_or(AnonymousSession {
                session: route.lane.session,
                started_ms: router.retirement_now(),
            });
            let mut identity = Identity::new(
                route.exit.id().clone(),
                session.session,
                session.started_ms,
                Arc::new(fingerprint.clone()),
                now,
            );
            identity.egress_ip = egress_ip;
            identity.route = route.exit.founding_route();
            route.exit.health.note_identity(identity.created_ms, now);
            (Arc::new(identity), true)
        }
    };
    let pins: Vec<(PinKey, Pin)> = live
        .iter()
        .map(|c| {
            let pin = Pin::new(identity.id, &c.cookie, now, c.expires_ms);
            (c.cookie.key, pin)
        })
        .collect();
    // A loss of the store's data that came to light as they were written
    // leaves the pins in Redis, where the next request would find them
    // live: the identity retires (`store-lost`).
    let (winners, stored) = match write_pins(store, &identity, &pins, is_new).await {
        Err(lost) if lost.kind == StoreErrorKind::Lost => {
            router
                .retire_written_in_a_loss(Some(&route.exit), &identity)
                .await;
            return Err(lost);
        }
        written => written?,
    };
    // Founded on an exit a reload has just replaced with another route
    // under its id, or removed (the request started before): the cookie
    // was earned on the old route, and the identity's next request would
    // leave through the new one, or be refused. It retires at once (the
    // answer still reaches the client; its cookie is answered as retired
    // from then on).
    let left_behind = if is_new && stored {
        route.exit.left_behind()
    } else {
        None
    };
    let superseded = left_behind.is_some();
    if let Some(reason) = left_behind {
        let retirement = Retirement {
            reason,
            at_ms: router.retirement_now(),
        };
        store.retire(identity.id, &retirement).await?;
        let _ = router.count_retired(&identity, &retirement.reason);
        tracing::warn!(
            identity = %identity.id, exit = %identity.exit, reason = %retirement.reason,
            "identity founded on an exit a reload replaced or removed: retired"
        );
    }
    let mut pinned_any = false;
    for (cookie, winner) in live.iter().zip(winners) {
        if winner.pin.identity == identity.id {
            pinned_any = true;
            // Set again (the pin is older than this answer) with a later
            // expiry: the client keeps it longer, and so does the pin.
            if winner.pin.created_ms < now
                && crate::store::expires_later(cookie.expires_ms, winner.pin.expires_ms)
            {
                store
                    .extend_pin(cookie.cookie.key, &winner.pin, cookie.expires_ms)
                    .await?;
            }
            tracing::debug!(cookie = %cookie.cookie, identity = %identity.id, "pinned from Set-Cookie");
        } else {
            // An origin handing out a value already pinned elsewhere (a
            // shared or replayed token): the first pin stands.
            tracing::warn!(
                cookie = %cookie.cookie, identity = %identity.id, pinned_to = %winner.pin.identity,
                "origin set a cookie value already pinned to another identity; keeping the first pin"
            );
        }
    }
    if is_new {
        if !pinned_any {
            if stored {
                store.discard_identity(identity.id).await?;
            }
            return Ok(None);
        }
        // Its session is the identity's own from now on, and so is what
        // it may take of the connection the answer came on.
        if let Some(anonymous) = route.anonymous {
            route
                .exit
                .sessions
                .hand_over(anonymous.session, router.retirement_now());
            match carried_by {
                Some(carried_by) if superseded => {
                    route
                        .exit
                        .client
                        .let_go(&route.lane, carried_by.origin, carried_by.tunnel);
                }
                Some(carried_by) => route.exit.client.hand_over(
                    &route.lane,
                    &identity,
                    carried_by.origin,
                    carried_by.tunnel,
                    carried_by.dialled_for_it,
                ),
                None => {}
            }
        }
        router
            .metrics()
            .identity_created(&identity.exit, "set-cookie");
        tracing::info!(identity = %identity.id, exit = %identity.exit, "new identity from Set-Cookie");
    }
    Ok(Some(identity))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::credential::{Credential, PinHasher};

    fn set(count: usize, name_len: usize, deletes: bool) -> Vec<SetTrackedCookie> {
        let hasher = PinHasher::new([1; 32]);
        (0..count)
            .map(|i| {
                let mut name = format!("_px3_{i}");
                while name.len() < name_len {
                    name.push('x');
                }
                let key = hasher.cookie(&name, "v");
                SetTrackedCookie {
                    cookie: Credential::cookie(name.as_str(), key),
                    deletes,
                    expires_ms: None,
                    also: false,
                }
            })
            .collect()
    }

    /// An answer sets a cookie already pinned elsewhere and one of a name
    /// a reload drops between the founding's two steps: the second step is
    /// refused, and the identity made for it is not left without pins.
    #[tokio::test]
    async fn a_founding_refused_half_way_leaves_no_identity() {
        use crate::identity::{ExitId, SessionId};
        use crate::store::memory::MemoryStore;
        use crate::store::{PinStore as _, Store, StoreErrorKind};
        use std::sync::atomic::{AtomicUsize, Ordering};

        let store = TimedStore::new(
            Store::Memory(MemoryStore::new()),
            &crate::metrics::Metrics::new(),
        );
        let hasher = PinHasher::new([1; 32]);
        let identity = |session| {
            Identity::new(
                ExitId::new("e1"),
                SessionId(session),
                5,
                Fingerprint::of_user_agent("agent"),
                7,
            )
        };
        let pin_of = |name: &str, owner: &Identity| {
            let credential = Credential::cookie(name, hasher.cookie(name, "v"));
            (credential.key, Pin::new(owner.id, &credential, 10, None))
        };
        let earlier = identity(1);
        store.create_identity(&earlier).await.unwrap();
        store
            .pin_all_if_absent(&[pin_of("datadome", &earlier)])
            .await
            .unwrap();
        // `sid` passes the founding's admission and no later one.
        let asked = Arc::new(AtomicUsize::new(0));
        let counted = asked.clone();
        store
            .pinnable()
            .set(Some(Arc::new(Box::new(move |name: &str| {
                name != "sid" || counted.fetch_add(1, Ordering::SeqCst) == 0
            }))))
            .await;
        let new = identity(2);
        let pins = [pin_of("datadome", &new), pin_of("sid", &new)];
        let refused = write_pins(&store, &new, &pins, true).await.unwrap_err();
        assert_eq!(refused.kind, StoreErrorKind::Untracked, "{refused}");
        assert_eq!(asked.load(Ordering::SeqCst), 2, "both steps were judged");
        assert!(
            store.read_identity(new.id).await.unwrap().is_none(),
            "the identity no pin reaches is discarded"
        );
    }

    #[test]
    fn an_answer_may_set_256_tracked_cookies_with_names_of_1024_bytes() {
        assert_eq!(
            unpinnable(&set(cookies::MAX_TRACKED_PER_RESPONSE, 0, false)),
            None
        );
        let refused = unpinnable(&set(cookies::MAX_TRACKED_PER_RESPONSE + 1, 0, false));
        assert!(
            refused.as_deref().is_some_and(
                |why| why.starts_with("the origin set 257 tracked cookies in one answer")
            ),
            "{refused:?}"
        );
        // A cookie pinned by more than one key (its escapes decode) counts
        // once.
        let policy = cookies::CookiePolicy::with_extra(&[]).unwrap();
        let mut answer = http::HeaderMap::new();
        for i in 0..cookies::MAX_TRACKED_PER_RESPONSE {
            let line = format!("_px{i}=a%41");
            answer.append("set-cookie", line.parse().unwrap());
        }
        let escaped =
            cookies::tracked_in_response(&answer, &policy, &PinHasher::new([1; 32]), || 1);
        assert_eq!(escaped.len(), 2 * cookies::MAX_TRACKED_PER_RESPONSE);
        assert_eq!(unpinnable(&escaped), None);
        // Deletions pin nothing: they do not count.
        let mut many = set(cookies::MAX_TRACKED_PER_RESPONSE, 0, false);
        many.extend(set(10, 0, true));
        assert_eq!(unpinnable(&many), None);
        assert_eq!(unpinnable(&set(1, cookies::MAX_TRACKED_NAME, false)), None);
        let refused = unpinnable(&set(1, cookies::MAX_TRACKED_NAME + 1, false));
        assert!(
            refused
                .as_deref()
                .is_some_and(|why| why.contains("whose name is 1025 bytes long")),
            "{refused:?}"
        );
    }
}
