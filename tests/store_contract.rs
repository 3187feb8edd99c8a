//! The pin store contract, one suite run against every implementation:
//! memory, the embedded durable store, and Redis (a real redis-server).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support;

use std::sync::Arc;
use std::time::Duration;

use pinproxy::credential::{PinKey, PinKind};
use pinproxy::fingerprint::Fingerprint;
use pinproxy::identity::{ExitId, Identity, IdentityId, Pin, RetireReason, Retirement, SessionId};
use pinproxy::metrics::Metrics;
use pinproxy::store::durable::DurableStore;
use pinproxy::store::memory::MemoryStore;
use pinproxy::store::redis::journal::Journal;
use pinproxy::store::redis::KeyOffer;
use pinproxy::store::redis::{RedisSettings, RedisStore};
use pinproxy::store::{Founding, PinStore, Store, StoreErrorKind};
use support::procs::RedisServer;
use tokio_util::task::TaskTracker;

const HOUR_MS: u64 = 3_600_000;

fn identity(exit: &str, now: u64) -> Identity {
    Identity::new(
        ExitId::new(exit),
        SessionId(rand::random()),
        now,
        Arc::new(Fingerprint::default()),
        now,
    )
}

fn pin(identity: &Identity, expires_ms: Option<u64>) -> Pin {
    Pin {
        identity: identity.id,
        kind: PinKind::Cookie,
        name: Arc::from("datadome"),
        created_ms: identity.created_ms,
        expires_ms,
    }
}

fn key() -> PinKey {
    PinKey::from_bytes(rand::random())
}

/// The contract every store keeps.
async fn contract(store: Arc<Store>) {
    // The clock's own time: Redis judges a key's life by its own.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;

    // Lookup of an unknown key.
    let unknown = key();
    assert_eq!(store.lookup(&[unknown]).await.unwrap().as_slice(), [None]);

    // Pin-if-absent: the first pin wins, later callers learn it.
    let (a, b) = (identity("e1", now), identity("e2", now));
    store.create_identity(&a).await.unwrap();
    store.create_identity(&b).await.unwrap();
    let k = key();
    let first = store.pin_if_absent(k, &pin(&a, None)).await.unwrap();
    assert_eq!(first.pin.identity, a.id);
    assert_eq!(first.identity.as_ref().unwrap().exit, ExitId::new("e1"));
    let second = store.pin_if_absent(k, &pin(&b, None)).await.unwrap();
    assert_eq!(second.pin.identity, a.id, "a pin never moves");
    let found = store.lookup(&[unknown, k]).await.unwrap();
    assert!(found[0].is_none());
    assert_eq!(found[1].as_ref().unwrap().pin.identity, a.id);

    // A pin's cookie expiry only moves later, and only for its own
    // identity, as read.
    let sliding = key();
    let written = store
        .pin_if_absent(sliding, &pin(&a, Some(now + 1_000)))
        .await
        .unwrap();
    let expiry = |store: Arc<Store>| async move {
        store.lookup(&[sliding]).await.unwrap()[0]
            .as_ref()
            .unwrap()
            .pin
            .expires_ms
    };
    store
        .extend_pin(sliding, &written.pin, Some(now + 500))
        .await
        .unwrap();
    assert_eq!(
        expiry(store.clone()).await,
        Some(now + 1_000),
        "never sooner"
    );
    let foreign = Pin {
        identity: b.id,
        ..written.pin.clone()
    };
    store
        .extend_pin(sliding, &foreign, Some(now + 9_000))
        .await
        .unwrap();
    assert_eq!(
        expiry(store.clone()).await,
        Some(now + 1_000),
        "only its own"
    );
    store
        .extend_pin(sliding, &written.pin, Some(now + 5_000))
        .await
        .unwrap();
    assert_eq!(expiry(store.clone()).await, Some(now + 5_000));
    assert_eq!(
        store.lookup(&[sliding]).await.unwrap()[0]
            .as_ref()
            .unwrap()
            .pin
            .identity,
        a.id
    );

    // Racing first sight: exactly one winner, everyone sees it.
    let raced = key();
    let mut racers = Vec::new();
    for n in 0..32 {
        let store = store.clone();
        racers.push(tokio::spawn(async move {
            let me = identity(&format!("e{}", n % 3), now);
            store.create_identity(&me).await.unwrap();
            let winner = store.pin_if_absent(raced, &pin(&me, None)).await.unwrap();
            (me.id, winner.pin.identity)
        }));
    }
    let mut winners = std::collections::HashSet::new();
    let mut won_by_self = 0;
    for racer in racers {
        let (me, winner) = racer.await.unwrap();
        winners.insert(winner);
        won_by_self += usize::from(me == winner);
    }
    assert_eq!(winners.len(), 1, "one winner");
    assert_eq!(won_by_self, 1, "exactly one racer won");

    // Founding: the identity and all its pins in one step, unless the
    // first pin is someone else's; then nothing is stored.
    let (founded, f1, f2) = (identity("e4", now), key(), key());
    let founding = store
        .found_identity(
            &founded,
            &[
                (f1, pin(&founded, None)),
                (k, pin(&founded, None)),
                (f2, pin(&founded, None)),
            ],
        )
        .await
        .unwrap();
    let Founding::Founded(bound) = founding else {
        panic!("a founding on a fresh first pin stores the identity: {founding:?}");
    };
    let bound: Vec<_> = bound.iter().map(|b| b.pin.identity).collect();
    assert_eq!(
        bound,
        vec![founded.id, a.id, founded.id],
        "pins already taken stay"
    );
    let seen = store.lookup(&[f2]).await.unwrap()[0].clone().unwrap();
    assert_eq!(
        seen.identity.unwrap().exit,
        ExitId::new("e4"),
        "the identity is stored with its pins"
    );
    let (late, f3) = (identity("e5", now), key());
    let founding = store
        .found_identity(&late, &[(f1, pin(&late, None)), (f3, pin(&late, None))])
        .await
        .unwrap();
    assert!(
        matches!(&founding, Founding::Lost(w) if w.pin.identity == founded.id),
        "{founding:?}"
    );
    assert_eq!(
        store.lookup(&[f3]).await.unwrap().as_slice(),
        [None],
        "a lost founding stores nothing"
    );
    let bare = identity("e6", now);
    assert_eq!(
        store.found_identity(&bare, &[]).await.unwrap(),
        Founding::Founded(Vec::new())
    );

    // Several pins at once: each is pin-if-absent on its own, in order; a
    // key already pinned keeps its pin while the new ones take.
    let (fresh1, fresh2) = (key(), key());
    let batch = [
        (fresh1, pin(&b, None)),
        (k, pin(&b, None)),
        (fresh2, pin(&b, None)),
    ];
    let bound: Vec<_> = store
        .pin_all_if_absent(&batch)
        .await
        .unwrap()
        .into_iter()
        .map(|binding| binding.pin.identity)
        .collect();
    assert_eq!(bound, vec![b.id, a.id, b.id]);
    let found = store.lookup(&[fresh1, fresh2]).await.unwrap();
    assert!(found
        .iter()
        .all(|f| f.as_ref().unwrap().pin.identity == b.id));

    // Egress: the first address recorded stands.
    let ip1 = "127.0.0.2".parse().unwrap();
    let ip2 = "127.0.0.3".parse().unwrap();
    assert_eq!(store.record_egress(a.id, ip1).await.unwrap(), Some(ip1));
    assert_eq!(store.record_egress(a.id, ip2).await.unwrap(), Some(ip1));
    // Of an identity the store does not hold: nothing, and nothing written.
    let gone = identity("e1", now);
    assert_eq!(store.record_egress(gone.id, ip1).await.unwrap(), None);
    let listed = store.list().await.unwrap();
    assert!(listed.iter().all(|l| l.identity.id != gone.id));

    // Retire: the first retirement stands and shows in lookups.
    let first_reason = Retirement {
        reason: RetireReason::ExitDown,
        at_ms: now + 1,
    };
    store.retire(a.id, &first_reason).await.unwrap();
    store
        .retire(
            a.id,
            &Retirement {
                reason: RetireReason::Evicted,
                at_ms: now + 2,
            },
        )
        .await
        .unwrap();
    let retired = store.lookup(&[k]).await.unwrap()[0]
        .clone()
        .unwrap()
        .identity
        .unwrap();
    assert_eq!(retired.retired, Some(first_reason.clone()));
    assert_eq!(retired.egress_ip, Some(ip1));

    // Touch: counted, every one (Redis writes them off the request path,
    // several touches of one identity in one write, and a replica's hit
    // cache may answer with counters up to `store.hit_cache` old).
    // The egress address a touch carries is recorded unless one is.
    let ip3 = "127.0.0.4".parse().unwrap();
    store
        .touch(b.id, now + 5, 1, false, Some(ip3))
        .await
        .unwrap();
    store
        .touch(b.id, now + 10, 1, true, Some(ip1))
        .await
        .unwrap();
    let kb = key();
    store.pin_if_absent(kb, &pin(&b, None)).await.unwrap();
    let mut touched = false;
    for _ in 0..300 {
        let seen = store.lookup(&[kb]).await.unwrap()[0]
            .clone()
            .unwrap()
            .identity
            .unwrap();
        if seen.requests == 2
            && seen.worked
            && seen.last_used_ms == now + 10
            && seen.egress_ip == Some(ip3)
        {
            touched = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(touched, "touch recorded");
    // A use that is no request (an open relay's): the last use moves, the
    // count does not. Read by id, as a relay's check reads it.
    store.touch(b.id, now + 20, 0, false, None).await.unwrap();
    let mut used = None;
    for _ in 0..300 {
        let seen = store.read_identity(b.id).await.unwrap().unwrap();
        if seen.last_used_ms == now + 20 {
            used = Some(seen);
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let used = used.expect("a relay's use recorded");
    assert_eq!((used.id, used.requests, used.retired), (b.id, 2, None));

    // Exit deaths: the latest stands.
    store
        .record_exit_death(&ExitId::new("e9"), 50)
        .await
        .unwrap();
    store
        .record_exit_death(&ExitId::new("e9"), 40)
        .await
        .unwrap();
    assert!(store
        .exit_deaths()
        .await
        .unwrap()
        .contains(&(ExitId::new("e9"), 50)));

    // Discarding an unpinned identity.
    let loser = identity("e1", now);
    store.create_identity(&loser).await.unwrap();
    store.discard_identity(loser.id).await.unwrap();
    assert_eq!(store.read_identity(loser.id).await.unwrap(), None);
    let read = store.read_identity(a.id).await.unwrap().unwrap();
    assert_eq!((read.id, read.retired), (a.id, Some(first_reason)));

    // Listing shows identities with their pins.
    let listed = store.list().await.unwrap();
    let of_a = listed.iter().find(|l| l.identity.id == a.id).unwrap();
    assert!(of_a.pins.iter().any(|(pk, _)| *pk == k));
    assert!(!listed.iter().any(|l| l.identity.id == loser.id));
}

/// Expiry by sweep (memory and durable stores).
async fn sweep_contract(store: &Store) {
    let now = 1_800_000_000_000;
    let idle = identity("e1", now);
    let live = identity("e1", now);
    store.create_identity(&idle).await.unwrap();
    store.create_identity(&live).await.unwrap();
    let (k_idle, k_cookie, k_live) = (key(), key(), key());
    store
        .pin_if_absent(k_idle, &pin(&idle, None))
        .await
        .unwrap();
    store
        .pin_if_absent(k_cookie, &pin(&live, Some(now + HOUR_MS)))
        .await
        .unwrap();
    store
        .pin_if_absent(k_live, &pin(&live, None))
        .await
        .unwrap();
    let expiry = |i: &Identity| {
        (i.id == idle.id).then_some(Retirement {
            reason: RetireReason::IdleExpired,
            at_ms: now + 2 * HOUR_MS,
        })
    };

    // First sweep: the idle identity is retired (remembered), nothing forgotten.
    let swept = store
        .sweep(now + 2 * HOUR_MS, 24 * HOUR_MS, &expiry)
        .await
        .unwrap();
    assert_eq!((swept.retired, swept.pins, swept.identities), (1, 0, 0));
    let seen = store.lookup(&[k_idle]).await.unwrap()[0].clone().unwrap();
    assert_eq!(
        seen.identity.unwrap().retired.as_ref().unwrap().reason,
        RetireReason::IdleExpired
    );

    // A day later: the retired identity and the expired cookie are forgotten.
    let swept = store
        .sweep(now + 27 * HOUR_MS, 24 * HOUR_MS, &|_| None)
        .await
        .unwrap();
    assert_eq!((swept.identities, swept.pins), (1, 2), "{swept:?}");
    let found = store.lookup(&[k_idle, k_cookie, k_live]).await.unwrap();
    assert!(found[0].is_none() && found[1].is_none() && found[2].is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_memory_store_keeps_the_contract() {
    let store = Arc::new(Store::Memory(MemoryStore::new()));
    contract(store.clone()).await;
    sweep_contract(&Store::Memory(MemoryStore::new())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_durable_store_keeps_the_contract_across_reopens() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pins.redb");
    let store = Arc::new(Store::Durable(DurableStore::open(&path).unwrap()));
    contract(store.clone()).await;
    let swept = Store::Durable(DurableStore::open(&dir.path().join("swept.redb")).unwrap());
    sweep_contract(&swept).await;
    let before = store.list().await.unwrap().len();
    store.close().await;
    drop(store);
    let reopened = Store::Durable(DurableStore::open(&path).unwrap());
    assert_eq!(
        reopened.list().await.unwrap().len(),
        before,
        "everything survives a reopen"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_store_keeps_the_contract() {
    let redis = RedisServer::start().await;
    let journal_dir = tempfile::tempdir().unwrap();
    // Pins live the longest identity lifetime (48 h) plus the time retired
    // credentials are remembered (30 days), as the daemon sets it.
    let (longest, keep) = (48 * HOUR_MS, 30 * 24 * HOUR_MS);
    let store = redis_store(
        &redis.url(),
        "contract",
        longest + keep,
        keep,
        Some(journal_dir.path()),
    )
    .await;
    let store = Arc::new(Store::Redis(store));
    contract(store.clone()).await;

    // Expiry is the server's: pins carry their lifetime as a TTL.
    let now = 1_800_000_000_000;
    let someone = identity("e1", now);
    store.create_identity(&someone).await.unwrap();
    let k = key();
    let written = store.pin_if_absent(k, &pin(&someone, None)).await.unwrap();
    let client = redis::Client::open(redis.url()).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    let ttl: i64 = redis::cmd("PTTL")
        .arg(format!("contract:pin:{}", k.to_hex()))
        .query_async(&mut connection)
        .await
        .unwrap();
    let expected = (longest + keep) as i64;
    assert!(ttl > expected - 60_000 && ttl <= expected, "pin ttl {ttl}");
    // And routing sees a pin expire no later than its creation plus the
    // longest lifetime the TTL was set for: an identity a later, longer
    // lifetime lets live on sees its cookie expire while Redis still holds
    // the pin, never a pin Redis let go (unknown, free to be pinned anew).
    assert_eq!(written.pin.expires_ms, Some(now + longest));
    let k2 = key();
    let sooner = store
        .pin_if_absent(k2, &pin(&someone, Some(now + HOUR_MS)))
        .await
        .unwrap();
    assert_eq!(sooner.pin.expires_ms, Some(now + HOUR_MS));
    let found = store.lookup(&[k]).await.unwrap();
    assert_eq!(
        found[0].as_ref().unwrap().pin.expires_ms,
        Some(now + longest)
    );

    // A later expiry reaches the replica's journal too, so a restore after
    // a loss brings the pin back as it is (Redis judges the key's life by
    // its own clock: this pin is made now).
    let real_now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let sliding = identity("e1", real_now);
    store.create_identity(&sliding).await.unwrap();
    let k3 = key();
    let first = store
        .pin_if_absent(k3, &pin(&sliding, Some(real_now + 60_000)))
        .await
        .unwrap();
    store
        .extend_pin(k3, &first.pin, Some(real_now + HOUR_MS))
        .await
        .unwrap();
    let Store::Redis(redis_store) = &*store else {
        unreachable!("a Redis store")
    };
    redis_store.close().await;
    let journal = Journal::open(journal_dir.path()).unwrap();
    let journaled = journal.lookup(&[k3]).await.unwrap();
    assert_eq!(
        journaled[0].as_ref().unwrap().pin.expires_ms,
        Some(real_now + HOUR_MS)
    );
}

/// A pin's expiry moves later only as far as its key outlives it: the
/// key's time to live was set by whoever wrote the pin, with the lifetimes
/// in force then, and a replica started with longer ones must not let the
/// pin claim an expiry past the key (nor one started with shorter ones
/// shorten it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_pin_moves_later_only_within_its_keys_life() {
    let redis = RedisServer::start().await;
    let url = redis.url();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    // Pins of `short` live 3 h (2 h lifetimes, 1 h remembered), of `long`
    // 11 h, of `shorter` 2 h.
    let short = redis_store(&url, "extend", 3 * HOUR_MS, HOUR_MS, None).await;
    let long = redis_store(&url, "extend", 11 * HOUR_MS, HOUR_MS, None).await;
    let shorter = redis_store(&url, "extend", 2 * HOUR_MS, HOUR_MS, None).await;
    let someone = identity("e1", now);
    short.create_identity(&someone).await.unwrap();
    let k = key();
    let written = short
        .pin_if_absent(k, &pin(&someone, Some(now + 30 * 60_000)))
        .await
        .unwrap();
    let expiry = || async {
        short.lookup(&[k]).await.unwrap()[0]
            .as_ref()
            .unwrap()
            .pin
            .expires_ms
    };
    long.extend_pin(k, &written.pin, Some(now + 30 * 24 * HOUR_MS))
        .await
        .unwrap();
    assert_eq!(
        expiry().await,
        Some(now + 30 * 60_000),
        "past the key's life"
    );
    short
        .extend_pin(k, &written.pin, Some(now + 90 * 60_000))
        .await
        .unwrap();
    assert_eq!(expiry().await, Some(now + 90 * 60_000));
    let moved = short.lookup(&[k]).await.unwrap()[0].clone().unwrap().pin;
    shorter
        .extend_pin(k, &moved, Some(now + 5 * HOUR_MS))
        .await
        .unwrap();
    assert_eq!(expiry().await, Some(now + 90 * 60_000), "never sooner");
}

/// A reply that shows Redis lost data decides nothing, whatever it says:
/// a pin written in it may be a lost credential founded anew on another
/// exit, which the restore then finds in conflict. Only commands sent once
/// the recovery began (under its quarantine) are answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_that_shows_a_loss_decides_nothing() {
    let redis = RedisServer::start().await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let client = redis::Client::open(redis.url()).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    // The background check (every 500 ms) may notice the wipe between it
    // and the write; the write is then answered under the restore. A few
    // attempts, each on a store of its own, make that race irrelevant.
    for attempt in 0..3 {
        let dir = tempfile::tempdir().unwrap();
        let namespace = format!("lost-reply-{attempt}");
        let store = redis_store(
            &redis.url(),
            &namespace,
            2 * HOUR_MS,
            HOUR_MS,
            Some(dir.path()),
        )
        .await;
        let first = identity("e1", now);
        store.create_identity(&first).await.unwrap();
        store
            .pin_if_absent(key(), &pin(&first, None))
            .await
            .unwrap();

        let _: () = redis::cmd("FLUSHDB")
            .query_async(&mut connection)
            .await
            .unwrap();
        let second = identity("e2", now);
        match store.pin_if_absent(key(), &pin(&second, None)).await {
            Err(refused) => {
                assert_eq!(refused.kind, StoreErrorKind::Lost, "{refused}");
                assert!(refused.to_string().contains("lost data"), "{refused}");
                return;
            }
            Ok(_) if attempt < 2 && store.loss_report().is_some() => continue,
            Ok(used) => panic!("a pin written in a reply that shows the wipe was used: {used:?}"),
        }
    }
}

/// A credential looked up before a replica noticed a loss is not pinned on
/// that reading: the lookup may have missed a pin Redis lost, which the
/// restore has not written back yet, and a write would found it anew on an
/// exit chosen now (the router asks `unchanged_since` before it writes).
/// Here a replica that never saw the pin misses it, the replica whose
/// journal holds it notices, and the first joins the fleet's quarantine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lookup_made_before_a_loss_was_noticed_decides_no_pin() {
    let redis = RedisServer::start().await;
    let client = redis::Client::open(redis.url()).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    let (holder_dir, other_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (holder, someone, k) = replica_with_a_pin(&redis, "fenced", holder_dir.path()).await;
    let other = Store::Redis(
        redis_store(
            &redis.url(),
            "fenced",
            2 * HOUR_MS,
            HOUR_MS,
            Some(other_dir.path()),
        )
        .await,
    );
    delete_pins(&mut connection, "fenced").await;

    let seen = other.losses_noticed();
    assert_eq!(other.lookup(&[k]).await.unwrap().as_slice(), [None]);
    other.unchanged_since(seen).unwrap();
    // The holder's journal has it: the loss is noticed, the pin restored.
    let restored = holder.lookup(&[k]).await.unwrap()[0].clone().unwrap();
    assert_eq!(restored.pin.identity, someone.id);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while other.losses_noticed() == seen {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the other replica never joined the fleet's quarantine"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let refused = other.unchanged_since(seen).unwrap_err();
    assert_eq!(refused.kind, StoreErrorKind::Lost, "{refused}");
    assert!(refused.to_string().contains("lose data"), "{refused}");
    // Looked up again, under the quarantine, it follows its identity.
    let now = other.lookup(&[k]).await.unwrap()[0].clone().unwrap();
    assert_eq!(now.pin.identity, someone.id);
    other.close().await;
    holder.close().await;
}

/// Two replicas that judged one record of the fleet's tracked cookies at
/// once do not both go through: the record is replaced only if it is
/// still the one judged, and the second is judged again against the
/// first's (a rollout superseded mid-way: `Tok` then `tok` added).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_of_the_fleets_tracked_cookies_is_judged_against_the_record_it_replaces() {
    use pinproxy::daemon::untracked::{check_fleet, claim_fleet, FleetTracking};
    use pinproxy::proxy::credentials::cookies::CookiePolicy;
    let redis = RedisServer::start().await;
    let url = redis.url();
    let tool = || redis_store(&url, "tracked", 2 * HOUR_MS, HOUR_MS, None);
    let (first, second) = (Store::Redis(tool().await), Store::Redis(tool().await));
    let policy = |names: &[&str]| {
        CookiePolicy::with_extra(&names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap()
    };
    let sid = policy(&["sid"]);
    claim_fleet(&first, &sid, None, false).await.unwrap();
    let (one, other) = (policy(&["sid", "Tok"]), policy(&["sid", "tok"]));
    let judged_by_one = check_fleet(&first, &one, false).await.unwrap();
    let judged_by_other = check_fleet(&second, &other, false).await.unwrap();
    assert_eq!(judged_by_one, judged_by_other, "both judged one record");
    claim_fleet(&first, &one, judged_by_one, false)
        .await
        .unwrap();
    let refused = claim_fleet(&second, &other, judged_by_other, false)
        .await
        .unwrap_err();
    assert!(
        matches!(&refused, FleetTracking::Rekeyed { fleet, ours } if fleet == &["Tok"] && ours == &["tok"]),
        "{refused}"
    );
    assert_eq!(
        first.fleet_tracking().await.unwrap(),
        Some(one.patterns().iter().map(|p| p.to_string()).collect()),
        "the record is the first's"
    );
    // A record written with stray blanks (by hand) is the one it reads as.
    let client = redis::Client::open(redis.url()).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    let spaced = format!(" {}  ", one.patterns().join("  "));
    let _: () = redis::cmd("SET")
        .arg("tracked:tracked-cookies")
        .arg(&spaced)
        .query_async(&mut connection)
        .await
        .unwrap();
    let more = policy(&["sid", "Tok", "more"]);
    let judged = check_fleet(&second, &more, false).await.unwrap();
    claim_fleet(&second, &more, judged, false)
        .await
        .expect("a compatible change goes through");
}

/// A replica's store on namespace `namespace` of `redis` (its data in
/// `dir`), holding one identity with one pin.
async fn replica_with_a_pin(
    redis: &RedisServer,
    namespace: &str,
    dir: &std::path::Path,
) -> (RedisStore, Identity, PinKey) {
    let store = redis_store(&redis.url(), namespace, 2 * HOUR_MS, HOUR_MS, Some(dir)).await;
    let someone = identity("e1", 1_800_000_000_000);
    store.create_identity(&someone).await.unwrap();
    let k = key();
    store.pin_if_absent(k, &pin(&someone, None)).await.unwrap();
    (store, someone, k)
}

/// An operator's eviction, at a fixed time.
fn evicted() -> Retirement {
    Retirement {
        reason: RetireReason::Evicted,
        at_ms: 1_800_000_000_001,
    }
}

/// Deletes identity `id`'s retirement from Redis (namespace `namespace`):
/// how a failover that lost it looks.
async fn lose_retirement(redis: &RedisServer, namespace: &str, id: IdentityId) {
    let client = redis::Client::open(redis.url()).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    let deleted: i64 = redis::cmd("HDEL")
        .arg(format!("{namespace}:id:{id}"))
        .arg("retired")
        .query_async(&mut connection)
        .await
        .unwrap();
    assert_eq!(deleted, 1, "the retirement was not in Redis");
}

/// Why the identity `store` answers for `key` is retired, if it is.
async fn retired_reason(store: &RedisStore, key: PinKey) -> Option<RetireReason> {
    let found = store.lookup(&[key]).await.unwrap();
    found[0]
        .as_ref()
        .and_then(|b| b.identity.as_ref())
        .and_then(|i| i.retired.as_ref())
        .map(|r| r.reason.clone())
}

/// A Redis that evicts under memory pressure keeps the namespace's epoch
/// and sequence (they have no time to live), so only its eviction count
/// shows that pins may be gone: a count that grows is a loss, with its
/// restore and quarantine, though every reply's generation looks whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_eviction_is_taken_as_a_loss() {
    let redis = RedisServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (store, _, _) = replica_with_a_pin(&redis, "evicting", dir.path()).await;
    store.check_server().await.unwrap();
    assert!(store.loss_report().is_none());

    let client = redis::Client::open(redis.url()).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    make_it_evict(&mut connection).await;

    let mut report = None;
    for _ in 0..200 {
        report = store.loss_report();
        if report.is_some() {
            break;
        }
        // The background check reads the count every 500 ms.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let report = report.expect("the eviction was not taken as a loss");
    assert!(report.what.contains("evicted"), "{}", report.what);
}

/// Reads a number from Redis's `INFO` `section`.
async fn info_number(
    connection: &mut redis::aio::MultiplexedConnection,
    section: &str,
    field: &str,
) -> u64 {
    let text: String = redis::cmd("INFO")
        .arg(section)
        .query_async(connection)
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .unwrap()
        .trim()
        .parse::<u64>()
        .unwrap()
}

/// Whether Redis holds `key`.
async fn key_exists(connection: &mut redis::aio::MultiplexedConnection, key: &str) -> bool {
    let exists: u64 = redis::cmd("EXISTS")
        .arg(key)
        .query_async(connection)
        .await
        .unwrap();
    exists == 1
}

/// Makes the server evict: `volatile-random` under a `maxmemory` a little
/// above what it uses, then filler keys (bounded) until it has evicted.
/// Only keys with a time to live go (pins, identities, the filler), never
/// the namespace's epoch and sequence: the loss seen is the eviction, not
/// a wipe the eviction of the epoch would look like.
async fn make_it_evict(connection: &mut redis::aio::MultiplexedConnection) {
    let evicted_before = info_number(connection, "stats", "evicted_keys").await;
    let used = info_number(connection, "memory", "used_memory").await;
    let _: () = redis::cmd("CONFIG")
        .arg(&["SET", "maxmemory-policy", "volatile-random"][..])
        .query_async(connection)
        .await
        .unwrap();
    let _: () = redis::cmd("CONFIG")
        .arg(&["SET", "maxmemory", &(used + 256 * 1024).to_string()][..])
        .query_async(connection)
        .await
        .unwrap();
    let filler = vec![b'x'; 4096];
    for i in 0..2_000 {
        let _: () = redis::cmd("SET")
            .arg(format!("filler:{i}"))
            .arg(&filler)
            .arg("EX")
            .arg(3600)
            .query_async(connection)
            .await
            .unwrap();
        if i % 50 == 49 && info_number(connection, "stats", "evicted_keys").await > evicted_before {
            break;
        }
    }
    assert!(
        info_number(connection, "stats", "evicted_keys").await > evicted_before,
        "Redis evicted nothing"
    );
}

/// A loss seen while a restore runs, once the restore has taken its epoch,
/// may have taken pins it already wrote back: it prolongs the quarantine
/// and brings another restore when this one ends. Here Redis is wiped, the
/// replica's restore is held at its pin writes (its Redis user may not
/// write pins for a while, so it retries), and the server evicts
/// meanwhile. Before, every loss seen during a restore was dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loss_seen_during_a_restore_brings_another() {
    let redis = RedisServer::start().await;
    let admin = redis::Client::open(redis.url()).unwrap();
    let mut connection = admin.get_multiplexed_async_connection().await.unwrap();
    let mut acl = connection.clone();
    let mut allow = async move |keys: &[&str]| {
        let mut rules = vec![
            "restorer",
            "on",
            ">restorer-secret",
            "&*",
            "+@all",
            "resetkeys",
        ];
        rules.extend_from_slice(keys);
        let _: () = redis::cmd("ACL")
            .arg("SETUSER")
            .arg(&rules[..])
            .query_async(&mut acl)
            .await
            .unwrap();
    };
    allow(&["~*"]).await;
    let url = format!(
        "redis://restorer:restorer-secret@127.0.0.1:{}/0",
        redis.port
    );
    let dir = tempfile::tempdir().unwrap();
    let metrics = Arc::new(Metrics::new());
    let store = redis_store_ttl(
        &url,
        "again",
        2 * HOUR_MS,
        HOUR_MS,
        Some(dir.path()),
        metrics.clone(),
        Duration::from_secs(1),
    )
    .await;
    let someone = identity("e1", 1_800_000_000_000);
    store.create_identity(&someone).await.unwrap();
    let k = key();
    store.pin_if_absent(k, &pin(&someone, None)).await.unwrap();
    store.check_server().await.unwrap();

    // Every key but the pins.
    allow(&[
        "~again:epoch",
        "~again:seq",
        "~again:founding",
        "~again:writer:*",
        "~again:quarantine-until",
        "~again:hash-key",
        "~again:id:*",
        "~again:exit-deaths",
    ])
    .await;
    let _: () = redis::cmd("FLUSHALL")
        .query_async(&mut connection)
        .await
        .unwrap();
    let written_back = format!("again:id:{}", someone.id);
    let mut held = false;
    for _ in 0..200 {
        if key_exists(&mut connection, &written_back).await {
            held = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(held, "the restore never wrote the identity back");
    assert_eq!(metrics.store_losses.get(), 1);
    let first = store.loss_report().unwrap();
    assert!(!first.restore_done);

    make_it_evict(&mut connection).await;
    // A second loss counted while the restore is held (evictions the
    // store reads later may count as a third: the product's due).
    let mut seen = false;
    for _ in 0..200 {
        if metrics.store_losses.get() >= 2 {
            seen = true;
            break;
        }
        // The background check reads the count every 500 ms.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(seen, "a loss during the restore was dropped");
    let second = store.loss_report().unwrap();
    assert!(
        second.what.contains("epoch is gone") && second.what.contains("while it was restored"),
        "{}",
        second.what
    );
    assert!(second.quarantine_until_ms > first.quarantine_until_ms);

    // Let the restore through: it ends, and runs again.
    let _: () = redis::cmd("CONFIG")
        .arg(&["SET", "maxmemory", "0"][..])
        .query_async(&mut connection)
        .await
        .unwrap();
    allow(&["~*"]).await;
    let pin_key = format!("again:pin:{}", k.to_hex());
    let mut whole = false;
    for _ in 0..200 {
        if key_exists(&mut connection, &pin_key).await
            && store.loss_report().is_some_and(|r| r.restore_done)
        {
            whole = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        whole,
        "the restore never finished: {:?}",
        store.loss_report()
    );
}

/// A retirement counts among the writes of the replica that made it: a
/// failover that loses it is noticed by that replica even when other
/// replicas' writes took the namespace's sequence past what it had seen,
/// and the retired identity does not come back as live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_retirement_is_noticed_by_the_replica_that_wrote_it() {
    let redis = RedisServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (store, someone, k) = replica_with_a_pin(&redis, "retire-lost", dir.path()).await;
    let client = redis::Client::open(redis.url()).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    let writer: Vec<String> = redis::cmd("KEYS")
        .arg("retire-lost:writer:*")
        .query_async(&mut connection)
        .await
        .unwrap();
    let before: u64 = redis::cmd("GET")
        .arg(&writer[0])
        .query_async(&mut connection)
        .await
        .unwrap();
    let evicted = Retirement {
        reason: RetireReason::Evicted,
        at_ms: 1_800_000_000_001,
    };
    store.retire(someone.id, &evicted).await.unwrap();

    // A failover to a replica that missed the retirement, while other
    // replicas' writes moved the sequence on.
    let _: () = redis::cmd("HDEL")
        .arg(format!("retire-lost:id:{}", someone.id))
        .arg("retired")
        .query_async(&mut connection)
        .await
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg(&writer[0])
        .arg(before)
        .query_async(&mut connection)
        .await
        .unwrap();
    let _: () = redis::cmd("INCRBY")
        .arg("retire-lost:seq")
        .arg(1000)
        .query_async(&mut connection)
        .await
        .unwrap();
    // The lookup's reply shows the loss (or the background check, every
    // 500 ms, saw it first and the lookup was answered under the restore).
    match store.lookup(&[k]).await {
        Err(refused) => assert_eq!(refused.kind, StoreErrorKind::Lost, "{refused}"),
        Ok(found) => {
            let identity = found[0].as_ref().and_then(|b| b.identity.as_ref());
            assert!(
                identity.is_none_or(|i| i.retired.is_some()),
                "the identity came back live: {identity:?}"
            );
        }
    }
    let report = store
        .loss_report()
        .expect("the identity came back unretired, unnoticed");
    assert!(report.what.contains("went back"), "{}", report.what);
}

/// Redis expires keys by its own clock: one that jumps ahead by more than
/// half the time retired credentials are remembered may have expired the
/// pins of live identities while the namespace's history (no time to
/// live) looks whole. The jump, seen in `INFO`, is a loss: a credential
/// Redis no longer knows is answered as lost, never left to be pinned anew.
/// (The relay shows Redis's clock ahead; the test deletes the pin as the
/// jump would have expired it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jump_of_redis_s_clock_is_taken_as_a_loss() {
    let redis = RedisServer::start().await;
    let shift = support::redis_group::ClockShift::start(redis.port).await;
    let store = redis_store(&shift.url(), "jumping", 2 * HOUR_MS, HOUR_MS, None).await;
    store.check_server().await.unwrap();
    let someone = identity("e1", 1_800_000_000_000);
    store.create_identity(&someone).await.unwrap();
    let k = key();
    store.pin_if_absent(k, &pin(&someone, None)).await.unwrap();

    // Two days ahead: past the pin's two hours, which Redis ends at once.
    shift.jump(Duration::from_secs(2 * 86_400));
    let client = redis::Client::open(redis.url()).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    delete_pins(&mut connection, "jumping").await;

    let mut report = None;
    for _ in 0..200 {
        report = store.loss_report();
        if report.is_some() {
            break;
        }
        // The background check reads INFO every 500 ms.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let report = report.expect("the clock's jump was not taken as a loss");
    assert!(report.what.contains("clock jumped"), "{}", report.what);
    assert_eq!(
        retired_reason(&store, k).await,
        Some(RetireReason::StoreLost),
        "a pin the jump expired is not answered as lost"
    );
}

/// A retirement Redis lost without a sign in the namespace's history (the
/// writer's count and the sequence as they were) is still honoured by the
/// replica whose journal holds it: the identity is never answered live,
/// through the pins it journaled or through one it never saw.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retirement_redis_lost_unseen_is_kept_from_the_journal() {
    let redis = RedisServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (store, someone, k) = replica_with_a_pin(&redis, "retire-unseen", dir.path()).await;
    store.retire(someone.id, &evicted()).await.unwrap();
    lose_retirement(&redis, "retire-unseen", someone.id).await;
    // Another value of the identity, pinned where this replica never saw
    // it (another replica, here a store without a journal).
    let elsewhere = redis_store(&redis.url(), "retire-unseen", 2 * HOUR_MS, HOUR_MS, None).await;
    let k2 = key();
    elsewhere
        .pin_if_absent(k2, &pin(&someone, None))
        .await
        .unwrap();
    for k in [k, k2, k] {
        assert_eq!(retired_reason(&store, k).await, Some(RetireReason::Evicted));
    }
}

/// A use of an identity Redis no longer holds (expired, or lost) writes
/// nothing: a hash written then would hold no record and no TTL, and stay
/// on a server that must not evict. A use of one it holds is recorded, and
/// an earlier use written later does not take its last use back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_touches_record_only_live_identities_and_their_latest_use() {
    let redis = RedisServer::start().await;
    let data_dir = tempfile::tempdir().unwrap();
    let tasks = TaskTracker::new();
    let settings = RedisSettings {
        url: redis.url(),
        namespace: "touch".to_owned(),
        pin_ttl_ms: 2 * HOUR_MS,
        keep_retired_ms: HOUR_MS,
        quarantine_ms: HOUR_MS,
        wait: None,
        hit_cache: Duration::ZERO,
    };
    let store = RedisStore::connect(
        settings,
        None,
        Some(&data_dir.path().join("generation.json")),
        tasks.clone(),
        Arc::new(Metrics::new()),
    )
    .unwrap();
    store.start().await.unwrap();
    let now = 1_800_000_000_000;
    let (kept, gone) = (identity("e1", now), identity("e1", now));
    store.create_identity(&kept).await.unwrap();
    let ip = "127.0.0.2".parse().unwrap();
    for id in [kept.id, gone.id] {
        store.touch(id, now + 5, 1, true, Some(ip)).await.unwrap();
    }
    tasks.close();
    let stored = written(&store, kept.id, &tasks).await;
    assert_eq!(stored.last_used_ms, now + 5);
    assert_eq!(stored.requests, 1);
    assert!(stored.worked);
    assert_eq!(stored.egress_ip, Some(ip));
    let client = redis::Client::open(redis.url()).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    let exists: u64 = redis::cmd("EXISTS")
        .arg(format!("touch:id:{}", gone.id))
        .query_async(&mut connection)
        .await
        .unwrap();
    assert_eq!(exists, 0, "a touch recreated a forgotten identity");

    // An earlier use written later (another replica's coalesced touch)
    // does not take the last use back.
    store.touch(kept.id, now + 1, 1, false, None).await.unwrap();
    let stored = written(&store, kept.id, &tasks).await;
    assert_eq!(stored.last_used_ms, now + 5);
    assert_eq!(stored.requests, 2);

    // An answer that arrives after a retirement is no use: an identity
    // retired for idleness keeps the last use it was judged on.
    let idle = Retirement {
        reason: RetireReason::IdleExpired,
        at_ms: now + 6,
    };
    store.retire(kept.id, &idle).await.unwrap();
    store.touch(kept.id, now + 50, 1, true, None).await.unwrap();
    let stored = written(&store, kept.id, &tasks).await;
    assert_eq!(stored.last_used_ms, now + 5);
}

/// The identity `id` as `store` holds it once the touches spawned on
/// `tasks` (closed) are written: touches are written off the request path.
async fn written(store: &RedisStore, id: IdentityId, tasks: &TaskTracker) -> Identity {
    tokio::time::timeout(Duration::from_secs(10), tasks.wait())
        .await
        .expect("the touches were written");
    store
        .list()
        .await
        .unwrap()
        .into_iter()
        .find(|l| l.identity.id == id)
        .expect("the identity is kept")
        .identity
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_on_one_redis_agree_on_the_hashing_key() {
    let redis = RedisServer::start().await;
    let first = redis_store(&redis.url(), "keys", 2 * HOUR_MS, HOUR_MS, None).await;
    let second = redis_store(&redis.url(), "keys", 2 * HOUR_MS, HOUR_MS, None).await;
    let a = first.shared_hash_key([1; 32], KeyOffer::New).await.unwrap();
    let b = second
        .shared_hash_key([2; 32], KeyOffer::New)
        .await
        .unwrap();
    assert_eq!(a, [1; 32]);
    assert_eq!(b, [1; 32], "the first replica's key wins");
}

#[tokio::test]
async fn a_replica_answers_pin_hits_from_its_cache_until_another_retires_the_identity() {
    let redis = RedisServer::start().await;
    // A's entries would answer for a minute: only B's published retirement
    // can make A see it within the test.
    let pair = Replicas::start(&redis.url(), "cache").await;
    let (a, metrics, someone, k) = (&pair.a, &pair.metrics, &pair.someone, pair.key);

    // A's subscription to retirements goes live in the background; from
    // then on a second lookup of the same pin is a hit.
    let mut hit = false;
    for _ in 0..300 {
        let found = a.lookup(&[k]).await.unwrap();
        assert_eq!(found[0].as_ref().unwrap().pin.identity, someone.id);
        if metrics.store_cache_hits.get() > 0 {
            hit = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(hit, "replica A never answered from its cache");

    // A hit costs no round trip: 100 lookups, and Redis runs fewer scripts
    // than that (only the replicas' background generation checks).
    let client = redis::Client::open(redis.url()).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    let scripts_before = script_calls(&mut connection).await;
    let hits_before = metrics.store_cache_hits.get();
    for _ in 0..100 {
        let found = a.lookup(&[k]).await.unwrap();
        assert_eq!(found[0].as_ref().unwrap().pin.identity, someone.id);
    }
    let scripts = script_calls(&mut connection).await - scripts_before;
    let hits = metrics.store_cache_hits.get() - hits_before;
    assert!(hits >= 90, "only {hits} of 100 lookups were hits");
    assert!(
        scripts < 10,
        "100 cached lookups ran {scripts} scripts on Redis"
    );

    // B retires the identity: A stops answering from its cache as soon as
    // the retirement's message arrives, and then sees it retired.
    pair.evict().await;
    assert!(
        pair.a_reads_retired().await,
        "replica A never saw B's retirement"
    );
}

/// An identity's first egress address is what every new tunnel of it is
/// checked against before a request is written: a cached reading from
/// before it (the address unknown, any tunnel accepted) stops answering
/// when another replica records it, as for a retirement.
#[tokio::test]
async fn a_cached_identity_is_read_again_once_another_replica_records_its_address() {
    let redis = RedisServer::start().await;
    // A's entries would answer for a minute.
    let pair = Replicas::start(&redis.url(), "egress").await;
    let (a, someone, k) = (&pair.a, &pair.someone, pair.key);
    let cached = pair.cached_at_a().await;
    assert_eq!(cached.egress_ip, None);

    let address = std::net::IpAddr::from([127, 0, 0, 2]);
    assert_eq!(
        pair.b.record_egress(someone.id, address).await.unwrap(),
        Some(address)
    );
    let mut seen = false;
    for _ in 0..200 {
        let found = a.lookup(&[k]).await.unwrap();
        if found[0]
            .as_ref()
            .unwrap()
            .identity
            .as_ref()
            .unwrap()
            .egress_ip
            == Some(address)
        {
            seen = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        seen,
        "replica A kept answering the identity without its address"
    );
}

/// A retirement written back by a restore (or an import) where Redis had
/// none reaches the other replicas' hit caches as a retirement does: a
/// reading cached from while Redis had lost it stops answering.
#[tokio::test]
async fn a_retirement_written_back_reaches_other_replicas_caches() {
    let redis = RedisServer::start().await;
    let pair = Replicas::start(&redis.url(), "written-back").await;
    assert_eq!(pair.cached_at_a().await.retired, None);
    let mut retired = pair.someone.clone();
    retired.retired = Some(evicted());
    pair.b.create_identity(&retired).await.unwrap();
    assert!(
        pair.a_reads_retired().await,
        "replica A kept answering the identity live"
    );
}

/// An identity retired on a replica that never served it (an operator's
/// eviction there) goes into that replica's journal, retired: when Redis
/// loses the retirement, that replica still honours it (and its restore
/// would write it back), where no other journal holds it.
#[tokio::test]
async fn a_retirement_made_where_the_identity_was_never_served_is_journaled() {
    let redis = RedisServer::start().await;
    let pair = Replicas::start(&redis.url(), "never-served").await;
    pair.a.retire(pair.someone.id, &evicted()).await.unwrap();
    lose_retirement(&redis, "never-served", pair.someone.id).await;
    assert_eq!(
        retired_reason(&pair.a, pair.key).await,
        Some(RetireReason::Evicted)
    );
}

/// A retired identity's record outlives its pins: gone first, it would
/// leave pins a restore or an import could bind to it rebuilt live.
#[tokio::test]
async fn a_retired_record_outlives_its_pins() {
    let redis = RedisServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (store, someone, _) = replica_with_a_pin(&redis, "outlives", dir.path()).await;
    store.retire(someone.id, &evicted()).await.unwrap();
    let ttl = |key: String| {
        let url = redis.url();
        async move {
            let client = redis::Client::open(url).unwrap();
            let mut connection = client.get_multiplexed_async_connection().await.unwrap();
            let ttl: i64 = redis::cmd("PTTL")
                .arg(key)
                .query_async(&mut connection)
                .await
                .unwrap();
            ttl
        }
    };
    let pins: Vec<String> = redis::cmd("KEYS")
        .arg("outlives:pin:*")
        .query_async(
            &mut redis::Client::open(redis.url())
                .unwrap()
                .get_multiplexed_async_connection()
                .await
                .unwrap(),
        )
        .await
        .unwrap();
    let record = ttl(format!("outlives:id:{}", someone.id)).await;
    let pin = ttl(pins[0].clone()).await;
    // The pin was written a moment after the record.
    assert!(
        record + 60_000 >= pin,
        "the retired record ends {} ms before its pin",
        pin - record
    );
}

#[tokio::test]
async fn a_redis_user_without_pub_sub_retires_and_never_caches() {
    let redis = RedisServer::start().await;
    let client = redis::Client::open(redis.url()).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    // Redis 7's default for new ACL users: no channel may be used.
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg("default")
        .arg("resetchannels")
        .query_async(&mut connection)
        .await
        .unwrap();
    let pair = Replicas::start(&redis.url(), "acl").await;
    let (a, metrics, someone, k) = (&pair.a, &pair.metrics, &pair.someone, pair.key);
    for _ in 0..50 {
        let found = a.lookup(&[k]).await.unwrap();
        assert_eq!(found[0].as_ref().unwrap().pin.identity, someone.id);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        metrics.store_cache_hits.get(),
        0,
        "no subscription, no cache"
    );

    // Retiring still works (the publish is refused, the retirement is not),
    // and A sees it at once: it asks Redis every time.
    pair.evict().await;
    let found = a.lookup(&[k]).await.unwrap();
    assert!(found[0]
        .as_ref()
        .unwrap()
        .identity
        .as_ref()
        .unwrap()
        .retired
        .is_some());
}

/// Two replicas on one Redis: `a` caches pin hits for a minute (counting
/// into `metrics`), `b` founded `someone` with the pin `key`.
struct Replicas {
    a: RedisStore,
    b: RedisStore,
    metrics: Arc<Metrics>,
    someone: Identity,
    key: PinKey,
    _dirs: [tempfile::TempDir; 2],
}

impl Replicas {
    /// Looks `key` up on `a` until it answers `someone` retired (bounded):
    /// whether it did. The pin never moves meanwhile.
    async fn a_reads_retired(&self) -> bool {
        for _ in 0..200 {
            let found = self.a.lookup(&[self.key]).await.unwrap();
            let binding = found[0].as_ref().unwrap();
            assert_eq!(binding.pin.identity, self.someone.id, "a pin never moves");
            if binding.identity.as_ref().unwrap().retired.is_some() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }

    /// Looks `key` up on `a` until its cache answers (bounded); answers
    /// the identity it answered.
    async fn cached_at_a(&self) -> Identity {
        for _ in 0..300 {
            let found = self.a.lookup(&[self.key]).await.unwrap();
            let identity = found[0].as_ref().unwrap().identity.clone().unwrap();
            if self.metrics.store_cache_hits.get() > 0 {
                return (*identity).clone();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("replica A never answered from its cache");
    }

    async fn start(url: &str, namespace: &str) -> Replicas {
        let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
        let metrics = Arc::new(Metrics::new());
        let minute = Duration::from_secs(60);
        let a = redis_store_ttl(
            url,
            namespace,
            48 * HOUR_MS,
            HOUR_MS,
            Some(dirs[0].path()),
            metrics.clone(),
            minute,
        )
        .await;
        let b = redis_store(url, namespace, 48 * HOUR_MS, HOUR_MS, Some(dirs[1].path())).await;
        let someone = identity("e1", 1_800_000_000_000);
        b.create_identity(&someone).await.unwrap();
        let key = key();
        b.pin_if_absent(key, &pin(&someone, None)).await.unwrap();
        Replicas {
            a,
            b,
            metrics,
            someone,
            key,
            _dirs: dirs,
        }
    }

    /// `b` evicts `someone`.
    async fn evict(&self) {
        let retirement = Retirement {
            reason: RetireReason::Evicted,
            at_ms: self.someone.created_ms + 1,
        };
        self.b.retire(self.someone.id, &retirement).await.unwrap();
    }
}

/// How many scripts Redis has run (`EVALSHA` and `EVAL`).
async fn script_calls(connection: &mut redis::aio::MultiplexedConnection) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(connection)
        .await
        .unwrap();
    info.lines()
        .filter(|line| line.starts_with("cmdstat_evalsha:") || line.starts_with("cmdstat_eval:"))
        .filter_map(|line| {
            line.split("calls=")
                .nth(1)?
                .split(',')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

/// A restore cut short (the replica stopped or crashed while writing its
/// journal back, or gave up) is finished at the next start: the pins it had
/// not written back are in Redis again, though the history the replica
/// finds at start looks whole (the restore's new epoch was saved before it
/// wrote anything back). Before, nothing noticed: a pin older than half its
/// lifetime stayed gone, and once the quarantine ended its cookie could be
/// founded anew on any exit, though this replica's journal held its pin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_cut_short_is_finished_at_the_next_start() {
    let redis = RedisServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let url = redis.url();
    let replica = || redis_store(&url, "unfinished", 2 * HOUR_MS, HOUR_MS, Some(dir.path()));
    let store = replica().await;
    let someone = identity("e1", 1_800_000_000_000);
    store.create_identity(&someone).await.unwrap();
    store
        .pin_if_absent(key(), &pin(&someone, None))
        .await
        .unwrap();
    store.close().await;
    // Gone, background checks and all, before the next one starts.
    drop(store);

    // As a restore cut short leaves it: the pin not written back yet, the
    // history saved as whole, the restore marked as under way.
    let client = redis::Client::open(redis.url()).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    let pins = delete_pins(&mut connection, "unfinished").await;
    let file = dir.path().join("generation.json");
    let pending = || -> serde_json::Value {
        let saved: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
        saved["restore_pending"].clone()
    };
    let mut saved: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    saved["restore_pending"] = true.into();
    std::fs::write(&file, serde_json::to_vec(&saved).unwrap()).unwrap();

    let store = replica().await;
    // Bounded: the restore runs in the background from the start.
    let mut back = false;
    for _ in 0..200 {
        let exists: i64 = redis::cmd("EXISTS")
            .arg(&pins)
            .query_async(&mut connection)
            .await
            .unwrap();
        back = exists == 1 && pending() == false;
        if back {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        back,
        "the pin the restore had not written back is still gone, or the restore still marked under way"
    );
    store.close().await;
}

/// Deletes the one pin of `namespace` (as a loss would); answers its key.
async fn delete_pins(
    connection: &mut redis::aio::MultiplexedConnection,
    namespace: &str,
) -> Vec<String> {
    let pins: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{namespace}:pin:*"))
        .query_async(connection)
        .await
        .unwrap();
    assert_eq!(pins.len(), 1, "{pins:?}");
    let deleted: i64 = redis::cmd("DEL")
        .arg(&pins)
        .query_async(connection)
        .await
        .unwrap();
    assert_eq!(deleted, 1);
    pins
}

/// A Redis store on `url` (a replica's, with its journal in `data_dir`, or
/// a tool's without).
async fn redis_store(
    url: &str,
    namespace: &str,
    pin_ttl_ms: u64,
    keep_retired_ms: u64,
    data_dir: Option<&std::path::Path>,
) -> RedisStore {
    redis_store_ttl(
        url,
        namespace,
        pin_ttl_ms,
        keep_retired_ms,
        data_dir,
        Arc::new(Metrics::new()),
        Duration::from_secs(1),
    )
    .await
}

/// A Redis store: `redis_store` with the metrics it counts into and how
/// long its hit cache answers (a tool, without `data_dir`, has none).
async fn redis_store_ttl(
    url: &str,
    namespace: &str,
    pin_ttl_ms: u64,
    keep_retired_ms: u64,
    data_dir: Option<&std::path::Path>,
    metrics: Arc<Metrics>,
    hit_cache: Duration,
) -> RedisStore {
    let journal = data_dir.map(|dir| Journal::open(dir).unwrap());
    let generation = data_dir.map(|dir| dir.join("generation.json"));
    let settings = RedisSettings {
        url: url.to_owned(),
        namespace: namespace.to_owned(),
        pin_ttl_ms,
        keep_retired_ms,
        quarantine_ms: HOUR_MS,
        wait: None,
        // A replica caches pin hits (the default); a tool does not.
        hit_cache: if data_dir.is_some() {
            hit_cache
        } else {
            Duration::ZERO
        },
    };
    let store = RedisStore::connect(
        settings,
        journal,
        generation.as_deref(),
        TaskTracker::new(),
        metrics,
    )
    .unwrap();
    if data_dir.is_some() {
        store.start().await.unwrap();
    }
    store
}
