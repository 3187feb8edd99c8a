//! The results of one suite run and their rendering as `BENCHMARKS.md`.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::load::{ConnMode, LoadResult};
use crate::mint::MintReport;
use crate::stats::{median, range};

/// The setups compared in the throughput runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Setup {
    /// (a) straight to the origin.
    Direct,
    /// (b) through the exit proxy alone (a CONNECT tunnel, no MITM).
    Exit,
    /// (c) through pinproxy with one exit.
    Pinproxy,
    /// (c′) as (c) with a wider upstream pool (`limits.max_idle_per_origin`),
    /// run only at keep-alive with the highest concurrency.
    PinproxyWidePool,
    /// (d) as (c), with tracked cookies on every request.
    PinproxyCookies,
    /// (e) mitmproxy in upstream mode to the same exit.
    Mitmproxy,
}

impl Setup {
    /// All setups, in table order.
    pub const ALL: [Setup; 6] = [
        Setup::Direct,
        Setup::Exit,
        Setup::Pinproxy,
        Setup::PinproxyWidePool,
        Setup::PinproxyCookies,
        Setup::Mitmproxy,
    ];

    /// The letter used in the issue: a..e (c′ for the wide-pool variant).
    pub fn letter(self) -> &'static str {
        match self {
            Setup::Direct => "a",
            Setup::Exit => "b",
            Setup::Pinproxy => "c",
            Setup::PinproxyWidePool => "c′",
            Setup::PinproxyCookies => "d",
            Setup::Mitmproxy => "e",
        }
    }

    /// Short description.
    pub fn label(self) -> &'static str {
        match self {
            Setup::Direct => "direct to the origin",
            Setup::Exit => "exit proxy alone (CONNECT tunnel)",
            Setup::Pinproxy => "pinproxy, one exit",
            Setup::PinproxyWidePool => "pinproxy, `max_idle_per_origin` = concurrency",
            Setup::PinproxyCookies => "pinproxy, tracked cookies on every request",
            Setup::Mitmproxy => "mitmproxy, upstream mode to the exit",
        }
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
}

/// Idle tunnels held through one fresh pinproxy (or, as a reference, idle
/// TLS connections held to a fresh test origin).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TunnelRow {
    /// True for the reference row (the test origin, not pinproxy).
    pub reference: bool,
    /// Tunnels asked for.
    pub count: usize,
    /// Tunnels opened.
    pub opened: u64,
    /// Tunnels that failed to open.
    pub failed: u64,
    /// Seconds to open them.
    pub open_secs: f64,
    /// pinproxy's RSS before, bytes.
    pub rss_before: u64,
    /// RSS with the tunnels open and idle (TLS done, no request yet).
    pub rss_idle: u64,
    /// RSS after one request in every tunnel, the tunnels idle again.
    pub rss_after_request: u64,
    /// Requests that succeeded in that step.
    pub requested_ok: u64,
    /// RSS after the tunnels were closed.
    pub rss_closed: u64,
    /// pinproxy's threads with the tunnels open.
    pub threads: u64,
    /// pinproxy's CPU use while the tunnels sat idle, percent of one core.
    pub idle_cpu_percent: f64,
    /// pinproxy CPU time per tunnel opened (CONNECT + TLS), microseconds.
    pub open_cpu_us_per_tunnel: f64,
    /// The first failure, if any.
    pub first_error: Option<String>,
}

/// Pins held by one pinproxy, cumulatively.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PinRow {
    /// Pins created beyond the warm-up.
    pub pins: u64,
    /// RSS growth over the baseline, bytes.
    pub rss_growth: u64,
    /// Pins created per second in this step.
    pub pins_per_sec: f64,
    /// pinproxy CPU time per pin in this step, microseconds.
    pub cpu_us_per_pin: f64,
    /// Requests that failed in this step.
    pub failed: u64,
}

/// New identities, one tracked cookie each, in a fresh pinproxy with the
/// default pool settings.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct IdentityRow {
    /// Identities created (one request each).
    pub identities: u64,
    /// RSS growth, bytes.
    pub rss_growth: u64,
    /// Growth of pinproxy's open file descriptors.
    pub fds_growth: u64,
    /// Identities created per second.
    pub per_sec: f64,
    /// pinproxy CPU time per identity, microseconds.
    pub cpu_us_per_identity: f64,
    /// Requests that failed.
    pub failed: u64,
}

/// One `pinproxy store bench` run: new pins into an empty store.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StoreRow {
    /// `memory`, `embedded` or `redis`.
    pub store: String,
    /// Concurrent writers.
    pub concurrency: usize,
    /// Pins written.
    pub pins: u64,
    /// Pins per second.
    pub pins_per_sec: f64,
    /// Median pin-if-absent latency, microseconds.
    pub p50_us: f64,
    /// 99th percentile pin-if-absent latency, microseconds.
    pub p99_us: f64,
    /// Slowest pin-if-absent, microseconds.
    pub max_us: f64,
}

/// The embedded store filled to scale, then opened by the tools and the daemon.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StoreScale {
    /// Pins in the store.
    pub pins: u64,
    /// Identities in the store.
    pub identities: u64,
    /// Pins per second while filling it (`store bench`).
    pub fill_pins_per_sec: f64,
    /// Size of the store file, bytes.
    pub file_bytes: u64,
    /// Wall time of `pinproxy store stats` (start, open, load, count, exit).
    pub open_secs: f64,
    /// From `pinproxy run` to accepting connections.
    pub start_secs: f64,
    /// The daemon's RSS once started, bytes.
    pub rss_bytes: u64,
    /// A daemon's RSS with an empty store, bytes.
    pub empty_rss_bytes: u64,
}

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
    /// Concurrency of the fixed-rate latency runs.
    pub fixed_rate_concurrency: usize,
    /// Tracked cookies per request when filling pins.
    pub pins_per_request: usize,
    /// Connections used when filling pins.
    pub pin_concurrency: usize,
}

/// Everything one run measured.
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
    /// Pin store runs.
    pub stores: Vec<StoreRow>,
    /// The embedded store at scale.
    pub store_scale: Option<StoreScale>,
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

/// Thresholds from the issue.
pub mod goals {
    /// (c) requests/s over mitmproxy's.
    pub const VS_MITMPROXY: f64 = 10.0;
    /// (c)/(b) with keep-alive.
    pub const VS_EXIT_KEEPALIVE: f64 = 0.5;
    /// (d)/(c).
    pub const COOKIES: f64 = 0.97;
    /// p99 added latency of (c) over (b) at concurrency 32, milliseconds.
    pub const ADDED_P99_MS: f64 = 1.0;
    /// Bytes of RSS per idle tunnel.
    pub const TUNNEL_BYTES: f64 = 10.0 * 1024.0;
    /// RSS of the daemon with the embedded store at a million pins, bytes.
    pub const STORE_RSS_BYTES: f64 = 300e6;
    /// Bytes per live pin.
    pub const PIN_BYTES: f64 = 300.0;
}

/// The modes and concurrencies of the throughput matrix, in table order.
pub const CELLS: [(ConnMode, usize); 6] = [
    (ConnMode::KeepAlive, 1),
    (ConnMode::KeepAlive, 32),
    (ConnMode::KeepAlive, 256),
    (ConnMode::NewConn, 1),
    (ConnMode::NewConn, 32),
    (ConnMode::NewConn, 256),
];

/// Marks around the history rows, so the next run can carry them over.
const HISTORY_START: &str = "<!-- history:start -->";
const HISTORY_END: &str = "<!-- history:end -->";
/// History rows kept (the latest run included).
const HISTORY_ROWS: usize = 8;

impl Results {
    fn samples(
        list: &[Sample],
        setup: Setup,
        mode: ConnMode,
        concurrency: usize,
    ) -> impl Iterator<Item = &Sample> {
        list.iter()
            .filter(move |s| s.setup == setup && s.mode == mode && s.concurrency == concurrency)
    }

    fn sample(
        list: &[Sample],
        setup: Setup,
        mode: ConnMode,
        concurrency: usize,
        round: usize,
    ) -> Option<&Sample> {
        Self::samples(list, setup, mode, concurrency).find(|s| s.round == round)
    }

    /// Median over rounds of `f` for one setup and cell.
    fn median_of(
        list: &[Sample],
        setup: Setup,
        mode: ConnMode,
        concurrency: usize,
        f: impl Fn(&Sample) -> Option<f64>,
    ) -> Option<f64> {
        let v: Vec<f64> = Self::samples(list, setup, mode, concurrency)
            .filter_map(f)
            .collect();
        median(&v)
    }

    /// Per-round values of `f(num) op f(den)`, for rounds where both ran.
    fn per_round(
        &self,
        list: &[Sample],
        num: Setup,
        den: Setup,
        mode: ConnMode,
        concurrency: usize,
        f: impl Fn(&Sample, &Sample) -> Option<f64>,
    ) -> Vec<f64> {
        (0..self.settings.rounds)
            .filter_map(|r| {
                let a = Self::sample(list, num, mode, concurrency, r)?;
                let b = Self::sample(list, den, mode, concurrency, r)?;
                f(a, b)
            })
            .collect()
    }

    /// Per-round requests/s ratios num/den in one cell.
    pub fn rps_ratios(&self, num: Setup, den: Setup, mode: ConnMode, conc: usize) -> Vec<f64> {
        self.per_round(&self.throughput, num, den, mode, conc, |a, b| {
            (a.result.ok > 0 && b.result.rps > 0.0).then(|| a.result.rps / b.result.rps)
        })
    }

    /// Per-round p99 differences num − den in milliseconds, in `list`.
    pub fn p99_added_ms(
        &self,
        list: &[Sample],
        num: Setup,
        den: Setup,
        mode: ConnMode,
        conc: usize,
    ) -> Vec<f64> {
        self.per_round(list, num, den, mode, conc, |a, b| {
            (a.result.ok > 0 && b.result.ok > 0)
                .then(|| (f64::from(a.result.p99_us) - f64::from(b.result.p99_us)) / 1000.0)
        })
    }

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
        self.render_throughput(&mut out);
        self.render_scale(&mut out);
        self.render_method(&mut out);
        if !self.notes.is_empty() {
            let _ = writeln!(out, "## Notes from this run\n");
            for note in &self.notes {
                let _ = writeln!(out, "- {note}");
            }
            let _ = writeln!(out);
        }
        self.render_history(&mut out, previous);
        out
    }

    /// (label, value, met) for each goal; value None when not measured.
    fn goal_rows(&self) -> Vec<(String, String, Option<bool>)> {
        let mut rows = Vec::new();
        let fmt_cells = |cells: &[(String, f64)], unit: &str| -> String {
            cells
                .iter()
                .map(|(c, v)| format!("{c}: {v:.2}{unit}"))
                .collect::<Vec<_>>()
                .join("; ")
        };
        let all_cells = |num: Setup, den: Setup, only: Option<ConnMode>| -> Vec<(String, f64)> {
            CELLS
                .iter()
                .filter(|(mode, _)| only.is_none_or(|o| o == *mode))
                .filter_map(|&(mode, conc)| {
                    median(&self.rps_ratios(num, den, mode, conc))
                        .map(|v| (format!("{} c={conc}", mode.label()), v))
                })
                .collect()
        };
        let verdict = |cells: &[(String, f64)], ok: &dyn Fn(f64) -> bool| -> Option<bool> {
            (!cells.is_empty()).then(|| cells.iter().all(|(_, v)| ok(*v)))
        };

        let e = all_cells(Setup::Pinproxy, Setup::Mitmproxy, None);
        rows.push((
            format!(
                "(c) ≥ {}× mitmproxy's requests/s, every cell",
                goals::VS_MITMPROXY
            ),
            if e.is_empty() {
                format!("not measured: mitmproxy {}", self.machine.mitmproxy)
            } else {
                fmt_cells(&e, "×")
            },
            verdict(&e, &|v| v >= goals::VS_MITMPROXY),
        ));
        let b = all_cells(Setup::Pinproxy, Setup::Exit, Some(ConnMode::KeepAlive));
        rows.push((
            format!("(c)/(b) ≥ {} with keep-alive", goals::VS_EXIT_KEEPALIVE),
            fmt_cells(&b, ""),
            verdict(&b, &|v| v >= goals::VS_EXIT_KEEPALIVE),
        ));
        let d = all_cells(Setup::PinproxyCookies, Setup::Pinproxy, None);
        rows.push((
            format!("(d)/(c) ≥ {}, every cell", goals::COOKIES),
            fmt_cells(&d, ""),
            verdict(&d, &|v| v >= goals::COOKIES),
        ));
        let fixed: Vec<(String, f64)> = median(&self.p99_added_ms(
            &self.fixed_rate,
            Setup::Pinproxy,
            Setup::Exit,
            ConnMode::KeepAlive,
            self.settings.fixed_rate_concurrency,
        ))
        .map(|v| {
            (
                format!(
                    "keep-alive c={} at {:.0} req/s",
                    self.settings.fixed_rate_concurrency, self.settings.fixed_rate
                ),
                v,
            )
        })
        .into_iter()
        .collect();
        rows.push((
            format!(
                "p99 added by (c) over (b) < {} ms at concurrency 32, below saturation",
                goals::ADDED_P99_MS
            ),
            fmt_cells(&fixed, " ms"),
            verdict(&fixed, &|v| v < goals::ADDED_P99_MS),
        ));
        let saturated: Vec<(String, f64)> = [ConnMode::KeepAlive, ConnMode::NewConn]
            .iter()
            .filter_map(|&mode| {
                median(&self.p99_added_ms(&self.throughput, Setup::Pinproxy, Setup::Exit, mode, 32))
                    .map(|v| (format!("{} c=32", mode.label()), v))
            })
            .collect();
        rows.push((
            format!(
                "p99 added by (c) over (b) < {} ms at concurrency 32, saturated (closed loop)",
                goals::ADDED_P99_MS
            ),
            fmt_cells(&saturated, " ms"),
            verdict(&saturated, &|v| v < goals::ADDED_P99_MS),
        ));
        let t: Vec<(String, f64)> = self
            .tunnels
            .iter()
            .filter(|t| t.opened > 0 && !t.reference)
            .flat_map(|t| {
                [
                    (
                        format!("{} idle", t.count),
                        per(t.rss_idle, t.rss_before, t.opened),
                    ),
                    (
                        format!("{} after a request", t.count),
                        per(t.rss_after_request, t.rss_before, t.opened),
                    ),
                ]
            })
            .collect();
        rows.push((
            format!("< {} KiB RSS per idle tunnel", goals::TUNNEL_BYTES / 1024.0),
            t.iter()
                .map(|(c, v)| format!("{c}: {:.1} KiB", v / 1024.0))
                .collect::<Vec<_>>()
                .join("; "),
            verdict(&t, &|v| v < goals::TUNNEL_BYTES),
        ));
        let p: Vec<(String, f64)> = self
            .pins
            .iter()
            .filter(|p| p.pins > 0)
            .map(|p| (group(p.pins), p.rss_growth as f64 / p.pins as f64))
            .collect();
        rows.push((
            format!("< {} bytes per live pin", goals::PIN_BYTES),
            p.iter()
                .map(|(c, v)| format!("{c} pins: {v:.0} B"))
                .collect::<Vec<_>>()
                .join("; "),
            verdict(&p, &|v| v < goals::PIN_BYTES),
        ));
        let scale: Vec<(String, f64)> = self
            .store_scale
            .iter()
            .map(|s| (group(s.pins), s.rss_bytes as f64))
            .collect();
        rows.push((
            format!(
                "< {} MB daemon RSS with 1,000,000 pins (embedded store)",
                goals::STORE_RSS_BYTES / 1e6
            ),
            scale
                .iter()
                .map(|(c, v)| format!("{c} pins: {:.0} MB", v / 1e6))
                .collect::<Vec<_>>()
                .join("; "),
            verdict(&scale, &|v| v < goals::STORE_RSS_BYTES),
        ));
        rows
    }

    fn render_goals(&self, out: &mut String) {
        let _ = writeln!(out, "## Goals\n");
        let _ = writeln!(out, "| goal | measured (medians over rounds) | status |");
        let _ = writeln!(out, "| --- | --- | --- |");
        for (goal, value, met) in self.goal_rows() {
            let status = match met {
                Some(true) => "met",
                Some(false) => "**missed**",
                None => "not measured",
            };
            let _ = writeln!(out, "| {goal} | {value} | {status} |");
        }
        let _ = writeln!(out);
    }

    fn render_throughput(&self, out: &mut String) {
        let s = &self.settings;
        let _ = writeln!(out, "## 1. Throughput and latency\n");
        let _ = writeln!(
            out,
            "GET of a {} B body over TLS (HTTP/1.1), {} interleaved rounds; each run is \
             bounded by {:.1} s and {} requests after a warm-up request per client. Ratios are \
             taken within each round, then the median over rounds is shown with the range in \
             brackets.\n",
            s.body_bytes,
            s.rounds,
            s.secs,
            group(s.max_requests)
        );
        let _ = writeln!(out, "### Ratios of requests/s\n");
        let _ = writeln!(
            out,
            "| connections | concurrency | (c)/(a) | (c)/(b) | (c)/(e) | (d)/(c) | p99 added (c)−(b) |"
        );
        let _ = writeln!(out, "| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
        for &(mode, conc) in &CELLS {
            let cell = |num, den| fmt_ratio(&self.rps_ratios(num, den, mode, conc));
            let added =
                self.p99_added_ms(&self.throughput, Setup::Pinproxy, Setup::Exit, mode, conc);
            let _ = writeln!(
                out,
                "| {} | {conc} | {} | {} | {} | {} | {} |",
                mode.label(),
                cell(Setup::Pinproxy, Setup::Direct),
                cell(Setup::Pinproxy, Setup::Exit),
                cell(Setup::Pinproxy, Setup::Mitmproxy),
                cell(Setup::PinproxyCookies, Setup::Pinproxy),
                median(&added).map_or("–".into(), |v| format!("{v:+.2} ms")),
            );
        }
        let _ = writeln!(out);

        let wide: Vec<String> = CELLS
            .iter()
            .filter_map(|&(mode, conc)| {
                let r = self.rps_ratios(Setup::PinproxyWidePool, Setup::Pinproxy, mode, conc);
                let b = self.rps_ratios(Setup::PinproxyWidePool, Setup::Exit, mode, conc);
                median(&r).map(|_| {
                    format!(
                        "at {} c={conc}, (c′)/(c) = {} and (c′)/(b) = {}",
                        mode.label(),
                        fmt_ratio(&r),
                        fmt_ratio(&b)
                    )
                })
            })
            .collect();
        if !wide.is_empty() {
            let _ = writeln!(
                out,
                "(c′) is pinproxy with `limits.max_idle_per_origin` set to the concurrency: {}. \
                 A pool that keeps fewer idle connections than there are concurrent clients \
                 closes most upstream connections after each response and opens new ones \
                 (`CONNECT` and TLS to the origin) for the next requests; the default is 256 \
                 (it was 32 until this comparison showed (c′)/(c) = 4.6 at keep-alive c=256), so \
                 (c′) and (c) now run alike and their ratio shows the run's noise.\n",
                wide.join("; ")
            );
        }
        let _ = writeln!(
            out,
            "In (d) every client's cookies make an identity of its own, with its own upstream \
             connections, so (d) is not bound by the shared pool of cookie-less traffic that \
             limits (c).\n"
        );

        let _ = writeln!(out, "### Requests/s and latency per setup\n");
        let _ = writeln!(
            out,
            "Medians over rounds. *proxy CPU* is the CPU time of the proxy under test (the exit \
             for (b), pinproxy for (c), (c′) and (d), mitmproxy for (e)) per request. *SYN \
             drops* counts, over all rounds, connections the kernel dropped because a \
             listener's accept queue was full (`ListenOverflows`); each costs its client a 1 s \
             retransmission, which shows in p99. The origin and the exit listen with a backlog \
             of 4096, so drops in a proxied setup are the proxy's.\n"
        );
        let _ = writeln!(
            out,
            "| connections | concurrency | setup | req/s | p50 ms | p99 ms | errors | SYN drops | proxy CPU µs/req |"
        );
        let _ = writeln!(
            out,
            "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"
        );
        for &(mode, conc) in &CELLS {
            for setup in Setup::ALL {
                let list = &self.throughput;
                if Self::samples(list, setup, mode, conc).next().is_none() {
                    continue;
                }
                self.setup_row(out, list, setup, mode, conc);
            }
        }
        let _ = writeln!(out);

        if !self.fixed_rate.is_empty() {
            let _ = writeln!(out, "### Latency below saturation\n");
            let _ = writeln!(
                out,
                "Closed-loop runs saturate the 2-core machine, so their latency mostly measures \
                 queueing behind the CPU. Here {} keep-alive clients are paced to {:.0} \
                 requests/s in total (open loop: a request held up by slow earlier ones counts \
                 from when it was due), well below the capacity of (a)–(d); mitmproxy is left \
                 out, as it cannot sustain that rate.\n",
                s.fixed_rate_concurrency, s.fixed_rate
            );
            let _ = writeln!(
                out,
                "| connections | concurrency | setup | req/s | p50 ms | p99 ms | errors | SYN drops | proxy CPU µs/req |"
            );
            let _ = writeln!(
                out,
                "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"
            );
            for setup in Setup::ALL {
                let list = &self.fixed_rate;
                if Self::samples(list, setup, ConnMode::KeepAlive, s.fixed_rate_concurrency)
                    .next()
                    .is_none()
                {
                    continue;
                }
                self.setup_row(
                    out,
                    list,
                    setup,
                    ConnMode::KeepAlive,
                    s.fixed_rate_concurrency,
                );
            }
            let added = self.p99_added_ms(
                &self.fixed_rate,
                Setup::Pinproxy,
                Setup::Exit,
                ConnMode::KeepAlive,
                s.fixed_rate_concurrency,
            );
            let _ = writeln!(
                out,
                "\np99 added by (c) over (b): {}.\n",
                fmt_range(&added, " ms")
            );
        }
    }

    fn setup_row(
        &self,
        out: &mut String,
        list: &[Sample],
        setup: Setup,
        mode: ConnMode,
        conc: usize,
    ) {
        let med = |f: &dyn Fn(&Sample) -> Option<f64>| Self::median_of(list, setup, mode, conc, f);
        let errors: u64 = Self::samples(list, setup, mode, conc)
            .map(|s| s.result.errors)
            .sum();
        let ok: u64 = Self::samples(list, setup, mode, conc)
            .map(|s| s.result.ok)
            .sum();
        let rps = med(&|s| Some(s.result.rps));
        let p50 = med(&|s| (s.result.ok > 0).then(|| f64::from(s.result.p50_us) / 1000.0));
        let p99 = med(&|s| (s.result.ok > 0).then(|| f64::from(s.result.p99_us) / 1000.0));
        let cpu = med(&|s| s.proxy_cpu_us_per_req);
        let drops: u64 = Self::samples(list, setup, mode, conc)
            .map(|s| s.listen_overflows)
            .sum();
        let errors = if errors == 0 {
            "0".to_owned()
        } else {
            format!("**{errors}** of {}", errors + ok)
        };
        let _ = writeln!(
            out,
            "| {} | {conc} | ({}) {} | {} | {} | {} | {errors} | {drops} | {} |",
            mode.label(),
            setup.letter(),
            setup.label(),
            rps.map_or("–".into(), |v| format!("{v:.0}")),
            p50.map_or("–".into(), |v| format!("{v:.2}")),
            p99.map_or("–".into(), |v| format!("{v:.2}")),
            cpu.map_or("–".into(), |v| format!("{v:.0}")),
        );
    }

    fn render_scale(&self, out: &mut String) {
        let _ = writeln!(out, "## 2. Scale\n");
        let _ = writeln!(out, "### Idle tunnels\n");
        let _ = writeln!(
            out,
            "A fresh pinproxy per row. The tunnels are `CONNECT` + TLS through pinproxy, held \
             idle; *after a request* is after one GET in every tunnel, the tunnels idle again. \
             Per-tunnel figures are RSS growth over the warm baseline divided by the tunnels \
             opened. The *reference* row holds plain idle TLS connections to a fresh test origin \
             (hyper + tokio-rustls, the same stack pinproxy serves tunnels with, and nothing \
             else), for scale.\n"
        );
        let _ = writeln!(
            out,
            "| server | tunnels | opened | open time | baseline RSS | idle: RSS | per tunnel | after a request: RSS | per tunnel | idle CPU | CPU per tunnel opened | RSS after closing |"
        );
        let _ = writeln!(
            out,
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
        );
        for t in &self.tunnels {
            let _ = writeln!(
                out,
                "| {} | {} | {}{} | {:.1} s | {} | {} | {:.1} KiB | {} | {:.1} KiB | {:.1} % | {:.0} µs | {} |",
                if t.reference {
                    "reference: test origin"
                } else {
                    "pinproxy"
                },
                group(t.count as u64),
                group(t.opened),
                if t.failed > 0 {
                    format!(" (**{} failed**)", t.failed)
                } else {
                    String::new()
                },
                t.open_secs,
                mib(t.rss_before),
                mib(t.rss_idle),
                per(t.rss_idle, t.rss_before, t.opened) / 1024.0,
                mib(t.rss_after_request),
                per(t.rss_after_request, t.rss_before, t.opened) / 1024.0,
                t.idle_cpu_percent,
                t.open_cpu_us_per_tunnel,
                mib(t.rss_closed),
            );
        }
        let _ = writeln!(out);

        let _ = writeln!(out, "### Pins\n");
        let s = &self.settings;
        let _ = writeln!(
            out,
            "One fresh pinproxy, filled cumulatively through its proxy port: {} kept-alive \
             connections send requests carrying {} new tracked cookies each, so every cookie \
             becomes a pin. Each connection also sends its own *anchor* cookie, so its pins all \
             join one identity: the figures are the pins alone ({} identities in all{}). Growth \
             is over the RSS after a warm-up fill of {} pins (two requests per connection, so \
             every connection is open before the baseline), with pinproxy's default pin store.\n",
            s.pin_concurrency,
            s.pins_per_request,
            s.pin_concurrency,
            match self.pin_identities {
                Some(n) => format!(", pinproxy counted {n}"),
                None => String::new(),
            },
            group(self.pin_warmup),
        );
        let _ = writeln!(
            out,
            "| live pins | RSS growth | bytes per pin | pins/s while filling | pinproxy CPU µs per pin |"
        );
        let _ = writeln!(out, "| ---: | ---: | ---: | ---: | ---: |");
        for p in &self.pins {
            let failed = if p.failed > 0 {
                format!(" (**{} requests failed**)", p.failed)
            } else {
                String::new()
            };
            let _ = writeln!(
                out,
                "| {}{failed} | {} | {:.0} | {:.0} | {:.1} |",
                group(p.pins),
                mib(p.rss_growth),
                if p.pins > 0 {
                    p.rss_growth as f64 / p.pins as f64
                } else {
                    0.0
                },
                p.pins_per_sec,
                p.cpu_us_per_pin,
            );
        }
        let _ = writeln!(out);

        if !self.identities.is_empty() {
            let _ = writeln!(out, "### Identities\n");
            let _ = writeln!(
                out,
                "A request whose tracked cookies are all new starts an identity, and every \
                 identity has its own upstream connections (its own `CONNECT` and TLS handshake \
                 with the origin), kept idle for `timeouts.pool_idle` (90 s by default) after \
                 its last request. A fresh pinproxy with default settings, one request with one \
                 new cookie per identity, measured right after (the connections still pooled):\n"
            );
            let _ = writeln!(
                out,
                "| identities | RSS growth | per identity | open descriptors added | identities/s | pinproxy CPU µs per identity |"
            );
            let _ = writeln!(out, "| ---: | ---: | ---: | ---: | ---: | ---: |");
            for r in &self.identities {
                let failed = if r.failed > 0 {
                    format!(" (**{} requests failed**)", r.failed)
                } else {
                    String::new()
                };
                let _ = writeln!(
                    out,
                    "| {}{failed} | {} | {:.1} KiB | {} | {:.0} | {:.0} |",
                    group(r.identities),
                    mib(r.rss_growth),
                    per(r.rss_growth, 0, r.identities) / 1024.0,
                    group(r.fds_growth),
                    r.per_sec,
                    r.cpu_us_per_identity,
                );
            }
            let _ = writeln!(out);
        }

        self.render_stores(out);
        let _ = writeln!(out, "### Leaf certificates\n");
        let _ = writeln!(
            out,
            "New hosts and a cached host, interleaved. *client-side* times `CONNECT` plus the \
             TLS handshake through a running pinproxy with a new SNI name versus a cached one: \
             the difference is what minting adds to a tunnel's first handshake. *library* (only \
             when pinbench is built with `--features library`, e.g. `PINBENCH_LIBRARY=1 \
             bench/run.sh`) times `CertCache::server_config` in-process.\n"
        );
        let _ = writeln!(
            out,
            "| view | samples | new host p50 | new host p99 | cached host p50 | cached host p99 | new/cached (p50) |"
        );
        let _ = writeln!(out, "| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
        for (view, report) in [
            ("library", &self.mint_library),
            ("client-side", &self.mint_handshake),
        ] {
            if let Some(r) = report {
                let _ = writeln!(
                    out,
                    "| {view} | {} + {} | {} | {} | {} | {} | {:.1}× |",
                    r.new_host.count,
                    r.cached_host.count,
                    ns(r.new_host.p50_ns),
                    ns(r.new_host.p99_ns),
                    ns(r.cached_host.p50_ns),
                    ns(r.cached_host.p99_ns),
                    r.new_host.p50_ns as f64 / r.cached_host.p50_ns.max(1) as f64,
                );
            }
        }
        let _ = writeln!(out);
    }

    fn render_stores(&self, out: &mut String) {
        if self.stores.is_empty() && self.store_scale.is_none() {
            return;
        }
        let _ = writeln!(out, "### Pin stores\n");
        let _ = writeln!(
            out,
            "`pinproxy store bench` against an empty store of each kind: concurrent writers \
             found identities (4 pins each) and time every pin-if-absent, the call a request \
             with a never-seen cookie waits on. For the embedded store that includes the \
             durable commit (fsync), shared by the writers waiting at the same time; Redis is a \
             local `redis-server` without persistence, so its figures are one loopback round \
             trip and the script, not a disk.\n"
        );
        if !self.stores.is_empty() {
            let _ = writeln!(
                out,
                "| store | writers | pins | pins/s | p50 µs | p99 µs | max µs |"
            );
            let _ = writeln!(out, "| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
            for s in &self.stores {
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | {} | {:.1} | {:.1} | {:.0} |",
                    s.store,
                    s.concurrency,
                    group(s.pins),
                    group(s.pins_per_sec as u64),
                    s.p50_us,
                    s.p99_us,
                    s.max_us
                );
            }
            let _ = writeln!(out);
        }
        if let Some(s) = &self.store_scale {
            let _ = writeln!(
                out,
                "The embedded store filled with {} pins ({} identities) by `store bench`, then \
                 opened: *open* is the wall time of `pinproxy store stats` (process start, open, \
                 load into memory, count); *start-up* is `pinproxy run` until it accepts \
                 connections.\n",
                group(s.pins),
                group(s.identities)
            );
            let _ = writeln!(
                out,
                "| pins | fill pins/s | file | open | start-up | daemon RSS | empty daemon RSS |"
            );
            let _ = writeln!(out, "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
            let _ = writeln!(
                out,
                "| {} | {} | {:.0} MB | {:.2} s | {:.2} s | {} | {} |\n",
                group(s.pins),
                group(s.fill_pins_per_sec as u64),
                s.file_bytes as f64 / 1e6,
                s.open_secs,
                s.start_secs,
                mib(s.rss_bytes),
                mib(s.empty_rss_bytes),
            );
        }
    }

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
             resumption, HTTP/1.1), through `CONNECT` for (b)–(e). *keep-alive*: one connection \
             per client for the whole run; *new conn*: TCP, `CONNECT` and a full TLS handshake \
             for every request, all inside the measured latency. Each client sends one untimed \
             warm-up request, then all start together."
        );
        let _ = writeln!(
            out,
            "- Setups run one after another within each round, in the order (a)…(e) in even \
             rounds and reversed in odd ones, so drift of the machine hits all of them alike. \
             (c) and (d) use the same pinproxy process; (d) sends `datadome` and `cf_clearance` \
             cookies (plus an untracked one) on every request, unique per client and run, so the \
             first request of each client pins them and the rest are routed by the pin."
        );
        let _ = writeln!(
            out,
            "- Memory is `VmRSS` from `/proc/PID/status`, CPU is utime+stime from \
             `/proc/PID/stat`, both of the pinproxy process."
        );
        let _ = writeln!(out);
    }

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
                format!(
                    "{:.1} KiB",
                    per(t.rss_idle, t.rss_before, t.opened) / 1024.0
                )
            });
        let pin = self
            .pins
            .iter()
            .rfind(|p| p.pins > 0)
            .map_or("–".into(), |p| {
                format!("{:.0} B", p.rss_growth as f64 / p.pins as f64)
            });
        let rps = Self::median_of(
            &self.throughput,
            Setup::Pinproxy,
            ConnMode::KeepAlive,
            32,
            |s| Some(s.result.rps),
        )
        .map_or("–".into(), |v| format!("{v:.0}"));
        format!(
            "| {} | {} | {} | {rps} | {} | {} | {} | {tunnel} | {pin} |",
            self.machine.date,
            self.machine.revision,
            self.machine.cores,
            ka32(Setup::Pinproxy, Setup::Exit),
            ka32(Setup::Pinproxy, Setup::Mitmproxy),
            ka32(Setup::PinproxyCookies, Setup::Pinproxy),
        )
    }

    fn render_history(&self, out: &mut String, previous: Option<&str>) {
        let _ = writeln!(out, "## History\n");
        let _ = writeln!(
            out,
            "Headline figures of the latest runs (newest first, at most {HISTORY_ROWS}); \
             ratios are keep-alive at concurrency 32, per-tunnel and per-pin at the largest \
             count.\n"
        );
        let _ = writeln!(
            out,
            "| date | pinproxy | cores | (c) req/s | (c)/(b) | (c)/(e) | (d)/(c) | per idle tunnel | per pin |"
        );
        let _ = writeln!(
            out,
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
        );
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
        for line in old.into_iter().take(HISTORY_ROWS - 1) {
            let _ = writeln!(out, "{line}");
        }
        let _ = writeln!(out, "{HISTORY_END}");
    }
}

/// (after − before) / n as bytes (0 when it shrank or n is 0).
fn per(after: u64, before: u64, n: u64) -> f64 {
    if n == 0 {
        return 0.0;
    }
    after.saturating_sub(before) as f64 / n as f64
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

fn ns(v: u64) -> String {
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

fn fmt_ratio(values: &[f64]) -> String {
    fmt_range(values, "")
}

fn fmt_range(values: &[f64], unit: &str) -> String {
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
            mint_library: Some(MintReport::default()),
            mint_handshake: Some(MintReport::default()),
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
        for goal in ["(c)/(b) ≥ 0.5", "per idle tunnel", "per live pin"] {
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
}
