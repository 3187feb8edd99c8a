//! Real clients trust pinproxy's CA and keep their cookies on one exit:
//! curl, Python requests, and headless Chromium with the CA in its NSS
//! database.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support;

use std::collections::HashSet;
use std::net::IpAddr;
use std::path::Path;
use std::process::Command;

use support::browser::Chromium;
use support::origin::reported_peer;
use support::procs::require;
use support::Setup;

/// How long one client process may take before its test fails.
const CLIENT_LIMIT: std::time::Duration = std::time::Duration::from_secs(120);

/// Runs `command` to its end (killed after [`CLIENT_LIMIT`], failing the
/// test: a client that hangs must not hold the run) and returns its output.
fn run(command: &mut Command) -> String {
    use std::io::Read as _;
    use std::process::Stdio;
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let drain = |mut pipe: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            bytes
        })
    };
    let stdout = drain(Box::new(child.stdout.take().unwrap()));
    let stderr = drain(Box::new(child.stderr.take().unwrap()));
    let deadline = std::time::Instant::now() + CLIENT_LIMIT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{command:?} did not finish within {CLIENT_LIMIT:?}");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let (stdout, stderr) = (stdout.join().unwrap(), stderr.join().unwrap());
    assert!(
        status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&stderr)
    );
    String::from_utf8(stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_with_a_cookie_jar_stays_on_one_exit() {
    let curl = require("curl");
    let s = Setup::start(3).await;
    let (origin, proxy) = (&s.origin, &s.proxy);
    let jar = proxy.data_dir.path().join("curl-jar.txt");
    let ca = proxy.daemon.ca_cert_path();
    let addr = proxy.daemon.local_addr();
    let port = origin.https.port();

    let peers = tokio::task::spawn_blocking(move || {
        let mut peers = HashSet::new();
        for path in ["/login", "/page", "/page", "/page", "/page"] {
            let body = run(Command::new(&curl)
                .args(["-sS", "--fail", "-x"])
                .arg(format!("http://{addr}"))
                .arg("--cacert")
                .arg(&ca)
                .arg("-c")
                .arg(&jar)
                .arg("-b")
                .arg(&jar)
                .arg(format!("https://localhost:{port}{path}")));
            peers.insert(reported_peer(&body).unwrap());
        }
        peers
    })
    .await
    .unwrap();
    assert_eq!(peers.len(), 1, "{peers:?}");
    assert!(origin.leaks().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_requests_session_stays_on_one_exit() {
    let python = require("python3");
    let s = Setup::start(3).await;
    let (origin, proxy) = (&s.origin, &s.proxy);
    // The README's recipe: HTTPS_PROXY plus REQUESTS_CA_BUNDLE (which, when
    // set, overrides Session.verify in requests).
    let script = format!(
        r#"
import requests
s = requests.Session()
for path in ["/login"] + ["/page"] * 5:
    r = s.get("https://localhost:{port}" + path, timeout=20)
    r.raise_for_status()
    print(r.text.strip())
"#,
        port = origin.https.port()
    );
    let proxy_url = format!("http://{}", proxy.daemon.local_addr());
    let ca = proxy.daemon.ca_cert_path();
    let out = tokio::task::spawn_blocking(move || {
        run(Command::new(python)
            .env("HTTPS_PROXY", &proxy_url)
            .env("HTTP_PROXY", &proxy_url)
            .env("NO_PROXY", "")
            .env("REQUESTS_CA_BUNDLE", &ca)
            .arg("-c")
            .arg(script))
    })
    .await
    .unwrap();
    let peers: HashSet<IpAddr> = out.lines().map(|l| reported_peer(l).unwrap()).collect();
    assert_eq!(out.lines().count(), 6);
    assert_eq!(peers.len(), 1, "{out}");
    assert!(origin.leaks().is_empty());
}

/// A Node.js client with no proxy support of its own (Node 20): it opens a
/// `CONNECT` tunnel per request by hand (`createConnection` with no agent), keeps the `datadome` cookie in a
/// jar, and trusts pinproxy's CA only through `NODE_EXTRA_CA_CERTS`.
const NODE_CLIENT: &str = r#"
const http = require("http");
const tls = require("tls");
const https = require("https");
const [proxyHost, proxyPort, originPort] = process.argv.slice(1);
let jar = "";
function get(path) {
  return new Promise((resolve, reject) => {
    const connect = http.request({
      host: proxyHost, port: proxyPort, method: "CONNECT",
      path: `localhost:${originPort}`,
    });
    connect.on("connect", (res, socket) => {
      if (res.statusCode !== 200) return reject(new Error(`CONNECT ${res.statusCode}`));
      const req = https.request({
        host: "localhost", port: originPort, path,
        headers: jar ? { cookie: jar } : {},
        createConnection: () => tls.connect({ socket, servername: "localhost" }),
      }, (res) => {
        for (const c of res.headers["set-cookie"] || []) {
          if (c.startsWith("datadome=")) jar = c.split(";")[0];
        }
        let body = "";
        res.on("data", (d) => (body += d));
        res.on("end", () => { socket.destroy(); resolve(`${res.statusCode} ${body.trim()}`); });
      });
      req.on("error", reject);
      req.end();
    });
    connect.on("error", reject);
    connect.end();
  });
}
(async () => {
  for (const path of ["/login", "/page", "/page", "/page"]) console.log(await get(path));
})().catch((e) => { console.error(e.message); process.exit(1); });
"#;

fn node_client(proxy: &support::Proxy, origin_port: u16) -> Command {
    let node = require("node");
    let addr = proxy.daemon.local_addr();
    let mut command = Command::new(node);
    command
        .env_remove("NODE_EXTRA_CA_CERTS")
        .args(["-e", NODE_CLIENT])
        .arg(addr.ip().to_string())
        .arg(addr.port().to_string())
        .arg(origin_port.to_string());
    command
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_with_node_extra_ca_certs_stays_on_one_exit() {
    let s = Setup::start(3).await;
    let (origin, proxy) = (&s.origin, &s.proxy);
    let mut trusting = node_client(proxy, origin.https.port());
    trusting.env("NODE_EXTRA_CA_CERTS", proxy.daemon.ca_cert_path());
    let mut untrusting = node_client(proxy, origin.https.port());
    let (out, refused) =
        tokio::task::spawn_blocking(move || (run(&mut trusting), untrusting.output().unwrap()))
            .await
            .unwrap();
    assert_eq!(out.lines().count(), 4, "{out}");
    assert!(out.lines().all(|l| l.starts_with("200 ok ")), "{out}");
    let peers: HashSet<IpAddr> = out
        .lines()
        .map(|l| reported_peer(l.trim_start_matches("200 ")).unwrap())
        .collect();
    assert_eq!(peers.len(), 1, "{out}");
    let pages = origin.seen().into_iter().filter(|s| s.path == "/page");
    assert!(pages.into_iter().all(|s| s.tokens.len() == 1));
    assert!(origin.leaks().is_empty());

    // Without the CA, Node refuses pinproxy's leaf.
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("certificate"),
        "expected a certificate error without NODE_EXTRA_CA_CERTS: {stderr}"
    );
}

/// Trusts the proxy's CA in `home/.pki/nssdb`, where Chromium looks, the way
/// the README tells users to: `pinproxy ca install --nssdb DIR`.
fn nss_trust(home: &Path, proxy: &support::Proxy) {
    require("certutil");
    let db = home.join(".pki/nssdb");
    let out = run(Command::new(env!("CARGO_BIN_EXE_pinproxy"))
        .args(["ca", "--data-dir"])
        .arg(proxy.data_dir.path())
        .args(["install", "--nssdb"])
        .arg(&db));
    assert!(out.starts_with("created sql:"), "{out}");
    assert!(db.join("cert9.db").is_file());
}

/// Runs headless Chromium through the proxy on `url` (the launcher in
/// `support::browser`: a fixed proxy that only `localhost` goes through,
/// other names failing without DNS) and returns the DOM once the page (and
/// any script-driven navigation within the virtual-time budget) has
/// settled.
async fn chromium_dump_dom(home: &Path, proxy: &support::Proxy, url: String) -> String {
    Chromium::in_home(home)
        .dump_dom(Some(proxy.daemon.local_addr()), &url)
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headless_chromium_accepts_the_leaf_once_the_ca_is_trusted() {
    let s = Setup::start(2).await;
    let (origin, proxy) = (&s.origin, &s.proxy);
    let home = tempfile::tempdir().unwrap();
    nss_trust(home.path(), proxy);
    let url = format!("https://localhost:{}/login", origin.https.port());
    let dom = chromium_dump_dom(home.path(), proxy, url).await;
    assert!(
        dom.contains("ok 127.0.0."),
        "Chromium did not load the page through pinproxy: {dom}"
    );
    let logins: Vec<_> = origin
        .seen()
        .into_iter()
        .filter(|s| s.path == "/login")
        .collect();
    assert_eq!(logins.len(), 1);
    assert!(logins[0].header("user-agent")[0].contains("HeadlessChrome"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headless_chromium_keeps_its_cookie_on_one_exit_over_http2_across_navigations() {
    let s = Setup::start(3).await;
    let (origin, proxy) = (&s.origin, &s.proxy);
    let home = tempfile::tempdir().unwrap();
    nss_trust(home.path(), proxy);
    let url = format!("https://localhost:{}/browser/start", origin.https.port());
    let dom = chromium_dump_dom(home.path(), proxy, url).await;
    assert!(
        dom.contains("id=\"done\"") && dom.contains("over HTTP/2.0 with 1 token(s)"),
        "Chromium did not finish the navigation chain over h2 with its cookie: {dom}"
    );

    let flow: Vec<_> = origin
        .seen()
        .into_iter()
        .filter(|s| s.path.starts_with("/browser/"))
        .collect();
    let paths: Vec<&str> = flow.iter().map(|s| s.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "/browser/start",
            "/browser/next?n=1",
            "/browser/next?n=2",
            "/browser/next?n=3",
            "/browser/done"
        ]
    );
    assert!(
        flow.iter().all(|s| s.version == http::Version::HTTP_2),
        "every request should reach the origin over h2: {flow:?}"
    );
    // The cookie set by the first page rides on every navigation after it,
    // and every one of them left through the exit that earned it.
    let earned_on = flow[0].peer;
    for seen in &flow[1..] {
        assert_eq!(seen.tokens.len(), 1, "{seen:?}");
        assert_eq!(
            seen.tokens[0],
            ("datadome".to_owned(), earned_on),
            "{seen:?}"
        );
        assert_eq!(seen.peer, earned_on, "{seen:?}");
    }
    assert!(origin.leaks().is_empty(), "{:?}", origin.leaks());
}

#[test]
fn ca_install_without_certutil_prints_the_commands_to_run() {
    let data_dir = tempfile::tempdir().unwrap();
    let db = data_dir.path().join("nss db");
    let empty_path = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_pinproxy"))
        .env("PATH", empty_path.path())
        .args(["ca", "--data-dir"])
        .arg(data_dir.path())
        .args(["install", "--nssdb"])
        .arg(&db)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    let db_arg = format!("'sql:{}'", db.display());
    assert!(stderr.contains("certutil not found"), "{stderr}");
    assert!(
        stderr.contains(&format!("certutil -N -d {db_arg} --empty-password")),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("certutil -A -d {db_arg} -n 'pinproxy CA ")),
        "{stderr}"
    );
    assert!(stderr.contains("-t C,, -i "), "{stderr}");
    assert!(!db.exists(), "nothing is created when certutil is missing");
}
