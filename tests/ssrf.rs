//! SSRF guards: pinproxy refuses to forward to itself (its proxy listener
//! or admin endpoint, a loop), and the direct exit refuses origins whose
//! resolved address is in `upstream.deny_ranges`, before connecting. Denied
//! addresses here are loopback ones listed on purpose (127.0.0.9, and
//! 127.0.0.1 reached by the name `localhost`); the default ranges
//! (link-local, the metadata address) are checked by the policy's unit test
//! in `src/upstream/dial/guard.rs`, with no socket.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use support::{error_of, Setup};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

/// A listener on `ip` that counts the connections it accepts (and closes
/// them): proof that nothing was sent to a denied address.
async fn counting_listener(ip: &str) -> (u16, Arc<AtomicUsize>) {
    let listener = TcpListener::bind((ip, 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            drop(tcp);
        }
    });
    (port, accepted)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_and_absolute_form_requests_for_pinproxy_itself_are_refused() {
    let s = Setup::start(1).await;
    let proxy = s.proxy.daemon.local_addr().port();
    let admin = s.proxy.daemon.admin_addr().unwrap().port();
    let client = &s.proxy.client;

    for target in [
        format!("127.0.0.1:{proxy}"),
        format!("localhost:{proxy}"),
        format!("localhost:{admin}"),
        format!("0.0.0.0:{admin}"),
    ] {
        let (_, head) = client.raw_connect(&target).await;
        assert!(head.starts_with("HTTP/1.1 403"), "CONNECT {target}: {head}");
        assert!(
            head.to_ascii_lowercase()
                .contains("x-pinproxy-error: proxy-loop: "),
            "CONNECT {target}: {head}"
        );
    }
    for (host, port) in [("127.0.0.1", proxy), ("localhost", admin)] {
        let reply = client.plain(host, port).await.get("/metrics", &[]).await;
        assert_eq!(
            reply.status, 403,
            "GET http://{host}:{port}/: {}",
            reply.body
        );
        assert!(error_of(&reply).starts_with("proxy-loop: "), "{reply:?}");
        assert!(reply.body.contains("loop"), "{}", reply.body);
    }
    // Nothing reached the exit for those, and real origins still work.
    assert!(
        s.exits[0].connects().is_empty(),
        "{:?}",
        s.exits[0].connects()
    );
    let reply = s.get_with("/", &[]).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    s.stop().await;
}

/// Hosts that C resolvers and browsers read as 127.0.0.1 but Rust's parser
/// does not (`2130706433`, `127.1`, `0x7f.0.0.1`), and an IPv6 literal
/// with a zone, are refused with 400 before anything is dialled: a proxy
/// exit on pinproxy's own host would reach its admin endpoint through
/// them, past the loop check. So are absolute-form ports the `http` crate
/// reads as none (`:99999`, `:8o`), which were dialled on port 80.
#[tokio::test]
async fn hosts_and_ports_only_some_parsers_read_are_refused() {
    let s = Setup::start(1).await;
    let admin = s.proxy.daemon.admin_addr().unwrap().port();
    let client = &s.proxy.client;
    for target in [
        format!("2130706433:{admin}"),
        format!("127.1:{admin}"),
        format!("0x7f.0.0.1:{admin}"),
        format!("[::1%25lo]:{admin}"),
    ] {
        let (_, head) = client.raw_connect(&target).await;
        assert!(head.starts_with("HTTP/1.1 400"), "CONNECT {target}: {head}");
    }
    let plain = client
        .plain("2130706433", admin)
        .await
        .get("/identities", &[])
        .await;
    assert_eq!(plain.status, 400, "{}", plain.body);
    for target in [
        "http://localhost:99999/",
        "http://localhost:8o/",
        "http://localhost:0/",
    ] {
        let mut tcp = tokio::net::TcpStream::connect(s.proxy.daemon.local_addr())
            .await
            .unwrap();
        tcp.write_all(format!("GET {target} HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let head = support::client::read_head(&mut tcp).await;
        assert!(head.starts_with("HTTP/1.1 400"), "GET {target}: {head}");
    }
    assert!(
        s.exits[0].connects().is_empty(),
        "{:?}",
        s.exits[0].connects()
    );
    let reply = s.get_with("/", &[]).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_direct_exit_refuses_a_denied_address_before_connecting() {
    let (port, accepted) = counting_listener("127.0.0.9").await;
    let s = Setup::builder()
        .exit_url("direct", "direct://")
        .config(|c| c.upstream.deny_ranges = vec!["127.0.0.9/32".into()])
        .start()
        .await;

    // Inside a MITM tunnel (the dial happens for the request) and as a plain
    // absolute-form request.
    let mut tunnel = s.proxy.client.tunnel("127.0.0.9", port).await;
    let reply = tunnel.get("/", &[]).await;
    assert_eq!(reply.status, 403, "{}", reply.body);
    let error = error_of(&reply);
    assert!(error.starts_with("address-denied: "), "{error}");
    assert!(error.contains("127.0.0.9/32"), "{error}");
    let reply = s
        .proxy
        .client
        .plain("127.0.0.9", port)
        .await
        .get("/", &[])
        .await;
    assert_eq!(reply.status, 403, "{}", reply.body);
    assert!(error_of(&reply).starts_with("address-denied: "));

    // Loopback outside the list is allowed: the origin answers.
    let reply = s.get_with("/", &[]).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        0,
        "a denied address was dialled"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_is_checked_on_the_address_it_resolves_to() {
    // The name `localhost` resolves to 127.0.0.1, which is denied: the
    // check is on the resolved address, so no name can rebind around it.
    let s = Setup::builder()
        .exit_url("direct", "direct://")
        .config(|c| c.upstream.deny_ranges = vec!["127.0.0.1".into()])
        .start()
        .await;
    let reply = s.get_with("/", &[]).await;
    assert_eq!(reply.status, 403, "{}", reply.body);
    let error = error_of(&reply);
    assert!(error.starts_with("address-denied: "), "{error}");
    assert!(error.contains("localhost"), "{error}");
    assert!(
        reply.body.contains("upstream.deny_ranges"),
        "the answer says what to change: {}",
        reply.body
    );
    assert!(s.origin.seen().is_empty(), "the origin was reached");
    s.stop().await;
}

/// The server of pinproxy's pin store is refused like its listeners: a
/// client that reached it (here through a tunnel `mitm.include` passes
/// through unread, on the direct exit) could rewrite any pin or wipe them.
/// A refusal by name (`localhost`) and by address; the server sees no
/// connection from pinproxy but its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pin_stores_server_is_refused() {
    let redis = support::procs::RedisServer::start().await;
    let url = redis.url();
    let s = Setup::builder()
        .exit_url("direct", "direct://")
        .config(move |c| {
            c.store.url = url;
            c.mitm.include = vec!["*.target.example".into()];
        })
        .start()
        .await;
    let client = &s.proxy.client;
    for target in [
        format!("127.0.0.1:{}", redis.port),
        format!("localhost:{}", redis.port),
    ] {
        let (mut tcp, head) = client.raw_connect(&target).await;
        assert!(head.starts_with("HTTP/1.1 403"), "CONNECT {target}: {head}");
        assert!(
            head.to_ascii_lowercase()
                .contains("x-pinproxy-error: proxy-loop: ")
                && head.contains("pin store"),
            "CONNECT {target}: {head}"
        );
        // Whatever the client sends next reaches no Redis.
        let _ = tcp.write_all(b"FLUSHALL\r\n").await;
    }
    let reply = client
        .plain("127.0.0.1", redis.port)
        .await
        .get("/", &[])
        .await;
    assert_eq!(reply.status, 403, "{}", reply.body);
    assert_eq!(error_of(&reply).split(':').next(), Some("proxy-loop"));
    s.stop().await;
}

/// A passed-through tunnel refused for the client's own doing (its target
/// is a denied address) is no operator's business at `warn`, as the same
/// refusal in an intercepted tunnel is not; a passthrough that fails for
/// the origin's doing still is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_passthrough_the_client_is_refused_is_not_warned_about() {
    use support::procs::{free_port, Lines, PinproxyProcess};
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("pinproxy.toml");
    std::fs::write(
        &config,
        "[upstream]\ndeny_ranges = [\"127.0.0.9/32\"]\n\
         [mitm]\nexclude = [\"127.0.0.9\", \"127.0.0.10\"]\n\
         [[exits]]\nid = \"direct\"\nurl = \"direct://\"\n",
    )
    .unwrap();
    let args = vec!["--config".to_owned(), config.display().to_string()];
    let lines = Lines::default();
    let proxy =
        PinproxyProcess::start_logging(dir.path(), &args, "warn", Some(lines.clone())).await;
    let client = support::ProxyClient::new(proxy.addr, &proxy.ca_pem());
    let (_, head) = client.raw_connect("127.0.0.9:443").await;
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    // Nothing listens there: the origin's doing, warned about.
    let closed = free_port();
    let (_, head) = client.raw_connect(&format!("127.0.0.10:{closed}")).await;
    assert!(head.starts_with("HTTP/1.1 502"), "{head}");
    let logged = |needle: &str| lines.lock().unwrap().iter().any(|l| l.contains(needle));
    for _ in 0..200 {
        if logged("127.0.0.10") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let text = lines.lock().unwrap().join("\n");
    assert!(text.contains("passthrough failed"), "{text}");
    assert!(!text.contains("127.0.0.9"), "{text}");
    proxy.kill9().await;
}
