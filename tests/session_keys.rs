//! Session keys: `X-Pinproxy-Session` or a CONNECT user name ending in
//! `session-NAME` names an identity before it has any cookie, so a
//! cookie-less login and everything after it leave through one exit; the key
//! itself never reaches the origin.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support;

use bytes::Bytes;
use http_body_util::Full;
use support::{Jar, Setup};

#[tokio::test]
async fn a_session_key_binds_a_cookieless_login_and_everything_after_to_one_exit() {
    let s = Setup::start(3).await;
    let port = s.origin.https.port();
    let mut jar = Jar::default();

    // A login POST before any cookie exists, named by its session key.
    let mut conn = s.proxy.client.tunnel("localhost", port).await;
    let request = conn
        .request("POST", "/login")
        .header("x-pinproxy-session", "user42")
        .body(Full::new(Bytes::from_static(b"user=42&pw=x")))
        .unwrap();
    let login = conn.send(request).await.unwrap();
    jar.store(&login.headers);
    let peer = Setup::peer(&login).unwrap();

    // The same key by header, by CONNECT Proxy-Authorization (both forms),
    // with and without the cookie: always the same exit.
    for round in 0..9 {
        let reply = match round % 3 {
            0 => {
                let mut conn = s.proxy.client.tunnel("localhost", port).await;
                let cookie = jar.header().unwrap();
                conn.get(
                    "/page",
                    &[("x-pinproxy-session", "user42"), ("cookie", &cookie)],
                )
                .await
            }
            1 => {
                let mut conn = s
                    .proxy
                    .client
                    .tunnel_as("session-user42", "localhost", port)
                    .await;
                conn.get("/page", &[]).await
            }
            _ => {
                let mut conn = s
                    .proxy
                    .client
                    .tunnel_as("scraper-session-user42", "localhost", port)
                    .await;
                conn.get_with_jar("/page", &mut jar).await
            }
        };
        assert_eq!(reply.status, 200, "round {round}: {}", reply.body);
        assert_eq!(Setup::peer(&reply), Some(peer), "round {round}");
    }
    for seen in s.origin.seen() {
        assert!(
            seen.header("x-pinproxy-session").is_empty(),
            "session key leaked"
        );
        assert!(
            seen.header("proxy-authorization").is_empty(),
            "proxy credentials leaked"
        );
    }
    assert!(s.origin.leaks().is_empty());
    s.stop().await;
}
