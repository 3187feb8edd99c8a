//! Bodies stream through in both directions without being collected.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use bytes::Bytes;
use http_body_util::Full;
use support::Setup;

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
