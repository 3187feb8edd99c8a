//! Pins outlive the process: `kill -9` in the middle of a concurrent run,
//! restarts, retirements and removed exits.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pinproxy::credential::PinHasher;
use support::procs::PinproxyProcess;
use support::{Jar, Origin, ProxyClient, Setup};
use tokio::sync::watch;

/// What one client saw: its jar, the exit address its cookies belong to,
/// and every cookie value it received before the crash.
#[derive(Default)]
struct ClientLog {
    jar: Jar,
    peer: Option<IpAddr>,
    received_before_crash: Vec<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_mid_run_loses_no_used_pin_and_sends_no_cookie_through_a_wrong_exit() {
    let origin = Origin::start().await;
    let (_exits, exits) = support::exits(3).await;
    let dir = tempfile::tempdir().unwrap();
    let args = support::process_args(&origin, &exits);
    let first = PinproxyProcess::start(dir.path(), &args).await;
    let ca = first.ca_pem();
    let (address, watch_address) = watch::channel(Some(first.addr));
    let crashed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let successes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let port = origin.https.port();

    let mut clients = Vec::new();
    for client_no in 0..12 {
        let log = Arc::new(Mutex::new(ClientLog::default()));
        let (mut addresses, ca, crashed, successes, log_for_task) = (
            watch_address.clone(),
            ca.clone(),
            crashed.clone(),
            successes.clone(),
            log.clone(),
        );
        let task = tokio::spawn(async move {
            let mut after_restart = 0;
            for step in 0..400 {
                // Stop once every client has run well past the restart.
                if after_restart >= 15 {
                    break;
                }
                let Some(addr) = *addresses.wait_for(Option::is_some).await.unwrap() else {
                    continue;
                };
                let client = ProxyClient::new(addr, &ca);
                let path = match step % 5 {
                    0 => "/rotate",
                    _ if step == 0 => "/login",
                    _ => "/page",
                };
                let path = if log_for_task.lock().unwrap().jar.get("datadome").is_none() {
                    "/login"
                } else {
                    path
                };
                let mut jar = log_for_task.lock().unwrap().jar.clone();
                let was_crashed = crashed.load(std::sync::atomic::Ordering::SeqCst);
                match client.try_get("localhost", port, path, &mut jar).await {
                    Ok(reply) => {
                        assert_eq!(
                            reply.status, 200,
                            "client {client_no} step {step}: {}",
                            reply.body
                        );
                        let peer = support::origin::reported_peer(&reply.body).unwrap();
                        if path != "/login" {
                            // A request with a cookie delivered it.
                            support::origin::assert_carried(&reply, "datadome", peer);
                        }
                        let mut log = log_for_task.lock().unwrap();
                        assert_eq!(
                            *log.peer.get_or_insert(peer),
                            peer,
                            "client {client_no} moved exits"
                        );
                        log.jar = jar;
                        if !was_crashed {
                            let value = log.jar.get("datadome").unwrap().to_owned();
                            log.received_before_crash.push(value);
                        } else {
                            after_restart += 1;
                        }
                        successes.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                    // Requests cut by the crash fail; the client tries again.
                    Err(_) => tokio::task::yield_now().await,
                }
            }
            after_restart
        });
        clients.push((log, task));
    }

    // Let the run get going, then kill -9 while requests are in flight.
    let mut progress = watch_address.clone();
    for _ in 0..2000 {
        if successes.load(std::sync::atomic::Ordering::SeqCst) >= 120 {
            break;
        }
        let _ = tokio::time::timeout(Duration::from_millis(5), progress.changed()).await;
    }
    crashed.store(true, std::sync::atomic::Ordering::SeqCst);
    address.send_replace(None);
    first.kill9().await;

    let second = PinproxyProcess::start(dir.path(), &args).await;
    address.send_replace(Some(second.addr));
    for (client_no, (_, task)) in clients.iter_mut().enumerate() {
        // The restarted daemon serves: a run whose every request after the
        // crash failed would show no leak and lose no pin.
        let after_restart = task.await.unwrap();
        assert!(
            after_restart >= 15,
            "client {client_no} got {after_restart} answers from the restarted daemon"
        );
    }
    assert_eq!(
        origin.leaks(),
        vec![],
        "a cookie was presented from an exit it was not earned on"
    );

    // Every cookie a client received before the crash is still pinned, to
    // its client's exit. Read the store offline once the daemon is gone.
    second.kill9().await;
    let (identity_exit, pin_identity) = parse_export(&export(dir.path()));
    let key: [u8; 32] = std::fs::read(dir.path().join("pin-key"))
        .unwrap()
        .try_into()
        .unwrap();
    let hasher = PinHasher::new(key);
    let mut checked = 0;
    for (log, _) in &clients {
        let log = log.lock().unwrap();
        let Some(peer) = log.peer else { continue };
        let expected_exit = format!(
            "exit{}",
            peer.to_string()
                .rsplit('.')
                .next()
                .unwrap()
                .parse::<u8>()
                .unwrap()
                - 1
        );
        for value in &log.received_before_crash {
            let hash = hasher.cookie("datadome", value).to_hex();
            let identity = pin_identity
                .get(&hash)
                .unwrap_or_else(|| panic!("pin {hash} lost in the crash"));
            assert_eq!(identity_exit[identity], expected_exit);
            checked += 1;
        }
    }
    assert!(checked >= 100, "only {checked} pins were checked");
}

/// An identity founded by a request learns its egress address from the
/// tunnel that carried its first answer; every later tunnel is checked
/// against it. That address is on disk before the answer reaches the
/// client: a `kill -9` right after it does not lose it (the lazy write of
/// the identity's use comes up to half a second later).
#[tokio::test]
async fn an_identitys_first_egress_address_survives_a_kill_9_right_after_its_answer() {
    let origin = Origin::start().await;
    let exit = support::exit::TestExit::start_gateway(support::exit::Gateway::new(
        &["127.0.0.2"],
        None,
        0.0,
        1,
    ))
    .await;
    let dir = tempfile::tempdir().unwrap();
    let config_dir = tempfile::tempdir().unwrap();
    let config = config_dir.path().join("pinproxy.toml");
    let url = exit
        .url()
        .replacen("http://", "http://customer-acme-session-{session}:pw@", 1);
    std::fs::write(
        &config,
        format!("[[exits]]\nid = \"gate\"\nurl = \"{url}\"\nexit_ip_header = \"X-Exit-IP\"\n"),
    )
    .unwrap();
    let args = vec![
        "--upstream-ca".to_owned(),
        origin.pki.ca_file.display().to_string(),
        "--config".to_owned(),
        config.display().to_string(),
    ];
    let daemon = PinproxyProcess::start(dir.path(), &args).await;
    let client = ProxyClient::new(daemon.addr, &daemon.ca_pem());
    // A cookie pinproxy has never seen founds the identity as the request
    // is routed, before any tunnel has stated an address.
    let mut jar = Jar::default();
    jar.set("datadome", "FirstSeenOnARequest-3c1d");
    let reply = client
        .try_get("localhost", origin.https.port(), "/page", &mut jar)
        .await
        .unwrap();
    assert_eq!(reply.status, 200, "{}", reply.body);
    daemon.kill9().await;

    let text = export(dir.path());
    let identities: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|line| {
            serde_json::from_str::<serde_json::Value>(line)
                .unwrap()
                .get("identity")
                .cloned()
        })
        .collect();
    assert_eq!(identities.len(), 1, "{text}");
    assert_eq!(identities[0]["egress_ip"], "127.0.0.2", "{text}");
}

/// What `pinproxy store export` prints of the store in `data_dir` (the
/// daemon gone), a JSON record a line.
fn export(data_dir: &std::path::Path) -> String {
    let export = std::process::Command::new(env!("CARGO_BIN_EXE_pinproxy"))
        .args(["store", "export", "--data-dir"])
        .arg(data_dir)
        .output()
        .unwrap();
    assert!(
        export.status.success(),
        "{}",
        String::from_utf8_lossy(&export.stderr)
    );
    String::from_utf8(export.stdout).unwrap()
}

/// Maps of identity → exit and pin hash → identity from an export.
fn parse_export(text: &str) -> (HashMap<String, String>, HashMap<String, String>) {
    let mut identity_exit = HashMap::new();
    let mut pin_identity = HashMap::new();
    for line in text.lines() {
        let record: serde_json::Value = serde_json::from_str(line).unwrap();
        if let Some(identity) = record.get("identity") {
            identity_exit.insert(
                identity["id"].as_str().unwrap().to_owned(),
                identity["exit"].as_str().unwrap().to_owned(),
            );
        }
        if let Some(pin) = record.get("pin") {
            pin_identity.insert(
                pin["key"].as_str().unwrap().to_owned(),
                pin["pin"]["identity"].as_str().unwrap().to_owned(),
            );
        }
    }
    (identity_exit, pin_identity)
}

#[tokio::test]
async fn pins_and_retirements_survive_a_restart() {
    let s = Setup::start(3).await;
    let (mut kept, kept_peer) = s.login("/login").await;
    let (mut invalidated, _) = s.login("/login").await;
    assert_eq!(s.get("/challenge", &mut invalidated).await.status, 403);

    let s = s.restart().await;
    let reply = s.get("/page", &mut kept).await;
    assert_eq!(
        (reply.status.as_u16(), Setup::peer(&reply)),
        (200, Some(kept_peer))
    );
    let reply = s.get("/page", &mut invalidated).await;
    assert_eq!(
        reply.status, 502,
        "a retirement is not forgotten by a restart"
    );
    assert!(reply
        .pinproxy_error()
        .unwrap()
        .contains("datadome-challenge"));
    assert!(s.origin.leaks().is_empty());
    s.stop().await;
}

#[tokio::test]
async fn identities_of_an_exit_removed_from_the_config_retire() {
    let s = Setup::start(3).await;
    let (mut jar, peer) = s.login("/login").await;
    let gone = s.exit_of(peer);
    let gone_id = s.proxy.config.exits[gone].id.clone();

    let s = s
        .restart_with(|c| {
            c.exits.remove(gone);
        })
        .await;
    let seen = s.origin.seen().len();
    let reply = s.get("/page", &mut jar).await;
    assert_eq!(reply.status, 502);
    let error = reply.pinproxy_error().unwrap();
    assert!(
        error.contains("exit-removed") && error.contains(&gone_id),
        "{error}"
    );
    assert_eq!(
        s.origin.seen().len(),
        seen,
        "the cookie did not go out through another exit"
    );
    s.stop().await;
}

#[tokio::test]
async fn a_running_daemon_keeps_the_store_to_itself() {
    let s = Setup::start(1).await;
    let dir = s.proxy.data_dir.path().to_owned();
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_pinproxy"))
        .args(["store", "stats", "--data-dir"])
        .arg(&dir)
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("in use by another pinproxy"), "{stderr}");
    let _kept = s.proxy.stop_keeping_data_dir().await;
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_pinproxy"))
        .args(["store", "stats", "--data-dir"])
        .arg(&dir)
        .output()
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains("pin-hashing key id:"));
    let _: Option<SocketAddr> = None;
}

/// A store whose pin key went missing (a backup or a copy that left it
/// out) or was replaced is refused, by the daemon and by the tools alike,
/// and no new key is made beside it: hashed with a new key, every stored
/// cookie would look new and could leave through any exit.
#[tokio::test]
async fn a_store_without_its_pin_key_is_refused_not_hashed_anew() {
    let s = Setup::start(2).await;
    let (_jar, _peer) = s.login("/login").await;
    let config = s.proxy.config.clone();
    let dir = s.proxy.stop_keeping_data_dir().await;
    let key = dir.path().join(pinproxy::credential::PIN_KEY_FILE);
    let kept_key = std::fs::read(&key).unwrap();
    std::fs::remove_file(&key).unwrap();

    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_pinproxy"))
        .args(["store", "stats", "--data-dir"])
        .arg(dir.path())
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("pin-key is missing") && stderr.contains("restore"),
        "{stderr}"
    );
    assert!(!key.exists(), "a tool made no key beside the store");

    let refused = pinproxy::daemon::Daemon::start(&config)
        .await
        .map(drop)
        .expect_err("the daemon refuses to start")
        .to_string();
    assert!(refused.contains("pin-key is missing"), "{refused}");
    assert!(!key.exists(), "the daemon made no key beside the store");

    PinHasher::create(dir.path()).unwrap();
    let refused = pinproxy::daemon::Daemon::start(&config)
        .await
        .map(drop)
        .expect_err("the daemon refuses a foreign key")
        .to_string();
    assert!(refused.contains("hashed with pin key"), "{refused}");

    std::fs::write(&key, &kept_key).unwrap();
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let daemon = pinproxy::daemon::Daemon::start(&config).await.unwrap();
    daemon.shutdown(Duration::from_secs(5)).await;
}

/// `store bench` writes its pins durably into an empty embedded store and
/// refuses to run again on a store that holds anything.
#[tokio::test]
async fn store_bench_measures_an_empty_store_only() {
    let dir = tempfile::tempdir().unwrap();
    let bench = || {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_pinproxy"))
            .args(["store", "bench", "--pins", "40", "--concurrency", "4"])
            .arg("--data-dir")
            .arg(dir.path())
            .output()
    };
    let output = bench().await.unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["pins"], 40);
    assert!(report["p99_us"].as_f64().unwrap() > 0.0);

    let stats = tokio::process::Command::new(env!("CARGO_BIN_EXE_pinproxy"))
        .args(["store", "stats", "--data-dir"])
        .arg(dir.path())
        .output()
        .await
        .unwrap();
    assert!(String::from_utf8_lossy(&stats.stdout).contains("pins: 40"));

    let again = bench().await.unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("holds 40 pins"));
}

/// `pinproxy store ARGS...` run to its end: (success, stdout, stderr).
fn store_tool(args: &[&std::ffi::OsStr]) -> (bool, String, String) {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_pinproxy"))
        .arg("store")
        .args(args)
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// The README's move from one embedded instance to a Redis fleet: export,
/// import into a Redis that has never been used, start a replica with a
/// data directory of its own. The import makes the export's key the
/// namespace's, so the replica hashes with it and the cookie keeps its
/// exit (a replica that set its own key would miss every imported pin).
/// The export is its owner's alone and ends with a line that counts it: a
/// copy cut short is refused before anything is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pins_moved_into_a_new_redis_are_found_by_a_replica_started_anew() {
    use std::ffi::OsStr;
    use std::os::unix::fs::PermissionsExt as _;
    let origin = Origin::start().await;
    let (_exits, exits) = support::exits(4).await;
    let source = tempfile::tempdir().unwrap();
    let args = support::process_args(&origin, &exits);
    let daemon = PinproxyProcess::start(source.path(), &args).await;
    let client = ProxyClient::new(daemon.addr, &daemon.ca_pem());
    let mut jar = Jar::default();
    let login = client
        .try_get("localhost", origin.https.port(), "/login", &mut jar)
        .await
        .unwrap();
    let peer = support::origin::reported_peer(&login.body).unwrap();
    daemon.kill9().await;

    let files = tempfile::tempdir().unwrap();
    let export = files.path().join("pins.jsonl");
    fn data_dir(dir: &std::path::Path) -> [&OsStr; 2] {
        [OsStr::new("--data-dir"), dir.as_os_str()]
    }
    let (ok, _, stderr) = store_tool(
        &[
            &[OsStr::new("export"), export.as_os_str()][..],
            &data_dir(source.path()),
        ]
        .concat(),
    );
    assert!(ok, "{stderr}");
    let mode = std::fs::metadata(&export).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the export is its owner's alone");
    let text = std::fs::read_to_string(&export).unwrap();
    assert!(
        text.trim_end().ends_with("}}") && text.contains("\"end\":{"),
        "{text}"
    );

    let redis = support::redis_group::RedisNode::volatile().await;
    let url = redis.url();
    let store = [OsStr::new("--store"), OsStr::new(&url)];
    // A copy without its last line is refused whole.
    let cut = files.path().join("cut.jsonl");
    let lines: Vec<&str> = text.lines().collect();
    std::fs::write(&cut, lines[..lines.len() - 1].join("\n")).unwrap();
    let (ok, _, stderr) = store_tool(
        &[
            &[OsStr::new("import"), cut.as_os_str()][..],
            &data_dir(source.path()),
            &store,
        ]
        .concat(),
    );
    assert!(!ok && stderr.contains("cut short"), "{stderr}");
    assert_eq!(
        redis.keys("*").await,
        Vec::<String>::new(),
        "nothing was written"
    );

    let (ok, _, stderr) = store_tool(
        &[
            &[OsStr::new("import"), export.as_os_str()][..],
            &data_dir(source.path()),
            &store,
        ]
        .concat(),
    );
    assert!(ok, "{stderr}");

    // A replica with a data directory of its own (and the same CA).
    let replica_dir = tempfile::tempdir().unwrap();
    for file in ["ca.pem", "ca-key.pem"] {
        std::fs::copy(source.path().join(file), replica_dir.path().join(file)).unwrap();
    }
    let mut replica_args = vec!["--store".to_owned(), url.clone()];
    replica_args.extend(args.iter().cloned());
    let replica = PinproxyProcess::start(replica_dir.path(), &replica_args).await;
    let client = ProxyClient::new(replica.addr, &replica.ca_pem());
    for _ in 0..4 {
        let reply = client
            .try_get("localhost", origin.https.port(), "/page", &mut jar)
            .await
            .unwrap();
        assert_eq!(reply.status, 200, "{}", reply.body);
        assert_eq!(support::origin::reported_peer(&reply.body), Some(peer));
    }
    assert_eq!(origin.leaks(), vec![]);
    let (_, source_stats, _) =
        store_tool(&[&[OsStr::new("stats")][..], &data_dir(source.path())].concat());
    let (_, fleet_stats, _) = store_tool(
        &[
            &[OsStr::new("stats")][..],
            &data_dir(replica_dir.path()),
            &store,
        ]
        .concat(),
    );
    let key_line = |stats: &str| {
        stats
            .lines()
            .find(|l| l.starts_with("pin-hashing key id"))
            .unwrap()
            .to_owned()
    };
    assert_eq!(key_line(&source_stats), key_line(&fleet_stats));
}

/// A namespace holding pins but no pin-hashing key (deleted by hand, or
/// filled by an import that did not set it): a replica without the fleet's
/// key does not start with a key of its own, which would miss every pin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_never_founds_a_new_key_on_a_namespace_holding_pins() {
    let origin = Origin::start().await;
    let (_exits, exits) = support::exits(2).await;
    let redis = support::redis_group::RedisNode::volatile().await;
    let mut args = vec!["--store".to_owned(), redis.url()];
    args.extend(support::process_args(&origin, &exits));
    let first = tempfile::tempdir().unwrap();
    let daemon = PinproxyProcess::start(first.path(), &args).await;
    let client = ProxyClient::new(daemon.addr, &daemon.ca_pem());
    let mut jar = Jar::default();
    let login = client
        .try_get("localhost", origin.https.port(), "/login", &mut jar)
        .await
        .unwrap();
    assert_eq!(login.status, 200, "{}", login.body);
    daemon.kill9().await;
    let _: () = redis.command(&["DEL", "pinproxy:hash-key"]).await;

    let second = tempfile::tempdir().unwrap();
    let refused =
        support::procs::pinproxy_refuses_to_start(second.path(), &args, Duration::from_secs(30))
            .await;
    assert!(refused.contains("no pin-hashing key"), "{refused}");
    assert!(refused.contains("fleet-pin-key"), "{refused}");
    // The replica that kept the fleet's key puts it back and serves.
    let daemon = PinproxyProcess::start(first.path(), &args).await;
    let client = ProxyClient::new(daemon.addr, &daemon.ca_pem());
    let reply = client
        .try_get("localhost", origin.https.port(), "/page", &mut jar)
        .await
        .unwrap();
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(
        support::origin::reported_peer(&reply.body),
        support::origin::reported_peer(&login.body)
    );
}
