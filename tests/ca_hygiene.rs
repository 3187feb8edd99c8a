//! CA hygiene: a CA key that group or others can read is refused (with the
//! `chmod` that fixes it); `pinproxy ca rotate` makes a new CA that clients
//! trusting either the old or the new one accept until the overlap ends;
//! a CA made with `ca.permitted_domains` carries X.509 name constraints
//! that curl and Chromium enforce, and pinproxy refuses to intercept hosts
//! outside them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support;

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rcgen::{CertificateParams, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use support::browser::Chromium;
use support::devtools::Devtools;
use support::procs::{require, run_to_end, PinproxyProcess};
use support::{Origin, Setup};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_pinproxy");

/// Runs `command` to its end (at most 60 s), whatever its exit status.
async fn output(command: Command) -> (bool, String, String) {
    let f = run_to_end(command, Duration::from_secs(60)).await;
    (f.success(), f.stdout, f.stderr)
}

fn pinproxy(args: &[&str], dir: &Path) -> Command {
    let mut command = Command::new(BIN);
    command.args(args).arg("--data-dir").arg(dir);
    command
}

/// curl through `proxy` (when given) to `url`, trusting `ca`: the body on
/// success, curl's error on failure.
async fn curl(
    proxy: Option<std::net::SocketAddr>,
    ca: &Path,
    url: &str,
    resolve: Option<&str>,
) -> Result<String, String> {
    let mut command = Command::new(require("curl"));
    command.args(["-sS", "--fail", "--max-time", "20"]);
    match proxy {
        Some(proxy) => command.arg("-x").arg(format!("http://{proxy}")),
        None => command.arg("--noproxy").arg("*"),
    };
    if let Some(resolve) = resolve {
        command.arg("--resolve").arg(resolve);
    }
    command.arg("--cacert").arg(ca).arg(url);
    let (ok, stdout, stderr) = output(command).await;
    if ok {
        Ok(stdout)
    } else {
        Err(stderr)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_key_readable_by_others_is_refused_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, _, stderr) = output(pinproxy(&["ca"], dir.path())).await;
    assert!(ok, "{stderr}");
    let key = dir.path().join("ca-key.pem");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();

    let run = pinproxy(
        &["run", "--listen", "127.0.0.1:0", "--admin", "off"],
        dir.path(),
    );
    let (ok, _, stderr) = output(run).await;
    assert!(!ok, "pinproxy started with a group-readable CA key");
    let fix = format!("chmod 600 {}", key.display());
    assert!(stderr.contains(&fix), "the error names the fix: {stderr}");
    assert!(stderr.contains("0640"), "{stderr}");
    // `pinproxy ca` refuses it too.
    let (ok, _, stderr) = output(pinproxy(&["ca"], dir.path())).await;
    assert!(!ok && stderr.contains(&fix), "{stderr}");

    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (ok, stdout, stderr) = output(pinproxy(&["ca"], dir.path())).await;
    assert!(ok, "{stderr}");
    assert_eq!(
        stdout.trim(),
        dir.path().join("ca.pem").display().to_string()
    );
}

/// `--publish-ca FILE` hands a client container the certificate to trust
/// without the data directory (which holds the CA's key and the pin key):
/// written at start, readable by all, trusted by curl through pinproxy;
/// during a rotation it is the bundle of both CAs. A file it cannot write
/// stops the start, naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_published_ca_is_what_clients_trust_and_nothing_else() {
    let origin = Origin::start().await;
    let (_exits, urls) = support::exits(1).await;
    let dir = tempfile::tempdir().unwrap();
    let shared = tempfile::tempdir().unwrap();
    let published = shared.path().join("ca.pem");
    let mut args = support::process_args(&origin, &urls);
    args.extend(["--publish-ca".to_owned(), published.display().to_string()]);
    let url = format!("https://localhost:{}/ip", origin.https.port());

    let first = PinproxyProcess::start(dir.path(), &args).await;
    let mode = std::fs::metadata(&published).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o644, "the published certificate is readable by all");
    assert_eq!(
        std::fs::read_to_string(&published).unwrap(),
        std::fs::read_to_string(dir.path().join("ca.pem")).unwrap()
    );
    let body = curl(Some(first.addr), &published, &url, None)
        .await
        .unwrap();
    assert!(body.contains("127.0.0.2"), "{body}");
    let entries: Vec<_> = std::fs::read_dir(shared.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(entries, ["ca.pem"], "nothing else is written there");
    first.kill9().await;

    // A rotation: the next start publishes the bundle of both.
    let (ok, _, stderr) = output(pinproxy(&["ca", "rotate"], dir.path())).await;
    assert!(ok, "{stderr}");
    let during = PinproxyProcess::start(dir.path(), &args).await;
    assert_eq!(
        std::fs::read_to_string(&published).unwrap(),
        std::fs::read_to_string(dir.path().join("ca-bundle.pem")).unwrap()
    );
    during.kill9().await;

    // Never into the data directory, whose files it would replace.
    let inside = dir.path().join("ca-key.pem");
    let stderr = refused_to_publish(dir.path(), &inside).await;
    assert!(stderr.contains("data directory"), "{stderr}");
    assert!(std::fs::read_to_string(&inside)
        .unwrap()
        .contains("PRIVATE KEY"));

    let nowhere = shared.path().join("missing").join("ca.pem");
    let stderr = refused_to_publish(dir.path(), &nowhere).await;
    assert!(
        stderr.contains(&nowhere.display().to_string()) && stderr.contains("ca.publish"),
        "{stderr}"
    );
}

/// Runs pinproxy on `dir` publishing its CA to `to`, which must stop the
/// start: its error output.
async fn refused_to_publish(dir: &Path, to: &Path) -> String {
    let to = to.display().to_string();
    let args = [
        "run",
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "off",
        "--publish-ca",
        &to,
    ];
    let (ok, _, stderr) = output(pinproxy(&args, dir)).await;
    assert!(!ok, "pinproxy started publishing its CA to {to}");
    stderr
}

/// pinproxy (as users run it) on `dir` over `origin` and one exit.
async fn start(dir: &Path, origin: &Origin, exits: &[(String, String)]) -> PinproxyProcess {
    PinproxyProcess::start(dir, &support::process_args(origin, exits)).await
}

async fn chromium_trusting(nick: &str, ca: &Path) -> Chromium {
    let chromium = Chromium::new();
    chromium.trust_ca_file(nick, ca).await;
    chromium
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_keeps_clients_of_the_old_ca_working_until_it_is_finished() {
    let origin = Origin::start().await;
    let (_exits, urls) = support::exits(1).await;
    let dir = tempfile::tempdir().unwrap();
    let url = format!("https://localhost:{}/ip", origin.https.port());
    let kept = tempfile::tempdir().unwrap();
    let keep = |name: &str, from: &Path| {
        let path = kept.path().join(name);
        std::fs::copy(from, &path).unwrap();
        path
    };

    let before = start(dir.path(), &origin, &urls).await;
    let old_only = keep("old.pem", &dir.path().join("ca.pem"));
    curl(Some(before.addr), &old_only, &url, None)
        .await
        .unwrap();
    before.kill9().await;

    // Rotation started: the current CA keeps signing, `pinproxy ca` hands
    // out the bundle of both.
    let (ok, stdout, stderr) = output(pinproxy(&["ca", "rotate"], dir.path())).await;
    assert!(ok, "{stderr}");
    let bundle = dir.path().join("ca-bundle.pem");
    assert_eq!(stdout.trim(), bundle.display().to_string());
    assert!(
        stderr.contains("keeps signing with the current CA"),
        "{stderr}"
    );
    let (ok, stdout, stderr) = output(pinproxy(&["ca"], dir.path())).await;
    assert!(
        ok && stdout.trim() == bundle.display().to_string(),
        "{stdout}{stderr}"
    );
    let bundle = keep("bundle.pem", &bundle);
    let next_only = keep("next.pem", &dir.path().join("ca-next.pem"));
    let chromium = Chromium::new();
    chromium.trust_pinproxy(dir.path()).await;

    let during = start(dir.path(), &origin, &urls).await;
    for ca in [&old_only, &bundle] {
        curl(Some(during.addr), ca, &url, None)
            .await
            .unwrap_or_else(|e| panic!("during the overlap, trusting {}: {e}", ca.display()));
    }
    let early = curl(Some(during.addr), &next_only, &url, None).await;
    assert!(
        early.is_err(),
        "the next CA does not sign before the rotation is finished"
    );
    let dom = chromium.dump_dom(Some(during.addr), &url).await;
    assert!(dom.contains("127.0.0.2"), "Chromium trusting both: {dom}");
    during.kill9().await;

    // Finished: the next CA signs; the bundle and the new CA are accepted,
    // the old CA alone no longer.
    let (ok, stdout, stderr) = output(pinproxy(&["ca", "rotate", "--finish"], dir.path())).await;
    assert!(ok, "{stderr}");
    assert_eq!(
        stdout.trim(),
        dir.path().join("ca.pem").display().to_string()
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("ca-old.pem")).unwrap(),
        std::fs::read_to_string(&old_only).unwrap()
    );
    assert!(!dir.path().join("ca-next-key.pem").exists());
    let after = start(dir.path(), &origin, &urls).await;
    for ca in [&bundle, &next_only] {
        curl(Some(after.addr), ca, &url, None)
            .await
            .unwrap_or_else(|e| panic!("after the rotation, trusting {}: {e}", ca.display()));
    }
    let refused = curl(Some(after.addr), &old_only, &url, None)
        .await
        .unwrap_err();
    assert!(refused.contains("certificate"), "{refused}");
    let dom = chromium.dump_dom(Some(after.addr), &url).await;
    assert!(dom.contains("127.0.0.2"), "Chromium trusting both: {dom}");
    after.kill9().await;
}

/// A TLS server on 127.0.0.1 serving a leaf for `host` signed by the CA in
/// `ca_dir` (minted here, by hand, as anyone holding the key could), with a
/// page naming the host.
async fn hand_minted_server(ca_dir: &Path, host: &str) -> u16 {
    let cert_pem = std::fs::read_to_string(ca_dir.join("ca.pem")).unwrap();
    let key =
        KeyPair::from_pem(&std::fs::read_to_string(ca_dir.join("ca-key.pem")).unwrap()).unwrap();
    let issuer = Issuer::from_ca_cert_pem(&cert_pem, key).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec![host.to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &issuer)
        .unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![leaf.der().clone(), CertificateDer::from(pem_der(&cert_pem))],
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der())),
    )
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let body = format!("<!doctype html><p id=marker>served {host}</p>");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let body = body.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && head.len() < 16 * 1024 {
                    if !matches!(tls.read(&mut byte).await, Ok(1)) {
                        return;
                    }
                    head.push(byte[0]);
                }
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tls.write_all(response.as_bytes()).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    port
}

fn pem_der(pem: &str) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject as _;
    CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn name_constraints_are_honoured_by_curl_and_chromium() {
    let ca_dir = tempfile::tempdir().unwrap();
    let (ok, _, stderr) = output(pinproxy(
        &[
            "ca",
            "--permitted-domain",
            "inside.test",
            "--permitted-domain",
            "localhost",
        ],
        ca_dir.path(),
    ))
    .await;
    assert!(ok, "{stderr}");
    let ca = ca_dir.path().join("ca.pem");
    let inside = hand_minted_server(ca_dir.path(), "inside.test").await;
    let outside = hand_minted_server(ca_dir.path(), "outside.test").await;

    // curl: the leaf inside the constraints is accepted, the one outside
    // rejected, though the same CA signed both.
    let body = curl(
        None,
        &ca,
        &format!("https://inside.test:{inside}/"),
        Some(&format!("inside.test:{inside}:127.0.0.1")),
    )
    .await
    .unwrap();
    assert!(body.contains("served inside.test"), "{body}");
    let refused = curl(
        None,
        &ca,
        &format!("https://outside.test:{outside}/"),
        Some(&format!("outside.test:{outside}:127.0.0.1")),
    )
    .await
    .unwrap_err();
    assert!(
        refused.to_ascii_lowercase().contains("subtree"),
        "curl rejects it for the name constraint: {refused}"
    );

    // Chromium, trusting the CA in its NSS database, likewise.
    let chromium = chromium_trusting("constrained", &ca).await;
    let profile = tempfile::tempdir().unwrap();
    let rules =
        "MAP inside.test 127.0.0.1, MAP outside.test 127.0.0.1, MAP * ~NOTFOUND, EXCLUDE localhost";
    let mut browser = Devtools::launch(
        chromium.home(),
        profile.path(),
        &[
            "--no-proxy-server".into(),
            format!("--host-resolver-rules={rules}"),
        ],
    )
    .await;
    browser
        .navigate(&format!("https://inside.test:{inside}/"))
        .await
        .unwrap();
    let marker = browser
        .wait_for_text(
            "document.getElementById('marker')?.textContent ?? ''",
            Duration::from_secs(20),
        )
        .await;
    assert_eq!(marker.as_deref(), Some("served inside.test"));
    let error = browser
        .navigate(&format!("https://outside.test:{outside}/"))
        .await
        .unwrap_err();
    assert!(
        error.contains("ERR_CERT"),
        "Chromium rejects the leaf: {error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinproxy_intercepts_only_hosts_its_constrained_ca_may_sign_for() {
    let s = Setup::builder()
        .exits(1)
        .config(|c| c.ca.permitted_domains = vec!["localhost".into()])
        .start()
        .await;
    let addr = s.proxy.daemon.local_addr();
    let ca = s.proxy.daemon.ca_cert_path();
    let port = s.origin.https.port();

    // Inside: curl and Chromium accept pinproxy's leaf for localhost.
    let body = curl(
        Some(addr),
        &ca,
        &format!("https://localhost:{port}/ip"),
        None,
    )
    .await
    .unwrap();
    assert!(body.starts_with("127.0.0.2"), "{body}");
    let chromium = chromium_trusting("constrained", &ca).await;
    let dom = chromium
        .dump_dom(Some(addr), &format!("https://localhost:{port}/ip"))
        .await;
    assert!(dom.contains("127.0.0.2"), "{dom}");

    // Outside: refused before anything is dialled, saying why.
    let (_, head) = s.proxy.client.raw_connect("outside.test:443").await;
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("x-pinproxy-error: outside-ca-constraints: outside.test is outside"),
        "{head}"
    );
    let refused = curl(Some(addr), &ca, "https://outside.test/", None)
        .await
        .unwrap_err();
    assert!(refused.contains("403"), "{refused}");
    assert!(
        s.exits[0]
            .connects()
            .iter()
            .all(|c| !c.target.contains("outside.test")),
        "an outside host reached the exit"
    );
    s.stop().await;
}
