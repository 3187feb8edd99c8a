//! The throughput phase, chapter 1 of the report: every setup (a)–(g)
//! (with (c) in each fingerprint mode) under the same closed-loop load at
//! each cell of [`CELLS`], interleaved within rounds, then the setups that
//! can sustain it at a fixed rate below saturation. Each run records the CPU time of the proxy under test and the
//! kernel's accept-queue drops. Its section of the report is in [`render`].

pub mod render;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::Result;
use serde::{Deserialize, Serialize};

use super::procs::{free_addr, path_str};
use super::servers::{fingerprint_toml, start_server, PinproxyOptions, Server};
use super::{Phase, Suite};
use crate::load::{ConnMode, LoadResult};
use crate::procfs::{self, ProcSample};

/// The throughput phase.
pub const PHASE: Phase = Phase {
    key: "throughput",
    name: "throughput",
    chapter: Some("1. Throughput and latency"),
    run,
    goals: render::goals,
    render: render::section,
};

/// Concurrency of the fixed-rate latency runs.
pub const FIXED_RATE_CONCURRENCY: usize = 32;

/// The modes and concurrencies of the throughput matrix, in table order.
pub const CELLS: [(ConnMode, usize); 6] = [
    (ConnMode::KeepAlive, 1),
    (ConnMode::KeepAlive, 32),
    (ConnMode::KeepAlive, 256),
    (ConnMode::NewConn, 1),
    (ConnMode::NewConn, 32),
    (ConnMode::NewConn, 256),
];

/// The setups compared in the throughput runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Setup {
    /// (a) straight to the origin.
    Direct,
    /// (b) through the exit proxy alone (a CONNECT tunnel, no MITM).
    Exit,
    /// (c) through pinproxy with one exit, in its default fingerprint mode
    /// (`mirror`).
    Pinproxy,
    /// (c-chrome) as (c) with `upstream.fingerprint = "chrome"`.
    PinproxyChrome,
    /// (c-rustls) as (c) with `upstream.fingerprint = "rustls"`.
    PinproxyRustls,
    /// (c′) as (c) with a wider upstream pool (`limits.max_idle_per_origin`),
    /// run only at keep-alive with the highest concurrency.
    PinproxyWidePool,
    /// (d) as (c), with tracked cookies on every request.
    PinproxyCookies,
    /// (e) mitmproxy in upstream mode to the same exit.
    Mitmproxy,
    /// (f) the peer: a plain MITM on the hudsucker crate (no pinning, no
    /// exit).
    Hudsucker,
    /// (g) pinproxy with its built-in direct exit: (f)'s path, with pinning.
    PinproxyDirect,
}

impl Setup {
    /// All setups, in table order.
    pub const ALL: [Setup; 10] = [
        Setup::Direct,
        Setup::Exit,
        Setup::Pinproxy,
        Setup::PinproxyChrome,
        Setup::PinproxyRustls,
        Setup::PinproxyWidePool,
        Setup::PinproxyCookies,
        Setup::Mitmproxy,
        Setup::Hudsucker,
        Setup::PinproxyDirect,
    ];

    /// The letter used in the issues: a..g (c′ for the wide-pool variant,
    /// c-chrome and c-rustls for the other fingerprint modes).
    pub fn letter(self) -> &'static str {
        match self {
            Setup::Direct => "a",
            Setup::Exit => "b",
            Setup::Pinproxy => "c",
            Setup::PinproxyChrome => "c-chrome",
            Setup::PinproxyRustls => "c-rustls",
            Setup::PinproxyWidePool => "c′",
            Setup::PinproxyCookies => "d",
            Setup::Mitmproxy => "e",
            Setup::Hudsucker => "f",
            Setup::PinproxyDirect => "g",
        }
    }

    /// Short description.
    pub fn label(self) -> &'static str {
        match self {
            Setup::Direct => "direct to the origin",
            Setup::Exit => "exit proxy alone (CONNECT tunnel)",
            Setup::Pinproxy => "pinproxy, one exit (fingerprint `mirror`, the default)",
            Setup::PinproxyChrome => "pinproxy, one exit, fingerprint `chrome`",
            Setup::PinproxyRustls => "pinproxy, one exit, fingerprint `rustls`",
            Setup::PinproxyWidePool => "pinproxy, `max_idle_per_origin` = concurrency",
            Setup::PinproxyCookies => "pinproxy, tracked cookies on every request",
            Setup::Mitmproxy => "mitmproxy, upstream mode to the exit",
            Setup::Hudsucker => "hudsucker (plain MITM, no exit, no pinning)",
            Setup::PinproxyDirect => "pinproxy, built-in direct exit (no exit proxy)",
        }
    }

    /// Whether the fixed-rate (below saturation) runs include it: not
    /// mitmproxy, which cannot sustain the rate, nor the variants of (c)
    /// that only matter saturated.
    fn at_fixed_rate(self) -> bool {
        !matches!(
            self,
            Setup::Mitmproxy
                | Setup::PinproxyWidePool
                | Setup::PinproxyChrome
                | Setup::PinproxyRustls
        )
    }
}

/// One load run of one setup.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sample {
    /// Which setup.
    pub setup: Setup,
    /// Connection reuse.
    pub mode: ConnMode,
    /// Concurrent clients.
    pub concurrency: usize,
    /// Round number (from 0).
    pub round: usize,
    /// What the load generator measured.
    pub result: LoadResult,
    /// CPU time of the proxy under test (exit, pinproxy or mitmproxy) per
    /// request, warm-up included, in microseconds.
    pub proxy_cpu_us_per_req: Option<f64>,
    /// Connections the kernel dropped during the run because a listener's
    /// accept queue was full (`TcpExt ListenOverflows`, machine-wide); each
    /// costs its client a 1 s SYN retransmission.
    pub listen_overflows: u64,
    /// Clients per connection, a stream each (HTTP/2 only); `None`: a
    /// connection per client.
    #[serde(default)]
    pub streams: Option<usize>,
}

/// The servers of the throughput runs.
struct Servers<'a> {
    exit: &'a Server,
    pinproxy: &'a Server,
    chrome: Option<&'a Server>,
    rustls: Option<&'a Server>,
    wide: &'a Server,
    mitm: Option<&'a Server>,
    peer: Option<&'a Server>,
    direct: Option<&'a Server>,
    origin_ca: &'a Path,
}

impl Servers<'_> {
    /// The proxy a setup goes through (and whose CPU is measured).
    fn of(&self, setup: Setup) -> Option<&Server> {
        match setup {
            Setup::Direct => None,
            Setup::Exit => Some(self.exit),
            Setup::Pinproxy | Setup::PinproxyCookies => Some(self.pinproxy),
            Setup::PinproxyChrome => self.chrome,
            Setup::PinproxyRustls => self.rustls,
            Setup::PinproxyWidePool => Some(self.wide),
            Setup::Mitmproxy => self.mitm,
            Setup::Hudsucker => self.peer,
            Setup::PinproxyDirect => self.direct,
        }
    }

    /// Whether `setup` can run: its proxy started (or it needs none).
    fn has(&self, setup: Setup) -> bool {
        setup == Setup::Direct || self.of(setup).is_some()
    }
}

/// Starts an optional server of the phase; when it does not start, notes
/// why (its setup is then left out) and goes on.
fn optional(suite: &mut Suite, what: &str, start: Result<Server>) -> Option<Server> {
    match start {
        Ok(server) => Some(server),
        Err(e) => {
            let note = format!("{what} did not start, so its rows are missing: {e:#}");
            suite.progress.say(&note);
            suite.results.notes.push(note);
            None
        }
    }
}

/// Runs the phase: starts every proxy (pinproxy in each configuration,
/// mitmproxy, the hudsucker peer), then measures every setup in every
/// cell, round after round.
fn run(suite: &mut Suite) -> Result<()> {
    let pinproxy = suite.start_pinproxy("pinproxy-load", None)?;
    let widest = CELLS
        .iter()
        .filter(|(mode, _)| *mode == ConnMode::KeepAlive)
        .map(|&(_, conc)| conc)
        .max()
        .unwrap_or(256);
    let wide = suite.start_pinproxy(
        "pinproxy-wide-pool",
        Some(&format!("[limits]\nmax_idle_per_origin = {widest}\n")),
    )?;
    let chrome = suite.start_pinproxy("pinproxy-chrome", Some(&fingerprint_toml("chrome")));
    let chrome = optional(suite, "pinproxy in fingerprint mode chrome", chrome);
    let rustls = suite.start_pinproxy("pinproxy-rustls", Some(&fingerprint_toml("rustls")));
    let rustls = optional(suite, "pinproxy in fingerprint mode rustls", rustls);
    let direct = suite.start_pinproxy_with(
        "pinproxy-direct",
        PinproxyOptions {
            direct: true,
            ..PinproxyOptions::default()
        },
    );
    let direct = optional(suite, "pinproxy with its built-in direct exit (g)", direct);
    let mitm = match &suite.config.mitmdump {
        Some(path) => match start_mitmproxy(suite, path) {
            Ok(server) => Some(server),
            Err(e) => {
                suite.results.notes.push(format!(
                    "mitmproxy is installed but did not start, so (e) is missing: {e:#}"
                ));
                None
            }
        },
        None => None,
    };
    let peer = match suite.config.peer {
        Some(_) => {
            let peer = suite.start_peer("hudsucker-peer");
            optional(suite, "the hudsucker peer (f)", peer)
        }
        None => None,
    };
    let servers = Servers {
        exit: &suite.exit,
        pinproxy: &pinproxy,
        chrome: chrome.as_ref(),
        rustls: rustls.as_ref(),
        wide: &wide,
        mitm: mitm.as_ref(),
        peer: peer.as_ref(),
        direct: direct.as_ref(),
        origin_ca: suite.origin_ca()?,
    };
    let setups: Vec<Setup> = Setup::ALL
        .into_iter()
        .filter(|&setup| servers.has(setup))
        .collect();
    let rounds = suite.config.rounds;
    let mut samples = Vec::new();
    let mut fixed = Vec::new();
    for round in 0..rounds {
        let order: Vec<Setup> = if round % 2 == 0 {
            setups.clone()
        } else {
            setups.iter().rev().copied().collect()
        };
        for &(mode, conc) in &CELLS {
            for &setup in &order {
                // The wide pool only differs from (c) where the
                // concurrency exceeds the default pool.
                if setup == Setup::PinproxyWidePool
                    && !(mode == ConnMode::KeepAlive && conc == widest)
                {
                    continue;
                }
                let sample = measure(suite, &servers, setup, mode, conc, round, None)?;
                samples.push(sample);
            }
        }
        // Latency below saturation, in the same round.
        for &setup in order.iter().filter(|s| s.at_fixed_rate()) {
            let sample = measure(
                suite,
                &servers,
                setup,
                ConnMode::KeepAlive,
                FIXED_RATE_CONCURRENCY,
                round,
                Some(suite.config.fixed_rate),
            )?;
            fixed.push(sample);
        }
    }
    let errors: u64 = samples.iter().map(|s| s.result.errors).sum();
    if errors > 0 {
        if let Some(e) = samples.iter().find_map(|s| s.result.first_error.clone()) {
            suite.results.notes.push(format!(
                "{errors} load requests failed in total; the first error: {e}"
            ));
        }
    }
    suite.results.throughput = samples;
    suite.results.fixed_rate = fixed;
    Ok(())
}

/// One load run of `setup`, with the CPU of the proxy under test and
/// the accept-queue drops during it.
fn measure(
    suite: &Suite,
    servers: &Servers<'_>,
    setup: Setup,
    mode: ConnMode,
    conc: usize,
    round: usize,
    rate: Option<f64>,
) -> Result<Sample> {
    let measured = servers.of(setup);
    // Through the bare exit, TLS is end to end with the origin.
    let proxy = measured.map(|s| (s.addr, s.ca.as_deref().unwrap_or(servers.origin_ca)));
    // (d): cookie values unique to this run, so each client's first
    // request pins them and the rest are routed by the pin.
    let tag = (setup == Setup::PinproxyCookies).then(|| {
        let mode = match mode {
            ConnMode::KeepAlive => "k",
            ConnMode::NewConn => "n",
        };
        let fixed = if rate.is_some() { "f" } else { "" };
        format!("r{round}{mode}{conc}{fixed}")
    });
    let ticks = procfs::ticks_per_second() as f64;
    let before = measured.map(|s| s.proc.sample()).transpose()?;
    let overflows_before = procfs::listen_overflows().unwrap_or(0);
    // A p99 needs more requests than a rate: fixed-rate runs last longer.
    let secs = match rate {
        Some(_) => suite.config.fixed_rate_secs,
        None => suite.config.secs,
    };
    let result = suite.load(proxy, mode, conc, secs, tag.as_deref(), rate)?;
    let overflows = procfs::listen_overflows()
        .unwrap_or(0)
        .saturating_sub(overflows_before);
    let after = measured.map(|s| s.proc.sample()).transpose()?;
    let cpu = cpu_per_request(before, after, ticks, &result);
    suite.progress.say(format!(
        "round {}/{} {}{:>10} c={conc:<3} ({}) {:>7.0} req/s p50 {:>6.2} ms p99 {:>7.2} ms{}{}",
        round + 1,
        suite.config.rounds,
        match rate {
            Some(r) => format!("at {r:.0} req/s "),
            None => String::new(),
        },
        mode.label(),
        setup.letter(),
        result.rps,
        f64::from(result.p50_us) / 1000.0,
        f64::from(result.p99_us) / 1000.0,
        if overflows > 0 {
            format!(" SYN drops {overflows}")
        } else {
            String::new()
        },
        errors_said(&result)
    ));
    Ok(Sample {
        setup,
        mode,
        concurrency: conc,
        round,
        result,
        proxy_cpu_us_per_req: cpu,
        listen_overflows: overflows,
        streams: None,
    })
}
/// A run's failed requests for its progress line (empty when none).
pub(super) fn errors_said(result: &LoadResult) -> String {
    if result.errors == 0 {
        return String::new();
    }
    format!(
        " errors {} ({})",
        result.errors,
        result.first_error.as_deref().unwrap_or_default()
    )
}

/// Starts mitmdump in upstream mode to the exit, trusting the origin's CA.
fn start_mitmproxy(suite: &Suite, mitmdump: &Path) -> Result<Server> {
    let addr = free_addr()?;
    let confdir = suite.dir.join("mitmproxy");
    std::fs::create_dir_all(&confdir)?;
    let log = suite.dir.join("mitmproxy.log");
    let mut cmd = Command::new(mitmdump);
    cmd.args(["--mode", &format!("upstream:http://{}", suite.exit.addr)])
        .args([
            "--listen-host",
            "127.0.0.1",
            "--listen-port",
            &addr.port().to_string(),
        ])
        .args(["--set", &format!("confdir={}", path_str(&confdir)?)])
        .args([
            "--set",
            &format!(
                "ssl_verify_upstream_trusted_ca={}",
                path_str(suite.origin_ca()?)?
            ),
        ])
        .args(["--set", "termlog_verbosity=error", "--set", "flow_detail=0"]);
    let ca = Some(confdir.join("mitmproxy-ca-cert.pem"));
    start_server(
        "mitmproxy",
        &mut cmd,
        addr,
        &log,
        Duration::from_secs(60),
        ca,
    )
}

/// CPU time of the proxy under test per request (warm-up included), in
/// microseconds; `None` without a proxy or requests.
pub(super) fn cpu_per_request(
    before: Option<ProcSample>,
    after: Option<ProcSample>,
    ticks: f64,
    result: &LoadResult,
) -> Option<f64> {
    let (before, after) = (before?, after?);
    let requests = result.ok + result.warmup_ok;
    (requests > 0).then(|| after.cpu_us_since(&before, ticks) / requests as f64)
}
