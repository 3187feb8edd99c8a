//! HTTP/2 on both sides: the client chooses by ALPN, the origin is offered
//! what the client offered, and pinning holds per request on multiplexed
//! streams.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support;

use std::collections::{HashMap, HashSet};

use http::Version;
use support::origin::reported_peer;
use support::{Jar, Setup};

#[tokio::test]
async fn an_h2_client_reaches_an_h2_origin_over_h2() {
    let s = Setup::start(2).await;
    let mut conn = s
        .proxy
        .client
        .tunnel_h2("localhost", s.origin.https.port())
        .await;
    let reply = conn.get("/login", &[]).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let seen = s.origin.seen().pop().unwrap();
    assert_eq!(seen.version, Version::HTTP_2);
    assert!(
        seen.header("host").is_empty(),
        "no Host header over h2, as browsers do"
    );
    s.stop().await;
}

#[tokio::test]
async fn an_h2_client_reaches_an_http1_only_origin() {
    let s = Setup::builder().http1_only_origin().exits(2).start().await;
    let (origin, proxy) = (&s.origin, &s.proxy);
    let mut conn = proxy
        .client
        .tunnel_h2("localhost", origin.https.port())
        .await;
    let reply = conn
        .get("/page?x=1", &[("cookie", "a=1"), ("cookie", "b=2")])
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let seen = origin.seen().pop().unwrap();
    assert_eq!(seen.version, Version::HTTP_11);
    assert_eq!(seen.path, "/page?x=1");
    assert_eq!(
        seen.header("host"),
        [format!("localhost:{}", origin.https.port())]
    );
    // HTTP/2 cookie crumbs become one Cookie header over HTTP/1.1, as the
    // browser would have sent it (RFC 9113 §8.2.3).
    assert_eq!(seen.header("cookie"), ["a=1; b=2"]);

    // An HTTP/1.1 client's headers go as it sent them, several Cookie
    // lines included.
    let mut conn = proxy.client.tunnel("localhost", origin.https.port()).await;
    let reply = conn
        .get("/page", &[("cookie", "a=1"), ("cookie", "b=2")])
        .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let seen = origin.seen().pop().unwrap();
    assert_eq!(seen.header("cookie"), ["a=1", "b=2"]);
    s.stop().await;
}

/// An HTTP/2 client that sends a `host` field beside `:authority` (nghttp2
/// and Node clients do when the application sets `Host`) keeps it: an
/// HTTP/2 origin gets the field where the client put it and `:authority`
/// as the client wrote it; an HTTP/1.1 origin one `Host`, first, from
/// `:authority`, and the cookie crumbs joined. The field was dropped, and
/// its value taken for `:authority`; and over HTTP/1.1 the crumbs went as
/// several `Cookie` lines.
#[tokio::test]
async fn an_h2_clients_host_field_reaches_the_origin_beside_its_authority() {
    for http1_only in [false, true] {
        let builder = Setup::builder();
        let builder = if http1_only {
            builder.http1_only_origin()
        } else {
            builder
        };
        let s = builder.exits(1).start().await;
        let port = s.origin.https.port();
        let authority = format!("localhost:{port}");
        let mut conn = s.proxy.client.tunnel_h2("localhost", port).await;
        let reply = conn
            .get(
                "/hosted",
                &[
                    ("user-agent", "nghttp2/1.0"),
                    ("host", "fronted.test"),
                    ("cookie", "a=1"),
                    ("cookie", "b=2"),
                ],
            )
            .await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        let seen = s.origin.seen().pop().unwrap();
        let names: Vec<&str> = seen.headers.iter().map(|(n, _)| n.as_str()).collect();
        if http1_only {
            assert_eq!(seen.version, Version::HTTP_11);
            assert_eq!(seen.header("host"), [authority.as_str()]);
            assert_eq!(names[..3], ["host", "user-agent", "cookie"], "{names:?}");
            assert_eq!(seen.header("cookie"), ["a=1; b=2"]);
        } else {
            assert_eq!(seen.version, Version::HTTP_2);
            assert_eq!(seen.header("host"), ["fronted.test"]);
            assert_eq!(
                names[..4],
                ["user-agent", "host", "cookie", "cookie"],
                "{names:?}"
            );
        }
        s.stop().await;
    }
}

/// An HTTP/2 client's `:authority` reaches the origin as it wrote it, as an
/// HTTP/1.1 client's `Host` does: a virtual host other than the CONNECT
/// host (domain fronting, or a Host override) and a default port written
/// out were replaced by the CONNECT host.
#[tokio::test]
async fn an_h2_clients_authority_reaches_the_origin_as_written() {
    let s = Setup::builder().http1_only_origin().exits(1).start().await;
    let port = s.origin.https.port();
    let mut conn = s.proxy.client.tunnel_h2("localhost", port).await;
    for authority in [format!("origin.test:{port}"), format!("LOCALHOST:{port}")] {
        let request = http::Request::get(format!("https://{authority}/named"))
            .version(Version::HTTP_2)
            .body(http_body_util::Full::default())
            .unwrap();
        conn.sender().ready().await.unwrap();
        let response = conn.sender().send_request(request).await.unwrap();
        assert_eq!(response.status(), 200);
        let seen = s.origin.seen().pop().unwrap();
        assert_eq!(seen.header("host"), [authority.as_str()]);
    }
    s.stop().await;
}

#[tokio::test]
async fn an_http1_client_is_carried_over_http1_even_to_an_h2_origin() {
    let s = Setup::start(2).await;
    let mut conn = s
        .proxy
        .client
        .tunnel("localhost", s.origin.https.port())
        .await;
    assert_eq!(conn.get("/", &[]).await.status, 200);
    assert_eq!(s.origin.seen().pop().unwrap().version, Version::HTTP_11);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_streams_of_different_identities_never_share_a_connection() {
    let s = Setup::start(3).await;
    let port = s.origin.https.port();
    // Six identities, earned over HTTP/2 through whichever exit rotation
    // gave (an identity's connections speak as the client that founded it).
    let mut identities = Vec::new();
    for _ in 0..6 {
        let mut login = s.proxy.client.tunnel_h2("localhost", port).await;
        let reply = login.get("/login", &[]).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        let mut jar = Jar::default();
        jar.store(&reply.headers);
        identities.push((jar, reported_peer(&reply.body).unwrap()));
    }
    // One client connection, all identities' requests multiplexed on it.
    let conn = s.proxy.client.tunnel_h2("localhost", port).await;
    let mut streams = Vec::new();
    for (n, (jar, peer)) in identities.iter().enumerate() {
        for round in 0..5 {
            let mut conn = conn.clone();
            let token = jar.get("datadome").unwrap().to_owned();
            let peer = *peer;
            streams.push(tokio::spawn(async move {
                // Split cookies across several h2 cookie fields, as browsers do.
                let cookie = format!("datadome={token}");
                let reply = conn
                    .get(
                        &format!("/page?identity={n}&round={round}"),
                        &[("cookie", "_ga=x"), ("cookie", cookie.as_str())],
                    )
                    .await;
                assert_eq!(reply.status, 200, "{}", reply.body);
                assert_eq!(
                    reported_peer(&reply.body),
                    Some(peer),
                    "identity {n} left through another exit"
                );
            }));
        }
    }
    for stream in streams {
        stream.await.unwrap();
    }
    // Which upstream connections (peer address and port at the origin) each
    // identity used: never one shared with another identity.
    let mut connections: HashMap<(std::net::IpAddr, u16), HashSet<String>> = HashMap::new();
    for seen in s
        .origin
        .seen()
        .into_iter()
        .filter(|s| s.path.contains("identity="))
    {
        let identity = seen
            .path
            .split("identity=")
            .nth(1)
            .unwrap()
            .split('&')
            .next()
            .unwrap()
            .to_owned();
        assert_eq!(seen.version, Version::HTTP_2);
        connections
            .entry((seen.peer, seen.peer_port))
            .or_default()
            .insert(identity);
    }
    for (connection, users) in &connections {
        assert_eq!(
            users.len(),
            1,
            "connection {connection:?} carried identities {users:?}"
        );
    }
    assert!(s.origin.leaks().is_empty());
    s.stop().await;
}

/// A pinproxy whose exit presents Chrome (`chrome` mode: an HTTP/1.1
/// client's requests leave over HTTP/2).
async fn chrome_mode() -> Setup {
    use pinproxy::upstream::FingerprintMode;
    Setup::start_with(1, |c| {
        c.exits[0].fingerprint = Some(FingerprintMode::Chrome)
    })
    .await
}

/// Sends `METHOD target` as an HTTP/1.1 client in a TLS tunnel to the
/// origin (`Connection: close`) and returns the answer, whole.
async fn http1_exchange(s: &Setup, method: &str, target: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let port = s.origin.https.port();
    let mut tls = s
        .proxy
        .client
        .tls_stream("localhost", port, &[b"http/1.1"])
        .await;
    tls.write_all(
        format!(
            "{method} {target} HTTP/1.1\r\nHost: localhost:{port}\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(20),
        tls.read_to_end(&mut answer),
    )
    .await
    .expect("an answer within 20 s")
    .ok();
    String::from_utf8_lossy(&answer).into_owned()
}

/// A body-less request that carries no `Content-Length` reaches an HTTP/2
/// origin without one, here an HTTP/1.1 client's `PATCH` and `OPTIONS`
/// sent over HTTP/2 (`chrome` mode): the HTTP/2 clients add
/// `content-length: 0` to a request whose body says it is exactly empty,
/// which no browser sends, and the bodies pinproxy passes on never say so.
#[tokio::test]
async fn a_body_less_request_gets_no_content_length_added() {
    let s = chrome_mode().await;
    for method in ["PATCH", "OPTIONS"] {
        let answer = http1_exchange(&s, method, "/p").await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{method}: {answer}");
        let seen = s.origin.seen().pop().unwrap();
        assert_eq!(
            (seen.method.as_str(), seen.version),
            (method, Version::HTTP_2)
        );
        assert!(
            seen.header("content-length").is_empty(),
            "{method}: {:?}",
            seen.headers
        );
    }
    s.stop().await;
}

/// `OPTIONS *` reaches an HTTP/2 origin as `:path *`, here an HTTP/1.1
/// client's sent over HTTP/2 (`chrome` mode).
#[tokio::test]
async fn options_asterisk_reaches_an_h2_origin_as_sent() {
    let s = chrome_mode().await;
    let answer = http1_exchange(&s, "OPTIONS", "*").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let seen = s.origin.seen().pop().unwrap();
    assert_eq!(
        (seen.method.as_str(), seen.path.as_str(), seen.version),
        ("OPTIONS", "*", Version::HTTP_2)
    );
    s.stop().await;
}
