//! The fleet never leaks, even when Redis forgets: a wipe (a restart
//! without persistence, `FLUSHDB`) or a Sentinel failover to a replica that
//! missed the last writes is noticed at the next round trip, the replicas'
//! journals write back what was lost, a credential nobody can restore is
//! answered as retired (`store-lost`), and not one cookie leaves through an
//! exit it was not earned on. Real redis-server and Sentinel processes,
//! real pinproxy processes, loopback only.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support;

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use support::origin::reported_peer;
use support::procs::PinproxyProcess;
use support::redis_group::{sentinel_url, RedisCluster, RedisNode, Sentinel};
use support::{Jar, Origin, ProxyClient, TestExit};

/// Replicas of pinproxy on one store, with four exits.
struct Fleet {
    origin: Origin,
    _exits: Vec<TestExit>,
    replicas: Vec<Option<PinproxyProcess>>,
    clients: Vec<ProxyClient>,
    args: Vec<String>,
    dirs: Vec<tempfile::TempDir>,
}

impl Fleet {
    /// `n` replicas on the store at `store_url`, sharing one CA.
    async fn start(n: usize, store_url: &str, extra: &[&str]) -> Fleet {
        let origin = Origin::start().await;
        let (exits, exit_urls) = support::exits(4).await;
        let mut args = vec!["--store".to_owned(), store_url.to_owned()];
        args.extend(support::process_args(&origin, &exit_urls));
        let config = tempfile::tempdir().unwrap();
        let config_file = config.path().join("pinproxy.toml");
        std::fs::write(&config_file, extra.join("\n")).unwrap();
        args.extend(["--config".to_owned(), config_file.display().to_string()]);
        let shared = support::procs::shared_ca_dir();
        let mut replicas = Vec::new();
        let mut dirs = Vec::new();
        for _ in 0..n {
            let dir = tempfile::tempdir().unwrap();
            for file in ["ca.pem", "ca-key.pem"] {
                std::fs::copy(shared.path().join(file), dir.path().join(file)).unwrap();
            }
            replicas.push(Some(
                PinproxyProcess::start_with_admin(dir.path(), &args).await,
            ));
            dirs.push(dir);
        }
        let clients = replicas
            .iter()
            .flatten()
            .map(|r| ProxyClient::new(r.addr, &r.ca_pem()))
            .collect();
        dirs.push(shared);
        dirs.push(config);
        Fleet {
            origin,
            _exits: exits,
            replicas,
            clients,
            args,
            dirs,
        }
    }

    /// Replica `i`, which must be running.
    fn replica(&self, i: usize) -> &PinproxyProcess {
        self.replicas[i].as_ref().expect("replica running")
    }

    /// Replica `i`'s `GET /store` on the admin endpoint (the last loss it
    /// noticed, under `loss`).
    async fn store_view(&self, i: usize) -> serde_json::Value {
        serde_json::from_str(&self.replica(i).admin_get("/store").await).unwrap()
    }

    /// Stops replica `i` (SIGKILL); its data directory stays.
    async fn stop(&mut self, i: usize) {
        if let Some(replica) = self.replicas[i].take() {
            replica.kill9().await;
        }
    }

    /// Starts replica `i` again on its data directory.
    async fn restart(&mut self, i: usize) {
        let replica = PinproxyProcess::start_with_admin(self.dirs[i].path(), &self.args).await;
        self.clients[i] = ProxyClient::new(replica.addr, &replica.ca_pem());
        self.replicas[i] = Some(replica);
    }

    /// A request of `jar` through replica `replica`, on a fresh connection.
    /// While the replica has not found the store again (a failover in
    /// progress: 503 `store-unavailable`), it is retried, a bounded number
    /// of times; nothing leaves during that time.
    async fn get(&self, replica: usize, path: &str, jar: &mut Jar) -> support::Reply {
        let port = self.origin.https.port();
        let client = &self.clients[replica % self.clients.len()];
        let mut last = None;
        for _ in 0..100 {
            let reply = client.try_get("localhost", port, path, jar).await.unwrap();
            let unavailable = reply.status == 503
                && reply.pinproxy_error().is_some_and(|e| {
                    e.starts_with("store-unavailable") && !e.contains("wait_replicas")
                });
            if !unavailable {
                return reply;
            }
            last = reply.pinproxy_error();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("replica {replica} never found its store again: {last:?}");
    }
}

/// An identity the test drives: its jar and the exit it was earned on.
struct Client {
    jar: Jar,
    earned: IpAddr,
}

/// `n` identities, each logged in through replica `k mod replicas`.
async fn log_in(fleet: &Fleet, n: usize, replicas: &[usize]) -> Vec<Client> {
    let mut clients = Vec::new();
    for k in 0..n {
        let mut jar = Jar::default();
        let replica = replicas[k % replicas.len()];
        let reply = fleet.get(replica, "/login", &mut jar).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        clients.push(Client {
            jar,
            earned: reported_peer(&reply.body).unwrap(),
        });
    }
    clients
}

/// What became of requests after a loss.
#[derive(Debug, Default)]
struct Outcome {
    /// 200 from the exit the cookie was earned on.
    kept: usize,
    /// 502 `identity-retired` naming `store-lost`.
    lost: usize,
}

/// A round of pages for every client through every replica in turn;
/// panics on anything but the two outcomes a loss may have.
async fn pages(fleet: &Fleet, clients: &mut [Client], replicas: &[usize]) -> Outcome {
    let mut outcome = Outcome::default();
    for (k, client) in clients.iter_mut().enumerate() {
        for step in 0..replicas.len() {
            let replica = replicas[(k + step) % replicas.len()];
            let reply = fleet.get(replica, "/page", &mut client.jar).await;
            match reply.status.as_u16() {
                200 => {
                    support::origin::assert_carried(&reply, "datadome", client.earned);
                    outcome.kept += 1;
                }
                502 => {
                    let error = reply.pinproxy_error().unwrap_or_default();
                    assert!(
                        error.starts_with("identity-retired") && error.contains("store-lost"),
                        "client {k}: {error}"
                    );
                    outcome.lost += 1;
                }
                other => panic!(
                    "client {k} through replica {replica}: {other} {}",
                    reply.body
                ),
            }
        }
    }
    outcome
}

/// A pin Redis lost though its history looks whole (deleted here behind
/// the fleet's back: how a failover that lost a replica's newest pins
/// looks to it after a `kill -9`, its saved history predating the loss)
/// is noticed at its first lookup by the replica whose journal holds it:
/// a loss, restored from the journal, and the client keeps its exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pin_gone_from_redis_but_journaled_is_restored_not_made_anew() {
    let redis = RedisNode::volatile().await;
    let fleet = Fleet::start(1, &redis.url(), &["[store]", "hit_cache = \"0s\""]).await;
    let mut jar = Jar::default();
    let login = fleet.get(0, "/login", &mut jar).await;
    assert_eq!(login.status, 200, "{}", login.body);
    let peer = reported_peer(&login.body).unwrap();
    let pins = redis.keys("pinproxy:pin:*").await;
    assert_eq!(pins.len(), 1, "{pins:?}");
    let deleted: i64 = redis.command(&["DEL", &pins[0]]).await;
    assert_eq!(deleted, 1);

    for _ in 0..3 {
        let reply = fleet.get(0, "/page", &mut jar).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        assert_eq!(
            reported_peer(&reply.body),
            Some(peer),
            "the cookie kept its exit"
        );
    }
    assert!(fleet.origin.leaks().is_empty());
    let view = fleet.store_view(0).await;
    let what = view["loss"]["what"].as_str().unwrap_or_default().to_owned();
    assert!(what.contains("journal"), "{view}");
}

/// After a wipe: lost pins come back from the journals, so every client
/// keeps its exit; a cookie no journal holds is answered as lost; new
/// identities work; nothing leaks.
async fn survives_a_wipe(wipe: impl AsyncFnOnce(&mut RedisNode)) {
    let mut redis = RedisNode::volatile().await;
    let mut fleet = Fleet::start(3, &redis.url(), &[]).await;
    let all = [0, 1, 2];
    let mut clients = log_in(&fleet, 18, &all).await;
    assert_eq!(pages(&fleet, &mut clients, &all).await.kept, 18 * 3);

    // A cookie only replica 2 ever saw: replica 2 is down when Redis forgets,
    // so no journal that is up can restore it.
    let mut orphan = log_in(&fleet, 1, &[2]).await;
    fleet.stop(2).await;
    let tracked: Option<String> = redis.command(&["GET", "pinproxy:tracked-cookies"]).await;
    assert!(tracked.is_some(), "the fleet records its tracked cookies");

    wipe(&mut redis).await;

    let up = [0, 1];
    let after = pages(&fleet, &mut clients, &up).await;
    assert_eq!(after.lost, 0, "every journaled pin is restored");
    assert_eq!(after.kept, 18 * 2);
    // Put back before the pins (or a replica started next would judge a
    // change of them by nothing).
    let restored: Option<String> = redis.command(&["GET", "pinproxy:tracked-cookies"]).await;
    assert_eq!(
        restored, tracked,
        "the fleet's tracked cookies are restored"
    );
    let orphaned = pages(&fleet, &mut orphan, &up).await;
    assert_eq!(
        orphaned.lost, 2,
        "a cookie no live journal holds is answered as lost, never pinned anew"
    );

    // The loss shows in the admin endpoint and the metrics of each live
    // replica: what its journal restored and what it quarantined.
    let mut restored = 0;
    let mut quarantined = 0;
    for replica in up {
        let view = fleet.store_view(replica).await;
        assert_eq!(view["kind"], "redis");
        let loss = &view["loss"];
        assert!(
            loss.is_object(),
            "replica {replica} reports no loss: {view}"
        );
        restored += loss["restored"].as_u64().unwrap();
        quarantined += loss["quarantined"].as_u64().unwrap();
        let metrics = fleet.replica(replica).admin_get("/metrics").await;
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with("pinproxy_store_losses_total ") && !l.ends_with(" 0")),
            "{metrics}"
        );
    }
    assert!(restored >= 18, "the journals restored {restored} pins");
    assert!(quarantined >= 1, "the orphan was quarantined");

    // Replica 2 comes back: its journal restores its pins, but the orphan
    // was already answered as lost; it stays lost (a guess is never made).
    fleet.restart(2).await;
    let orphaned = pages(&fleet, &mut orphan, &all).await;
    assert_eq!(orphaned.kept, 0);

    // New identities pin and keep their exit as before.
    let mut fresh = log_in(&fleet, 6, &all).await;
    let outcome = pages(&fleet, &mut fresh, &all).await;
    assert_eq!(outcome.kept, 6 * 3);
    assert!(
        fleet.origin.leaks().is_empty(),
        "{:?}",
        fleet.origin.leaks()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redis_restarted_empty_leaks_nothing() {
    survives_a_wipe(async |redis: &mut RedisNode| redis.restart().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flushed_redis_leaks_nothing() {
    survives_a_wipe(async |redis: &mut RedisNode| {
        let _: () = redis.command(&["FLUSHDB"]).await;
    })
    .await;
}

/// The quarantine after a loss is the fleet's, not one process's: a
/// replica started during it with an empty data directory (a new pod: no
/// journal, no history of its own, so it sees no loss) still answers a
/// credential Redis lost as lost, and does not pin it anew. So does a
/// replica restarted during it, which finds the new epoch in its history.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_started_during_the_quarantine_keeps_it() {
    let redis = RedisNode::volatile().await;
    let mut fleet = Fleet::start(3, &redis.url(), &[]).await;
    // Only replica 1 ever saw the orphans; `others` went through replica 0.
    let mut orphans = log_in(&fleet, 2, &[1]).await;
    let mut others = log_in(&fleet, 2, &[0]).await;
    fleet.stop(1).await;
    fleet.stop(2).await;

    let _: () = redis.command(&["FLUSHDB"]).await;
    // Replica 0 notices at its next round trip and restores its own pins.
    assert_eq!(pages(&fleet, &mut others, &[0]).await.kept, 2);
    // Its restore, in the background, writes the quarantine's end first
    // (a bounded wait for it).
    let mut until: Option<u64> = None;
    for _ in 0..100 {
        until = redis.command(&["GET", "pinproxy:quarantine-until"]).await;
        if until.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(until.is_some(), "the quarantine's end is not in Redis");

    // Replica 2 comes back as a new pod: nothing but the CA.
    empty_data_dir(fleet.dirs[2].path(), &["ca.pem", "ca-key.pem"]);
    fleet.restart(2).await;
    let view = fleet.store_view(2).await;
    assert!(
        view["loss"].is_object(),
        "replica 2 reports no quarantine: {view}"
    );
    let outcome = pages(&fleet, &mut orphans[..1], &[2]).await;
    assert_eq!(
        outcome.lost, 1,
        "a replica started during the quarantine pinned a lost cookie anew"
    );
    // Restarted during it, replica 0 keeps it too (the other orphan: the
    // first is now a tombstone in Redis, lost whatever the quarantine).
    fleet.stop(0).await;
    fleet.restart(0).await;
    assert_eq!(pages(&fleet, &mut orphans[1..], &[0]).await.lost, 1);
    assert_eq!(pages(&fleet, &mut others, &[0, 2]).await.kept, 4);
    assert!(
        fleet.origin.leaks().is_empty(),
        "{:?}",
        fleet.origin.leaks()
    );
}

/// A running replica takes a quarantine another replica started, though it
/// saw no loss itself: one that founded the generation after a wipe nobody
/// had noticed yet (every replica with history cut off from Redis) would
/// otherwise go on pinning lost cookies anew once a replica with history
/// came back and found the loss. Here the quarantine's end is written
/// behind replica 0's back, as that replica's restore writes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_running_replica_joins_a_quarantine_another_replica_started() {
    let redis = RedisNode::volatile().await;
    let fleet = Fleet::start(1, &redis.url(), &[]).await;
    let mut earned = log_in(&fleet, 1, &[0]).await;
    assert!(fleet.store_view(0).await["loss"].is_null());

    let end = (std::time::SystemTime::now() + Duration::from_secs(600))
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        .to_string();
    let _: () = redis
        .command(&["SET", "pinproxy:quarantine-until", &end, "PX", "600000"])
        .await;
    // Its background check reads it within half a second (a bounded wait
    // for its report).
    let mut view = serde_json::Value::Null;
    for _ in 0..100 {
        view = fleet.store_view(0).await;
        if view["loss"].is_object() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        view["loss"]["what"]
            .as_str()
            .is_some_and(|what| what.contains("another replica")),
        "replica 0 never took the fleet's quarantine: {view}"
    );
    // A cookie Redis does not know is answered as lost, not pinned anew;
    // one Redis holds keeps its exit.
    let mut unknown = Client {
        jar: Jar::default(),
        earned: earned[0].earned,
    };
    unknown.jar.set("datadome", "NeverPinnedAnywhere");
    assert_eq!(
        pages(&fleet, std::slice::from_mut(&mut unknown), &[0])
            .await
            .lost,
        1
    );
    assert_eq!(pages(&fleet, &mut earned, &[0]).await.kept, 1);
    assert!(
        fleet.origin.leaks().is_empty(),
        "{:?}",
        fleet.origin.leaks()
    );
}

/// Removes everything in the data directory `dir` but the files `keep`:
/// what a new pod starts with.
fn empty_data_dir(dir: &std::path::Path, keep: &[&str]) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if keep.contains(&name.as_str()) {
            continue;
        }
        if path.is_dir() {
            std::fs::remove_dir_all(&path).unwrap();
        } else {
            std::fs::remove_file(&path).unwrap();
        }
    }
}

/// A new pod (no history, no journal) that finds Redis empty cannot tell a
/// new fleet from a wipe the running replicas have not noticed yet: it
/// waits for them to report a loss before it serves, and then keeps the
/// quarantine. So does a second pod started during that wait, which finds
/// the generation the first one founded. Had either served at once, it
/// would have pinned the cookies Redis lost anew, through whatever exit
/// rotation picked. Here replica 0 stays paused until both pods say they
/// wait (a pod that did not wait would be serving by then). The pods have
/// no copy of the fleet's pin-hashing key: they take the one replica 0's
/// restore writes back during the wait, so replica 0 finds no other key
/// and keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pods_started_on_a_wiped_redis_let_the_fleet_report_the_loss_first() {
    let redis = RedisNode::volatile().await;
    let mut fleet = Fleet::start(3, &redis.url(), &[]).await;
    // Rotation is round-robin from the first exit in each process: without
    // the first client, a pod that founded these cookies anew would send
    // each through another exit than the one it was earned on.
    let mut clients = log_in(&fleet, 5, &[0]).await;
    clients.remove(0);
    let pods = [1, 2];
    for pod in pods {
        fleet.stop(pod).await;
        empty_data_dir(fleet.dirs[pod].path(), &["ca.pem", "ca-key.pem"]);
    }

    fleet.replica(0).signal("STOP");
    let _: () = redis.command(&["FLUSHDB"]).await;
    // Both pods at once: the founding mark lives 3 s from the first's
    // founding, and a second started only once the first waits could come
    // after it on a loaded machine.
    let mut starting = Vec::new();
    for pod in pods {
        let record = support::procs::Lines::default();
        let task = tokio::spawn({
            let (dir, args, record) = (
                fleet.dirs[pod].path().to_owned(),
                fleet.args.clone(),
                record.clone(),
            );
            async move { PinproxyProcess::start_with_admin_logging(&dir, &args, "info", record).await }
        });
        starting.push((pod, task, record));
    }
    let mut all_waited = true;
    for (_, task, record) in &starting {
        let says_it_waits = || {
            record
                .lock()
                .unwrap()
                .iter()
                .any(|line| line.contains("waiting for them to report a loss"))
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while !says_it_waits() && !task.is_finished() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        all_waited &= says_it_waits();
    }
    // Not asserted: a pod may start after the founding mark another laid
    // has expired (3 s, on a loaded machine) and rightly not wait. Replica
    // 0 then stays stopped while the pods serve, and a pod that pinned a
    // lost cookie anew shows in `pages` (rotation sends it elsewhere).
    if all_waited {
        fleet.replica(0).signal("CONT");
    }
    for (pod, task, _) in starting {
        let started = task.await.unwrap();
        fleet.clients[pod] = ProxyClient::new(started.addr, &started.ca_pem());
        fleet.replicas[pod] = Some(started);
    }

    // Restored by replica 0's journal (kept), or answered as lost while
    // the restore runs: never pinned anew.
    let outcome = pages(&fleet, &mut clients, &pods).await;
    if !all_waited {
        fleet.replica(0).signal("CONT");
    }
    assert!(
        fleet.origin.leaks().is_empty(),
        "a pod pinned lost cookies anew: {:?}",
        fleet.origin.leaks()
    );
    assert_eq!(outcome.kept + outcome.lost, 4 * pods.len());
    let key_of = |i: usize| std::fs::read(fleet.dirs[i].path().join("fleet-pin-key")).unwrap();
    for pod in pods {
        let view = fleet.store_view(pod).await;
        assert!(
            view["loss"].is_object(),
            "pod {pod} did not join the quarantine: {view}"
        );
        assert!(
            key_of(pod) == key_of(0),
            "pod {pod} hashes with a key of its own"
        );
    }
    // All serve (a key conflict would have replica 0 refuse every request).
    let lost_clients = outcome.lost / pods.len();
    assert_eq!(
        pages(&fleet, &mut clients, &[0, 1, 2]).await.lost,
        lost_clients * 3
    );
}

/// After a wipe, Redis may come to hold another pin-hashing key than the
/// one the fleet hashes with (a replica started without the fleet's key, or
/// a `pinproxy store` command, set it first). Two keys would give one
/// cookie two pins, so a replica that finds another key when it writes its
/// own back refuses every request from then on, naming both keys by hash
/// (never the key), and no cookie leaves through another exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_foreign_hashing_key_after_a_wipe_stops_the_replica() {
    let redis = RedisNode::volatile().await;
    let mut fleet = Fleet::start(1, &redis.url(), &[]).await;
    let mut clients = log_in(&fleet, 2, &[0]).await;
    assert_eq!(pages(&fleet, &mut clients, &[0]).await.kept, 2);

    let foreign = "another-replica-s-32-byte-key-00";
    assert_eq!(foreign.len(), 32);
    let _: () = redis.command(&["FLUSHDB"]).await;
    let _: () = redis.command(&["SET", "pinproxy:hash-key", foreign]).await;

    // The next round trip shows the loss, and the restore finds the other
    // key. Until then a request keeps its exit; from then on it is refused.
    let port = fleet.origin.https.port();
    let mut refused = None;
    for _ in 0..100 {
        for client in &mut clients {
            let reply = fleet.clients[0]
                .try_get("localhost", port, "/page", &mut client.jar)
                .await
                .unwrap();
            match reply.status.as_u16() {
                200 => assert_eq!(reported_peer(&reply.body), Some(client.earned)),
                503 => refused = reply.pinproxy_error(),
                other => panic!("{other} {}", reply.body),
            }
        }
        if refused.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let refused = refused.expect("the replica never refused");
    let foreign_id = &blake3::hash(foreign.as_bytes()).to_hex()[..8];
    assert!(refused.starts_with("store-unavailable"), "{refused}");
    assert!(refused.contains("pin-hashing key conflict"), "{refused}");
    assert!(refused.contains(foreign_id), "{refused}");
    assert!(
        !refused.contains(foreign),
        "the key itself was shown: {refused}"
    );
    // It stays refused: no retry of the restore ends it.
    for client in &mut clients {
        let reply = fleet.clients[0]
            .try_get("localhost", port, "/page", &mut client.jar)
            .await
            .unwrap();
        assert_eq!(reply.status, 503, "{}", reply.body);
    }
    // The fleet stays in quarantine until an operator acts: replicas
    // hashing with the other key would otherwise pin anew, once theirs
    // ended, what this replica's journal could not write back.
    let left: i64 = redis.command(&["PTTL", "pinproxy:quarantine-until"]).await;
    assert!(
        left > 365 * 86_400_000,
        "the fleet's quarantine ends in {left} ms"
    );
    // Redis keeps the other key: the replica did not overwrite it.
    let held: String = redis.command(&["GET", "pinproxy:hash-key"]).await;
    assert_eq!(held, foreign);
    // Restarted, the replica does not adopt the other key either: it keeps
    // the fleet's key in its data directory, and refuses to start.
    fleet.stop(0).await;
    let stderr = support::procs::pinproxy_refuses_to_start(
        fleet.dirs[0].path(),
        &fleet.args,
        Duration::from_secs(60),
    )
    .await;
    assert!(stderr.contains("pin-hashing key"), "{stderr}");
    assert!(stderr.contains(foreign_id), "{stderr}");
    assert!(
        !stderr.contains(foreign),
        "the key itself was shown: {stderr}"
    );
    assert!(
        fleet.origin.leaks().is_empty(),
        "{:?}",
        fleet.origin.leaks()
    );
}

/// After a wipe, a replica whose restore comes late (it was down) finds a
/// cookie it journaled already answered as lost by another replica during
/// the quarantine: that cookie stays lost, but its identity's other
/// cookies, never in doubt, keep their exit (the restore used to retire
/// the whole identity, taking the tombstone for another replica's claim).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cookie_answered_as_lost_before_the_restore_leaves_its_identity_alive() {
    let redis = RedisNode::volatile().await;
    let mut fleet = Fleet::start(2, &redis.url(), &[]).await;
    // One identity with two tracked cookies, seen by replica 0 alone.
    let mut both = log_in(&fleet, 1, &[0]).await.remove(0);
    both.jar.set("cf_clearance", "ClearanceOfTheSameIdentity");
    let reply = fleet.get(0, "/page", &mut both.jar).await;
    support::origin::assert_carried(&reply, "datadome", both.earned);
    let datadome = both.jar.get("datadome").unwrap().to_owned();
    fleet.stop(0).await;

    let _: () = redis.command(&["FLUSHDB"]).await;
    // Replica 1 notices within half a second (a bounded wait for its
    // report), and answers the cookie it never saw as lost.
    let mut view = serde_json::Value::Null;
    for _ in 0..100 {
        view = fleet.store_view(1).await;
        if view["loss"].is_object() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(view["loss"].is_object(), "replica 1 saw no loss: {view}");
    let mut only_datadome = Client {
        jar: Jar::default(),
        earned: both.earned,
    };
    only_datadome.jar.set("datadome", &datadome);
    let outcome = pages(&fleet, std::slice::from_mut(&mut only_datadome), &[1]).await;
    assert_eq!(outcome.lost, 1);

    // Replica 0 comes back, notices, and restores its journal.
    fleet.restart(0).await;
    let mut view = serde_json::Value::Null;
    for _ in 0..200 {
        view = fleet.store_view(0).await;
        if view["loss"]["restore_done"] == serde_json::Value::Bool(true) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        view["loss"]["restore_done"],
        serde_json::Value::Bool(true),
        "replica 0 never finished its restore: {view}"
    );
    assert_eq!(view["loss"]["conflicts"], 0, "{view}");
    let mut only_clearance = Client {
        jar: Jar::default(),
        earned: both.earned,
    };
    only_clearance
        .jar
        .set("cf_clearance", "ClearanceOfTheSameIdentity");
    // (A value the client set itself: the origin signed none, so the exit
    // it left from is the check.)
    for replica in [0, 1] {
        let reply = fleet.get(replica, "/page", &mut only_clearance.jar).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        assert_eq!(reported_peer(&reply.body), Some(both.earned));
    }
    assert_eq!(
        pages(&fleet, std::slice::from_mut(&mut only_datadome), &[0, 1])
            .await
            .lost,
        2
    );
    assert!(
        fleet.origin.leaks().is_empty(),
        "{:?}",
        fleet.origin.leaks()
    );
}

/// An identity busy through one replica is idle in the journal of another
/// that saw it once; after a wipe both journals write it back, and it stays
/// live: a journal does not judge idleness from its own replica's uses, and
/// the restores keep the latest last use either holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_identity_busy_through_another_replica_survives_a_wipe() {
    let redis = RedisNode::volatile().await;
    // Idle after 6 s: the restore below stays far from it on a busy
    // machine, and the uses through replica 1 outlast it.
    let config = [
        "[identities]",
        "idle_timeout = \"6s\"",
        "sweep_interval = \"500ms\"",
    ];
    let fleet = Fleet::start(2, &redis.url(), &config).await;
    let mut clients = log_in(&fleet, 1, &[0]).await;
    // Longer than the idle timeout and a few of replica 0's sweeps, every
    // request through replica 1.
    let busy = tokio::time::Instant::now();
    for _ in 0..80 {
        assert_eq!(pages(&fleet, &mut clients, &[1]).await.kept, 1);
        if busy.elapsed() > Duration::from_secs(8) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    let _: () = redis.command(&["FLUSHDB"]).await;
    // Both replicas notice (the background check) and restore.
    for replica in [0, 1] {
        let mut done = false;
        for _ in 0..100 {
            let view = fleet.store_view(replica).await;
            if view["loss"]["restore_done"] == true {
                done = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(done, "replica {replica} never finished its restore");
    }
    let outcome = pages(&fleet, &mut clients, &[1, 0]).await;
    assert_eq!(outcome.kept, 2, "the busy identity was lost: {outcome:?}");
    assert!(
        fleet.origin.leaks().is_empty(),
        "{:?}",
        fleet.origin.leaks()
    );
}

/// A replica whose saved history cannot be read refuses to start, naming
/// the file and what to do: taken as no history, a loss while it was down
/// would go unnoticed and it would pin the cookies Redis forgot anew.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_whose_history_cannot_be_read_refuses_to_start() {
    let redis = RedisNode::volatile().await;
    let mut fleet = Fleet::start(1, &redis.url(), &[]).await;
    let mut clients = log_in(&fleet, 1, &[0]).await;
    assert_eq!(pages(&fleet, &mut clients, &[0]).await.kept, 1);
    fleet.stop(0).await;
    let history = fleet.dirs[0].path().join("redis-generation.json");
    assert!(history.exists(), "the replica saved no history");
    std::fs::write(&history, b"{\"namespace\":\"pinproxy\",\"ep").unwrap();
    let stderr = support::procs::pinproxy_refuses_to_start(
        fleet.dirs[0].path(),
        &fleet.args,
        Duration::from_secs(60),
    )
    .await;
    assert!(stderr.contains("redis-generation.json"), "{stderr}");
    assert!(stderr.contains("delete it"), "{stderr}");
    // Deleted, as the message says: the replica starts (without history).
    std::fs::remove_file(&history).unwrap();
    fleet.restart(0).await;
    assert_eq!(pages(&fleet, &mut clients, &[0]).await.kept, 1);
}

/// A `pinproxy store` command on a Redis namespace that holds no key yet
/// (a fresh or wiped one) reads the store with its own key and leaves the
/// fleet's key to the replicas: it sets none.
#[tokio::test]
async fn a_store_command_never_sets_the_fleet_s_key() {
    let redis = RedisNode::volatile().await;
    let dir = tempfile::tempdir().unwrap();
    let url = redis.url();
    support::procs::pinproxy_tool(&[
        "store".as_ref(),
        "stats".as_ref(),
        "--store".as_ref(),
        url.as_ref(),
        "--data-dir".as_ref(),
        dir.path().as_os_str(),
    ])
    .await;
    let held: Option<String> = redis.command(&["GET", "pinproxy:hash-key"]).await;
    assert_eq!(held, None);
}

/// A Sentinel group (primary, replica, three Sentinels) and a fleet on it.
struct Group {
    primary: RedisNode,
    replica: RedisNode,
    sentinels: Vec<Sentinel>,
}

impl Group {
    async fn start() -> Group {
        let primary = RedisNode::volatile().await;
        let replica = RedisNode::replica_of(primary.port).await;
        replica.wait_in_sync().await;
        let mut sentinels = Vec::new();
        for _ in 0..3 {
            sentinels.push(Sentinel::start(primary.port).await);
        }
        Group {
            primary,
            replica,
            sentinels,
        }
    }

    /// Stops the replica receiving writes: frozen (SIGSTOP), and cut off by
    /// the primary, so that not even its socket holds the writes made from
    /// now on when it runs again.
    async fn cut_off_replica(&self) {
        self.replica.freeze();
        let cut: i64 = self
            .primary
            .command(&["CLIENT", "KILL", "TYPE", "replica"])
            .await;
        assert_eq!(cut, 1, "the primary had no replica connection to cut");
    }

    /// Waits (bounded) until every Sentinel names `port` as the primary.
    async fn wait_for_primary(&self, port: u16) {
        for _ in 0..400 {
            let mut all = true;
            for sentinel in &self.sentinels {
                all &= sentinel.primary_port().await == Some(port);
            }
            if all {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the Sentinels never agreed on the primary {port}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failover_to_a_replica_that_missed_writes_leaks_nothing() {
    let mut group = Group::start().await;
    group.wait_for_primary(group.primary.port).await;
    let fleet = Fleet::start(3, &sentinel_url(&group.sentinels), &[]).await;
    let all = [0, 1, 2];
    let mut early = log_in(&fleet, 12, &all).await;
    assert_eq!(pages(&fleet, &mut early, &all).await.kept, 12 * 3);

    // The replica stops receiving writes; identities founded now exist only
    // on the primary (and in the replicas' journals).
    group.cut_off_replica().await;
    let mut late = log_in(&fleet, 12, &all).await;
    // The primary dies; the replica, behind, is made primary.
    group.primary.kill().await;
    group.replica.thaw();
    group.wait_for_primary(group.replica.port).await;

    let mut everyone: Vec<Client> = early.drain(..).chain(late.drain(..)).collect();
    let outcome = pages(&fleet, &mut everyone, &all).await;
    assert_eq!(
        outcome.lost, 0,
        "the journals restore what the replica missed"
    );
    assert_eq!(outcome.kept, 24 * 3);
    // It did miss them: every replica noticed the loss.
    for replica in all {
        let view = fleet.store_view(replica).await;
        assert!(view["loss"].is_object(), "replica {replica}: {view}");
    }
    let mut fresh = log_in(&fleet, 6, &all).await;
    assert_eq!(pages(&fleet, &mut fresh, &all).await.kept, 6 * 3);
    assert!(
        fleet.origin.leaks().is_empty(),
        "{:?}",
        fleet.origin.leaks()
    );
}

/// How replica 0 lives through the failover of
/// [`a_failover_losing_replica_0_s_pins_is_noticed`].
enum Through {
    /// Paused (SIGSTOP): it asks Redis nothing meanwhile.
    Paused,
    /// Down (SIGKILL) with the primary, once its history file counts its
    /// writes; restarted on its data directory afterwards.
    Down,
}

/// Replica 0 founds identities the Redis replica never receives; the
/// primary dies and the replica, behind, is made primary; replica 1 (down
/// meanwhile, so its history is older than what the new primary holds and
/// it sees no loss) founds twice as many identities as replica 0 lost, so
/// the shared write sequence passes what replica 0 saw. Replica 0 must
/// still notice that it lost pins (its own write count), and its journal
/// restore them: no cookie leaves through another exit.
async fn a_failover_losing_replica_0_s_pins_is_noticed(through: Through) {
    let mut group = Group::start().await;
    group.wait_for_primary(group.primary.port).await;
    let mut fleet = Fleet::start(2, &sentinel_url(&group.sentinels), &[]).await;
    let mut early = log_in(&fleet, 4, &[0, 1]).await;
    fleet.stop(1).await;
    group.cut_off_replica().await;
    let mut late = log_in(&fleet, 6, &[0]).await;
    match through {
        Through::Paused => fleet.replica(0).signal("STOP"),
        Through::Down => {
            wait_for_saved_write_count(&fleet, &group).await;
            fleet.stop(0).await;
        }
    }
    group.primary.kill().await;
    group.replica.thaw();
    group.wait_for_primary(group.replica.port).await;
    fleet.restart(1).await;
    let mut others = log_in(&fleet, 12, &[1]).await;
    match through {
        Through::Paused => fleet.replica(0).signal("CONT"),
        Through::Down => fleet.restart(0).await,
    }

    let outcome = pages(&fleet, &mut late, &[0]).await;
    assert_eq!(outcome.lost, 0, "replica 0's journal restores its pins");
    assert_eq!(outcome.kept, 6);
    let view = fleet.store_view(0).await;
    assert!(
        view["loss"]["what"]
            .as_str()
            .is_some_and(|w| w.contains("pin writes went back")),
        "{view}"
    );
    assert_eq!(pages(&fleet, &mut early, &[0, 1]).await.kept, 4 * 2);
    assert_eq!(pages(&fleet, &mut others, &[0, 1]).await.kept, 12 * 2);
    assert!(
        fleet.origin.leaks().is_empty(),
        "{:?}",
        fleet.origin.leaks()
    );
}

/// Waits (bounded) until replica 0's history file counts every write the
/// primary holds of it (the file is saved every few seconds).
async fn wait_for_saved_write_count(fleet: &Fleet, group: &Group) {
    let history = fleet.dirs[0].path().join("redis-generation.json");
    for _ in 0..200 {
        let kept: Option<serde_json::Value> = std::fs::read(&history)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok());
        if let Some(writer) = kept.as_ref().map(|k| &k["writer"]) {
            let key = format!(
                "pinproxy:writer:{:016x}",
                writer["id"].as_u64().unwrap_or_default()
            );
            let held: Option<u64> = group.primary.command(&["GET", &key]).await;
            if held.is_some() && writer["writes"].as_u64() == held {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("replica 0 never saved its write count");
}

/// A pinproxy replica paused through the failover notices, at its next
/// round trip, that the failover lost its pins (the shared sequence alone
/// shows no going back).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_loss_hidden_by_other_replicas_writes_is_still_noticed() {
    a_failover_losing_replica_0_s_pins_is_noticed(Through::Paused).await;
}

/// The write count outlives the process: a replica that went down with
/// the primary notices the loss of its pins when it comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_down_with_the_primary_notices_the_loss_when_back() {
    a_failover_losing_replica_0_s_pins_is_noticed(Through::Down).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_wait_a_new_pin_is_on_the_replica_before_its_response() {
    let primary = RedisNode::volatile().await;
    let replica = RedisNode::replica_of(primary.port).await;
    replica.wait_in_sync().await;
    let fleet = Fleet::start(
        1,
        &primary.url(),
        &["[store]", "wait_replicas = 1", "wait_timeout = \"2s\""],
    )
    .await;
    let mut pins_seen = HashMap::new();
    for round in 0..5 {
        let mut jar = Jar::default();
        let reply = fleet.get(0, "/login", &mut jar).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        // Read on the replica at once: no wait, no retry.
        let on_replica = replica.keys("pinproxy:pin:*").await.len();
        assert_eq!(on_replica, round + 1, "the pin reached the replica first");
        pins_seen.insert(round, on_replica);
    }
    let wait_timeouts = || async {
        let metrics = fleet.replica(0).admin_get("/metrics").await;
        metrics
            .lines()
            .find_map(|line| line.strip_prefix("pinproxy_store_wait_timeouts_total "))
            .and_then(|n| n.trim().parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no wait timeouts counted: {metrics}"))
    };
    assert_eq!(wait_timeouts().await, 0.0);

    // A retirement waits for the replica too (one a failover lost would
    // bring the identity back live): unacknowledged, it is counted, still
    // honoured here, and stored again until the replica holds it.
    let mut jar = Jar::default();
    let login = fleet.get(0, "/login", &mut jar).await;
    assert_eq!(login.status, 200, "{}", login.body);
    replica.freeze();
    let challenge = fleet.get(0, "/cf-challenge", &mut jar).await;
    assert_eq!(challenge.status, 403, "{}", challenge.body);
    let honoured = fleet.get(0, "/page", &mut jar).await;
    replica.thaw();
    assert_eq!(honoured.status, 502, "{}", honoured.body);
    assert!(wait_timeouts().await >= 1.0, "the retirement did not wait");

    // A replica that cannot acknowledge: the request fails closed.
    replica.freeze();
    let mut jar = Jar::default();
    let reply = fleet.get(0, "/login", &mut jar).await;
    replica.thaw();
    assert_eq!(reply.status, 503, "{}", reply.body);
    assert!(
        reply
            .pinproxy_error()
            .unwrap_or_default()
            .contains("wait_replicas"),
        "{:?}",
        reply.pinproxy_error()
    );
}

/// A fleet on a three-node Redis Cluster: every key of the namespace is in
/// one slot (the `{pinproxy}` hash tag), identities keep their exit, and
/// when that slot moves to another node (a resharding) the replicas follow
/// it: nothing leaks and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redis_cluster_serves_the_fleet_and_a_moved_slot_is_followed() {
    let cluster = RedisCluster::start().await;
    let fleet = Fleet::start(3, &cluster.url(), &[]).await;
    let all = [0, 1, 2];
    let mut clients = log_in(&fleet, 12, &all).await;
    assert_eq!(pages(&fleet, &mut clients, &all).await.kept, 12 * 3);

    let holders = cluster.holders("{pinproxy}:*").await;
    assert_eq!(
        holders.len(),
        1,
        "one node holds the namespace: {holders:?}"
    );
    assert!(
        cluster.holders("pinproxy:*").await.is_empty(),
        "every key is hash-tagged"
    );
    let (from, keys) = holders[0];
    assert!(keys >= 12 * 2, "{keys} keys");

    let slot = cluster.slot_of("{pinproxy}").await;
    let to = (from + 1) % 3;
    cluster.move_slot(slot, from, to).await;
    assert_eq!(cluster.holders("{pinproxy}:*").await, vec![(to, keys)]);

    let outcome = pages(&fleet, &mut clients, &all).await;
    assert_eq!(outcome.lost, 0, "a moved slot is not a loss");
    assert_eq!(outcome.kept, 12 * 3);
    let mut fresh = log_in(&fleet, 3, &all).await;
    assert_eq!(pages(&fleet, &mut fresh, &all).await.kept, 3 * 3);
    assert!(
        fleet.origin.leaks().is_empty(),
        "{:?}",
        fleet.origin.leaks()
    );
}
