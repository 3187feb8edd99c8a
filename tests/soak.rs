//! The soak: good and bad clients against pinproxy (the real binary) over
//! four tinyproxy exits egressing from 127.0.0.2..5, for a bounded time,
//! reporting resident memory over time, outcomes by kind and leaks (a
//! cookie presented from an exit other than the one that earned it, as the
//! test origin checks).
//!
//! Not part of the test suite's run (ignored): `scripts/soak.sh MINUTES`
//! runs it. Loopback only; every loop ends at the deadline.
//!
//! Good clients log in (an IP-bound cookie), browse with their jar, rotate
//! their cookie and start over with fresh jars (cookie churn). Bad clients
//! send smuggling attempts, dribble heads (slowloris), send oversized heads,
//! and close connections abruptly at every stage.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::client::read_head;
use support::procs::{PinproxyProcess, Tinyproxy};
use support::{Jar, Origin, ProxyClient};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Outcomes by kind, e.g. `good ok`, `good error: ...`, `smuggle 400`.
#[derive(Default, Clone)]
struct Tally(Arc<Mutex<BTreeMap<String, u64>>>);

impl Tally {
    fn count(&self, kind: impl Into<String>) {
        *self.0.lock().unwrap().entry(kind.into()).or_default() += 1;
    }
}

fn status_of(head: &str) -> String {
    head.split(' ').nth(1).unwrap_or("none").to_owned()
}

/// A short, stable label for an error text.
fn label(error: &str) -> String {
    let error = error.split(':').next().unwrap_or(error);
    error.chars().take(48).collect()
}

async fn good_client(client: ProxyClient, origin_port: u16, deadline: Instant, tally: Tally) {
    while Instant::now() < deadline {
        let mut jar = Jar::default();
        for step in 0..20 {
            if Instant::now() >= deadline {
                break;
            }
            let path = match step {
                0 => "/login",
                7 | 14 => "/rotate",
                _ => "/page",
            };
            let reply = tokio::time::timeout(
                Duration::from_secs(15),
                client.try_get("localhost", origin_port, path, &mut jar),
            )
            .await;
            match reply {
                Ok(Ok(reply)) if reply.status == 200 => tally.count("good: 200"),
                Ok(Ok(reply)) => tally.count(format!(
                    "good: {} {}",
                    reply.status.as_u16(),
                    reply
                        .pinproxy_error()
                        .map(|e| label(&e))
                        .unwrap_or_default()
                )),
                Ok(Err(e)) => tally.count(format!("good: error {}", label(&e))),
                Err(_) => tally.count("good: timeout"),
            }
        }
    }
}

/// One bad client, cycling through kinds of bad behaviour.
async fn bad_client(
    proxy: std::net::SocketAddr,
    origin_port: u16,
    deadline: Instant,
    tally: Tally,
    n: usize,
) {
    let mut round = n;
    while Instant::now() < deadline {
        round += 1;
        let Ok(mut tcp) = TcpStream::connect(proxy).await else {
            tally.count("bad: connect failed");
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let host = format!("localhost:{origin_port}");
        match round % 5 {
            0 => {
                let request = format!(
                    "POST http://{host}/smuggle HTTP/1.1\r\nHost: {host}\r\nContent-Length: 4\r\n\
                     Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n"
                );
                let _ = tcp.write_all(request.as_bytes()).await;
                let head = tokio::time::timeout(Duration::from_secs(10), read_head(&mut tcp)).await;
                tally.count(format!(
                    "smuggle: {}",
                    head.map_or("timeout".into(), |h| status_of(&h))
                ));
            }
            1 => {
                // Slowloris: a byte every 500 ms until cut off (or 30 s).
                let started = Instant::now();
                let mut cut = false;
                let _ = tcp.write_all(b"GET http://localhost/ HTTP/1.1\r\n").await;
                while Instant::now() < deadline && started.elapsed() < Duration::from_secs(30) {
                    if tcp.write_all(b"x").await.is_err() {
                        cut = true;
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                tally.count(if cut {
                    "slowloris: cut off"
                } else {
                    "slowloris: still open"
                });
            }
            2 => {
                let big = "a".repeat(300 * 1024);
                let request = format!(
                    "GET http://{host}/big HTTP/1.1\r\nHost: {host}\r\nX-Big: {big}\r\n\r\n"
                );
                let _ = tcp.write_all(request.as_bytes()).await;
                let head = tokio::time::timeout(Duration::from_secs(10), read_head(&mut tcp)).await;
                tally.count(format!(
                    "oversized: {}",
                    head.map_or("timeout".into(), |h| status_of(&h))
                ));
            }
            3 => {
                // Abrupt close mid-CONNECT, mid-ClientHello, mid-request.
                let bytes: &[u8] = match round % 3 {
                    0 => b"CONNECT localhost:443 HTT",
                    1 => b"GET http://localhost/ HTTP/1.1\r\nHost: local",
                    _ => b"CONNECT localhost:443 HTTP/1.1\r\n\r\n\x16\x03\x01\x02\x00\x01\x00",
                };
                let _ = tcp.write_all(bytes).await;
                drop(tcp);
                tally.count("abrupt close");
            }
            _ => {
                let _ = tcp.write_all(b"\x00\x01\x02 garbage \r\n\r\n").await;
                let mut buf = [0u8; 64];
                let read = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf)).await;
                tally.count(format!(
                    "garbage: {}",
                    match read {
                        Ok(Ok(n)) if n > 0 => status_of(&String::from_utf8_lossy(&buf[..n])),
                        Ok(_) => "closed".into(),
                        Err(_) => "timeout".into(),
                    }
                ));
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a soak of minutes: run it with scripts/soak.sh MINUTES"]
async fn soak() {
    let minutes: f64 = std::env::var("SOAK_MINUTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2.0);
    let good_clients: usize = std::env::var("SOAK_GOOD")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    let bad_clients: usize = std::env::var("SOAK_BAD")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40);
    let origin = Origin::start().await;
    let mut exits = Vec::new();
    let mut args = vec![
        "--upstream-ca".to_owned(),
        origin.pki.ca_file.display().to_string(),
    ];
    for n in 2..=5 {
        let exit = Tinyproxy::start(&format!("127.0.0.{n}")).await;
        args.push("--exit".into());
        args.push(format!("tiny{n}={}", exit.url()));
        exits.push(exit);
    }
    let data_dir = tempfile::tempdir().unwrap();
    let pinproxy = PinproxyProcess::start(data_dir.path(), &args).await;
    let client = ProxyClient::new(pinproxy.addr, &pinproxy.ca_pem());
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(minutes * 60.0);
    let tally = Tally::default();
    println!(
        "soak: {minutes} min, {good_clients} good clients, {bad_clients} bad clients, 4 tinyproxy exits (127.0.0.2-5)"
    );

    let mut tasks = Vec::new();
    for _ in 0..good_clients {
        tasks.push(tokio::spawn(good_client(
            client.clone(),
            origin.https.port(),
            deadline,
            tally.clone(),
        )));
    }
    for n in 0..bad_clients {
        tasks.push(tokio::spawn(bad_client(
            pinproxy.addr,
            origin.http.port(),
            deadline,
            tally.clone(),
            n,
        )));
    }
    let mut rss = Vec::new();
    while Instant::now() < deadline {
        let kib = pinproxy.rss_kib();
        let good_ok = tally
            .0
            .lock()
            .unwrap()
            .get("good: 200")
            .copied()
            .unwrap_or(0);
        println!(
            "t={:>5.0}s rss={:>7} KiB good requests ok={good_ok} leaks={}",
            started.elapsed().as_secs_f64(),
            kib,
            origin.leaks().len()
        );
        rss.push(kib);
        tokio::time::sleep_until((Instant::now() + Duration::from_secs(15)).min(deadline)).await;
    }
    for task in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(60), task).await;
    }
    // After the load: what the daemon holds once the clients are gone.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = pinproxy.rss_kib();
    let leaks = origin.leaks();
    println!("\noutcomes by kind:");
    for (kind, count) in tally.0.lock().unwrap().iter() {
        println!("  {count:>8}  {kind}");
    }
    println!(
        "rss KiB: first {} min {} max {} last {} after the clients left {after}; peak {}",
        rss.first().unwrap_or(&0),
        rss.iter().min().unwrap_or(&0),
        rss.iter().max().unwrap_or(&0),
        rss.last().unwrap_or(&0),
        pinproxy.peak_rss_kib()
    );
    println!(
        "origin saw {} requests; leaks (a cookie from the wrong exit): {}",
        origin.seen().len(),
        leaks.len()
    );
    assert!(leaks.is_empty(), "leaks: {leaks:?}");
    assert!(
        origin
            .seen()
            .iter()
            .all(|s| s.path != "/smuggled" && s.path != "/smuggle"),
        "a smuggled request reached the origin"
    );
}
