//! The heart of pinproxy: every tracked cookie leaves only through the exit
//! that first saw it, while cookie-less traffic rotates.

mod support;

use std::collections::HashSet;
use std::net::IpAddr;

use support::origin::reported_peer;
use support::{exits, Jar, Origin, Proxy};

#[tokio::test]
async fn login_then_requests_stay_on_the_earning_exit() {
    let origin = Origin::start().await;
    let (_exits, config) = exits(3).await;
    let proxy = Proxy::start(&config, &origin, |_| {}).await;

    let mut jar = Jar::default();
    let mut conn = proxy.client.tunnel("localhost", origin.https.port()).await;
    let login = conn.get_with_jar("/login", &mut jar).await;
    assert_eq!(login.status, 200);
    let earned_from = reported_peer(&login.body).unwrap();
    assert!(jar.get("datadome").is_some());

    for _ in 0..20 {
        // Fresh tunnel each time, so nothing but the pin keeps the exit.
        let mut conn = proxy.client.tunnel("localhost", origin.https.port()).await;
        let reply = conn.get_with_jar("/page", &mut jar).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        assert_eq!(reported_peer(&reply.body), Some(earned_from));
    }
    assert!(origin.leaks().is_empty());
    proxy.stop().await;
}

#[tokio::test]
async fn cookieless_requests_rotate_over_all_exits_even_on_one_connection() {
    let origin = Origin::start().await;
    let (_exits, config) = exits(3).await;
    let proxy = Proxy::start(&config, &origin, |_| {}).await;

    let mut conn = proxy.client.tunnel("localhost", origin.https.port()).await;
    let mut peers = HashSet::new();
    for _ in 0..9 {
        let reply = conn.get("/", &[]).await;
        peers.insert(reported_peer(&reply.body).unwrap());
    }
    let expected: HashSet<IpAddr> = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
    assert_eq!(
        peers, expected,
        "one client connection, requests through every exit"
    );
    proxy.stop().await;
}
