//! Malformed and hostile input gets a clear answer and never crashes or
//! hangs the daemon.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support;

use std::time::Duration;

use support::client::read_head;
use support::{Origin, Proxy, Setup};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends raw bytes on a fresh client connection and reads the answer head.
async fn raw(proxy: &Proxy, bytes: &[u8]) -> String {
    let mut tcp = TcpStream::connect(proxy.daemon.local_addr()).await.unwrap();
    tcp.write_all(bytes).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), read_head(&mut tcp))
        .await
        .expect("the proxy answers")
}

async fn still_serves(proxy: &Proxy, origin: &Origin) {
    let mut conn = proxy.client.tunnel("localhost", origin.https.port()).await;
    assert_eq!(conn.get("/", &[]).await.status, 200);
}

#[tokio::test]
async fn malformed_requests_get_400() {
    let s = Setup::start(1).await;
    let (origin, proxy) = (&s.origin, &s.proxy);

    let garbage = raw(proxy, b"\x00\x01HELLO\r\n\r\n").await;
    assert!(garbage.starts_with("HTTP/1.1 400"), "{garbage}");

    let origin_form = raw(proxy, b"GET /index.html HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(origin_form.starts_with("HTTP/1.1 400"), "{origin_form}");
    assert!(
        origin_form.contains("x-pinproxy-error: bad-request:"),
        "{origin_form}"
    );

    let ftp = raw(
        proxy,
        b"GET ftp://localhost/ HTTP/1.1\r\nHost: localhost\r\n\r\n",
    )
    .await;
    assert!(
        ftp.starts_with("HTTP/1.1 400") && ftp.contains("unsupported scheme"),
        "{ftp}"
    );

    for target in [
        "localhost",
        "localhost:0",
        "user@localhost:443",
        "http://localhost:443",
    ] {
        let head = raw(
            proxy,
            format!("CONNECT {target} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
        )
        .await;
        assert!(head.starts_with("HTTP/1.1 400"), "CONNECT {target}: {head}");
    }
    still_serves(proxy, origin).await;
}

#[tokio::test]
async fn oversized_header_sections_get_431() {
    let s = Setup::start(1).await;
    let (origin, proxy) = (&s.origin, &s.proxy);
    let big = "a".repeat(70 * 1024);

    // Plain proxy request: pinproxy's own answer, with the reason.
    let head = raw(
        proxy,
        format!(
            "GET http://localhost:{}/ HTTP/1.1\r\nHost: localhost\r\nX-Big: {big}\r\n\r\n",
            origin.http.port()
        )
        .as_bytes(),
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 431"), "{head}");
    assert!(
        head.contains("x-pinproxy-error: headers-too-large:"),
        "{head}"
    );

    // Inside a tunnel too.
    let mut conn = proxy.client.tunnel("localhost", origin.https.port()).await;
    let reply = conn.get("/", &[("x-big", big.as_str())]).await;
    assert_eq!(reply.status, 431);
    assert!(reply
        .pinproxy_error()
        .unwrap()
        .starts_with("headers-too-large:"));

    // Far beyond the limit: the parser's own 431, memory stays bounded.
    let huge = "a".repeat(1024 * 1024);
    let head = raw(
        proxy,
        format!("GET http://localhost/ HTTP/1.1\r\nX-Huge: {huge}\r\n\r\n").as_bytes(),
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 431"), "{head}");
    assert!(origin.seen().is_empty(), "nothing oversized was forwarded");

    // More fields than limits.max_headers (100), small enough to fit the
    // byte limit: HTTP/1.1 gets the parser's 431, HTTP/2 pinproxy's own.
    let many: Vec<(String, String)> = (0..150).map(|i| (format!("x-h{i}"), "v".into())).collect();
    let fields: Vec<(&str, &str)> = many.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
    let mut conn = proxy.client.tunnel("localhost", origin.https.port()).await;
    let reply = conn.get("/", &fields).await;
    assert_eq!(reply.status, 431);
    let h2 = proxy
        .client
        .tunnel_h2("localhost", origin.https.port())
        .await;
    let reply = h2.clone().get("/", &fields).await;
    assert_eq!(reply.status, 431, "{}", reply.body);
    assert!(
        reply
            .pinproxy_error()
            .unwrap()
            .contains("150 header fields; the limit is 100"),
        "{:?}",
        reply.pinproxy_error()
    );
    assert!(origin.seen().is_empty(), "nothing oversized was forwarded");
    // At the limit, both go on; cookie crumbs over HTTP/2 (a browser sends
    // each cookie as a field of its own) count as the one `Cookie` line
    // HTTP/1.1 would carry.
    let mut fields = fields[..96].to_vec();
    let crumbs: Vec<String> = (0..150).map(|i| format!("c{i}=v")).collect();
    fields.extend(crumbs.iter().map(|crumb| ("cookie", crumb.as_str())));
    assert_eq!(h2.clone().get("/", &fields).await.status, 200);
    still_serves(proxy, origin).await;
}

#[tokio::test]
async fn unreadable_cookies_fail_closed() {
    let s = Setup::start(1).await;
    let (origin, proxy) = (&s.origin, &s.proxy);
    let mut request = format!(
        "GET http://localhost:{}/ HTTP/1.1\r\nHost: localhost\r\nCookie: datadome=",
        origin.http.port()
    )
    .into_bytes();
    request.extend_from_slice(b"\xff\xfe\r\n\r\n");
    let head = raw(proxy, &request).await;
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    assert!(
        head.contains("x-pinproxy-error: unreadable-cookies:"),
        "{head}"
    );
    // A tracked cookie after a comma or a blank inside another pair, which
    // some origins' parsers read as a pair of its own.
    for hidden in [
        "a=1, datadome=T",
        "lang datadome=T",
        "a=1\tdatadome=T",
        "a=1 datadome =T",
        "x= datadome=T",
    ] {
        let head = raw(
            proxy,
            format!(
                "GET http://localhost:{}/ HTTP/1.1\r\nHost: localhost\r\nCookie: {hidden}\r\n\r\n",
                origin.http.port()
            )
            .as_bytes(),
        )
        .await;
        assert!(head.starts_with("HTTP/1.1 400"), "{hidden}: {head}");
        assert!(
            head.contains("x-pinproxy-error: unreadable-cookies:")
                && head.contains("inside another pair"),
            "{hidden}: {head}"
        );
    }
    assert!(origin.seen().is_empty());
}

#[tokio::test]
async fn a_flood_of_tracked_cookies_or_a_giant_tracked_name_is_refused_not_pinned() {
    let s = Setup::start(1).await;
    let (origin, proxy) = (&s.origin, &s.proxy);
    let get = |cookie: String| {
        format!(
            "GET http://localhost:{}/ HTTP/1.1\r\nHost: localhost\r\nCookie: {cookie}\r\n\r\n",
            origin.http.port()
        )
    };
    // 257 distinct values of a pattern-matched name: each would be a pin.
    let flood: Vec<String> = (0..257).map(|i| format!("_px3=v{i}")).collect();
    let head = raw(proxy, get(flood.join("; ")).as_bytes()).await;
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    assert!(
        head.contains("x-pinproxy-error: unreadable-cookies:")
            && head.contains("more than 256 tracked cookies"),
        "{head}"
    );
    // A name the `_px*` pattern matches, 60 KB long: it would be kept as
    // sent in every pin and log line.
    let giant = format!("_px{}=1", "x".repeat(60_000));
    let head = raw(proxy, get(giant).as_bytes()).await;
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    assert!(head.contains("60003 bytes long"), "{head}");
    assert!(origin.seen().is_empty(), "nothing was forwarded");
    let metrics = proxy.daemon.admin().metrics.encode();
    assert!(
        !metrics.contains("pinproxy_identities_created_total{"),
        "no identity was founded: {metrics}"
    );
    // 256 (one repeated) are one request's worth.
    let mut jar: Vec<String> = (0..256).map(|i| format!("_px3=v{i}")).collect();
    jar.push("_px3=v0".into());
    let head = raw(proxy, get(jar.join("; ")).as_bytes()).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    still_serves(proxy, origin).await;
}

#[tokio::test]
async fn an_answer_setting_a_tracked_name_longer_than_pinproxy_tracks_is_refused() {
    // (More tracked cookies than pinproxy pins per answer, 256, take more
    // header fields than an HTTP/1.1 answer may carry: a unit test in
    // proxy::capture holds that bound.)
    let s = Setup::start(1).await;
    let reply = s.get_with("/set-many?n=1&name_len=1025", &[]).await;
    assert_eq!(reply.status, 502, "{}", reply.body);
    let error = reply.pinproxy_error().unwrap_or_default();
    assert!(
        error.starts_with("origin-failed:")
            && error.contains("the origin set a tracked cookie whose name is 1025 bytes long"),
        "{error}"
    );
    assert!(
        reply.headers.get_all("set-cookie").iter().next().is_none(),
        "the cookie did not reach the client"
    );
    let metrics = s.proxy.daemon.admin().metrics.encode();
    assert!(
        !metrics.contains("pinproxy_identities_created_total{"),
        "nothing was pinned: {metrics}"
    );
    // 64 cookies, and a name of 1024 bytes, are pinned and passed on.
    for path in ["/set-many?n=64", "/set-many?n=1&name_len=1024"] {
        let reply = s.get_with(path, &[]).await;
        assert_eq!(reply.status, 200, "{path}: {}", reply.body);
        assert!(
            reply.headers.get_all("set-cookie").iter().next().is_some(),
            "{path}"
        );
    }
    s.stop().await;
}

#[tokio::test]
async fn garbage_and_silence_in_tunnels_do_not_hurt_the_daemon() {
    let s = Setup::start_with(1, |c| {
        c.timeouts.tls_handshake = Duration::from_millis(300);
        c.timeouts.header_read = Duration::from_millis(300);
    })
    .await;
    let (origin, proxy) = (&s.origin, &s.proxy);

    // A TLS record header followed by junk.
    let (mut tunnel, head) = proxy.client.raw_connect("localhost:443").await;
    assert!(head.starts_with("HTTP/1.1 200"));
    tunnel
        .write_all(b"\x16\x03\x01\x00\x05junkjunkjunk")
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match tunnel.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the tunnel is closed");

    // Silence after CONNECT: the tunnel is closed after the handshake timeout.
    let (mut tunnel, _) = proxy.client.raw_connect("localhost:443").await;
    let read = tokio::time::timeout(Duration::from_secs(10), tunnel.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "silent tunnel closed: {read:?}"
    );

    // A slow request head: the connection is closed after header_read.
    let mut slow = TcpStream::connect(proxy.daemon.local_addr()).await.unwrap();
    slow.write_all(b"GET http://localhost/ HTTP/1.1\r\nHost: loc")
        .await
        .unwrap();
    let read = tokio::time::timeout(Duration::from_secs(10), slow.read(&mut buf)).await;
    assert!(read.is_ok(), "slow client cut off");

    // Nothing was dialled for any of it, and the daemon still serves.
    assert!(origin.seen().is_empty());
    still_serves(proxy, origin).await;
}
