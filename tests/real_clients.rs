//! Real clients trust pinproxy's CA and keep their cookies on one exit:
//! curl, Python requests, and headless Chromium with the CA in its NSS
//! database.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::collections::HashSet;
use std::net::IpAddr;
use std::process::Command;

use support::origin::reported_peer;
use support::procs::require;
use support::Setup;

fn run(command: &mut Command) -> String {
    let output = command.output().expect("spawn");
    assert!(
        output.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
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

/// Creates an NSS database under `home/.pki/nssdb` trusting `ca` for TLS
/// servers, as a user would for Chromium.
pub fn nss_trust(home: &std::path::Path, ca: &std::path::Path) {
    let certutil = require("certutil");
    let db = home.join(".pki/nssdb");
    std::fs::create_dir_all(&db).unwrap();
    let db_arg = format!("sql:{}", db.display());
    run(Command::new(&certutil).args(["-N", "--empty-password", "-d", &db_arg]));
    run(Command::new(&certutil)
        .args(["-A", "-d", &db_arg, "-n", "pinproxy", "-t", "C,,", "-i"])
        .arg(ca));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headless_chromium_accepts_the_leaf_once_the_ca_is_trusted() {
    let chromium = require("chromium");
    let s = Setup::start(2).await;
    let (origin, proxy) = (&s.origin, &s.proxy);
    let home = tempfile::tempdir().unwrap();
    nss_trust(home.path(), &proxy.daemon.ca_cert_path());
    let profile = home.path().join("profile");
    let addr = proxy.daemon.local_addr();
    let url = format!("https://localhost:{}/login", origin.https.port());

    let dom = tokio::task::spawn_blocking(move || {
        run(Command::new(chromium)
            .env("HOME", home.path())
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--disable-quic",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg(format!("--proxy-server=http://{addr}"))
            // Chromium sends loopback hosts direct unless told otherwise.
            .arg("--proxy-bypass-list=<-loopback>")
            .arg("--dump-dom")
            .arg(&url))
    })
    .await
    .unwrap();
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
