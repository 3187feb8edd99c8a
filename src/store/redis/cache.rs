//! The replica's cache of pin hits: a credential looked up moments ago is
//! answered from memory, without a round trip to Redis.
//!
//! Why a cached answer is safe (the consistency argument):
//! - A pin never moves. `SET NX` writes it once; it names one identity,
//!   and an identity's exit is fixed when it is created. A cached binding
//!   therefore sends a cookie through exactly the exit Redis would: the
//!   first invariant does not depend on the cache being fresh.
//! - What can change is the identity's state: a retirement, on any
//!   replica, and its first egress address (which every new tunnel of the
//!   identity is checked against before a byte of a request is written).
//!   Each is published on `NS:retired` in the same atomic step that writes
//!   it; each replica subscribes, and marks the identity so its cached pins
//!   are no longer answered. The cache answers
//!   only while that subscription is live, and only entries fetched during
//!   it: a lost subscription, a new primary (failover) or a data loss in
//!   Redis clears it and starts a new one. So a retirement reaches another
//!   replica's requests once its message arrives, as it would reach a
//!   lookup that was in flight when it was written.
//! - An entry answers for at most the configured time (`store.hit_cache`)
//!   after it was fetched, which bounds how far its use counters lag (they
//!   inform idle expiry and the live view, not where a cookie goes), and
//!   never within that time of its pin's expiry in Redis, after which
//!   another replica could pin the value anew.
//!
//! Unknown credentials are never cached: a new pin can appear at any time.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use dashmap::DashMap;

use super::link::RESPONSE_TIMEOUT;
use super::{Inner, CHECK_INTERVAL};
use crate::credential::{PinKey, RandomKeys};
use crate::identity::IdentityId;
use crate::store::Binding;

/// How many pins the cache holds at most; past it, lookups are not cached
/// until expired entries are pruned.
const MAX_ENTRIES: usize = 100_000;

/// Pins recently seen, answered while a retirement subscription is live.
#[derive(Debug)]
pub(super) struct HitCache {
    /// How long an entry answers after it was fetched.
    ttl: Duration,
    /// How long a pin lives in Redis, in ms.
    pin_ttl_ms: u64,
    entries: DashMap<PinKey, Entry, RandomKeys>,
    /// About how many entries there are (counted on insert, recounted when
    /// pruned): counting the map itself would visit every shard on every
    /// insert.
    size: AtomicUsize,
    /// Identities retired, or given their first egress address, recently
    /// (here or on another replica): their cached pins no longer answer.
    /// Kept for twice the entry lifetime and a response timeout, longer
    /// than any entry read before the retirement can live.
    retired: DashMap<IdentityId, Instant, RandomKeys>,
    /// The live subscription's number (0: none live, nothing answers).
    live: AtomicU64,
    /// The last subscription number handed out.
    opened: AtomicU64,
}

#[derive(Debug)]
struct Entry {
    binding: Binding,
    fetched: Instant,
    /// The subscription live when its lookup left.
    subscription: u64,
}

impl HitCache {
    /// A cache whose entries answer for `ttl`, for pins living `pin_ttl_ms`
    /// in Redis. Nothing answers until [`HitCache::open`].
    pub(super) fn new(ttl: Duration, pin_ttl_ms: u64) -> HitCache {
        HitCache {
            ttl,
            pin_ttl_ms,
            entries: DashMap::default(),
            size: AtomicUsize::new(0),
            retired: DashMap::default(),
            live: AtomicU64::new(0),
            opened: AtomicU64::new(0),
        }
    }

    /// The live subscription, taken before a lookup leaves: its answers
    /// may be cached only if the same subscription is still live when they
    /// arrive (`None`: do not cache).
    pub(super) fn ticket(&self) -> Option<u64> {
        match self.live.load(Ordering::Acquire) {
            0 => None,
            live => Some(live),
        }
    }

    /// The cached binding of `key`, if it may answer at `now_ms`.
    pub(super) fn get(&self, key: &PinKey, now_ms: u64) -> Option<Binding> {
        let live = self.ticket()?;
        let entry = self.entries.get(key)?;
        if entry.subscription != live || entry.fetched.elapsed() >= self.ttl {
            return None;
        }
        let identity = entry.binding.identity.as_ref()?;
        if self.retired.contains_key(&identity.id) {
            return None;
        }
        let ttl_ms = u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX);
        let expires_ms = entry.binding.pin.created_ms.saturating_add(self.pin_ttl_ms);
        if now_ms.saturating_add(ttl_ms) >= expires_ms {
            return None;
        }
        Some(entry.binding.clone())
    }

    /// Caches `binding` for `key`, fetched at `now_ms` by a lookup that
    /// left under subscription `ticket`.
    pub(super) fn put(&self, ticket: u64, key: PinKey, binding: &Binding, now_ms: u64) {
        if binding.identity.is_none() || self.live.load(Ordering::Acquire) != ticket {
            return;
        }
        if self.size.load(Ordering::Relaxed) >= MAX_ENTRIES {
            return;
        }
        let mut binding = binding.clone();
        if let Some(identity) = &mut binding.identity {
            // It was in use when fetched: a lookup is made for a request.
            // Recorded once here, so that a hit copies no record.
            if identity.last_used_ms < now_ms {
                Arc::make_mut(identity).last_used_ms = now_ms;
            }
        }
        let entry = Entry {
            binding,
            fetched: Instant::now(),
            subscription: ticket,
        };
        if self.entries.insert(key, entry).is_none() {
            self.size.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Stops answering for `key` (its pin changed here; another replica's
    /// cache answers the old one until its entry's time runs out).
    pub(super) fn forget(&self, key: &PinKey) {
        if self.entries.remove(key).is_some() {
            // About the count (see `size`): never below zero.
            let _ = self
                .size
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                    Some(n.saturating_sub(1))
                });
        }
    }

    /// Stops answering for identity `id` (it was retired, or recorded its
    /// first egress address: a reading from before either must not
    /// answer). Not marked while
    /// no subscription is live: nothing answers then, and what a new one
    /// answers is fetched after the retirement was stored. (Only the
    /// subscription's loop prunes the marks: without this, a replica whose
    /// subscription is refused kept one per retirement for good.)
    pub(super) fn stale(&self, id: IdentityId) {
        if self.live.load(Ordering::Acquire) == 0 {
            return;
        }
        self.retired.insert(id, Instant::now());
    }

    /// A subscription to retirements went live: clears the cache and
    /// answers from entries fetched from now on.
    pub(super) fn open(&self) {
        let number = self.opened.fetch_add(1, Ordering::AcqRel) + 1;
        self.clear();
        self.live.store(number, Ordering::Release);
    }

    /// The subscription is gone: nothing answers, and the cache is cleared.
    pub(super) fn close(&self) {
        self.live.store(0, Ordering::Release);
        self.clear();
    }

    fn clear(&self) {
        self.entries.clear();
        self.size.store(0, Ordering::Relaxed);
    }

    /// Redis lost data: starts over under a new number if answering (what
    /// was fetched before the loss is not answered again).
    pub(super) fn reset(&self) {
        if self.live.load(Ordering::Acquire) != 0 {
            self.open();
        }
    }

    /// Forgets expired entries and old retirement marks. A mark outlives
    /// every entry that may have been read before it: an entry's time
    /// counts from its reply's arrival, which may come up to a response
    /// timeout after the lookup left (before the retirement, with a short
    /// `hit_cache`).
    pub(super) fn prune(&self) {
        let ttl = self.ttl;
        self.entries
            .retain(|_, entry| entry.fetched.elapsed() < ttl);
        self.size.store(self.entries.len(), Ordering::Relaxed);
        let marks = ttl * 2 + RESPONSE_TIMEOUT;
        self.retired.retain(|_, at| at.elapsed() < marks);
    }
}

/// Keeps the hit cache's subscription to retirements (`NS:retired`) live
/// on the current primary until the store is dropped. The cache answers
/// only while the subscription is live (see the module's doc), and is
/// cleared whenever it lapses or the primary changes.
pub(super) async fn keep_subscribed(inner: Weak<Inner>) {
    use futures_util::StreamExt as _;
    let mut warned = false;
    loop {
        let (client, channel) = {
            let Some(inner) = inner.upgrade() else { return };
            if let Some(cache) = &inner.cache {
                cache.close();
            }
            (inner.link.client(), inner.retired_channel.clone())
        };
        let Ok(client) = client else {
            tokio::time::sleep(CHECK_INTERVAL).await;
            continue;
        };
        let address = client.get_connection_info().addr().to_string();
        let subscribed = tokio::time::timeout(RESPONSE_TIMEOUT, async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            Ok::<_, redis::RedisError>(pubsub)
        })
        .await;
        let pubsub = match subscribed {
            Ok(Ok(pubsub)) => pubsub,
            refused => {
                // Redis answering commands but refusing the subscription
                // (an ACL without pub/sub, say) leaves the cache off for
                // good: every lookup asks Redis. Say so once.
                let serving = inner.upgrade().is_some_and(|i| i.link.is_available());
                if serving && !warned {
                    warned = true;
                    let error = match refused {
                        Ok(Err(e)) => e.to_string(),
                        _ => "timed out".to_owned(),
                    };
                    tracing::warn!(
                        %channel, %error,
                        "cannot subscribe to retirements: the pin-hit cache stays off and every \
                         lookup asks Redis (allow SUBSCRIBE, or set store.hit_cache = \"0s\")"
                    );
                }
                tokio::time::sleep(CHECK_INTERVAL).await;
                continue;
            }
        };
        warned = false;
        match inner.upgrade() {
            Some(inner) => {
                if let Some(cache) = &inner.cache {
                    cache.open();
                }
            }
            None => return,
        }
        let mut messages = pubsub.into_on_message();
        let mut tick = tokio::time::interval(CHECK_INTERVAL);
        loop {
            tokio::select! {
                message = messages.next() => {
                    let Some(message) = message else { break };
                    let Some(inner) = inner.upgrade() else { return };
                    let id = std::str::from_utf8(message.get_payload_bytes())
                        .ok()
                        .and_then(|hex| u64::from_str_radix(hex, 16).ok());
                    if let (Some(cache), Some(id)) = (&inner.cache, id) {
                        cache.stale(IdentityId(id));
                    }
                }
                _ = tick.tick() => {
                    let Some(inner) = inner.upgrade() else { return };
                    if !inner.link.is_available() || inner.link.address() != address {
                        break;
                    }
                    if let Some(cache) = &inner.cache {
                        cache.prune();
                    }
                }
            }
        }
        // Lapsed: stop answering at once, then subscribe anew.
        match inner.upgrade() {
            Some(inner) => {
                if let Some(cache) = &inner.cache {
                    cache.close();
                }
            }
            None => return,
        }
        tokio::time::sleep(CHECK_INTERVAL).await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::credential::PinKind;
    use crate::fingerprint::Fingerprint;
    use crate::identity::{ExitId, Identity, Pin, SessionId};

    const NOW: u64 = 1_800_000_000_000;

    fn binding() -> Binding {
        let identity = Identity::new(
            ExitId::new("e1"),
            SessionId(7),
            NOW,
            Arc::new(Fingerprint::default()),
            NOW,
        );
        Binding {
            pin: Pin {
                identity: identity.id,
                kind: PinKind::Cookie,
                name: Arc::from("datadome"),
                created_ms: NOW,
                expires_ms: None,
            },
            identity: Some(Arc::new(identity)),
        }
    }

    fn key(n: u8) -> PinKey {
        PinKey::from_bytes([n; 16])
    }

    #[test]
    fn retirements_are_not_kept_while_no_subscription_is_live() {
        let cache = HitCache::new(Duration::from_secs(1), u64::MAX);
        for n in 0..1_000 {
            cache.stale(IdentityId(n));
        }
        assert_eq!(cache.retired.len(), 0);
        cache.open();
        cache.stale(IdentityId(1));
        assert_eq!(cache.retired.len(), 1);
    }

    #[test]
    fn nothing_answers_without_a_live_subscription() {
        let cache = HitCache::new(Duration::from_secs(60), 3_600_000);
        assert_eq!(cache.ticket(), None);
        cache.open();
        let ticket = cache.ticket().unwrap();
        cache.put(ticket, key(1), &binding(), NOW);
        assert!(cache.get(&key(1), NOW).is_some());
        cache.close();
        assert!(cache.get(&key(1), NOW).is_none());
        cache.open();
        assert!(
            cache.get(&key(1), NOW).is_none(),
            "a new subscription starts empty"
        );
    }

    #[test]
    fn a_hit_reports_the_identity_in_use_when_its_answer_was_fetched() {
        // Routing judges idleness by the last use: a cached answer must not
        // make an identity look idle since before its lookup.
        let cache = HitCache::new(Duration::from_secs(60), 3_600_000);
        cache.open();
        let ticket = cache.ticket().unwrap();
        let fetched = binding();
        cache.put(ticket, key(1), &fetched, NOW + 5_000);
        let hit = cache.get(&key(1), NOW + 6_000).unwrap();
        assert_eq!(hit.identity.unwrap().last_used_ms, NOW + 5_000);
        assert_eq!(
            fetched.identity.unwrap().last_used_ms,
            NOW,
            "the lookup's own answer is left as Redis gave it"
        );
    }

    #[test]
    fn an_answer_fetched_under_an_earlier_subscription_is_not_cached() {
        let cache = HitCache::new(Duration::from_secs(60), 3_600_000);
        cache.open();
        let before = cache.ticket().unwrap();
        cache.reset();
        cache.put(before, key(1), &binding(), NOW);
        assert!(cache.get(&key(1), NOW).is_none());
    }

    #[test]
    fn a_retirement_stops_answers_even_for_entries_cached_after_it() {
        let cache = HitCache::new(Duration::from_secs(60), 3_600_000);
        cache.open();
        let ticket = cache.ticket().unwrap();
        let bound = binding();
        let id = bound.pin.identity;
        cache.put(ticket, key(1), &bound, NOW);
        cache.stale(id);
        assert!(cache.get(&key(1), NOW).is_none());
        // A lookup that left before the retirement and arrives after it.
        cache.put(ticket, key(2), &bound, NOW);
        assert!(cache.get(&key(2), NOW).is_none());
    }

    #[test]
    fn entries_expire_and_never_answer_near_their_pins_expiry() {
        let cache = HitCache::new(Duration::from_millis(0), 3_600_000);
        cache.open();
        let ticket = cache.ticket().unwrap();
        cache.put(ticket, key(1), &binding(), NOW);
        assert!(cache.get(&key(1), NOW).is_none(), "expired at once");
        let cache = HitCache::new(Duration::from_secs(60), 3_600_000);
        cache.open();
        let ticket = cache.ticket().unwrap();
        cache.put(ticket, key(1), &binding(), NOW);
        assert!(cache.get(&key(1), NOW + 3_600_000 - 61_000).is_some());
        assert!(cache.get(&key(1), NOW + 3_600_000 - 60_000).is_none());
    }

    #[test]
    fn unknown_credentials_and_lost_identities_are_not_cached() {
        let cache = HitCache::new(Duration::from_secs(60), 3_600_000);
        cache.open();
        let ticket = cache.ticket().unwrap();
        let mut gone = binding();
        gone.identity = None;
        cache.put(ticket, key(1), &gone, NOW);
        assert!(cache.get(&key(1), NOW).is_none());
    }
}
