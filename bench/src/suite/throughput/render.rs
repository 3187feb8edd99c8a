//! The throughput chapter of the report: ratios between setups taken within
//! rounds, the goals they are held to, and the tables.

use std::fmt::Write as _;

use super::{Sample, Setup, CELLS};
use crate::load::ConnMode;
use crate::report::{fmt_range, fmt_ratio, group, Goal, Results};
use crate::stats::median;

/// (c) requests/s over mitmproxy's.
const GOAL_VS_MITMPROXY: f64 = 10.0;
/// (c)/(b) with keep-alive (issue 14: 0.6, up from 0.5).
const GOAL_VS_EXIT_KEEPALIVE: f64 = 0.6;
/// Proxy CPU per request of (g) over (f)'s, keep-alive at concurrency 32.
const GOAL_CPU_VS_PEER: f64 = 1.0;
/// (d)/(c).
const GOAL_COOKIES: f64 = 0.97;
/// p99 added latency of (c) over (b) at concurrency 32, milliseconds.
const GOAL_ADDED_P99_MS: f64 = 1.0;

/// The samples of one setup in one cell, every round.
fn samples(
    list: &[Sample],
    setup: Setup,
    mode: ConnMode,
    concurrency: usize,
) -> impl Iterator<Item = &Sample> {
    list.iter()
        .filter(move |s| s.setup == setup && s.mode == mode && s.concurrency == concurrency)
}

/// The sample of one setup in one cell and round.
fn sample(
    list: &[Sample],
    setup: Setup,
    mode: ConnMode,
    concurrency: usize,
    round: usize,
) -> Option<&Sample> {
    samples(list, setup, mode, concurrency).find(|s| s.round == round)
}

/// Median over rounds of `f` for one setup and cell.
fn median_of(
    list: &[Sample],
    setup: Setup,
    mode: ConnMode,
    concurrency: usize,
    f: impl Fn(&Sample) -> Option<f64>,
) -> Option<f64> {
    let v: Vec<f64> = samples(list, setup, mode, concurrency)
        .filter_map(f)
        .collect();
    median(&v)
}

impl Results {
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
                let a = sample(list, num, mode, concurrency, r)?;
                let b = sample(list, den, mode, concurrency, r)?;
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

    /// Median over rounds of the closed-loop requests/s of one setup in one cell.
    pub fn median_rps(&self, setup: Setup, mode: ConnMode, conc: usize) -> Option<f64> {
        median_of(&self.throughput, setup, mode, conc, |s| Some(s.result.rps))
    }

    /// Median over rounds of the proxy CPU per request of one setup in one
    /// cell (closed loop), microseconds.
    pub fn median_cpu(&self, setup: Setup, mode: ConnMode, conc: usize) -> Option<f64> {
        median_of(&self.throughput, setup, mode, conc, |s| {
            s.proxy_cpu_us_per_req
        })
    }

    /// Per-round ratios of proxy CPU per request num/den in one cell.
    pub fn cpu_ratios(&self, num: Setup, den: Setup, mode: ConnMode, conc: usize) -> Vec<f64> {
        self.per_round(&self.throughput, num, den, mode, conc, |a, b| {
            let (a, b) = (a.proxy_cpu_us_per_req?, b.proxy_cpu_us_per_req?);
            (b > 0.0).then(|| a / b)
        })
    }
}

/// The throughput goals: (c) against mitmproxy, the exit and (d), and the
/// p99 (c) adds over (b) below saturation and saturated.
pub fn goals(results: &Results) -> Vec<Goal> {
    let show = |unit: &'static str| move |cell: &str, v: f64| format!("{cell}: {v:.2}{unit}");
    let all_cells = |num: Setup, den: Setup, only: Option<ConnMode>| -> Vec<(String, f64)> {
        CELLS
            .iter()
            .filter(|(mode, _)| only.is_none_or(|o| o == *mode))
            .filter_map(|&(mode, conc)| {
                median(&results.rps_ratios(num, den, mode, conc))
                    .map(|v| (format!("{} c={conc}", mode.label()), v))
            })
            .collect()
    };

    let e = all_cells(Setup::Pinproxy, Setup::Mitmproxy, None);
    let mut vs_mitmproxy = Goal::over(
        format!("(c) ≥ {GOAL_VS_MITMPROXY}× mitmproxy's requests/s, every cell"),
        &e,
        show("×"),
        |v| v >= GOAL_VS_MITMPROXY,
    );
    if e.is_empty() {
        vs_mitmproxy.measured = format!("not measured: mitmproxy {}", results.machine.mitmproxy);
    }
    let b = all_cells(Setup::Pinproxy, Setup::Exit, Some(ConnMode::KeepAlive));
    let vs_exit = Goal::over(
        format!("(c)/(b) ≥ {GOAL_VS_EXIT_KEEPALIVE} with keep-alive"),
        &b,
        show(""),
        |v| v >= GOAL_VS_EXIT_KEEPALIVE,
    );
    let d = all_cells(Setup::PinproxyCookies, Setup::Pinproxy, None);
    let cookies = Goal::over(
        format!("(d)/(c) ≥ {GOAL_COOKIES}, every cell"),
        &d,
        show(""),
        |v| v >= GOAL_COOKIES,
    );
    let s = &results.settings;
    let fixed: Vec<(String, f64)> = median(&results.p99_added_ms(
        &results.fixed_rate,
        Setup::Pinproxy,
        Setup::Exit,
        ConnMode::KeepAlive,
        s.fixed_rate_concurrency,
    ))
    .map(|v| {
        (
            format!(
                "keep-alive c={} at {:.0} req/s",
                s.fixed_rate_concurrency, s.fixed_rate
            ),
            v,
        )
    })
    .into_iter()
    .collect();
    let below_saturation = Goal::over(
        format!(
            "p99 added by (c) over (b) < {GOAL_ADDED_P99_MS} ms at concurrency 32, below saturation"
        ),
        &fixed,
        show(" ms"),
        |v| v < GOAL_ADDED_P99_MS,
    );
    let saturated: Vec<(String, f64)> = [ConnMode::KeepAlive, ConnMode::NewConn]
        .iter()
        .filter_map(|&mode| {
            let added =
                results.p99_added_ms(&results.throughput, Setup::Pinproxy, Setup::Exit, mode, 32);
            median(&added).map(|v| (format!("{} c=32", mode.label()), v))
        })
        .collect();
    let saturated = Goal::over(
        format!(
            "p99 added by (c) over (b) < {GOAL_ADDED_P99_MS} ms at concurrency 32, saturated \
             (closed loop)"
        ),
        &saturated,
        show(" ms"),
        |v| v < GOAL_ADDED_P99_MS,
    );
    let cpu: Vec<(String, f64)> = median(&results.cpu_ratios(
        Setup::PinproxyDirect,
        Setup::Hudsucker,
        ConnMode::KeepAlive,
        32,
    ))
    .map(|v| ("keep-alive c=32".to_owned(), v))
    .into_iter()
    .collect();
    let mut vs_peer = Goal::over(
        "proxy CPU per request of (g) (pinproxy, direct exit) ≤ (f)'s (hudsucker), keep-alive \
         c=32"
            .to_owned(),
        &cpu,
        |cell, v| {
            let us = |setup| {
                results
                    .median_cpu(setup, ConnMode::KeepAlive, 32)
                    .map_or("–".into(), |v| format!("{v:.0}"))
            };
            format!(
                "{cell}: {} vs {} µs ({v:.2}×)",
                us(Setup::PinproxyDirect),
                us(Setup::Hudsucker)
            )
        },
        |v| v <= GOAL_CPU_VS_PEER,
    );
    if cpu.is_empty() && results.machine.peer.starts_with("not") {
        vs_peer.measured = format!("not measured: the peer is {}", results.machine.peer);
    }
    vec![
        vs_mitmproxy,
        vs_exit,
        cookies,
        below_saturation,
        saturated,
        vs_peer,
    ]
}

/// The chapter: ratios, the (c′) and (d) notes, requests/s and latency per
/// setup, and latency below saturation.
pub fn section(results: &Results, out: &mut String) {
    let s = &results.settings;
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
        let cell = |num, den| fmt_ratio(&results.rps_ratios(num, den, mode, conc));
        let added = results.p99_added_ms(
            &results.throughput,
            Setup::Pinproxy,
            Setup::Exit,
            mode,
            conc,
        );
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

    peer_table(results, out);

    let wide: Vec<String> = CELLS
        .iter()
        .filter_map(|&(mode, conc)| {
            let r = results.rps_ratios(Setup::PinproxyWidePool, Setup::Pinproxy, mode, conc);
            let b = results.rps_ratios(Setup::PinproxyWidePool, Setup::Exit, mode, conc);
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
         for (b), pinproxy for (c) in each mode, (c′), (d) and (g), mitmproxy for (e), \
         hudsucker for (f)) per request. *SYN \
         drops* counts, over all rounds, connections the kernel dropped because a \
         listener's accept queue was full (`ListenOverflows`); each costs its client a 1 s \
         retransmission, which shows in p99. The origin and the exit listen with a backlog \
         of 4096, so drops in a proxied setup are the proxy's.\n"
    );
    setup_table(out, &results.throughput, &CELLS);
    let _ = writeln!(out);

    if !results.fixed_rate.is_empty() {
        let _ = writeln!(out, "### Latency below saturation\n");
        let _ = writeln!(
            out,
            "Closed-loop runs saturate the 2-core machine, so their latency mostly measures \
             queueing behind the CPU. Here {} keep-alive clients are paced to {:.0} \
             requests/s in total (open loop: a request held up by slow earlier ones counts \
             from when it was due), well below the capacity of (a)–(d), (f) and (g); \
             mitmproxy is left out, as it cannot sustain that rate, and so are (c′) and the \
             other fingerprint modes of (c), which only differ saturated. Each run lasts \
             {:.1} s, so {:.0} requests lie above a run's p99.\n",
            s.fixed_rate_concurrency,
            s.fixed_rate,
            s.fixed_rate_secs.unwrap_or(s.secs),
            s.fixed_rate * s.fixed_rate_secs.unwrap_or(s.secs) / 100.0
        );
        let cell = (ConnMode::KeepAlive, s.fixed_rate_concurrency);
        setup_table(out, &results.fixed_rate, &[cell]);
        let added = results.p99_added_ms(
            &results.fixed_rate,
            Setup::Pinproxy,
            Setup::Exit,
            cell.0,
            cell.1,
        );
        let _ = writeln!(
            out,
            "\np99 added by (c) over (b): {}.\n",
            fmt_range(&added, " ms")
        );
    }
}

/// The comparison with the peer: pinproxy through its exit (c) and with its
/// direct exit (g) against hudsucker (f), requests/s and proxy CPU.
fn peer_table(results: &Results, out: &mut String) {
    let measured = CELLS
        .iter()
        .any(|&(mode, conc)| results.median_rps(Setup::Hudsucker, mode, conc).is_some());
    let _ = writeln!(out, "### Against the peer: hudsucker\n");
    if !measured {
        let _ = writeln!(
            out,
            "Not measured in this run: the hudsucker peer is {}.\n",
            results.machine.peer
        );
        return;
    }
    let _ = writeln!(
        out,
        "(f) is a plain MITM on the published hudsucker crate ({}; hyper 1, rustls, rcgen: \
         pinproxy's client-facing stack) with a no-op handler, no exit and no pinning, going \
         straight to the origin; (g) is pinproxy on that same path, with its built-in direct \
         exit. (g)/(f) is what pinning costs over the fastest plain MITM on the same stack; \
         (c)/(f) adds pinproxy's exit hop. CPU is the proxy's own per request (medians over \
         rounds, µs).\n",
        results.machine.peer
    );
    let _ = writeln!(
        out,
        "| connections | concurrency | (c)/(f) | (g)/(f) | CPU (g) | CPU (f) | CPU (g)/(f) |"
    );
    let _ = writeln!(out, "| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    for &(mode, conc) in &CELLS {
        let cell = |num, den| fmt_ratio(&results.rps_ratios(num, den, mode, conc));
        let cpu = |setup| {
            results
                .median_cpu(setup, mode, conc)
                .map_or("–".into(), |v| format!("{v:.0}"))
        };
        let _ = writeln!(
            out,
            "| {} | {conc} | {} | {} | {} | {} | {} |",
            mode.label(),
            cell(Setup::Pinproxy, Setup::Hudsucker),
            cell(Setup::PinproxyDirect, Setup::Hudsucker),
            cpu(Setup::PinproxyDirect),
            cpu(Setup::Hudsucker),
            fmt_ratio(&results.cpu_ratios(Setup::PinproxyDirect, Setup::Hudsucker, mode, conc)),
        );
    }
    let _ = writeln!(
        out,
        "\nWith a new connection per request, (f) opens an upstream connection for every \
         request while pinproxy pools upstream connections across client connections; the \
         *Mirror mode's cost* chapter measures pinproxy with that pool forced cold.\n"
    );
}

/// A table of requests/s and latency, one row per cell of `cells` and
/// setup measured in it, from the samples in `list`.
fn setup_table(out: &mut String, list: &[Sample], cells: &[(ConnMode, usize)]) {
    let _ = writeln!(
        out,
        "| connections | concurrency | setup | req/s | p50 ms | p99 ms | errors | SYN drops | proxy CPU µs/req |"
    );
    let _ = writeln!(
        out,
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for &(mode, conc) in cells {
        for setup in Setup::ALL {
            if samples(list, setup, mode, conc).next().is_some() {
                setup_row(out, list, setup, mode, conc);
            }
        }
    }
}

/// One setup's row: medians over rounds, errors and drops summed.
fn setup_row(out: &mut String, list: &[Sample], setup: Setup, mode: ConnMode, conc: usize) {
    let med = |f: &dyn Fn(&Sample) -> Option<f64>| median_of(list, setup, mode, conc, f);
    let errors: u64 = samples(list, setup, mode, conc)
        .map(|s| s.result.errors)
        .sum();
    let ok: u64 = samples(list, setup, mode, conc).map(|s| s.result.ok).sum();
    let rps = med(&|s| Some(s.result.rps));
    let p50 = med(&|s| (s.result.ok > 0).then(|| f64::from(s.result.p50_us) / 1000.0));
    let p99 = med(&|s| (s.result.ok > 0).then(|| f64::from(s.result.p99_us) / 1000.0));
    let cpu = med(&|s| s.proxy_cpu_us_per_req);
    let drops: u64 = samples(list, setup, mode, conc)
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
