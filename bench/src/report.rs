//! `BENCHMARKS.md`: the results of one suite run and the document around
//! the phases' sections.
//!
//! [`Results`] is everything a run measured (also written as raw JSON).
//! [`Results::render`] assembles the report: the machine facts, the goal
//! table (each phase contributes its rows), each phase's section in the
//! order of [`PHASES`], the method, the run's notes and the history, whose
//! rows are carried over from the previous report. The number formatting
//! the sections share is here too.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::load::ConnMode;
use crate::mint::MintReport;
use crate::stats::{median, range};
use crate::suite::callgrind::CallgrindReport;
use crate::suite::fleet::FleetReport;
use crate::suite::pins::{ChurnRow, IdentityRow, PinRow};
use crate::suite::stores::{StoreRow, StoreScale};
use crate::suite::throughput::{Sample, Setup};
use crate::suite::tunnels::TunnelRow;
use crate::suite::upstream::UpstreamReport;
use crate::suite::PHASES;

/// Machine and software facts.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Machine {
    /// `nproc`.
    pub cores: usize,
    /// CPU model name.
    pub cpu_model: String,
    /// Kernel release.
    pub kernel: String,
    /// Memory, from /proc/meminfo.
    pub memory: String,
    /// When the run started (UTC).
    pub date: String,
    /// pinproxy revision benchmarked.
    pub revision: String,
    /// `mitmdump --version`'s first line, or why it is missing.
    pub mitmproxy: String,
    /// The hudsucker peer's crate version, or why it is missing.
    #[serde(default)]
    pub peer: String,
}

/// Knobs of the run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RunSettings {
    /// Interleaved rounds.
    pub rounds: usize,
    /// Timed seconds per load run.
    pub secs: f64,
    /// Request cap per load run.
    pub max_requests: u64,
    /// Body size served by the origin.
    pub body_bytes: usize,
    /// Total request rate of the fixed-rate latency runs.
    pub fixed_rate: f64,
    /// Timed seconds per fixed-rate latency run (`None` in runs from before
    /// it had its own: those lasted `secs`).
    #[serde(default)]
    pub fixed_rate_secs: Option<f64>,
    /// Concurrency of the fixed-rate latency runs.
    pub fixed_rate_concurrency: usize,
    /// Tracked cookies per request when filling pins.
    pub pins_per_request: usize,
    /// Connections used when filling pins.
    pub pin_concurrency: usize,
}

/// Everything one run measured, the phases' figures in phase order. The
/// fields stay flat (each phase module defines its row types) so that the raw
/// JSON keeps the layout earlier runs were written in.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Results {
    /// Machine facts.
    pub machine: Machine,
    /// Run knobs.
    pub settings: RunSettings,
    /// Closed-loop throughput samples.
    pub throughput: Vec<Sample>,
    /// Fixed-rate latency samples.
    pub fixed_rate: Vec<Sample>,
    /// Idle tunnel rows.
    pub tunnels: Vec<TunnelRow>,
    /// Pin rows.
    pub pins: Vec<PinRow>,
    /// Pins created before the pin baseline.
    pub pin_warmup: u64,
    /// Identities pinproxy reports having created during the pin fill
    /// (`pinproxy_identities_created_total`), when it has an admin endpoint.
    pub pin_identities: Option<u64>,
    /// New identities with one pin each.
    pub identities: Vec<IdentityRow>,
    /// Identity churn rounds: what forgotten identities leave behind.
    #[serde(default)]
    pub churn: Vec<ChurnRow>,
    /// Pin store runs.
    pub stores: Vec<StoreRow>,
    /// The embedded store at scale.
    pub store_scale: Option<StoreScale>,
    /// Instruction counts under callgrind.
    #[serde(default)]
    pub callgrind: Option<CallgrindReport>,
    /// (g) and (f) with HTTP/2 on every leg.
    #[serde(default)]
    pub http2: Vec<Sample>,
    /// The fingerprint modes' cold pool, upstream connection memory and build.
    #[serde(default)]
    pub upstream: Option<UpstreamReport>,
    /// Replicas on one Redis.
    #[serde(default)]
    pub fleet: Option<FleetReport>,
    /// Leaf minting in-process.
    pub mint_library: Option<MintReport>,
    /// Leaf minting as a client sees it.
    pub mint_handshake: Option<MintReport>,
    /// Seconds spent per phase.
    pub phases: Vec<(String, f64)>,
    /// Seconds spent installing and building before measuring.
    pub setup_secs: Option<f64>,
    /// Problems worth a look (failed steps, errors).
    pub notes: Vec<String>,
}

/// One row of the goal table.
#[derive(Debug, Clone)]
pub struct Goal {
    /// The goal, as the issue states it.
    pub goal: String,
    /// What was measured, cell by cell.
    pub measured: String,
    /// Whether it was met; `None` when not measured.
    pub met: Option<bool>,
}

impl Goal {
    /// A goal over labelled values: each shown with `show`, met when every
    /// one passes `ok`, not measured when there are none.
    pub fn over(
        goal: String,
        cells: &[(String, f64)],
        show: impl Fn(&str, f64) -> String,
        ok: impl Fn(f64) -> bool,
    ) -> Goal {
        Goal {
            goal,
            measured: cells
                .iter()
                .map(|(cell, v)| show(cell, *v))
                .collect::<Vec<_>>()
                .join("; "),
            met: (!cells.is_empty()).then(|| cells.iter().all(|(_, v)| ok(*v))),
        }
    }
}

/// Marks around the fixes' rows (written by hand after the run that
/// measured them), so every later run carries them over.
const FIXES_START: &str = "<!-- fixes:start -->";
const FIXES_END: &str = "<!-- fixes:end -->";
/// Marks around the hand-written account of the missed goals (why each is
/// missed, with the measurements that show it), carried over like the fixes.
const EXAMINED_START: &str = "<!-- examined:start -->";
const EXAMINED_END: &str = "<!-- examined:end -->";
/// Marks around the history rows, so the next run can carry them over.
const HISTORY_START: &str = "<!-- history:start -->";
const HISTORY_END: &str = "<!-- history:end -->";
/// History rows kept (the latest run included).
const HISTORY_ROWS: usize = 8;
/// The history table's columns; new ones go at the end (older rows are
/// padded with `–`).
const HISTORY_COLUMNS: [&str; 12] = [
    "date",
    "pinproxy",
    "cores",
    "(c) req/s",
    "(c)/(b)",
    "(c)/(e)",
    "(d)/(c)",
    "per idle tunnel",
    "per pin",
    "(c)/(f)",
    "instructions (g)/(f)",
    "mirror/rustls",
];

impl Results {
    /// Renders the whole `BENCHMARKS.md`, carrying over history rows from
    /// `previous` (the file's former text).
    pub fn render(&self, previous: Option<&str>) -> String {
        let mut out = String::new();
        let m = &self.machine;
        let total: f64 = self.phases.iter().map(|(_, s)| s).sum();
        let _ = writeln!(out, "# pinproxy benchmarks\n");
        let _ = writeln!(
            out,
            "Written by `bench/run.sh` (see [bench/README.md](README.md)). Every figure comes from \
             one run on one machine; compare ratios, not absolute numbers, across machines.\n"
        );
        let _ = writeln!(out, "| | |\n| --- | --- |");
        let _ = writeln!(out, "| date | {} |", m.date);
        let _ = writeln!(out, "| cores (`nproc`) | {} |", m.cores);
        let _ = writeln!(out, "| CPU | {} |", m.cpu_model);
        let _ = writeln!(out, "| memory | {} |", m.memory);
        let _ = writeln!(out, "| kernel | {} |", m.kernel);
        let _ = writeln!(out, "| pinproxy | {} |", m.revision);
        let _ = writeln!(out, "| mitmproxy | {} |", m.mitmproxy);
        let _ = writeln!(out, "| peer (f) | {} |", m.peer);
        if let Some(setup) = self.setup_secs {
            let _ = writeln!(out, "| install and build time | {setup:.0} s |");
        }
        let _ = writeln!(
            out,
            "| measuring time | {:.0} s ({}) |\n",
            total,
            self.phases
                .iter()
                .map(|(n, s)| format!("{n} {s:.0} s"))
                .collect::<Vec<_>>()
                .join(", ")
        );

        self.render_goals(&mut out);
        render_examined(&mut out, previous);
        for phase in &PHASES {
            if let Some(chapter) = phase.chapter {
                let _ = writeln!(out, "## {chapter}\n");
            }
            (phase.render)(self, &mut out);
        }
        self.render_method(&mut out);
        if !self.notes.is_empty() {
            let _ = writeln!(out, "## Notes from this run\n");
            for note in &self.notes {
                let _ = writeln!(out, "- {note}");
            }
            let _ = writeln!(out);
        }
        render_fixes(&mut out, previous);
        self.render_history(&mut out, previous);
        out
    }

    /// The goal table, with every phase's rows in phase order.
    fn render_goals(&self, out: &mut String) {
        let _ = writeln!(out, "## Goals\n");
        let _ = writeln!(out, "| goal | measured (medians over rounds) | status |");
        let _ = writeln!(out, "| --- | --- | --- |");
        for goal in PHASES.iter().flat_map(|phase| (phase.goals)(self)) {
            let status = match goal.met {
                Some(true) => "met",
                Some(false) => "**missed**",
                None => "not measured",
            };
            let _ = writeln!(out, "| {} | {} | {status} |", goal.goal, goal.measured);
        }
        let _ = writeln!(out);
    }

    /// How everything was measured.
    fn render_method(&self, out: &mut String) {
        let s = &self.settings;
        let _ = writeln!(out, "## Method\n");
        let _ = writeln!(
            out,
            "- Everything runs on loopback on this one machine, sharing its {} cores: the load \
             generator, the origin, the exit and the proxy under test. Absolute figures are \
             therefore low and move from run to run; the ratios between setups measured side by \
             side are what to read.",
            self.machine.cores
        );
        let _ = writeln!(
            out,
            "- Origin: `pinbench origin`, hyper + rustls with its own CA (given to pinproxy with \
             `--upstream-ca` and to mitmproxy with `ssl_verify_upstream_trusted_ca`), answering \
             every GET with {} bytes. Exit: `pinbench exit`, a minimal CONNECT proxy relaying \
             with tokio (it does not bind a source address: with thousands of short tunnels in \
             TIME_WAIT, picking a port at bind time made new connections through it several \
             times slower).",
            s.body_bytes
        );
        let _ = writeln!(
            out,
            "- Load: `pinbench load`, hyper 1 + rustls (TLS 1.3, default key exchange, no session \
             resumption, HTTP/1.1), through `CONNECT` for (b)–(g). *keep-alive*: one connection \
             per client for the whole run; *new conn*: TCP, `CONNECT` and a full TLS handshake \
             for every request, all inside the measured latency. Each client sends one untimed \
             warm-up request, then all start together."
        );
        let _ = writeln!(
            out,
            "- Setups run one after another within each round, in the order (a)…(g) in even \
             rounds and reversed in odd ones, so drift of the machine hits all of them alike. \
             (c) and (d) use the same pinproxy process; (d) sends `datadome` and `cf_clearance` \
             cookies (plus an untracked one) on every request, unique per client and run, so the \
             first request of each client pins them and the rest are routed by the pin. \
             (c-chrome), (c-rustls), (c′) and (g) are pinproxy processes of their own."
        );
        let _ = writeln!(
            out,
            "- Peer (f): `bench/peer`, a plain MITM on the published hudsucker crate with a no-op \
             handler and its own CA, trusting the origin's CA, HTTP/1.1 and h2, TCP_NODELAY on \
             both legs (as pinproxy and the bench tools set it), no exit. (g) is pinproxy on the \
             same path: its built-in direct exit, no exit proxy."
        );
        let _ = writeln!(
            out,
            "- Memory is `VmRSS` from `/proc/PID/status` (and, for pins, the live heap bytes \
             counted by a preloaded allocator wrapper), CPU is utime+stime from \
             `/proc/PID/stat`, of the process under test; instruction counts come from \
             valgrind's callgrind (chapter 1)."
        );
        let _ = writeln!(out);
    }

    /// This run's row of the history table.
    fn history_row(&self) -> String {
        let ka32 = |num, den| {
            median(&self.rps_ratios(num, den, ConnMode::KeepAlive, 32))
                .map_or("–".into(), |v| format!("{v:.2}"))
        };
        let tunnel = self
            .tunnels
            .iter()
            .rfind(|t| t.opened > 0 && !t.reference)
            .map_or("–".into(), |t| {
                format!("{:.1} KiB", t.idle_bytes_per_tunnel() / 1024.0)
            });
        let pin = self
            .pins
            .iter()
            .rfind(|p| p.pins > 0)
            .map_or("–".into(), |p| format!("{:.0} B", p.bytes_per_pin()));
        let rps = self
            .median_rps(Setup::Pinproxy, ConnMode::KeepAlive, 32)
            .map_or("–".into(), |v| format!("{v:.0}"));
        let per_request = |key: &str| {
            self.callgrind
                .as_ref()?
                .rows
                .iter()
                .find(|r| r.proxy == key)?
                .per_request()
        };
        let instructions = match (per_request("pinproxy"), per_request("hudsucker")) {
            (Some(g), Some(f)) if f > 0.0 => format!("{:.2}", g / f),
            _ => "–".into(),
        };
        format!(
            "| {} | {} | {} | {rps} | {} | {} | {} | {tunnel} | {pin} | {} | {instructions} | {} |",
            self.machine.date,
            self.machine.revision,
            self.machine.cores,
            ka32(Setup::Pinproxy, Setup::Exit),
            ka32(Setup::Pinproxy, Setup::Mitmproxy),
            ka32(Setup::PinproxyCookies, Setup::Pinproxy),
            ka32(Setup::Pinproxy, Setup::Hudsucker),
            ka32(Setup::Pinproxy, Setup::PinproxyRustls),
        )
    }

    /// The history table: this run's headline row, then the latest rows
    /// of `previous` (the file's former text).
    fn render_history(&self, out: &mut String, previous: Option<&str>) {
        let _ = writeln!(out, "## History\n");
        let _ = writeln!(
            out,
            "Headline figures of the latest runs (newest first, at most {HISTORY_ROWS}); \
             ratios are keep-alive at concurrency 32 (mirror/rustls is (c) over (c-rustls)), \
             per-tunnel and per-pin at the largest count, instructions per request from \
             callgrind.\n"
        );
        let _ = writeln!(out, "| {} |", HISTORY_COLUMNS.join(" | "));
        let rule: Vec<&str> = HISTORY_COLUMNS
            .iter()
            .enumerate()
            .map(|(i, _)| if i < 2 { "---" } else { "---:" })
            .collect();
        let _ = writeln!(out, "| {} |", rule.join(" | "));
        let _ = writeln!(out, "{HISTORY_START}");
        let _ = writeln!(out, "{}", self.history_row());
        let old: Vec<&str> = previous
            .and_then(|text| {
                let start = text.find(HISTORY_START)? + HISTORY_START.len();
                let end = text[start..].find(HISTORY_END)? + start;
                Some(
                    text[start..end]
                        .lines()
                        .filter(|l| l.starts_with('|'))
                        .collect(),
                )
            })
            .unwrap_or_default();
        let columns = HISTORY_COLUMNS.len() + 1;
        for line in old.into_iter().take(HISTORY_ROWS - 1) {
            // Rows from before a column was added get `–` in it.
            let missing = columns.saturating_sub(line.matches('|').count());
            let _ = writeln!(out, "{line}{}", " – |".repeat(missing));
        }
        let _ = writeln!(out, "{HISTORY_END}");
    }
}

/// The fixes table: rows kept by hand between the marks, carried over from
/// `previous` (the file's former text).
fn render_fixes(out: &mut String, previous: Option<&str>) {
    let _ = writeln!(
        out,
        "## Fixes, before and after
"
    );
    let _ = writeln!(
        out,
        "Each performance fix with the figure it moved, measured before and after it on the \
         same machine by the method named (instruction counts from callgrind at keep-alive \
         c=32 unless said otherwise). Rows are added by hand after the run that measured them; \
         every run carries them over.\n"
    );
    let _ = writeln!(out, "| fix | commit | measured by | before | after |");
    let _ = writeln!(out, "| --- | --- | --- | ---: | ---: |");
    let _ = writeln!(out, "{FIXES_START}");
    let rows = between(previous, FIXES_START, FIXES_END);
    for row in rows.into_iter().flatten().filter(|l| l.starts_with('|')) {
        let _ = writeln!(out, "{row}");
    }
    let _ = writeln!(out, "{FIXES_END}\n");
}

/// Why each missed goal is missed: text kept by hand between the marks
/// (each paragraph names the commit and command it was measured with),
/// carried over from `previous` whole. A run cannot write it: it says what
/// many runs and experiments showed, not what this one measured.
fn render_examined(out: &mut String, previous: Option<&str>) {
    let _ = writeln!(out, "### The missed goals, examined\n");
    let _ = writeln!(
        out,
        "Written by hand from this and earlier runs and from experiments beside them; every \
         run carries it over unchanged, so each paragraph names the commit and the command \
         it was measured with.\n"
    );
    let _ = writeln!(out, "{EXAMINED_START}");
    let lines: Vec<&str> = between(previous, EXAMINED_START, EXAMINED_END)
        .into_iter()
        .flatten()
        .collect();
    // The marks' own line breaks are written here, not carried.
    let text = lines.join("\n");
    let text = text.trim_matches('\n');
    if !text.is_empty() {
        let _ = writeln!(out, "{text}");
    }
    let _ = writeln!(out, "{EXAMINED_END}\n");
}

/// The lines of `previous` between the marks `start` and `end` (none when
/// there is no previous text or it lacks either mark).
fn between<'a>(previous: Option<&'a str>, start: &str, end: &str) -> Option<std::str::Lines<'a>> {
    let text = previous?;
    let from = text.find(start)? + start.len();
    let to = text[from..].find(end)? + from;
    Some(text[from..to].lines())
}

/// (after − before) / n as bytes (0 when it shrank or n is 0).
pub(crate) fn per(after: u64, before: u64, n: u64) -> f64 {
    if n == 0 {
        return 0.0;
    }
    after.saturating_sub(before) as f64 / n as f64
}

/// Bytes as MiB, one decimal.
pub(crate) fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// Nanoseconds in the most readable unit (ns, µs or ms).
pub(crate) fn ns(v: u64) -> String {
    let v = v as f64;
    if v >= 1e6 {
        format!("{:.2} ms", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1} µs", v / 1e3)
    } else {
        format!("{v:.0} ns")
    }
}

/// 1234567 → "1,234,567".
pub fn group(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The median of per-round ratios, with their range when there are several.
pub(crate) fn fmt_ratio(values: &[f64]) -> String {
    fmt_range(values, "")
}

/// The median of per-round values in `unit`, with their range when there
/// are several; `–` without values.
pub(crate) fn fmt_range(values: &[f64], unit: &str) -> String {
    match (median(values), range(values)) {
        (Some(m), Some((lo, hi))) if values.len() > 1 => {
            format!("{m:.2}{unit} [{lo:.2}–{hi:.2}]")
        }
        (Some(m), _) => format!("{m:.2}{unit}"),
        _ => "–".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::LoadResult;
    use crate::suite::callgrind::CallgrindRow;
    use crate::suite::fleet::{FleetStep, RedisMemory, RoundTrips};
    use crate::suite::throughput::CELLS;
    use crate::suite::upstream::{BuildFacts, ColdSample, ConnMemory};

    #[test]
    fn groups_thousands() {
        assert_eq!(group(0), "0");
        assert_eq!(group(999), "999");
        assert_eq!(group(1000), "1,000");
        assert_eq!(group(1_000_000), "1,000,000");
    }

    fn full_results() -> Results {
        let mut results = Results {
            settings: RunSettings {
                rounds: 2,
                fixed_rate_concurrency: 32,
                ..RunSettings::default()
            },
            tunnels: vec![TunnelRow {
                count: 10,
                opened: 10,
                rss_before: 1000,
                rss_idle: 2000,
                ..TunnelRow::default()
            }],
            pins: vec![PinRow {
                pins: 100,
                rss_growth: 20_000,
                ..PinRow::default()
            }],
            identities: vec![IdentityRow {
                identities: 10,
                rss_growth: 300_000,
                ..IdentityRow::default()
            }],
            churn: vec![ChurnRow {
                round: 1,
                identities: 10,
                heap_founded: 40_000,
                heap_forgotten: -2_000,
                failed: 0,
            }],
            mint_library: Some(MintReport::default()),
            mint_handshake: Some(MintReport::default()),
            callgrind: Some(CallgrindReport {
                rows: ["pinproxy", "hudsucker"]
                    .map(|proxy| CallgrindRow {
                        proxy: proxy.into(),
                        label: proxy.into(),
                        requests_short: 10,
                        instructions_short: 1_000,
                        requests_long: 30,
                        instructions_long: 3_000,
                        errors: 0,
                        store_writer: None,
                        rps_long: None,
                        handshakes_short: Some((32, 0)),
                        handshakes_long: Some((32, 1)),
                        to_load_end: true,
                    })
                    .into(),
                profile: Some("profile.txt".into()),
                ..CallgrindReport::default()
            }),
            upstream: Some(UpstreamReport {
                cold: [1, 32]
                    .into_iter()
                    .flat_map(|concurrency| {
                        ["mirror", "chrome", "rustls"].map(|mode| ColdSample {
                            mode: mode.into(),
                            concurrency,
                            rps: 100.0,
                            ..ColdSample::default()
                        })
                    })
                    .collect(),
                memory: vec![ConnMemory {
                    mode: "mirror".into(),
                    identities: 10,
                    rss_kept: 100_000,
                    fds_kept: 10,
                    ..ConnMemory::default()
                }],
                build: Some(BuildFacts {
                    pinproxy_bytes: 1 << 20,
                    clean_build_secs: Some(600.0),
                    ..BuildFacts::default()
                }),
            }),
            fleet: Some(FleetReport {
                steps: vec![FleetStep {
                    replicas: 2,
                    identities_per_sec: vec![10.0, 20.0],
                    redis_us_per_identity: Some(50.0),
                    hits_per_sec: vec![100.0, 200.0],
                    redis_us_per_hit: Some(20.0),
                    pinproxy_us_per_hit: Some(100.0),
                    ..FleetStep::default()
                }],
                memory: Some(RedisMemory {
                    identities: 1000,
                    used_memory_growth: 1_000_000,
                    ..RedisMemory::default()
                }),
                round_trips: Some(RoundTrips::default()),
                ..FleetReport::default()
            }),
            notes: vec!["a note".into()],
            ..Results::default()
        };
        for round in 0..2 {
            for &(mode, concurrency) in &CELLS {
                for setup in Setup::ALL {
                    let sample = Sample {
                        setup,
                        mode,
                        concurrency,
                        round,
                        result: LoadResult {
                            ok: 10,
                            rps: 100.0 + round as f64,
                            p50_us: 100,
                            p99_us: 900,
                            ..LoadResult::default()
                        },
                        proxy_cpu_us_per_req: Some(10.0),
                        listen_overflows: 1,
                        streams: None,
                    };
                    if mode == ConnMode::KeepAlive && concurrency == 32 {
                        results.fixed_rate.push(sample.clone());
                    }
                    results.throughput.push(sample);
                }
            }
        }
        results
    }

    #[test]
    fn the_latency_runs_say_how_many_requests_lie_above_their_p99() {
        let mut results = full_results();
        results.settings.fixed_rate = 1000.0;
        results.settings.secs = 1.5;
        let text = results.render(None);
        // A run from before fixed-rate runs had their own length.
        assert!(
            text.contains("Each run lasts 1.5 s, so 15 requests"),
            "{text}"
        );
        results.settings.fixed_rate_secs = Some(6.0);
        let text = results.render(None);
        assert!(
            text.contains("Each run lasts 6.0 s, so 60 requests"),
            "{text}"
        );
    }

    #[test]
    fn every_table_row_has_its_header_s_columns() {
        let text = full_results().render(None);
        let mut header: Option<usize> = None;
        for line in text.lines() {
            if line.starts_with('|') {
                let cells = line.matches('|').count();
                match header {
                    None => header = Some(cells),
                    Some(expected) => assert_eq!(cells, expected, "row {line:?}"),
                }
            } else if !line.starts_with("<!--") {
                header = None;
            }
        }
        for goal in [
            "(c)/(b) ≥ 0.6",
            "per idle tunnel",
            "per live pin",
            "(g) (pinproxy, direct exit) ≤ (f)'s",
            "instructions per keep-alive request of (g)",
            "mirror mode ≥ 0.9× rustls mode's",
            "A model for 10 to 100 replicas",
            "Upstream handshakes: the pool forced cold",
        ] {
            assert!(text.contains(goal), "{goal}");
        }
    }

    #[test]
    fn ratios_are_taken_within_rounds() {
        let results = full_results();
        let r = results.rps_ratios(Setup::Pinproxy, Setup::Exit, ConnMode::KeepAlive, 1);
        assert_eq!(r, vec![1.0, 1.0]);
    }

    #[test]
    fn history_rows_from_before_new_columns_are_padded() {
        let old = format!(
            "{HISTORY_START}\n| 2025-01-01 | abc | 2 | 1 | 0.5 | 30 | 0.9 | 9 KiB | 130 B |\n{HISTORY_END}\n"
        );
        let text = Results::default().render(Some(&old));
        let row = text
            .lines()
            .find(|l| l.starts_with("| 2025-01-01"))
            .unwrap();
        assert_eq!(row.matches('|').count(), HISTORY_COLUMNS.len() + 1);
        assert!(row.ends_with("| – | – | – |"), "{row}");
    }

    #[test]
    fn history_is_carried_over_and_bounded() {
        let results = Results {
            settings: RunSettings {
                rounds: 1,
                ..RunSettings::default()
            },
            ..Results::default()
        };
        let mut text = results.render(None);
        for _ in 0..(HISTORY_ROWS + 3) {
            text = results.render(Some(&text));
        }
        let start = text.find(HISTORY_START).unwrap();
        let end = text.find(HISTORY_END).unwrap();
        let rows = text[start..end]
            .lines()
            .filter(|l| l.starts_with('|'))
            .count();
        assert_eq!(rows, HISTORY_ROWS);
    }

    #[test]
    fn fixes_written_by_hand_are_carried_over() {
        let results = Results::default();
        let text = results.render(None);
        let row = "| a fix | abc1234 | callgrind | 2 | 1 |";
        let edited = text.replace(FIXES_START, &format!("{FIXES_START}\n{row}"));
        let again = results.render(Some(&edited));
        let again = results.render(Some(&again));
        assert_eq!(again.matches(row).count(), 1, "{again}");
    }

    #[test]
    fn the_examined_goals_are_carried_over_whole() {
        let results = Results::default();
        let text = results.render(None);
        let goals = text.find("## Goals").unwrap();
        let examined = text.find(EXAMINED_START).unwrap();
        assert!(goals < examined, "the account follows the goals table");
        let account = "A paragraph.\n\n- a point, measured at abc1234\n| a | table |";
        let edited = text.replace(EXAMINED_START, &format!("{EXAMINED_START}\n{account}\n"));
        let again = results.render(Some(&edited));
        let again = results.render(Some(&again));
        assert_eq!(again.matches(account).count(), 1, "{again}");
        assert!(again.contains(&format!("{EXAMINED_START}\n{account}\n{EXAMINED_END}")));
    }
}
