//! The HTTP/2 phase (in the report's throughput chapter): pinproxy with its
//! built-in direct exit (g) and the hudsucker peer (f) with HTTP/2 on every
//! leg, as a browser's traffic is: the client offers h2 alone, both proxies
//! answer it in h2, and an origin of the phase's own offers h2 first, which
//! pinproxy's `mirror` mode (the client's ALPN) and the peer's client (h2
//! and HTTP/1.1) both take. The shared origin offers HTTP/1.1 alone, so
//! that the peer speaks HTTP/1.1 upstream in the other phases, as pinproxy
//! does there.
//!
//! In the first cells each client sends one request at a time on its own
//! connection, as in the throughput matrix, so the figures compare with its
//! keep-alive rows; the last cell puts 32 clients on one connection, a
//! stream each, as a browser multiplexes a page's requests.

use std::fmt::Write as _;

use anyhow::Result;

use super::servers::{run_load, start_origin, LoadPlan, PinproxyOptions, Server};
use super::throughput::{cpu_per_request, errors_said, Sample, Setup};
use super::{Phase, Suite, BODY_BYTES};
use crate::load::ConnMode;
use crate::procfs;
use crate::report::{group, Goal, Results};
use crate::stats::median;

/// The HTTP/2 phase.
pub const PHASE: Phase = Phase {
    key: "http2",
    name: "HTTP/2",
    chapter: None,
    run,
    goals,
    render,
};

/// The cells measured, keep-alive, in table order.
const CELLS: [Cell; 4] = [
    Cell {
        conc: 1,
        streams: 1,
    },
    Cell {
        conc: 32,
        streams: 1,
    },
    Cell {
        conc: 256,
        streams: 1,
    },
    Cell {
        conc: 32,
        streams: 32,
    },
];

/// The setups, in table order.
const SETUPS: [Setup; 2] = [Setup::PinproxyDirect, Setup::Hudsucker];

/// Starts the phase's origin and both proxies, then measures them in
/// interleaved rounds.
fn run(suite: &mut Suite) -> Result<()> {
    let origin = start_origin(
        &suite.exe,
        "origin (h2)",
        suite.dir.join("origin-h2-ca.pem"),
        &["--body-bytes", &BODY_BYTES.to_string(), "--http2"],
    )?;
    let origin_ca = origin.ca()?.to_owned();
    let pinproxy = suite.start_pinproxy_with(
        "pinproxy-direct-h2",
        PinproxyOptions {
            direct: true,
            upstream_ca: Some(origin_ca.clone()),
            ..PinproxyOptions::default()
        },
    )?;
    let peer = match suite.config.peer {
        Some(_) => {
            let launch = suite.peer_launch("hudsucker-peer-h2", &origin_ca)?;
            Some(launch.start("hudsucker-peer-h2", std::time::Duration::from_secs(30))?)
        }
        None => {
            let note = "the hudsucker peer was not built, so the HTTP/2 table has (g) alone";
            suite.progress.say(note);
            suite.results.notes.push(note.into());
            None
        }
    };
    let server = |setup: Setup| match setup {
        Setup::Hudsucker => peer.as_ref(),
        _ => Some(&pinproxy),
    };
    let mut samples = Vec::new();
    for round in 0..suite.config.rounds {
        for cell in CELLS {
            let mut order = SETUPS.to_vec();
            if round % 2 == 1 {
                order.reverse();
            }
            for setup in order {
                let Some(proxy) = server(setup) else {
                    continue;
                };
                samples.push(measure(suite, &origin, proxy, setup, cell, round)?);
            }
        }
    }
    suite.results.http2 = samples;
    Ok(())
}

/// A cell of the table: clients, and clients per connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cell {
    conc: usize,
    streams: usize,
}

impl Cell {
    /// The cell's label in the table.
    fn label(self) -> String {
        match self.streams {
            1 => format!("c={}", self.conc),
            n => format!("c={}, {n} streams a connection", self.conc),
        }
    }

    /// Whether `sample` was measured in this cell.
    fn holds(self, sample: &Sample) -> bool {
        sample.concurrency == self.conc && sample.streams.unwrap_or(1) == self.streams
    }
}

/// One closed-loop run of `setup` through `proxy` over HTTP/2, with the
/// proxy's CPU time.
fn measure(
    suite: &Suite,
    origin: &Server,
    proxy: &Server,
    setup: Setup,
    cell: Cell,
    round: usize,
) -> Result<Sample> {
    let ca = proxy.ca()?;
    let plan = LoadPlan {
        proxy: Some((proxy.addr, ca)),
        concurrency: cell.conc,
        secs: suite.config.secs,
        http2: true,
        streams: cell.streams,
        ..LoadPlan::new(origin, suite.config.max_requests)
    };
    let ticks = procfs::ticks_per_second() as f64;
    let before = proxy.proc.sample()?;
    let result = run_load(suite.load_command(&plan)?)?;
    let after = proxy.proc.sample()?;
    let cpu = cpu_per_request(Some(before), Some(after), ticks, &result);
    suite.progress.say(format!(
        "round {}/{} h2 keep-alive {:<28} ({}) {:>7.0} req/s p99 {:>7.2} ms{}",
        round + 1,
        suite.config.rounds,
        cell.label(),
        setup.letter(),
        result.rps,
        f64::from(result.p99_us) / 1000.0,
        errors_said(&result)
    ));
    Ok(Sample {
        setup,
        mode: ConnMode::KeepAlive,
        concurrency: cell.conc,
        round,
        result,
        proxy_cpu_us_per_req: cpu,
        listen_overflows: 0,
        streams: (cell.streams > 1).then_some(cell.streams),
    })
}

/// No goal of its own: the goals are stated over HTTP/1.1.
fn goals(_results: &Results) -> Vec<Goal> {
    Vec::new()
}

/// Per cell: the medians of each setup and of the per-round ratios.
struct Figures {
    cell: Cell,
    rps: [Option<f64>; 2],
    cpu: [Option<f64>; 2],
    p99_ms: [Option<f64>; 2],
    /// (g) over (f) within each round, then the median.
    rps_ratio: Option<f64>,
    cpu_ratio: Option<f64>,
}

/// The figures of `samples`, cell by cell.
fn figures(samples: &[Sample]) -> Vec<Figures> {
    let of = |setup: Setup, cell: Cell| {
        samples
            .iter()
            .filter(move |s| s.setup == setup && cell.holds(s))
    };
    let med = |values: Vec<f64>| median(&values);
    CELLS
        .into_iter()
        .map(|cell| {
            let per_setup = |f: &dyn Fn(&Sample) -> Option<f64>| {
                SETUPS.map(|setup| med(of(setup, cell).filter_map(f).collect()))
            };
            let ratio = |f: &dyn Fn(&Sample) -> Option<f64>| {
                let ratios = of(Setup::PinproxyDirect, cell)
                    .filter_map(|g| {
                        let f_sample = of(Setup::Hudsucker, cell).find(|s| s.round == g.round)?;
                        let (g, f) = (f(g)?, f(f_sample)?);
                        (f > 0.0).then(|| g / f)
                    })
                    .collect();
                med(ratios)
            };
            let rps = |s: &Sample| Some(s.result.rps);
            let cpu = |s: &Sample| s.proxy_cpu_us_per_req;
            Figures {
                cell,
                rps: per_setup(&rps),
                cpu: per_setup(&cpu),
                p99_ms: per_setup(&|s: &Sample| Some(f64::from(s.result.p99_us) / 1000.0)),
                rps_ratio: ratio(&rps),
                cpu_ratio: ratio(&cpu),
            }
        })
        .collect()
}

/// The HTTP/2 table.
fn render(results: &Results, out: &mut String) {
    if results.http2.is_empty() {
        return;
    }
    let rounds = results.http2.iter().map(|s| s.round).max().unwrap_or(0) + 1;
    let _ = writeln!(out, "### HTTP/2 on every leg\n");
    let _ = writeln!(
        out,
        "(g) and (f) with HTTP/2 from the client to the origin: the client offers h2 alone, \
         and an origin of this table's own offers h2 first (pinproxy's `mirror` mode offers \
         upstream what the client offered; the peer's client offers h2 and HTTP/1.1). Each \
         client sends one request at a time, on its own connection as in the keep-alive rows \
         above, or in the last row with 32 clients on one connection, a stream each, as a \
         browser multiplexes a page's requests. Medians of {rounds} interleaved rounds; the ratios are taken within each round. \
         CPU is the proxy's, per request.\n"
    );
    let _ = writeln!(
        out,
        "| keep-alive | (g) req/s | (f) req/s | (g)/(f) req/s | (g) CPU µs | (f) CPU µs | \
         (g)/(f) CPU | (g) p99 ms | (f) p99 ms |"
    );
    let _ = writeln!(
        out,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    let show = |v: Option<f64>, f: &dyn Fn(f64) -> String| v.map_or("–".into(), f);
    for cell in figures(&results.http2) {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            cell.cell.label(),
            show(cell.rps[0], &|v| group(v as u64)),
            show(cell.rps[1], &|v| group(v as u64)),
            show(cell.rps_ratio, &|v| format!("{v:.2}")),
            show(cell.cpu[0], &|v| format!("{v:.0}")),
            show(cell.cpu[1], &|v| format!("{v:.0}")),
            show(cell.cpu_ratio, &|v| format!("{v:.2}")),
            show(cell.p99_ms[0], &|v| format!("{v:.2}")),
            show(cell.p99_ms[1], &|v| format!("{v:.2}")),
        );
    }
    let _ = writeln!(out);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::LoadResult;

    fn sample(setup: Setup, conc: usize, round: usize, rps: f64, cpu: f64) -> Sample {
        Sample {
            setup,
            mode: ConnMode::KeepAlive,
            concurrency: conc,
            round,
            result: LoadResult {
                ok: 100,
                rps,
                ..LoadResult::default()
            },
            proxy_cpu_us_per_req: Some(cpu),
            listen_overflows: 0,
            streams: None,
        }
    }

    #[test]
    fn ratios_are_taken_within_rounds_then_the_median() {
        let samples = [
            sample(Setup::PinproxyDirect, 32, 0, 100.0, 40.0),
            sample(Setup::Hudsucker, 32, 0, 50.0, 20.0),
            sample(Setup::PinproxyDirect, 32, 1, 300.0, 30.0),
            sample(Setup::Hudsucker, 32, 1, 300.0, 30.0),
            sample(Setup::PinproxyDirect, 32, 2, 90.0, 45.0),
            sample(Setup::Hudsucker, 32, 2, 60.0, 30.0),
        ];
        let mut one_connection = sample(Setup::PinproxyDirect, 32, 0, 1.0, 1.0);
        one_connection.streams = Some(32);
        let mut samples = samples.to_vec();
        samples.push(one_connection);
        let cells = figures(&samples);
        let c32 = cells
            .iter()
            .find(|c| {
                c.cell
                    == Cell {
                        conc: 32,
                        streams: 1,
                    }
            })
            .unwrap();
        // Ratios per round: 2.0, 1.0, 1.5.
        assert_eq!(c32.rps_ratio, Some(1.5));
        // CPU ratios: 2.0, 1.0, 1.5.
        assert_eq!(c32.cpu_ratio, Some(1.5));
        assert_eq!(c32.rps, [Some(100.0), Some(60.0)]);
        let c1 = cells.iter().find(|c| c.cell.conc == 1).unwrap();
        assert_eq!(c1.rps_ratio, None);
        // The multiplexed run is a cell of its own.
        let shared = cells
            .iter()
            .find(|c| {
                c.cell
                    == Cell {
                        conc: 32,
                        streams: 32,
                    }
            })
            .unwrap();
        assert_eq!(shared.rps, [Some(1.0), None]);
    }
}
