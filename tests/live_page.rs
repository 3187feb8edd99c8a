//! The live page on the admin listener, rendered by headless Chromium
//! talking to the admin listener directly (no proxy): its script runs under
//! the page's Content-Security-Policy, polls `/summary` and shows the exits
//! and the newest identities of a proxy that has served requests. A
//! screenshot is saved to `target/test-artifacts/live-page.png`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support;

use std::path::PathBuf;

use support::browser::Chromium;
use support::{admin, Jar, Setup};

/// Where tests leave files for people to look at.
fn artifacts_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
    let dir = target.join("test-artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_page_shows_the_exits_and_identities_of_a_running_proxy() {
    let s = Setup::builder().exits(2).start().await;
    // Identities on both exits (rotation alternates), each with a request
    // after its login; and cookie-less traffic.
    let mut jars = Vec::new();
    for _ in 0..3 {
        let (mut jar, _) = s.login("/login").await;
        assert_eq!(s.get("/page", &mut jar).await.status, 200);
        jars.push(jar);
    }
    assert_eq!(
        s.get("/status?code=404", &mut Jar::default()).await.status,
        404
    );

    let addr = s.proxy.daemon.admin_addr().unwrap();
    let page = admin::request(addr, "GET", "/").await;
    assert_eq!(page.status, 200);
    assert!(page
        .header("content-type")
        .unwrap()
        .starts_with("text/html"));
    let policy = page.header("content-security-policy").unwrap();
    assert!(
        policy.starts_with("default-src 'none'") && policy.contains("script-src 'sha256-"),
        "{policy}"
    );

    let identities = s.proxy.daemon.admin().identities(false).await.unwrap();
    assert_eq!(identities.len(), 3);
    let url = format!("http://{addr}/");
    let chromium = Chromium::new();
    let dom = chromium.dump_dom(None, &url).await;

    // The script ran (the CSP let it) and rendered the summary.
    assert!(
        !dom.contains("loading…"),
        "the script did not render:\n{dom}"
    );
    for exit in ["exit1", "exit2"] {
        assert!(
            dom.contains(&format!("data-exit=\"{exit}\"")),
            "{exit} missing:\n{dom}"
        );
    }
    assert!(dom.contains("healthy"), "{dom}");
    for identity in &identities {
        assert!(
            dom.contains(&format!("data-identity=\"{}\"", identity.identity)),
            "identity {} missing:\n{dom}",
            identity.identity
        );
        for credential in &identity.credentials {
            let shown = format!("{}#{}", credential.name, credential.hash);
            assert!(dom.contains(&shown), "{shown} missing:\n{dom}");
        }
    }
    // Last statuses are the ones the identities' requests got.
    assert!(dom.contains(">200<"), "{dom}");
    for jar in &jars {
        let value = jar.get("datadome").unwrap();
        assert!(!dom.contains(value), "a cookie value on the page");
    }

    let shot = artifacts_dir().join("live-page.png");
    chromium.screenshot(&url, &shot, 1280, 900).await;
    println!("live page screenshot: {}", shot.display());
    s.stop().await;
}
