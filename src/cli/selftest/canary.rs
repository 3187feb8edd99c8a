//! One canary run: an in-process pinproxy with one exit, and a client that
//! sends it two requests for the echo origin carrying everything that must
//! not reach an origin (forwarded-for headers naming a canary address, a
//! `Via`, proxy credentials, a session-key carrier) plus a tracked cookie.
//! The echo origin's answer says what arrived.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use http::Request;
use http_body_util::BodyExt as _;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use rustls_pki_types::pem::PemObject as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::echo::{Echo, EchoOrigin};
use crate::config::{Config, ExitConfig};
use crate::daemon::Daemon;
use crate::proxy::egress::{FORWARDING_HEADERS, PINPROXY_PREFIX};

/// The address the canary headers claim the client has (TEST-NET-2, never
/// contacted: it only appears in header values).
pub const CANARY_ADDRESS: &str = "198.51.100.23";
/// The session key the canary names.
const CANARY_SESSION: &str = "canary-session-5e1f";
/// How long one exit gets for both requests.
const EXIT_DEADLINE: Duration = Duration::from_secs(30);

/// What one exit let through.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ExitReport {
    /// The exit's id.
    pub exit: String,
    /// Its URL without credentials.
    pub url: String,
    /// What the origin saw (the first request), if it got that far; each
    /// header's value as a short hash (`hash:` and 8 hex digits, keyed
    /// afresh by each run, so the same value reads the same within a report
    /// and a guess cannot be checked against it), since a value may be the
    /// canary cookie or, if the exit leaks one, its own credentials, and
    /// this report goes to terminals and CI logs.
    pub seen: Option<Echo>,
    /// The first request, from the client's CONNECT to the end of the answer.
    pub cold_ms: Option<f64>,
    /// The second request on the same tunnel.
    pub warm_ms: Option<f64>,
    /// What leaked (empty: nothing).
    pub leaks: Vec<String>,
    /// Why the run failed, if it did.
    pub error: Option<String>,
}

impl ExitReport {
    /// Whether the exit passed: it answered and nothing leaked.
    pub fn passed(&self) -> bool {
        self.error.is_none() && self.leaks.is_empty()
    }
}

/// Runs the canary through `exit` (from `base`'s configuration) to `echo`;
/// `local` are this machine's own addresses.
pub async fn run(
    base: &Config,
    exit: &ExitConfig,
    echo: &EchoOrigin,
    local: &[IpAddr],
) -> ExitReport {
    let url = crate::exits::ExitSpec::parse(&exit.id, &exit.url)
        .map(|spec| spec.redacted_url())
        .unwrap_or_else(|_| "(unparsable URL)".into());
    let mut report = ExitReport {
        exit: exit.id.clone(),
        url,
        seen: None,
        cold_ms: None,
        warm_ms: None,
        leaks: Vec::new(),
        error: None,
    };
    match tokio::time::timeout(EXIT_DEADLINE, through(base, exit, echo)).await {
        Ok(Ok((seen, cold, warm))) => {
            report.leaks = leaks(&seen, exit, local);
            report.seen = Some(redacted(seen));
            report.cold_ms = Some(cold.as_secs_f64() * 1e3);
            report.warm_ms = Some(warm.as_secs_f64() * 1e3);
        }
        Ok(Err(e)) => report.error = Some(format!("{e:#}")),
        Err(_) => report.error = Some(format!("no answer within {EXIT_DEADLINE:?}")),
    }
    report
}

/// Starts a pinproxy with only `exit` and sends the two canary requests.
async fn through(
    base: &Config,
    exit: &ExitConfig,
    echo: &EchoOrigin,
) -> anyhow::Result<(Echo, Duration, Duration)> {
    let data = tempfile::tempdir().context("cannot create a scratch directory")?;
    let mut config = base.clone();
    config.exits = vec![exit.clone()];
    config.listen = "127.0.0.1:0".parse()?;
    config.admin.listen = None;
    config.data_dir = Some(data.path().to_owned());
    config.store.url = "memory".into();
    // A scratch CA and no client authentication: this daemon is private to
    // the self-test, and a fleet CA's name constraints or the users' 407
    // would stop the canary before it reached the exit under test.
    config.ca = Default::default();
    config.auth = Default::default();
    config.upstream_ca.push(echo.ca_file.clone());
    let daemon = Daemon::start(&config).await?;
    let outcome = canaries(&daemon, echo).await;
    daemon.shutdown(Duration::from_secs(2)).await;
    outcome
}

async fn canaries(
    daemon: &Daemon,
    echo: &EchoOrigin,
) -> anyhow::Result<(Echo, Duration, Duration)> {
    let started = Instant::now();
    let authority = format!("{}:{}", echo.host, echo.addr.port());
    let mut tcp = TcpStream::connect(daemon.local_addr()).await?;
    tcp.write_all(
        format!(
            "CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\
             X-Forwarded-For: {CANARY_ADDRESS}\r\nVia: 1.1 selftest-client\r\n\r\n"
        )
        .as_bytes(),
    )
    .await?;
    let head = read_head(&mut tcp).await?;
    let status = head.split(' ').nth(1).unwrap_or_default();
    if status != "200" {
        let reason = head
            .lines()
            .find_map(|l| {
                l.strip_prefix("X-Pinproxy-Error: ")
                    .or(l.strip_prefix("x-pinproxy-error: "))
            })
            .unwrap_or(head.lines().next().unwrap_or_default());
        bail!("pinproxy refused the CONNECT: {reason}");
    }

    let mut roots = rustls::RootCertStore::empty();
    let ca = rustls_pki_types::CertificateDer::from_pem_slice(daemon.ca_cert_pem().as_bytes())
        .map_err(|e| anyhow::anyhow!("pinproxy's CA: {e}"))?;
    roots.add(ca)?;
    let mut tls = rustls::ClientConfig::builder_with_provider(crate::daemon::crypto_provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let name = ServerName::try_from(echo.host.clone())?;
    let stream = TlsConnector::from(Arc::new(tls)).connect(name, tcp).await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake::<_, crate::body::Body>(TokioIo::new(stream)).await?;
    tokio::spawn(connection);

    let cookie = format!("datadome={:032x}", rand::random::<u128>());
    let first = ask(&mut sender, &authority, &cookie).await?;
    let cold = started.elapsed();
    let warm_started = Instant::now();
    ask(&mut sender, &authority, &cookie).await?;
    Ok((first, cold, warm_started.elapsed()))
}

/// One canary request; the echo's answer.
async fn ask(
    sender: &mut hyper::client::conn::http1::SendRequest<crate::body::Body>,
    authority: &str,
    cookie: &str,
) -> anyhow::Result<Echo> {
    let request = Request::get("/pinproxy-selftest")
        .header("host", authority)
        .header("user-agent", "pinproxy-selftest")
        .header("x-forwarded-for", CANARY_ADDRESS)
        .header("forwarded", format!("for={CANARY_ADDRESS}"))
        .header("x-real-ip", CANARY_ADDRESS)
        .header("true-client-ip", CANARY_ADDRESS)
        .header("via", "1.1 selftest-client")
        .header("proxy-authorization", "Basic c2VsZnRlc3Q6c2VsZnRlc3Q=")
        .header("x-pinproxy-session", CANARY_SESSION)
        .header("cookie", cookie)
        .body(crate::body::empty())?;
    sender.ready().await?;
    let response = sender.send_request(request).await?;
    let status = response.status();
    let error = response
        .headers()
        .get("x-pinproxy-error")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = http_body_util::Limited::new(response.into_body(), 1 << 20)
        .collect()
        .await
        .map_err(|e| anyhow::anyhow!("reading the echo: {e}"))?
        .to_bytes();
    if !status.is_success() {
        bail!(
            "{status}: {}",
            error.unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned())
        );
    }
    serde_json::from_slice(&body).context("the echo origin's answer")
}

/// Reads an HTTP response head (bounded), byte by byte so nothing of the
/// tunnel behind it is consumed.
async fn read_head(tcp: &mut TcpStream) -> anyhow::Result<String> {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 16 * 1024 {
            bail!("pinproxy's CONNECT answer is too long");
        }
        let byte = tcp
            .read_u8()
            .await
            .context("pinproxy closed the connection")?;
        head.push(byte);
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

/// `seen` with every header value replaced by its short hash, keyed by
/// this process's run (see [`ExitReport::seen`]).
fn redacted(mut seen: Echo) -> Echo {
    static KEY: std::sync::OnceLock<[u8; 32]> = std::sync::OnceLock::new();
    let key = KEY.get_or_init(rand::random);
    for (_, value) in &mut seen.headers {
        let digest = blake3::keyed_hash(key, value.as_bytes());
        let short: String = digest.as_bytes()[..4]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        *value = format!("hash:{short}");
    }
    seen
}

/// What the echo shows that should not have reached it.
fn leaks(seen: &Echo, exit: &ExitConfig, local: &[IpAddr]) -> Vec<String> {
    let mut leaks = Vec::new();
    for (name, value) in &seen.headers {
        let name = name.to_ascii_lowercase();
        if FORWARDING_HEADERS.contains(&name.as_str())
            || name == "proxy-authorization"
            || name == "proxy-connection"
            || name.starts_with(PINPROXY_PREFIX)
        {
            leaks.push(format!("header {name} reached the origin"));
        } else if value.contains(CANARY_ADDRESS) || value.contains(CANARY_SESSION) {
            leaks.push(format!("header {name} carries the client's canary"));
        }
    }
    let direct = exit.url.starts_with("direct://");
    if let Ok(peer) = seen.peer.parse::<IpAddr>() {
        if !direct && local.contains(&peer) {
            leaks.push(format!(
                "the origin saw {peer}, an address of this machine: the exit did not hide it"
            ));
        }
    }
    leaks
}
