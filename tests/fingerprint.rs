//! What an origin sees of real clients through pinproxy, compared with what
//! it sees of the same clients directly.
//!
//! Every test runs a fingerprint-recording origin
//! (`support::fingerprint_origin`: JA4 of each ClientHello, ALPN, the HTTP/2
//! preface's Akamai string, header names), pinproxy in-process and a
//! tinyproxy exit binding its outgoing connections to 127.0.0.2 (so the
//! origin tells proxied requests, from 127.0.0.2, from direct ones, from
//! 127.0.0.1). The clients are real programs: headless Chromium and
//! Firefox, curl, Python requests, Node's `https` and Go's `net/http`. Nothing leaves
//! loopback: Chromium proxies `localhost` only, every other name fails
//! inside it without DNS, and a relay in front of pinproxy refuses (and
//! fails the run on) any other host (`support::browser`, which also says
//! why a PAC script cannot do this); Firefox sends everything to a proxy
//! behind such a relay, which refuses its background requests
//! (`support::firefox`).
//!
//! The origin also reads every HTTP/2 header block as the client's HPACK
//! encoder sent it (each field's representation, Huffman choice and the
//! table index it refers to):
//! Chromium's, Firefox's, Go's and curl's blocks are the same through
//! pinproxy as directly, each family's own choices (`vendor/http2`).
//!
//! Measured (Debian 12; Chromium 156.0.8078.108, curl 7.88.1 with OpenSSL
//! 3.0.19 and nghttp2 1.52.0, Python 3.11.7 with requests 2.34.2 (pyenv) or
//! Debian's Python 3.11.2 with requests 2.28.1, Node 20.20.2 on the
//! system's OpenSSL 3.0.19, Firefox ESR 153.8, Go 1.19.8), mirror mode,
//! pinproxy on the same machine's `libssl.so.3`:
//!
//! | client | ALPN | JA4 direct | JA4 through pinproxy | upstream stack | Akamai (direct = through) |
//! | --- | --- | --- | --- | --- | --- |
//! | Chromium 156 | h2 | `t13d1517h2_8daaf6152771_cb7bf5808d99` | `t13d1517h2_8daaf6152771_cb7bf5808d99` | BoringSSL | `1:65536;2:0;4:6291456;6:262144\|15663105\|0\|m,a,s,p` |
//! | curl `--http2` | h2 | `t13d3112h2_e8f1e7e78f70_b26ce05bbdd6` | `t13d3112h2_e8f1e7e78f70_b26ce05bbdd6` | OpenSSL | `3:100;4:33554432;2:0\|33488897\|0\|m,p,s,a` |
//! | curl `--http1.1` | http/1.1 | `t13d3112h1_e8f1e7e78f70_b26ce05bbdd6` | `t13d3112h1_e8f1e7e78f70_b26ce05bbdd6` | OpenSSL | (HTTP/1.1) |
//! | Python requests 2.34.2 | http/1.1 | `t13d1812h1_85036bcba153_b26ce05bbdd6` | `t13d1812h1_85036bcba153_b26ce05bbdd6` | OpenSSL | (HTTP/1.1) |
//! | Python requests 2.28.1 (Debian) | http/1.1 | `t13d4312h1_c7886603b240_b26ce05bbdd6` | `t13d4312h1_c7886603b240_b26ce05bbdd6` | OpenSSL | (HTTP/1.1) |
//! | Node 20 `https` | none | `t13d591000_a33745022dd6_1f22a2ca17c4` | `t13d591000_a33745022dd6_1f22a2ca17c4` | OpenSSL | (HTTP/1.1) |
//! | Firefox ESR 153 | h2 | `t13d1617h2_86a278354501_3cbfd9057e0d` | `t13d1615h2_86a278354501_c1eccb039341` | BoringSSL (less `record_size_limit`, `delegated_credentials`) | `1:65536;2:0;4:131072;5:16384\|12517377\|0\|m,p,a,s` |
//!
//! Chromium is reproduced exactly by BoringSSL (JA4, the lists in its
//! order, ALPS, certificate compression, key shares, the Akamai string).
//! The OpenSSL clients are reproduced by the system's OpenSSL itself
//! (`upstream::tls::openssl_stack`), which BoringSSL cannot stand in for
//! (DHE, CBC-SHA384, ARIA and CCM suites, the 0x00ff SCSV, encrypt_then_mac,
//! post_handshake_auth, OpenSSL's padding, x448/ffdhe groups, OpenSSL's
//! signature algorithms). Asserted for each: the same JA4 and JA4_r, the
//! same ALPN agreed, every list of the hello in the same wire order (the
//! extension order too: OpenSSL's own), the same session id length,
//! padding and hello size, on every fresh connection, never resuming; for
//! curl `--http2` the same Akamai string. `difference` prints the lists
//! side by side. An origin pinproxy does not trust fails the OpenSSL
//! handshake with an `upstream-tls` error naming the host.
//!
//! Modes: `chrome` presents Chromium 156's hello and preface whatever the
//! client; `rustls` presents rustls's (`t13d1010h2_61a7ad8aa9b6_76ad8fd2bde2`
//! offering h2, `2:0;4:2097152;5:16384;6:16384|5177345|0|m,s,a,p`); an exit
//! may override the global mode. Only an identity's own connections
//! resume a TLS session (in chrome mode, and for Chromium's hello, always;
//! for another client's, once that client resumes with pinproxy, as Node
//! does), with a session its own earlier connection was given: a ticket
//! shared by visitors, identities or exits would link them.
//! An identity presents its founding client's fingerprint for every later
//! request, whoever sends it, across fresh connections and restarts.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support;

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use pinproxy::config::Config;
use pinproxy::fingerprint::client_hello::{is_grease, ClientHello};
use pinproxy::fingerprint::hpack::{EncodedField, Representation};
use pinproxy::fingerprint::ja4;
use pinproxy::upstream::{self, FingerprintMode};
use support::browser::Chromium;
use support::fingerprint_origin::{
    ConnRecord, FingerprintOrigin, OriginOptions, Record, LARGE_BODY,
};
use support::firefox::{Firefox, RUN_TIMEOUT};
use support::procs::{require, Tinyproxy};
use support::Setup;
use tokio::process::Command;

/// Chromium 156's JA4 (and so the chrome profile's).
const CHROME_JA4: &str = "t13d1517h2_8daaf6152771_cb7bf5808d99";
/// Chromium 156's HTTP/2 preface, Akamai form.
const CHROME_AKAMAI: &str = "1:65536;2:0;4:6291456;6:262144|15663105|0|m,a,s,p";
/// curl's (nghttp2's) HTTP/2 preface, Akamai form.
const CURL_AKAMAI: &str = "3:100;4:33554432;2:0|33488897|0|m,p,s,a";
/// rustls's JA4 on a full handshake offering h2 and http/1.1.
const RUSTLS_H2_JA4: &str = "t13d1010h2_61a7ad8aa9b6_76ad8fd2bde2";
/// hyper's HTTP/2 preface, Akamai form.
const HYPER_AKAMAI: &str = "2:0;4:2097152;5:16384;6:16384|5177345|0|m,s,a,p";

/// Where the tinyproxy exit's connections come from.
const EXIT_IP: &str = "127.0.0.2";
/// Deadline of one client process.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------- the rig

/// A fingerprint origin, tinyproxy exits and pinproxy over them.
struct Rig {
    origin: FingerprintOrigin,
    s: Setup,
    _tinies: Vec<Tinyproxy>,
}

impl Rig {
    /// One tinyproxy exit (`tiny`, from [`EXIT_IP`]); `tweak` adjusts
    /// pinproxy's configuration.
    async fn start(options: OriginOptions, tweak: impl FnOnce(&mut Config) + 'static) -> Rig {
        Rig::with_exits(options, &[("tiny", EXIT_IP)], tweak).await
    }

    /// Tinyproxy exits `(id, bind address)`, in order.
    async fn with_exits(
        options: OriginOptions,
        exits: &[(&str, &str)],
        tweak: impl FnOnce(&mut Config) + 'static,
    ) -> Rig {
        let mut tinies = Vec::new();
        let mut builder = Setup::builder();
        for (id, bind) in exits {
            let tiny = Tinyproxy::start(bind).await;
            builder = builder.exit_url(id, tiny.url());
            tinies.push(tiny);
        }
        // pinproxy trusts the harness origin's test PKI; the fingerprint
        // origin serves a leaf of the same PKI.
        let s = builder.config(tweak).start().await;
        let origin = FingerprintOrigin::start_with(s.origin.pki.clone(), options).await;
        Rig {
            origin,
            s,
            _tinies: tinies,
        }
    }

    /// Clients go through pinproxy, trusting its CA.
    fn proxied(&self) -> Via {
        Via {
            proxy: Some(self.s.proxy.daemon.local_addr()),
            ca: self.s.proxy.daemon.ca_cert_path(),
        }
    }

    /// Clients go straight to the origin, trusting the test PKI.
    fn direct(&self) -> Via {
        Via {
            proxy: None,
            ca: self.origin.pki.ca_file.clone(),
        }
    }

    /// A Chromium that trusts both pinproxy's CA and the test PKI.
    async fn chromium(&self) -> Chromium {
        let chromium = Chromium::new();
        chromium.trust_pinproxy(self.s.proxy.data_dir.path()).await;
        chromium
            .trust_ca_file("pinproxy test origin", &self.origin.pki.ca_file)
            .await;
        chromium
    }
}

// ---------------------------------------------------------------- clients

/// How a client reaches the origin: through the HTTP proxy `proxy` or
/// direct, trusting the CA in `ca`.
#[derive(Clone, Debug)]
struct Via {
    proxy: Option<SocketAddr>,
    ca: PathBuf,
}

/// The command-line clients.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Client {
    CurlH2,
    CurlH1,
    /// Python requests, the first `python3` on PATH.
    Python,
    /// Python requests, Debian's `/usr/bin/python3` (python3-requests).
    DebianPython,
    Node,
}

/// What a client got back.
#[derive(Debug)]
struct Got {
    status: u16,
    /// The `datadome` cookie the response set, if any.
    datadome: Option<String>,
}

/// Python requests, one GET on a fresh session: `URL PROXY CA COOKIE`
/// (empty PROXY: direct; empty COOKIE: none). The environment is not
/// consulted (`trust_env = False`), so which Python runs does not matter.
const PYTHON_GET: &str = r#"
import sys, requests
url, proxy, ca, cookie = sys.argv[1:5]
s = requests.Session()
s.trust_env = False
r = s.get(url, proxies={"https": proxy} if proxy else {}, verify=ca, timeout=20,
          headers={"Cookie": cookie} if cookie else {})
print(r.status_code)
print(r.headers.get("set-cookie", ""))
"#;

/// The Node scripts' `tunnel()`: Node 20 has no proxy support, so the
/// CONNECT to `proxy` (empty: none, the socket is made by `tls.connect`)
/// for `localhost:port` is opened by hand and TLS runs over its socket
/// (`createConnection`, no agent). Appended to each script ([`node_script`]),
/// whose `proxy` and `port` it reads.
const NODE_TUNNEL: &str = r#"
function tunnel() {
  if (!proxy) return Promise.resolve(undefined);
  const [host, proxyPort] = proxy.split(":");
  return new Promise((resolve, reject) => {
    const connect = http.request({ host, port: proxyPort, method: "CONNECT", path: `localhost:${port}` });
    connect.on("connect", (res, socket) =>
      res.statusCode === 200 ? resolve(socket) : reject(new Error(`CONNECT ${res.statusCode}`)));
    connect.on("error", reject);
    connect.end();
  });
}
"#;

/// `script` with [`NODE_TUNNEL`] (a function declaration, so callable from
/// anywhere in the script).
fn node_script(script: &str) -> String {
    format!("{script}{NODE_TUNNEL}")
}

/// Node's `https`, one GET on a fresh connection: `PROXY PORT PATH CA
/// COOKIE` (empty PROXY: direct), through [`NODE_TUNNEL`].
const NODE_GET: &str = r#"
const http = require("http"), https = require("https"), tls = require("tls"), fs = require("fs");
const [proxy, port, path, caFile, cookie] = process.argv.slice(1);
const ca = fs.readFileSync(caFile);
(async () => {
  const socket = await tunnel();
  const line = await new Promise((resolve, reject) => {
    const req = https.request({
      host: "localhost", port, path,
      headers: cookie ? { cookie } : {},
      createConnection: () => tls.connect({ socket, host: "localhost", port, servername: "localhost", ca }),
    }, (res) => {
      res.resume();
      res.on("end", () => {
        res.socket.destroy();
        resolve(`${res.statusCode}\n${(res.headers["set-cookie"] || []).join(", ")}`);
      });
    });
    req.setTimeout(20000, () => req.destroy(new Error("timeout")));
    req.on("error", reject);
    req.end();
  });
  console.log(line);
})().catch((e) => { console.error(e.message); process.exit(1); });
"#;

/// Node's `https`, one process making a GET of each path in turn, each on a
/// new connection, offering the TLS session its last connection was given
/// (as `https.Agent` keeps one per host), and sending the `datadome`
/// cookie the first answer set: `PROXY PORT CA PATH...` (empty PROXY:
/// direct). Prints each status.
const NODE_GETS_RESUMING: &str = r#"
const http = require("http"), https = require("https"), tls = require("tls"), fs = require("fs");
const [proxy, port, caFile, ...paths] = process.argv.slice(1);
const ca = fs.readFileSync(caFile);
let session, cookie;
async function get(path) {
  const socket = await tunnel();
  return new Promise((resolve, reject) => {
    const req = https.request({
      host: "localhost", port, path,
      headers: cookie ? { cookie } : {},
      createConnection: () => {
        const conn = tls.connect({ socket, host: "localhost", port, servername: "localhost", ca, session });
        conn.on("session", (s) => { session = s; });
        return conn;
      },
    }, (res) => {
      const set = (res.headers["set-cookie"] || []).find((c) => c.startsWith("datadome="));
      if (set) cookie = set.split(";")[0];
      res.resume();
      res.on("end", () => { res.socket.destroy(); resolve(res.statusCode); });
    });
    req.setTimeout(20000, () => req.destroy(new Error("timeout")));
    req.on("error", reject);
    req.end();
  });
}
(async () => {
  for (const path of paths) console.log(await get(path));
})().catch((e) => { console.error(e.message); process.exit(1); });
"#;

impl Client {
    fn name(self) -> &'static str {
        match self {
            Client::CurlH2 => "curl --http2",
            Client::CurlH1 => "curl --http1.1",
            Client::Python => "python requests",
            Client::DebianPython => "debian python requests",
            Client::Node => "node https",
        }
    }

    /// One GET of `path` on the origin listening on `port`, on a fresh
    /// connection (a new process), with `cookie` as its Cookie header.
    async fn get(self, via: &Via, port: u16, path: &str, cookie: Option<&str>) -> Got {
        let url = format!("https://localhost:{port}{path}");
        let proxy = via.proxy.map(|p| p.to_string()).unwrap_or_default();
        let mut command = match self {
            Client::CurlH2 | Client::CurlH1 => {
                let mut command = Command::new(require("curl"));
                let version = if self == Client::CurlH2 {
                    "--http2"
                } else {
                    "--http1.1"
                };
                command
                    .args(["-sS", "--fail", "--max-time", "20", version, "--cacert"])
                    .arg(&via.ca);
                match via.proxy {
                    Some(proxy) => command.arg("-x").arg(format!("http://{proxy}")),
                    None => command.args(["--noproxy", "*"]),
                };
                if let Some(cookie) = cookie {
                    command.arg("-H").arg(format!("Cookie: {cookie}"));
                }
                command
                    .args([
                        "-o",
                        "/dev/null",
                        "-w",
                        "%{http_code}\n%header{set-cookie}\n",
                    ])
                    .arg(&url);
                command
            }
            Client::Python | Client::DebianPython => {
                let python = if self == Client::Python {
                    require("python3")
                } else {
                    debian_python()
                };
                let mut command = Command::new(python);
                let proxy = via.proxy.map(|p| format!("http://{p}")).unwrap_or_default();
                command
                    .args(["-c", PYTHON_GET, &url, &proxy])
                    .arg(&via.ca)
                    .arg(cookie.unwrap_or_default());
                command
            }
            Client::Node => {
                let mut command = Command::new(require("node"));
                command
                    .args([
                        "-e",
                        &node_script(NODE_GET),
                        &proxy,
                        &port.to_string(),
                        path,
                    ])
                    .arg(&via.ca)
                    .arg(cookie.unwrap_or_default());
                command
            }
        };
        let out = run(&mut command).await;
        let mut lines = out.lines();
        let status = lines
            .next()
            .and_then(|l| l.trim().parse().ok())
            .unwrap_or_else(|| panic!("{}: no status in {out:?}", self.name()));
        let datadome = out.split("datadome=").nth(1).map(|rest| {
            rest.chars()
                .take_while(char::is_ascii_alphanumeric)
                .collect::<String>()
        });
        Got { status, datadome }
    }

    /// [`Client::get`], asserting a 200.
    async fn get_ok(self, via: &Via, port: u16, path: &str, cookie: Option<&str>) -> Got {
        let got = self.get(via, port, path, cookie).await;
        assert_eq!(got.status, 200, "{} {path} via {via:?}", self.name());
        got
    }
}

/// The `chrome` profile presents Chromium 156 ([`CHROME_JA4`],
/// [`CHROME_AKAMAI`]). The tests that run the installed Chromium compare it
/// with itself through pinproxy, so a Chromium update does not fail them;
/// this says when the installed one no longer matches the profile (time to
/// update the profile).
fn note_a_chromium_other_than_the_profile(direct: &Record) {
    let (ja4, akamai) = (direct.ja4(), direct.akamai());
    if ja4 != Some(CHROME_JA4) || akamai.as_deref() != Some(CHROME_AKAMAI) {
        eprintln!(
            "note: the installed Chromium presents JA4 {ja4:?} and HTTP/2 {akamai:?}; the chrome \
             profile presents Chromium 156's ({CHROME_JA4}, {CHROME_AKAMAI}): update the profile"
        );
    }
}

/// Debian's own Python (with python3-requests), whatever `python3` is on
/// PATH.
fn debian_python() -> PathBuf {
    let python = PathBuf::from("/usr/bin/python3");
    assert!(
        python.is_file(),
        "/usr/bin/python3 is not installed: run scripts/test.sh, which installs python3-requests"
    );
    python
}

/// Runs `command` to its end (killed after [`CLIENT_TIMEOUT`]) without any
/// proxy or CA setting from the environment; panics unless it succeeds.
async fn run(command: &mut Command) -> String {
    for var in [
        "http_proxy",
        "https_proxy",
        "all_proxy",
        "no_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "NO_PROXY",
        "REQUESTS_CA_BUNDLE",
        "CURL_CA_BUNDLE",
        "SSL_CERT_FILE",
        "NODE_EXTRA_CA_CERTS",
    ] {
        command.env_remove(var);
    }
    let command = std::mem::replace(command, Command::new("true"));
    let output = support::procs::run_bounded(command, CLIENT_TIMEOUT).await;
    String::from_utf8(output.stdout).unwrap()
}

// ---------------------------------------------------------------- comparing

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

/// The records of `path`, asserting there is at least one and every one
/// came from `peer`.
fn records_of(origin: &FingerprintOrigin, path: &str, peer: &str) -> Vec<Record> {
    let records = origin.requests_to(path);
    assert!(
        !records.is_empty(),
        "no request to {path} reached the origin"
    );
    for record in &records {
        assert_eq!(record.conn.peer.ip(), ip(peer), "{path}: {record:?}");
    }
    records
}

/// The one value every record has for `f`, asserting there is one.
fn one<T: PartialEq + std::fmt::Debug>(
    records: &[Record],
    what: &str,
    f: impl Fn(&Record) -> T,
) -> T {
    let mut values: Vec<T> = Vec::new();
    for record in records {
        let value = f(record);
        if !values.contains(&value) {
            values.push(value);
        }
    }
    assert_eq!(values.len(), 1, "more than one {what}: {values:?}");
    values.pop().unwrap()
}

/// Number of distinct connections the records came on.
fn connections(records: &[Record]) -> usize {
    records
        .iter()
        .map(|r| r.conn.index)
        .collect::<BTreeSet<_>>()
        .len()
}

fn hello(record: &Record) -> &ClientHello {
    record.conn.hello.as_deref().expect("a parsed ClientHello")
}

fn non_grease(list: &Option<Vec<u16>>) -> Vec<u16> {
    list.iter()
        .flatten()
        .copied()
        .filter(|v| !is_grease(*v))
        .collect()
}

fn hex(list: &[u16]) -> String {
    let items: Vec<String> = list.iter().map(|v| format!("{v:04x}")).collect();
    items.join(",")
}

/// What `through` leaves out of `direct`'s lists and adds to them, field by
/// field.
fn difference(direct: &ClientHello, through: &ClientHello) -> String {
    let lists: [(&str, Vec<u16>, Vec<u16>); 5] = [
        (
            "ciphers",
            non_grease(&Some(direct.cipher_suites.clone())),
            non_grease(&Some(through.cipher_suites.clone())),
        ),
        (
            "extensions",
            direct
                .extension_types()
                .filter(|t| !is_grease(*t))
                .collect(),
            through
                .extension_types()
                .filter(|t| !is_grease(*t))
                .collect(),
        ),
        (
            "groups",
            non_grease(&direct.supported_groups),
            non_grease(&through.supported_groups),
        ),
        (
            "key shares",
            non_grease(&direct.key_share_groups),
            non_grease(&through.key_share_groups),
        ),
        (
            "signature algorithms",
            non_grease(&direct.signature_algorithms),
            non_grease(&through.signature_algorithms),
        ),
    ];
    let mut out = String::new();
    for (what, d, t) in lists {
        let dropped: Vec<u16> = d.iter().copied().filter(|v| !t.contains(v)).collect();
        let added: Vec<u16> = t.iter().copied().filter(|v| !d.contains(v)).collect();
        out.push_str(&format!(
            "  {what}: direct [{}]\n    through [{}]\n    left out [{}] added [{}]\n",
            hex(&d),
            hex(&t),
            hex(&dropped),
            hex(&added)
        ));
    }
    out
}

/// What JA4 does not show but the same library with the same settings
/// reproduces: every list of the hello in its wire order (ciphers,
/// extensions, versions, groups, key shares, signature algorithms, ALPN,
/// PSK modes, point formats), the session id length and the hello's size
/// (so padding and every extension's payload length too).
fn assert_same_hello(name: &str, direct: &Record, through: &Record) {
    let (d, t) = (hello(direct), hello(through));
    let diff = difference(d, t);
    assert_eq!(
        non_grease(&Some(t.cipher_suites.clone())),
        non_grease(&Some(d.cipher_suites.clone())),
        "{name}: cipher order\n{diff}"
    );
    assert_eq!(
        t.extension_types().collect::<Vec<_>>(),
        d.extension_types().collect::<Vec<_>>(),
        "{name}: extension order\n{diff}"
    );
    for (what, dl, tl) in [
        ("versions", &d.supported_versions, &t.supported_versions),
        ("groups", &d.supported_groups, &t.supported_groups),
        ("key shares", &d.key_share_groups, &t.key_share_groups),
        (
            "signature algorithms",
            &d.signature_algorithms,
            &t.signature_algorithms,
        ),
    ] {
        assert_eq!(tl, dl, "{name}: {what}\n{diff}");
    }
    assert_eq!(t.alpn, d.alpn, "{name}: ALPN list\n{diff}");
    assert_eq!(t.psk_key_exchange_modes, d.psk_key_exchange_modes, "{name}");
    assert_eq!(t.ec_point_formats, d.ec_point_formats, "{name}");
    assert_eq!(t.session_id_len, d.session_id_len, "{name}");
    assert_eq!(t.padding_len, d.padding_len, "{name}: padding\n{diff}");
    assert_eq!(
        through.conn.hello_len, direct.conn.hello_len,
        "{name}: hello size\n{diff}"
    );
}

/// One line of the measurement table, printed for the record.
fn report(name: &str, direct: &Record, through: &Record) {
    println!(
        "| {name} | {} | {} | {} | {} / {} |",
        direct.alpn().unwrap_or("none"),
        direct.ja4().unwrap_or_default(),
        through.ja4().unwrap_or_default(),
        direct.akamai().unwrap_or_default(),
        through.akamai().unwrap_or_default(),
    );
    println!(
        "{name}: hello bytes direct {} through {}\n{name}: ja4_r direct  {}\n{name}: ja4_r through {}\n{}",
        direct.conn.hello_len,
        through.conn.hello_len,
        ja4::ja4_r(hello(direct)),
        ja4::ja4_r(hello(through)),
        difference(hello(direct), hello(through))
    );
}

// ---------------------------------------------------------------- Chromium

/// Headless Chromium loads the rig origin's `/direct` directly, then its
/// `/through` through pinproxy; returns the origin's (direct, through)
/// records.
async fn chromium_direct_and_through(rig: &Rig) -> (Vec<Record>, Vec<Record>) {
    let chromium = rig.chromium().await;
    let dom = chromium.dump_dom(None, &rig.origin.url("/direct")).await;
    assert!(dom.contains("ok conn"), "Chromium direct: {dom}");
    let proxy = rig.s.proxy.daemon.local_addr();
    let dom = chromium
        .dump_dom(Some(proxy), &rig.origin.url("/through"))
        .await;
    assert!(dom.contains("ok conn"), "Chromium through pinproxy: {dom}");
    (
        records_of(&rig.origin, "/direct", "127.0.0.1"),
        records_of(&rig.origin, "/through", EXIT_IP),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chromium_through_pinproxy_is_chromium_to_the_origin() {
    let rig = Rig::start(OriginOptions::default(), |_| {}).await;
    let (direct, through) = chromium_direct_and_through(&rig).await;
    report("Chromium", &direct[0], &through[0]);
    note_a_chromium_other_than_the_profile(&direct[0]);
    assert_eq!(through[0].ja4(), direct[0].ja4());
    assert_eq!(
        ja4::ja4_r(hello(&through[0])),
        ja4::ja4_r(hello(&direct[0]))
    );
    assert_eq!(through[0].alpn(), Some("h2"));
    assert_eq!(through[0].alpn(), direct[0].alpn());
    assert!(
        direct[0].akamai().is_some(),
        "no HTTP/2 preface recorded for Chromium"
    );
    assert_eq!(through[0].akamai(), direct[0].akamai());
    // Beyond JA4: the lists in Chromium's own order, ALPS, certificate
    // compression and the key shares (X25519MLKEM768 first).
    let (d, t) = (hello(&direct[0]), hello(&through[0]));
    let diff = difference(d, t);
    assert_eq!(
        non_grease(&t.supported_groups),
        non_grease(&d.supported_groups),
        "{diff}"
    );
    assert_eq!(
        non_grease(&t.key_share_groups),
        non_grease(&d.key_share_groups),
        "{diff}"
    );
    assert_eq!(
        non_grease(&t.signature_algorithms),
        non_grease(&d.signature_algorithms),
        "{diff}"
    );
    assert_eq!(
        non_grease(&Some(t.cipher_suites.clone())),
        non_grease(&Some(d.cipher_suites.clone())),
        "{diff}"
    );
    assert_eq!(t.alps, d.alps, "{diff}");
    assert_eq!(t.compress_certificate, d.compress_certificate, "{diff}");
    assert!(t.greases() && t.ech(), "GREASE and ECH GREASE, as Chromium");
}

/// Chromium reaching an HTTP/1.1-only origin through pinproxy speaks
/// HTTP/2 to pinproxy (it offers h2, and pinproxy answers its hello before
/// any origin is dialled), and the origin gets the request as Chromium
/// writes it over HTTP/1.1: `Host`, then `Connection: keep-alive`, then
/// the same names in the same order and case (its client hints lower case,
/// the others capitalised), and no `priority` header (Chromium sends it
/// over HTTP/2 only). The names went lower case, without `Connection`,
/// with `priority`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chromium_reaches_an_http1_only_origin_as_chromium_writes_http1() {
    let rig = Rig::start(OriginOptions::default().http1_only(), |_| {}).await;
    let (direct, through) = chromium_direct_and_through(&rig).await;
    assert_eq!(
        (direct[0].version, through[0].version),
        (http::Version::HTTP_11, http::Version::HTTP_11)
    );
    assert_eq!(
        direct[0].header_names[..2],
        ["Host", "Connection"],
        "{direct:?}"
    );
    assert!(
        direct[0].header_names.iter().any(|n| n == "sec-ch-ua"),
        "{direct:?}"
    );
    assert_eq!(through[0].header_names, direct[0].header_names);
}

// ---------------------------------------------------------------- OpenSSL clients

/// `client` twice directly and three times through pinproxy, each on a
/// fresh connection (a new process; the origin closes every connection
/// after one response, so pinproxy dials anew too). Returns (direct,
/// through) records.
async fn direct_and_through(rig: &Rig, client: Client) -> (Vec<Record>, Vec<Record>) {
    let port = rig.origin.port();
    for _ in 0..2 {
        client.get_ok(&rig.direct(), port, "/direct", None).await;
    }
    for _ in 0..3 {
        client.get_ok(&rig.proxied(), port, "/through", None).await;
    }
    let direct = records_of(&rig.origin, "/direct", "127.0.0.1");
    let through = records_of(&rig.origin, "/through", EXIT_IP);
    assert_eq!(connections(&direct), 2, "{}", client.name());
    // The origin sends GOAWAY right after each HTTP/2 answer, but a request
    // pinproxy sends before that GOAWAY arrives is still served on the
    // connection: two or three connections, each a fresh handshake.
    let through_conns = connections(&through);
    assert!(
        (2..=3).contains(&through_conns),
        "{}: {through_conns}",
        client.name()
    );
    (direct, through)
}

/// An OpenSSL-family client through pinproxy is the same client to the
/// origin: pinproxy's upstream hello is made by the system's OpenSSL from
/// the client's, so the JA4 and JA4_r are the client's own, the ALPN agreed
/// is the same, and so is every list of the hello in its wire order and
/// its size; on every fresh connection, never resuming. Returns the
/// (direct, through) records.
async fn openssl_client_is_itself_through_pinproxy(client: Client) -> (Vec<Record>, Vec<Record>) {
    let rig = Rig::start(OriginOptions::default().closing(), |_| {}).await;
    let (direct, through) = direct_and_through(&rig, client).await;
    let name = client.name();
    report(name, &direct[0], &through[0]);

    let direct_ja4 = one(&direct, "direct JA4", |r| r.ja4().map(str::to_owned)).unwrap();
    let through_ja4 = one(&through, "JA4 through pinproxy", |r| {
        r.ja4().map(str::to_owned)
    })
    .unwrap();
    assert_eq!(through_ja4, direct_ja4, "{name}: JA4");
    let ja4_r = |r: &Record| Some(ja4::ja4_r(hello(r)));
    assert_eq!(
        one(&through, "JA4_r through pinproxy", ja4_r),
        one(&direct, "direct JA4_r", ja4_r),
        "{name}: JA4_r"
    );
    assert_eq!(
        one(&through, "ALPN", |r| r.alpn().map(str::to_owned)),
        one(&direct, "ALPN", |r| r.alpn().map(str::to_owned)),
        "{name}"
    );
    for record in &through {
        assert_same_hello(name, &direct[0], record);
    }
    assert!(
        through.iter().all(|r| !r.conn.resumed),
        "{name}: pinproxy resumed a session"
    );
    (direct, through)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn curl_http2_is_curl_through_pinproxy_with_its_http2_preface() {
    let (direct, through) = openssl_client_is_itself_through_pinproxy(Client::CurlH2).await;
    assert!(direct[0].ja4().unwrap().contains("h2_"), "{direct:?}");
    // The h2 preface too: the same Akamai string.
    assert_eq!(
        one(&direct, "Akamai", Record::akamai).as_deref(),
        Some(CURL_AKAMAI)
    );
    assert_eq!(
        one(&through, "Akamai", Record::akamai),
        one(&direct, "Akamai", Record::akamai)
    );
    // Its opening flight, and its header block as curl's nghttp2 encodes
    // it (each connection's first).
    for record in &through {
        assert_opening_as_direct("curl", &direct[0].conn, &record.conn);
    }
    let first_block = |r: &Record| r.conn.blocks.first().cloned();
    let direct_block = one(&direct, "direct header block", first_block);
    assert!(direct_block.is_some(), "{direct:?}");
    assert_eq!(
        one(&through, "header block through pinproxy", first_block),
        direct_block
    );
}

/// An answer reaches the client with the headers its origin sent, over
/// HTTP/2 as over HTTP/1.1: no `Date` where the origin sent none (a page's
/// script could tell the answer apart from the same one fetched directly).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_answer_without_a_date_reaches_http2_and_http1_clients_without_one() {
    let rig = Rig::start(OriginOptions::default(), |_| {}).await;
    let proxy = rig.s.proxy.daemon.local_addr();
    for version in ["--http2", "--http1.1"] {
        let mut command = Command::new(require("curl"));
        command
            .args(["-sS", "--fail", "--max-time", "20", version, "--cacert"])
            .arg(rig.s.proxy.daemon.ca_cert_path())
            .arg("-x")
            .arg(format!("http://{proxy}"))
            .args(["-D", "-", "-o", "/dev/null"])
            .arg(rig.origin.url("/dateless"));
        let head = run(&mut command).await.to_ascii_lowercase();
        let status = if version == "--http2" {
            "http/2 200"
        } else {
            "http/1.1 200"
        };
        assert!(head.contains(status), "{version}: {head}");
        assert!(!head.contains("\ndate:"), "{version}: {head}");
    }
}

/// curl's cookies over HTTP/2 reach the origin encoded as curl's nghttp2
/// encodes them, not as a browser would: a cookie header shorter than 20
/// bytes as a never-indexed literal (nghttp2 keeps short cookies out of
/// every table, against guessing), a longer one added to the table.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn curl_http2_cookies_are_encoded_as_its_nghttp2_encodes_them() {
    let rig = Rig::start(OriginOptions::default().closing(), |_| {}).await;
    let port = rig.origin.port();
    let cookies = ["theme=dark", "theme=dark; lang=en-GB; tz=Europe/London"];
    for (via, path) in [(rig.direct(), "/direct"), (rig.proxied(), "/through")] {
        for cookie in cookies {
            Client::CurlH2.get_ok(&via, port, path, Some(cookie)).await;
            // Each cookie's block is compared as the first of a fresh
            // connection: the next request waits until the origin has
            // closed this one, or pinproxy could send it there before the
            // origin's GOAWAY arrives.
            rig.origin
                .wait_until_connections_end(Duration::from_secs(10))
                .await;
        }
    }
    let cookie_field = |r: &Record| -> Vec<(Representation, Option<bool>)> {
        r.conn.blocks[0]
            .iter()
            .filter(|f| f.name == "cookie")
            .map(|f| (f.representation, f.huffman))
            .collect()
    };
    let direct = records_of(&rig.origin, "/direct", "127.0.0.1");
    let through = records_of(&rig.origin, "/through", EXIT_IP);
    assert_eq!((direct.len(), through.len()), (2, 2));
    assert_eq!(
        cookie_field(&direct[0]),
        [(Representation::NeverIndexed, Some(true))]
    );
    assert_eq!(
        cookie_field(&direct[1]),
        [(Representation::Incremental, Some(true))]
    );
    for (d, t) in direct.iter().zip(&through) {
        assert_eq!(t.cookie, d.cookie);
        assert_eq!(
            t.conn.blocks.len(),
            1,
            "{:?} was not the first request of its connection",
            t.cookie
        );
        assert_eq!(t.conn.blocks[0], d.conn.blocks[0], "{:?}", d.cookie);
        assert_opening_as_direct("curl", &d.conn, &t.conn);
    }
}

/// Go's `net/http`, three GETs on one HTTP/2 connection: `URL PROXY CA
/// COOKIE` (empty PROXY: direct). Prints each answer's protocol and status.
const GO_GET: &str = r#"package main

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
)

func main() {
	target, proxy, ca, cookie := os.Args[1], os.Args[2], os.Args[3], os.Args[4]
	pem, err := os.ReadFile(ca)
	if err != nil {
		panic(err)
	}
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(pem)
	transport := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: roots}, ForceAttemptHTTP2: true}
	if proxy != "" {
		via, err := url.Parse(proxy)
		if err != nil {
			panic(err)
		}
		transport.Proxy = http.ProxyURL(via)
	}
	client := &http.Client{Transport: transport}
	for i := 0; i < 3; i++ {
		request, err := http.NewRequest("GET", target, nil)
		if err != nil {
			panic(err)
		}
		request.Header.Set("Cookie", cookie)
		response, err := client.Do(request)
		if err != nil {
			panic(err)
		}
		io.Copy(io.Discard, response.Body)
		response.Body.Close()
		fmt.Println(response.Proto, response.StatusCode)
	}
}
"#;

/// Go's `net/http` over HTTP/2 reaches the origin through pinproxy encoded
/// as Go encodes it, which is none of the browsers' ways: every field that
/// fits the table added to it, `:path` included; names taken from the
/// last static entry holding them; Huffman only where shorter; the
/// client's one `Cookie` header split at each `;`; and a table kept at
/// 4,096 bytes when the origin allows more, with no size update. Three
/// requests on one connection, directly and through pinproxy, field by
/// field. Its preface is Go's but for the header list and connection
/// window Go offers past pinproxy's ceilings, and its opening is Go's.
/// (Its hello is not: `report` prints both, and README's table has them.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn go_http2_is_encoded_through_pinproxy_as_go_encodes_it() {
    let go = require("go");
    // The origin allows a 64 KiB table: Go keeps its own at 4,096 bytes and
    // says nothing of it, whatever pinproxy has read of the origin by then.
    let rig = Rig::start(OriginOptions::default().header_table_size(65536), |_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let cookie = "theme=dark; lang=en-GB; tz=Europe/London";
    let mut blocks = Vec::new();
    let mut conns = Vec::new();
    let mut firsts = Vec::new();
    for (via, peer) in [(rig.direct(), "127.0.0.1"), (rig.proxied(), EXIT_IP)] {
        rig.origin.clear();
        go_get_three_times(&go, dir.path(), &rig, &via, cookie).await;
        let records = records_of(&rig.origin, "/go", peer);
        assert_eq!(records.len(), 3, "{records:?}");
        assert!(records
            .iter()
            .all(|r| r.conn.index == records[0].conn.index));
        assert_eq!(records[0].cookie.as_deref(), Some(cookie));
        conns.push(records[0].conn.clone());
        firsts.push(records[0].clone());
        blocks.push(
            rig.origin.connections()[records[0].conn.index]
                .blocks
                .clone(),
        );
    }
    report("Go", &firsts[0], &firsts[1]);
    assert_eq!(
        firsts[1].akamai(),
        Some(go_akamai_through_pinproxy(&firsts[0]))
    );
    assert_opening_as_direct("Go", &conns[0], &conns[1]);
    assert_blocks_as_direct(&blocks[0], &blocks[1], 3, |direct, report| {
        // Go's own choices, which are what this test is about.
        assert_eq!(
            cookie_representations(&direct[0]),
            [Representation::Incremental; 3],
            "{report}"
        );
        let path = direct[0].iter().find(|f| f.name == ":path").unwrap();
        assert_eq!(
            (path.representation, path.index),
            (Representation::Incremental, Some(5)),
            "{report}"
        );
        assert!(
            direct
                .iter()
                .flatten()
                .all(|f| f.representation != Representation::SizeUpdate),
            "{report}"
        );
    });
}

/// Runs [`GO_GET`] (built in `dir`) for the rig origin's `/go` through
/// `via` with `cookie`; asserts its three answers came over HTTP/2 with
/// a 200.
async fn go_get_three_times(go: &Path, dir: &Path, rig: &Rig, via: &Via, cookie: &str) {
    let program = dir.join("get.go");
    std::fs::write(&program, GO_GET).unwrap();
    let url = rig.origin.url("/go");
    let proxy = via.proxy.map(|p| format!("http://{p}")).unwrap_or_default();
    let mut command = Command::new(go);
    command
        .arg("run")
        .arg(&program)
        .args([url.as_str(), proxy.as_str()])
        .arg(&via.ca)
        .arg(cookie)
        .env(
            "GOCACHE",
            Path::new(env!("CARGO_TARGET_TMPDIR")).join("go-build"),
        )
        .env("GOPROXY", "off")
        .env("GOFLAGS", "-mod=mod")
        .env("GO111MODULE", "auto");
    let printed = run(&mut command).await;
    assert_eq!(
        printed.lines().filter(|l| *l == "HTTP/2.0 200").count(),
        3,
        "{printed}"
    );
}

/// The Akamai string pinproxy presents for the Go client seen in `direct`:
/// Go's preface, but for what it offers past pinproxy's ceilings, a
/// 10 MiB header list and a 1 GiB connection window (README, HTTP/2).
fn go_akamai_through_pinproxy(direct: &Record) -> String {
    let mut capped = (*direct.conn.h2.clone().unwrap()).clone();
    for (id, value) in &mut capped.settings {
        if *id == 6 {
            *value = (*value).min(upstream::h2::MAX_HEADER_LIST);
        }
    }
    let window = upstream::h2::MAX_CONNECTION_WINDOW - 65_535;
    capped.window_update = capped.window_update.min(window);
    capped.akamai()
}

/// A first request too large for pinproxy to read whole in a connection's
/// opening (a 70 KB cookie: more than the 64 KiB it reads) leaves with the
/// client's own HTTP/2 preface: its settings, window and pseudo-header
/// order all come before the limit. It used to leave with the client's
/// ClientHello and hyper's HTTP/2 settings. (curl cannot send it: nghttp2
/// refuses header blocks past 64 KiB; Go sends what the peer allows.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn go_http2_with_a_70k_cookie_keeps_its_preface_through_pinproxy() {
    let go = require("go");
    let rig = Rig::start(OriginOptions::default(), |c| {
        c.limits.max_header_bytes = 256 * 1024;
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    // `Z` takes 8 bits in HPACK's Huffman code, so Go sends it as it is:
    // 70,000 bytes on the wire.
    let cookie = format!("big={}", "Z".repeat(70_000));
    let mut firsts = Vec::new();
    for (via, peer) in [(rig.direct(), "127.0.0.1"), (rig.proxied(), EXIT_IP)] {
        rig.origin.clear();
        go_get_three_times(&go, dir.path(), &rig, &via, &cookie).await;
        firsts.push(records_of(&rig.origin, "/go", peer)[0].clone());
    }
    let (direct, through) = (&firsts[0], &firsts[1]);
    assert_eq!(direct.cookie.as_deref(), Some(cookie.as_str()));
    assert!(direct.akamai().is_some(), "{direct:?}");
    assert_eq!(through.akamai(), Some(go_akamai_through_pinproxy(direct)));
    assert_opening_as_direct("Go", &direct.conn, &through.conn);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn curl_http1_is_curl_through_pinproxy() {
    let (direct, _) = openssl_client_is_itself_through_pinproxy(Client::CurlH1).await;
    assert!(direct[0].ja4().unwrap().contains("h1_"), "{direct:?}");
}

/// Clients send no SNI to an address (RFC 6066 has no place for one), so
/// whether a hello carries SNI says where it went, not who sent it. A
/// session-key identity whose first request went to an address still sends
/// SNI to a name afterwards, as its client does, and its client does not
/// drift from itself between the two (`reject` would refuse it).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_identity_founded_on_an_address_sends_sni_to_names() {
    let rig = Rig::start(OriginOptions::default(), |c| {
        c.identities.fingerprint_policy = pinproxy::fingerprint::FingerprintPolicy::Reject
    })
    .await;
    let via = rig.proxied();
    let port = rig.origin.port();
    for host in ["127.0.0.1", "localhost"] {
        let mut command = Command::new(require("curl"));
        command
            .args(["-sS", "--max-time", "20", "--http1.1", "--cacert"])
            .arg(&via.ca)
            .arg("-x")
            .arg(format!("http://{}", rig.s.proxy.daemon.local_addr()))
            .args([
                "--proxy-header",
                "X-Pinproxy-Session: founded-on-an-address",
            ])
            .args(["-o", "/dev/null", "-w", "%{http_code}"])
            .arg(format!("https://{host}:{port}/page"));
        assert_eq!(run(&mut command).await, "200", "{host}");
    }
    let sni: Vec<Option<String>> = rig
        .origin
        .connections()
        .iter()
        .map(|c| c.hello.as_ref().and_then(|h| h.server_name.clone()))
        .collect();
    assert_eq!(sni, [None, Some("localhost".to_string())]);
    let ja4s: Vec<String> = rig
        .origin
        .records()
        .iter()
        .filter_map(|r| r.ja4().map(str::to_owned))
        .collect();
    assert!(
        ja4s.len() == 2 && ja4s[0].starts_with("t13i") && ja4s[1].starts_with("t13d"),
        "{ja4s:?}"
    );
    support::assert_no_fingerprint_drift(&rig.s.proxy.daemon);
    rig.s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn python_requests_is_python_through_pinproxy() {
    let (direct, _) = openssl_client_is_itself_through_pinproxy(Client::Python).await;
    assert!(direct[0].ja4().unwrap().contains("h1_"), "{direct:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn debian_python_requests_is_python_through_pinproxy() {
    let (direct, _) = openssl_client_is_itself_through_pinproxy(Client::DebianPython).await;
    assert!(direct[0].ja4().unwrap().contains("h1_"), "{direct:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn node_https_is_node_through_pinproxy_offering_no_alpn() {
    let (direct, _) = openssl_client_is_itself_through_pinproxy(Client::Node).await;
    assert!(
        direct[0].ja4().unwrap().contains("00_"),
        "Node's https offers no ALPN: {direct:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_http1_only_origin_gets_http1_and_the_clients_offer() {
    let rig = Rig::start(OriginOptions::default().http1_only(), |_| {}).await;
    let port = rig.origin.port();
    Client::CurlH2
        .get_ok(&rig.direct(), port, "/direct", None)
        .await;
    Client::CurlH2
        .get_ok(&rig.proxied(), port, "/through", None)
        .await;
    let direct = records_of(&rig.origin, "/direct", "127.0.0.1");
    let through = records_of(&rig.origin, "/through", EXIT_IP);
    assert_eq!(direct[0].alpn(), Some("http/1.1"));
    assert_eq!(through[0].alpn(), Some("http/1.1"));
    assert_eq!(through[0].version, http::Version::HTTP_11);
    // Offered h2 all the same, as curl did.
    assert!(through[0].ja4().unwrap().contains("h2_"), "{through:?}");
    assert_eq!(direct[0].header_names, ["Host", "User-Agent", "Accept"]);
    // An h2 client's names reach an h1 origin as HTTP/1.1 clients write
    // them, in its order (no `Connection` for curl, which sends none).
    assert_eq!(through[0].header_names, direct[0].header_names);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_untrusted_origin_fails_curls_openssl_handshake_naming_the_host() {
    // pinproxy does not trust the test PKI this time.
    let rig = Rig::start(OriginOptions::default(), |c| c.upstream_ca.clear()).await;
    let proxy = rig.s.proxy.daemon.local_addr();
    let mut command = Command::new(require("curl"));
    command
        .args(["-sS", "--max-time", "20", "--http1.1", "--cacert"])
        .arg(rig.s.proxy.daemon.ca_cert_path())
        .arg("-x")
        .arg(format!("http://{proxy}"))
        .args([
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}\n%header{x-pinproxy-error}\n",
        ])
        .arg(rig.origin.url("/untrusted"));
    let out = run(&mut command).await;
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("502"), "{out}");
    let error = lines.next().unwrap_or_default();
    assert!(
        error.starts_with("upstream-tls:")
            && error.contains("localhost")
            && error.contains("did not verify"),
        "{error}"
    );
    assert!(rig.origin.requests_to("/untrusted").is_empty());
}

// ---------------------------------------------------------------- several clients, identities

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_clients_reach_the_origin_with_two_fingerprints_through_one_pinproxy() {
    let rig = Rig::start(OriginOptions::default(), |_| {}).await;
    let chromium = rig.chromium().await;
    let proxy = rig.s.proxy.daemon.local_addr();
    let port = rig.origin.port();
    // Chromium's own, for what it must look like through pinproxy.
    let dom = chromium.dump_dom(None, &rig.origin.url("/direct")).await;
    assert!(dom.contains("ok conn"), "Chromium direct: {dom}");
    let direct = records_of(&rig.origin, "/direct", "127.0.0.1");
    // Interleaved: curl, Chromium, curl.
    Client::CurlH2
        .get_ok(&rig.proxied(), port, "/curl", None)
        .await;
    let dom = chromium
        .dump_dom(Some(proxy), &rig.origin.url("/chromium"))
        .await;
    assert!(dom.contains("ok conn"), "{dom}");
    Client::CurlH2
        .get_ok(&rig.proxied(), port, "/curl", None)
        .await;

    let curl = records_of(&rig.origin, "/curl", EXIT_IP);
    let chrome = records_of(&rig.origin, "/chromium", EXIT_IP);
    let curl_ja4 = one(&curl, "curl JA4", |r| r.ja4().map(str::to_owned)).unwrap();
    let chrome_ja4 = one(&chrome, "Chromium JA4", |r| r.ja4().map(str::to_owned)).unwrap();
    assert_eq!(Some(chrome_ja4.as_str()), direct[0].ja4());
    assert_ne!(curl_ja4, chrome_ja4);
    assert_eq!(
        one(&curl, "curl Akamai", Record::akamai).as_deref(),
        Some(CURL_AKAMAI)
    );
    assert!(
        direct[0].akamai().is_some(),
        "no HTTP/2 preface recorded for Chromium"
    );
    assert_eq!(
        one(&chrome, "Chromium Akamai", Record::akamai),
        direct[0].akamai()
    );
    // Never one connection for both.
    let curl_conns: BTreeSet<usize> = curl.iter().map(|r| r.conn.index).collect();
    assert!(chrome.iter().all(|r| !curl_conns.contains(&r.conn.index)));
}

/// pinproxy keeps one record of a ClientHello for the live connections
/// that sent it; an HTTP/2 connection's preface is still its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn h2_connections_with_one_hello_keep_their_own_prefaces() {
    let rig = Rig::start(OriginOptions::default(), |_| {}).await;
    let port = rig.origin.port();
    let client = &rig.s.proxy.client;
    let mut builder =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
    // Held open together, so that their hellos are live at once.
    let mut held = Vec::new();
    for (path, window) in [("/small", 65_535), ("/large", 1 << 20), ("/small", 65_535)] {
        builder.initial_stream_window_size(window);
        let mut conn = client.tunnel_h2_with("localhost", port, &builder).await;
        let reply = conn.get(path, &[]).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        held.push(conn);
    }
    let small = records_of(&rig.origin, "/small", EXIT_IP);
    let large = records_of(&rig.origin, "/large", EXIT_IP);
    assert_eq!(
        one(&small, "JA4", |r| r.ja4().map(str::to_owned)),
        one(&large, "JA4", |r| r.ja4().map(str::to_owned)),
        "one client, one hello"
    );
    let (Some(small_h2), Some(large_h2)) = (
        one(&small, "small Akamai", Record::akamai),
        one(&large, "large Akamai", Record::akamai),
    ) else {
        panic!("no HTTP/2 preface recorded: {small:?} {large:?}");
    };
    assert!(small_h2.contains("4:65535"), "{small_h2}");
    assert!(large_h2.contains("4:1048576"), "{large_h2}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_identity_keeps_its_founding_clients_fingerprint_across_connections_and_a_restart() {
    let rig = Rig::start(OriginOptions::default().closing(), |_| {}).await;
    let port = rig.origin.port();

    // curl founds the identity: /login sets datadome through pinproxy.
    let login = Client::CurlH2
        .get_ok(&rig.proxied(), port, "/login", None)
        .await;
    let token = login.datadome.expect("/login sets datadome");
    let cookie = format!("datadome={token}");
    let founding = records_of(&rig.origin, "/login", EXIT_IP);
    let founding_ja4 = founding[0].ja4().unwrap().to_owned();
    let founding_akamai = founding[0].akamai();
    assert_eq!(founding_akamai.as_deref(), Some(CURL_AKAMAI));

    // Python, without the cookie, is presented as itself.
    Client::Python
        .get_ok(&rig.proxied(), port, "/python-alone", None)
        .await;
    let python_ja4 = records_of(&rig.origin, "/python-alone", EXIT_IP)[0]
        .ja4()
        .unwrap()
        .to_owned();
    assert_ne!(python_ja4, founding_ja4, "the two clients must differ");

    // Python with the identity's cookie, on fresh connections.
    for _ in 0..2 {
        Client::Python
            .get_ok(&rig.proxied(), port, "/identity", Some(&cookie))
            .await;
    }
    let Rig { origin, s, _tinies } = rig;
    let s = s.restart().await;
    let rig = Rig { origin, s, _tinies };
    for _ in 0..2 {
        Client::Python
            .get_ok(&rig.proxied(), port, "/identity", Some(&cookie))
            .await;
    }

    let identity = records_of(&rig.origin, "/identity", EXIT_IP);
    assert_eq!(identity.len(), 4);
    assert_eq!(
        connections(&identity),
        4,
        "every request on a fresh connection"
    );
    for record in &identity {
        assert_eq!(
            record.cookie_value("datadome").as_deref(),
            Some(token.as_str())
        );
        assert_eq!(
            record.ja4(),
            Some(founding_ja4.as_str()),
            "a request of curl's identity sent by Python must look like curl: {record:?}"
        );
        assert_eq!(record.alpn(), Some("h2"));
        assert_eq!(record.akamai(), founding_akamai);
    }
}

/// An identity founded without a ClientHello (its first request came to
/// pinproxy in plain HTTP) has none of its own to present: once its client
/// speaks TLS, its requests present that client's fingerprint, never
/// pinproxy's own.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_identity_founded_over_plain_http_presents_its_tls_clients_fingerprint() {
    let rig = Rig::start(OriginOptions::default().closing(), |_| {}).await;
    let port = rig.origin.port();
    let token = "FoundedInPlainHttp51aa";
    let cookie = format!("datadome={token}");
    let mut plain = rig
        .s
        .proxy
        .client
        .plain("localhost", rig.s.origin.http.port())
        .await;
    let reply = plain.get("/page", &[("cookie", cookie.as_str())]).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let identities = rig.s.proxy.daemon.admin().identities(false).await.unwrap();
    assert_eq!(
        identities.len(),
        1,
        "the plain request founded the identity"
    );
    assert_eq!(
        identities[0].client_ja4, None,
        "founded without a ClientHello"
    );

    Client::CurlH2
        .get_ok(&rig.proxied(), port, "/identity", Some(&cookie))
        .await;
    Client::CurlH2
        .get_ok(&rig.direct(), port, "/direct", None)
        .await;
    let through = records_of(&rig.origin, "/identity", EXIT_IP);
    let direct = records_of(&rig.origin, "/direct", "127.0.0.1");
    assert_eq!(
        through[0].cookie_value("datadome").as_deref(),
        Some(token),
        "the identity's request"
    );
    assert_ne!(
        through[0].ja4(),
        Some(RUSTLS_H2_JA4),
        "pinproxy's own hello"
    );
    assert_eq!(through[0].ja4(), direct[0].ja4(), "curl's hello");
    assert_eq!(
        through[0].akamai().as_deref(),
        Some(CURL_AKAMAI),
        "curl's preface"
    );
}

// ---------------------------------------------------------------- modes

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chrome_mode_presents_chrome_for_curl() {
    let rig = Rig::start(OriginOptions::default(), |c| {
        c.upstream.fingerprint = FingerprintMode::Chrome;
    })
    .await;
    Client::CurlH2
        .get_ok(&rig.proxied(), rig.origin.port(), "/curl", None)
        .await;
    let curl = records_of(&rig.origin, "/curl", EXIT_IP);
    assert_eq!(curl[0].ja4(), Some(CHROME_JA4));
    assert_eq!(curl[0].alpn(), Some("h2"));
    assert_eq!(curl[0].akamai().as_deref(), Some(CHROME_AKAMAI));
}

/// In chrome mode a client's one `Cookie` header (curl's, over HTTP/1.1 or
/// HTTP/2) goes out as Chrome's encoder sends cookies over HTTP/2: a field
/// per cookie, each added to the table; the origin reads the same cookies.
/// The request's priority is the one Chrome gives a request that states
/// none.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chrome_mode_sends_a_clients_cookie_header_as_chromes_crumbs() {
    let rig = Rig::start(OriginOptions::default(), |c| {
        c.upstream.fingerprint = FingerprintMode::Chrome;
    })
    .await;
    let cookie = "theme=dark; lang=en-GB; tz=Europe/London";
    for (client, path) in [(Client::CurlH2, "/h2"), (Client::CurlH1, "/h1")] {
        client
            .get_ok(&rig.proxied(), rig.origin.port(), path, Some(cookie))
            .await;
        let record = &records_of(&rig.origin, path, EXIT_IP)[0];
        assert_eq!(record.akamai().as_deref(), Some(CHROME_AKAMAI), "{path}");
        assert_eq!(record.cookie.as_deref(), Some(cookie), "{path}");
        let conn = &rig.origin.connections()[record.conn.index];
        let block = conn.blocks.last().unwrap();
        // curl sends no `priority` header: Chrome's default urgency (3), so
        // the weight Chrome gives it (147), exclusive, after no open stream.
        assert_eq!(
            conn.priorities.last(),
            Some(&Some((true, 0, 147))),
            "{path}"
        );
        // Added to the table now, or by an earlier request on the
        // connection.
        let crumbs = cookie_representations(block);
        assert_eq!(crumbs.len(), 3, "{path}: {block:?}");
        assert!(
            crumbs
                .iter()
                .all(|r| matches!(r, Representation::Incremental | Representation::Indexed)),
            "{path}: {block:?}"
        );
    }
}

/// In chrome mode an identity's connections to an origin resume the TLS
/// sessions the origin issued to its earlier ones, as Chrome's next
/// connection to a host does: its first one the session of the cookie-less
/// connection its cookie was set on, the later ones their own; the resumed
/// hello is Chrome's with a pre_shared_key. Cookie-less traffic (one lane
/// for every visitor with the same hello) never resumes, and no identity
/// resumes a session issued on another's connection or on a cookie-less
/// connection its cookie did not come on: a ticket would link them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_identity_resumes_its_own_tls_sessions_and_no_one_elses() {
    // Every connection closes after one answer: each request dials.
    let rig = Rig::start(OriginOptions::default().closing(), |c| {
        c.upstream.fingerprint = FingerprintMode::Chrome;
    })
    .await;
    let port = rig.origin.port();
    let via = rig.proxied();
    for _ in 0..3 {
        Client::CurlH2.get_ok(&via, port, "/anonymous", None).await;
    }
    for name in ["a", "b"] {
        let login = Client::CurlH2
            .get_ok(&via, port, &format!("/login?{name}"), None)
            .await;
        let cookie = format!("datadome={}", login.datadome.unwrap());
        for _ in 0..3 {
            Client::CurlH2
                .get_ok(&via, port, &format!("/{name}"), Some(&cookie))
                .await;
        }
    }
    let anonymous = records_of(&rig.origin, "/anonymous", EXIT_IP);
    for record in &anonymous {
        assert!(
            !record.conn.resumed,
            "cookie-less traffic resumed: {record:?}"
        );
    }
    let mut identity_connections = 0;
    for name in ["a", "b"] {
        let login = records_of(&rig.origin, &format!("/login?{name}"), EXIT_IP);
        let records = records_of(&rig.origin, &format!("/{name}"), EXIT_IP);
        // A connection each, but for the GOAWAY race: the login's HTTP/2
        // connection goes to the identity, and pinproxy may send the next
        // request on a connection the origin is closing (see
        // `direct_and_through`), so one new connection to three.
        let new = resumes_from_its_founding_connection(&login[0], &records);
        assert!((1..=3).contains(&new.len()), "{name}: {records:?}");
        identity_connections += new.len();
        for record in &new {
            assert_eq!(
                ja4::ja4(&hello(record).without_resumption()),
                CHROME_JA4,
                "{name}: Chrome's resumed hello"
            );
            assert_eq!(record.akamai().as_deref(), Some(CHROME_AKAMAI));
        }
    }
    let metrics = rig.s.proxy.daemon.admin().metrics.encode();
    assert!(
        metrics.contains(&format!(
            "pinproxy_upstream_tls_resumed_total{{exit=\"tiny\"}} {identity_connections}"
        )),
        "{identity_connections}: {metrics}"
    );
}

/// Chromium through pinproxy resumes as Chromium does: its page's later
/// requests (each on a new connection: the origin closes every one after
/// an answer) go out with Chromium's own resumed hello, the same JA4 as
/// Chromium's when it reaches the origin itself, pre_shared_key included.
/// Its identity's first connection resumes the session of the page's own
/// (a cookie-less connection, the one its cookie came on), as Chromium's
/// second connection does.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chromium_through_pinproxy_resumes_as_chromium_does() {
    let rig = Rig::start(OriginOptions::default().closing(), |_| {}).await;
    let chromium = rig.chromium().await;
    let dom = chromium.dump_dom(None, &rig.origin.url("/page")).await;
    assert!(dom.contains("fetched ok conn"), "Chromium direct: {dom}");
    let fetched = || -> Vec<Record> {
        let records = rig.origin.records().into_iter();
        records
            .filter(|r| r.path.starts_with("/fetched?"))
            .collect()
    };
    let direct = fetched();
    rig.origin.clear();
    let proxy = rig.s.proxy.daemon.local_addr();
    let dom = chromium
        .dump_dom(Some(proxy), &rig.origin.url("/page"))
        .await;
    assert!(
        dom.contains("fetched ok conn"),
        "Chromium through pinproxy: {dom}"
    );
    let through = fetched();
    assert_eq!(through.len(), 3, "{through:?}");
    assert!(through.iter().all(|r| r.conn.peer.ip() == ip(EXIT_IP)));

    // Chromium itself resumes on its new connections (a fetch sent on the
    // page's connection before its GOAWAY came would not need to).
    let direct: Vec<Record> = direct.into_iter().filter(|r| r.conn.resumed).collect();
    assert!(!direct.is_empty(), "Chromium never resumed");
    let page = records_of(&rig.origin, "/page", EXIT_IP);
    // A connection each, but for the GOAWAY race (see `direct_and_through`).
    resumes_from_its_founding_connection_as_itself(&page[0], &through, &direct);
}

/// Chromium through pinproxy goes on with the HTTP/2 connection its cookie
/// came on, as it does reaching the origin itself: its page's answer (on a
/// cookie-less connection) founds an identity, which takes that
/// connection, so the page's later requests with the cookie go on it
/// rather than on a new connection with a handshake of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chromium_through_pinproxy_goes_on_with_the_connection_its_cookie_came_on() {
    let rig = Rig::start(OriginOptions::default(), |_| {}).await;
    let chromium = rig.chromium().await;
    let proxy = rig.s.proxy.daemon.local_addr();
    for via in [None, Some(proxy)] {
        rig.origin.clear();
        let dom = chromium.dump_dom(via, &rig.origin.url("/page")).await;
        assert!(dom.contains("fetched ok conn"), "{via:?}: {dom}");
        let records = rig.origin.records();
        let page: Vec<&Record> = records.iter().filter(|r| r.path == "/page").collect();
        let fetched: Vec<&Record> = records
            .iter()
            .filter(|r| r.path.starts_with("/fetched?"))
            .collect();
        assert_eq!((page.len(), fetched.len()), (1, 3), "{via:?}: {records:?}");
        assert_eq!(page[0].version, http::Version::HTTP_2, "{via:?}");
        for record in &fetched {
            assert!(record.cookie_value("datadome").is_some(), "{record:?}");
            assert_eq!(
                record.conn.index, page[0].conn.index,
                "{via:?}: a fetch on another connection than the page's: {records:?}"
            );
        }
    }
}

/// Chromium's header blocks reach the origin through pinproxy encoded as
/// Chromium encodes them itself: the same HPACK representation for every
/// field of every request (indexed, a literal added to the table, or one
/// left out), and the same choice of Huffman coding for every literal. The
/// page sets three cookies, so its later requests carry them as three
/// `cookie` fields (crumbs), which Chromium adds to the table on the first
/// request that has them and refers to with one byte afterwards; an
/// encoder that leaves cookies out of the table (the `http2` crate's own
/// policy, borrowed from nghttp2) sends them as literals on every request,
/// and an origin can tell the two apart by the blocks alone. The origin
/// states a 64 KiB table: Chromium sends its first request with its
/// preface, before it reads that, and takes the table up from its second
/// block; so does pinproxy, whose opening frames are Chromium's.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chromium_through_pinproxy_encodes_its_header_blocks_as_chromium_does() {
    let rig = Rig::start(OriginOptions::default().header_table_size(65536), |_| {}).await;
    let chromium = rig.chromium().await;
    let proxy = rig.s.proxy.daemon.local_addr();
    let mut blocks = Vec::new();
    let mut pages = Vec::new();
    let mut conns = Vec::new();
    for via in [None, Some(proxy)] {
        // Chromium itself, now and then, reads the origin's SETTINGS before
        // its first request, and then takes their table up in its first
        // block: its baseline is a load where it did not (of three at most;
        // pinproxy gets one).
        for attempt in 1..=3 {
            rig.origin.clear();
            let dom = chromium
                .dump_dom(via, &rig.origin.url("/page?crumbs"))
                .await;
            assert!(dom.contains("fetched ok conn"), "{via:?}: {dom}");
            let (page, conn) = crumb_page(&rig, &format!("{via:?}"));
            let raced = conn.opening.contains(&"SETTINGS+ACK");
            if via.is_some() || !raced || attempt == 3 {
                pages.push(page);
                blocks.push(conn.blocks.clone());
                conns.push(conn);
                break;
            }
            println!("Chromium read the origin's SETTINGS before its first request; again");
        }
    }
    assert_opening_as_direct("Chromium", &pages[0].conn, &pages[1].conn);
    // Each request's priority fields, as Chromium gives them from the
    // request's priority (its `priority` header's urgency): the page's
    // weight 256, the fetches' 220, each exclusive and, made one after
    // another, depending on no open stream.
    assert_eq!(
        conns[0].priorities,
        [
            Some((true, 0, 256)),
            Some((true, 0, 220)),
            Some((true, 0, 220)),
            Some((true, 0, 220))
        ],
        "Chromium's own priorities are not as this test expects"
    );
    assert_eq!(conns[1].priorities, conns[0].priorities);
    // The page, then its three fetches.
    assert_blocks_as_direct(&blocks[0], &blocks[1], 4, |direct, report| {
        // The origin's 64 KiB table is taken up after the first request,
        // which left with the preface before its SETTINGS were read.
        let updates: Vec<usize> = (0..direct.len())
            .filter(|&i| {
                direct[i]
                    .iter()
                    .any(|f| f.representation == Representation::SizeUpdate)
            })
            .collect();
        assert_eq!(updates, [1], "{report}");
        assert_eq!(
            cookie_representations(&direct[3]),
            [Representation::Indexed; 3],
            "Chromium itself no longer sends its cookies as crumbs it indexes; \
             this test's premise needs looking at\n{report}"
        );
    });
}

/// Firefox's header blocks reach the origin through pinproxy encoded as
/// Firefox encodes them itself, which is not as Chromium does: every string
/// Huffman-coded, `:path` never added to the table, and cookie crumbs
/// shorter than 20 bytes (`theme=dark`, `lang=en-GB`) sent as never-indexed
/// literals on every request while the long `datadome` crumb is added to
/// the table and then referred to. Each of its streams is raised to a
/// 12 MiB window by a WINDOW_UPDATE written with the stream's HEADERS, as
/// Firefox raises them. Firefox's direct baseline goes through tinyproxy
/// (a CONNECT relay, which changes no byte of the TLS stream), as Firefox
/// is only ever given a proxy here (see `support::firefox`).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn firefox_through_pinproxy_encodes_its_header_blocks_as_firefox_does() {
    let rig = Rig::start(OriginOptions::default(), |_| {}).await;
    let firefox = Firefox::trusting(&[
        rig.s.proxy.daemon.ca_cert_path(),
        rig.origin.pki.ca_file.clone(),
    ]);
    let url = rig.origin.url("/page?crumbs");
    let mut blocks = Vec::new();
    let mut pages = Vec::new();
    let mut conns = Vec::new();
    for (via, proxy) in [
        ("direct", rig._tinies[0].addr()),
        ("pinproxy", rig.s.proxy.daemon.local_addr()),
    ] {
        rig.origin.clear();
        // The page and its three fetches.
        let target = rig.origin.requests_so_far() + 4;
        let refused = firefox
            .load_until(
                proxy,
                &url,
                rig.origin.wait_for_requests(target, RUN_TIMEOUT),
            )
            .await;
        let hosts: BTreeSet<&str> = refused
            .iter()
            .filter_map(|line| line.split(' ').nth(1))
            .collect();
        println!("{via}: Firefox's background requests refused at the tap: {hosts:?}");
        let (page, conn) = crumb_page(&rig, via);
        pages.push(page);
        blocks.push(conn.blocks.clone());
        conns.push(conn);
    }
    report("Firefox", &pages[0], &pages[1]);
    assert_opening_as_direct("Firefox", &pages[0].conn, &pages[1].conn);
    // Firefox raises each stream it opens from the 128 KiB its SETTINGS
    // state to 12 MiB, with a WINDOW_UPDATE written with the HEADERS (one
    // TLS record): the page's and its three fetches'.
    let raises = |conn: &ConnRecord| -> Vec<u32> {
        conn.window_updates
            .iter()
            .filter(|(stream, _)| *stream != 0)
            .map(|&(_, increment)| increment)
            .collect()
    };
    assert_eq!(
        raises(&conns[0]),
        [12_451_840; 4],
        "Firefox no longer raises its streams' windows as this test expects: {:?}",
        conns[0].window_updates
    );
    assert_eq!(raises(&conns[1]), raises(&conns[0]));
    assert_eq!(
        encrypted_record(&conns[1], 2),
        encrypted_record(&conns[0], 2),
        "the record of the first HEADERS and its WINDOW_UPDATE"
    );
    // The HTTP/2 preface is Firefox's; the hello is Firefox's but for the
    // two extensions BoringSSL cannot send (a gap pinproxy reports).
    assert_eq!(pages[1].akamai(), pages[0].akamai());
    let without_gaps = ja4::ja4_r(hello(&pages[0]))
        .replacen("1617h2", "1615h2", 1)
        .replace(",001c,0022,", ",");
    assert_eq!(ja4::ja4_r(hello(&pages[1])), without_gaps);
    // The page, then its three fetches.
    assert_blocks_as_direct(&blocks[0], &blocks[1], 4, |direct, report| {
        // Firefox's own choices, which are what this test is about.
        let mut crumbs = cookie_representations(&direct[3]);
        crumbs.sort_by_key(|r| *r as u8);
        assert_eq!(
            crumbs,
            [
                Representation::Indexed,
                Representation::NeverIndexed,
                Representation::NeverIndexed
            ],
            "Firefox no longer encodes its cookie crumbs as this test expects\n{report}"
        );
        assert!(
            direct.iter().flatten().all(|f| f.huffman != Some(false)),
            "Firefox sent a raw string\n{report}"
        );
    });
}

/// Chromium tells an origin it has read a large answer (8 MiB, more than
/// its 6 MiB stream window) as Chromium's `SpdySession` does, and so does
/// pinproxy speaking for it: a WINDOW_UPDATE once half of the full window
/// has been read, on the stream (3 MiB) and on the connection (7.5 MiB),
/// for what had been read by then. The crate announced capacity once half
/// of what was left of the window had been read: more, smaller updates
/// (2,129,920 then 1,622,016 bytes on the stream, where Chromium sends one
/// of 3,147,088), which an origin can tell from Chromium's.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chromium_through_pinproxy_acknowledges_a_large_answer_as_chromium_does() {
    let rig = Rig::start(OriginOptions::default(), |_| {}).await;
    let chromium = rig.chromium().await;
    let proxy = rig.s.proxy.daemon.local_addr();
    let mut updates = Vec::new();
    for via in [None, Some(proxy)] {
        rig.origin.clear();
        let dom = chromium.dump_dom(via, &rig.origin.url("/large-page")).await;
        assert!(
            dom.contains(&format!("fetched {LARGE_BODY}")),
            "{via:?}: {dom}"
        );
        // `/after` follows on the same connection: once the origin has read
        // it, it has read every frame sent before it, the connection's
        // WINDOW_UPDATE included.
        let large = &rig.origin.requests_to("/large")[0];
        let after = &rig.origin.requests_to("/after")[0];
        assert_eq!(after.conn.index, large.conn.index, "{via:?}");
        assert_eq!(large.version, http::Version::HTTP_2, "{via:?}");
        updates.push(
            rig.origin.connections()[large.conn.index]
                .window_updates
                .clone(),
        );
    }
    println!(
        "WINDOW_UPDATEs (stream, increment), direct: {:?}",
        updates[0]
    );
    println!("WINDOW_UPDATEs through pinproxy: {:?}", updates[1]);
    let first = |updates: &[(u32, u32)], connection: bool| {
        updates
            .iter()
            .find(|(stream, _)| (*stream == 0) == connection)
            .map(|&(_, increment)| increment)
    };
    // Chromium's windows: 6 MiB a stream, 15 MiB the connection.
    for (connection, window) in [(false, 6_291_456u32), (true, 15_728_640)] {
        let direct = first(&updates[0], connection);
        assert!(
            direct.is_some_and(|d| d >= window / 2 && d < window / 2 + 65_536),
            "Chromium no longer acknowledges half its window ({window}) at once: {:?}",
            updates[0]
        );
        let through = first(&updates[1], connection);
        assert!(
            through
                .zip(direct)
                .is_some_and(|(t, d)| t.abs_diff(d) <= 16_384),
            "the first {} WINDOW_UPDATE: {through:?} through pinproxy, {direct:?} direct",
            if connection { "connection" } else { "stream" }
        );
        assert!(
            updates[1]
                .iter()
                .filter(|(stream, _)| (*stream == 0) == connection)
                .all(|&(_, increment)| increment >= window / 2),
            "{:?}",
            updates[1]
        );
    }
}

/// The record of `/page?crumbs` (loaded by a browser `via` something, for
/// messages) and the record of its connection, asserting that the page's
/// three fetches went on that connection too, over HTTP/2. Read once the
/// last fetch is answered, when the connection's header blocks are all
/// in.
fn crumb_page(rig: &Rig, via: &str) -> (Record, ConnRecord) {
    let records = rig.origin.records();
    let page: Vec<&Record> = records
        .iter()
        .filter(|r| r.path == "/page?crumbs")
        .collect();
    assert_eq!(page.len(), 1, "{via}: {records:?}");
    assert_eq!(page[0].version, http::Version::HTTP_2, "{via}");
    assert!(
        records.iter().all(|r| r.conn.index == page[0].conn.index),
        "{via}: the fetches went on another connection than the page's: {records:?}"
    );
    let conn = rig.origin.connections()[page[0].conn.index].clone();
    (page[0].clone(), conn)
}

/// Asserts that pinproxy's upstream connection opened as the client's own
/// did: the same frames before the first request (SETTINGS, WINDOW_UPDATE,
/// any PRIORITY, then HEADERS), none of them an acknowledgement of the
/// origin's SETTINGS, and the preface with its SETTINGS and WINDOW_UPDATE
/// in one TLS record of the same length. Clients send their first request
/// with their preface, before they read anything; a client that read the
/// origin's SETTINGS first (a rare race for a browser, every other
/// connection for pinproxy before it held its reads) acknowledges them
/// before its first request. (pinproxy also wrote the preface alone, a
/// record no client sends.)
fn assert_opening_as_direct(name: &str, direct: &ConnRecord, through: &ConnRecord) {
    let expected: Vec<&str> = direct
        .opening
        .iter()
        .copied()
        .filter(|frame| *frame != "SETTINGS+ACK")
        .collect();
    assert_eq!(expected.last(), Some(&"HEADERS"), "{name}: {direct:?}");
    assert_eq!(
        through.opening, expected,
        "{name}: the frames before the first request (direct: {:?})",
        direct.opening
    );
    // And written as the client writes them: the preface, SETTINGS and
    // WINDOW_UPDATE in one TLS record, the one after the handshake's
    // Finished.
    let opening_record = |conn: &ConnRecord| encrypted_record(conn, 1);
    assert!(
        opening_record(direct).is_some(),
        "{name}: {:?}",
        direct.records
    );
    assert_eq!(
        opening_record(through),
        opening_record(direct),
        "{name}: the length of the encrypted record after the Finished, the \
         opening frames (direct: {:?}, through: {:?})",
        direct.records,
        through.records
    );
}

/// The length of the `n`th (0-based) encrypted record a client sent on
/// `conn` (TLS content type 23; in TLS 1.3 the first is its Finished).
fn encrypted_record(conn: &ConnRecord, n: usize) -> Option<u16> {
    conn.records
        .iter()
        .filter(|(content_type, _)| *content_type == 23)
        .map(|&(_, length)| length)
        .nth(n)
}

/// Asserts that a client's header blocks `through` pinproxy are its
/// `direct` ones, `count` of them, field by field, after checking
/// `premise` (the client's own choices the test rests on) on the direct
/// ones. Prints both.
fn assert_blocks_as_direct(
    direct: &[Vec<EncodedField>],
    through: &[Vec<EncodedField>],
    count: usize,
    premise: impl FnOnce(&[Vec<EncodedField>], &str),
) {
    let report = format!(
        "direct:\n{}through pinproxy:\n{}",
        show_blocks(direct),
        show_blocks(through)
    );
    println!("{report}");
    assert_eq!(direct.len(), count, "{report}");
    premise(direct, &report);
    assert_eq!(through.len(), direct.len(), "{report}");
    for (n, (d, t)) in direct.iter().zip(through).enumerate() {
        assert_eq!(t, d, "block {n} differs\n{report}");
    }
}

/// The representations of a block's `cookie` fields, in order.
fn cookie_representations(block: &[EncodedField]) -> Vec<Representation> {
    block
        .iter()
        .filter(|f| f.name == "cookie")
        .map(|f| f.representation)
        .collect()
}

/// A connection's header blocks, a field a line.
fn show_blocks(blocks: &[Vec<EncodedField>]) -> String {
    let mut text = String::new();
    for (n, block) in blocks.iter().enumerate() {
        text.push_str(&format!("  block {n}:\n"));
        for f in block {
            text.push_str(&format!(
                "    {} {:?} huffman {:?} index {:?}\n",
                f.name, f.representation, f.huffman, f.index
            ));
        }
    }
    text
}

/// Asserts that the identity's requests `through` pinproxy that did not go
/// on the connection of the answer that `founded` the identity (which goes
/// to the identity, and may still be open for its first request) went on
/// connections that resumed (offered and accepted): the first one the
/// session issued on the founding connection, the later ones that or one
/// of the identity's own, never another. Returns a record of each of those
/// connections.
fn resumes_from_its_founding_connection(founded: &Record, through: &[Record]) -> Vec<Record> {
    assert!(!founded.conn.resumed, "{:?}", founded.conn);
    let mut new: Vec<Record> = Vec::new();
    for record in through {
        let index = record.conn.index;
        if index != founded.conn.index && new.iter().all(|r| r.conn.index != index) {
            new.push(record.clone());
        }
    }
    let first = new
        .first()
        .unwrap_or_else(|| panic!("no new connection: {through:?}"));
    assert_eq!(
        first.conn.resumed_from,
        Some(founded.conn.index),
        "{:?}",
        first.conn
    );
    let own: BTreeSet<usize> = through
        .iter()
        .chain([founded])
        .map(|r| r.conn.index)
        .collect();
    for record in &new {
        assert!(
            record.conn.resumed
                && record.conn.resumption_accepted
                && record
                    .conn
                    .resumed_from
                    .is_some_and(|from| own.contains(&from)),
            "{:?}",
            record.conn
        );
    }
    new
}

/// As [`resumes_from_its_founding_connection`], and the resumed hellos
/// have the JA4 the client's own resumed hellos (`own_resumed`, straight
/// to the origin) have, `pre_shared_key` included.
fn resumes_from_its_founding_connection_as_itself(
    founded: &Record,
    through: &[Record],
    own_resumed: &[Record],
) {
    let new = resumes_from_its_founding_connection(founded, through);
    let ja4 = |r: &Record| r.ja4().map(str::to_owned);
    assert_eq!(
        one(&new, "resumed JA4 through pinproxy", ja4),
        one(own_resumed, "the client's own resumed JA4", ja4),
        "{}",
        difference(hello(&own_resumed[0]), hello(&new[0]))
    );
}

/// Node resuming its TLS sessions (as its `https.Agent` does) through
/// pinproxy is Node resuming to the origin: once its identity's client has
/// offered pinproxy a session, the identity's connections resume theirs,
/// said by the system's OpenSSL, with the JA4 Node's own resumed hellos
/// have.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn node_resuming_its_sessions_resumes_through_pinproxy() {
    let rig = Rig::start(OriginOptions::default().closing(), |_| {}).await;
    let port = rig.origin.port().to_string();
    let node = |via: Via, paths: &[&str]| {
        let mut command = Command::new(require("node"));
        let proxy = via.proxy.map(|p| p.to_string()).unwrap_or_default();
        command
            .args(["-e", &node_script(NODE_GETS_RESUMING), &proxy, &port])
            .arg(&via.ca)
            .args(paths);
        command
    };
    let out = run(&mut node(
        rig.direct(),
        &["/direct?0", "/direct?1", "/direct?2"],
    ))
    .await;
    assert_eq!(out.lines().collect::<Vec<_>>(), ["200"; 3], "{out}");
    let paths = ["/login", "/through?1", "/through?2", "/through?3"];
    let out = run(&mut node(rig.proxied(), &paths)).await;
    assert_eq!(out.lines().collect::<Vec<_>>(), ["200"; 4], "{out}");
    let starting = |prefix: &str| -> Vec<Record> {
        let records = rig.origin.records().into_iter();
        records.filter(|r| r.path.starts_with(prefix)).collect()
    };
    // Node resumes its own session on each connection after its first.
    let direct = starting("/direct?");
    assert!(!direct[0].conn.resumed);
    assert!(direct[1..].iter().all(|r| r.conn.resumed), "{direct:?}");

    // Through pinproxy: the identity's first connection (its client's
    // second tunnel, the first to offer pinproxy a session) resumes the
    // session of the login's (its cookie came on it), the next ones their
    // own, as Node's second and later connections do.
    let through = starting("/through?");
    assert_eq!(connections(&through), 3, "{through:?}");
    assert!(through.iter().all(|r| r.conn.peer.ip() == ip(EXIT_IP)));
    let login = records_of(&rig.origin, "/login", EXIT_IP);
    resumes_from_its_founding_connection_as_itself(&login[0], &through, &direct[1..]);
}

/// In mirror mode an identity resumes as its client does: once a client
/// connection of the identity has offered pinproxy a session, the
/// identity's connections to an origin resume the session its earlier one
/// was given (the first one that of the connection its cookie came on). An
/// identity whose client never resumes (as a single curl or Python run
/// never does) never resumes upstream either.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_identity_resumes_upstream_only_when_its_client_resumes() {
    let rig = Rig::start(OriginOptions::default().closing(), |_| {}).await;
    let port = rig.origin.port();
    // A rustls client: its hello is said by BoringSSL, and it resumes its
    // session with pinproxy on every tunnel after its first to a host.
    let resuming = rig.s.proxy.client.clone();
    let never = resuming.without_resumption();
    for (client, path) in [(&resuming, "/resumes"), (&never, "/never")] {
        let login = client
            .tunnel("localhost", port)
            .await
            .get("/login", &[])
            .await;
        let set_cookie = login.headers.get("set-cookie").unwrap().to_str().unwrap();
        let cookie = set_cookie.split(';').next().unwrap().to_owned();
        for _ in 0..3 {
            let reply = client
                .tunnel("localhost", port)
                .await
                .get(path, &[("cookie", &cookie)])
                .await;
            assert_eq!(reply.status, 200, "{path}: {reply:?}");
        }
    }
    let logins = records_of(&rig.origin, "/login", EXIT_IP);
    let resumes = records_of(&rig.origin, "/resumes", EXIT_IP);
    assert_eq!(connections(&resumes), 3);
    // The first request's tunnel resumed with pinproxy (the login's was
    // the client's first): from then on its identity resumes, its first
    // connection the session of the login's (its cookie came on it), the
    // next ones their own.
    let resumed = resumes_from_its_founding_connection(&logins[0], &resumes);
    assert_eq!(resumed.len(), 3, "{resumes:?}");
    for record in &resumed {
        assert_eq!(
            ja4::ja4(&hello(record).without_resumption()),
            logins[0].ja4().unwrap(),
            "the client's hello, with a pre_shared_key"
        );
    }
    let never = records_of(&rig.origin, "/never", EXIT_IP);
    assert_eq!(connections(&never), 3);
    for record in never.iter().chain(&logins) {
        assert!(!record.conn.resumed, "{:?}", record.conn);
    }
    let metrics = rig.s.proxy.daemon.admin().metrics.encode();
    assert!(
        metrics.contains("pinproxy_upstream_tls_resumed_total{exit=\"tiny\"} 3"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rustls_mode_presents_rustls_whoever_the_client_is() {
    // An origin without tickets: the JA4 is the same whether or not a
    // stack would resume.
    let rig = Rig::start(OriginOptions::default().without_tickets(), |c| {
        c.upstream.fingerprint = FingerprintMode::Rustls;
    })
    .await;
    let port = rig.origin.port();
    Client::CurlH2
        .get_ok(&rig.proxied(), port, "/curl", None)
        .await;
    let chromium = rig.chromium().await;
    let dom = chromium
        .dump_dom(
            Some(rig.s.proxy.daemon.local_addr()),
            &rig.origin.url("/chromium"),
        )
        .await;
    assert!(dom.contains("ok conn"), "{dom}");
    for path in ["/curl", "/chromium"] {
        let records = records_of(&rig.origin, path, EXIT_IP);
        assert_eq!(records[0].ja4(), Some(RUSTLS_H2_JA4), "{path}");
        assert_eq!(records[0].akamai().as_deref(), Some(HYPER_AKAMAI), "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_exit_may_override_the_mode() {
    let rig = Rig::with_exits(
        OriginOptions::default().without_tickets(),
        &[("mirrors", "127.0.0.2"), ("own", "127.0.0.3")],
        |c| {
            let own = c.exits.iter_mut().find(|e| e.id == "own").unwrap();
            own.fingerprint = Some(FingerprintMode::Rustls);
        },
    )
    .await;
    let port = rig.origin.port();
    // Cookie-less requests rotate over the exits: go on until both served.
    for _ in 0..20 {
        Client::CurlH2
            .get_ok(&rig.proxied(), port, "/curl", None)
            .await;
        let peers: BTreeSet<IpAddr> = rig
            .origin
            .requests_to("/curl")
            .iter()
            .map(|r| r.conn.peer.ip())
            .collect();
        if peers.len() == 2 {
            break;
        }
    }
    let records = rig.origin.requests_to("/curl");
    let by = |exit: &str| -> Vec<Record> {
        records
            .iter()
            .filter(|r| r.conn.peer.ip() == ip(exit))
            .cloned()
            .collect()
    };
    let (mirrors, own) = (by("127.0.0.2"), by("127.0.0.3"));
    assert!(
        !mirrors.is_empty() && !own.is_empty(),
        "rotation never used both exits: {records:?}"
    );
    let mirrored = one(&mirrors, "mirror exit JA4", |r| r.ja4().map(str::to_owned)).unwrap();
    assert_ne!(mirrored, RUSTLS_H2_JA4);
    assert_eq!(
        one(&mirrors, "Akamai", Record::akamai).as_deref(),
        Some(CURL_AKAMAI)
    );
    assert_eq!(
        one(&own, "rustls exit JA4", |r| r.ja4().map(str::to_owned)).as_deref(),
        Some(RUSTLS_H2_JA4)
    );
    assert_eq!(
        one(&own, "Akamai", Record::akamai).as_deref(),
        Some(HYPER_AKAMAI)
    );
}

// ---------------------------------------------------------------- known defects in src/

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rustls_mode_never_resumes_a_session_across_exits() {
    let rig = Rig::with_exits(
        OriginOptions::default(),
        &[("a", "127.0.0.2"), ("b", "127.0.0.3")],
        |c| c.upstream.fingerprint = FingerprintMode::Rustls,
    )
    .await;
    let port = rig.origin.port();
    for _ in 0..20 {
        Client::CurlH2.get_ok(&rig.proxied(), port, "/", None).await;
        let peers: BTreeSet<IpAddr> = rig
            .origin
            .connections()
            .iter()
            .map(|c| c.peer.ip())
            .collect();
        if peers.len() == 2 {
            break;
        }
    }
    for exit in ["127.0.0.2", "127.0.0.3"] {
        let first = rig
            .origin
            .connections()
            .into_iter()
            .find(|c| c.peer.ip() == ip(exit))
            .unwrap_or_else(|| panic!("rotation never used {exit}"));
        // Nothing went through this exit before: a session it resumes was
        // issued to a connection through the other exit.
        assert!(
            !first.resumption_accepted,
            "the first connection through {exit} resumed another exit's TLS session: {first:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_http1_clients_header_order_survives_an_http2_upstream() {
    let rig = Rig::start(OriginOptions::default(), |_| {}).await;
    let port = rig.origin.port();
    // curl (offering h2) founds the identity; Python (HTTP/1.1 only) uses
    // it, so its requests go to the origin over HTTP/2.
    let login = Client::CurlH2
        .get_ok(&rig.proxied(), port, "/login", None)
        .await;
    let cookie = format!("datadome={}", login.datadome.unwrap());
    Client::Python
        .get_ok(&rig.direct(), port, "/direct", Some(&cookie))
        .await;
    Client::Python
        .get_ok(&rig.proxied(), port, "/identity", Some(&cookie))
        .await;
    let direct = records_of(&rig.origin, "/direct", "127.0.0.1");
    let through = records_of(&rig.origin, "/identity", EXIT_IP);
    assert_eq!(through[0].version, http::Version::HTTP_2);
    // HTTP/2 has no Host (it becomes :authority) and no Connection.
    let expected: Vec<String> = direct[0]
        .header_names
        .iter()
        .map(|n| n.to_ascii_lowercase())
        .filter(|n| n != "host" && n != "connection")
        .collect();
    assert_eq!(through[0].header_names, expected);
}
