//! Bodies stream through in both directions without being collected: whole
//! uploads in tunnels and plain requests, and a gibibyte each way in bounded
//! memory.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support;

use bytes::Bytes;
use http_body::Frame;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper_util::rt::TokioIo;
use support::procs::PinproxyProcess;
use support::{Origin, ProxyClient, Setup};

const GIB: usize = 1 << 30;

#[tokio::test]
async fn uploads_reach_the_origin_whole_in_tunnels_and_plain() {
    let s = Setup::start(2).await;
    let (origin, proxy) = (&s.origin, &s.proxy);
    let body = Bytes::from(vec![b'x'; 8 * 1024 * 1024 + 3]);

    for plain in [false, true] {
        let mut conn = if plain {
            proxy.client.plain("localhost", origin.http.port()).await
        } else {
            proxy.client.tunnel("localhost", origin.https.port()).await
        };
        for _ in 0..2 {
            let request = conn
                .request("POST", "/sink")
                .body(Full::new(body.clone()))
                .unwrap();
            let reply = conn.send(request).await.unwrap();
            assert_eq!(reply.status, 200);
            assert_eq!(reply.body.trim(), (8 * 1024 * 1024 + 3).to_string());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gibibyte_each_way_streams_through_in_bounded_memory() {
    let origin = Origin::start().await;
    let (_exits, exits) = support::exits(1).await;
    let dir = tempfile::tempdir().unwrap();
    let args = support::process_args(&origin, &exits);
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
