//! The idle-tunnel phase, which opens the report's scale chapter: a fresh
//! pinproxy per count holds that many `CONNECT` + TLS tunnels open and idle
//! (through `pinbench tunnels`), and its memory and CPU are read before, with
//! the tunnels idle, after one request in each and after closing them. A
//! reference row holds idle TLS connections to a bare test origin instead,
//! for scale.

use std::fmt::Write as _;
use std::thread;
use std::time::Duration;

use anyhow::Result;
use serde::{Deserialize, Serialize};

use super::procs::Proc;
use super::servers::{start_origin, Server};
use super::{Phase, Suite};
use crate::load::ConnMode;
use crate::procfs;
use crate::report::{group, mib, per, Goal, Results};
use crate::tunnels::StepReport;

/// The idle-tunnel phase; it opens the report's scale chapter.
pub const PHASE: Phase = Phase {
    key: "tunnels",
    name: "idle tunnels",
    chapter: Some("3. Scale"),
    run,
    goals,
    render,
};

/// Bytes of RSS per idle tunnel.
const GOAL_TUNNEL_BYTES: f64 = 10.0 * 1024.0;
/// RSS per keep-alive tunnel idle again after one request (issue 14: release
/// or size the per-connection buffers once idle).
const GOAL_USED_TUNNEL_BYTES: f64 = 12.0 * 1024.0;

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

impl TunnelRow {
    /// RSS growth per tunnel opened, with the tunnels idle, in bytes.
    pub fn idle_bytes_per_tunnel(&self) -> f64 {
        per(self.rss_idle, self.rss_before, self.opened)
    }

    /// RSS growth per tunnel opened, after one request in each, in bytes.
    pub fn request_bytes_per_tunnel(&self) -> f64 {
        per(self.rss_after_request, self.rss_before, self.opened)
    }
}

/// Runs the phase: the reference row at the first count, then a fresh
/// pinproxy per count.
fn run(suite: &mut Suite) -> Result<()> {
    let counts = suite.config.tunnel_counts.clone();
    // The reference first: idle TLS connections to a fresh origin.
    if let Some(&count) = counts.first() {
        let ca = suite.dir.join("reference-ca.pem");
        let reference = start_origin(&suite.exe, "reference origin", ca, &[])?;
        let row = hold(suite, &reference, count, true)?;
        suite.results.tunnels.push(row);
    }
    for count in counts {
        // No idle tunnel may be closed by the idle limit
        // (timeouts.client_idle, 60 s) or a head's limit while the large
        // counts are opened and held.
        let proxy = suite.start_pinproxy(
            "pinproxy-tunnels",
            Some("[timeouts]\nheader_read = \"10m\"\nclient_idle = \"10m\"\n"),
        )?;
        let row = hold(suite, &proxy, count, false)?;
        suite.results.tunnels.push(row);
    }
    Ok(())
}

/// Holds `count` idle tunnels through `server` (or, for the reference,
/// idle TLS connections straight to it) and measures it.
fn hold(suite: &mut Suite, server: &Server, count: usize, reference: bool) -> Result<TunnelRow> {
    let ticks = procfs::ticks_per_second() as f64;
    let ca = server.ca()?;
    let (port, proxy) = if reference {
        (server.addr.port(), None)
    } else {
        (suite.origin.addr.port(), Some(server.addr))
    };
    let mut cmd = suite.target_command("tunnels", port, ca, proxy)?;
    cmd.args(["--count", &count.to_string()])
        .args(["--parallel", "64"])
        .args(["--hold-secs", "300"]);
    if !reference {
        // Warm up: the leaf is minted, the upstream pool and runtime are up.
        suite.load(
            Some((server.addr, ca)),
            ConnMode::KeepAlive,
            8,
            0.5,
            None,
            None,
        )?;
    }
    thread::sleep(Duration::from_millis(500));
    let base = server.proc.sample()?;
    let mut holder = Proc::spawn("tunnel holder", &mut cmd, true, true, None)?;
    let opened: StepReport = holder.next_json(Duration::from_secs(240))?;
    thread::sleep(Duration::from_millis(1000));
    let idle = server.proc.sample()?;
    thread::sleep(Duration::from_secs(3));
    let idle_end = server.proc.sample()?;
    holder.send("request")?;
    let requested: StepReport = holder.next_json(Duration::from_secs(240))?;
    // Idle again for longer than pinproxy waits before it parks an idle
    // connection (1 to 2 s, releasing hyper's buffers), so the sample is of
    // idle tunnels rather than of ones that have just answered.
    thread::sleep(Duration::from_millis(3000));
    let after_request = server.proc.sample()?;
    holder.send("close")?;
    let _ = holder.next_line(Duration::from_secs(60));
    holder.finish(Duration::from_secs(10));
    thread::sleep(Duration::from_millis(1000));
    let closed = server.proc.sample()?;
    let row = TunnelRow {
        reference,
        count,
        opened: opened.ok,
        failed: opened.failed,
        open_secs: opened.secs,
        rss_before: base.rss_bytes,
        rss_idle: idle.rss_bytes,
        rss_after_request: after_request.rss_bytes,
        requested_ok: requested.ok,
        rss_closed: closed.rss_bytes,
        threads: idle.threads,
        idle_cpu_percent: idle_end.cpu_ticks.saturating_sub(idle.cpu_ticks) as f64 / ticks / 3.0
            * 100.0,
        open_cpu_us_per_tunnel: if opened.ok > 0 {
            idle.cpu_us_since(&base, ticks) / opened.ok as f64
        } else {
            0.0
        },
        first_error: opened.first_error.or(requested.first_error),
    };
    suite.progress.say(format!(
        "{}{count} tunnels: opened {} in {:.1} s, RSS {:.1} → {:.1} MiB idle, {:.1} MiB after a request each ({} ok)",
        if reference { "reference: " } else { "" },
        row.opened,
        row.open_secs,
        row.rss_before as f64 / 1048576.0,
        row.rss_idle as f64 / 1048576.0,
        row.rss_after_request as f64 / 1048576.0,
        row.requested_ok
    ));
    if row.failed > 0 || row.requested_ok < row.opened {
        suite.results.notes.push(format!(
            "{count} tunnels: {} failed to open, {} of {} requests succeeded; first error: {}",
            row.failed,
            row.requested_ok,
            row.opened,
            row.first_error.clone().unwrap_or_default()
        ));
    }
    Ok(row)
}

/// The pinproxy rows against the per-tunnel goals: a fresh idle tunnel, and
/// one idle again after a request.
fn goals(results: &Results) -> Vec<Goal> {
    let cells = |f: fn(&TunnelRow) -> f64| -> Vec<(String, f64)> {
        results
            .tunnels
            .iter()
            .filter(|t| t.opened > 0 && !t.reference)
            .map(|t| (format!("{} tunnels", group(t.count as u64)), f(t)))
            .collect()
    };
    let show = |cell: &str, v: f64| format!("{cell}: {:.1} KiB", v / 1024.0);
    vec![
        Goal::over(
            format!(
                "< {} KiB RSS per idle tunnel (fresh, no request yet)",
                GOAL_TUNNEL_BYTES / 1024.0
            ),
            &cells(TunnelRow::idle_bytes_per_tunnel),
            show,
            |v| v < GOAL_TUNNEL_BYTES,
        ),
        Goal::over(
            format!(
                "< {} KiB RSS per keep-alive tunnel idle after a request",
                GOAL_USED_TUNNEL_BYTES / 1024.0
            ),
            &cells(TunnelRow::request_bytes_per_tunnel),
            show,
            |v| v < GOAL_USED_TUNNEL_BYTES,
        ),
    ]
}

/// The idle-tunnel table.
fn render(results: &Results, out: &mut String) {
    let _ = writeln!(out, "### Idle tunnels\n");
    let _ = writeln!(
        out,
        "A fresh pinproxy per row. The tunnels are `CONNECT` + TLS through pinproxy, held \
         idle; *after a request* is after one GET in every tunnel, the tunnels idle again (sampled 3 s after the last answer: pinproxy parks a connection 1 to 2 s into its idleness). \
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
    for t in &results.tunnels {
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
            t.idle_bytes_per_tunnel() / 1024.0,
            mib(t.rss_after_request),
            t.request_bytes_per_tunnel() / 1024.0,
            t.idle_cpu_percent,
            t.open_cpu_us_per_tunnel,
            mib(t.rss_closed),
        );
    }
    let _ = writeln!(out);
}
