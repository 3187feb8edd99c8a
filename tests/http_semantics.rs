//! HTTP semantics carried faithfully: 100-continue, HEAD, 204 and 304,
//! trailers, pipelining, and header case and order on HTTP/1.1.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support;

use support::raw_origin::{header_names, RawOrigin};
use support::Setup;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn header_case_and_order_reach_an_http1_origin_as_sent() {
    let s = Setup::start(1).await;
    let proxy = &s.proxy;
    let raw = RawOrigin::start().await;
    let headers = "Host: {host}\r\nUser-Agent: Mozilla/5.0 (X11; Linux x86_64)\r\nAccept: text/html\r\n\
                   X-Custom-Header: one\r\naccept-language: en-GB\r\nsec-ch-ua: \"Chromium\";v=\"156\"\r\n\
                   Cookie: a=b\r\nConnection: keep-alive\r\n\r\n";
    let expected = [
        "Host",
        "User-Agent",
        "Accept",
        "X-Custom-Header",
        "accept-language",
        "sec-ch-ua",
        "Cookie",
        // The client's own hop header: to the origin, pinproxy's hop is the
        // client's.
        "Connection",
    ];

    // A plain proxy request and a request in a plain tunnel.
    let host = raw.addr.to_string();
    let mut tcp = tokio::net::TcpStream::connect(proxy.daemon.local_addr())
        .await
        .unwrap();
    tcp.write_all(
        format!(
            "GET http://{host}/plain HTTP/1.1\r\n{}",
            headers.replace("{host}", &host)
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    read_ok(&mut tcp).await;
    let (mut tunnel, head) = proxy.client.raw_connect(&host).await;
    assert!(head.starts_with("HTTP/1.1 200"));
    tunnel
        .write_all(
            format!(
                "GET /tunnel HTTP/1.1\r\n{}",
                headers.replace("{host}", &host)
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    read_ok(&mut tunnel).await;

    let heads = raw.heads();
    assert_eq!(heads.len(), 2);
    for head in heads {
        assert_eq!(header_names(&head), expected, "{head}");
    }
    s.stop().await;
}

/// Chromium sends an `http://` URL to an HTTP proxy with `Proxy-Connection:
/// keep-alive` where it writes `Connection: keep-alive` to an origin: the
/// origin gets that `Connection`, second, as Chromium sends it directly (it
/// got none, which says a proxy is on the path); curl's `Keep-Alive` goes,
/// as curl sends none directly. Inside a tunnel, where a
/// client writes to the origin itself, a `Proxy-Connection` is no one's
/// and goes.
#[tokio::test]
async fn a_plain_requests_proxy_connection_reaches_the_origin_as_its_connection() {
    let s = Setup::start(1).await;
    let raw = RawOrigin::start().await;
    let host = raw.addr.to_string();
    let head = format!(
        "Host: {host}\r\nProxy-Connection: keep-alive\r\nUpgrade-Insecure-Requests: 1\r\n\
         User-Agent: Mozilla/5.0 (X11; Linux x86_64)\r\n\r\n"
    );
    let mut tcp = tokio::net::TcpStream::connect(s.proxy.daemon.local_addr())
        .await
        .unwrap();
    tcp.write_all(format!("GET http://{host}/plain HTTP/1.1\r\n{head}").as_bytes())
        .await
        .unwrap();
    read_ok(&mut tcp).await;
    let (mut tunnel, answer) = s.proxy.client.raw_connect(&host).await;
    assert!(answer.starts_with("HTTP/1.1 200"));
    tunnel
        .write_all(format!("GET /tunnel HTTP/1.1\r\n{head}").as_bytes())
        .await
        .unwrap();
    read_ok(&mut tunnel).await;
    // curl writes `Proxy-Connection: Keep-Alive` last to a proxy, and no
    // `Connection` at all to an origin: it goes.
    let mut tcp = tokio::net::TcpStream::connect(s.proxy.daemon.local_addr())
        .await
        .unwrap();
    tcp.write_all(
        format!(
            "GET http://{host}/curl HTTP/1.1\r\nHost: {host}\r\nUser-Agent: curl/8.5.0\r\n\
             Accept: */*\r\nProxy-Connection: Keep-Alive\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    read_ok(&mut tcp).await;

    let heads = raw.heads();
    assert_eq!(heads.len(), 3);
    assert_eq!(
        header_names(&heads[2]),
        ["Host", "User-Agent", "Accept"],
        "{}",
        heads[2]
    );
    assert_eq!(
        header_names(&heads[0]),
        [
            "Host",
            "Connection",
            "Upgrade-Insecure-Requests",
            "User-Agent"
        ],
        "{}",
        heads[0]
    );
    assert!(
        heads[0].contains("\r\nConnection: keep-alive\r\n"),
        "{}",
        heads[0]
    );
    assert_eq!(
        header_names(&heads[1]),
        ["Host", "Upgrade-Insecure-Requests", "User-Agent"],
        "{}",
        heads[1]
    );
    s.stop().await;
}

/// An HTTP/1.0 request in a tunnel (no `Host`) reaches the origin with
/// its headers as it sent them, two `Cookie` lines as two, and the `Host`
/// HTTP/1.1 needs after them. It was taken for an HTTP/2 client's: `Host`
/// first and its cookies joined into one line.
#[tokio::test]
async fn an_http1_0_request_in_a_tunnel_keeps_its_headers_as_sent() {
    let s = Setup::start(1).await;
    let raw = RawOrigin::start().await;
    let host = raw.addr.to_string();
    let (mut tunnel, answer) = s.proxy.client.raw_connect(&host).await;
    assert!(answer.starts_with("HTTP/1.1 200"));
    tunnel
        .write_all(b"GET /ten HTTP/1.0\r\nUser-Agent: old/1\r\nCookie: a=1\r\nCookie: b=2\r\n\r\n")
        .await
        .unwrap();
    read_ok(&mut tunnel).await;
    let heads = raw.heads();
    assert_eq!(heads.len(), 1);
    assert_eq!(
        header_names(&heads[0]),
        ["User-Agent", "Cookie", "Cookie", "Host"],
        "{}",
        heads[0]
    );
    assert!(
        heads[0].contains("\r\nCookie: a=1\r\nCookie: b=2\r\n"),
        "{}",
        heads[0]
    );
    s.stop().await;
}

/// An HTTP/1.1 WebSocket upgrade reaches the origin with its headers where
/// the client put them and as it wrote them: `Connection` and `Upgrade`
/// are the upgrade's own, not pinproxy's.
#[tokio::test]
async fn a_websocket_upgrade_keeps_its_connection_and_upgrade_headers_as_sent() {
    let s = Setup::start(1).await;
    let raw = RawOrigin::start().await;
    let host = raw.addr.to_string();
    let (mut tunnel, head) = s.proxy.client.raw_connect(&host).await;
    assert!(head.starts_with("HTTP/1.1 200"));
    tunnel
        .write_all(
            format!(
                "GET /ws HTTP/1.1\r\nHost: {host}\r\nUser-Agent: Mozilla/5.0 (X11; Linux x86_64)\r\n\
                 Upgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Version: 13\r\n\
                 Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nCookie: a=b\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    // The raw origin answers `ok` with a 200, not a 101: no upgrade follows.
    read_ok(&mut tunnel).await;
    let heads = raw.heads();
    assert_eq!(heads.len(), 1);
    assert_eq!(
        header_names(&heads[0]),
        [
            "Host",
            "User-Agent",
            "Upgrade",
            "Connection",
            "Sec-WebSocket-Version",
            "Sec-WebSocket-Key",
            "Cookie"
        ],
        "{}",
        heads[0]
    );
    assert!(
        heads[0].contains("\r\nConnection: keep-alive, Upgrade\r\n")
            && heads[0].contains("\r\nUpgrade: websocket\r\n"),
        "{}",
        heads[0]
    );
    s.stop().await;
}

/// A chunked request body goes on chunked, its `Transfer-Encoding` where
/// the client put it and as it wrote it (hyper's own would come last).
#[tokio::test]
async fn a_chunked_request_keeps_its_transfer_encoding_where_it_was() {
    let s = Setup::start(1).await;
    let raw = RawOrigin::start().await;
    let host = raw.addr.to_string();
    let (mut tunnel, head) = s.proxy.client.raw_connect(&host).await;
    assert!(head.starts_with("HTTP/1.1 200"));
    tunnel
        .write_all(
            format!(
                "POST /upload HTTP/1.1\r\nHost: {host}\r\nUser-Agent: curl/7.88.1\r\nAccept: */*\r\n\
                 Transfer-Encoding: Chunked\r\nContent-Type: text/plain\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    read_ok(&mut tunnel).await;
    let heads = raw.heads();
    assert_eq!(heads.len(), 1);
    assert_eq!(
        header_names(&heads[0]),
        [
            "Host",
            "User-Agent",
            "Accept",
            "Transfer-Encoding",
            "Content-Type"
        ],
        "{}",
        heads[0]
    );
    assert!(
        heads[0].contains("\r\nTransfer-Encoding: Chunked\r\n"),
        "{}",
        heads[0]
    );
    s.stop().await;
}

/// A request's trailers lose what its head would (forwarding, hop-by-hop
/// and pinproxy's own headers), and any cookie: no stage reads a trailer,
/// so a credential there would leave unpinned. Its `Trailer` header names
/// only the fields that go on.
#[tokio::test]
async fn request_trailers_lose_what_the_head_would() {
    let s = Setup::start(1).await;
    let host = format!("localhost:{}", s.origin.http.port());
    let (mut tunnel, head) = s.proxy.client.raw_connect(&host).await;
    assert!(head.starts_with("HTTP/1.1 200"));
    tunnel
        .write_all(
            format!(
                "POST /echo-trailers HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\
                 Trailer: X-Checksum, X-Forwarded-For, X-Pinproxy-Session, Cookie, Forwarded\r\n\r\n\
                 5\r\nhello\r\n0\r\nX-Checksum: abc\r\nX-Forwarded-For: 203.0.113.7\r\n\
                 X-Pinproxy-Session: k1\r\nCookie: datadome=NeverPinned\r\nForwarded: for=203.0.113.7\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let answer = read_answer(&mut tunnel).await;
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(body, "x-checksum: abc\n", "{answer}");
    // Nor does the head's `Trailer` announce them (it would name
    // pinproxy's own header to the origin).
    let seen = s.origin.seen();
    let echo = seen.iter().find(|r| r.path == "/echo-trailers").unwrap();
    assert_eq!(echo.header("trailer"), ["X-Checksum"]);
    s.stop().await;
}

/// Reads one answer with a `Content-Length` (the connection stays open).
async fn read_answer(tcp: &mut tokio::net::TcpStream) -> String {
    let mut answer = Vec::new();
    loop {
        let text = String::from_utf8_lossy(&answer).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length = head
                .lines()
                .find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            if body.len() >= length {
                return text;
            }
        }
        let mut chunk = [0u8; 512];
        let n = tokio::time::timeout(std::time::Duration::from_secs(20), tcp.read(&mut chunk))
            .await
            .expect("an answer within 20 s")
            .unwrap();
        assert!(n > 0, "closed before the answer: {text}");
        answer.extend_from_slice(&chunk[..n]);
    }
}

/// Reads one `ok` answer (the connection to pinproxy stays open).
async fn read_ok(tcp: &mut tokio::net::TcpStream) {
    let mut answer = Vec::new();
    while !answer.ends_with(b"ok") {
        let mut chunk = [0u8; 512];
        let n = tcp.read(&mut chunk).await.unwrap();
        assert!(
            n > 0,
            "closed before the answer: {}",
            String::from_utf8_lossy(&answer)
        );
        answer.extend_from_slice(&chunk[..n]);
    }
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let s = Setup::start(1).await;
    let port = s.origin.https.port();
    let mut tls = s
        .proxy
        .client
        .tls_stream("localhost", port, &[b"http/1.1"])
        .await;
    let host = format!("localhost:{port}");
    let pipelined = format!(
        "GET /status?code=204 HTTP/1.1\r\nHost: {host}\r\n\r\n\
         GET /ip HTTP/1.1\r\nHost: {host}\r\n\r\n\
         GET /status?code=202 HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    );
    tls.write_all(pipelined.as_bytes()).await.unwrap();
    let mut answers = String::new();
    let _ = tls.read_to_string(&mut answers).await;
    let statuses: Vec<&str> = answers
        .match_indices("HTTP/1.1 ")
        .map(|(i, _)| &answers[i + 9..i + 12])
        .collect();
    assert_eq!(statuses, ["204", "200", "202"], "{answers}");
    assert!(answers.contains("127.0.0.2"));
    s.stop().await;
}

#[tokio::test]
async fn expect_100_continue_is_honoured() {
    let s = Setup::start(1).await;
    let port = s.origin.https.port();
    let mut tls = s
        .proxy
        .client
        .tls_stream("localhost", port, &[b"http/1.1"])
        .await;
    tls.write_all(
        format!("POST /sink HTTP/1.1\r\nHost: localhost:{port}\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut interim = [0u8; 25];
    tls.read_exact(&mut interim).await.unwrap();
    assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
    tls.write_all(b"hello").await.unwrap();
    let mut rest = vec![0u8; 4096];
    let n = tls.read(&mut rest).await.unwrap();
    let rest = String::from_utf8_lossy(&rest[..n]);
    assert!(
        rest.starts_with("HTTP/1.1 200") && rest.ends_with("5\n"),
        "{rest}"
    );
    s.stop().await;
}

/// An origin that refuses an upload before asking for it (`417`, as a
/// server refusing its size answers) never gets the body, and the client
/// is never told to send it: its first answer is the refusal, not a `100
/// Continue` of pinproxy's (hyper's server sends one as soon as the body
/// is read, and hyper's client reads it as soon as the head is written).
#[tokio::test]
async fn an_upload_the_origin_refuses_before_asking_for_it_is_never_asked_for() {
    let s = Setup::start(1).await;
    let refusing = RawOrigin::start_answering(
        b"HTTP/1.1 417 Expectation Failed\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
    )
    .await;
    let host = refusing.addr.to_string();
    let (mut tunnel, answer) = s.proxy.client.raw_connect(&host).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    send_expecting(&mut tunnel, &host, "/upload").await;
    let mut first = [0u8; 12];
    tunnel.read_exact(&mut first).await.unwrap();
    assert_eq!(
        &first,
        b"HTTP/1.1 417",
        "{}",
        String::from_utf8_lossy(&first)
    );
    s.stop().await;
}

/// An origin that asks for the body with its own `100 Continue` gets it,
/// and the client is told to send it.
#[tokio::test]
async fn an_upload_goes_once_the_origin_asks_for_it() {
    let s = Setup::start(1).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let host = listener.local_addr().unwrap().to_string();
    let origin = tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        read_head(&mut tcp).await;
        tcp.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            .await
            .unwrap();
        let mut body = [0u8; 5];
        tcp.read_exact(&mut body).await.unwrap();
        tcp.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        tcp.write_all(&body).await.unwrap();
    });
    let (mut tunnel, answer) = s.proxy.client.raw_connect(&host).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    send_expecting(&mut tunnel, &host, "/upload").await;
    let mut interim = [0u8; 25];
    tunnel.read_exact(&mut interim).await.unwrap();
    assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
    tunnel.write_all(b"hello").await.unwrap();
    let mut answer = Vec::new();
    while !answer.ends_with(b"hello") {
        let mut chunk = [0u8; 512];
        let n = tunnel.read(&mut chunk).await.unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&answer));
        answer.extend_from_slice(&chunk[..n]);
    }
    assert!(answer.starts_with(b"HTTP/1.1 200"));
    tokio::time::timeout(std::time::Duration::from_secs(10), origin)
        .await
        .unwrap()
        .unwrap();
    s.stop().await;
}

/// An origin that answers `200` at once and reads the body after it
/// (streaming) gets the body, as curl and .NET send it after a 2xx.
#[tokio::test]
async fn an_upload_answered_2xx_before_it_was_asked_for_still_goes() {
    let s = Setup::start(1).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let host = listener.local_addr().unwrap().to_string();
    let origin = tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        read_head(&mut tcp).await;
        tcp.write_all(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n",
        )
        .await
        .unwrap();
        let mut body = [0u8; 5];
        tcp.read_exact(&mut body).await.unwrap();
        tcp.write_all(b"5\r\n").await.unwrap();
        tcp.write_all(&body).await.unwrap();
        tcp.write_all(b"\r\n0\r\n\r\n").await.unwrap();
    });
    let (mut tunnel, answer) = s.proxy.client.raw_connect(&host).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    send_expecting(&mut tunnel, &host, "/stream").await;
    let mut first = [0u8; 12];
    tunnel.read_exact(&mut first).await.unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");
    tunnel.write_all(b"hello").await.unwrap();
    let echoed = async {
        let mut answer = Vec::new();
        while !answer.windows(5).any(|w| w == b"hello") {
            let mut chunk = [0u8; 512];
            let n = tunnel.read(&mut chunk).await.unwrap();
            assert!(n > 0, "closed: {}", String::from_utf8_lossy(&answer));
            answer.extend_from_slice(&chunk[..n]);
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), echoed)
        .await
        .expect("the body never reached the origin");
    tokio::time::timeout(std::time::Duration::from_secs(10), origin)
        .await
        .unwrap()
        .unwrap();
    s.stop().await;
}

/// Reads a request head off `tcp` (at most 8 KiB), byte by byte.
async fn read_head(tcp: &mut tokio::net::TcpStream) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 8192 {
        tcp.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
}

/// Writes the head of a 5-byte `PUT` to `path` on `host` that asks for a
/// `100 Continue` before its body.
async fn send_expecting(tunnel: &mut tokio::net::TcpStream, host: &str, path: &str) {
    tunnel
        .write_all(
            format!(
                "PUT {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 5\r\n\
                 Expect: 100-continue\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn head_204_and_304_have_no_body_over_both_protocols() {
    let s = Setup::start(1).await;
    let port = s.origin.https.port();
    let mut h1 = s.proxy.client.tunnel("localhost", port).await;
    let head = h1
        .send(
            h1.request("HEAD", "/bytes?n=1000")
                .body(Default::default())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!((head.status.as_u16(), head.body.len()), (200, 0));
    for code in ["204", "304"] {
        let reply = h1.get(&format!("/status?code={code}"), &[]).await;
        assert_eq!((reply.status.as_str(), reply.body.len()), (code, 0));
    }
    let mut h2 = s.proxy.client.tunnel_h2("localhost", port).await;
    for code in ["204", "304"] {
        let reply = h2.get(&format!("/status?code={code}"), &[]).await;
        assert_eq!((reply.status.as_str(), reply.body.len()), (code, 0));
    }
    s.stop().await;
}

/// Trailers reach the client, less any cookie set in them: capture reads
/// a response's head only, so such a cookie would reach the client unpinned.
#[tokio::test]
async fn response_trailers_reach_the_client_without_cookies() {
    let s = Setup::start(1).await;
    let port = s.origin.https.port();
    let names = |trailers: &http::HeaderMap| {
        trailers
            .keys()
            .map(|name| name.as_str().to_owned())
            .collect::<Vec<_>>()
    };
    // HTTP/2 end to end.
    let mut h2 = s.proxy.client.tunnel_h2("localhost", port).await;
    let reply = h2.get("/trailers", &[("te", "trailers")]).await;
    assert_eq!(reply.body, "payload");
    assert_eq!(names(&reply.trailers.unwrap()), ["x-checksum"]);
    // HTTP/1.1 chunked, for a client that asks for trailers.
    let mut h1 = s.proxy.client.tunnel("localhost", port).await;
    let reply = h1.get("/trailers", &[("te", "trailers")]).await;
    assert_eq!(reply.body, "payload");
    let trailers = reply.trailers.unwrap();
    assert_eq!(trailers["x-checksum"], "abc123");
    assert_eq!(names(&trailers), ["x-checksum"]);
    s.stop().await;
}

/// A WebSocket upgrade is the only protocol switch relayed: a second
/// `Upgrade` field (`h2c`, whose requests would then cross the relay
/// unread, cookies and all) makes the request no upgrade at all, and a
/// `101` that switches to anything but a WebSocket, or does not answer the
/// client's key, is refused instead of bridged.
#[tokio::test]
async fn no_protocol_but_a_websocket_is_switched_to() {
    let s = Setup::start(1).await;
    let h2c = RawOrigin::start_answering(
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n",
    )
    .await;

    // Two `Upgrade` fields: no upgrade; neither field reaches the origin.
    let reply = ask_to_switch(&s, &h2c, "Upgrade: websocket\r\nUpgrade: h2c\r\n").await;
    assert!(!reply.starts_with("HTTP/1.1 101"), "{reply}");
    let heads = h2c.heads();
    assert!(
        !heads[0].to_ascii_lowercase().contains("upgrade: "),
        "{}",
        heads[0]
    );

    // One `Upgrade: websocket`, answered by a switch to h2c: refused.
    let reply = ask_to_switch(&s, &h2c, "Upgrade: websocket\r\n").await;
    assert!(reply.starts_with("HTTP/1.1 502"), "{reply}");
    assert!(reply.contains("only a WebSocket is relayed"), "{reply}");

    // A switch to a WebSocket that does not answer the client's key.
    let wrong_key = RawOrigin::start_answering(
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Accept: bm90IHRoZSBhbnN3ZXI=\r\n\r\n",
    )
    .await;
    let reply = ask_to_switch(&s, &wrong_key, "Upgrade: websocket\r\n").await;
    assert!(reply.starts_with("HTTP/1.1 502"), "{reply}");
    assert!(reply.contains("Sec-WebSocket-Accept"), "{reply}");
    s.stop().await;
}

/// Sends a WebSocket upgrade with the `upgrades` header lines to `origin`
/// through a tunnel of `s`, and returns the head of the answer (waited
/// for 10 s at most).
async fn ask_to_switch(s: &Setup, origin: &RawOrigin, upgrades: &str) -> String {
    let host = origin.addr.to_string();
    let (mut tunnel, head) = s.proxy.client.raw_connect(&host).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let request = format!(
        "GET /ws HTTP/1.1\r\nHost: {host}\r\n{upgrades}Connection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
    );
    tunnel.write_all(request.as_bytes()).await.unwrap();
    let answer = support::client::read_head(&mut tunnel);
    tokio::time::timeout(std::time::Duration::from_secs(10), answer)
        .await
        .expect("an answer within 10 s")
}

/// The origin's answer goes back with the headers it has: pinproxy adds
/// no `Date` to one whose origin sent none (a page's script could tell it
/// apart from the same answer fetched directly).
#[tokio::test]
async fn an_answer_without_a_date_gets_none_added() {
    let s = Setup::start(1).await;
    let raw = RawOrigin::start().await;
    let mut tcp = tokio::net::TcpStream::connect(s.proxy.daemon.local_addr())
        .await
        .unwrap();
    tcp.write_all(
        format!(
            "GET http://{0}/plain HTTP/1.1\r\nHost: {0}\r\n\r\n",
            raw.addr
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let answer = read_answer(&mut tcp).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        !answer.to_ascii_lowercase().contains("\r\ndate:"),
        "{answer}"
    );
    s.stop().await;
}

/// `OPTIONS *` (the server as a whole) reaches the origin as `*`, not as
/// the resource `/`.
#[tokio::test]
async fn options_asterisk_reaches_the_origin_as_sent() {
    let s = Setup::start(1).await;
    let raw = RawOrigin::start().await;
    let host = raw.addr.to_string();
    let (mut tunnel, head) = s.proxy.client.raw_connect(&host).await;
    assert!(head.starts_with("HTTP/1.1 200"));
    tunnel
        .write_all(format!("OPTIONS * HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    read_ok(&mut tunnel).await;
    let heads = raw.heads();
    assert!(
        heads[0].starts_with("OPTIONS * HTTP/1.1\r\n"),
        "{}",
        heads[0]
    );
    s.stop().await;
}
