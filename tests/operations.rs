//! Operating a running pinproxy: reload (SIGHUP and `POST /reload`) under
//! load, a refused reload, drain and undrain, eviction by identity and by
//! pin (shared through Redis), readiness in each state, graceful stop with
//! a request in flight and the second signal, and error answers whose
//! advice fits their cause (the busy admin port, an untrusted origin, a
//! refusing exit). Real sockets and real processes where signals are
//! involved; every assertion on the far side (what the origin saw).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use pinproxy::exits::health::HealthState;
use pinproxy::exits::routes::ROUTE_FILE;
use pinproxy::upstream::FingerprintMode;
use support::origin::reported_peer;
use support::procs::{Lines, PinproxyProcess, RedisServer};
use support::{Jar, Origin, Proxy, ProxyClient, Setup, TestExit, TestExitSpec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// `METHOD path` on an admin endpoint, with extra headers: status and body.
async fn admin_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String) {
    let reply = support::admin::request_with(addr, method, path, headers).await;
    (reply.status, reply.body)
}

async fn admin(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    admin_with(addr, method, path, &[]).await
}

/// Polls `check` every 50 ms until it holds; panics with `what` after `within`.
async fn eventually<F, Fut>(within: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits (bounded) until a request's `CONNECT` has reached `exit`.
async fn until_a_request_reaches(exit: &TestExit) {
    eventually(
        Duration::from_secs(10),
        "the request never reached the exit",
        || async { !exit.connects().is_empty() },
    )
    .await;
}

/// pinproxy run as a process on a config file it re-reads on reload.
struct Running {
    origin: Origin,
    exits: Vec<TestExit>,
    urls: Vec<(String, String)>,
    proc: PinproxyProcess,
    client: ProxyClient,
    config: PathBuf,
    lines: Lines,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
}

impl Running {
    /// Waits (10 s at most) until `at_least` of the lines it logged match.
    async fn until_logged(&self, what: &str, at_least: usize, matches: impl Fn(&str) -> bool) {
        eventually(Duration::from_secs(10), what, || {
            let logged = self
                .lines
                .lock()
                .unwrap()
                .iter()
                .filter(|l| matches(l))
                .count();
            async move { logged >= at_least }
        })
        .await;
    }

    /// Three test exits (exit1..exit3 from 127.0.0.2..4); the config file
    /// names the exits in `enabled` (0-based).
    async fn start(enabled: &[usize]) -> Running {
        let origin = Origin::start().await;
        let (exits, urls) = support::exits(3).await;
        let config_dir = tempfile::tempdir().unwrap();
        let config = config_dir.path().join("pinproxy.toml");
        write_config(&config, &origin, &urls, enabled, "");
        let data = tempfile::tempdir().unwrap();
        let lines: Lines = Arc::default();
        let proc = PinproxyProcess::start_with_admin_logging(
            data.path(),
            &["--config".to_owned(), config.display().to_string()],
            "info",
            lines.clone(),
        )
        .await;
        let client = ProxyClient::new(proc.addr, &proc.ca_pem());
        Running {
            origin,
            exits,
            urls,
            proc,
            client,
            config,
            lines,
            _dirs: (config_dir, data),
        }
    }

    /// Rewrites the config file: the exits in `enabled`, then `extra`.
    fn write(&self, enabled: &[usize], extra: &str) {
        write_config(&self.config, &self.origin, &self.urls, enabled, extra);
    }

    fn admin_addr(&self) -> SocketAddr {
        self.proc.admin.unwrap()
    }

    /// The exits `GET /exits` lists.
    async fn exit_views(&self) -> Vec<serde_json::Value> {
        let (status, body) = admin(self.admin_addr(), "GET", "/exits").await;
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }

    async fn exit_ids(&self) -> Vec<String> {
        self.exit_views()
            .await
            .iter()
            .map(|e| e["id"].as_str().unwrap().to_owned())
            .collect()
    }
}

/// A config file trusting `origin`'s CA with the exits of `urls` that
/// `enabled` names (0-based), then `extra` (top-level keys before any
/// table, so `extra` may start with them).
fn write_config(
    path: &std::path::Path,
    origin: &Origin,
    urls: &[(String, String)],
    enabled: &[usize],
    extra: &str,
) {
    let mut text = format!(
        "upstream_ca = [{:?}]\n",
        origin.pki.ca_file.display().to_string()
    );
    let (top, tables) = match extra.find('[') {
        Some(at) => extra.split_at(at),
        None => (extra, ""),
    };
    text.push_str(top);
    for &i in enabled {
        let (id, url) = &urls[i];
        text.push_str(&format!("[[exits]]\nid = {id:?}\nurl = {url:?}\n"));
    }
    text.push_str(tables);
    std::fs::write(path, text).unwrap();
}

/// What one request of the load saw.
#[derive(Debug, Clone)]
struct Seen {
    after_reload: bool,
    path: &'static str,
    status: u16,
    error: String,
    peer: Option<IpAddr>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reload_under_load_adds_and_removes_exits_without_a_leak_or_a_dropped_connection() {
    let r = Running::start(&[0, 1]).await;
    let port = r.origin.https.port();
    let reloaded = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    const WORKERS: usize = 6;
    const AFTER: usize = 12;
    let mut workers = Vec::new();
    for _ in 0..WORKERS {
        let (client, reloaded, done, seen) = (
            r.client.clone(),
            reloaded.clone(),
            done.clone(),
            seen.clone(),
        );
        workers.push(tokio::spawn(async move {
            // One keep-alive tunnel per worker, opened before the reload
            // and used through it.
            let mut conn = client.tunnel("localhost", port).await;
            let mut jar = Jar::default();
            let mut after = 0;
            // Bounded in time (a loaded machine reloads slowly) and count.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            for _ in 0..1_000_000 {
                if tokio::time::Instant::now() > deadline {
                    break;
                }
                let after_reload = reloaded.load(Ordering::SeqCst);
                let path = if jar.get("datadome").is_none() {
                    "/login"
                } else {
                    "/page"
                };
                let mut request = conn.request("GET", path);
                if let Some(cookie) = jar.header() {
                    request = request.header("cookie", cookie);
                }
                let reply = conn
                    .send(request.body(Full::<Bytes>::default()).unwrap())
                    .await
                    .expect("the client connection survives the reload");
                jar.store(&reply.headers);
                let error = reply.pinproxy_error().unwrap_or_default();
                if error.starts_with("identity-retired") {
                    jar = Jar::default();
                }
                seen.lock().unwrap().push(Seen {
                    after_reload,
                    path,
                    status: reply.status.as_u16(),
                    error,
                    peer: reported_peer(&reply.body),
                });
                done.fetch_add(1, Ordering::SeqCst);
                if after_reload {
                    after += 1;
                    if after >= AFTER {
                        return;
                    }
                }
            }
            panic!("the reload never came");
        }));
    }
    eventually(Duration::from_secs(30), "the load never started", || {
        let done = done.clone();
        async move { done.load(Ordering::SeqCst) >= 4 * WORKERS }
    })
    .await;

    // exit1 goes, exit3 comes; SIGHUP while requests are in flight.
    r.write(&[1, 2], "");
    r.proc.signal("HUP");
    let running = &r;
    eventually(
        Duration::from_secs(10),
        "the reload never took",
        move || async move { running.exit_ids().await == ["exit2", "exit3"] },
    )
    .await;
    reloaded.store(true, Ordering::SeqCst);
    for worker in workers {
        worker.await.unwrap();
    }

    let seen = seen.lock().unwrap().clone();
    let (exit1, exit3) = (r.exits[0].source, r.exits[2].source);
    for s in &seen {
        match s.status {
            200 => {}
            502 => assert!(
                s.error.starts_with("identity-retired") && s.error.contains("exit-removed"),
                "{s:?}"
            ),
            _ => panic!("unexpected answer {s:?}"),
        }
    }
    assert!(
        seen.iter()
            .any(|s| s.status == 502 && s.error.contains("exit exit1")),
        "identities on the removed exit are retired, not moved"
    );
    assert!(
        seen.iter()
            .any(|s| s.after_reload && s.status == 200 && s.peer == Some(exit3)),
        "the added exit takes traffic"
    );
    assert!(
        !seen
            .iter()
            .any(|s| s.after_reload && s.path == "/login" && s.peer == Some(exit1)),
        "no new identity on the removed exit after the reload"
    );
    assert!(r.origin.leaks().is_empty(), "{:?}", r.origin.leaks());

    // The reload swept the removed exit's identities at once.
    eventually(
        Duration::from_secs(10),
        "the removed exit's identities were not retired",
        move || async move {
            let (_, body) = admin(running.admin_addr(), "GET", "/identities?all=1").await;
            let views: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
            let on_exit1: Vec<_> = views.iter().filter(|v| v["exit"] == "exit1").collect();
            !on_exit1.is_empty()
                && on_exit1
                    .iter()
                    .all(|v| v["state"] == "retired" && v["reason"] == "exit-removed")
        },
    )
    .await;
    let lines = r.lines.lock().unwrap().join("\n");
    assert!(lines.contains("configuration reloaded"), "{lines}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_that_does_not_validate_is_refused_and_the_old_one_serves() {
    let r = Running::start(&[0, 1]).await;
    let port = r.origin.https.port();
    let mut jar = Jar::default();
    let login = r
        .client
        .try_get("localhost", port, "/login", &mut jar)
        .await
        .unwrap();
    let earned = reported_peer(&login.body).unwrap();

    // A weight out of range: POST /reload says why, 400.
    r.write(
        &[0, 1, 2],
        "[[exits]]\nid = \"bad\"\nurl = \"direct://\"\nweight = 0\n",
    );
    let (status, body) = admin(r.admin_addr(), "POST", "/reload").await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains("weight must be 1-1000") && body.contains("\"bad\""),
        "{body}"
    );
    assert!(body.contains("the configuration in force stays"), "{body}");
    // A unit slip in a timeout ("y" for "s"): past the clock's range, it
    // would panic the first request that built a deadline from it.
    r.write(&[0, 1], "[timeouts]\nconnect = \"500000000000y\"\n");
    let (status, body) = admin(r.admin_addr(), "POST", "/reload").await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains("timeouts.connect") && body.contains("is too long") && body.contains("1day"),
        "{body}"
    );
    // A header count hyper would allocate on every request: a billion
    // aborted the daemon on its first request.
    r.write(&[0, 1], "[limits]\nmax_headers = 1000000000\n");
    let (status, body) = admin(r.admin_addr(), "POST", "/reload").await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains("limits.max_headers = 1000000000 is out of range"),
        "{body}"
    );
    // A syntax error on an exit's URL line: said where, never with the
    // line, which holds the exit's password.
    r.write(
        &[0, 1],
        "[[exits]]\nid = \"bad\"\nurl = \"http://u:Secr\\qt-77@127.0.0.1:9\"\n",
    );
    let (status, body) = admin(r.admin_addr(), "POST", "/reload").await;
    assert_eq!(status, 400, "{body}");
    assert!(
        !body.contains("Secr") && body.contains("invalid config file") && body.contains("line "),
        "{body}"
    );
    // Not TOML at all, by SIGHUP: refused with a log line.
    std::fs::write(&r.config, "[[exits]\nid = ").unwrap();
    r.proc.signal("HUP");
    r.until_logged("no log line for the refusal", 4, |l| {
        l.contains("reload refused")
    })
    .await;
    assert!(r
        .lines
        .lock()
        .unwrap()
        .iter()
        .any(|l| l.contains("reload refused") && l.contains("invalid config file")));
    // The old exits still serve, the identity still on its exit.
    assert_eq!(r.exit_ids().await, ["exit1", "exit2"]);
    let page = r
        .client
        .try_get("localhost", port, "/page", &mut jar)
        .await
        .unwrap();
    assert_eq!(page.status, 200, "{}", page.body);
    assert_eq!(reported_peer(&page.body), Some(earned));

    // A valid reload: exit2 re-weighted; a key that needs a restart is
    // named and kept.
    r.write(
        &[0, 1],
        "[limits]\nmax_connections = 100\n[timeouts]\nshutdown = \"5s\"\n",
    );
    let mut text = std::fs::read_to_string(&r.config).unwrap();
    text = text.replacen(
        &format!("url = {:?}\n", r.urls[1].1),
        &format!("url = {:?}\nweight = 3\n", r.urls[1].1),
        1,
    );
    std::fs::write(&r.config, text).unwrap();
    let (status, body) = admin(r.admin_addr(), "POST", "/reload").await;
    assert_eq!(status, 200, "{body}");
    let report: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(report["changed"], serde_json::json!(["exit2"]));
    assert_eq!(
        report["restart_needed"],
        serde_json::json!(["limits.max_connections"])
    );
    let views = r.exit_views().await;
    assert_eq!(views[1]["weight"], 3);
    // Still listening where it started.
    let page = r
        .client
        .try_get("localhost", port, "/page", &mut jar)
        .await
        .unwrap();
    assert_eq!(page.status, 200);
    assert!(r.origin.leaks().is_empty());

    // exit2's URL now leads elsewhere under the same id: applied, and said
    // loudly (its identities retire: `identities_retire_when_...`).
    let text = std::fs::read_to_string(&r.config).unwrap().replacen(
        &format!("url = {:?}\n", r.urls[1].1),
        &format!("url = {:?}\n", r.urls[2].1),
        1,
    );
    std::fs::write(&r.config, text).unwrap();
    let (status, body) = admin(r.admin_addr(), "POST", "/reload").await;
    assert_eq!(status, 200, "{body}");
    r.until_logged("no log line for the changed address", 1, |l| {
        l.contains("exit route") && l.contains("changed") && l.contains("exit2")
    })
    .await;
}

/// `config` with its first two exits' URLs swapped (each id now leads
/// where the other did).
fn with_exit_urls_swapped(config: &pinproxy::config::Config) -> pinproxy::config::Config {
    let mut config = config.clone();
    let (first, second) = (config.exits[0].url.clone(), config.exits[1].url.clone());
    config.exits[0].url = second;
    config.exits[1].url = first;
    config
}

/// The identity of `jar` is retired for its exit's new route: answered
/// `502 identity-retired` (`exit-changed`) without reaching the origin.
async fn assert_retired_for_the_new_route(s: &Setup, jar: &mut Jar) {
    let seen = s.origin.seen().len();
    let reply = s.get("/page", jar).await;
    assert_eq!(reply.status, 502, "{}", reply.body);
    let error = support::error_of(&reply);
    assert!(
        error.starts_with("identity-retired:") && error.contains("exit-changed"),
        "{error}"
    );
    assert_eq!(s.origin.seen().len(), seen, "the cookie never left");
}

/// Identities refer to their exit by id. When the route behind an id
/// changes (here two exits swap their URLs in one reload), the identities
/// founded on the old route retire before any of their cookies leaves: the
/// new route may leave from other IPs, and pinproxy cannot tell. New
/// identities are founded on the new routes.
#[tokio::test]
async fn identities_retire_when_their_exit_s_route_changes_under_its_id() {
    let s = Setup::start(2).await;
    let (mut jar, _) = s.login("/login").await;
    let config = with_exit_urls_swapped(&s.proxy.config);
    s.proxy.daemon.reload_with(&config).await.unwrap();
    assert_retired_for_the_new_route(&s, &mut jar).await;
    let (mut fresh, peer) = s.login("/login").await;
    let page = s.get("/page", &mut fresh).await;
    assert_eq!(
        (page.status.as_u16(), Setup::peer(&page)),
        (200, Some(peer))
    );
    assert!(s.origin.leaks().is_empty(), "{:?}", s.origin.leaks());
}

/// Identities founded on an exit's new route live on after the wall clock
/// is stepped back behind the change's date (an NTP correction): they are
/// judged by the route they carry, not by that date.
#[tokio::test]
async fn identities_founded_after_a_route_change_survive_a_clock_stepped_back() {
    let clock = pinproxy::clock::Clock::manual();
    let s = Setup::builder().exits(2).clock(clock.clone()).start().await;
    clock.advance(Duration::from_secs(600));
    let config = with_exit_urls_swapped(&s.proxy.config);
    s.proxy.daemon.reload_with(&config).await.unwrap();
    clock.step_back(Duration::from_secs(3600));
    let (mut jar, peer) = s.login("/login").await;
    let page = s.get("/page", &mut jar).await;
    assert_eq!(
        (page.status.as_u16(), Setup::peer(&page)),
        (200, Some(peer)),
        "{}",
        page.body
    );
    assert!(s.origin.leaks().is_empty(), "{:?}", s.origin.leaks());
}

/// A login still on its way through an exit when a reload changes the
/// exit's route (it started under the old configuration and runs to its
/// end on the old route) founds its identity after the change: it retires
/// at once, or its next request would leave through the new route.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_founded_on_a_route_a_reload_replaced_retires_at_once() {
    let s = Setup::start(2).await;
    let config = with_exit_urls_swapped(&s.proxy.config);
    let mut jar = Jar::default();
    let (login, ()) = tokio::join!(s.get("/login?held=1", &mut jar), async {
        s.origin.wait_for("/login?held=1").await;
        s.proxy.daemon.reload_with(&config).await.unwrap();
        // The founding comes after the change's date (milliseconds): only
        // the replaced exit's mark can tell.
        tokio::time::sleep(Duration::from_millis(20)).await;
        s.origin.release_held(1);
    });
    assert_eq!(login.status, 200, "{}", login.body);
    assert!(jar.get("datadome").is_some());
    assert_retired_for_the_new_route(&s, &mut jar).await;
    assert!(s.origin.leaks().is_empty(), "{:?}", s.origin.leaks());
}

/// A book of routes that cannot be written refuses the reload that
/// changes a route: a change kept only in memory would be forgotten at the
/// next start, and identities founded on the new route would then go on
/// through the old one (or the reverse).
#[tokio::test]
async fn a_route_change_that_cannot_be_remembered_is_refused() {
    let s = Setup::start(2).await;
    let (mut jar, peer) = s.login("/login").await;
    let blocker = s.proxy.data_dir.path().join("exit-routes.json.tmp");
    std::fs::create_dir_all(blocker.join("x")).unwrap();
    let mut config = with_exit_urls_swapped(&s.proxy.config);
    // The refused file would also kill an exit at its first failure.
    config.health.unhealthy_after = 1;
    config.health.dead_after = 1;
    let refused = s.proxy.daemon.reload_with(&config).await.unwrap_err();
    assert!(
        refused.to_string().contains("exit-routes.json"),
        "{refused}"
    );
    // The thresholds in force stay too: one failure kills no exit.
    let exit = s
        .proxy
        .daemon
        .pipeline()
        .exits
        .get(&pinproxy::identity::ExitId::new(
            &s.proxy.config.exits[0].id,
        ))
        .unwrap()
        .clone();
    assert_ne!(exit.health.failure(1), Some(HealthState::Dead));
    for _ in 0..10 {
        exit.health.success();
    }
    assert_eq!(exit.health.state(), HealthState::Healthy);
    // The configuration in force stays, and so do the identities.
    let page = s.get("/page", &mut jar).await;
    assert_eq!(
        (page.status.as_u16(), Setup::peer(&page)),
        (200, Some(peer))
    );
    std::fs::remove_dir_all(&blocker).unwrap();
    s.proxy.daemon.reload_with(&config).await.unwrap();
    assert_retired_for_the_new_route(&s, &mut jar).await;
    assert!(s.origin.leaks().is_empty(), "{:?}", s.origin.leaks());
}

/// A restart is a route change too: the book of routes in the data
/// directory tells what the exit had before.
#[tokio::test]
async fn identities_retire_when_a_restart_points_their_exit_elsewhere() {
    let s = Setup::start(2).await;
    let (mut jar, earned) = s.login("/login").await;
    let i = s.exit_of(earned);
    let elsewhere = s.proxy.config.exits[1 - i].url.clone();
    let s = s.restart_with(move |c| c.exits[i].url = elsewhere).await;
    assert_retired_for_the_new_route(&s, &mut jar).await;
    assert!(s.origin.leaks().is_empty(), "{:?}", s.origin.leaks());
}

/// The book of routes is per data directory: one restored without it (or
/// the first start of a release that keeps it) cannot tell that an exit's
/// route changed meanwhile. The identities carry the route they were
/// founded on, so they retire all the same.
#[tokio::test]
async fn identities_retire_for_a_route_change_the_book_never_saw() {
    let s = Setup::start(2).await;
    let (mut jar, earned) = s.login("/login").await;
    let i = s.exit_of(earned);
    let elsewhere = s.proxy.config.exits[1 - i].url.clone();
    let book = s.proxy.data_dir.path().join(ROUTE_FILE);
    std::fs::remove_file(&book).unwrap();
    let s = s.restart_with(move |c| c.exits[i].url = elsewhere).await;
    assert_retired_for_the_new_route(&s, &mut jar).await;
    assert!(s.origin.leaks().is_empty(), "{:?}", s.origin.leaks());
}

/// `keep_identities_on_route_change` is how an operator who knows that a
/// new URL reaches the same IPs keeps the exit's identities (here the same
/// exit by another name); it never keeps them across a change of the
/// fingerprint mode (an identity is one face as well as one IP).
#[tokio::test]
async fn a_kept_route_change_keeps_identities_but_a_fingerprint_change_retires_them() {
    let s = Setup::start(1).await;
    let (mut jar, peer) = s.login("/login").await;
    let mut config = s.proxy.config.clone();
    config.exits[0].url = config.exits[0].url.replace("127.0.0.1", "localhost");
    assert!(
        config.exits[0].url.contains("localhost"),
        "{}",
        config.exits[0].url
    );
    config.exits[0].keep_identities_on_route_change = true;
    s.proxy.daemon.reload_with(&config).await.unwrap();
    let page = s.get("/page", &mut jar).await;
    assert_eq!(
        (page.status.as_u16(), Setup::peer(&page)),
        (200, Some(peer))
    );

    config.exits[0].fingerprint = Some(FingerprintMode::Rustls);
    s.proxy.daemon.reload_with(&config).await.unwrap();
    assert_retired_for_the_new_route(&s, &mut jar).await;
    // Unchanged from here on: a reload changes nothing more.
    let (mut fresh, _) = s.login("/login").await;
    s.proxy.daemon.reload_with(&config).await.unwrap();
    assert_eq!(s.get("/page", &mut fresh).await.status, 200);
    assert!(s.origin.leaks().is_empty(), "{:?}", s.origin.leaks());
}

/// A route change kept across a restart: the book sees it at the start and
/// vouches for the old route, so the identities founded on it go on.
#[tokio::test]
async fn a_route_change_kept_across_a_restart_keeps_identities() {
    let s = Setup::start(1).await;
    let (mut jar, peer) = s.login("/login").await;
    let s = s
        .restart_with(|c| {
            c.exits[0].url = c.exits[0].url.replace("127.0.0.1", "localhost");
            c.exits[0].keep_identities_on_route_change = true;
        })
        .await;
    assert!(s.proxy.config.exits[0].url.contains("localhost"));
    let page = s.get("/page", &mut jar).await;
    assert_eq!(
        (page.status.as_u16(), Setup::peer(&page)),
        (200, Some(peer))
    );
    assert!(s.origin.leaks().is_empty(), "{:?}", s.origin.leaks());
}

/// A router over an in-memory store, for route changes judged in process
/// (two exit sets under one id stand for two replicas' configurations, or a
/// request's set from before a reload and the set in force).
fn route_judge() -> (pinproxy::routing::Router, pinproxy::credential::PinHasher) {
    let router = support::memory_router(pinproxy::clock::Clock::manual(), true);
    (router, pinproxy::credential::PinHasher::new([7; 32]))
}

/// Exit `a` at `url`, keeping its identities across route changes or not,
/// alone in a set, with its founding route.
fn exit_a(
    url: &str,
    keep: bool,
    hasher: &pinproxy::credential::PinHasher,
) -> pinproxy::exits::ExitSet {
    let mut exit = support::routing_only_exit("a", url);
    exit.spec.options.keep_identities_on_route_change = keep;
    let set = pinproxy::exits::ExitSet::new(vec![exit], None);
    pinproxy::exits::routes::found_on(&set, hasher);
    set
}

/// `keep_identities_on_route_change` vouches for the changes its book saw,
/// not for every route: a replica still on an old route, whose exit keeps
/// identities from an earlier change, retires an identity founded on a
/// route a rollout without the option brought to another replica, instead
/// of carrying its cookie out through the old route. An exit whose book
/// saw the change from that route carries it.
#[tokio::test]
async fn keeping_identities_vouches_only_for_routes_the_book_saw_them_kept_from() {
    let (router, hasher) = route_judge();
    let key =
        |name: &str| pinproxy::proxy::credentials::session_key::credential(&hasher, None, name);
    let rolled_out = exit_a("direct://127.0.0.3", false, &hasher);
    let still_old = exit_a("direct://127.0.0.2", true, &hasher);
    let founded = router
        .route(&rolled_out, &[key("k")], Default::default)
        .await
        .unwrap();
    assert!(founded.identity.is_some());
    let error = router
        .route(&still_old, &[key("k")], Default::default)
        .await
        .unwrap_err();
    assert!(format!("{error:?}").contains("ExitChanged"), "{error:?}");

    // Kept from the rolled-out route by a change the book saw: carried.
    let kept = exit_a("direct://127.0.0.4", true, &hasher);
    let from = rolled_out.iter().next().unwrap().founding_route().unwrap();
    kept.iter()
        .next()
        .unwrap()
        .set_kept_routes(Box::new([from.route]));
    let founded = router
        .route(&rolled_out, &[key("kept")], Default::default)
        .await
        .unwrap();
    let carried = router
        .route(&kept, &[key("kept")], Default::default)
        .await
        .expect("a route kept from is vouched for");
    assert_eq!(
        carried.identity.map(|i| i.id),
        founded.identity.map(|i| i.id)
    );
}

/// A request that started before a reload changed its exit's route judges
/// an identity founded on the new route meanwhile with the exit it started
/// with, which the reload replaced: it neither retires that identity (the
/// configuration in force carries it) nor carries it through the old
/// route (with `keep_identities_on_route_change` or without): it is
/// refused, `exit-reloaded`, and the identity goes on by the set in force.
/// An identity founded on the old route still runs to its end there.
#[tokio::test]
async fn a_request_on_a_replaced_route_neither_judges_nor_carries_an_identity_founded_after() {
    let (router, hasher) = route_judge();
    let key =
        |name: &str| pinproxy::proxy::credentials::session_key::credential(&hasher, None, name);
    for keep in [false, true] {
        let before = exit_a("direct://127.0.0.2", keep, &hasher);
        let old_key = key(&format!("old-{keep}"));
        let on_old = router
            .route(&before, std::slice::from_ref(&old_key), Default::default)
            .await
            .unwrap();
        let in_force = exit_a("direct://127.0.0.3", false, &hasher);
        // As a reload marks it (`daemon::live`): kept or not.
        before.iter().next().unwrap().mark_replaced(keep);
        let new_key = key(&format!("new-{keep}"));
        let founded = router
            .route(&in_force, std::slice::from_ref(&new_key), Default::default)
            .await
            .unwrap();

        let error = router
            .route(&before, std::slice::from_ref(&new_key), Default::default)
            .await
            .unwrap_err();
        assert!(
            matches!(error, pinproxy::routing::RouteError::ExitReloaded { .. }),
            "keep {keep}: {error:?}"
        );
        let routed = router
            .route(&in_force, &[new_key], Default::default)
            .await
            .expect("not retired by the request on the old route");
        assert_eq!(
            routed.identity.map(|i| i.id),
            founded.identity.map(|i| i.id)
        );
        let still = router
            .route(&before, &[old_key], Default::default)
            .await
            .expect("founded on the old route, it runs on there");
        assert_eq!(still.identity.map(|i| i.id), on_old.identity.map(|i| i.id));
    }

    // An identity founded on a route the replaced exit itself keeps
    // identities from (an earlier kept change) is still that exit's to
    // carry, during a kept change too.
    let earlier = exit_a("direct://127.0.0.5", false, &hasher);
    let before = exit_a("direct://127.0.0.6", true, &hasher);
    let from = earlier.iter().next().unwrap().founding_route().unwrap();
    let replaced = before.iter().next().unwrap();
    replaced.set_kept_routes(Box::new([from.route]));
    let founded = router
        .route(&earlier, &[key("earlier")], Default::default)
        .await
        .unwrap();
    replaced.mark_replaced(true);
    let carried = router
        .route(&before, &[key("earlier")], Default::default)
        .await
        .expect("a route the replaced exit vouches for");
    assert_eq!(
        carried.identity.map(|i| i.id),
        founded.identity.map(|i| i.id)
    );
}

/// `store.url` is read at start only, and so is what follows from it: a
/// reload whose file names Redis leaves a daemon on its embedded store
/// retiring the identities of an exit the reload removed (on a shared store
/// it would leave them to the replicas that have the exit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_naming_another_store_keeps_the_rules_of_the_store_in_use() {
    let r = Running::start(&[0]).await;
    let port = r.origin.https.port();
    let mut jar = Jar::default();
    let login = r
        .client
        .try_get("localhost", port, "/login", &mut jar)
        .await
        .unwrap();
    assert_eq!(login.status, 200, "{}", login.body);

    r.write(&[1], "[store]\nurl = \"redis://127.0.0.1:1/0\"\n");
    let (status, body) = admin(r.admin_addr(), "POST", "/reload").await;
    assert_eq!(status, 200, "{body}");
    let report: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(report["restart_needed"], serde_json::json!(["store.url"]));
    let running = &r;
    eventually(
        Duration::from_secs(10),
        "the removed exit's identity was not retired",
        move || async move {
            let (_, body) = admin(running.admin_addr(), "GET", "/identities?all=1").await;
            let views: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
            views.len() == 1
                && views[0]["state"] == "retired"
                && views[0]["reason"] == "exit-removed"
        },
    )
    .await;
    let page = r
        .client
        .try_get("localhost", port, "/page", &mut jar)
        .await
        .unwrap();
    assert_eq!(page.status, 502, "{}", page.body);
    assert!(r.origin.leaks().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_changes_tracked_cookies_and_policies_in_process() {
    let s = Setup::start(2).await;
    let admin_addr = s.proxy.daemon.admin_addr().unwrap();
    let mut config = s.proxy.config.clone();
    config.track_cookies = vec!["session_*".into()];
    config.identities.retire_policy = pinproxy::routing::RetirePolicy::Strip;
    let report = s.proxy.daemon.reload_with(&config).await.unwrap();
    assert!(report.added.is_empty() && report.removed.is_empty() && report.changed.is_empty());

    // session_tok was not tracked at start: pinned now, it keeps its exit
    // (untracked, rotation would carry it to the other exit and the
    // origin would count a leak).
    let (mut jar, earned) = s.login("/login?name=session_tok").await;
    for _ in 0..6 {
        let reply = s.get("/page", &mut jar).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        assert_eq!(Setup::peer(&reply), Some(earned));
    }
    // Retired, its credential is stripped (the new retire policy) instead
    // of failing the request.
    let key = s
        .proxy
        .daemon
        .pipeline()
        .hasher
        .cookie("session_tok", jar.get("session_tok").unwrap());
    let (status, body) = admin(admin_addr, "DELETE", &format!("/pins/session_tok%23{key}")).await;
    assert_eq!(status, 200, "{body}");
    let reply = s.get("/page", &mut jar).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let last = s.origin.seen().pop().unwrap();
    assert!(last.tokens.is_empty(), "the retired cookie left: {last:?}");
    assert!(s.origin.leaks().is_empty(), "{:?}", s.origin.leaks());
}

/// A tracked name dropped while the store holds pins of it would let
/// those cookies leave through any exit, silently: a reload that drops it
/// is refused, naming it (the configuration in force stays, and the cookie
/// keeps its exit), and so is a start; `release_untracked_pins` lets it go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_tracked_name_that_holds_pins_is_refused_until_released() {
    let s = Setup::start_with(2, |c| c.track_cookies = vec!["session_*".into()]).await;
    let (mut jar, earned) = s.login("/login?name=session_tok").await;
    let refused = refused_reload_tracking(&s, &[]).await;
    assert!(
        refused.contains("session_tok") && refused.contains("release_untracked_pins"),
        "{refused}"
    );
    assert_still_pinned(&s, &mut jar, earned).await;

    let Setup { proxy, .. } = s;
    let mut config = proxy.config.clone();
    let data_dir = proxy.stop_keeping_data_dir().await;
    config.track_cookies = Vec::new();
    // The refused start writes nothing: an exit's URL changed in the same
    // edit is not recorded in the book of routes (a start after the edit
    // is undone would otherwise see a change back, and retire).
    let book = data_dir.path().join(ROUTE_FILE);
    let before = std::fs::read(&book).unwrap();
    let mut edited = config.clone();
    edited.exits[0].url = "http://127.0.0.1:9".into();
    let refused = refused_start(&edited, "a start leaving pins untracked is refused").await;
    assert!(refused.contains("session_tok"), "{refused}");
    assert_eq!(
        std::fs::read(&book).unwrap(),
        before,
        "the book is untouched"
    );
    config.identities.release_untracked_pins = true;
    starts(&config, "released, it starts").await;
    drop(data_dir);
}

/// An exact name's pins are keyed in the spelling `track_cookies` gives
/// it: a reload that respells it would miss the pins of cookies sent in
/// the new spelling (each would found an identity of its own, on any
/// exit), so it is refused as a dropped name is, and the cookie keeps its
/// exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn respelling_a_tracked_name_that_holds_pins_is_refused() {
    let s = Setup::start_with(2, |c| c.track_cookies = vec!["sid".into()]).await;
    let (mut jar, earned) = s.login("/login?name=Sid").await;
    let refused = refused_reload_tracking(&s, &["Sid"]).await;
    assert!(
        refused.contains("Sid") && refused.contains("respelt"),
        "{refused}"
    );
    assert_still_pinned(&s, &mut jar, earned).await;
    assert!(s.origin.leaks().is_empty(), "{:?}", s.origin.leaks());
}

/// A start cannot see how the run before keyed its pins but for what the
/// store records: the patterns each start and each reload put in force. A
/// respelling a reload is refused for is refused at the next start too,
/// naming the cookie, the store's record and its file left as they were;
/// `release_untracked_pins` lets it go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_judges_pins_by_the_keying_the_run_before_recorded() {
    let s = Setup::start_with(2, |c| c.track_cookies = vec!["sid".into()]).await;
    s.login("/login?name=Sid").await;
    let Setup { proxy, .. } = s;
    let mut config = proxy.config.clone();
    let data_dir = proxy.stop_keeping_data_dir().await;
    config.track_cookies = vec!["Sid".into()];
    for _ in 0..2 {
        // Twice: a refused start records nothing of its own.
        let refused = refused_start(
            &config,
            "a start respelling a name that holds pins is refused",
        )
        .await;
        assert!(
            refused.contains("Sid") && refused.contains("respelt"),
            "{refused}"
        );
        assert!(
            refused.contains(r#"keyed under track_cookies = ["sid"]"#),
            "the error shows the spelling the pins were made under: {refused}"
        );
    }
    config.identities.release_untracked_pins = true;
    starts(&config, "released, it starts").await;
    drop(data_dir);
}

/// A start that fails after its check (its admin address in use) records
/// nothing: the pins are judged by the run before's keying at the next
/// start, and the spelling they were made under starts without a release.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_that_fails_to_bind_records_nothing() {
    let s = Setup::start_with(2, |c| c.track_cookies = vec!["sid".into()]).await;
    s.login("/login?name=Sid").await;
    let Setup { proxy, .. } = s;
    let mut config = proxy.config.clone();
    let data_dir = proxy.stop_keeping_data_dir().await;
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut respelt = config.clone();
    respelt.track_cookies = vec!["Sid".into()];
    respelt.identities.release_untracked_pins = true;
    respelt.admin.listen = Some(held.local_addr().unwrap());
    let refused = refused_start(&respelt, "the admin address is in use").await;
    assert!(refused.contains("admin"), "{refused}");
    drop(held);
    config.admin.listen = None;
    starts(&config, "the pins' own spelling starts").await;
    drop(data_dir);
}

/// A reload that tracks a name anew records it: pins of the name made
/// after it are judged by its spelling at the next start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_judges_pins_by_the_keying_the_last_reload_recorded() {
    let s = Setup::start_with(2, |c| c.track_cookies = vec!["sid".into()]).await;
    let mut config = s.proxy.config.clone();
    config.track_cookies = vec!["sid".into(), "tok".into()];
    s.proxy.daemon.reload_with(&config).await.expect("reloads");
    s.login("/login?name=Tok").await;
    let Setup { proxy, .. } = s;
    let data_dir = proxy.stop_keeping_data_dir().await;
    let mut respelt = config.clone();
    respelt.track_cookies = vec!["sid".into(), "Tok".into()];
    let refused = refused_start(
        &respelt,
        "a start respelling a name the reload tracked is refused",
    )
    .await;
    assert!(
        refused.contains("Tok") && refused.contains(r#"["sid", "tok"]"#),
        "{refused}"
    );
    starts(&config, "as the reload left it, it starts").await;
    drop(data_dir);
}

/// With Redis, each replica judges the pins its journal holds (those it
/// made or read) as the embedded store's are judged: a reload that drops
/// a name of theirs is refused, and so is a start that respells it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_replica_judges_the_pins_its_journal_holds() {
    let (redis, s, mut jar, earned) = a_replica_that_pinned_sid().await;
    let refused = refused_reload_tracking(&s, &[]).await;
    assert!(
        refused.contains("Sid") && refused.contains("release_untracked_pins"),
        "{refused}"
    );
    assert_still_pinned(&s, &mut jar, earned).await;
    let Setup { proxy, .. } = s;
    let mut config = proxy.config.clone();
    let data_dir = proxy.stop_keeping_data_dir().await;
    config.track_cookies = vec!["Sid".into()];
    let refused = refused_start(&config, "a replica respelling a name it pinned is refused").await;
    assert!(
        refused.contains("Sid") && refused.contains("respelt"),
        "{refused}"
    );
    config.identities.release_untracked_pins = true;
    starts(&config, "released, it starts").await;
    drop((data_dir, redis));
}

/// Redis cannot list the fleet's pins, and a replica's journal holds only
/// those it made or read: a change of the tracked cookies is judged by the
/// patterns the fleet last put in force too. A new replica that respells a
/// name another replica pinned is refused; a reload that adds a name goes
/// through, and the fleet records it, so a replica that leaves it out is
/// refused though its own journal holds none of it; one that adds more
/// starts, and cannot drop it again by a reload; `release_untracked_pins`
/// lets a refused one go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_judges_a_change_by_the_tracked_cookies_the_fleet_put_in_force() {
    let (redis, s, mut jar, earned) = a_replica_that_pinned_sid().await;
    let other_dir = tempfile::tempdir().unwrap();
    let mut other = s.proxy.config.clone();
    other.data_dir = Some(other_dir.path().to_owned());
    other.track_cookies = vec!["Sid".into()];
    let refused = refused_start(&other, "a new replica respelling the fleet's name").await;
    assert!(
        refused.contains(r#"only the fleet's: ["sid"]; only this configuration's: ["Sid"]"#),
        "{refused}"
    );
    let mut added = s.proxy.config.clone();
    added.track_cookies = vec!["sid".into(), "tok".into()];
    s.proxy
        .daemon
        .reload_with(&added)
        .await
        .expect("adds a name");
    s.login("/login?name=tok").await;
    other.track_cookies = vec!["sid".into()];
    let refused = refused_start(&other, "a replica leaving out the fleet's name").await;
    assert!(
        refused.contains(r#"only the fleet's: ["tok"]; only this configuration's: []"#),
        "{refused}"
    );
    other.track_cookies = vec!["sid".into(), "tok".into(), "more_*".into()];
    let daemon = pinproxy::daemon::Daemon::start(&other)
        .await
        .expect("a replica adding a pattern starts");
    // Its own journal holds nothing of `more_*`: the fleet's record judges.
    let mut dropped = other.clone();
    dropped.track_cookies = vec!["sid".into(), "tok".into()];
    let refused = daemon.reload_with(&dropped).await.unwrap_err().to_string();
    assert!(
        refused.contains(r#"only the fleet's: ["more_*"]"#),
        "{refused}"
    );
    daemon.shutdown(std::time::Duration::from_secs(5)).await;
    other.track_cookies = vec!["sid".into()];
    other.identities.release_untracked_pins = true;
    starts(&other, "released, it starts").await;
    assert_still_pinned(&s, &mut jar, earned).await;
    drop((other_dir, redis));
}

/// A Redis server, and a replica on it tracking `sid` whose jar holds a
/// `Sid` cookie it pinned to the exit egressing from the address given.
async fn a_replica_that_pinned_sid() -> (RedisServer, Setup, Jar, IpAddr) {
    let redis = RedisServer::start().await;
    let url = redis.url();
    let s = Setup::start_with(2, move |c| {
        c.store.url = url;
        c.track_cookies = vec!["sid".into()];
    })
    .await;
    let (jar, earned) = s.login("/login?name=Sid").await;
    (redis, s, jar, earned)
}

/// The refusal of a start with `config` (`why`: why it must be refused).
async fn refused_start(config: &pinproxy::config::Config, why: &str) -> String {
    match pinproxy::daemon::Daemon::start(config).await {
        Ok(_) => panic!("{why}"),
        Err(e) => e.to_string(),
    }
}

/// Starts pinproxy with `config` (`why`: why it must start) and stops it.
async fn starts(config: &pinproxy::config::Config, why: &str) {
    let daemon = pinproxy::daemon::Daemon::start(config).await.expect(why);
    daemon.shutdown(std::time::Duration::from_secs(5)).await;
}

/// The refusal of a reload to `track_cookies = tracked`.
async fn refused_reload_tracking(s: &Setup, tracked: &[&str]) -> String {
    let mut config = s.proxy.config.clone();
    config.track_cookies = tracked.iter().map(|name| name.to_string()).collect();
    s.proxy
        .daemon
        .reload_with(&config)
        .await
        .unwrap_err()
        .to_string()
}

/// Six requests with `jar` leave from `earned`.
async fn assert_still_pinned(s: &Setup, jar: &mut Jar, earned: IpAddr) {
    for _ in 0..6 {
        let reply = s.get("/page", jar).await;
        assert_eq!(Setup::peer(&reply), Some(earned), "still pinned");
    }
}

/// The reload's check of the pins held races the requests begun before
/// it, which go on with the old configuration: an answer that sets a
/// cookie of the dropped name after the check (none was held then, so the
/// reload went through) would leave a pin nothing enforces. It is refused
/// instead, naming the cookie, and the store holds no pin of the name: a
/// start that does not track it is not refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_a_reload_drops_is_not_pinned_by_a_request_begun_before() {
    let s = Setup::start_with(2, |c| c.track_cookies = vec!["session_*".into()]).await;
    let mut jar = Jar::default();
    let mut config = s.proxy.config.clone();
    config.track_cookies = Vec::new();
    let held = s.get("/login?held=1&name=session_tok", &mut jar);
    let reload = async {
        s.origin.wait_for("/login?held=1&name=session_tok").await;
        let report = s.proxy.daemon.reload_with(&config).await;
        s.origin.release_held(1);
        report
    };
    let (reply, report) = tokio::join!(held, reload);
    report.expect("nothing of session_* is held at the reload");
    assert_eq!(reply.status, 503, "{}", reply.body);
    let error = reply.pinproxy_error().unwrap_or_default();
    assert!(error.starts_with("tracking-changed"), "{error}");
    assert!(
        reply.body.contains("session_tok#") && reply.body.contains("reload that drops its name"),
        "{}",
        reply.body
    );
    assert!(
        jar.get("session_tok").is_none(),
        "the cookie is not handed to the client"
    );
    // Sent again, the request is the new configuration's: the cookie is
    // not tracked, and goes.
    let reply = s.get("/login?name=session_tok", &mut jar).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let s = s.restart_with(|c| c.track_cookies = Vec::new()).await;
    let reply = s.get("/page", &mut jar).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
}

/// Logs in until the identity lands on the exit egressing from `want`.
async fn login_on(s: &Setup, want: IpAddr) -> Jar {
    for _ in 0..20 {
        let (jar, peer) = s.login("/login").await;
        if peer == want {
            return jar;
        }
    }
    panic!("no login landed on {want}");
}

/// A drain the data directory cannot take is applied, and the answer says
/// a restart will forget it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_that_cannot_be_written_says_so() {
    let s = Setup::start(2).await;
    let admin_addr = s.proxy.daemon.admin_addr().unwrap();
    // A directory where the book goes: it cannot be replaced by a file.
    let book = s.proxy.data_dir.path().join("drained-exits.json");
    std::fs::create_dir_all(book.join("in-the-way")).unwrap();
    let (status, body) = admin(admin_addr, "POST", "/exits/exit1/drain").await;
    assert_eq!(status, 200, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["drained"], true, "{body}");
    assert_eq!(answer["persisted"], false, "{body}");
    assert!(
        answer["warning"]
            .as_str()
            .is_some_and(|w| w.contains("restart will forget")),
        "{body}"
    );
    std::fs::remove_dir_all(&book).unwrap();
    let (_, body) = admin(admin_addr, "POST", "/exits/exit2/drain").await;
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["persisted"], true, "{body}");
    assert!(answer.get("warning").is_none(), "{body}");
    // The book holds both: the set in force when the write came.
    let written: Vec<String> = serde_json::from_slice(&std::fs::read(&book).unwrap()).unwrap();
    assert_eq!(written, ["exit1", "exit2"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_exit_keeps_its_identities_and_takes_no_new_ones_until_undrained() {
    let s = Setup::start(2).await;
    let admin_addr = s.proxy.daemon.admin_addr().unwrap();
    let (exit1, exit2) = (s.exits[0].source, s.exits[1].source);
    let mut kept = login_on(&s, exit1).await;

    let (status, body) = admin(admin_addr, "POST", "/exits/exit1/drain").await;
    assert_eq!(status, 200, "{body}");
    let (_, body) = admin(admin_addr, "GET", "/exits").await;
    let views: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
    assert_eq!(views[0]["drained"], true);
    assert_eq!(views[1]["drained"], false);

    // The identity on it carries on there.
    for _ in 0..3 {
        let reply = s.get("/page", &mut kept).await;
        assert_eq!(reply.status, 200);
        assert_eq!(Setup::peer(&reply), Some(exit1));
    }
    // New identities and cookie-less traffic go elsewhere.
    for _ in 0..6 {
        let (_, peer) = s.login("/login").await;
        assert_eq!(peer, exit2, "a new identity on a drained exit");
        let reply = s.get_with("/", &[]).await;
        assert_eq!(Setup::peer(&reply), Some(exit2));
    }
    let (status, _) = admin(admin_addr, "GET", "/readyz").await;
    assert_eq!(status, 200, "exit2 is ready");

    // Both drained: new traffic is refused, saying how to undrain.
    admin(admin_addr, "POST", "/exits/exit2/drain").await;
    let reply = s.get_with("/", &[]).await;
    assert_eq!(reply.status, 503);
    let error = support::error_of(&reply);
    assert!(
        error.starts_with("no-exit-available")
            && error.contains("exit1 healthy, drained")
            && error.contains("/undrain"),
        "{error}"
    );
    admin(admin_addr, "POST", "/exits/exit2/undrain").await;

    // A reload and a restart keep the drain.
    let (status, body) = admin(admin_addr, "POST", "/reload").await;
    assert_eq!(status, 200, "{body}");
    assert!(s.proxy.daemon.exits().iter().next().unwrap().drained());
    let s = s.restart().await;
    let admin_addr = s.proxy.daemon.admin_addr().unwrap();
    let (_, body) = admin(admin_addr, "GET", "/exits").await;
    let views: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
    assert_eq!(views[0]["drained"], true, "{body}");
    let reply = s.get("/page", &mut kept).await;
    assert_eq!(Setup::peer(&reply), Some(exit1));

    // Undrained, it takes new identities again.
    let (status, body) = admin(admin_addr, "POST", "/exits/exit1/undrain").await;
    assert_eq!(status, 200, "{body}");
    login_on(&s, exit1).await;
    let (status, _) = admin(admin_addr, "POST", "/exits/nosuch/drain").await;
    assert_eq!(status, 404);
    assert!(s.origin.leaks().is_empty());
}

/// The id of the identity holding `jar`'s datadome cookie, and the
/// cookie's pin key (short and full hash).
async fn identity_of(s: &Setup, jar: &Jar) -> (String, String, String) {
    let key = s
        .proxy
        .daemon
        .pipeline()
        .hasher
        .cookie("datadome", jar.get("datadome").unwrap());
    let admin_addr = s.proxy.daemon.admin_addr().unwrap();
    let (_, body) = admin(admin_addr, "GET", "/identities?all=1").await;
    let views: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
    let short = key.to_string();
    let view = views
        .iter()
        .find(|v| {
            v["credentials"]
                .as_array()
                .unwrap()
                .iter()
                .any(|c| c["hash"] == short.as_str())
        })
        .expect("the identity is listed");
    (
        view["identity"].as_str().unwrap().to_owned(),
        short,
        key.to_hex(),
    )
}

/// A proxy whose identities take one request at a time
/// (`identities.max_in_flight`), the rest waiting in line, on `clock`.
async fn one_at_a_time(clock: pinproxy::clock::Clock) -> Setup {
    Setup::builder()
        .exits(1)
        .clock(clock)
        .config(|c| {
            c.identities.max_in_flight = 1;
            c.identities.max_queue = 8;
            c.identities.queue_timeout = Duration::from_secs(20);
            c.identities.max_lifetime = Duration::from_secs(600);
        })
        .start()
        .await
}

/// Logs in on `s` and sends two requests as that identity: `/held`, which
/// the origin holds, and `/page`, which waits in line behind it. Once
/// `/page` waits, `meanwhile` runs (given the identity's id), then the
/// origin answers `/held`. Asserts `/held` got 200, and that `/page` got
/// `502 identity-retired` for `reason` and never reached the origin (nor
/// made the retired identity's lane anew).
async fn while_a_request_waits_in_line<F, Fut>(s: &Setup, meanwhile: F, reason: &str)
where
    F: FnOnce(String) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let (jar, _) = s.login("/login").await;
    let (id, _, _) = identity_of(s, &jar).await;
    let identity = pinproxy::identity::IdentityId(u64::from_str_radix(&id, 16).unwrap());
    let pacer = s.proxy.daemon.pipeline().pacer.clone();

    let (mut holding, mut waiting) = (jar.clone(), jar.clone());
    let holds = s.get("/held", &mut holding);
    let waits = async {
        s.origin.wait_for("/held").await;
        s.get("/page", &mut waiting).await
    };
    let acts = async {
        eventually(
            Duration::from_secs(10),
            "the second request never queued",
            || {
                let pacer = pacer.clone();
                async move { pacer.waiting(identity) == 1 }
            },
        )
        .await;
        meanwhile(id).await;
        // Only now does the first request's answer free the line.
        s.origin.release_held(1);
    };
    let (held, waited, ()) = tokio::join!(holds, waits, acts);
    assert_eq!(held.status, 200, "{}", held.body);
    assert_eq!(waited.status, 502, "{}", waited.body);
    let error = waited.pinproxy_error().unwrap();
    assert!(
        error.contains("identity-retired") && error.contains(reason),
        "{error}"
    );
    assert!(
        !s.origin.seen().iter().any(|r| r.path == "/page"),
        "the waiting request reached the origin"
    );
}

/// A request waiting in its identity's line when the identity is evicted
/// was routed before the eviction: it is read again when its turn comes,
/// answered `identity-retired`, and never reaches the origin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_waiting_in_line_when_its_identity_retires_never_leaves() {
    let s = one_at_a_time(pinproxy::clock::Clock::system()).await;
    let admin_addr = s.proxy.daemon.admin_addr().unwrap();
    let evicts = |id: String| async move {
        let (status, body) = admin(admin_addr, "DELETE", &format!("/identities/{id}")).await;
        assert_eq!(status, 200, "{body}");
    };
    while_a_request_waits_in_line(&s, evicts, "evicted").await;
    s.stop().await;
}

/// The same line, and an identity whose lifetime ends while a request
/// waits in it: judged again when its turn comes (as its sticky window or
/// its exit's health would be), it retires and the request never leaves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_whose_identity_ended_while_it_waited_never_leaves() {
    let clock = pinproxy::clock::Clock::manual();
    let s = one_at_a_time(clock.clone()).await;
    let ages = |_| async move { clock.advance(Duration::from_secs(601)) };
    while_a_request_waits_in_line(&s, ages, "lifetime-expired").await;
    s.stop().await;
}

/// A request routed before its identity retired, then held while its
/// connection through the exit is made (a slow provider), writes nothing
/// once the identity retires meanwhile: the retirement forgets its lane,
/// and the request still holding the lane finds it retired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_whose_identity_retired_while_it_connected_never_leaves() {
    held_at_the_exit_while_its_identity_retires(false).await;
}

/// The same when a reload gives the exit a new connection client meanwhile
/// (other pool settings, the same route, the identities kept): the
/// retirement, decided after the reload, still reaches the request, which
/// holds the old client's lane.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_on_the_client_a_reload_replaced_never_leaves_once_its_identity_retires() {
    held_at_the_exit_while_its_identity_retires(true).await;
}

/// The same when the exit is declared dead meanwhile: the identity was
/// founded before the death, so it retires (`exit-down`), and its request
/// writes nothing through the exit when the exit answers again (from an
/// address that may have moved during the outage).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_whose_exit_died_while_it_connected_never_leaves() {
    let s = Setup::builder()
        .exits(1)
        .config(|c| {
            c.health.unhealthy_after = 1;
            c.health.dead_after = 1;
        })
        .start()
        .await;
    s.exits[0].hold();
    let sends = s.get_with("/page", &[("x-pinproxy-session", "dies-meanwhile")]);
    let dies = async {
        until_a_request_reaches(&s.exits[0]).await;
        let exit = s
            .proxy
            .daemon
            .pipeline()
            .exits
            .get(&pinproxy::identity::ExitId::new(
                &s.proxy.config.exits[0].id,
            ))
            .unwrap()
            .clone();
        exit.health
            .failure(pinproxy::clock::Clock::system().now_ms());
        assert_eq!(
            s.proxy.health(&s.proxy.config.exits[0].id),
            HealthState::Dead
        );
        // The exit's death is acted on by a task of its own: released once
        // the identity's lane is retired.
        eventually(
            Duration::from_secs(10),
            "the lane was never retired",
            || {
                let exit = exit.clone();
                async move { exit.client.lanes() == 0 }
            },
        )
        .await;
        s.exits[0].release();
    };
    let (reply, ()) = tokio::join!(sends, dies);
    assert_retired_unsent(&s, &reply, "exit-down");
    s.stop().await;
}

/// The same when a reload removes the exit meanwhile (the store not
/// shared): its identities retire (`exit-removed`), and the request
/// writes nothing through it when it answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_whose_exit_a_reload_removed_while_it_connected_never_leaves() {
    let s = Setup::start(2).await;
    s.exits[0].hold();
    s.exits[1].hold();
    let sends = s.get_with("/page", &[("x-pinproxy-session", "exit-removed")]);
    let removes = async {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let held = loop {
            if let Some(held) = s.exits.iter().position(|e| !e.connects().is_empty()) {
                break held;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no exit got the request"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let mut config = s.proxy.config.clone();
        config.exits.remove(held);
        let report = s.proxy.daemon.reload_with(&config).await.unwrap();
        assert_eq!(report.removed.len(), 1, "{report:?}");
        s.exits[0].release();
        s.exits[1].release();
    };
    let (reply, ()) = tokio::join!(sends, removes);
    assert_retired_unsent(&s, &reply, "exit-removed");
    s.stop().await;
}

/// Asserts that `reply`, to a `/page` request held at its exit while its
/// identity retired for `reason`, is `502 identity-retired` naming it, and
/// that the origin never saw the request.
fn assert_retired_unsent(s: &Setup, reply: &support::Reply, reason: &str) {
    assert_eq!(reply.status, 502, "{}", reply.body);
    let error = reply.pinproxy_error().unwrap();
    assert!(
        error.contains("identity-retired") && error.contains(reason),
        "{error}"
    );
    assert!(
        !s.origin.seen().iter().any(|r| r.path == "/page"),
        "the request reached the origin after its identity retired ({reason})"
    );
}

/// Sends a request whose session key founds an identity, holds it at the
/// exit, evicts the identity (after a reload that rebuilds the exit's
/// client, when `reload_first`), and checks the request never reached the
/// origin and was answered `502 identity-retired`.
async fn held_at_the_exit_while_its_identity_retires(reload_first: bool) {
    let s = Setup::start(1).await;
    let admin_addr = s.proxy.daemon.admin_addr().unwrap();
    s.exits[0].hold();
    // The session key founds the identity as the request is routed; its
    // lane's first connection then waits for the exit.
    let sends = s.get_with("/page", &[("x-pinproxy-session", "slow-provider")]);
    let evicts = async {
        until_a_request_reaches(&s.exits[0]).await;
        if reload_first {
            let mut config = s.proxy.config.clone();
            config.timeouts.pool_idle += Duration::from_secs(1);
            let report = s.proxy.daemon.reload_with(&config).await.unwrap();
            assert!(report.changed.is_empty() && report.removed.is_empty());
        }
        let (_, body) = admin(admin_addr, "GET", "/identities?all=1").await;
        let views: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
        assert_eq!(views.len(), 1, "{body}");
        let id = views[0]["identity"].as_str().unwrap().to_owned();
        let (status, body) = admin(admin_addr, "DELETE", &format!("/identities/{id}")).await;
        assert_eq!(status, 200, "{body}");
        s.exits[0].release();
    };
    let (reply, ()) = tokio::join!(sends, evicts);
    assert_retired_unsent(&s, &reply, "evicted");
    s.stop().await;
}

/// A reload that changes an exit's route under its id gives the new
/// route a health of its own: a request still on the old route that fails
/// there (the old provider going down, often why the route was changed)
/// neither kills the new route nor dates a death that would retire the
/// identities founded on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_left_on_a_replaced_route_do_not_kill_the_new_one() {
    let s = Setup::builder()
        .exits(1)
        .config(|c| {
            c.health.unhealthy_after = 1;
            c.health.dead_after = 1;
        })
        .start()
        .await;
    let new_route = TestExit::start("127.0.0.3").await;
    // The straggler waits at the old route's exit for its CONNECT answer.
    s.exits[0].hold();
    let straggler = s.get_with("/page?on=old-route", &[]);
    let rest = async {
        until_a_request_reaches(&s.exits[0]).await;
        let mut config = s.proxy.config.clone();
        config.exits[0].url = new_route.url();
        let report = s.proxy.daemon.reload_with(&config).await.unwrap();
        assert_eq!(report.changed.len(), 1, "{report:?}");
        let (jar, peer) = s.login("/login").await;
        assert_eq!(peer.to_string(), "127.0.0.3", "founded on the new route");
        // The old provider goes down: the held CONNECT is cut unanswered,
        // a failure that is surely the exit's.
        s.exits[0].kill();
        (jar, config)
    };
    let (reply, (mut jar, config)) = tokio::join!(straggler, rest);
    assert_eq!(reply.status, 502, "{}", reply.body);
    // A reload reads the exits' deaths back from the store: none was
    // dated for the old route's failure.
    s.proxy.daemon.reload_with(&config).await.unwrap();
    let id = &s.proxy.config.exits[0].id;
    assert_eq!(s.proxy.health(id), HealthState::Healthy);
    let page = s.get("/page?on=new-route", &mut jar).await;
    assert_eq!(page.status, 200, "{}", page.body);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evicted_identities_and_pins_answer_identity_retired_evicted() {
    let s = Setup::start(1).await;
    let admin_addr = s.proxy.daemon.admin_addr().unwrap();
    let (mut by_id, _) = s.login("/login").await;
    let (mut by_short, _) = s.login("/login").await;
    let (mut by_full, _) = s.login("/login").await;
    let (mut untouched, _) = s.login("/login").await;

    let (id, _, _) = identity_of(&s, &by_id).await;
    let (status, body) = admin(admin_addr, "DELETE", &format!("/identities/{id}")).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("\"evicted\"") && body.contains("datadome#"),
        "{body}"
    );
    let (status, body) = admin(admin_addr, "DELETE", &format!("/identities/{id}")).await;
    assert_eq!(status, 409, "already retired: {body}");

    let (_, short, _) = identity_of(&s, &by_short).await;
    let (status, body) = admin(admin_addr, "DELETE", &format!("/pins/datadome%23{short}")).await;
    assert_eq!(status, 200, "{body}");
    let (_, _, full) = identity_of(&s, &by_full).await;
    let (status, body) = admin(admin_addr, "DELETE", &format!("/pins/datadome%23{full}")).await;
    assert_eq!(status, 200, "{body}");

    for jar in [&mut by_id, &mut by_short, &mut by_full] {
        let reply = s.get("/page", jar).await;
        assert_eq!(reply.status, 502, "{}", reply.body);
        let error = support::error_of(&reply);
        assert!(
            error.starts_with("identity-retired") && error.contains("evicted"),
            "{error}"
        );
        assert!(error.contains("retired it by hand"), "advice fits: {error}");
    }
    let reply = s.get("/page", &mut untouched).await;
    assert_eq!(reply.status, 200, "an identity not evicted carries on");
    let metrics = s.proxy.daemon.admin().metrics.encode();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("pinproxy_identities_retired_total{")
                && l.contains("reason=\"evicted\"")
                && l.ends_with(" 3")),
        "{metrics}"
    );

    // Mistakes are answered, not acted on.
    for (method, path, want) in [
        ("DELETE", "/identities/zz", 400),
        ("DELETE", "/identities/00000000000000ff", 404),
        ("DELETE", "/pins/datadome", 400),
        ("DELETE", "/pins/datadome%23ffffffff", 404),
        ("GET", "/reload", 405),
        ("GET", "/exits/exit1/drain", 405),
    ] {
        let (status, body) = admin(admin_addr, method, path).await;
        assert_eq!(status, want, "{method} {path}: {body}");
    }
    // A page of another site cannot drive changes through a browser.
    let (status, _) = admin_with(
        admin_addr,
        "POST",
        "/exits/exit1/drain",
        &[("Origin", "https://evil.example")],
    )
    .await;
    assert_eq!(status, 403);
    assert!(!s.proxy.daemon.exits().iter().next().unwrap().drained());
    // Nor read the listings, by a name rebound to this loopback address.
    let port = admin_addr.port();
    for (host, want) in [
        (format!("evil.example:{port}"), 403),
        (format!("localhost:{port}"), 200),
        (format!("127.0.0.1:{port}"), 200),
    ] {
        let status = support::admin::status_for_host(admin_addr, "/identities", &host).await;
        assert_eq!(status, want, "GET /identities with Host {host}");
    }
    // Nor make it walk the store for a listing it cannot read.
    let (status, _) = admin_with(
        admin_addr,
        "GET",
        "/identities?all=1",
        &[("Sec-Fetch-Site", "cross-site")],
    )
    .await;
    assert_eq!(status, 403);
    for allowed in [
        &[("Sec-Fetch-Site", "same-origin")][..],
        &[
            ("Sec-Fetch-Site", "cross-site"),
            ("Sec-Fetch-Mode", "navigate"),
        ][..],
    ] {
        let (status, _) = admin_with(admin_addr, "GET", "/identities", allowed).await;
        assert_eq!(status, 200, "{allowed:?}");
    }
    assert!(s.origin.leaks().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_eviction_on_one_replica_holds_on_every_replica_sharing_redis() {
    let redis = RedisServer::start().await;
    let url = redis.url();
    let s = Setup::builder()
        .exits(1)
        .config(move |c| c.store.url = url)
        .start()
        .await;
    let listed: Vec<(String, String)> = vec![("exit1".into(), s.exits[0].url())];
    let url = redis.url();
    let other = Proxy::start(&listed, &s.origin, move |c| c.store.url = url).await;
    let (mut jar, _) = s.login("/login").await;
    let (id, _, _) = identity_of(&s, &jar).await;

    let other_admin = other.daemon.admin_addr().unwrap();
    let (status, body) = admin(other_admin, "DELETE", &format!("/identities/{id}")).await;
    assert_eq!(status, 200, "{body}");
    // The retirement reaches this replica's pin-hit cache when its message
    // arrives over Redis pub/sub: a request may beat it by that much (and
    // still leaves through the identity's own exit).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let reply = loop {
        let reply = s.get("/page", &mut jar).await;
        if reply.status != 200 || tokio::time::Instant::now() > deadline {
            break reply;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(reply.status, 502);
    assert!(support::error_of(&reply).contains("evicted"));
    let again = s.get("/page", &mut jar).await;
    assert_eq!(again.status, 502, "an eviction holds");
    other.stop().await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readyz_follows_the_store_and_the_exits() {
    let mut redis = RedisServer::start().await;
    let url = redis.url();
    let s = Setup::builder()
        .exits(1)
        .probe_health(3)
        .config(move |c| c.store.url = url)
        .start()
        .await;
    let admin_addr = s.proxy.daemon.admin_addr().unwrap();
    let ready = move || admin(admin_addr, "GET", "/readyz");
    assert_eq!(ready().await, (200, "ready\n".to_owned()));

    admin(admin_addr, "POST", "/exits/exit1/drain").await;
    let (status, body) = ready().await;
    assert_eq!(status, 503);
    assert!(body.contains("exit1 healthy, drained"), "{body}");
    admin(admin_addr, "POST", "/exits/exit1/undrain").await;
    assert_eq!(ready().await.0, 200);

    redis.stop().await;
    eventually(
        Duration::from_secs(10),
        "readyz ignores a dead store",
        move || async move {
            let (status, body) = ready().await;
            status == 503 && body.contains("the pin store (redis)")
        },
    )
    .await;
    redis.restart().await;
    eventually(
        Duration::from_secs(30),
        "readyz never came back",
        move || async move { ready().await.0 == 200 },
    )
    .await;

    s.exits[0].kill();
    s.proxy
        .wait_for_health(
            "exit1",
            HealthState::Dead,
            Duration::from_secs(10),
            "the exit dies",
        )
        .await;
    let (status, body) = ready().await;
    assert_eq!(status, 503);
    assert!(body.contains("exit1 dead"), "{body}");
}

/// A plain-HTTP origin that holds every response until released, and says
/// when a request has arrived.
struct HoldingOrigin {
    addr: SocketAddr,
    arrived: tokio::sync::mpsc::Receiver<()>,
    release: tokio::sync::watch::Sender<bool>,
}

/// The body the holding origin answers with (big enough to be streamed).
const HELD_BODY: usize = 256 * 1024;

impl HoldingOrigin {
    async fn start() -> HoldingOrigin {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (arrived_tx, arrived) = tokio::sync::mpsc::channel(16);
        let (release, released) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                let (arrived, mut released) = (arrived_tx.clone(), released.clone());
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        if !matches!(tcp.read(&mut byte).await, Ok(1)) {
                            return;
                        }
                        head.push(byte[0]);
                    }
                    let _ = arrived.send(()).await;
                    let _ = released.wait_for(|r| *r).await;
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {HELD_BODY}\r\nconnection: close\r\n\r\n"
                    );
                    let _ = tcp.write_all(answer.as_bytes()).await;
                    let _ = tcp.write_all(&vec![b'x'; HELD_BODY]).await;
                });
            }
        });
        HoldingOrigin {
            addr,
            arrived,
            release,
        }
    }
}

/// A pinproxy process with one test exit, a request held in flight at the
/// origin, and the signal sent: the process no longer accepts connections.
async fn signalled_with_a_request_in_flight() -> (
    PinproxyProcess,
    HoldingOrigin,
    tokio::task::JoinHandle<Result<support::Reply, hyper::Error>>,
    TestExit,
    tempfile::TempDir,
) {
    let (mut exits, urls) = support::exits(1).await;
    let data = tempfile::tempdir().unwrap();
    let args: Vec<String> = vec!["--exit".into(), format!("{}={}", urls[0].0, urls[0].1)];
    let proc = PinproxyProcess::start(data.path(), &args).await;
    let mut origin = HoldingOrigin::start().await;
    let client = ProxyClient::new(proc.addr, &proc.ca_pem());
    let mut conn = client.plain("127.0.0.1", origin.addr.port()).await;
    let request = conn
        .request("GET", "/held")
        .body(Full::<Bytes>::default())
        .unwrap();
    let in_flight = tokio::spawn(async move { conn.send(request).await });
    tokio::time::timeout(Duration::from_secs(10), origin.arrived.recv())
        .await
        .expect("the request reaches the origin");

    proc.signal("TERM");
    let addr = proc.addr;
    eventually(
        Duration::from_secs(10),
        "pinproxy still accepts connections after SIGTERM",
        || async move { TcpStream::connect(addr).await.is_err() },
    )
    .await;
    (proc, origin, in_flight, exits.remove(0), data)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_the_request_in_flight_finish_then_exits_0() {
    let (mut proc, origin, in_flight, _exit, _data) = signalled_with_a_request_in_flight().await;
    assert!(!in_flight.is_finished());
    origin.release.send(true).unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(20), in_flight)
        .await
        .expect("the held request completes")
        .unwrap()
        .expect("the client gets its whole answer");
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body.len(), HELD_BODY);
    let status = proc.wait_exit(Duration::from_secs(30)).await;
    assert_eq!(status.code(), Some(0), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_exits_at_once() {
    let (mut proc, _origin, in_flight, _exit, _data) = signalled_with_a_request_in_flight().await;
    // The origin never answers; the second signal does not wait for it.
    proc.signal("TERM");
    let status = proc.wait_exit(Duration::from_secs(5)).await;
    assert_eq!(status.code(), Some(143), "{status:?}");
    let outcome = tokio::time::timeout(Duration::from_secs(10), in_flight)
        .await
        .unwrap()
        .unwrap();
    assert!(outcome.is_err(), "the held request was cut: {outcome:?}");
}

/// Runs `pinproxy run ARGS` expecting it to fail at start: its stderr.
async fn failed_start(args: &[String]) -> String {
    failed_start_with(args, &[]).await
}

/// [`failed_start`] with the variables `env` set: it exits with status 1.
async fn failed_start_with(args: &[String], env: &[(&str, &str)]) -> String {
    let data = tempfile::tempdir().unwrap();
    let output = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_pinproxy"))
            .arg("run")
            .args(args)
            .arg("--data-dir")
            .arg(data.path())
            .args(["--store", "memory"])
            .envs(env.iter().copied())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("pinproxy gives up within 30 s")
    .unwrap();
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    stderr
}

#[tokio::test]
async fn a_worker_count_that_is_not_one_is_refused_by_name_without_a_panic() {
    // tokio reads TOKIO_WORKER_THREADS itself and panics on an empty or
    // unparsable value; pinproxy checks it first.
    let args = ["--listen", "127.0.0.1:0", "--admin", "off"].map(String::from);
    for value in ["", "0", "many"] {
        let stderr = failed_start_with(&args, &[("TOKIO_WORKER_THREADS", value)]).await;
        assert!(
            stderr.contains(&format!(
                "TOKIO_WORKER_THREADS must be a number of worker threads, 1 or more, not {value:?}"
            )) && stderr.contains("unset it"),
            "{value:?}: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{value:?}: {stderr}");
    }
}

#[tokio::test]
async fn a_busy_port_names_the_listener_and_how_to_move_it() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = busy.local_addr().unwrap();
    // Port 0: no port is reserved here that another test might take.
    let free = "127.0.0.1:0".to_owned();

    let stderr = failed_start(&[
        "--listen".into(),
        free.clone(),
        "--admin".into(),
        busy.to_string(),
    ])
    .await;
    assert!(
        stderr.contains(&format!("cannot listen on {busy} for the admin endpoint"))
            && stderr.contains("--admin ADDR")
            && stderr.contains("admin.listen")
            && stderr.contains("--admin off"),
        "{stderr}"
    );
    assert_eq!(
        stderr.matches("Address already in use").count(),
        1,
        "{stderr}"
    );

    let stderr = failed_start(&[
        "--listen".into(),
        busy.to_string(),
        "--admin".into(),
        "off".into(),
    ])
    .await;
    assert!(
        stderr.contains(&format!("cannot listen on {busy} for the proxy"))
            && stderr.contains("--listen ADDR"),
        "{stderr}"
    );
    assert_eq!(
        stderr.matches("Address already in use").count(),
        1,
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_origin_certificate_names_upstream_ca_on_every_stack() {
    for mode in [FingerprintMode::Mirror, FingerprintMode::Rustls] {
        let s = Setup::start_with(1, |c| {
            c.upstream_ca.clear();
            c.upstream.fingerprint = mode;
        })
        .await;
        let reply = s.get_with("/", &[]).await;
        assert_eq!(reply.status, 502, "{mode:?}");
        let error = support::error_of(&reply);
        assert!(
            error.starts_with("upstream-tls:")
                && error.contains("does not trust")
                && error.contains("--upstream-ca"),
            "{mode:?}: {error}"
        );
        assert!(!error.contains("retry later"), "{mode:?}: {error}");
        assert!(reply.body.contains("--upstream-ca"), "{}", reply.body);
        s.stop().await;
    }
}

#[tokio::test]
async fn a_refusing_exit_is_named_with_its_url_and_no_credentials() {
    let s = Setup::builder()
        .exit(
            TestExitSpec::with_auth("127.0.0.2", "scraper:right")
                .url_credentials("scraper:s3cr3tpw"),
        )
        .start()
        .await;
    let reply = s.get_with("/", &[]).await;
    assert_eq!(reply.status, 502);
    let error = support::error_of(&reply);
    assert!(
        error.starts_with("exit-refused:")
            && error.contains(&format!("exit exit1 (http://{})", s.exits[0].addr))
            && error.contains("407")
            && error.contains("user name and password"),
        "{error}"
    );
    assert!(!error.contains("s3cr3tpw") && !reply.body.contains("s3cr3tpw"));
    // Nor the user name: a provider's account is often named by it.
    assert!(!error.contains("scraper") && !reply.body.contains("scraper"));
}

/// The admin endpoint holds a bounded number of connections: past the cap
/// a connection is closed unread (a local process cannot take the daemon's
/// file descriptors and buffers through it), and a place freed serves
/// again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_endpoint_caps_its_connections() {
    let s = Setup::start(1).await;
    let addr = s.proxy.daemon.admin_addr().unwrap();
    let request = format!("GET /exits HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    // Answered once each, then held open (kept alive).
    let served = |mut tcp: TcpStream| {
        let request = request.clone();
        async move {
            tcp.write_all(request.as_bytes()).await.ok()?;
            let mut head = [0u8; 12];
            let read = tokio::time::timeout(Duration::from_secs(10), tcp.read_exact(&mut head));
            match read.await {
                Ok(Ok(_)) if head.starts_with(b"HTTP/1.1 200") => Some(tcp),
                _ => None,
            }
        }
    };
    let mut held = Vec::new();
    for _ in 0..pinproxy::admin::MAX_ADMIN_CONNECTIONS {
        let tcp = TcpStream::connect(addr).await.unwrap();
        held.push(
            served(tcp)
                .await
                .expect("an admin connection within the cap"),
        );
    }
    let over = TcpStream::connect(addr).await.unwrap();
    assert!(
        served(over).await.is_none(),
        "a connection past the cap was served"
    );
    drop(held.pop());
    // The place comes back once the server sees the close (bounded: 50
    // tries, 100 ms apart).
    let mut again = None;
    for _ in 0..50 {
        let tcp = TcpStream::connect(addr).await.unwrap();
        again = served(tcp).await;
        if again.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(again.is_some(), "a freed place was not given again");
}
