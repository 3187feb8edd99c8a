//! Headless Chromium (Debian's `/usr/bin/chromium`) for tests, kept on
//! loopback.
//!
//! Chromium makes background requests to Google hosts even with
//! `--disable-background-networking`. Through a proxy those would make
//! pinproxy (and its exit) resolve external names, so only `localhost` may
//! reach the proxy and no name but `localhost` may reach a resolver:
//!
//! - a fixed proxy with the bypass list [`PROXY_BYPASS_LIST`],
//!   `<-loopback>;*.*`: `<-loopback>` cancels Chromium's implicit bypass of
//!   loopback names, so `localhost` goes to the proxy, and `*.*` sends every
//!   name with a dot (every Internet host) direct;
//! - `--host-resolver-rules` ([`HOST_RESOLVER_RULES`]) then makes those
//!   direct names fail inside Chromium, without a DNS query;
//! - every proxied run goes through a [`ConnectTap`] in front of the proxy,
//!   which refuses (and the run then fails on) any request for another
//!   host than `localhost`.
//!
//! A PAC script that proxies only `localhost` cannot do this: Chromium
//! applies the PAC to other hosts but always sends loopback names
//! (`localhost`, 127.0.0.0/8, `[::1]`) direct when its proxy settings come
//! from a PAC script, and no switch turns that off (measured on Chromium
//! 156: a PAC answering `PROXY` for every host fails `example.invalid`
//! with ERR_PROXY_CONNECTION_FAILED but reaches `localhost` directly).
//!
//! Chromium trusts what is in `$HOME/.pki/nssdb`: [`Chromium::trust_pinproxy`]
//! installs pinproxy's CA there the way the README tells users to
//! (`pinproxy ca install --nssdb`), [`Chromium::trust_ca_file`] any other CA
//! (the test PKI, for a direct baseline). Every run has a fresh profile
//! directory and a deadline; the process is killed by its handle when the
//! deadline passes.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::Command;
use tokio::task::JoinHandle;

use super::procs::require;

/// Every host name but `localhost` (and the proxy's address) fails inside
/// Chromium, without DNS.
pub const HOST_RESOLVER_RULES: &str = "MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1";

/// Proxy bypass rules for a fixed proxy: `<-loopback>` removes Chromium's
/// implicit bypass of loopback names, so `localhost` is proxied, and `*.*`
/// (a name with a dot) sends every Internet host direct. (`*` would send
/// `localhost` direct too: `<-loopback>` does not override an explicit
/// rule.)
pub const PROXY_BYPASS_LIST: &str = "<-loopback>;*.*";

/// The flags of every headless run: no sandbox (containers), nothing in
/// the background, no first-run UI, no QUIC.
pub const HEADLESS_FLAGS: &[&str] = &[
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-quic",
];

/// How long one Chromium run may take.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(90);
/// How long a `certutil` or `pinproxy ca install` run may take.
const TOOL_TIMEOUT: Duration = Duration::from_secs(30);

/// A headless Chromium with its own `HOME` (and so its own NSS database).
pub struct Chromium {
    home: PathBuf,
    _dir: Option<tempfile::TempDir>,
    runs: AtomicUsize,
}

impl Chromium {
    /// A Chromium with a fresh, empty `HOME`.
    pub fn new() -> Chromium {
        let dir = tempfile::tempdir().unwrap();
        Chromium {
            home: dir.path().to_owned(),
            _dir: Some(dir),
            runs: AtomicUsize::new(0),
        }
    }

    /// A Chromium whose `HOME` is `home` (kept by the caller).
    pub fn in_home(home: &Path) -> Chromium {
        Chromium {
            home: home.to_owned(),
            _dir: None,
            runs: AtomicUsize::new(0),
        }
    }

    /// Its `HOME`.
    pub fn home(&self) -> &Path {
        &self.home
    }

    /// Its NSS database.
    pub fn nssdb(&self) -> PathBuf {
        self.home.join(".pki/nssdb")
    }

    /// Trusts the CA of the pinproxy whose data directory is `data_dir`:
    /// `pinproxy ca install --nssdb`, as the README says.
    pub async fn trust_pinproxy(&self, data_dir: &Path) {
        require("certutil");
        let mut command = Command::new(env!("CARGO_BIN_EXE_pinproxy"));
        command
            .args(["ca", "--data-dir"])
            .arg(data_dir)
            .args(["install", "--nssdb"])
            .arg(self.nssdb());
        super::procs::run_bounded(command, TOOL_TIMEOUT).await;
    }

    /// Trusts the CA certificate in `ca_file` (PEM) as a TLS server CA,
    /// creating the NSS database if there is none.
    pub async fn trust_ca_file(&self, nickname: &str, ca_file: &Path) {
        let certutil = require("certutil");
        let db = format!("sql:{}", self.nssdb().display());
        if !self.nssdb().join("cert9.db").is_file() {
            std::fs::create_dir_all(self.nssdb()).unwrap();
            let mut command = Command::new(&certutil);
            command.args(["-N", "-d", &db, "--empty-password"]);
            super::procs::run_bounded(command, TOOL_TIMEOUT).await;
        }
        let mut command = Command::new(&certutil);
        command
            .args(["-A", "-d", &db, "-n", nickname, "-t", "C,,", "-i"])
            .arg(ca_file);
        super::procs::run_bounded(command, TOOL_TIMEOUT).await;
    }

    /// Loads `url` (through the HTTP proxy `proxy`, or direct) with a fresh
    /// profile and returns the DOM once the page, and any script-driven
    /// navigation within the virtual-time budget, has settled. Panics if
    /// Chromium fails or takes longer than [`RUN_TIMEOUT`], and, through a
    /// proxy, if it asked the proxy for another host than `localhost` (see
    /// [`ConnectTap`]) or never used it.
    pub async fn dump_dom(&self, proxy: Option<SocketAddr>, url: &str) -> String {
        let tap = match proxy {
            Some(proxy) => Some(ConnectTap::start(proxy).await),
            None => None,
        };
        let mut command = self.headless();
        match &tap {
            Some(tap) => command
                .arg(format!("--proxy-server=http://{}", tap.addr))
                .arg(format!("--proxy-bypass-list={PROXY_BYPASS_LIST}")),
            None => command.arg("--no-proxy-server"),
        };
        command.arg("--dump-dom").arg(url);
        let output = super::procs::run_bounded(command, RUN_TIMEOUT).await;
        if let Some(tap) = tap {
            let refused = tap.refused();
            assert!(
                refused.is_empty(),
                "Chromium asked the proxy for other hosts than localhost: {refused:?}"
            );
            assert!(
                !tap.requests().is_empty(),
                "Chromium never used the proxy for {url}"
            );
        }
        String::from_utf8(output.stdout).unwrap()
    }
}

impl Chromium {
    /// A headless Chromium command with a fresh profile, a virtual-time
    /// budget and the resolver rules; the caller adds the proxy settings,
    /// what to do and the URL.
    fn headless(&self) -> Command {
        let run = self.runs.fetch_add(1, Ordering::SeqCst);
        let profile = self.home.join(format!("profile-{run}"));
        let mut command = Command::new(require("chromium"));
        command
            .env("HOME", &self.home)
            .args(HEADLESS_FLAGS)
            .arg("--virtual-time-budget=10000")
            .arg(format!("--host-resolver-rules={HOST_RESOLVER_RULES}"))
            .arg(format!("--user-data-dir={}", profile.display()));
        command
    }

    /// Loads `url` directly (no proxy) and saves a PNG screenshot of the
    /// page, once it has settled within the virtual-time budget, to `path`
    /// (`width` x `height` pixels). Panics unless Chromium succeeds and
    /// the file is a PNG.
    pub async fn screenshot(&self, url: &str, path: &Path, width: u32, height: u32) {
        let mut command = self.headless();
        command
            .arg("--no-proxy-server")
            .arg("--hide-scrollbars")
            .arg(format!("--window-size={width},{height}"))
            .arg(format!("--screenshot={}", path.display()))
            .arg(url);
        super::procs::run_bounded(command, RUN_TIMEOUT).await;
        let png = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(
            png.starts_with(b"\x89PNG"),
            "{} is not a PNG",
            path.display()
        );
    }
}

/// A TCP relay in front of an HTTP proxy: it reads the request line of each
/// connection, passes connections that ask for `localhost` on to the proxy
/// byte for byte, and refuses (closes) any other. Only the first request
/// line of a connection is seen, which is all a `CONNECT` tunnel has.
pub struct ConnectTap {
    /// Where it listens (give it to the client as its proxy).
    pub addr: SocketAddr,
    log: Arc<Mutex<TapLog>>,
    task: JoinHandle<()>,
}

#[derive(Default)]
struct TapLog {
    requests: Vec<String>,
    refused: Vec<String>,
}

impl Drop for ConnectTap {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ConnectTap {
    /// A tap in front of the HTTP proxy at `proxy`.
    pub async fn start(proxy: SocketAddr) -> ConnectTap {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let log = Arc::new(Mutex::new(TapLog::default()));
        let shared = log.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let log = shared.clone();
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(RUN_TIMEOUT, relay(client, proxy, log)).await;
                });
            }
        });
        ConnectTap { addr, log, task }
    }

    /// The request lines passed on.
    pub fn requests(&self) -> Vec<String> {
        self.log.lock().unwrap().requests.clone()
    }

    /// The request lines refused.
    pub fn refused(&self) -> Vec<String> {
        self.log.lock().unwrap().refused.clone()
    }
}

/// Whether a request line asks for `localhost` (`CONNECT localhost:443
/// HTTP/1.1`, or an absolute-form `http://localhost:80/...`).
fn for_localhost(line: &str) -> bool {
    let target = line.split(' ').nth(1).unwrap_or_default();
    let authority = target
        .strip_prefix("http://")
        .or_else(|| target.strip_prefix("https://"))
        .unwrap_or(target);
    let host = authority.split(['/', ':']).next().unwrap_or_default();
    host.eq_ignore_ascii_case("localhost")
}

async fn relay(mut client: TcpStream, proxy: SocketAddr, log: Arc<Mutex<TapLog>>) {
    const MAX_LINE: usize = 8 * 1024;
    let mut head = Vec::new();
    let mut chunk = [0u8; 1024];
    while !head.windows(2).any(|w| w == b"\r\n") {
        match client.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) if head.len() + n <= MAX_LINE => head.extend_from_slice(&chunk[..n]),
            Ok(_) => return,
        }
    }
    let line_end = head
        .windows(2)
        .position(|w| w == b"\r\n")
        .unwrap_or(head.len());
    let line = String::from_utf8_lossy(&head[..line_end]).into_owned();
    if !for_localhost(&line) {
        log.lock().unwrap().refused.push(line);
        return;
    }
    log.lock().unwrap().requests.push(line);
    let Ok(mut upstream) = TcpStream::connect(proxy).await else {
        return;
    };
    if upstream.write_all(&head).await.is_err() {
        return;
    }
    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
}
