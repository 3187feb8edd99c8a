//! A store that fails part of the way: a real redis-server that still
//! answers reads but refuses every write (out of memory under
//! `maxmemory-policy noeviction`, as a full Redis does). What pinproxy could
//! not make durable never goes out: a new credential, a cookie an answer
//! sets, an identity's first egress address; what is already pinned keeps
//! its exit; and service resumes when Redis takes writes again.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support;

use support::exit::Gateway;
use support::redis_group::RedisNode;
use support::{error_of, Jar, Setup, TestExitSpec};

/// pinproxy on `redis`, its one exit a sticky-session gateway over
/// `addresses` (`gate`) that states each tunnel's egress address.
async fn gateway_on(redis: &RedisNode, addresses: &[&str]) -> Setup {
    let url = redis.url();
    let gateway = Gateway::new(addresses, None, 0.0, 1);
    Setup::builder()
        .exit(TestExitSpec::gateway(gateway).id("gate").with_sessions())
        .config(move |c| {
            c.store.url = url;
            c.exits[0].exit_ip_header = Some("X-Exit-IP".into());
        })
        .start()
        .await
}

/// Waits (at most 10 s) until `redis` holds one identity, retired.
async fn assert_one_identity_retired_in(redis: &RedisNode) {
    for _ in 0..200 {
        let ids: Vec<String> = redis.command(&["KEYS", "pinproxy:id:*"]).await;
        let mut retired = ids.len() == 1;
        for id in &ids {
            let field: Option<Vec<u8>> = redis.command(&["HGET", id, "retired"]).await;
            retired &= field.is_some_and(|f| !f.is_empty());
        }
        if retired {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("the retirement never reached Redis");
}

/// Makes `redis` refuse writes (or take them again), and checks it does.
async fn refuse_writes(redis: &RedisNode, refuse: bool) {
    let limit = if refuse { "1" } else { "0" };
    let _: () = redis.command(&["CONFIG", "SET", "maxmemory", limit]).await;
    let mut connection = redis.connection().await;
    let written: redis::RedisResult<()> = redis::cmd("SET")
        .arg("store-faults:probe")
        .arg("x")
        .query_async(&mut connection)
        .await;
    match (refuse, written) {
        (true, Err(e)) => assert!(e.to_string().contains("OOM"), "{e}"),
        (false, Ok(())) => {}
        (refuse, written) => panic!("refuse writes {refuse}: the probe got {written:?}"),
    }
}

/// A replica-less Redis that refuses writes: nothing new is pinned, so
/// nothing new leaves; a cookie already pinned keeps its exit (its pin is
/// read, its use only logged when it cannot be written).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_refuses_writes_lets_nothing_unpinned_out() {
    let redis = RedisNode::volatile().await;
    let url = redis.url();
    let s = Setup::start_with(3, move |c| c.store.url = url).await;
    let (mut jar, peer) = s.login("/login").await;
    assert_eq!(Setup::peer(&s.get("/page", &mut jar).await), Some(peer));

    refuse_writes(&redis, true).await;
    let pinned = s.get("/page", &mut jar).await;
    assert_eq!(pinned.status, 200, "{}", pinned.body);
    assert_eq!(Setup::peer(&pinned), Some(peer), "the pin was read");

    // A credential never seen: its pin cannot be written, so it never
    // leaves.
    let seen = s.origin.seen().len();
    let fresh = s
        .get_with("/page", &[("cookie", "datadome=never-seen-before")])
        .await;
    assert_eq!(fresh.status, 503, "{}", fresh.body);
    let error = error_of(&fresh);
    assert!(error.starts_with("store-unavailable:"), "{error}");
    assert!(error.contains("OOM"), "the error says why: {error}");
    assert_eq!(s.origin.seen().len(), seen, "the new credential left");

    // An answer setting a tracked cookie: the request went out (it carried
    // nothing tracked), the answer and its cookie do not reach the client.
    let mut new_jar = Jar::default();
    let login = s.get("/login", &mut new_jar).await;
    assert_eq!(login.status, 503, "{}", login.body);
    assert!(login.headers.get("set-cookie").is_none());
    assert_eq!(
        new_jar.header(),
        None,
        "the client got a cookie nobody pinned"
    );

    refuse_writes(&redis, false).await;
    let fresh = s
        .get_with("/page", &[("cookie", "datadome=never-seen-before")])
        .await;
    assert_eq!(fresh.status, 200, "{}", fresh.body);
    assert_eq!(Setup::peer(&s.get("/page", &mut jar).await), Some(peer));
    assert_eq!(s.origin.leaks(), vec![]);
    s.stop().await;
}

/// An identity's first egress address, learnt from the tunnel that carried
/// its first request, is written before that request's answer goes on (its
/// later tunnels are checked against it). When Redis stops taking writes
/// while the origin answers, the answer is withheld: the identity would
/// otherwise go on with nothing to check its tunnels against.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_egress_address_the_store_cannot_take_withholds_the_answer() {
    let redis = RedisNode::volatile().await;
    let s = gateway_on(&redis, &["127.0.0.2"]).await;

    // The cookie is pinned when the request is routed; Redis refuses
    // writes only once the request has reached the origin.
    let cookie = [("cookie", "datadome=founded-on-this-request")];
    let (answer, ()) = tokio::join!(s.get_with("/held", &cookie), async {
        s.origin.wait_for("/held").await;
        refuse_writes(&redis, true).await;
        s.origin.release_held(1);
    });
    assert_eq!(answer.status, 503, "{}", answer.body);
    let error = error_of(&answer);
    assert!(error.starts_with("store-unavailable:"), "{error}");
    // Unlike a refusal before sending: the client is told the origin
    // acted on the request, through which exit, and not to repeat it
    // blindly.
    assert!(
        error.contains("exit gate carried the request and the origin answered 200")
            && error.contains("repeat it only if that is safe"),
        "{error}"
    );

    // Once Redis takes writes, the identity goes on from its address.
    refuse_writes(&redis, false).await;
    let again = s.get_with("/page", &cookie).await;
    assert_eq!(again.status, 200, "{}", again.body);
    assert_eq!(Setup::peer(&again), Some("127.0.0.2".parse().unwrap()));
    s.stop().await;
}

/// A session that drifted to another address while Redis refuses writes:
/// the request is answered `identity-retired` (`exit-ip-drift`) and the
/// identity stays retired in this process until Redis takes the retirement,
/// rather than a bare `store-unavailable` that lost the drift and left the
/// identity to dial again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drift_whose_retirement_the_store_refused_is_still_retired() {
    let redis = RedisNode::volatile().await;
    let s = gateway_on(&redis, &["127.0.0.2", "127.0.0.3"]).await;
    let (mut jar, _) = s.login("/login").await;
    assert_eq!(s.get("/page", &mut jar).await.status, 200);

    refuse_writes(&redis, true).await;
    s.exits[0].gateway.as_ref().unwrap().move_all();
    s.exits[0].close_tunnels();
    let seen = s.origin.seen().len();
    for attempt in 0..2 {
        let reply = s.get("/page", &mut jar).await;
        assert_eq!(reply.status, 502, "{}", reply.body);
        let error = error_of(&reply);
        assert!(
            error.starts_with("identity-retired:") && error.contains("exit-ip-drift"),
            "{error}"
        );
        // Which of the jar's cookies the advice to drop means: the
        // request's, on the drift; the retired pin's, on the next request.
        let named = match attempt {
            0 => "the request carried datadome#",
            _ => "datadome#",
        };
        assert!(error.contains(named), "{error}");
    }
    assert_eq!(s.origin.seen().len(), seen, "the cookie never left");
    assert!(s.origin.leaks().is_empty(), "{:?}", s.origin.leaks());
    refuse_writes(&redis, false).await;
    s.stop().await;
}

/// A challenge whose request is dropped (its client gone) while Redis takes
/// the retirement is still stored whole, in Redis and in the replica's
/// journal: after Redis loses everything, the journal restores the identity
/// retired, not live. Before, the dropped request dropped the retirement's
/// journal write with it (or the command, unsent).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_challenge_whose_client_left_is_retired_in_the_journal_too() {
    let redis = RedisNode::volatile().await;
    let url = redis.url();
    let s = Setup::start_with(1, move |c| c.store.url = url).await;
    let (mut jar, _) = s.login("/login").await;
    let port = s.origin.https.port();
    let mut tunnel = s.proxy.client.tunnel("localhost", port).await;
    let cookie = jar.header().unwrap();
    let request = tokio::spawn(async move {
        tunnel
            .get("/cf-challenge?held", &[("cookie", cookie.as_str())])
            .await
    });
    s.origin.wait_for("/cf-challenge?held").await;
    // Redis stops answering just as the challenge comes back; the client
    // leaves while pinproxy waits for Redis to take the retirement.
    redis.freeze();
    s.origin.release_held(1);
    // The invalidation is counted just before its retirement goes to
    // Redis, which does not answer.
    let admin = s.proxy.daemon.admin_addr().unwrap();
    let counted = "pinproxy_invalidations_total{";
    let mut seen = false;
    for _ in 0..200 {
        let metrics = support::admin::get(admin, "/metrics").await;
        if metrics
            .lines()
            .any(|l| l.starts_with(counted) && l.contains("cloudflare-challenge"))
        {
            seen = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    assert!(seen, "the challenge was never counted");
    request.abort();
    let _ = request.await;
    // No signal says when pinproxy has seen its client go and dropped the
    // request: it is given a moment (too short a one lets the old code
    // pass, never the new one fail).
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    redis.thaw();

    // Bounded: Redis takes the retirement once it runs again.
    assert_one_identity_retired_in(&redis).await;

    // Redis forgets everything; the replica restores from its journal.
    let _: () = redis.command(&["FLUSHDB"]).await;
    let s = s.restart().await;
    let after = s.get("/page", &mut jar).await;
    assert_eq!(after.status, 502, "{}", after.body);
    let error = error_of(&after);
    assert!(
        error.starts_with("identity-retired:") && error.contains("cloudflare-challenge"),
        "{error}"
    );
    assert!(s.origin.leaks().is_empty(), "{:?}", s.origin.leaks());
    s.stop().await;
}

/// A retirement Redis cannot take at first (an origin's challenge while
/// Redis refuses writes) is honoured by the process at once and stored
/// once Redis takes writes again: after a restart the identity is still
/// retired. Before, it was tried once and stayed in this process only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retirement_the_store_refused_is_stored_when_it_can_be() {
    refused_then_stored("/challenge", "datadome-challenge").await;
}

/// The same for a rule judged on the answer's head (Cloudflare's
/// `cf-mitigated: challenge`): a retirement the store refused is honoured
/// at once and stored later, not only logged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_rules_retirement_the_store_refused_is_stored_when_it_can_be() {
    refused_then_stored("/cf-challenge", "cloudflare-challenge").await;
}

/// An identity invalidated (by the answer to `path`, rule `rule`) while
/// Redis refuses writes: its next request is refused, and the retirement
/// reaches Redis once it takes writes again, so a restart honours it too.
async fn refused_then_stored(path: &str, rule: &str) {
    let redis = RedisNode::volatile().await;
    let url = redis.url();
    let s = Setup::start_with(2, move |c| c.store.url = url).await;
    let (mut jar, _) = s.login("/login").await;

    refuse_writes(&redis, true).await;
    let challenge = s.get(path, &mut jar).await;
    assert_eq!(challenge.status, 403, "{}", challenge.body);
    let honoured = s.get("/page", &mut jar).await;
    assert_eq!(honoured.status, 502, "{}", honoured.body);

    refuse_writes(&redis, false).await;
    // Bounded: the retries start half a second apart.
    assert_one_identity_retired_in(&redis).await;

    let s = s.restart().await;
    let after = s.get("/page", &mut jar).await;
    assert_eq!(after.status, 502, "{}", after.body);
    let error = error_of(&after);
    assert!(
        error.starts_with("identity-retired:") && error.contains(rule),
        "{error}"
    );
    s.stop().await;
}

/// An identity found idle while Redis refuses writes: its request fails
/// (the retirement could not be stored, and nothing else retries it), and
/// the next request, once Redis takes writes, retires it. The retirement
/// is counted then, once, although this process had decided it before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retirement_stored_at_a_later_try_is_counted_once() {
    use pinproxy::clock::Clock;
    use support::MINUTE;
    let redis = RedisNode::volatile().await;
    let url = redis.url();
    let clock = Clock::manual();
    let s = Setup::builder()
        .exits(2)
        .clock(clock.clone())
        .config(move |c| {
            c.store.url = url;
            c.identities.idle_timeout = 5 * MINUTE;
        })
        .start()
        .await;
    let (mut jar, _) = s.login("/login").await;

    refuse_writes(&redis, true).await;
    clock.advance(6 * MINUTE);
    let refused = s.get("/page", &mut jar).await;
    assert_eq!(refused.status, 503, "{}", refused.body);
    let metrics = || s.proxy.daemon.admin().metrics.encode();
    assert_eq!(support::retirements_counted(&metrics()), Vec::<&str>::new());

    refuse_writes(&redis, false).await;
    let retired = s.get("/page", &mut jar).await;
    assert!(
        error_of(&retired).contains("idle-expired"),
        "{}",
        error_of(&retired)
    );
    let again = s.get("/page", &mut jar).await;
    assert_eq!(again.status, 502, "{}", again.body);
    assert_one_identity_retired_in(&redis).await;
    let text = metrics();
    let counted = support::retirements_counted(&text);
    assert_eq!(counted.len(), 1, "{counted:?}");
    assert!(
        counted[0].ends_with("reason=\"idle-expired\"} 1"),
        "{counted:?}"
    );
    s.stop().await;
}
