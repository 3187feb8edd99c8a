//! End to end through real third-party exits: tinyproxy instances from
//! Debian's packages, each binding its outgoing connections to its own
//! source address.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support;

use std::collections::{HashMap, HashSet};

use support::origin::reported_peer;
use support::procs::Tinyproxy;
use support::{Jar, Origin, Proxy};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tinyproxy_exits_keep_every_cookie_on_its_ip() {
    let origin = Origin::start().await;
    let mut tinies = Vec::new();
    for bind in ["127.0.0.2", "127.0.0.3", "127.0.0.4"] {
        tinies.push(Tinyproxy::start(bind).await);
    }
    let config: Vec<(String, String)> = tinies
        .iter()
        .enumerate()
        .map(|(i, t)| (format!("tiny{}", i + 1), t.url()))
        .collect();
    let proxy = Proxy::start(&config, &origin, |_| {}).await;

    let mut clients = Vec::new();
    for client_no in 0..12 {
        let client = proxy.client.clone();
        let port = origin.https.port();
        clients.push(tokio::spawn(async move {
            let mut jar = Jar::default();
            let mut peers = HashSet::new();
            for step in 0..8 {
                let path = if step == 0 { "/login" } else { "/page" };
                // Alternate fresh tunnels and keep-alive.
                let mut conn = client.tunnel("localhost", port).await;
                let reply = conn.get_with_jar(path, &mut jar).await;
                assert_eq!(reply.status, 200, "client {client_no}: {}", reply.body);
                peers.insert(reported_peer(&reply.body).unwrap());
                let again = conn.get_with_jar("/page", &mut jar).await;
                peers.insert(reported_peer(&again.body).unwrap());
            }
            assert_eq!(peers.len(), 1, "client {client_no} moved: {peers:?}");
        }));
    }
    for client in clients {
        client.await.unwrap();
    }
    let mut spread: HashMap<_, usize> = HashMap::new();
    let mut conn = proxy.client.tunnel("localhost", origin.https.port()).await;
    for _ in 0..9 {
        *spread
            .entry(reported_peer(&conn.get("/", &[]).await.body).unwrap())
            .or_default() += 1;
    }
    assert_eq!(origin.leaks(), vec![]);
    assert_eq!(origin.forwarded_header_hits(), vec![]);
    assert_eq!(spread.len(), 3, "{spread:?}");
    proxy.stop().await;
}
