//! Allocation budgets on the request path: reading a request's tracked
//! cookies and looking their pins up allocate a fixed, small number of
//! times, not a few times per cookie (the performance issue's "the
//! per-request pin lookup must not allocate more than once per
//! credential"), and handing an access line to the log writer allocates
//! nothing once the writer hands buffers back. A cookie-less request holds
//! the fingerprint its response may found without copying it.
//!
//! Counted with the suite's counting allocator on the test's own thread: a
//! current-thread runtime polls everything on it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderValue};
use pinproxy::clock::Clock;
use pinproxy::credential::{Credential, PinHasher};
use pinproxy::exits::ExitSet;
use pinproxy::fingerprint::{ClientConnection, Fingerprint, RequestFingerprint};
use pinproxy::metrics::Metrics;
use pinproxy::proxy::capture::invalidation::{self, Verdict};
use pinproxy::proxy::credentials::cookies::{CookieMemo, CookiePolicy};
use pinproxy::proxy::credentials::of_request;
use pinproxy::proxy::credentials::session_key;
use pinproxy::routing::{ConflictPolicy, Policies, Reason, RetirePolicy, Router};
use pinproxy::store::durable::DurableStore;
use pinproxy::store::memory::MemoryStore;
use pinproxy::store::Store;
use pinproxy::telemetry::line_writer::{LineWriter, BATCH_INTERVAL};
use tokio_util::task::TaskTracker;

use crate::support::allocations;

/// One direct exit on loopback (nothing is sent through it).
fn one_exit() -> ExitSet {
    ExitSet::new(
        vec![crate::support::routing_only_exit(
            "local",
            "direct://127.0.0.2",
        )],
        None,
    )
}

fn router(store: Store) -> Router {
    Router::new(
        store,
        Clock::manual(),
        Policies {
            retire: RetirePolicy::Fail,
            conflict: ConflictPolicy::Reject,
            idle_timeout_ms: 30 * 60_000,
            max_lifetime_ms: 120 * 60_000,
            keep_retired_ms: 60 * 60_000,
            shared_store: false,
        },
        Arc::new(Metrics::new()),
        TaskTracker::new(),
    )
}

/// A browser's `Cookie` header carrying the first `tracked` of three
/// tracked cookies among untracked ones.
fn headers(tracked: usize) -> HeaderMap {
    let pairs = [
        "datadome=Qm9vc3RlZFRva2VuVmFsdWU",
        "cf_clearance=aGVsbG8-1700000000-1.2.1.1",
        "_abck=0A1B2C3D4E5F~0~YAAQ~-1~-1",
    ];
    let mut cookie = String::from("_ga=GA1.1.1234567890.1700000000");
    for pair in &pairs[..tracked] {
        cookie.push_str("; ");
        cookie.push_str(pair);
    }
    cookie.push_str("; theme=dark");
    let mut headers = HeaderMap::new();
    headers.insert("cookie", HeaderValue::from_str(&cookie).unwrap());
    headers
}

/// Allocations made by reading `headers`' credentials and by routing them,
/// once their pins exist (a pin hit), as (reading, routing). With `memo`,
/// the credentials are read as a tunnel's requests read them, through the
/// connection's memory of its last `Cookie` header (which the earlier
/// requests filled).
fn hit_allocations(store: Store, headers: &HeaderMap, memo: Option<&CookieMemo>) -> (u64, u64) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let exits = one_exit();
        let router = router(store);
        let policy = CookiePolicy::with_extra(&[]).unwrap();
        let hasher = PinHasher::new([3; 32]);
        let read = |headers: &HeaderMap| -> Vec<Credential> {
            of_request(headers, None, None, &policy, &hasher, memo).unwrap()
        };
        let credentials = read(headers);
        let first = router
            .route(&exits, &credentials, Fingerprint::default)
            .await
            .unwrap();
        assert_eq!(first.reason, Reason::NewIdentity);
        // Once more, so that every lazily made thing exists.
        let second = router
            .route(&exits, &credentials, Fingerprint::default)
            .await
            .unwrap();
        assert_eq!(second.reason, Reason::Pinned);

        let before = allocations::so_far();
        let credentials = read(headers);
        let after_reading = allocations::so_far();
        let route = router
            .route(&exits, &credentials, Fingerprint::default)
            .await
            .unwrap();
        let after_routing = allocations::so_far();
        assert_eq!(route.reason, Reason::Pinned);
        assert_eq!(route.identity.map(|i| i.id), first.identity.map(|i| i.id));
        (after_reading - before, after_routing - after_reading)
    })
}

#[test]
fn a_pin_hit_allocates_once_to_read_and_once_to_look_up_whatever_the_count() {
    for tracked in 1..=3 {
        for memo in [None, Some(&CookieMemo::default())] {
            let (reading, routing) =
                hit_allocations(Store::Memory(MemoryStore::new()), &headers(tracked), memo);
            // The credentials' vector (read afresh, or the memo's copy);
            // their names are the policy's own.
            assert_eq!(
                reading, 1,
                "reading {tracked} tracked cookies, memo {memo:?}"
            );
            // The identity the store read, shared by every credential of
            // that identity and handed on to the route (rather than a copy
            // of the record at each step); the store's answer itself is
            // held inline, where routing holds it.
            assert_eq!(routing, 1, "routing {tracked} tracked cookies");
        }
    }
}

#[test]
fn the_durable_store_answers_a_hit_with_no_more_allocations_than_memory() {
    let dir = tempfile::tempdir().unwrap();
    let store = DurableStore::open(&dir.path().join("pins.redb")).unwrap();
    let (reading, routing) = hit_allocations(Store::Durable(store), &headers(2), None);
    assert_eq!((reading, routing), (1, 1));
}

/// Untracked names PHP would read otherwise (`AMCV_…%40AdobeOrg`,
/// `s.id`) are read as PHP reads them on the stack: no allocation.
#[test]
fn names_php_reads_otherwise_cost_no_allocation() {
    let mut headers = headers(1);
    let tracked = headers["cookie"].to_str().unwrap().to_owned();
    headers.insert(
        "cookie",
        HeaderValue::from_str(&format!(
            "AMCV_8F99160E571FC0427F000101%40AdobeOrg=1; s.id=2; a+b=3; {tracked}"
        ))
        .unwrap(),
    );
    let (reading, routing) = hit_allocations(Store::Memory(MemoryStore::new()), &headers, None);
    assert_eq!((reading, routing), (1, 1));
}

#[test]
fn a_name_sent_in_other_case_costs_one_allocation_of_its_own() {
    let mut headers = headers(1);
    headers.insert(
        "cookie",
        HeaderValue::from_static("_ga=1; DataDome=Qm9vc3RlZFRva2VuVmFsdWU; cf_clearance=x"),
    );
    let (reading, routing) = hit_allocations(Store::Memory(MemoryStore::new()), &headers, None);
    // The vector and `DataDome`, kept as sent.
    assert_eq!((reading, routing), (2, 1));
    // Recalled from a tunnel's memo, the name is the memo's, shared.
    let memo = CookieMemo::default();
    let (reading, routing) =
        hit_allocations(Store::Memory(MemoryStore::new()), &headers, Some(&memo));
    assert_eq!((reading, routing), (1, 1));
}

#[test]
fn a_tunnel_s_session_key_is_hashed_once_not_at_every_request() {
    let policy = CookiePolicy::with_extra(&[]).unwrap();
    let hasher = PinHasher::new([3; 32]);
    let cookie_less = HeaderMap::new();
    for user in [None, Some("alice")] {
        // `session-abc` in the CONNECT's user name (`alice-session-abc`
        // under client authentication): its credential, made at the CONNECT.
        let tunnel = session_key::credential(&hasher, user, "abc");
        let read =
            || of_request(&cookie_less, Some(&tunnel), user, &policy, &hasher, None).unwrap();
        let first = read();
        let before = allocations::so_far();
        let again = read();
        // The vector alone: no copy of the key, and no `user:key` to hash.
        assert_eq!(allocations::so_far() - before, 1, "user {user:?}");
        assert_eq!(again, first);
        // The credential a request naming the key itself makes.
        let mut named = HeaderMap::new();
        named.insert("x-pinproxy-session", HeaderValue::from_static("abc"));
        assert_eq!(
            again,
            of_request(&named, None, user, &policy, &hasher, None).unwrap()
        );
    }
}

#[test]
fn a_log_line_allocates_nothing_once_the_writer_s_buffers_have_grown() {
    let (writer, guard) = LineWriter::start(std::io::sink()).unwrap();
    let line =
        b"2026-12-01T10:00:00.123456Z  INFO pinproxy::access: request method=GET status=200\n";
    // The senders' buffer and the thread's are swapped at every poll: two
    // polls grow both (a bounded wait for the thread to take each line).
    for _ in 0..2 {
        assert!(writer.line(line));
        let deadline = Instant::now() + Duration::from_secs(10);
        while writer.queued_bytes() > 0 {
            assert!(
                Instant::now() < deadline,
                "the line was not taken within 10 s"
            );
            std::thread::sleep(BATCH_INTERVAL);
        }
    }
    let before = allocations::so_far();
    assert!(writer.line(line));
    assert_eq!(
        allocations::so_far() - before,
        0,
        "the line was copied into a kept buffer"
    );
    drop(guard);
}

#[test]
fn a_cookie_less_request_holds_its_fingerprint_without_copying_it() {
    // A browser's five fingerprint headers, as bytes a parser shared out of
    // one buffer.
    let values = [
        ("user-agent", "Mozilla/5.0 Chrome/156"),
        ("sec-ch-ua", "\"Chromium\";v=\"156\""),
        ("sec-ch-ua-platform", "\"Linux\""),
        ("sec-ch-ua-mobile", "?0"),
        ("accept-language", "en-US,en;q=0.9"),
    ];
    let head = bytes::Bytes::from(values.iter().map(|(_, v)| *v).collect::<String>());
    let mut headers = HeaderMap::new();
    let mut start = 0;
    for (name, value) in values {
        let shared = head.slice(start..start + value.len());
        start += value.len();
        headers.insert(name, HeaderValue::from_maybe_shared(shared).unwrap());
    }
    let client = ClientConnection::default();
    let before = allocations::so_far();
    let held = RequestFingerprint::of_request(&headers, &client);
    assert_eq!(allocations::so_far() - before, 0, "held, not copied");
    // Recording it (an identity founded by the response) copies each value.
    let before = allocations::so_far();
    let recorded = held.record();
    assert_eq!(allocations::so_far() - before, 5);
    assert_eq!(recorded, Fingerprint::of_request(&headers, &client));
    assert_eq!(recorded.get("sec-ch-ua-mobile"), Some("?0"));
}

/// A DataDome challenge page followed by `zeros` bytes of zeros, gzipped:
/// a few kilobytes that inflate past anything a proxy should hold.
fn gzip_bomb(zeros: usize) -> Vec<u8> {
    use std::io::Write as _;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(b"<html><script src=\"https://ct.captcha-delivery.com/c.js\"></script>")
        .unwrap();
    let zero = vec![0u8; 1 << 20];
    for _ in 0..zeros / zero.len() {
        gz.write_all(&zero).unwrap();
    }
    gz.finish().unwrap()
}

/// Runs `test` on a runtime of one thread (this test's, so that the
/// allocations counted are its own).
fn on_one_thread<F: std::future::Future>(test: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(test)
}

/// The headers of a 403 in `coding`, and the rules that scan it.
fn scanned_403(coding: &'static str, limit: usize) -> (HeaderMap, Vec<(String, Vec<String>)>) {
    let mut headers = HeaderMap::new();
    headers.insert("content-encoding", HeaderValue::from_static(coding));
    let Verdict::ScanBody(rules) = invalidation::Rules::new(invalidation::default_rules(), limit)
        .judge(http::StatusCode::FORBIDDEN, &headers, false)
    else {
        panic!("a 403 is scanned for markers");
    };
    (headers, rules)
}

#[test]
fn a_compressed_challenge_is_scanned_in_a_window_of_the_scan_limit() {
    const SCAN_LIMIT: usize = 64 * 1024;
    on_one_thread(async {
        use http_body_util::BodyExt as _;
        let bomb = gzip_bomb(64 << 20);
        let sent = bomb.len();
        let (headers, rules) = scanned_403("gzip", SCAN_LIMIT);
        let found = Arc::new(std::sync::Mutex::new(None));
        let sink = found.clone();
        let baseline = allocations::reset_peak();
        // One frame: the whole bomb arrives in one read.
        let body = pinproxy::body::full(bomb);
        let scanned = invalidation::scanning(
            body,
            &headers,
            rules,
            SCAN_LIMIT,
            &pinproxy::net::tasks::ConnectionTasks::new(),
            move |rule| {
                *sink.lock().unwrap() = Some(rule);
            },
            None,
        );
        let passed = scanned.collect().await.unwrap().to_bytes().len();
        let peak = allocations::peak_growth(baseline);
        assert_eq!(passed, sent, "the body passes unchanged");
        assert_eq!(
            found.lock().unwrap().as_deref(),
            Some("datadome-challenge"),
            "the marker in the window is found"
        );
        // The compressed body itself, the window, and the decoder's state
        // and buffer: nowhere near the 64 MiB it inflates to.
        let bound = sent + 2 * SCAN_LIMIT + 256 * 1024;
        assert!(
            peak <= i64::try_from(bound).unwrap(),
            "scanning a {sent}-byte body that inflates to 64 MiB held {peak} bytes at most (bound {bound})"
        );
    });
}

/// A brotli stream declaring a 16 MiB window: the decoder would allocate
/// the whole window at its first block (and a copy of a few bytes can
/// fill it), so a scan does not decode it: what the scan holds stays far
/// below the window.
#[test]
fn a_brotli_stream_asking_for_a_16_mib_window_is_not_decoded() {
    const SCAN_LIMIT: usize = 64 * 1024;
    on_one_thread(async {
        use http_body_util::BodyExt as _;
        // WBITS = 24 (bit 0 set, then 7 in three bits), not the last
        // meta-block, 1 KiB uncompressed, then 1 KiB of text.
        let mut stream = vec![0b1000_1111, 0xff, 0x81];
        stream.extend_from_slice(&[b'a'; 1024]);
        let sent = stream.len();
        let (headers, rules) = scanned_403("br", SCAN_LIMIT);
        let baseline = allocations::reset_peak();
        let body = pinproxy::body::full(stream);
        let scanned = invalidation::scanning(
            body,
            &headers,
            rules,
            SCAN_LIMIT,
            &pinproxy::net::tasks::ConnectionTasks::new(),
            |_| {},
            None,
        );
        let passed = scanned.collect().await.unwrap().to_bytes().len();
        let peak = allocations::peak_growth(baseline);
        assert_eq!(passed, sent, "the body passes unchanged");
        let bound = sent + 2 * SCAN_LIMIT + 256 * 1024;
        assert!(
            peak <= i64::try_from(bound).unwrap(),
            "a brotli stream asking for a 16 MiB window held {peak} bytes at most (bound {bound})"
        );
    });
}
