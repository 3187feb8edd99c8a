//! A fleet: several pinproxy processes (sidecars) sharing one real
//! redis-server agree on every pin, and fail closed while Redis is away.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support;

use std::collections::HashSet;
use std::net::IpAddr;
use std::time::Duration;

use pinproxy::config::Unavailable;
use support::origin::reported_peer;
use support::procs::{PinproxyProcess, RedisServer};
use support::{Jar, Origin, ProxyClient, Setup};

struct Fleet {
    origin: Origin,
    _exits: Vec<support::TestExit>,
    _redis: RedisServer,
    replicas: Vec<PinproxyProcess>,
    clients: Vec<ProxyClient>,
    _dirs: Vec<tempfile::TempDir>,
}

/// `n` pinproxy processes on one Redis, with three exits. They share the
/// CA (as sidecars would, from one secret) but not their data directories.
async fn fleet(n: usize) -> Fleet {
    fleet_with_exits(3, &vec![&[0, 1, 2][..]; n]).await
}

/// A replica per entry of `replica_exits` on one Redis, each configured
/// with those of `exits` test exits (by index), sharing one CA.
async fn fleet_with_exits(exits: usize, replica_exits: &[&[usize]]) -> Fleet {
    let routes: Vec<Vec<(usize, usize)>> = replica_exits
        .iter()
        .map(|indexes| indexes.iter().map(|&i| (i, i)).collect())
        .collect();
    let routes: Vec<&[(usize, usize)]> = routes.iter().map(Vec::as_slice).collect();
    fleet_with_routes(exits, &routes).await
}

/// Like [`fleet_with_exits`], each replica's exits given as pairs of test
/// exit indexes: the first names the exit's id, the second its URL (a
/// replica may give an id another exit's route).
async fn fleet_with_routes(exits: usize, replica_routes: &[&[(usize, usize)]]) -> Fleet {
    let origin = Origin::start().await;
    let (exits, exit_urls) = support::exits(exits).await;
    let redis = RedisServer::start().await;
    let shared = support::procs::shared_ca_dir();
    let mut replicas = Vec::new();
    let mut dirs = Vec::new();
    for routes in replica_routes {
        let dir = tempfile::tempdir().unwrap();
        for file in ["ca.pem", "ca-key.pem"] {
            std::fs::copy(shared.path().join(file), dir.path().join(file)).unwrap();
        }
        let mine: Vec<(String, String)> = routes
            .iter()
            .map(|&(id, url)| (exit_urls[id].0.clone(), exit_urls[url].1.clone()))
            .collect();
        let mut args = vec!["--store".to_owned(), redis.url()];
        args.extend(support::process_args(&origin, &mine));
        replicas.push(PinproxyProcess::start(dir.path(), &args).await);
        dirs.push(dir);
    }
    let clients = replicas
        .iter()
        .map(|r| ProxyClient::new(r.addr, &r.ca_pem()))
        .collect();
    dirs.push(shared);
    Fleet {
        origin,
        _exits: exits,
        _redis: redis,
        replicas,
        clients,
        _dirs: dirs,
    }
}

async fn clients_hop_replicas_request_by_request(n: usize) {
    let f = fleet(n).await;
    let port = f.origin.https.port();
    let mut tasks = Vec::new();
    for client_no in 0..12 {
        let clients = f.clients.clone();
        tasks.push(tokio::spawn(async move {
            let mut jar = Jar::default();
            let mut peers = HashSet::new();
            for step in 0..12 {
                // Each request to another replica than the last.
                let client = &clients[(client_no + step) % clients.len()];
                let path = match step {
                    0 => "/login",
                    6 => "/rotate",
                    _ => "/page",
                };
                let reply = client
                    .try_get("localhost", port, path, &mut jar)
                    .await
                    .unwrap();
                assert_eq!(
                    reply.status, 200,
                    "client {client_no} step {step}: {}",
                    reply.body
                );
                let peer = reported_peer(&reply.body).unwrap();
                if step > 0 {
                    support::origin::assert_carried(&reply, "datadome", peer);
                }
                peers.insert(peer);
            }
            assert_eq!(
                peers.len(),
                1,
                "client {client_no} changed exits across replicas: {peers:?}"
            );
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }

    // First sight of one cookie on every replica at once: one exit wins.
    // Every racer's tunnel is open before any sends (whether the requests
    // meet in the founding is still up to the scheduler).
    for round in 0..4 {
        let value = format!("fleet-race-{round}-{}", rand::random::<u64>());
        let mut racers = Vec::new();
        let start = std::sync::Arc::new(tokio::sync::Barrier::new(24));
        for racer in 0..24 {
            let client = f.clients[racer % f.clients.len()].clone();
            let (cookie, start) = (format!("datadome={value}"), start.clone());
            racers.push(tokio::spawn(async move {
                let mut conn = client.tunnel("localhost", port).await;
                tokio::time::timeout(Duration::from_secs(60), start.wait())
                    .await
                    .expect("a racer never reached the start");
                let reply = conn.get("/", &[("cookie", cookie.as_str())]).await;
                assert_eq!(reply.status, 200, "{}", reply.body);
                reported_peer(&reply.body).unwrap()
            }));
        }
        let mut peers: HashSet<IpAddr> = HashSet::new();
        for racer in racers {
            peers.insert(racer.await.unwrap());
        }
        assert_eq!(
            peers.len(),
            1,
            "round {round}: one cookie through {peers:?}"
        );
    }
    assert_eq!(f.origin.leaks(), vec![]);
    for replica in f.replicas {
        replica.kill9().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_on_one_redis_agree_on_every_pin() {
    clients_hop_replicas_request_by_request(2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_on_one_redis_agree_on_every_pin() {
    clients_hop_replicas_request_by_request(3).await;
}

/// Replicas whose exits differ for a while (a rolling change of the
/// configuration): a replica without an identity's exit answers its
/// requests `502 exit-missing` and leaves the identity to the replicas
/// that have the exit, instead of retiring it for the whole fleet.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_without_an_identitys_exit_leaves_it_to_the_others() {
    // Replica 0 has exit1 only, replica 1 exit2 only.
    let f = fleet_with_exits(2, &[&[0], &[1]]).await;
    let (origin, clients) = (&f.origin, &f.clients);
    let port = origin.https.port();

    let mut jar = Jar::default();
    let login = clients[0]
        .try_get("localhost", port, "/login", &mut jar)
        .await
        .unwrap();
    assert_eq!(login.status, 200, "{}", login.body);
    let peer = reported_peer(&login.body).unwrap();

    for _ in 0..2 {
        let elsewhere = clients[1]
            .try_get("localhost", port, "/page", &mut jar)
            .await
            .unwrap();
        assert_eq!(elsewhere.status, 502, "{}", elsewhere.body);
        let error = elsewhere.pinproxy_error().unwrap_or_default();
        assert!(error.starts_with("exit-missing"), "{error}");
    }
    // Still alive where its exit is.
    let home = clients[0]
        .try_get("localhost", port, "/page", &mut jar)
        .await
        .unwrap();
    support::origin::assert_carried(&home, "datadome", peer);
    assert!(origin.leaks().is_empty());
}

/// A fleet half-way through a rollout that moves exit `exit1` to another
/// route: each replica's book knows only its own routes, and to each the
/// other's identities on `exit1` were founded on a route it never had.
/// They carry that route, so each replica retires the other's identities
/// instead of sending their cookies out from another address; an identity
/// is used only on the route it was founded on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_that_disagree_on_an_exits_route_never_carry_each_others_identities() {
    // Both replicas name their only exit `exit1`: the old replica sends it
    // through test exit 0 (127.0.0.2), the rolled-out one through test
    // exit 1 (127.0.0.3).
    let f = fleet_with_routes(2, &[&[(0, 0)], &[(0, 1)]]).await;
    let (origin, clients) = (&f.origin, &f.clients);
    let port = origin.https.port();
    // Founded by the origin's Set-Cookie (`/login`) and by a request that
    // brings a cookie pinproxy never saw (`/page`).
    for (founder, other, founding) in [(0, 1, "/login"), (1, 0, "/login"), (0, 1, "/page")] {
        let mut jar = Jar::default();
        if founding == "/page" {
            jar.set("datadome", "brought-by-the-client");
        }
        let login = clients[founder]
            .try_get("localhost", port, founding, &mut jar)
            .await
            .unwrap();
        assert_eq!(login.status, 200, "{}", login.body);
        let peer = reported_peer(&login.body).unwrap();
        let seen = origin.seen().len();
        let elsewhere = clients[other]
            .try_get("localhost", port, "/page", &mut jar)
            .await
            .unwrap();
        assert_eq!(elsewhere.status, 502, "{}", elsewhere.body);
        let error = elsewhere.pinproxy_error().unwrap_or_default();
        assert!(
            error.starts_with("identity-retired") && error.contains("exit-changed"),
            "{error}"
        );
        assert_eq!(
            origin.seen().len(),
            seen,
            "the cookie never left from {peer}'s elsewhere"
        );
    }
    assert!(origin.leaks().is_empty(), "{:?}", origin.leaks());
}

/// The same fleet, and a cookie neither replica has seen brought to both
/// at once: both find it unknown, one founds its identity, the other loses
/// the founding and is handed the winner, founded on the other route. It
/// judges the winner as it would a pin it found (here: `exit-changed`)
/// instead of following it through its own route. A race: each round may
/// or may not meet it; no round may let a value out from two addresses.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_founding_lost_to_a_replica_on_another_route_is_not_followed() {
    let f = fleet_with_routes(2, &[&[(0, 0)], &[(0, 1)]]).await;
    let (origin, clients) = (&f.origin, &f.clients);
    let port = origin.https.port();
    for round in 0..24 {
        let cookie = format!("datadome=raced-{round}");
        // Tunnels (and their TLS) first, so the two requests leave together.
        let (mut a, mut b) = tokio::join!(
            clients[0].tunnel("localhost", port),
            clients[1].tunnel("localhost", port)
        );
        let headers = [("cookie", cookie.as_str())];
        let (to_a, to_b) = tokio::join!(a.get("/page", &headers), b.get("/page", &headers));
        for reply in [&to_a, &to_b] {
            if reply.status != 200 {
                let error = reply.pinproxy_error().unwrap_or_default();
                assert!(error.contains("exit-changed"), "round {round}: {error}");
            }
        }
    }
    // Each value reached the origin from one address at most.
    let mut peers: std::collections::HashMap<String, HashSet<IpAddr>> = Default::default();
    for seen in origin.seen() {
        for (name, value) in &seen.headers {
            if name == "cookie" && value.contains("raced-") {
                peers.entry(value.clone()).or_default().insert(seen.peer);
            }
        }
    }
    let twice: Vec<_> = peers.iter().filter(|(_, p)| p.len() > 1).collect();
    assert!(twice.is_empty(), "sent from two addresses: {twice:?}");
}

/// Sends requests until one gets `status` (bounded), returning it.
async fn until_status(s: &Setup, jar: &mut Jar, path: &str, status: u16) -> support::Reply {
    for _ in 0..200 {
        let reply = s.get(path, jar).await;
        if reply.status == status {
            return reply;
        }
        // The store's health is re-checked every 500 ms by a ping.
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    panic!("{path} never answered {status}");
}

async fn redis_outage(on_unavailable: Unavailable) {
    let mut redis = RedisServer::start().await;
    let url = redis.url();
    let s = Setup::start_with(3, move |c| {
        c.store.url = url;
        c.store.on_unavailable = on_unavailable;
    })
    .await;
    let (mut jar, peer) = s.login("/login").await;

    redis.stop().await;
    let seen = s.origin.seen().len();
    let refused = until_status(&s, &mut jar, "/page", 503).await;
    let error = refused.pinproxy_error().unwrap();
    assert!(error.starts_with("store-unavailable:"), "{error}");
    assert_eq!(
        s.origin.seen().len(),
        seen,
        "no request with a cookie left while Redis was away"
    );
    let cookieless = s.get_with("/", &[]).await;
    let login = s.get("/login", &mut Jar::default()).await;
    match on_unavailable {
        Unavailable::FailClosed => {
            assert_eq!(cookieless.status, 503);
            assert_eq!(login.status, 503);
        }
        Unavailable::FailOpen => {
            assert_eq!(
                cookieless.status, 200,
                "fail-open forwards credential-less requests"
            );
            // A response setting a tracked cookie cannot be pinned: refused.
            assert_eq!(login.status, 503);
            assert!(login.headers.get("set-cookie").is_none());
        }
    }

    redis.restart().await;
    let reply = until_status(&s, &mut jar, "/page", 200).await;
    assert_eq!(
        Setup::peer(&reply),
        Some(peer),
        "the pin survived the outage"
    );
    assert_eq!(s.origin.leaks(), vec![]);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_fails_closed_and_service_resumes() {
    redis_outage(Unavailable::FailClosed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_open_forwards_only_credential_less_requests_during_an_outage() {
    redis_outage(Unavailable::FailOpen).await;
}

/// One CA across a fleet: every replica reads the CA from one directory
/// (`--ca-dir`, in production a secret mounted into each replica) and none
/// makes a CA of its own; the pin-hashing key is agreed through Redis
/// (`NS:hash-key`, the first replica's wins). A client that trusts exactly
/// that one CA uses any replica, and its cookie keeps its exit across them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_serve_a_client_that_trusts_one_ca() {
    let origin = Origin::start().await;
    let (_exits, exit_urls) = support::exits(3).await;
    let redis = RedisServer::start().await;
    let ca_dir = support::procs::shared_ca_dir();
    let ca_pem = std::fs::read_to_string(ca_dir.path().join("ca.pem")).unwrap();

    let mut args = vec![
        "--store".to_owned(),
        redis.url(),
        "--ca-dir".to_owned(),
        ca_dir.path().display().to_string(),
    ];
    args.extend(support::process_args(&origin, &exit_urls));
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut replicas = Vec::new();
    for dir in &dirs {
        replicas.push(PinproxyProcess::start(dir.path(), &args).await);
    }
    // The client trusts the one CA, nothing else.
    let clients: Vec<ProxyClient> = replicas
        .iter()
        .map(|r| ProxyClient::new(r.addr, &ca_pem))
        .collect();
    let port = origin.https.port();
    let mut jar = Jar::default();
    let login = clients[0]
        .try_get("localhost", port, "/login", &mut jar)
        .await
        .unwrap();
    assert_eq!(login.status, 200, "{}", login.body);
    let exit = reported_peer(&login.body).unwrap();
    for round in 0..6 {
        let client = &clients[round % clients.len()];
        let reply = client
            .try_get("localhost", port, "/page", &mut jar)
            .await
            .unwrap_or_else(|e| panic!("replica {}: {e}", round % clients.len()));
        support::origin::assert_carried(&reply, "datadome", exit);
    }
    assert_eq!(origin.leaks(), vec![]);

    // No replica made a CA of its own; all hash cookies with one key.
    let keys: HashSet<Vec<u8>> = dirs
        .iter()
        .map(|dir| {
            assert!(!dir.path().join("ca.pem").exists());
            assert!(!dir.path().join("ca-key.pem").exists());
            std::fs::read(dir.path().join("fleet-pin-key")).unwrap()
        })
        .collect();
    assert_eq!(keys.len(), 1, "one pin-hashing key across the fleet");

    // A replica pointed at a CA directory that holds no CA refuses to start
    // rather than make one.
    let empty = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let mut run = tokio::process::Command::new(env!("CARGO_BIN_EXE_pinproxy"));
    run.args([
        "run",
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "off",
        "--store",
        "memory",
    ])
    .arg("--data-dir")
    .arg(data.path())
    .arg("--ca-dir")
    .arg(empty.path());
    let refused = support::procs::run_to_end(run, std::time::Duration::from_secs(30)).await;
    assert!(!refused.success());
    assert!(refused.stderr.contains("holds no CA"), "{refused:?}");
    assert!(!empty.path().join("ca.pem").exists());
    for replica in replicas {
        replica.kill9().await;
    }
}
