//! Headless Firefox (Debian's `firefox-esr`) for tests, kept on loopback.
//!
//! Each run has a fresh profile directory: a `user.js` that sends every
//! request, `localhost` included (`allow_hijacking_localhost`), to an HTTP
//! proxy, and turns off what Firefox does in the background (updates,
//! telemetry, Safe Browsing, captive-portal and connectivity checks, DNS
//! over HTTPS, prefetching); and an NSS database trusting the CAs the
//! [`Firefox`] was given. The proxy is always a [`ConnectTap`], which
//! passes on only requests for `localhost`: a background request Firefox
//! still makes is refused there, before any proxy (or resolver) sees its
//! host. A direct baseline goes through a plain CONNECT proxy (tinyproxy),
//! which relays bytes and changes nothing a client encodes.
//!
//! A run ends when the caller's condition holds (the origin has seen the
//! requests it waits for) or its deadline passes; Firefox, started in a
//! process group of its own, is then killed with its content processes
//! (on a panic too).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::process::Command;

use super::browser::ConnectTap;
use super::procs::require;

/// How long one Firefox run may take.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(90);
/// How long a `certutil` run may take.
const TOOL_TIMEOUT: Duration = Duration::from_secs(30);

/// The preferences of every run, after the proxy's.
const PREFS: &str = r#"
user_pref("network.proxy.no_proxies_on", "");
user_pref("network.proxy.allow_hijacking_localhost", true);
user_pref("network.proxy.share_proxy_settings", true);
user_pref("network.trr.mode", 5);
user_pref("network.dns.disablePrefetch", true);
user_pref("network.prefetch-next", false);
user_pref("network.http.speculative-parallel-limit", 0);
user_pref("network.http.http3.enable", false);
user_pref("network.captive-portal-service.enabled", false);
user_pref("network.connectivity-service.enabled", false);
user_pref("app.update.auto", false);
user_pref("app.update.enabled", false);
user_pref("app.normandy.enabled", false);
user_pref("browser.safebrowsing.malware.enabled", false);
user_pref("browser.safebrowsing.phishing.enabled", false);
user_pref("browser.safebrowsing.downloads.enabled", false);
user_pref("browser.safebrowsing.blockedURIs.enabled", false);
user_pref("browser.shell.checkDefaultBrowser", false);
user_pref("browser.startup.homepage_override.mstone", "ignore");
user_pref("browser.startup.page", 0);
user_pref("browser.newtabpage.enabled", false);
user_pref("browser.search.update", false);
user_pref("datareporting.healthreport.uploadEnabled", false);
user_pref("datareporting.policy.dataSubmissionEnabled", false);
user_pref("toolkit.telemetry.enabled", false);
user_pref("toolkit.telemetry.unified", false);
user_pref("extensions.update.enabled", false);
user_pref("extensions.getAddons.cache.enabled", false);
user_pref("dom.push.enabled", false);
user_pref("geo.enabled", false);
user_pref("browser.region.network.url", "");
user_pref("browser.region.update.enabled", false);
user_pref("security.OCSP.enabled", 0);
user_pref("security.remote_settings.crlite_filters.enabled", false);
user_pref("media.gmp-manager.updateEnabled", false);
"#;

/// A headless Firefox that trusts a set of CAs.
pub struct Firefox {
    dir: tempfile::TempDir,
    cas: Vec<PathBuf>,
    runs: AtomicUsize,
}

impl Firefox {
    /// A Firefox trusting the CA certificates (PEM) in `cas` as TLS server
    /// CAs.
    pub fn trusting(cas: &[PathBuf]) -> Firefox {
        require("firefox-esr");
        require("certutil");
        Firefox {
            dir: tempfile::tempdir().unwrap(),
            cas: cas.to_vec(),
            runs: AtomicUsize::new(0),
        }
    }

    /// Loads `url` through the HTTP proxy `proxy` (behind a
    /// [`ConnectTap`]) with a fresh profile, and ends Firefox once `done`
    /// has completed. Panics if Firefox exits first, `done` takes longer
    /// than [`RUN_TIMEOUT`], or Firefox never used the proxy. Returns the
    /// request lines the tap refused (Firefox's background requests).
    pub async fn load_until<F>(&self, proxy: SocketAddr, url: &str, done: F) -> Vec<String>
    where
        F: std::future::Future<Output = ()>,
    {
        let tap = ConnectTap::start(proxy).await;
        let profile = self.profile(tap.addr).await;
        let mut command = Command::new(require("firefox-esr"));
        command
            .env("HOME", self.dir.path())
            .env("MOZ_HEADLESS", "1")
            .args(["--headless", "--no-remote", "--profile"])
            .arg(&profile)
            .arg(url)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .kill_on_drop(true);
        let mut child = command.spawn().unwrap();
        // Ends the whole group, the parent and its content processes, when
        // the run ends, a panic included.
        let group = KillGroup(child.id().unwrap());
        let outcome = tokio::time::timeout(RUN_TIMEOUT, async {
            tokio::select! {
                () = done => Ok(()),
                status = child.wait() => Err(status),
            }
        })
        .await;
        drop(group);
        let _ = child.wait().await;
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(status)) => panic!("Firefox exited before the page was done: {status:?}"),
            Err(_) => panic!("Firefox did not finish {url} within {RUN_TIMEOUT:?}"),
        }
        assert!(
            !tap.requests().is_empty(),
            "Firefox never used the proxy for {url}"
        );
        tap.refused()
    }

    /// A fresh profile whose proxy is `tap` and which trusts the CAs.
    async fn profile(&self, tap: SocketAddr) -> PathBuf {
        let run = self.runs.fetch_add(1, Ordering::SeqCst);
        let profile = self.dir.path().join(format!("profile-{run}"));
        std::fs::create_dir_all(&profile).unwrap();
        let proxy = format!(
            "user_pref(\"network.proxy.type\", 1);\n\
             user_pref(\"network.proxy.http\", \"{ip}\");\n\
             user_pref(\"network.proxy.http_port\", {port});\n\
             user_pref(\"network.proxy.ssl\", \"{ip}\");\n\
             user_pref(\"network.proxy.ssl_port\", {port});\n",
            ip = tap.ip(),
            port = tap.port()
        );
        std::fs::write(profile.join("user.js"), proxy + PREFS).unwrap();
        let certutil = require("certutil");
        let db = format!("sql:{}", profile.display());
        let mut command = Command::new(&certutil);
        command.args(["-N", "-d", &db, "--empty-password"]);
        super::procs::run_bounded(command, TOOL_TIMEOUT).await;
        for (n, ca) in self.cas.iter().enumerate() {
            let mut command = Command::new(&certutil);
            command
                .args([
                    "-A",
                    "-d",
                    &db,
                    "-n",
                    &format!("test CA {n}"),
                    "-t",
                    "C,,",
                    "-i",
                ])
                .arg(ca);
            super::procs::run_bounded(command, TOOL_TIMEOUT).await;
        }
        profile
    }
}

/// Kills the process group whose leader is the process it names (one this
/// module started with a group of its own) when dropped.
struct KillGroup(u32);

impl Drop for KillGroup {
    fn drop(&mut self) {
        let group = format!("-{}", self.0);
        let _ = std::process::Command::new("kill")
            .args(["-KILL", "--", &group])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}
