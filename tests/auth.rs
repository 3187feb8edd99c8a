//! Client authentication: with `[[auth.users]]`, every plain request and
//! every CONNECT without a configured user's Basic credentials gets `407`
//! with `Proxy-Authenticate: Basic realm="pinproxy"`; real clients (curl,
//! Python requests, headless Chromium answering the challenge over the
//! DevTools protocol as Playwright does) authenticate and name sessions as
//! `NAME-session-KEY`; a wrong password is logged by user name only; users
//! stay within their exits. Without users, `auth.challenge_session_keys`
//! challenges browsers so they can name their session. A non-loopback
//! listener needs users or `--insecure-open-proxy`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support;

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use base64::Engine as _;
use pinproxy::config::{Config, UserConfig};
use pinproxy::proxy::auth::password::hash_argon2id;
use support::browser::{ConnectTap, HOST_RESOLVER_RULES, PROXY_BYPASS_LIST};
use support::devtools::Devtools;
use support::procs::{require, run_to_end, Lines, PinproxyProcess};
use support::{error_of, Setup};
use tokio::process::Command;

/// A user whose password is `password`, hashed with argon2id as `pinproxy
/// user add` does, limited to `exits` when given.
fn user(name: &str, password: &str, exits: Option<&[&str]>) -> UserConfig {
    UserConfig {
        name: name.into(),
        password_hash: hash_argon2id(password.as_bytes()).unwrap(),
        exits: exits.map(|ids| ids.iter().map(|id| id.to_string()).collect()),
    }
}

/// Runs `command` to its end (at most 60 s), whatever its exit status.
async fn output(command: Command) -> (Option<i32>, String, String) {
    let f = run_to_end(command, Duration::from_secs(60)).await;
    (f.code, f.stdout, f.stderr)
}

/// curl through `proxy` with `--proxy-user` when given; prints the status
/// and the response headers.
fn curl(proxy: SocketAddr, ca: &Path, proxy_user: Option<&str>, url: &str) -> Command {
    let mut command = Command::new(require("curl"));
    command
        .args(["-sS", "--max-time", "20", "-D", "-", "-o", "/dev/null"])
        .args(["-w", "status=%{http_code}\n"])
        .arg("-x")
        .arg(format!("http://{proxy}"))
        .arg("--cacert")
        .arg(ca);
    if let Some(user) = proxy_user {
        command.arg("--proxy-user").arg(user);
    }
    command.arg(url);
    command
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_is_challenged_then_authenticates_by_user_and_session() {
    let s = Setup::builder()
        .exits(2)
        .config(|c| c.auth.users = vec![user("alice", "s3cret", None)])
        .start()
        .await;
    let proxy = s.proxy.daemon.local_addr();
    let ca = s.proxy.daemon.ca_cert_path();
    let https = format!("https://localhost:{}/ip", s.origin.https.port());
    let http = format!("http://localhost:{}/ip", s.origin.http.port());

    // No credentials: 407 with the challenge, for plain requests and CONNECT.
    let (_, out, _) = output(curl(proxy, &ca, None, &http)).await;
    assert!(out.contains("status=407"), "{out}");
    let lower = out.to_ascii_lowercase();
    assert!(
        lower.contains("proxy-authenticate: basic realm=\"pinproxy\""),
        "{out}"
    );
    assert!(
        lower.contains("x-pinproxy-error: proxy-auth-required: "),
        "{out}"
    );
    let (code, _, err) = output(curl(proxy, &ca, None, &https)).await;
    assert_ne!(code, Some(0));
    assert!(err.contains("407"), "CONNECT refused with 407: {err}");
    // A wrong password, or a session key without a user: 407 too.
    for wrong in ["alice:wrong", "bob:s3cret", "session-k1:s3cret"] {
        let (_, out, _) = output(curl(proxy, &ca, Some(wrong), &http)).await;
        assert!(out.contains("status=407"), "{wrong}: {out}");
    }
    assert!(
        s.origin.seen().is_empty(),
        "an unauthenticated request went out"
    );

    // The right password, plain and through a tunnel; NAME-session-KEY
    // names a session that keeps its exit.
    for url in [&http, &https] {
        let (code, out, err) = output(curl(proxy, &ca, Some("alice:s3cret"), url)).await;
        assert_eq!(code, Some(0), "{err}");
        assert!(out.contains("status=200"), "{url}: {out}");
    }
    let mut peers = HashSet::new();
    for round in 0..4 {
        let url = if round % 2 == 0 { &http } else { &https };
        let (code, _, err) = output(curl(proxy, &ca, Some("alice-session-k1:s3cret"), url)).await;
        assert_eq!(code, Some(0), "{err}");
        peers.insert(s.origin.seen().last().unwrap().peer);
    }
    assert_eq!(peers.len(), 1, "one session, one exit: {peers:?}");
    assert_eq!(
        s.origin.forwarded_header_hits(),
        vec![],
        "Proxy-Authorization left"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_requests_authenticates_with_credentials_in_the_proxy_url() {
    let python = require("python3");
    let s = Setup::builder()
        .exits(2)
        .config(|c| c.auth.users = vec![user("scraper", "pw with spaces", None)])
        .start()
        .await;
    let addr = s.proxy.daemon.local_addr();
    let script = format!(
        r#"
import requests
base = "localhost:{https}"
plain = "http://localhost:{http}/ip"
# Without credentials: a plain request is answered 407, a tunnel refused.
r = requests.get(plain, proxies={{"http": "http://{addr}"}}, timeout=20)
print("plain-anonymous", r.status_code, r.headers.get("proxy-authenticate"))
try:
    requests.get("https://" + base + "/", proxies={{"https": "http://{addr}"}}, timeout=20)
    print("tunnel-anonymous accepted")
except requests.exceptions.ProxyError as e:
    print("tunnel-anonymous refused", "407" in str(e))
# With the user (password percent-encoded in the URL) and a session key.
proxy = "http://scraper-session-py1:pw%20with%20spaces@{addr}"
s = requests.Session()
s.proxies = {{"http": proxy, "https": proxy}}
for path in ["/login", "/page", "/page"]:
    r = s.get("https://" + base + path, timeout=20)
    print("tunnel", r.status_code, r.text.strip())
r = s.get(plain, timeout=20)
print("plain", r.status_code, r.text.strip())
"#,
        https = s.origin.https.port(),
        http = s.origin.http.port(),
    );
    let mut command = Command::new(python);
    command
        .env("REQUESTS_CA_BUNDLE", s.proxy.daemon.ca_cert_path())
        .env_remove("HTTPS_PROXY")
        .env_remove("HTTP_PROXY")
        .env("NO_PROXY", "")
        .arg("-c")
        .arg(script);
    let (code, out, err) = output(command).await;
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("plain-anonymous 407 Basic realm=\"pinproxy\""),
        "{out}"
    );
    assert!(out.contains("tunnel-anonymous refused True"), "{out}");
    let peers: HashSet<&str> = out
        .lines()
        .filter(|l| l.starts_with("tunnel 200") || l.starts_with("plain 200"))
        .map(|l| l.rsplit(' ').next().unwrap())
        .collect();
    assert_eq!(
        out.lines().filter(|l| l.contains(" 200 ")).count(),
        4,
        "{out}"
    );
    assert_eq!(peers.len(), 1, "the session stayed on one exit: {out}");
    assert!(s.origin.leaks().is_empty());
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_is_logged_by_user_name_never_the_password() {
    let origin = support::Origin::start().await;
    let (_exits, urls) = support::exits(1).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("pinproxy.toml");
    let hash = hash_argon2id(b"right-password").unwrap();
    std::fs::write(
        &config,
        format!("[[auth.users]]\nname = \"alice\"\npassword_hash = \"{hash}\"\n"),
    )
    .unwrap();
    let mut args = vec!["--config".to_owned(), config.display().to_string()];
    args.extend(support::process_args(&origin, &urls));
    let lines = Lines::default();
    let proxy =
        PinproxyProcess::start_logging(dir.path(), &args, "info", Some(lines.clone())).await;
    let ca = dir.path().join("ca.pem");
    let url = format!("http://localhost:{}/ip", origin.http.port());
    let secret = "Hunter2-not-the-password";
    for user in [format!("alice:{secret}"), format!("mallory:{secret}")] {
        let (_, out, _) = output(curl(proxy.addr, &ca, Some(&user), &url)).await;
        assert!(out.contains("status=407"), "{out}");
    }
    let (_, out, _) = output(curl(proxy.addr, &ca, Some("alice:right-password"), &url)).await;
    assert!(out.contains("status=200"), "{out}");

    let logged = |needle: &str| lines.lock().unwrap().iter().any(|l| l.contains(needle));
    for _ in 0..100 {
        if logged("unknown user") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let text = lines.lock().unwrap().join("\n");
    assert!(
        text.lines()
            .any(|l| l.contains("wrong password") && l.contains("alice")),
        "{text}"
    );
    // An unknown name by its hash only: a client may have sent a secret
    // in its place.
    let mallory = &blake3::hash(b"mallory").to_hex()[..8];
    assert!(
        text.lines()
            .any(|l| l.contains("unknown user") && l.contains(mallory)),
        "{text}"
    );
    assert!(!text.contains("mallory"), "{text}");
    let token = base64::engine::general_purpose::STANDARD.encode(format!("alice:{secret}"));
    for forbidden in [secret, token.as_str(), "right-password", &hash] {
        assert!(
            !text.contains(forbidden),
            "{forbidden:?} reached the log:\n{text}"
        );
    }
    proxy.kill9().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_stay_within_their_exits_and_own_their_session_keys() {
    let s = Setup::builder()
        .exits(2)
        .config(|c| {
            c.auth.users = vec![
                user("alice", "x", Some(&["exit1"])),
                user("bob", "x", Some(&["exit2"])),
            ]
        })
        .start()
        .await;
    let port = s.origin.https.port();
    let (exit1, exit2) = (s.exits[0].source, s.exits[1].source);
    let peer_of = |reply: &support::Reply| Setup::peer(reply).unwrap();

    // Cookie-less traffic rotates only over the user's exits.
    for (name, exit) in [("alice", exit1), ("bob", exit2)] {
        for _ in 0..4 {
            let mut conn = s.proxy.client.tunnel_as(name, "localhost", port).await;
            let reply = conn.get("/", &[]).await;
            assert_eq!(peer_of(&reply), exit, "{name}: {}", reply.body);
        }
    }
    // An identity founded by alice lives on exit1; bob may not use it.
    let mut jar = support::Jar::default();
    let mut conn = s.proxy.client.tunnel_as("alice", "localhost", port).await;
    let login = conn.get_with_jar("/login", &mut jar).await;
    assert_eq!(peer_of(&login), exit1);
    let seen = s.origin.seen().len();
    let mut conn = s.proxy.client.tunnel_as("bob", "localhost", port).await;
    let refused = conn.get_with_jar("/page", &mut jar).await;
    assert_eq!(refused.status, 403, "{}", refused.body);
    let error = error_of(&refused);
    assert!(error.starts_with("exit-not-allowed: "), "{error}");
    assert!(
        error.contains("user bob") && error.contains("exit1"),
        "{error}"
    );
    assert_eq!(s.origin.seen().len(), seen, "bob's request went out");
    let mut conn = s.proxy.client.tunnel_as("alice", "localhost", port).await;
    let again = conn.get_with_jar("/page", &mut jar).await;
    assert_eq!((again.status.as_u16(), peer_of(&again)), (200, exit1));

    // The same session key named by two users is two identities (bob's
    // would otherwise be refused as alice's).
    for (name, exit) in [("alice", exit1), ("bob", exit2), ("alice", exit1)] {
        let mut conn = s
            .proxy
            .client
            .tunnel_as(&format!("{name}-session-shared"), "localhost", port)
            .await;
        let reply = conn.get("/", &[]).await;
        assert_eq!(
            (reply.status.as_u16(), peer_of(&reply)),
            (200, exit),
            "{name}"
        );
    }
    assert!(s.origin.leaks().is_empty());
    s.stop().await;
}

/// Headless Chromium through pinproxy (with the loopback tap in front),
/// trusting pinproxy's CA, answering proxy challenges with `credentials`.
async fn browser(
    home: &Path,
    tap: &ConnectTap,
    credentials: Option<(&str, &str)>,
) -> (Devtools, tempfile::TempDir) {
    let profile = tempfile::tempdir().unwrap();
    let mut browser = Devtools::launch(
        home,
        profile.path(),
        &[
            format!("--proxy-server=http://{}", tap.addr),
            format!("--proxy-bypass-list={PROXY_BYPASS_LIST}"),
            format!("--host-resolver-rules={HOST_RESOLVER_RULES}"),
        ],
    )
    .await;
    browser.proxy_credentials(credentials).await;
    (browser, profile)
}

/// Runs the origin's browser flow (/browser/start sets the tracked cookie,
/// script navigations follow) and returns the text of its last page.
async fn browse(browser: &mut Devtools, port: u16, start: &str) -> String {
    browser
        .navigate(&format!("https://localhost:{port}{start}"))
        .await
        .unwrap();
    browser
        .wait_for_text(
            "document.getElementById('done')?.textContent ?? ''",
            Duration::from_secs(30),
        )
        .await
        .expect("the flow reaches its last page")
}

/// The exit address a `/browser/*` page reports (`... from 127.0.0.N ...`).
fn page_peer(text: &str) -> IpAddr {
    text.split(' ')
        .skip_while(|w| *w != "from")
        .nth(1)
        .unwrap()
        .parse()
        .unwrap()
}

/// The browser session-key flow: `credentials` name the session; a login
/// flow, then a second browser with the same session key (no cookie yet)
/// lands on the same identity. Returns the exit address.
async fn session_key_flow(s: &Setup, credentials: (&str, &str)) -> IpAddr {
    let home = tempfile::tempdir().unwrap();
    let chromium = support::browser::Chromium::in_home(home.path());
    chromium.trust_pinproxy(s.proxy.data_dir.path()).await;
    let tap = ConnectTap::start(s.proxy.daemon.local_addr()).await;
    let port = s.origin.https.port();

    let (mut first, _profile) = browser(home.path(), &tap, Some(credentials)).await;
    let done = browse(&mut first, port, "/browser/start").await;
    assert!(
        done.contains("with 1 token(s)"),
        "later pages carry the cookie: {done}"
    );
    assert!(
        first
            .challenges
            .iter()
            .any(|c| c["source"] == "Proxy" && c["scheme"].as_str() == Some("basic")),
        "Chromium was challenged by the proxy: {:?}",
        first.challenges
    );
    let exit = page_peer(&done);
    drop(first);

    // A fresh browser, no cookie, the same session key: the same identity.
    let (mut second, _profile) = browser(home.path(), &tap, Some(credentials)).await;
    let done = browse(&mut second, port, "/browser/next?n=3").await;
    assert_eq!(
        page_peer(&done),
        exit,
        "the session key kept its exit: {done}"
    );
    drop(second);

    let browser_requests: Vec<_> = s
        .origin
        .seen()
        .into_iter()
        .filter(|seen| seen.path.starts_with("/browser/"))
        .collect();
    assert!(browser_requests.len() >= 5, "{browser_requests:?}");
    assert!(
        browser_requests.iter().all(|seen| seen.peer == exit),
        "every request of the session left through one exit"
    );
    assert_eq!(s.origin.leaks(), vec![], "0 leaks");
    assert_eq!(s.origin.forwarded_header_hits(), vec![]);
    assert!(tap.refused().is_empty(), "{:?}", tap.refused());
    // One identity holds both the session key and the cookie it earned.
    let identities = s.proxy.daemon.admin().identities(false).await.unwrap();
    let holder = identities
        .iter()
        .find(|i| i.credentials.iter().any(|c| c.name == "session-key"))
        .expect("the session key's identity");
    assert!(
        holder.credentials.iter().any(|c| c.name == "datadome"),
        "{holder:?}"
    );
    exit
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_answers_the_challenge_and_its_session_key_pins_a_login_flow() {
    let s = Setup::builder()
        .exits(3)
        .config(|c| c.auth.users = vec![user("alice", "browser-pw", None)])
        .start()
        .await;
    session_key_flow(&s, ("alice-session-b1", "browser-pw")).await;

    // A browser that cannot answer the challenge gets nowhere.
    let home = tempfile::tempdir().unwrap();
    let chromium = support::browser::Chromium::in_home(home.path());
    chromium.trust_pinproxy(s.proxy.data_dir.path()).await;
    let tap = ConnectTap::start(s.proxy.daemon.local_addr()).await;
    let seen = s.origin.seen().len();
    let (mut refused, _profile) = browser(home.path(), &tap, None).await;
    let url = format!("https://localhost:{}/browser/done", s.origin.https.port());
    let failed = refused.navigate(&url).await;
    assert!(failed.is_err(), "a page loaded without credentials");
    assert!(!refused.challenges.is_empty());
    assert_eq!(s.origin.seen().len(), seen);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_users_a_challenge_lets_browsers_name_their_session() {
    let s = Setup::builder()
        .exits(3)
        .config(|c| c.auth.challenge_session_keys = true)
        .start()
        .await;
    let exit = session_key_flow(&s, ("session-c7", "anything")).await;

    // curl is challenged the same way, and the same key reaches the same
    // identity from another client.
    let proxy = s.proxy.daemon.local_addr();
    let ca = s.proxy.daemon.ca_cert_path();
    let url = format!("https://localhost:{}/ip", s.origin.https.port());
    let (code, _, err) = output(curl(proxy, &ca, None, &url)).await;
    assert_ne!(code, Some(0));
    assert!(err.contains("407"), "{err}");
    let (code, _, err) = output(curl(proxy, &ca, Some("session-c7:"), &url)).await;
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(s.origin.seen().last().unwrap().peer, exit);
    s.stop().await;
}

/// The open-proxy rule holds for the address the proxy is bound to, which a
/// reload does not move: a file that moves `listen` to loopback and drops
/// its users is refused (the bound socket stays where it was until a
/// restart), and the proxy still asks for credentials. Only loopback is
/// sent to; the listener binds the wildcard address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_cannot_open_a_listener_bound_beyond_loopback() {
    let s = Setup::builder()
        .exits(1)
        .config(|c| {
            c.listen = "0.0.0.0:0".parse().unwrap();
            c.auth.users = vec![user("alice", "s3cret", None)];
        })
        .start()
        .await;
    let mut config = s.proxy.config.clone();
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.auth.users.clear();
    let refused = s.proxy.daemon.reload_with(&config).await;
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.to_string().contains("refusing to listen on 0.0.0.0")),
        "{refused:?}"
    );
    let port = s.proxy.daemon.local_addr().port();
    let proxy = SocketAddr::from(([127, 0, 0, 1], port));
    let http = format!("http://localhost:{}/ip", s.origin.http.port());
    let (_, out, _) = output(curl(proxy, &s.proxy.daemon.ca_cert_path(), None, &http)).await;
    assert!(out.contains("status=407"), "{out}");
    assert!(s.origin.seen().is_empty());
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_loopback_listener_needs_users_or_an_explicit_open_proxy() {
    // Refused at validation, before anything is bound: no traffic is sent
    // to the wildcard address.
    let dir = tempfile::tempdir().unwrap();
    let port = support::procs::free_port();
    for extra in [&[][..], &["--allow-remote"][..]] {
        let mut command = Command::new(env!("CARGO_BIN_EXE_pinproxy"));
        command
            .args([
                "run",
                "--listen",
                &format!("0.0.0.0:{port}"),
                "--admin",
                "off",
            ])
            .arg("--data-dir")
            .arg(dir.path())
            .args(extra);
        let (code, _, err) = output(command).await;
        assert_ne!(
            code,
            Some(0),
            "{extra:?}: pinproxy started as an open proxy"
        );
        assert!(err.contains("refusing to listen on 0.0.0.0"), "{err}");
        assert!(err.contains("--insecure-open-proxy"), "{err}");
        assert!(err.contains("pinproxy user add"), "{err}");
    }
    // The same rule in the configuration file's terms.
    let config = Config {
        listen: format!("0.0.0.0:{port}").parse().unwrap(),
        allow_remote: true,
        ..Config::default()
    };
    assert!(config.validate().is_err());
}

/// A user limited to exits none of which takes traffic is told so, by the
/// exits it may use: not "every exit is dead" beside a healthy exit it
/// may not use.
#[tokio::test]
async fn no_exit_for_a_limited_user_names_the_user_and_only_its_exits() {
    let s = Setup::builder()
        .exits(2)
        .config(|c| c.auth.users = vec![user("alice", "x", Some(&["exit2"]))])
        .start()
        .await;
    let admin = s.proxy.daemon.admin_addr().unwrap();
    let drained = support::admin::request(admin, "POST", "/exits/exit2/drain").await;
    assert_eq!(drained.status, 200, "{}", drained.body);
    let port = s.origin.https.port();
    let mut alice = s.proxy.client.tunnel_as("alice", "localhost", port).await;
    let reply = alice.get("/", &[]).await;
    assert_eq!(reply.status, 503, "{}", reply.body);
    let error = error_of(&reply);
    assert!(error.starts_with("no-exit-available:"), "{error}");
    assert!(
        error.contains("user alice") && error.contains("exit2"),
        "{error}"
    );
    assert!(
        !error.contains("exit1"),
        "an exit alice may not use: {error}"
    );
    s.stop().await;
}

/// A tunnel outlives a reload, and its requests act as its user as the
/// reload left it: a user narrowed to fewer exits keeps to them at once,
/// and a user removed (or given another password) has the tunnel's next
/// request refused, not sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_reaches_the_users_of_tunnels_already_open() {
    let s = Setup::builder()
        .exits(2)
        .config(|c| {
            c.auth.users = vec![
                user("alice", "x", None),
                user("bob", "x", None),
                user("carol", "x", None),
            ];
        })
        .start()
        .await;
    let port = s.origin.https.port();
    let exit1 = s.exits[0].source;
    let mut alice = s.proxy.client.tunnel_as("alice", "localhost", port).await;
    let mut bob = s.proxy.client.tunnel_as("bob", "localhost", port).await;
    let mut carol = s.proxy.client.tunnel_as("carol", "localhost", port).await;
    for tunnel in [&mut alice, &mut bob, &mut carol] {
        assert_eq!(tunnel.get("/", &[]).await.status, 200);
    }

    // Alice keeps her password (its hash as configured), bob is gone,
    // carol has a new password.
    let mut config = s.proxy.config.clone();
    config.auth.users.retain(|u| u.name != "bob");
    config.auth.users[0].exits = Some(vec!["exit1".into()]);
    config.auth.users[1] = user("carol", "y", None);
    s.proxy.daemon.reload_with(&config).await.unwrap();

    // Alice's open tunnel keeps to exit1 from now on.
    for _ in 0..4 {
        let reply = alice.get("/", &[]).await;
        assert_eq!(
            (reply.status.as_u16(), Setup::peer(&reply)),
            (200, Some(exit1))
        );
    }
    // Bob's and carol's open tunnels send nothing more.
    let seen = s.origin.seen().len();
    for tunnel in [&mut bob, &mut carol] {
        let refused = tunnel.get("/", &[]).await;
        assert_eq!(refused.status, 407, "{}", refused.body);
    }
    assert_eq!(
        s.origin.seen().len(),
        seen,
        "a refused user's request went out"
    );
    s.stop().await;
}
