//! The origin never learns the scraper's address or the proxy chain from
//! pinproxy: forwarding and hop-by-hop headers are stripped, none are added.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support;

use support::origin::FORWARDING_HEADERS;
use support::Setup;

/// Every forwarding header the origin watches for, each carrying the
/// scraper's address, plus hop-by-hop ones and two ordinary headers.
fn sent() -> Vec<(&'static str, &'static str)> {
    let mut sent: Vec<(&str, &str)> = FORWARDING_HEADERS
        .iter()
        .map(|name| match *name {
            "forwarded" => (*name, "for=203.0.113.7;proto=https"),
            "via" => (*name, "1.1 scraper-box 203.0.113.7"),
            "proxy-authorization" => (*name, "Basic MjAzLjAuMTEzLjc6c2VjcmV0"),
            "proxy-connection" => (*name, "keep-alive"),
            _ => (*name, "203.0.113.7"),
        })
        .collect();
    sent.extend([
        ("connection", "keep-alive, x-hop-secret"),
        ("x-hop-secret", "203.0.113.7"),
        ("user-agent", "pinproxy-test/1"),
        ("accept-language", "en-GB"),
    ]);
    sent
}

#[test]
fn the_origin_watches_every_header_production_strips() {
    for name in pinproxy::proxy::egress::FORWARDING_HEADERS {
        assert!(
            FORWARDING_HEADERS.contains(name),
            "the test origin does not watch for {name}"
        );
    }
}

async fn assert_stripped(plain: bool) {
    let s = Setup::start(2).await;
    let (origin, proxy) = (&s.origin, &s.proxy);
    let mut conn = if plain {
        proxy.client.plain("localhost", origin.http.port()).await
    } else {
        proxy.client.tunnel("localhost", origin.https.port()).await
    };
    for _ in 0..3 {
        let reply = conn.get("/page", &sent()).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
    }

    let seen = origin.seen();
    assert_eq!(seen.len(), 3);
    for request in &seen {
        for (name, value) in &request.headers {
            assert!(
                !FORWARDING_HEADERS.contains(&name.as_str()) && name != "x-hop-secret",
                "{name}: {value} reached the origin"
            );
            assert!(
                !value.contains("203.0.113.7"),
                "client address leaked in {name}: {value}"
            );
        }
        // Ordinary headers pass untouched, in the client's order.
        assert_eq!(request.header("user-agent"), ["pinproxy-test/1"]);
        let names: Vec<&str> = request.headers.iter().map(|(n, _)| n.as_str()).collect();
        let ua = names.iter().position(|n| *n == "user-agent").unwrap();
        let lang = names.iter().position(|n| *n == "accept-language").unwrap();
        assert!(ua < lang, "header order changed: {names:?}");
    }
}

#[tokio::test]
async fn forwarding_headers_never_leave_a_tunnel() {
    assert_stripped(false).await;
}

#[tokio::test]
async fn forwarding_headers_never_leave_a_plain_request() {
    assert_stripped(true).await;
}

#[tokio::test]
async fn set_cookie_and_other_response_headers_pass_untouched() {
    let s = Setup::start(1).await;
    let (origin, proxy) = (&s.origin, &s.proxy);
    let mut conn = proxy.client.tunnel("localhost", origin.https.port()).await;
    let reply = conn.get("/login", &[]).await;
    let set: Vec<&str> = reply
        .headers
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    assert_eq!(set.len(), 2, "{set:?}");
    assert!(
        set[0].starts_with("datadome=")
            && set[0].ends_with("; Max-Age=3600; Path=/; Secure; SameSite=Lax")
    );
    assert_eq!(set[1], "_ga=untracked; Path=/");
    assert!(reply.headers.get("via").is_none());
}
