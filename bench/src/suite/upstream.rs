//! The upstream phase, chapter 2 of the report: what pinproxy's fingerprint
//! modes cost (`upstream.fingerprint` = `mirror`, the default, `chrome` and
//! `rustls`).
//!
//! The throughput phase already runs (c) in each mode side by side; this
//! phase measures what those runs cannot see, because pinproxy pools
//! upstream connections across client connections:
//!
//! - **Cold pool**: a second origin closes every connection after its
//!   response (`Connection: close`), so each request through pinproxy (with
//!   its built-in direct exit, nothing between it and the origin) pays a
//!   full upstream TCP + TLS handshake. At concurrency 32 the request rate
//!   is the upstream handshake rate; at concurrency 1 the origin times each
//!   handshake from TCP accept to its end (building and sending the
//!   ClientHello, the origin's answer, checking the chain, Finished: the
//!   handshake as pinproxy lives it, without queueing).
//! - **Memory per upstream connection**: a fresh pinproxy per mode founds
//!   `upstream_conns` identities (one request with one new tracked cookie
//!   each), each keeping its own idle upstream connection (the exit's idle
//!   cap raised above that count); the same again
//!   against the closing origin, where no connection stays, gives the
//!   identities' own share. The difference over the connections held
//!   (counted as open descriptors) is one idle upstream connection,
//!   sampled twice: half a second after the last answer (hyper's connection
//!   still running) and three seconds after it (parked: pinproxy parks an
//!   idle upstream HTTP/1.1 connection 1 to 2 s into its idleness).
//! - **Build**: the stripped size of the pinproxy binary and, with
//!   `--clean-build`, the wall time of `cargo build --release` in an empty
//!   target directory.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use serde::{Deserialize, Serialize};

use super::procs::{path_str, run_bounded};
use super::servers::{
    fill, fingerprint_toml, run_load, start_origin, FillerPlan, LoadPlan, PinproxyOptions, Server,
};
use super::throughput::{Setup, CELLS};
use super::{Phase, Suite, BODY_BYTES};
use crate::load::ConnMode;
use crate::origin::HandshakeReport;
use crate::procfs;
use crate::report::{fmt_ratio, group, mib, Goal, Results};
use crate::stats::median;

/// The upstream phase; it opens chapter 2.
pub const PHASE: Phase = Phase {
    key: "upstream",
    name: "fingerprint modes",
    chapter: Some("2. Mirror mode's cost"),
    run,
    goals,
    render,
};

/// The fingerprint modes, in table order, with the throughput setup that
/// runs each through the exit.
pub const MODES: [(&str, Setup); 3] = [
    ("mirror", Setup::Pinproxy),
    ("chrome", Setup::PinproxyChrome),
    ("rustls", Setup::PinproxyRustls),
];

/// The cold-pool runs: one pinproxy each, by the name its samples carry,
/// its fingerprint mode, and whether each client sends tracked cookies of
/// its own (so is an identity, whose connections resume their sessions in
/// `chrome` mode; without cookies every upstream handshake is a full one).
const COLD_RUNS: [(&str, &str, bool); 4] = [
    ("mirror", "mirror", false),
    ("chrome", "chrome", false),
    ("rustls", "rustls", false),
    (COLD_RESUMING, "chrome", true),
];
/// The cold-pool run whose identities resume.
const COLD_RESUMING: &str = "chrome, identities resuming";

/// Mirror mode's keep-alive requests/s over rustls mode's.
const GOAL_MIRROR_VS_RUSTLS: f64 = 0.9;
/// Clients of the cold-pool rate runs.
const COLD_CONCURRENCY: usize = 32;
/// Connections of the identity fill.
const FILL_CONCURRENCY: usize = 32;
/// Longest clean build, seconds.
const CLEAN_BUILD_LIMIT_SECS: u64 = 3600;

/// One cold-pool run of one mode.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ColdSample {
    /// `mirror`, `chrome` or `rustls`, or [`COLD_RESUMING`].
    pub mode: String,
    /// Round number (from 0).
    pub round: usize,
    /// Concurrent clients.
    pub concurrency: usize,
    /// Requests (each with its own upstream handshake) per second.
    pub rps: f64,
    /// Requests that failed.
    pub errors: u64,
    /// Client connections the load generator opened in the timed phase (a
    /// proxy that passes `Connection: close` on makes its client reconnect).
    pub client_connections: u64,
    /// pinproxy's CPU per request, microseconds.
    pub cpu_us_per_req: Option<f64>,
    /// Handshakes the origin completed during the run, and their times.
    pub handshakes: HandshakeReport,
}

/// Idle upstream connections of one mode.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ConnMemory {
    /// `mirror`, `chrome` or `rustls`.
    pub mode: String,
    /// Identities founded (one request each).
    pub identities: u64,
    /// RSS growth with their upstream connections kept, bytes.
    pub rss_kept: u64,
    /// Growth of open descriptors with the connections kept.
    pub fds_kept: u64,
    /// RSS growth against the closing origin (no connection kept), bytes.
    pub rss_closed: u64,
    /// Growth of open descriptors against the closing origin.
    pub fds_closed: u64,
    /// RSS growth with the connections kept, 3 s after the last answer
    /// (parked), bytes.
    #[serde(default)]
    pub rss_kept_parked: u64,
    /// RSS growth against the closing origin, 3 s after the last answer.
    #[serde(default)]
    pub rss_closed_parked: u64,
}

impl ConnMemory {
    /// Upstream connections held: the descriptors beyond the closing run's.
    pub fn held(&self) -> u64 {
        self.fds_kept.saturating_sub(self.fds_closed)
    }

    /// RSS per idle upstream connection, net of the identities' own memory.
    pub fn bytes_per_conn(&self) -> Option<f64> {
        let held = self.held();
        (held > 0).then(|| self.rss_kept.saturating_sub(self.rss_closed) as f64 / held as f64)
    }

    /// The same once the connections have parked.
    pub fn bytes_per_parked_conn(&self) -> Option<f64> {
        let held = self.held();
        (held > 0).then(|| {
            self.rss_kept_parked.saturating_sub(self.rss_closed_parked) as f64 / held as f64
        })
    }
}

/// The size of the binaries and the clean build.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct BuildFacts {
    /// `target/release/pinproxy` as built (with its line tables), bytes.
    pub pinproxy_bytes: u64,
    /// The same, stripped (`strip`), bytes.
    pub pinproxy_stripped_bytes: Option<u64>,
    /// The hudsucker peer, stripped, bytes.
    pub peer_stripped_bytes: Option<u64>,
    /// Wall time of `cargo build --release` into an empty target
    /// directory, seconds, when measured (`--clean-build`).
    pub clean_build_secs: Option<f64>,
}

/// What the phase adds to the results.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct UpstreamReport {
    /// Cold-pool runs.
    pub cold: Vec<ColdSample>,
    /// Idle upstream connection memory per mode.
    pub memory: Vec<ConnMemory>,
    /// Binary sizes and the clean build.
    pub build: Option<BuildFacts>,
}

/// Runs the phase: cold pool per mode (interleaved over rounds), memory
/// per upstream connection per mode, the build facts.
fn run(suite: &mut Suite) -> Result<()> {
    let mut report = UpstreamReport::default();
    let ca = suite.dir.join("origin-cold-ca.pem");
    let mut cold_origin = start_origin(
        &suite.exe,
        "origin-cold",
        ca,
        &[
            "--body-bytes",
            &BODY_BYTES.to_string(),
            "--close",
            "--handshake-stats",
        ],
    )?;
    match cold_pool(suite, &mut cold_origin) {
        Ok(samples) => report.cold = samples,
        Err(e) => note(suite, format!("cold-pool runs failed: {e:#}")),
    }
    for (mode, _) in MODES {
        match conn_memory(suite, &cold_origin, mode) {
            Ok(row) => {
                let kib =
                    |b: Option<f64>| b.map_or("–".into(), |b| format!("{:.1} KiB", b / 1024.0));
                suite.progress.say(format!(
                    "{mode}: {} upstream connections held, {} each, {} parked",
                    row.held(),
                    kib(row.bytes_per_conn()),
                    kib(row.bytes_per_parked_conn())
                ));
                report.memory.push(row);
            }
            Err(e) => note(suite, format!("upstream connection memory, {mode}: {e:#}")),
        }
    }
    drop(cold_origin);
    match build_facts(suite) {
        Ok(build) => report.build = Some(build),
        Err(e) => note(suite, format!("build facts: {e:#}")),
    }
    suite.results.upstream = Some(report);
    Ok(())
}

/// Adds a note and says it.
fn note(suite: &mut Suite, note: String) {
    suite.progress.say(&note);
    suite.results.notes.push(note);
}

/// The cold-pool runs: one pinproxy per mode (direct exit) before the
/// closing origin, at concurrency 1 and [`COLD_CONCURRENCY`], modes
/// interleaved within rounds.
fn cold_pool(suite: &mut Suite, origin: &mut Server) -> Result<Vec<ColdSample>> {
    let ca = origin.ca()?.to_owned();
    let mut proxies = Vec::new();
    for (i, (run, mode, identities)) in COLD_RUNS.into_iter().enumerate() {
        let options = PinproxyOptions {
            direct: true,
            upstream_ca: Some(ca.clone()),
            config: Some(fingerprint_toml(mode)),
            ..PinproxyOptions::default()
        };
        let proxy = suite.start_pinproxy_with(&format!("pinproxy-cold-{i}"), options)?;
        proxies.push((run, identities.then_some("cold"), proxy));
    }
    let ticks = procfs::ticks_per_second() as f64;
    let mut samples = Vec::new();
    for round in 0..suite.config.rounds {
        let mut order: Vec<usize> = (0..proxies.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for concurrency in [1, COLD_CONCURRENCY] {
            for &i in &order {
                let (mode, cookie_tag, proxy) = &proxies[i];
                let proxy_ca = proxy.ca()?.to_owned();
                let plan = LoadPlan {
                    proxy: Some((proxy.addr, &proxy_ca)),
                    concurrency,
                    secs: suite.config.secs,
                    cookie_tag: *cookie_tag,
                    ..LoadPlan::new(origin, suite.config.max_requests)
                };
                let cmd = suite.load_command(&plan)?;
                origin.handshakes()?;
                let before = proxy.proc.sample()?;
                let result = run_load(cmd)?;
                let after = proxy.proc.sample()?;
                let shakes = origin.handshakes()?;
                let requests = result.ok + result.warmup_ok;
                let sample = ColdSample {
                    mode: (*mode).to_owned(),
                    round,
                    concurrency,
                    rps: result.rps,
                    errors: result.errors,
                    client_connections: result.connections,
                    cpu_us_per_req: (requests > 0)
                        .then(|| after.cpu_us_since(&before, ticks) / requests as f64),
                    handshakes: shakes,
                };
                suite.progress.say(format!(
                    "round {}/{} cold pool c={concurrency:<2} ({mode}) {:>6.0} req/s, {} origin \
                     handshakes, p50 {:.2} ms{}",
                    round + 1,
                    suite.config.rounds,
                    sample.rps,
                    sample.handshakes.count,
                    f64::from(sample.handshakes.p50_us) / 1000.0,
                    if result.errors > 0 {
                        format!(
                            " errors {} ({})",
                            result.errors,
                            result.first_error.unwrap_or_default()
                        )
                    } else {
                        String::new()
                    }
                ));
                samples.push(sample);
            }
        }
    }
    Ok(samples)
}

/// Founds `upstream_conns` identities through a fresh pinproxy in `mode`,
/// first before the suite's origin (their upstream connections stay), then
/// before the closing origin (none stays).
fn conn_memory(suite: &Suite, cold: &Server, mode: &str) -> Result<ConnMemory> {
    let identities = suite.config.upstream_conns;
    let kept = found_identities(suite, &suite.origin, mode, "kept", identities)?;
    let closed = found_identities(suite, cold, mode, "closed", identities)?;
    Ok(ConnMemory {
        mode: mode.to_owned(),
        identities,
        rss_kept: kept.rss,
        fds_kept: kept.fds,
        rss_closed: closed.rss,
        fds_closed: closed.fds,
        rss_kept_parked: kept.rss_parked,
        rss_closed_parked: closed.rss_parked,
    })
}

/// What founding identities grew in one pinproxy.
struct Growth {
    /// RSS, half a second after the last answer, bytes.
    rss: u64,
    /// Open descriptors then.
    fds: u64,
    /// RSS three seconds after the last answer (idle connections parked).
    rss_parked: u64,
}

/// One fresh pinproxy (direct exit, `mode`) before `origin`: founds `n`
/// identities after a warm-up and returns the growth of its RSS and open
/// descriptors.
fn found_identities(
    suite: &Suite,
    origin: &Server,
    mode: &str,
    what: &str,
    n: u64,
) -> Result<Growth> {
    // The exit's idle cap (64 by default) raised above `n`: otherwise the
    // connections held at the sample depend on whether the idle sweeper
    // (once a second) has closed the excess yet, and the figure with them.
    let config = format!(
        "{}[limits]\nmax_idle_per_exit = {}\n",
        fingerprint_toml(mode),
        n + 4 * FILL_CONCURRENCY as u64
    );
    let options = PinproxyOptions {
        direct: true,
        upstream_ca: origin.ca.clone(),
        config: Some(config),
        ..PinproxyOptions::default()
    };
    let proxy = suite.start_pinproxy_with(&format!("pinproxy-conns-{mode}-{what}"), options)?;
    let plan = FillerPlan {
        concurrency: FILL_CONCURRENCY,
        per_request: 1,
        anchor: false,
        limit_secs: 120.0,
        tag: format!("u{}{mode}{what}", std::process::id()),
        fresh_clients: false,
    };
    let mut filler = suite.spawn_filler(origin, &proxy, &plan)?;
    // The client connections, the leaf and the runtime exist before the
    // baseline; their identities are part of it.
    let warm = fill(&mut filler, 2 * FILL_CONCURRENCY as u64)?;
    thread::sleep(Duration::from_millis(500));
    let before = proxy.proc.sample()?;
    let fds_before = procfs::open_fds(proxy.proc.pid())?;
    let report = fill(&mut filler, n)?;
    thread::sleep(Duration::from_millis(500));
    let after = proxy.proc.sample()?;
    let fds_after = procfs::open_fds(proxy.proc.pid())?;
    // Parked by now (1 to 2 s into their idleness), and the freed heap
    // given back (pinproxy trims after parks).
    thread::sleep(Duration::from_millis(5500));
    let parked = proxy.proc.sample()?;
    let failed = warm.failed + report.failed;
    filler.finish(Duration::from_secs(10));
    if failed > 0 {
        return Err(anyhow!(
            "{failed} requests failed: {}",
            report.first_error.or(warm.first_error).unwrap_or_default()
        ));
    }
    Ok(Growth {
        rss: after.rss_bytes.saturating_sub(before.rss_bytes),
        fds: fds_after.saturating_sub(fds_before),
        rss_parked: parked.rss_bytes.saturating_sub(before.rss_bytes),
    })
}

/// The binary sizes and, when asked for, the clean build time.
fn build_facts(suite: &mut Suite) -> Result<BuildFacts> {
    let pinproxy = suite.config.pinproxy.clone();
    let pinproxy_bytes = std::fs::metadata(&pinproxy)
        .with_context(|| format!("{}", pinproxy.display()))?
        .len();
    let pinproxy_stripped_bytes = stripped_size(suite, &pinproxy, "pinproxy")
        .map_err(|e| note(suite, format!("stripped size of pinproxy: {e:#}")))
        .ok();
    let peer_stripped_bytes = match suite.config.peer.clone() {
        Some(peer) => stripped_size(suite, &peer, "hudsucker-peer").ok(),
        None => None,
    };
    let mut facts = BuildFacts {
        pinproxy_bytes,
        pinproxy_stripped_bytes,
        peer_stripped_bytes,
        clean_build_secs: None,
    };
    suite.progress.say(format!(
        "pinproxy binary {}, stripped {}",
        mib(pinproxy_bytes),
        pinproxy_stripped_bytes.map_or("–".into(), mib)
    ));
    if suite.config.clean_build {
        match clean_build(suite) {
            Ok(secs) => {
                suite
                    .progress
                    .say(format!("clean release build: {secs:.0} s"));
                facts.clean_build_secs = Some(secs);
            }
            Err(e) => note(suite, format!("clean build failed: {e:#}")),
        }
    }
    Ok(facts)
}

/// The size of a stripped copy of `binary`.
fn stripped_size(suite: &Suite, binary: &Path, name: &str) -> Result<u64> {
    let copy = suite.dir.join(format!("{name}.stripped"));
    run_bounded(
        Command::new("strip").arg("-o").arg(&copy).arg(binary),
        Duration::from_secs(120),
    )?;
    let size = std::fs::metadata(&copy)?.len();
    let _ = std::fs::remove_file(&copy);
    Ok(size)
}

/// Times `cargo build --release` of the source tree into an empty target
/// directory (removed afterwards).
fn clean_build(suite: &mut Suite) -> Result<f64> {
    let source = suite
        .config
        .source_dir
        .clone()
        .ok_or_else(|| anyhow!("no --source-dir"))?;
    let target = suite.dir.join("clean-build-target");
    let _ = std::fs::remove_dir_all(&target);
    suite.progress.say(format!(
        "clean release build into {} (about 10 minutes on 2 cores)",
        target.display()
    ));
    let started = Instant::now();
    let mut cmd = Command::new("cargo");
    cmd.current_dir(&source)
        .env_remove("CARGO_TARGET_DIR")
        .args(["build", "--release", "--quiet", "--target-dir"])
        .arg(path_str(&target)?);
    let built = run_bounded(&mut cmd, Duration::from_secs(CLEAN_BUILD_LIMIT_SECS));
    let secs = started.elapsed().as_secs_f64();
    let _ = std::fs::remove_dir_all(&target);
    built?;
    Ok(secs)
}

/// Mirror mode against rustls mode at keep-alive, every concurrency.
fn goals(results: &Results) -> Vec<Goal> {
    let cells: Vec<(String, f64)> = CELLS
        .iter()
        .filter(|(mode, _)| *mode == ConnMode::KeepAlive)
        .filter_map(|&(mode, conc)| {
            median(&results.rps_ratios(Setup::Pinproxy, Setup::PinproxyRustls, mode, conc))
                .map(|v| (format!("keep-alive c={conc}"), v))
        })
        .collect();
    vec![Goal::over(
        format!(
            "mirror mode ≥ {GOAL_MIRROR_VS_RUSTLS}× rustls mode's keep-alive requests/s ((c) \
             over (c-rustls)), every concurrency"
        ),
        &cells,
        |cell, v| format!("{cell}: {v:.2}"),
        |v| v >= GOAL_MIRROR_VS_RUSTLS,
    )]
}

/// Median over rounds of `f` over the cold samples of one mode and
/// concurrency.
fn cold_median(
    report: &UpstreamReport,
    mode: &str,
    concurrency: usize,
    f: impl Fn(&ColdSample) -> Option<f64>,
) -> Option<f64> {
    let v: Vec<f64> = report
        .cold
        .iter()
        .filter(|s| s.mode == mode && s.concurrency == concurrency)
        .filter_map(f)
        .collect();
    median(&v)
}

/// The chapter: modes through the exit (from the throughput runs), the cold
/// pool, memory per upstream connection, the build.
fn render(results: &Results, out: &mut String) {
    let _ = writeln!(
        out,
        "`upstream.fingerprint` chooses whose ClientHello and HTTP/2 preface pinproxy's \
         upstream connections present: `mirror` (the default: each identity's own client's, \
         over BoringSSL), `chrome` (a current Chrome's, over BoringSSL) or `rustls` \
         (pinproxy's own, the stack before fingerprints). The load generator's own client is \
         rustls, so `mirror` here replays a rustls ClientHello through BoringSSL.\n"
    );
    modes_table(results, out);
    let Some(report) = &results.upstream else {
        return;
    };
    cold_table(report, out);
    memory_table(report, out);
    build_table(report, out);
}

/// Requests/s of (c) in each mode, from the throughput runs.
fn modes_table(results: &Results, out: &mut String) {
    let measured = CELLS.iter().any(|&(mode, conc)| {
        results
            .median_rps(Setup::PinproxyRustls, mode, conc)
            .is_some()
    });
    if !measured {
        return;
    }
    let _ = writeln!(out, "### Requests/s per mode, through the exit\n");
    let _ = writeln!(
        out,
        "Setups (c), (c-chrome) and (c-rustls) of chapter 1 (medians over rounds; ratios \
         within rounds). With a new client connection per request pinproxy still reuses its \
         pooled upstream connections, so these rows barely see the upstream handshake; the \
         cold-pool table below does.\n"
    );
    let _ = writeln!(
        out,
        "| connections | concurrency | mirror req/s | chrome req/s | rustls req/s | mirror/rustls | chrome/rustls |"
    );
    let _ = writeln!(out, "| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    for &(mode, conc) in &CELLS {
        let rps = |setup| {
            results
                .median_rps(setup, mode, conc)
                .map_or("–".into(), |v| format!("{v:.0}"))
        };
        let ratio = |num| fmt_ratio(&results.rps_ratios(num, Setup::PinproxyRustls, mode, conc));
        let _ = writeln!(
            out,
            "| {} | {conc} | {} | {} | {} | {} | {} |",
            mode.label(),
            rps(Setup::Pinproxy),
            rps(Setup::PinproxyChrome),
            rps(Setup::PinproxyRustls),
            ratio(Setup::Pinproxy),
            ratio(Setup::PinproxyChrome),
        );
    }
    let _ = writeln!(out);
}

/// Upstream handshakes per second and their time, per mode.
fn cold_table(report: &UpstreamReport, out: &mut String) {
    if report.cold.is_empty() {
        return;
    }
    let _ = writeln!(out, "### Upstream handshakes: the pool forced cold\n");
    let _ = writeln!(
        out,
        "pinproxy with its built-in direct exit before an origin that closes every connection \
         after its response (`Connection: close`), so every request opens a new upstream \
         connection: TCP and a TLS handshake, a full one in the first three rows, whose \
         clients send no cookies (cookie-less traffic never resumes a session upstream). In \
         the last row each client sends tracked cookies of its own, so each is an identity, \
         and in `chrome` mode an identity's connection resumes the session the origin issued \
         to its previous one (the origin issues TLS 1.3 tickets): what resumption saves. \
         Clients keep their connections to pinproxy. *handshakes/s* is the request \
         rate at concurrency {COLD_CONCURRENCY} (closed loop), with pinproxy's CPU per \
         request (each one upstream handshake and one forwarded request); *handshake time* is measured at the origin at concurrency 1, from \
         accepting the TCP connection to the end of the TLS handshake: pinproxy building and \
         sending its ClientHello, the origin's answer, pinproxy checking the chain and \
         finishing (the origin's share is the same in every mode). It is taken at the origin \
         because only there do all three modes share one clock and one definition; at \
         concurrency 1 it holds no queueing.\n"
    );
    let _ = writeln!(
        out,
        "| mode | handshakes/s | CPU µs per request | handshake p50 ms | handshake p99 ms | req/s at c=1 | resumed | vs rustls (handshakes/s) |"
    );
    let _ = writeln!(
        out,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    let rustls = cold_median(report, "rustls", COLD_CONCURRENCY, |s| Some(s.rps));
    for (mode, _, _) in COLD_RUNS {
        if !report.cold.iter().any(|s| s.mode == mode) {
            continue;
        }
        // Of the handshakes at concurrency 32, the share that resumed.
        let resumed = cold_median(report, mode, COLD_CONCURRENCY, |s| {
            (s.handshakes.count > 0)
                .then(|| 100.0 * s.handshakes.resumed as f64 / s.handshakes.count as f64)
        });
        let rate = cold_median(report, mode, COLD_CONCURRENCY, |s| Some(s.rps));
        let cpu = cold_median(report, mode, COLD_CONCURRENCY, |s| s.cpu_us_per_req);
        let ms = |f: fn(&HandshakeReport) -> u32| {
            cold_median(report, mode, 1, |s| {
                (s.handshakes.count > 0).then(|| f64::from(f(&s.handshakes)) / 1000.0)
            })
        };
        let single = cold_median(report, mode, 1, |s| Some(s.rps));
        let show =
            |v: Option<f64>, digits: usize| v.map_or("–".into(), |v| format!("{v:.digits$}"));
        let _ = writeln!(
            out,
            "| {mode} | {} | {} | {} | {} | {} | {} | {} |",
            show(rate, 0),
            show(cpu, 0),
            show(ms(|h| h.p50_us), 2),
            show(ms(|h| h.p99_us), 2),
            show(single, 0),
            resumed.map_or("–".into(), |v| format!("{v:.0}%")),
            match (rate, rustls) {
                (Some(r), Some(base)) if base > 0.0 => format!("{:.2}", r / base),
                _ => "–".into(),
            }
        );
    }
    let errors: u64 = report.cold.iter().map(|s| s.errors).sum();
    let reconnects: u64 = report.cold.iter().map(|s| s.client_connections).sum();
    let _ = writeln!(
        out,
        "\n{} failed requests over all cold-pool runs; the clients reopened {} connections to \
         pinproxy during them ({}).\n",
        group(errors),
        group(reconnects),
        if reconnects == 0 {
            "pinproxy does not pass the origin's `Connection: close` on, so only the upstream \
             side is cold"
        } else {
            "pinproxy passed the origin's `Connection: close` on, so clients reconnected too \
             and these rates include client handshakes"
        }
    );
}

/// Memory per idle upstream connection, per mode.
fn memory_table(report: &UpstreamReport, out: &mut String) {
    if report.memory.is_empty() {
        return;
    }
    let _ = writeln!(out, "### Memory per idle upstream connection\n");
    let _ = writeln!(
        out,
        "A fresh pinproxy per mode and run (built-in direct exit) founds {} identities, one \
         request with one new tracked cookie each, so every identity opens an upstream \
         connection of its own and keeps it idle in its pool (`limits.max_idle_per_exit` \
         raised above the identity count, so that none is closed for the cap). The same \
         against the closing \
         origin keeps no connection; the difference in RSS over the difference in open \
         descriptors (the connections held) is one idle upstream connection, TLS state and \
         buffers included. Sampled 0.5 s after the last answer (*running*: hyper's connection, \
         its task and buffers still there) and 3 s after it (*parked*: pinproxy parks an idle \
         upstream HTTP/1.1 connection 1 to 2 s into its idleness, keeping the stream and its \
         TLS state only).\n",
        report.memory.first().map_or(0, |m| m.identities)
    );
    let _ = writeln!(
        out,
        "| mode | identities | connections held | RSS growth, kept | RSS growth, closed | per upstream connection, running | per upstream connection, parked |"
    );
    let _ = writeln!(out, "| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    for m in &report.memory {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} |",
            m.mode,
            group(m.identities),
            group(m.held()),
            mib(m.rss_kept),
            mib(m.rss_closed),
            m.bytes_per_conn()
                .map_or("–".into(), |b| format!("{:.1} KiB", b / 1024.0)),
            m.bytes_per_parked_conn()
                .map_or("–".into(), |b| format!("{:.1} KiB", b / 1024.0))
        );
    }
    let _ = writeln!(out);
}

/// Binary sizes and the clean build time.
fn build_table(report: &UpstreamReport, out: &mut String) {
    let Some(b) = &report.build else {
        return;
    };
    let _ = writeln!(out, "### Binary and build\n");
    let _ = writeln!(out, "| | |\n| --- | ---: |");
    let _ = writeln!(
        out,
        "| `target/release/pinproxy` (with line tables) | {} |",
        mib(b.pinproxy_bytes)
    );
    let _ = writeln!(
        out,
        "| the same, stripped | {} |",
        b.pinproxy_stripped_bytes.map_or("–".into(), mib)
    );
    if let Some(peer) = b.peer_stripped_bytes {
        let _ = writeln!(
            out,
            "| the hudsucker peer, stripped (for scale) | {} |",
            mib(peer)
        );
    }
    let _ = writeln!(
        out,
        "| clean `cargo build --release` (empty target directory) | {} |\n",
        b.clean_build_secs.map_or(
            "not measured in this run (`bench/run.sh --clean-build`)".into(),
            |s| format!("{:.1} min ({s:.0} s)", s / 60.0)
        )
    );
}
