//! HTTP semantics carried faithfully: large bodies streamed in bounded
//! memory, 100-continue, HEAD, 204 and 304, trailers, pipelining, and header
//! case and order on HTTP/1.1.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use bytes::Bytes;
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use hyper_util::rt::TokioIo;
use support::procs::PinproxyProcess;
use support::raw_origin::{header_names, RawOrigin};
use support::{Origin, ProxyClient, Setup};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const GIB: usize = 1 << 30;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gibibyte_each_way_streams_through_in_bounded_memory() {
    let origin = Origin::start().await;
    let (_exits, exits) = support::exits(1).await;
    let dir = tempfile::tempdir().unwrap();
    let args = vec![
        "--upstream-ca".to_owned(),
        origin.pki.ca_file.display().to_string(),
        "--exit".to_owned(),
        format!("{}={}", exits[0].0, exits[0].1),
    ];
    let proxy = PinproxyProcess::start(dir.path(), &args).await;
    let client = ProxyClient::new(proxy.addr, &proxy.ca_pem());
    let port = origin.https.port();
    let idle_rss = proxy.peak_rss_kib();

    // Upload: 1 GiB generated as it is sent.
    let tls = client.tls_stream("localhost", port, &[b"http/1.1"]).await;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    static CHUNK: [u8; 64 * 1024] = [b'u'; 64 * 1024];
    let chunks = (0..GIB / CHUNK.len())
        .map(|_| Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from_static(&CHUNK))));
    let upload = http::Request::post("/sink")
        .header("host", format!("localhost:{port}"))
        .body(StreamBody::new(futures_util::stream::iter(chunks)))
        .unwrap();
    let response = sender.send_request(upload).await.unwrap();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(String::from_utf8_lossy(&body).trim(), GIB.to_string());
    let after_upload = proxy.peak_rss_kib();

    // Download: 1 GiB counted as it arrives.
    let tls = client.tls_stream("localhost", port, &[b"http/1.1"]).await;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake::<_, http_body_util::Empty<Bytes>>(TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let download = http::Request::get(format!("/bytes?n={GIB}"))
        .header("host", format!("localhost:{port}"))
        .body(http_body_util::Empty::new())
        .unwrap();
    let mut body = sender.send_request(download).await.unwrap().into_body();
    let mut received = 0usize;
    while let Some(frame) = body.frame().await {
        received += frame.unwrap().data_ref().map_or(0, |d| d.len());
    }
    assert_eq!(received, GIB);
    let peak = proxy.peak_rss_kib();
    eprintln!("pinproxy peak RSS: idle {idle_rss} KiB, after 1 GiB up {after_upload} KiB, after 1 GiB down {peak} KiB");
    assert!(
        peak < 96 * 1024,
        "peak RSS {peak} KiB: bodies are not streamed"
    );
    proxy.kill9().await;
}

#[tokio::test]
async fn header_case_and_order_reach_an_http1_origin_as_sent() {
    let origin = Origin::start().await;
    let raw = RawOrigin::start().await;
    let (_exits, exits) = support::exits(1).await;
    let proxy = support::Proxy::start(&exits, &origin, |_| {}).await;
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
    proxy.stop().await;
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

#[tokio::test]
async fn response_trailers_reach_the_client() {
    let s = Setup::start(1).await;
    let port = s.origin.https.port();
    // HTTP/2 end to end.
    let mut h2 = s.proxy.client.tunnel_h2("localhost", port).await;
    let reply = h2.get("/trailers", &[("te", "trailers")]).await;
    assert_eq!(reply.body, "payload");
    assert_eq!(reply.trailers.unwrap()["x-checksum"], "abc123");
    // HTTP/1.1 chunked, for a client that asks for trailers.
    let mut h1 = s.proxy.client.tunnel("localhost", port).await;
    let reply = h1.get("/trailers", &[("te", "trailers")]).await;
    assert_eq!(reply.body, "payload");
    assert_eq!(reply.trailers.unwrap()["x-checksum"], "abc123");
    s.stop().await;
}
