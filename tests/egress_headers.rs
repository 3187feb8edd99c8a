//! The origin never learns the scraper's address or the proxy chain from
//! pinproxy: forwarding and hop-by-hop headers are stripped, none are added.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use support::origin::FORWARDING_HEADERS;
use support::Setup;

const SENT: &[(&str, &str)] = &[
    ("x-forwarded-for", "203.0.113.7"),
    ("forwarded", "for=203.0.113.7;proto=https"),
    ("x-real-ip", "203.0.113.7"),
    ("true-client-ip", "203.0.113.7"),
    ("client-ip", "203.0.113.7"),
    ("via", "1.1 scraper-box"),
    ("x-forwarded-host", "scraper.internal"),
    ("x-forwarded-proto", "http"),
    ("x-forwarded-port", "8080"),
    ("proxy-authorization", "Basic c2VjcmV0OnNlY3JldA=="),
    ("proxy-connection", "keep-alive"),
    ("connection", "keep-alive, x-hop-secret"),
    ("x-hop-secret", "203.0.113.7"),
    ("user-agent", "pinproxy-test/1"),
    ("accept-language", "en-GB"),
];

async fn assert_stripped(plain: bool) {
    let s = Setup::start(2).await;
    let (origin, proxy) = (&s.origin, &s.proxy);
    let mut conn = if plain {
        proxy.client.plain("localhost", origin.http.port()).await
    } else {
        proxy.client.tunnel("localhost", origin.https.port()).await
    };
    for _ in 0..3 {
        let reply = conn.get("/page", SENT).await;
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
