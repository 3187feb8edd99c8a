//! The instruction-count phase (in the report's throughput chapter):
//! pinproxy with its built-in direct exit (in its default fingerprint mode
//! without cookies, with tracked cookies and with the same cookies
//! untracked, in `rustls` mode, and without its access log) and the
//! hudsucker peer each run under valgrind's callgrind while the same
//! keep-alive client sends a fixed number of requests to the same origin;
//! pinproxy without and with tracked cookies once more with a new client
//! connection for every request (a tenth of the requests: each costs some
//! ten times the instructions);
//! pinproxy and the peer once more with HTTP/2 on every leg, with a
//! connection per client and with the clients as streams of one connection.
//!
//! Timings drift on a shared machine; instruction counts of the same binary
//! and input barely move, so before/after claims about CPU rest on these.
//! Valgrind runs with `--fair-sched=yes`: its threads then take turns in
//! order, which halved the spread of the totals between runs (the peer's
//! count over five runs: 69.3k to 70.6k; without it, over eight: 67.1k to
//! 70.5k).
//! Each proxy runs twice, with `n` and with `3n` requests after the same
//! warm-up (one request per client, which opens the client connections,
//! mints the leaf and fills the upstream pool). The moment the load ends,
//! `callgrind_control --dump` has callgrind write what it has counted so
//! far, and that is the run's count; the proxy is then stopped with
//! SIGTERM, and its shutdown is written apart and left out. Start-up and
//! warm-up are the same in both runs, so (I(3n) − I(n)) / 2n is the
//! instructions one keep-alive request costs. Shutdown is not the same in
//! both: pinproxy's counted 8 to 10 million instructions, and how much the
//! runtime still had to drop when it stopped differed between a subject's
//! two runs by up to 1.4 million (some 350 per request of the difference).
//! callgrind_control reaches a
//! process parked in `epoll_wait` through ptrace; where it cannot (no
//! ptrace rights), the run is counted to its exit and the report says so.
//! The phase has an origin of its own that resumes no TLS session: the
//! peer resumes some of its upstream handshakes (pinproxy never does, so
//! that no session links two exits), and how many of them did moved its
//! figure by some 250 to 450 instructions per request per resumption of
//! difference between its two runs (61.8k to 63.0k over four runs). The
//! table shows each run's handshakes and resumptions.
//! Not counted: the first use of aws-lc's random generator in a process
//! (both proxies' TLS, and pinproxy's CA) gathers entropy from timing
//! jitter, about 420 million instructions whose number depends on the
//! clock: it moved by up to a million between two runs of the same binary,
//! some 260 instructions per request of the difference, and by different
//! amounts in pinproxy's runs than in the peer's. Callgrind stops counting
//! inside that one function (`--toggle-collect`), so every proxy's count
//! leaves it out the same way.
//! The same difference taken function by function gives pinproxy's
//! per-request profile, written to the callgrind directory for the
//! engineers who optimise it.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::procs::{find_program, path_str, run_bounded};
use super::servers::{
    fingerprint_toml, run_load, start_origin, Launch, LoadPlan, PinproxyOptions, Server,
};
use super::throughput::Setup;
use super::{Phase, Suite, BODY_BYTES};
use crate::load::ConnMode;
use crate::report::{group, Goal, Results};

/// The instruction-count phase.
pub const PHASE: Phase = Phase {
    key: "callgrind",
    name: "instruction counts",
    chapter: None,
    run,
    goals,
    render,
};

/// Concurrent keep-alive clients (the figure was taken at 32).
const CONCURRENCY: usize = 32;
/// Requests between the short and the long run below which the figure
/// carries the runs' start-up variation (measured: the peer's count moved by
/// 15% between two runs 400 requests apart, by 0.13% 4,000 apart).
const REPEATABLE_APART: u64 = 4000;
/// aws-lc's one-time gathering of timing-jitter entropy, as callgrind names
/// it (a static function, called once per process).
const JITTER_ENTROPY: &str = "tree_jitter_initialize_once";
/// Functions listed in the per-request profile.
const TOP_FUNCTIONS: usize = 20;
/// (g)'s instructions per request over (f)'s.
const GOAL_VS_PEER: f64 = 1.0;
/// (d)/(c) ≥ 0.97 in requests/s, as instructions: with tracked cookies at
/// most 1/0.97 of the instructions per request without.
const GOAL_COOKIES: f64 = 0.97;

/// One proxy's count.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CallgrindRow {
    /// Which proxy (`pinproxy`, `pinproxy-cookies`, `pinproxy-untracked`,
    /// `pinproxy-browser`, `pinproxy-session`, `pinproxy-newconn`,
    /// `pinproxy-newconn-cookies`, `pinproxy-rustls`, `pinproxy-quiet`,
    /// `hudsucker`, and over HTTP/2 `pinproxy-h2`, `pinproxy-h2-browser` and
    /// `hudsucker-h2`, and with the clients on one connection
    /// `pinproxy-h2-mux` and `hudsucker-h2-mux`).
    pub proxy: String,
    /// What it is, for the table.
    pub label: String,
    /// Requests answered in the short run (timed requests; the warm-up is
    /// the same in both runs).
    pub requests_short: u64,
    /// Instructions of the whole short run.
    pub instructions_short: u64,
    /// Requests answered in the long run.
    pub requests_long: u64,
    /// Instructions of the whole long run.
    pub instructions_long: u64,
    /// Failed requests in both runs (should be 0).
    pub errors: u64,
    /// Instructions per request of the embedded store's writer thread
    /// (pinproxy rows whose profile was written): mostly its flush of the
    /// identities requests touched, which runs on a wall-clock period.
    #[serde(default)]
    pub store_writer: Option<f64>,
    /// Requests per second of the long run's timed requests, under valgrind.
    #[serde(default)]
    pub rps_long: Option<f64>,
    /// TLS handshakes the origin saw during the short run (the warm-up's
    /// included) and how many of them resumed a session, when it could say.
    #[serde(default)]
    pub handshakes_short: Option<(u64, u64)>,
    /// The same for the long run.
    #[serde(default)]
    pub handshakes_long: Option<(u64, u64)>,
    /// Whether both runs were counted to the end of their load (a dump
    /// through callgrind_control), leaving the proxy's shutdown out; else
    /// to the proxy's exit.
    #[serde(default)]
    pub to_load_end: bool,
}

impl CallgrindRow {
    /// Instructions per request: the difference between the runs over the
    /// difference in requests.
    pub fn per_request(&self) -> Option<f64> {
        let requests = self.requests_long.checked_sub(self.requests_short)?;
        let instructions = self
            .instructions_long
            .checked_sub(self.instructions_short)?;
        (requests > 0).then(|| instructions as f64 / requests as f64)
    }
}

/// What the phase adds to the results.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CallgrindReport {
    /// valgrind's version.
    pub valgrind: String,
    /// Concurrent clients.
    pub concurrency: usize,
    /// One row per proxy.
    pub rows: Vec<CallgrindRow>,
    /// pinproxy's per-request profile (top functions, inclusive and self),
    /// if written.
    pub profile: Option<PathBuf>,
}

/// The cookies every request of a subject carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cookies {
    /// None.
    None,
    /// Tracked cookies, unique per client and pinned by its warm-up
    /// request, so every counted request is a pin hit.
    Tracked,
    /// The same header with names nobody tracks: the bytes of `Tracked`
    /// without the pinning, which parts what carrying a longer head costs
    /// from what tracking costs.
    Untracked,
    /// `Tracked` among a browser's untracked cookies (20 pairs, about 700
    /// bytes; `pinbench load --browser-cookies`), in one header over
    /// HTTP/1.1 and a `Cookie` field per pair over HTTP/2, as a browser
    /// sends them.
    Browser,
    /// No cookies; each client's tunnel names a session key of its own
    /// (`pinbench load --session-keys`), pinned by its warm-up request, so
    /// every counted request is a pin hit of the key its `CONNECT` named.
    SessionKey,
}

/// What is measured: a key, a label, how to start it, the cookies its
/// requests carry, and whether they go over HTTP/2.
struct Subject {
    key: &'static str,
    label: &'static str,
    launch: fn(&Suite, &str) -> Result<Launch>,
    cookies: Cookies,
    /// The client offers h2 alone and the origin offers h2: HTTP/2 on
    /// every leg a proxy lets it (see [`run`]).
    http2: bool,
    /// With `http2`: clients per connection, a stream each.
    streams: usize,
    /// Keep-alive, or a new client connection (and TLS handshake) for
    /// every request: then a tenth of the requests (see [`NEW_CONN_SHARE`]).
    mode: ConnMode,
}

/// The peer row an HTTP/2 row is compared with, and an HTTP/1.1 row's.
const PEER_H2: &str = "hudsucker-h2";
/// See [`PEER_H2`].
const PEER: &str = "hudsucker";
/// The peer row the multiplexed HTTP/2 row is compared with.
const PEER_H2_MUX: &str = "hudsucker-h2-mux";
/// pinproxy with a new client connection per request, without cookies.
const NEW_CONN: &str = "pinproxy-newconn";
/// The same with tracked cookies on every request.
const NEW_CONN_COOKIES: &str = "pinproxy-newconn-cookies";
/// The share of the keep-alive runs' requests a new-connection run sends:
/// each costs some ten times the instructions (the client's TLS handshake).
const NEW_CONN_SHARE: u64 = 10;

/// pinproxy with its built-in direct exit, default configuration.
fn pinproxy_direct(suite: &Suite, name: &str) -> Result<Launch> {
    suite.pinproxy_launch(
        name,
        &PinproxyOptions {
            direct: true,
            ..PinproxyOptions::default()
        },
    )
}

/// The proxies counted, in table order.
const SUBJECTS: [Subject; 15] = [
    Subject {
        key: "pinproxy",
        label: "(g) pinproxy, built-in direct exit, fingerprint `mirror`",
        launch: pinproxy_direct,
        cookies: Cookies::None,
        http2: false,
        streams: 1,
        mode: ConnMode::KeepAlive,
    },
    Subject {
        key: "pinproxy-cookies",
        label: "(g) with tracked cookies on every request (pin hits)",
        launch: pinproxy_direct,
        cookies: Cookies::Tracked,
        http2: false,
        streams: 1,
        mode: ConnMode::KeepAlive,
    },
    Subject {
        key: "pinproxy-untracked",
        label: "(g) with the same cookie header, names untracked",
        launch: pinproxy_direct,
        cookies: Cookies::Untracked,
        http2: false,
        streams: 1,
        mode: ConnMode::KeepAlive,
    },
    Subject {
        key: "pinproxy-browser",
        label: "(g) with the tracked cookies in a browser's header (20 pairs, 2 tracked)",
        launch: pinproxy_direct,
        cookies: Cookies::Browser,
        http2: false,
        streams: 1,
        mode: ConnMode::KeepAlive,
    },
    Subject {
        key: "pinproxy-session",
        label: "(g) with a session key on each tunnel's CONNECT (pin hits)",
        launch: pinproxy_direct,
        cookies: Cookies::SessionKey,
        http2: false,
        streams: 1,
        mode: ConnMode::KeepAlive,
    },
    Subject {
        key: NEW_CONN,
        label: "(g) with a new connection per request",
        launch: pinproxy_direct,
        cookies: Cookies::None,
        http2: false,
        streams: 1,
        mode: ConnMode::NewConn,
    },
    Subject {
        key: NEW_CONN_COOKIES,
        label: "(g) with a new connection per request, tracked cookies on every request",
        launch: pinproxy_direct,
        cookies: Cookies::Tracked,
        http2: false,
        streams: 1,
        mode: ConnMode::NewConn,
    },
    Subject {
        key: "pinproxy-rustls",
        label: "pinproxy, built-in direct exit, fingerprint `rustls`",
        launch: |suite, name| {
            suite.pinproxy_launch(
                name,
                &PinproxyOptions {
                    direct: true,
                    config: Some(fingerprint_toml("rustls")),
                    ..PinproxyOptions::default()
                },
            )
        },
        cookies: Cookies::None,
        http2: false,
        streams: 1,
        mode: ConnMode::KeepAlive,
    },
    Subject {
        key: "pinproxy-quiet",
        label: "(g) without its access log (`[log] access = false`)",
        launch: |suite, name| {
            suite.pinproxy_launch(
                name,
                &PinproxyOptions {
                    direct: true,
                    config: Some("[log]\naccess = false\n".into()),
                    ..PinproxyOptions::default()
                },
            )
        },
        cookies: Cookies::None,
        http2: false,
        streams: 1,
        mode: ConnMode::KeepAlive,
    },
    Subject {
        key: "hudsucker",
        label: "(f) hudsucker peer",
        launch: |suite, name| suite.peer_launch(name, suite.origin_ca()?),
        cookies: Cookies::None,
        http2: false,
        streams: 1,
        mode: ConnMode::KeepAlive,
    },
    Subject {
        key: "pinproxy-h2",
        label: "(g) over HTTP/2 (client, proxy and origin all h2)",
        launch: pinproxy_direct,
        cookies: Cookies::None,
        http2: true,
        streams: 1,
        mode: ConnMode::KeepAlive,
    },
    Subject {
        key: "pinproxy-h2-browser",
        label: "(g) over HTTP/2 with a browser's cookies as crumbs (20 fields, 2 tracked)",
        launch: pinproxy_direct,
        cookies: Cookies::Browser,
        http2: true,
        streams: 1,
        mode: ConnMode::KeepAlive,
    },
    Subject {
        key: PEER_H2,
        label: "(f) over HTTP/2",
        launch: |suite, name| suite.peer_launch(name, suite.origin_ca()?),
        cookies: Cookies::None,
        http2: true,
        streams: 1,
        mode: ConnMode::KeepAlive,
    },
    Subject {
        key: "pinproxy-h2-mux",
        label: "(g) over HTTP/2, the 32 clients on one connection",
        launch: pinproxy_direct,
        cookies: Cookies::None,
        http2: true,
        streams: CONCURRENCY,
        mode: ConnMode::KeepAlive,
    },
    Subject {
        key: PEER_H2_MUX,
        label: "(f) over HTTP/2, the 32 clients on one connection",
        launch: |suite, name| suite.peer_launch(name, suite.origin_ca()?),
        cookies: Cookies::None,
        http2: true,
        streams: CONCURRENCY,
        mode: ConnMode::KeepAlive,
    },
];

/// Runs the phase on an origin of its own (see the module doc), put in the
/// suite's origin's place meanwhile so every subject and the load use it.
/// HTTP/2 subjects get a second one that offers h2: the first offers
/// HTTP/1.1 alone, so that the peer, whose client offers both, speaks
/// HTTP/1.1 upstream in the HTTP/1.1 rows as pinproxy does.
fn run(suite: &mut Suite) -> Result<()> {
    let origin = |name: &str, ca: &str, http2: bool| {
        let body = BODY_BYTES.to_string();
        let mut flags = vec![
            "--body-bytes",
            &body,
            "--handshake-stats",
            "--no-resumption",
        ];
        if http2 {
            flags.push("--http2");
        }
        start_origin(&suite.exe, name, suite.dir.join(ca), &flags)
    };
    let own = origin("origin (callgrind)", "origin-callgrind-ca.pem", false)?;
    let mut h2 = origin("origin (callgrind, h2)", "origin-callgrind-h2-ca.pem", true)?;
    let shared = std::mem::replace(&mut suite.origin, own);
    let counted = count_all(suite, &mut h2);
    suite.origin = shared;
    counted
}

/// Each subject twice under callgrind; HTTP/2 subjects with `h2_origin` in
/// the suite's origin's place.
fn count_all(suite: &mut Suite, h2_origin: &mut Server) -> Result<()> {
    let Some(valgrind) = find_program("valgrind") else {
        let note = "valgrind not found: no instruction counts (bench/run.sh installs it)";
        suite.progress.say(note);
        suite.results.notes.push(note.into());
        return Ok(());
    };
    let dir = suite
        .config
        .callgrind_dir
        .clone()
        .unwrap_or_else(|| suite.dir.join("callgrind"));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let version = run_bounded(
        Command::new(&valgrind).arg("--version"),
        Duration::from_secs(10),
    )
    .map(|v| v.trim().to_owned())
    .unwrap_or_else(|_| "valgrind".into());
    let long = suite.config.callgrind_requests.max(3);
    let short = long / 3;
    let mut report = CallgrindReport {
        valgrind: version,
        concurrency: CONCURRENCY,
        ..CallgrindReport::default()
    };
    for subject in &SUBJECTS {
        if subject.key.starts_with(PEER) && suite.config.peer.is_none() {
            continue;
        }
        let rows = &suite.config.callgrind_rows;
        if !rows.is_empty() && !rows.iter().any(|row| row == subject.key) {
            continue;
        }
        if subject.http2 {
            std::mem::swap(&mut suite.origin, h2_origin);
        }
        let (short, long) = match subject.mode {
            ConnMode::KeepAlive => (short, long),
            ConnMode::NewConn => (short / NEW_CONN_SHARE, long / NEW_CONN_SHARE),
        };
        let row = count_subject(suite, &valgrind, &dir, subject, short, long, &mut report);
        if subject.http2 {
            std::mem::swap(&mut suite.origin, h2_origin);
        }
        if let Some(row) = row {
            report.rows.push(row);
        }
    }
    suite.results.callgrind = Some(report);
    Ok(())
}

/// One subject's two runs, its row and its profile (`None` when a run
/// failed, which the notes say).
fn count_subject(
    suite: &mut Suite,
    valgrind: &Path,
    dir: &Path,
    subject: &Subject,
    short: u64,
    long: u64,
    report: &mut CallgrindReport,
) -> Option<CallgrindRow> {
    let mut row = CallgrindRow {
        proxy: subject.key.into(),
        label: subject.label.into(),
        ..CallgrindRow::default()
    };
    let mut files = Vec::new();
    let mut to_load_end = true;
    for requests in [short, long] {
        let out = dir.join(format!("{}-{requests}.callgrind", subject.key));
        // Asked before and after the run: the origin's count starts
        // afresh at each asking.
        let origin_ready = suite.origin.handshakes().is_ok();
        match count(suite, valgrind, subject, requests, &out) {
            Ok(Counted {
                ok,
                errors,
                instructions,
                rps,
                to,
            }) => {
                if let CountedTo::Exit(why) = to {
                    to_load_end = false;
                    let note = format!(
                        "callgrind {} ({requests} requests): counted to the proxy's exit, \
                         its shutdown included ({why})",
                        subject.key
                    );
                    suite.progress.say(&note);
                    suite.results.notes.push(note);
                }
                let handshakes = origin_ready
                    .then(|| suite.origin.handshakes().ok().map(|r| (r.count, r.resumed)))
                    .flatten();
                suite.progress.say(format!(
                    "callgrind {}: {} requests, {} instructions",
                    subject.key,
                    group(ok),
                    group(instructions)
                ));
                row.errors += errors;
                if requests == short {
                    (row.requests_short, row.instructions_short) = (ok, instructions);
                    row.handshakes_short = handshakes;
                } else {
                    (row.requests_long, row.instructions_long) = (ok, instructions);
                    row.rps_long = Some(rps);
                    row.handshakes_long = handshakes;
                }
                files.push(out);
            }
            Err(e) => {
                let note = format!("callgrind {}: {e:#}", subject.key);
                suite.progress.say(&note);
                suite.results.notes.push(note);
                return None;
            }
        }
    }
    row.to_load_end = to_load_end;
    if let Some(per) = row.per_request() {
        suite.progress.say(format!(
            "callgrind {}: {per:.0} instructions per request",
            subject.key
        ));
    }
    if subject.key.starts_with("pinproxy") {
        let profile = dir.join(format!("{}-per-request-top.txt", subject.key));
        let requests = row.requests_long.saturating_sub(row.requests_short);
        match write_profile(&row, &files[0], &files[1], requests, &profile) {
            Ok(inclusive) => {
                row.store_writer = inclusive
                    .iter()
                    .filter(|(function, _)| function.contains(STORE_WRITER))
                    .map(|(_, per)| *per)
                    .reduce(f64::max);
                suite.progress.say(format!(
                    "{}'s per-request profile (top {TOP_FUNCTIONS}): {}",
                    subject.key,
                    profile.display()
                ));
                if subject.key == "pinproxy" {
                    report.profile = Some(profile);
                }
            }
            Err(e) => suite.results.notes.push(format!(
                "callgrind profile of {} not written: {e:#}",
                subject.key
            )),
        }
    }
    Some(row)
}

/// One run of `subject` under callgrind with `requests` timed requests:
/// requests answered, failed, and the instructions of the whole run.
fn count(
    suite: &Suite,
    valgrind: &Path,
    subject: &Subject,
    requests: u64,
    out: &Path,
) -> Result<Counted> {
    let name = format!("callgrind-{}-{requests}", subject.key);
    let mut launch = (subject.launch)(suite, &name)?;
    let mut cmd = Command::new(valgrind);
    // Threads take turns in order (see the module doc).
    cmd.args(["--tool=callgrind", "--quiet", "--fair-sched=yes"])
        // Entropy gathered from timing jitter: not counted (module doc).
        // A toggle alone would count nothing but that function: it turns
        // counting off at the start unless told otherwise.
        .arg(format!("--toggle-collect=*{JITTER_ENTROPY}"))
        .arg("--collect-atstart=yes")
        .arg(format!("--callgrind-out-file={}", path_str(out)?))
        .arg(launch.cmd.get_program())
        .args(launch.cmd.get_args());
    launch.cmd = cmd;
    // Everything runs some 50 times slower under valgrind.
    let mut server = launch.start(&name, Duration::from_secs(180))?;
    let ca = server.ca()?.to_owned();
    // Cookie values unique to this run, so the warm-up request pins them.
    let tag = format!("cg{}n{requests}", std::process::id());
    let plan = LoadPlan {
        proxy: Some((server.addr, &ca)),
        mode: subject.mode,
        concurrency: CONCURRENCY,
        secs: 600.0,
        max_requests: requests,
        cookie_tag: matches!(
            subject.cookies,
            Cookies::Tracked | Cookies::Untracked | Cookies::Browser
        )
        .then_some(tag.as_str()),
        session_tag: (subject.cookies == Cookies::SessionKey).then_some(tag.as_str()),
        untracked_cookies: subject.cookies == Cookies::Untracked,
        browser_cookies: subject.cookies == Cookies::Browser,
        cookie_crumbs: subject.cookies == Cookies::Browser && subject.http2,
        http2: subject.http2,
        streams: subject.streams,
        ..LoadPlan::new(&suite.origin, requests)
    };
    let mut load = suite.load_command(&plan)?;
    // Requests under valgrind take milliseconds, not microseconds.
    load.args(["--timeout", "60"]);
    let result = run_load(load)?;
    let dumped = dump(server.proc.pid(), out);
    if !server.proc.terminate(Duration::from_secs(120)) {
        bail!("{name} did not exit within 120 s of SIGTERM, so callgrind wrote no totals");
    }
    if result.ok == 0 {
        bail!(
            "no request succeeded ({})",
            result.first_error.unwrap_or_default()
        );
    }
    let to = match dumped {
        // The count to the load's end takes `out`'s name (the profiles read
        // it); the shutdown's part stays beside it.
        Ok(part) => {
            let shutdown = out.with_extension("shutdown.callgrind");
            std::fs::rename(out, &shutdown)
                .and_then(|()| std::fs::rename(&part, out))
                .with_context(|| format!("renaming {} to {}", part.display(), out.display()))?;
            CountedTo::LoadEnd
        }
        Err(e) => CountedTo::Exit(format!("{e:#}")),
    };
    Ok(Counted {
        ok: result.ok,
        errors: result.errors,
        instructions: total_instructions(out)?,
        rps: result.rps,
        to,
    })
}

/// Has callgrind in process `pid` write what it has counted so far
/// (`callgrind_control --dump`, through valgrind's gdbserver and ptrace),
/// and returns the file it wrote: `out` with `.1` added, the run's first
/// dump.
fn dump(pid: u32, out: &Path) -> Result<PathBuf> {
    let control =
        find_program("callgrind_control").ok_or_else(|| anyhow!("callgrind_control not found"))?;
    let mut part = out.as_os_str().to_owned();
    part.push(".1");
    let part = PathBuf::from(part);
    run_bounded(
        Command::new(control)
            .arg("--dump=load-end")
            .arg(pid.to_string()),
        Duration::from_secs(120),
    )?;
    // callgrind_control returns once callgrind has answered, which it does
    // after writing the dump.
    if !part.is_file() {
        bail!(
            "callgrind_control answered but {} is missing",
            part.display()
        );
    }
    Ok(part)
}

/// Where a run's count ends.
enum CountedTo {
    /// At the end of the load (the shutdown written apart).
    LoadEnd,
    /// At the proxy's exit, shutdown included: why the dump failed.
    Exit(String),
}

/// What one run under callgrind counted.
struct Counted {
    /// Timed requests answered.
    ok: u64,
    /// Timed requests failed.
    errors: u64,
    /// Instructions of the whole run.
    instructions: u64,
    /// Timed requests per second.
    rps: f64,
    /// Where the count ends.
    to: CountedTo,
}

/// The total instruction count in a callgrind output file (its `totals:`
/// or `summary:` line).
fn total_instructions(file: &Path) -> Result<u64> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    text.lines()
        .rev()
        .find_map(|l| {
            l.strip_prefix("totals:")
                .or_else(|| l.strip_prefix("summary:"))
        })
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| anyhow!("{} has no totals", file.display()))
}

/// Instructions per function from `callgrind_annotate` (without source
/// annotation): inclusive of callees, or the function's own.
fn per_function(file: &Path, inclusive: bool) -> Result<HashMap<String, u64>> {
    let annotate = find_program("callgrind_annotate")
        .ok_or_else(|| anyhow!("callgrind_annotate not found"))?;
    let text = run_bounded(
        Command::new(annotate)
            .arg(format!(
                "--inclusive={}",
                if inclusive { "yes" } else { "no" }
            ))
            .args(["--threshold=100", "--auto=no"])
            .arg(file),
        Duration::from_secs(300),
    )?;
    Ok(parse_annotate(&text))
}

/// The `Ir  function` lines of a `callgrind_annotate` listing (the count
/// may be followed by a percentage in parentheses; the function ends with
/// its object in brackets).
fn parse_annotate(text: &str) -> HashMap<String, u64> {
    let mut out = HashMap::new();
    for line in text.lines() {
        let line = line.trim_start();
        let Some((count, rest)) = line.split_once(' ') else {
            continue;
        };
        let Ok(count) = count.replace(',', "").parse::<u64>() else {
            continue;
        };
        let mut rest = rest.trim_start();
        if rest.starts_with('(') {
            rest = rest.split_once(')').map_or("", |(_, r)| r).trim_start();
        }
        if rest.is_empty() || rest.starts_with("PROGRAM TOTALS") {
            continue;
        }
        *out.entry(rest.to_owned()).or_insert(0) += count;
    }
    out
}

/// Inclusive entries at or above this share of a request's instructions
/// are left out of the inclusive list: they are the threads' scaffolding
/// (thread start, the runtime's worker loop, task polling), which encloses
/// everything and says nothing.
const SCAFFOLDING_SHARE: f64 = 0.9;

/// The embedded store's writer thread, as callgrind names it.
const STORE_WRITER: &str = "store::durable::writer::write_loop";

/// Writes a pinproxy row's per-request profile: the functions whose count
/// grew most from the short to the long run, per request, inclusive of
/// their callees (where the time goes) and on their own (what to optimise).
/// `row` gives the label and the per-request total. Returns every
/// function's inclusive instructions per request.
fn write_profile(
    row: &CallgrindRow,
    short: &Path,
    long: &Path,
    requests: u64,
    to: &Path,
) -> Result<HashMap<String, f64>> {
    if requests == 0 {
        bail!("no requests between the runs");
    }
    let total = row.per_request().unwrap_or(f64::INFINITY);
    let mut text = format!(
        "{} under callgrind: {} instructions per keep-alive request, by function, from the \
         difference between a run of {} and one of {} ({} requests apart; both whole runs can \
         be browsed with callgrind_annotate or kcachegrind). The inclusive list leaves out \
         entries at {:.0}% of the total or more (thread start, the runtime's worker loop and \
         task polling, which enclose everything).\n",
        row.label,
        group(total as u64),
        short.display(),
        long.display(),
        requests,
        SCAFFOLDING_SHARE * 100.0,
    );
    let mut all_inclusive = HashMap::new();
    for (inclusive, title) in [
        (true, "inclusive (the function and everything it calls)"),
        (false, "self (the function's own instructions)"),
    ] {
        let (a, b) = (
            per_function(short, inclusive)?,
            per_function(long, inclusive)?,
        );
        let mut diff: Vec<(&String, f64)> = b
            .iter()
            .map(|(f, &n)| {
                let before = a.get(f).copied().unwrap_or(0);
                (f, n.saturating_sub(before) as f64 / requests as f64)
            })
            .collect();
        if inclusive {
            all_inclusive = diff.iter().map(|(f, per)| ((*f).clone(), *per)).collect();
            diff.retain(|(_, per)| *per < SCAFFOLDING_SHARE * total);
        }
        diff.sort_by(|x, y| y.1.total_cmp(&x.1));
        let _ = write!(
            text,
            "\nTop {TOP_FUNCTIONS}, {title}:\n\n{:>12}  function\n",
            "instr/req"
        );
        for (function, per) in diff.iter().take(TOP_FUNCTIONS) {
            let _ = writeln!(text, "{per:>12.0}  {}", shorten(function));
        }
    }
    std::fs::write(to, text).with_context(|| format!("writing {}", to.display()))?;
    Ok(all_inclusive)
}

/// A function's `file:function [object]` with the registry and toolchain
/// prefixes of its file cut off (`hyper-1.12.0/src/...`, `library/...`).
fn shorten(entry: &str) -> String {
    let mut entry = entry;
    if let Some(i) = entry.find("/index.crates.io-") {
        entry = entry[i + 1..]
            .split_once('/')
            .map_or(entry, |(_, rest)| rest);
    } else if let Some(rest) = entry.strip_prefix("/rustc/") {
        entry = rest.split_once('/').map_or(entry, |(_, rest)| rest);
    }
    entry.to_owned()
}

/// (g)'s instructions per request against (f)'s.
fn goals(results: &Results) -> Vec<Goal> {
    let per = |key: &str| {
        results
            .callgrind
            .as_ref()?
            .rows
            .iter()
            .find(|r| r.proxy == key)?
            .per_request()
    };
    let cells: Vec<(String, f64)> = match (per("pinproxy"), per("hudsucker")) {
        (Some(g), Some(f)) if f > 0.0 => vec![(
            format!("{} vs {} instructions", group(g as u64), group(f as u64)),
            g / f,
        )],
        _ => Vec::new(),
    };
    let cookies: Vec<(String, f64)> = match (per("pinproxy"), per("pinproxy-cookies")) {
        (Some(plain), Some(hits)) if hits > 0.0 => vec![(
            format!(
                "{} without vs {} with{}",
                group(plain as u64),
                group(hits as u64),
                per("pinproxy-untracked").map_or(String::new(), |untracked| format!(
                    " ({} with the same header untracked)",
                    group(untracked as u64)
                ))
            ),
            plain / hits,
        )],
        _ => Vec::new(),
    };
    let cookies: Vec<(String, f64)> = match (per(NEW_CONN), per(NEW_CONN_COOKIES)) {
        (Some(plain), Some(hits)) if hits > 0.0 => cookies
            .into_iter()
            .map(|(cell, v)| (format!("keep-alive: {cell}"), v))
            .chain([(
                format!(
                    "a new connection per request: {} without vs {} with",
                    group(plain as u64),
                    group(hits as u64)
                ),
                plain / hits,
            )])
            .collect(),
        _ => cookies,
    };
    vec![
        Goal::over(
            format!(
                "instructions per keep-alive request of (g) ≤ {GOAL_VS_PEER}× (f)'s (callgrind, \
                 c={CONCURRENCY})"
            ),
            &cells,
            |cell, v| format!("{cell}: {v:.2}×"),
            |v| v <= GOAL_VS_PEER,
        ),
        Goal::over(
            format!(
                "tracked cookies on every request, in instructions: (g) without over (g) with \
                 ≥ {GOAL_COOKIES} (callgrind, c={CONCURRENCY})"
            ),
            &cookies,
            |cell, v| format!("{cell}: {v:.3}"),
            |v| v >= GOAL_COOKIES,
        ),
    ]
}

/// A whole count of instructions with its sign and thousands separators.
fn signed(v: f64) -> String {
    let sign = if v < 0.0 { "-" } else { "" };
    format!("{sign}{}", group(v.abs() as u64))
}

/// The instruction-count table.
fn render(results: &Results, out: &mut String) {
    let Some(report) = &results.callgrind else {
        return;
    };
    let _ = writeln!(out, "### Instructions per request (callgrind)\n");
    let _ = writeln!(
        out,
        "Each proxy runs under `valgrind --tool=callgrind` ({}) while {} keep-alive clients \
         send a fixed number of requests to the same origin, twice: with *n* and with *3n* \
         requests after the same warm-up (a request per client). Each run is counted to the \
         moment its load ends (`callgrind_control --dump`); the proxy's shutdown after that is \
         left out: it counted 8 to 10 million instructions, and differed between a proxy's two \
         runs by up to 1.4 million. Start-up and warm-up cancel out, so the difference over the extra \
         requests is the instructions one request costs the proxy. Not counted: aws-lc's \
         one-time gathering of timing-jitter entropy (about 420 million instructions per run, a number that moves \
         with the clock and would not cancel out). Unlike timings, these counts barely move \
         with the machine's load, but they are not exact: how the proxy's threads take turns \
         changes how often they wake and steal work. With `--fair-sched=yes` (threads take \
         turns in order), counting to the load's end and an origin that resumes no session, \
         three runs of one binary stayed within 0.15% of each other for pinproxy and 0.07% \
         for the peer (before those two: 1.9% over five runs; without fair scheduling 4.9% \
         over eight). Use the totals for before/after claims larger than that; \
         smaller changes show in the per-function profile below. One cliff is not the proxy's: \
         glibc's `memcpy` copies 8 KiB or more with `rep movsb`, which valgrind counts as one \
         instruction per byte (a copy of 7,900 bytes counted 772 instructions here, one of \
         8,200 bytes 8,199), so a copy that grows past 8 KiB adds thousands of instructions \
         that take little time. The phase's origin resumes no TLS session: a full handshake \
         costs a proxy 1 to 2 million instructions more than a resumed one (the certificate \
         chain to verify), the peer resumes some of its upstream handshakes where pinproxy \
         resumes none (a session shared by two exits would link them), and how many it resumed \
         in each run moved its figure from 61.8k to 63.0k over four runs of one binary. The \
         origin counts each run's TLS handshakes (the warm-up's included) and those that \
         resumed: a difference between the two runs would show in the figure per request.\n",
        report.valgrind, report.concurrency
    );
    let _ = writeln!(
        out,
        "| proxy | requests (n, 3n) | instructions (n, 3n) | upstream TLS handshakes, resumed \
         (n, 3n) | instructions per request | vs (f) |"
    );
    let _ = writeln!(out, "| --- | ---: | ---: | ---: | ---: | ---: |");
    let per = |key: &str| {
        report
            .rows
            .iter()
            .find(|r| r.proxy == key)
            .and_then(CallgrindRow::per_request)
    };
    let peer = per(PEER);
    for row in &report.rows {
        let own = row.per_request();
        // An HTTP/2 row is set against the peer over HTTP/2, the same way.
        let peer = if row.proxy.starts_with(NEW_CONN) {
            None
        } else if row.proxy.ends_with("-h2-mux") {
            per(PEER_H2_MUX)
        } else if row.proxy.ends_with("-h2") || row.proxy.contains("-h2-") {
            per(PEER_H2)
        } else {
            peer
        };
        let _ = writeln!(
            out,
            "| {}{} | {}, {} | {}, {} | {} | {} | {} |",
            row.label,
            if row.to_load_end {
                ""
            } else {
                " (counted to its exit, shutdown included)"
            },
            group(row.requests_short),
            group(row.requests_long),
            group(row.instructions_short),
            group(row.instructions_long),
            match (row.handshakes_short, row.handshakes_long) {
                (Some((short, short_resumed)), Some((long, long_resumed))) => format!(
                    "{}, {} ({short_resumed}, {long_resumed} resumed)",
                    group(short),
                    group(long)
                ),
                _ => "–".into(),
            },
            own.map_or("–".into(), |v| group(v as u64)),
            match (own, peer) {
                (Some(v), Some(f)) if f > 0.0 => format!("{:.2}×", v / f),
                _ => "–".into(),
            }
        );
    }
    let _ = writeln!(out);
    if let (Some(plain), Some(hits), Some(untracked)) = (
        per("pinproxy"),
        per("pinproxy-cookies"),
        per("pinproxy-untracked"),
    ) {
        let _ = writeln!(
            out,
            "Tracked cookies add {} instructions per request. The same `Cookie` header with \
             names nobody tracks adds {}: a longer head through TLS, hyper, the framing checks \
             and the cookie scan, which any proxy that reads the request pays. The other {} \
             are the tracking itself (hashing each tracked cookie, the pin lookups, the \
             identity's own route and upstream connection): untracked over tracked {:.3}.\n",
            signed(hits - plain),
            signed(untracked - plain),
            signed(hits - untracked),
            if hits > 0.0 { untracked / hits } else { 0.0 }
        );
    }
    if let (Some(plain), Some(hits)) = (per(NEW_CONN), per(NEW_CONN_COOKIES)) {
        let _ = writeln!(
            out,
            "With a new client connection (and TLS handshake) for every request, {} clients \
             and a tenth of the requests: {} instructions per request without cookies, {} with \
             tracked cookies on every request, without over with {:.3}. The peer is not counted \
             this way: it opens an upstream connection for every request, pinproxy pools them \
             across client connections.\n",
            report.concurrency,
            group(plain as u64),
            group(hits as u64),
            if hits > 0.0 { plain / hits } else { 0.0 }
        );
    }
    let writer = |key: &str| {
        report
            .rows
            .iter()
            .find(|r| r.proxy == key)
            .and_then(|r| r.store_writer)
    };
    let cookies = report.rows.iter().find(|r| r.proxy == "pinproxy-cookies");
    if let Some((flush, rps)) = cookies
        .and_then(|r| Some((r.store_writer?, r.rps_long?)))
        .filter(|(flush, rps)| *flush >= 1.0 && *rps > 0.0)
    {
        // The flush's work per second of wall time; per request it shrinks
        // as requests get faster.
        let per_second = flush * rps;
        let native = results
            .median_rps(Setup::PinproxyDirect, ConnMode::KeepAlive, CONCURRENCY)
            .filter(|rps| *rps > 0.0);
        let (native, whose) = match native {
            Some(native) => (
                native,
                "the rate (g) served in the throughput phase, keep-alive c=32",
            ),
            None => (10_000.0, "a round figure"),
        };
        let _ = writeln!(
            out,
            "Of the tracked requests' count, {} instructions per request are the embedded \
             store's writer thread ({} without cookies), mostly writing the identities that \
             requests touched (last use, request count), which it does every 500 ms of wall \
             time: its work per second, not per request. Under valgrind these requests ran at \
             {} per second; at {} per second ({whose}) the same work is about {} \
             instructions per request.{}\n",
            group(flush as u64),
            group(writer("pinproxy").unwrap_or(0.0) as u64),
            group(rps as u64),
            group(native as u64),
            group((per_second / native) as u64),
            // The same ratio with the flush at the native rate: how fast
            // valgrind ran moves the tracked figure by hundreds (491 and
            // 839 requests per second in two runs of one binary).
            match (
                cookies.and_then(CallgrindRow::per_request),
                per("pinproxy-untracked")
            ) {
                (Some(tracked), Some(untracked)) if tracked > flush => {
                    let tracked = tracked - flush + per_second / native;
                    format!(
                        " With it at that rate, a request with tracked cookies counts {} \
                         instructions and untracked over tracked is {:.3}.",
                        group(tracked as u64),
                        untracked / tracked
                    )
                }
                _ => String::new(),
            }
        );
    }
    if let (Some(plain), Some(quiet), Some(peer)) = (per("pinproxy"), per("pinproxy-quiet"), peer) {
        let _ = writeln!(
            out,
            "The access line (one per request, formatted on the request's thread and written \
             in batches by a thread of its own) costs {} instructions per request; the peer \
             writes no log. Without it, (g) costs {:.2}× (f)'s.\n",
            signed(plain - quiet),
            if peer > 0.0 { quiet / peer } else { 0.0 }
        );
    }
    if let (Some(g), Some(f), Some(g1), Some(f1)) =
        (per("pinproxy-h2"), per(PEER_H2), per("pinproxy"), peer)
    {
        let _ = writeln!(
            out,
            "Over HTTP/2 (the client offers h2 alone, the origin offers h2 first), (g) costs \
             {} instructions per request and (f) {}: {:.2}× (over HTTP/1.1, {:.2}×).{} pinproxy \
             speaks the client's protocol upstream in `mirror` mode, so every leg is HTTP/2; the \
             peer's client offers both, and takes h2.\n",
            group(g as u64),
            group(f as u64),
            if f > 0.0 { g / f } else { 0.0 },
            if f1 > 0.0 { g1 / f1 } else { 0.0 },
            match (per("pinproxy-h2-mux"), per(PEER_H2_MUX)) {
                (Some(g), Some(f)) if f > 0.0 => format!(
                    " With the 32 clients on one connection, a stream each: {} and {}, {:.2}×.",
                    group(g as u64),
                    group(f as u64),
                    g / f
                ),
                _ => String::new(),
            },
        );
    }
    // New-connection rows run a tenth of the requests at ten times the
    // instructions each: as far apart in instructions, not in requests.
    let apart = report
        .rows
        .iter()
        .filter(|r| !r.proxy.starts_with(NEW_CONN))
        .map(|r| r.requests_long.saturating_sub(r.requests_short))
        .min()
        .unwrap_or(0);
    if apart < REPEATABLE_APART {
        let _ = writeln!(
            out,
            "**These counts are not for before/after claims**: the runs were only {} requests \
             apart, and what a run does besides its requests varies by a few million instructions, which \
             over so few requests moves the figure by up to 15%. With the default \
             `--callgrind-requests 6000` (4,000 apart) the same binary repeats within 0.2%.\n",
            group(apart)
        );
    }
    if let Some(profile) = &report.profile {
        let _ = writeln!(
            out,
            "pinproxy's per-request profile (the {TOP_FUNCTIONS} functions with the most \
             instructions per request, inclusive and self) was written to `{}` on the machine \
             that ran this, and beside it those of the other pinproxy rows \
             (`pinproxy-cookies-…`, `pinproxy-untracked-…`, `pinproxy-browser-…`, \
             `pinproxy-session-…`, `pinproxy-newconn-…`, `pinproxy-newconn-cookies-…`, \
             `pinproxy-rustls-…`, `pinproxy-quiet-…`, `pinproxy-h2-…`, \
             `pinproxy-h2-browser-…`, `pinproxy-h2-mux-…`).\n",
            profile.display()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn annotate_lines_are_parsed_with_or_without_percentages() {
        let text = "\
--------------------------------------------------------------------------------
Ir
--------------------------------------------------------------------------------
3,000,000 (100.0%)  PROGRAM TOTALS

Ir                 file:function
--------------------------------------------------------------------------------
2,500,000 (83.33%)  ???:hyper::proto::h1::dispatch::Dispatcher<T>::poll [/bin/p]
  120,000  src/lib.rs:pinproxy::proxy::forward [/bin/p]
";
        let map = parse_annotate(text);
        assert_eq!(map.len(), 2);
        assert_eq!(
            map["???:hyper::proto::h1::dispatch::Dispatcher<T>::poll [/bin/p]"],
            2_500_000
        );
        assert_eq!(map["src/lib.rs:pinproxy::proxy::forward [/bin/p]"], 120_000);
    }

    #[test]
    fn file_prefixes_are_cut() {
        assert_eq!(
            shorten("/root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/hyper-1.12.0/src/a.rs:f [/p]"),
            "hyper-1.12.0/src/a.rs:f [/p]"
        );
        assert_eq!(
            shorten("/rustc/5980761/library/core/src/x.rs:g"),
            "library/core/src/x.rs:g"
        );
        assert_eq!(shorten("src/proxy.rs:h"), "src/proxy.rs:h");
    }

    #[test]
    fn per_request_is_the_difference_over_the_extra_requests() {
        let row = CallgrindRow {
            requests_short: 100,
            instructions_short: 1_000_000,
            requests_long: 300,
            instructions_long: 3_000_000,
            ..CallgrindRow::default()
        };
        assert_eq!(row.per_request(), Some(10_000.0));
        assert_eq!(CallgrindRow::default().per_request(), None);
    }

    #[test]
    fn the_report_parts_out_the_store_writer_and_the_access_line() {
        let row = |proxy: &str, per_request: u64, store_writer: Option<f64>| CallgrindRow {
            proxy: proxy.into(),
            label: proxy.into(),
            requests_short: 100,
            instructions_short: 0,
            requests_long: 300,
            instructions_long: 200 * per_request,
            store_writer,
            rps_long: Some(800.0),
            ..CallgrindRow::default()
        };
        let results = Results {
            callgrind: Some(CallgrindReport {
                rows: vec![
                    row("pinproxy", 75_000, Some(0.0)),
                    row("pinproxy-cookies", 88_000, Some(600.0)),
                    row("pinproxy-untracked", 79_000, None),
                    row("pinproxy-quiet", 71_000, None),
                    row("hudsucker", 70_000, None),
                ],
                ..CallgrindReport::default()
            }),
            ..Results::default()
        };
        let mut out = String::new();
        render(&results, &mut out);
        assert!(
            out.contains("600 instructions per request are the embedded store's writer thread (0 without cookies)"),
            "{out}"
        );
        // 600 per request at 800 requests/s is 480,000 a second: 48 per
        // request at the round 10,000 requests/s (no throughput phase here).
        assert!(
            out.contains("ran at 800 per second; at 10,000 per second (a round figure) the same work is about 48 instructions per request"),
            "{out}"
        );
        assert!(
            out.contains("costs 4,000 instructions per request; the peer writes no log. Without it, (g) costs 1.01×"),
            "{out}"
        );
    }

    #[test]
    fn new_connection_rows_are_a_cell_of_the_cookie_goal_and_set_against_no_peer() {
        // Keep-alive rows 4,000 requests apart, new-connection rows a tenth.
        let row = |proxy: &str, per_request: u64| {
            let apart = if proxy.starts_with(NEW_CONN) {
                400
            } else {
                4000
            };
            CallgrindRow {
                proxy: proxy.into(),
                label: proxy.into(),
                requests_short: apart / 2,
                requests_long: apart / 2 * 3,
                instructions_long: apart * per_request,
                ..CallgrindRow::default()
            }
        };
        let results = Results {
            callgrind: Some(CallgrindReport {
                concurrency: 32,
                rows: vec![
                    row("pinproxy", 64_000),
                    row("pinproxy-cookies", 72_000),
                    row(NEW_CONN, 686_000),
                    row(NEW_CONN_COOKIES, 700_000),
                    row("hudsucker", 62_000),
                ],
                ..CallgrindReport::default()
            }),
            ..Results::default()
        };
        let cookie_goal = goals(&results)
            .into_iter()
            .find(|goal| goal.goal.starts_with("tracked cookies"))
            .map(|goal| (goal.measured, goal.met));
        assert_eq!(
            cookie_goal,
            Some((
                "keep-alive: 64,000 without vs 72,000 with: 0.889; \
                 a new connection per request: 686,000 without vs 700,000 with: 0.980"
                    .into(),
                Some(false)
            ))
        );
        let mut out = String::new();
        render(&results, &mut out);
        assert!(
            out.contains("686,000 instructions per request without cookies, 700,000 with tracked cookies on every request, without over with 0.980"),
            "{out}"
        );
        // Against no peer: the peer opens an upstream connection per request.
        assert!(out.contains("| 686,000 | – |"), "{out}");
        // Not taken for keep-alive rows too close together.
        assert!(!out.contains("not for before/after claims"), "{out}");
    }
}
