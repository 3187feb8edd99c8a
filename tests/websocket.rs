//! WebSockets through the MITM: the HTTP/1.1 upgrade is pinned like any
//! request, then frames flow both ways; HTTP/2 clients are not offered
//! extended CONNECT (RFC 8441).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use support::Setup;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::Message;

async fn echo_round_trips<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>, peer: std::net::IpAddr)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    for n in 0..5 {
        ws.send(Message::text(format!("hello {n}"))).await.unwrap();
        let echoed = ws.next().await.unwrap().unwrap();
        assert_eq!(
            echoed,
            Message::text(format!("{peer} hello {n}")),
            "echoed from the pinned exit"
        );
    }
    let big = vec![7u8; 256 * 1024];
    ws.send(Message::binary(big.clone())).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::binary(big));
}

#[tokio::test]
async fn websocket_over_http1_upgrade_carries_the_pinned_cookie() {
    let s = Setup::start(3).await;
    let (jar, peer) = s.login("/login").await;
    for _ in 0..3 {
        let mut ws = websocket_with_cookie(&s, &jar.header().unwrap()).await;
        echo_round_trips(&mut ws, peer).await;
        ws.close(None).await.unwrap();
    }
    let upgrades: Vec<_> = s
        .origin
        .seen()
        .into_iter()
        .filter(|r| r.path == "/ws")
        .collect();
    assert_eq!(upgrades.len(), 3);
    assert!(upgrades
        .iter()
        .all(|r| r.peer == peer && r.tokens.len() == 1));
    assert!(s.origin.leaks().is_empty());
    s.stop().await;
}

/// HTTP/2 clients are not offered WebSockets over HTTP/2 (RFC 8441): the
/// origin would get an HTTP/1.1 upgrade rebuilt from the extended CONNECT,
/// which no browser writes, where a browser not offered it opens an
/// HTTP/1.1 upgrade of its own (forwarded as written, above). A client's
/// HTTP/2 stack then refuses to send one, and nothing reaches the origin.
#[tokio::test]
async fn http2_clients_are_not_offered_websockets_over_http2() {
    let s = Setup::start(1).await;
    let (jar, _) = s.login("/login").await;
    let port = s.origin.https.port();
    let mut conn = s.proxy.client.tunnel_h2("localhost", port).await;
    // An ordinary stream first: the server's SETTINGS arrive.
    let cookie = jar.header().unwrap();
    assert_eq!(
        conn.get("/page", &[("cookie", cookie.as_str())])
            .await
            .status,
        200
    );
    let mut request = http::Request::connect(format!("https://localhost:{port}/ws"))
        .version(http::Version::HTTP_2)
        .header("sec-websocket-version", "13")
        .header("cookie", cookie.as_str())
        .body(http_body_util::Full::default())
        .unwrap();
    request
        .extensions_mut()
        .insert(hyper::ext::Protocol::from_static("websocket"));
    let sender = conn.sender();
    sender.ready().await.unwrap();
    let refused = sender.send_request(request).await;
    assert!(refused.is_err(), "{refused:?}");
    assert!(s.origin.seen().iter().all(|r| r.path != "/ws"));
    s.stop().await;
}

#[tokio::test]
async fn a_websocket_is_closed_once_nothing_moves_for_relay_idle() {
    use std::time::{Duration, Instant};
    let limit = Duration::from_millis(600);
    let s = Setup::builder()
        .exits(1)
        .config(|c| c.timeouts.relay_idle = limit)
        .start()
        .await;
    let mut ws = s.proxy.client.websocket(s.origin.https.port()).await;
    // Busy for twice the limit, a message every 200 ms: it stays open.
    for n in 0..6 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        ws.send(Message::text(format!("ping {n}"))).await.unwrap();
        let echoed = ws
            .next()
            .await
            .unwrap()
            .expect("an active WebSocket stays open");
        assert!(echoed.to_text().unwrap().ends_with(&format!("ping {n}")));
    }
    let last = Instant::now();
    // Then quiet: pinproxy closes it (a bounded wait for the end).
    let end = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .expect("the quiet WebSocket was still open after 10 s");
    let quiet = last.elapsed();
    assert!(matches!(end, None | Some(Err(_))), "{end:?}");
    assert!(
        // The relay counts from the last byte it moved, a moment before
        // the client read it and took the time.
        quiet + Duration::from_millis(100) >= limit && quiet < Duration::from_secs(3),
        "closed {quiet:?} after its last byte (relay_idle {limit:?})"
    );
    s.stop().await;
}

#[tokio::test]
async fn an_open_websocket_holds_the_shutdown_like_a_request_in_flight() {
    use std::time::Duration;
    let s = Setup::start(1).await;
    let peer = s.exits[0].source;
    let mut ws = s.proxy.client.websocket(s.origin.https.port()).await;
    let mut stopping = s.begin_shutdown(Duration::from_secs(30));
    // The daemon stops accepting, but the relay carries on within the
    // grace period.
    for n in 0..3 {
        ws.send(Message::text(format!("still here {n}")))
            .await
            .unwrap();
        let echoed = ws
            .next()
            .await
            .unwrap()
            .expect("the relay outlives the shutdown's start");
        assert_eq!(echoed, Message::text(format!("{peer} still here {n}")));
    }
    assert!(
        stopping.still_waiting_after(Duration::from_secs(2)).await,
        "the shutdown ended with a WebSocket still open"
    );
    // Once the client closes the WebSocket and its connection, nothing
    // holds the shutdown.
    ws.close(None).await.unwrap();
    drop(ws);
    stopping
        .ends_within(Duration::from_secs(10), "with the WebSocket closed")
        .await;
}

/// A WebSocket through pinproxy carrying `cookie` (a pinned one): opened
/// over HTTP/1.1 Upgrade in a MITM tunnel.
async fn websocket_with_cookie(
    s: &Setup,
    cookie: &str,
) -> tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    websocket_with(s, "cookie", cookie).await
}

/// A WebSocket through pinproxy whose handshake carries `name: value`,
/// opened over HTTP/1.1 Upgrade in a MITM tunnel offering HTTP/1.1 alone.
async fn websocket_with(
    s: &Setup,
    name: &'static str,
    value: &str,
) -> tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let port = s.origin.https.port();
    let tls = s
        .proxy
        .client
        .tls_stream("localhost", port, &[b"http/1.1"])
        .await;
    let mut request = format!("wss://localhost:{port}/ws")
        .into_client_request()
        .unwrap();
    request.headers_mut().insert(name, value.parse().unwrap());
    let (ws, response) = tokio_tungstenite::client_async(request, tls).await.unwrap();
    assert_eq!(response.status(), 101);
    ws
}

/// An identity founded by a WebSocket upgrade (its session key) whose
/// tunnel offered HTTP/1.1 alone, as Chromium's WebSocket tunnels do,
/// records no ClientHello: recording that one would have every page load
/// of the identity offer HTTP/1.1 alone upstream, as no browser does. Its
/// client's next tunnel, offering HTTP/2, reaches the origin over HTTP/2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_founded_by_a_websocket_keeps_its_pages_on_http2() {
    let s = Setup::start(1).await;
    let port = s.origin.https.port();
    let mut ws = websocket_with(&s, "x-pinproxy-session", "ws-first").await;
    let identity = only_identity(&s).await;
    assert!(
        identity["client_ja4"].is_null(),
        "no hello recorded from the WebSocket's tunnel: {identity}"
    );
    ws.close(None).await.unwrap();
    let mut page = s.proxy.client.tunnel_h2("localhost", port).await;
    let reply = page
        .get("/page", &[("x-pinproxy-session", "ws-first")])
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let seen = s.origin.seen();
    let last = seen.iter().rfind(|r| r.path == "/page").unwrap();
    assert_eq!(last.version, http::Version::HTTP_2, "the page over HTTP/2");
    s.stop().await;
}

/// The only identity pinproxy holds, as the admin API lists it.
async fn only_identity(s: &Setup) -> serde_json::Value {
    let admin = s.proxy.daemon.admin_addr().unwrap();
    let body = support::admin::get(admin, "/identities?all=1").await;
    let mut views: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
    assert_eq!(views.len(), 1, "{body}");
    views.remove(0)
}

/// Sends a message every `every`, at most `messages` times, until the
/// WebSocket ends; returns how many were echoed before it did (`None`: it
/// never ended).
async fn messages_until_closed<S>(
    ws: &mut tokio_tungstenite::WebSocketStream<S>,
    messages: usize,
    every: std::time::Duration,
) -> Option<usize>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    for n in 0..messages {
        if ws
            .send(Message::text(format!("still here {n}")))
            .await
            .is_err()
        {
            return Some(n);
        }
        match tokio::time::timeout(std::time::Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(Message::Text(_)))) => {}
            Ok(_) => return Some(n),
            Err(_) => panic!("message {n} neither echoed nor refused within 10 s"),
        }
        tokio::time::sleep(every).await;
    }
    None
}

/// Messages on `ws` for 8 s, and nothing else on its identity (two and a
/// half of the tests' 3 s idle timeouts: the passing of time is what is
/// under test); the WebSocket stays open throughout.
async fn in_use_past_its_idle_timeout<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let every = std::time::Duration::from_millis(400);
    assert_eq!(
        messages_until_closed(ws, 20, every).await,
        None,
        "the WebSocket of an identity in use was closed"
    );
}

/// Milliseconds since the Unix epoch, by the system clock.
fn now_ms() -> u64 {
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    u64::try_from(since.unwrap().as_millis()).unwrap()
}

/// The only identity's last use, as the store holds it (Unix ms).
async fn stored_last_use(s: &Setup) -> u64 {
    only_identity(s).await["last_used_ms"].as_u64().unwrap()
}

/// Waits (at most 5 s) for `ws` to end, which it must without another
/// message: the WebSocket of an identity that retired (`why`, for the
/// failure's message).
async fn closes_soon<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>, why: &str)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let end = tokio::time::timeout(std::time::Duration::from_secs(5), ws.next())
        .await
        .unwrap_or_else(|_| panic!("the WebSocket of {why} was still open after 5 s"));
    assert!(!matches!(end, Some(Ok(Message::Text(_)))), "{end:?}");
}

/// The only identity's last use, as the store holds it, came at least
/// 4 s after `since_ms`: the relay recorded its uses while messages moved
/// (for [`in_use_past_its_idle_timeout`]'s 8 s, at checks 750 ms apart),
/// which other replicas judge the identity by.
async fn uses_recorded_since(s: &Setup, since_ms: u64) {
    let stored = stored_last_use(s).await;
    assert!(
        stored >= since_ms + 4_000,
        "last use stored {} ms after the messages began",
        stored.saturating_sub(since_ms)
    );
}

/// The identity of `jar` answers its next request `200`, through its exit
/// (`peer`).
async fn next_request_leaves_through(
    s: &Setup,
    jar: &mut support::client::Jar,
    peer: std::net::IpAddr,
) {
    let reply = s.get("/page", jar).await;
    assert_eq!(
        (reply.status.as_u16(), Setup::peer(&reply)),
        (200, Some(peer)),
        "{}",
        reply.body
    );
}

/// An identity whose only traffic is a WebSocket (a live feed) is in use
/// while messages move: it is not retired for idleness, however long the
/// WebSocket outlasts its idle timeout, and its next request goes out
/// through its exit.
#[tokio::test]
async fn an_open_websocket_keeps_its_identity_from_idling_out() {
    use std::time::Duration;
    let idle = Duration::from_secs(3);
    let s = Setup::builder()
        .exits(2)
        .config(|c| {
            c.identities.idle_timeout = idle;
            c.identities.sweep_interval = Duration::from_millis(200);
        })
        .start()
        .await;
    let (mut jar, peer) = s.login("/login").await;
    let mut ws = websocket_with_cookie(&s, &jar.header().unwrap()).await;
    let began = now_ms();
    in_use_past_its_idle_timeout(&mut ws).await;
    uses_recorded_since(&s, began).await;
    next_request_leaves_through(&s, &mut jar, peer).await;
    ws.close(None).await.unwrap();
    // Its requests are what they were (the login, the upgrade, the page):
    // the relay's uses count none.
    let identity = only_identity(&s).await;
    assert_eq!(identity["requests"].as_u64(), Some(3), "{identity}");
    assert!(s.origin.leaks().is_empty());
    s.stop().await;
}

/// A reload that shortens the idle timeout reaches an open WebSocket at
/// once: its relay, whose checks the old timeout (ten minutes) spaced
/// 30 s apart, checks again and records its uses by the new one (3 s),
/// as other replicas need to see them.
#[tokio::test]
async fn a_reload_that_shortens_the_idle_timeout_reaches_an_open_websocket() {
    use std::time::Duration;
    let s = Setup::builder()
        .exits(2)
        .config(|c| {
            c.identities.idle_timeout = Duration::from_secs(600);
            c.identities.sweep_interval = Duration::from_millis(200);
        })
        .start()
        .await;
    let (mut jar, peer) = s.login("/login").await;
    let mut ws = websocket_with_cookie(&s, &jar.header().unwrap()).await;
    // The relay runs (its first check, by the old timeout, made) before
    // the reload.
    echo_round_trips(&mut ws, peer).await;
    let mut config = s.proxy.config.clone();
    config.identities.idle_timeout = Duration::from_secs(3);
    s.proxy.daemon.reload_with(&config).await.unwrap();
    let began = now_ms();
    in_use_past_its_idle_timeout(&mut ws).await;
    uses_recorded_since(&s, began).await;
    next_request_leaves_through(&s, &mut jar, peer).await;
    ws.close(None).await.unwrap();
    s.stop().await;
}

/// An identity with a WebSocket open here is idle only by its relay's
/// own check, which knows whether bytes moved: the sweep and the
/// identity's next request read the store, where the relay records its
/// uses only at its checks (30 s apart with a ten-minute idle timeout).
/// While messages move, neither retires the identity past its idle
/// timeout; once nothing moved through the relay for the idle timeout,
/// its check retires the identity and closes it.
#[tokio::test]
async fn only_its_relay_finds_an_identity_with_an_open_websocket_idle() {
    use pinproxy::clock::Clock;
    use support::MINUTE;
    let clock = Clock::manual();
    let s = Setup::builder()
        .exits(2)
        .clock(clock.clone())
        .config(|c| c.identities.idle_timeout = 10 * MINUTE)
        .start()
        .await;
    let router = s.proxy.daemon.pipeline().router.clone();
    let (mut jar, peer) = s.login("/login").await;
    let mut ws = websocket_with_cookie(&s, &jar.header().unwrap()).await;
    // Eleven minutes of messages, none recorded in the store yet (the
    // relay's next check is 30 s away).
    let opened_ms = clock.now_ms();
    echo_round_trips(&mut ws, peer).await;
    clock.advance(11 * MINUTE);
    echo_round_trips(&mut ws, peer).await;
    let stored = stored_last_use(&s).await;
    assert!(
        stored <= opened_ms,
        "a use recorded since the WebSocket opened"
    );
    router.sweep(&s.proxy.daemon.exits()).await.unwrap();
    assert_eq!(only_identity(&s).await["state"], "active");
    echo_round_trips(&mut ws, peer).await;
    next_request_leaves_through(&s, &mut jar, peer).await;

    // A reload wakes the relay, whose check records the messages' use
    // (a minute after the request's).
    clock.advance(MINUTE);
    let used_ms = clock.now_ms();
    s.proxy.daemon.reload_with(&s.proxy.config).await.unwrap();
    let mut recorded = stored_last_use(&s).await;
    for _ in 0..100 {
        if recorded == used_ms {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        recorded = stored_last_use(&s).await;
    }
    assert_eq!(recorded, used_ms, "the relay's use was not recorded");
    // Nothing moves for eleven minutes: the relay's next check (woken by
    // a reload) retires the identity and closes the WebSocket.
    clock.advance(11 * MINUTE);
    s.proxy.daemon.reload_with(&s.proxy.config).await.unwrap();
    closes_soon(&mut ws, "an idle identity").await;
    let reply = s.get("/page", &mut jar).await;
    assert!(
        support::error_of(&reply).contains("idle-expired"),
        "{}",
        support::error_of(&reply)
    );
    assert!(s.origin.leaks().is_empty());
    s.stop().await;
}

/// An open WebSocket keeps its identity from idling out, not past its
/// lifetime: the identity's next request finds it ended and closes the
/// WebSocket.
#[tokio::test]
async fn an_open_websocket_does_not_keep_its_identity_past_its_lifetime() {
    use pinproxy::clock::Clock;
    use support::MINUTE;
    let clock = Clock::manual();
    let s = Setup::builder()
        .exits(2)
        .clock(clock.clone())
        .config(|c| {
            c.identities.idle_timeout = 10 * MINUTE;
            c.identities.max_lifetime = 15 * MINUTE;
        })
        .start()
        .await;
    let (mut jar, peer) = s.login("/login").await;
    let mut ws = websocket_with_cookie(&s, &jar.header().unwrap()).await;
    echo_round_trips(&mut ws, peer).await;
    // Idle by the store, and past its lifetime.
    clock.advance(16 * MINUTE);
    let reply = s.get("/page", &mut jar).await;
    assert!(
        support::error_of(&reply).contains("lifetime-expired"),
        "{}",
        support::error_of(&reply)
    );
    closes_soon(&mut ws, "a retired identity").await;
    s.stop().await;
}

/// A WebSocket ends with its identity: at once when an operator evicts
/// it, and within a check when the sweep retires it (its lifetime ended
/// while the WebSocket ran).
#[tokio::test]
async fn a_websocket_closes_when_its_identity_is_retired() {
    use std::time::Duration;
    let s = Setup::start(1).await;
    let (jar, _) = s.login("/login").await;
    let mut ws = websocket_with_cookie(&s, &jar.header().unwrap()).await;
    echo_round_trips(&mut ws, s.exits[0].source).await;
    let id = only_identity(&s).await["identity"]
        .as_str()
        .unwrap()
        .to_owned();
    let admin = s.proxy.daemon.admin_addr().unwrap();
    let reply = support::admin::request(admin, "DELETE", &format!("/identities/{id}")).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    closes_soon(&mut ws, "an evicted identity").await;
    s.stop().await;

    let lifetime = Duration::from_secs(6);
    // The lifetime ends while the WebSocket runs: the sweep that retires
    // the identity ends its relay and drops its pooled connection through
    // the exit (the relay's own check is 30 s away with an idle timeout of
    // an hour).
    let s = Setup::builder()
        .exits(1)
        .config(|c| {
            c.exits[0].max_lifetime = Some(lifetime);
            c.identities.sweep_interval = Duration::from_millis(200);
        })
        .start()
        .await;
    let founded = std::time::Instant::now();
    let (mut jar, _) = s.login("/login").await;
    assert_eq!(s.get("/page", &mut jar).await.status, 200);
    let mut ws = websocket_with_cookie(&s, &jar.header().unwrap()).await;
    // The login's (dialled for it, so the identity's from its answer on,
    // and the page's) and the WebSocket's.
    assert_eq!(s.exits[0].open_tunnels(), 2);
    let echoed = messages_until_closed(&mut ws, 36, Duration::from_millis(250))
        .await
        .expect("the WebSocket outlived its identity's lifetime by 3 s");
    assert!(
        echoed >= 1 && founded.elapsed() >= lifetime,
        "closed after {echoed} messages, {:?} after the identity was founded: before its \
         lifetime ended",
        founded.elapsed()
    );
    let mut open = s.exits[0].open_tunnels();
    for _ in 0..100 {
        if open == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        open = s.exits[0].open_tunnels();
    }
    assert_eq!(
        open, 0,
        "connections of the retired identity still open at the exit"
    );
    let reply = s.get("/page", &mut jar).await;
    assert!(
        support::error_of(&reply).contains("lifetime-expired"),
        "{}",
        support::error_of(&reply)
    );
    s.stop().await;
}

/// Replicas sharing Redis: a WebSocket open on one keeps its identity in
/// use for the others (its uses reach Redis), and an eviction made on
/// another replica, which cannot reach the relay, closes it at the relay's
/// next check of the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_websocket_keeps_and_ends_with_its_identity_across_replicas() {
    use std::time::Duration;
    let redis = support::procs::RedisServer::start().await;
    let idle = Duration::from_secs(3);
    let url = redis.url();
    let s = Setup::builder()
        .exits(1)
        .config(move |c| {
            c.store.url = url;
            c.exits[0].idle_timeout = Some(idle);
        })
        .start()
        .await;
    let listed = vec![("exit1".to_owned(), s.exits[0].url())];
    let url = redis.url();
    let other = support::Proxy::start(&listed, &s.origin, move |c| {
        c.store.url = url;
        c.exits[0].idle_timeout = Some(idle);
    })
    .await;
    let (mut jar, peer) = s.login("/login").await;
    let mut ws = websocket_with_cookie(&s, &jar.header().unwrap()).await;
    // On this replica alone.
    in_use_past_its_idle_timeout(&mut ws).await;
    let reply = other
        .client
        .try_get("localhost", s.origin.https.port(), "/page", &mut jar)
        .await
        .unwrap();
    assert_eq!(
        (reply.status.as_u16(), Setup::peer(&reply)),
        (200, Some(peer)),
        "{}",
        reply.body
    );
    let id = only_identity(&s).await["identity"]
        .as_str()
        .unwrap()
        .to_owned();
    let other_admin = other.daemon.admin_addr().unwrap();
    let evicted =
        support::admin::request(other_admin, "DELETE", &format!("/identities/{id}")).await;
    assert_eq!(evicted.status, 200, "{}", evicted.body);
    // Messages go on (so that it is no idleness that ends it): the relay's
    // next check, under a second away, finds the eviction.
    assert!(
        messages_until_closed(&mut ws, 20, Duration::from_millis(250))
            .await
            .is_some(),
        "the WebSocket of an identity evicted on another replica was open 5 s later"
    );
    other.stop().await;
    s.stop().await;
}

/// With Redis, a reload that removes an exit leaves its identities to the
/// replicas that may still have it, but a WebSocket open through the
/// exit here closes: the operator's removal holds for what this replica
/// relays, as for its requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_closes_when_a_reload_removes_its_exit_under_redis() {
    let redis = support::procs::RedisServer::start().await;
    let url = redis.url();
    let s = Setup::start_with(2, move |c| c.store.url = url).await;
    let (jar, _) = s.login("/login").await;
    let mut ws = websocket_with_cookie(&s, &jar.header().unwrap()).await;
    assert_eq!(
        messages_until_closed(&mut ws, 2, Duration::from_millis(10)).await,
        None
    );
    let exit = only_identity(&s).await["exit"].as_str().unwrap().to_owned();
    let mut config = s.proxy.config.clone();
    config.exits.retain(|e| e.id != exit);
    let report = s.proxy.daemon.reload_with(&config).await.unwrap();
    assert_eq!(report.removed, vec![exit.clone()]);
    assert!(
        messages_until_closed(&mut ws, 20, Duration::from_millis(250))
            .await
            .is_some(),
        "the WebSocket through removed exit {exit} was open 5 s later"
    );
    s.stop().await;
}

/// Headless Chromium, not offered WebSockets over HTTP/2, opens an HTTP/1.1
/// upgrade of its own from a page it loaded over HTTP/2: the origin gets
/// Chromium's own upgrade head (`Connection` right after `Host`, where a
/// head rebuilt from an extended CONNECT carried it after the client's
/// headers), with the page's cookie, from the exit that earned it. Its
/// WebSocket tunnel offers HTTP/1.1 alone (and so no ALPS): the same
/// client as the page's, so no drift under `reject`, and the connection
/// pinproxy opens for it says the same, so no mismatch either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_opens_a_websocket_of_its_own_through_pinproxy() {
    use support::browser::{Chromium, ConnectTap, HOST_RESOLVER_RULES, PROXY_BYPASS_LIST};
    use support::devtools::Devtools;
    let s = Setup::start_with(2, |c| {
        c.identities.fingerprint_policy = pinproxy::fingerprint::FingerprintPolicy::Reject
    })
    .await;
    let port = s.origin.https.port();
    let home = tempfile::tempdir().unwrap();
    Chromium::in_home(home.path())
        .trust_pinproxy(s.proxy.data_dir.path())
        .await;
    let tap = ConnectTap::start(s.proxy.daemon.local_addr()).await;
    let profile = tempfile::tempdir().unwrap();
    let mut browser = Devtools::launch(
        home.path(),
        profile.path(),
        &[
            format!("--proxy-server=http://{}", tap.addr),
            format!("--proxy-bypass-list={PROXY_BYPASS_LIST}"),
            format!("--host-resolver-rules={HOST_RESOLVER_RULES}"),
        ],
    )
    .await;
    browser
        .navigate(&format!("https://localhost:{port}/login"))
        .await
        .unwrap();
    let page = browser
        .wait_for_text("document.body?.innerText ?? ''", Duration::from_secs(30))
        .await
        .expect("the page loaded");
    assert!(page.starts_with("ok 127.0.0."), "{page}");
    browser
        .evaluate(&format!(
            "window.echoed = ''; const ws = new WebSocket('wss://localhost:{port}/ws'); \
             ws.onopen = () => ws.send('hello'); \
             ws.onmessage = (e) => {{ window.echoed = e.data; }}; \
             ws.onerror = () => {{ window.echoed = 'error'; }}; ''"
        ))
        .await;
    let echoed = browser
        .wait_for_text("window.echoed", Duration::from_secs(30))
        .await
        .expect("the WebSocket answered");
    let seen = s.origin.seen();
    let login = seen.iter().find(|r| r.path == "/login").unwrap();
    assert_eq!(
        login.version,
        http::Version::HTTP_2,
        "the page came over h2"
    );
    assert_eq!(echoed, format!("{} hello", login.peer));
    let upgrade = seen.iter().find(|r| r.path == "/ws").unwrap();
    assert_eq!(upgrade.version, http::Version::HTTP_11);
    assert_eq!(
        (upgrade.peer, upgrade.tokens.len()),
        (login.peer, 1),
        "the page's cookie, from its exit"
    );
    let at = |name: &str| upgrade.headers.iter().position(|(n, _)| n == name);
    assert!(
        at("connection").is_some() && at("connection") < at("user-agent"),
        "Chromium's own upgrade head: {:?}",
        upgrade.headers
    );
    assert!(s.origin.leaks().is_empty());
    support::assert_no_fingerprint_drift(&s.proxy.daemon);
    s.stop().await;
}
