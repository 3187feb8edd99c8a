//! The pin phase, pins and identities (in the report's scale chapter). Pins:
//! one fresh pinproxy filled through its proxy port (by `pinbench pins`) to
//! each cumulative level, every worker's pins joining one identity, so the
//! figures are the pins' own memory and CPU. Its memory is read twice: as
//! RSS, and, when `bench/run.sh` built `libpinbench-heap.so`
//! (`bench/heapcount`), as the live bytes of its heap, counted by that
//! library preloaded into it. A few hundred bytes per pin are below the
//! noise of RSS at 10,000 pins (pages touched and returned, arenas), not
//! below the allocator's count, so the goal is held to the heap figure when
//! there is one. Identities: another fresh pinproxy gets one request with
//! one new cookie per identity, each identity with its own upstream
//! connection.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::thread;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use serde::{Deserialize, Serialize};

use super::procs::Proc;
use super::servers::{fill, FillerPlan, PinproxyOptions, Server};
use super::{Phase, Suite};
use crate::pins::FillReport;
use crate::procfs;
use crate::report::{group, mib, per, Goal, Results};

/// The pin and identity phase.
pub const PHASE: Phase = Phase {
    key: "pins",
    name: "pins",
    chapter: None,
    run,
    goals,
    render,
};

/// Bytes per live pin.
const GOAL_PIN_BYTES: f64 = 300.0;

/// Connections creating identities in the identity measurement.
const IDENTITY_CONCURRENCY: usize = 32;

/// Pins held by one pinproxy, cumulatively.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PinRow {
    /// Pins created beyond the warm-up.
    pub pins: u64,
    /// RSS growth over the baseline, bytes.
    pub rss_growth: u64,
    /// Growth of the live heap bytes over the baseline (the preloaded
    /// counter), when counted.
    #[serde(default)]
    pub heap_growth: Option<u64>,
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

/// One round of identity churn (see [`churn`]).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ChurnRow {
    /// Round number, from 1.
    pub round: usize,
    /// Identities founded in the round (one request each).
    pub identities: u64,
    /// Live heap over the baseline once they were founded, bytes.
    pub heap_founded: i64,
    /// Live heap over the baseline once they were retired and forgotten
    /// (and their upstream connections closed), bytes.
    pub heap_forgotten: i64,
    /// Requests that failed.
    pub failed: u64,
}

impl PinRow {
    /// Bytes per pin the goal is held to: heap growth per pin when the heap
    /// was counted, else RSS growth per pin (0 without pins).
    pub fn bytes_per_pin(&self) -> f64 {
        self.heap_bytes_per_pin()
            .unwrap_or_else(|| self.rss_bytes_per_pin())
    }

    /// RSS growth per pin, bytes (0 without pins).
    pub fn rss_bytes_per_pin(&self) -> f64 {
        if self.pins > 0 {
            self.rss_growth as f64 / self.pins as f64
        } else {
            0.0
        }
    }

    /// Live heap growth per pin, bytes, when counted.
    pub fn heap_bytes_per_pin(&self) -> Option<f64> {
        let heap = self.heap_growth?;
        (self.pins > 0).then(|| heap as f64 / self.pins as f64)
    }
}

/// The live heap bytes of a process started with the heap-counting
/// library, read from its counter file.
struct HeapCounter {
    file: PathBuf,
}

impl HeapCounter {
    /// The counter's value now (a native-endian i64 at the file's start).
    fn read(&self) -> Result<i64> {
        let bytes = std::fs::read(&self.file)
            .with_context(|| format!("reading {}", self.file.display()))?;
        let head: [u8; 8] = bytes
            .get(..8)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| anyhow!("{} is shorter than 8 bytes", self.file.display()))?;
        Ok(i64::from_ne_bytes(head))
    }

    /// The counter without what comes and goes after a fill: the durable
    /// store commits the fill's pins in the background and holds that
    /// commit's buffers (megabytes) for a moment, at a time no fixed wait
    /// catches reliably. Those only add, so the least of reads every 100 ms
    /// over [`HEAP_WINDOW_READS`] reads is the heap at rest.
    fn settled(&self) -> Result<i64> {
        let mut least = self.read()?;
        for _ in 1..HEAP_WINDOW_READS {
            thread::sleep(Duration::from_millis(100));
            least = least.min(self.read()?);
        }
        Ok(least)
    }
}

/// Reads of the heap counter, 100 ms apart, after each fill.
const HEAP_WINDOW_READS: usize = 30;

/// Starts the pin phase's pinproxy, with the heap counter preloaded when
/// the library was built (and its counter file then exists once it runs).
fn start_counted(
    suite: &mut Suite,
    name: &str,
    options: &PinproxyOptions,
) -> Result<(Server, Option<HeapCounter>)> {
    let mut launch = suite.pinproxy_launch(name, options)?;
    let counter = suite.config.heap_counter.clone().map(|lib| {
        let file = suite.dir.join(format!("{name}-heap.bin"));
        let _ = std::fs::remove_file(&file);
        launch
            .cmd
            .env("LD_PRELOAD", lib)
            .env("PINBENCH_HEAP_COUNTER", &file);
        HeapCounter { file }
    });
    let server = launch.start(name, Duration::from_secs(30))?;
    let counter = match counter {
        Some(counter) => match counter.read() {
            Ok(_) => Some(counter),
            Err(e) => {
                let note = format!("heap counter not readable, bytes per pin are RSS: {e:#}");
                suite.progress.say(&note);
                suite.results.notes.push(note);
                None
            }
        },
        None => None,
    };
    Ok((server, counter))
}

/// Runs the phase: the pin fill, then the identities.
fn run(suite: &mut Suite) -> Result<()> {
    fill_pins(suite)?;
    identities(suite)?;
    churn(suite)
}

/// Fills one pinproxy to each of the pin levels and measures it at each.
fn fill_pins(suite: &mut Suite) -> Result<()> {
    let ticks = procfs::ticks_per_second() as f64;
    let (proxy, heap) = start_counted(suite, "pinproxy-pins", &PinproxyOptions::default())?;
    let concurrency = suite.config.pin_concurrency;
    let per_request = suite.config.pins_per_request;
    let mut filler = spawn_filler(suite, &proxy, concurrency, per_request, true)?;
    // Two requests per connection carrying only its anchor cookie, so every
    // connection, its identity and that identity's upstream connection exist
    // before the baseline, holding one pin each: the growth is then that of
    // (almost) all live pins, the pin tables' doublings included.
    filler.send("warm 2")?;
    let warm: FillReport = filler.next_json(Duration::from_secs(330))?;
    thread::sleep(Duration::from_millis(500));
    let base = proxy.proc.sample()?;
    let heap_base = heap.as_ref().map(HeapCounter::settled).transpose()?;
    let mut made = 0u64;
    for &level in &suite.config.pin_levels.clone() {
        let before = proxy.proc.sample()?;
        let report = fill(&mut filler, level.saturating_sub(made))?;
        made += report.pins;
        thread::sleep(Duration::from_millis(500));
        let after = proxy.proc.sample()?;
        let heap_now = heap.as_ref().map(HeapCounter::settled).transpose()?;
        let row = PinRow {
            pins: made,
            rss_growth: after.rss_bytes.saturating_sub(base.rss_bytes),
            heap_growth: heap_now
                .zip(heap_base)
                .map(|(now, base)| u64::try_from(now.saturating_sub(base)).unwrap_or(0)),
            pins_per_sec: report.pins as f64 / report.secs.max(1e-9),
            cpu_us_per_pin: after.cpu_us_since(&before, ticks) / report.pins.max(1) as f64,
            failed: report.failed,
        };
        suite.progress.say(format!(
            "{made} pins: RSS +{:.1} MiB ({:.0} B/pin), heap {}, {:.0} pins/s",
            row.rss_growth as f64 / 1048576.0,
            row.rss_bytes_per_pin(),
            match (heap_base, heap_now, row.heap_bytes_per_pin()) {
                (Some(base), Some(now), Some(per)) => format!(
                    "{:.1} → {:.1} MiB ({per:.0} B/pin)",
                    base as f64 / 1048576.0,
                    now as f64 / 1048576.0
                ),
                _ => "not counted".into(),
            },
            row.pins_per_sec
        ));
        let what = format!("pin fill to {level}");
        note_failed(suite, &what, report.failed, report.first_error);
        suite.results.pins.push(row);
        if made < level {
            suite.results.notes.push(format!(
                "pin fill to {level} stopped at {made} (time limit)"
            ));
            break;
        }
    }
    note_failed(suite, "pin warm-up", warm.failed, warm.first_error);
    filler.finish(Duration::from_secs(10));
    suite.results.pin_warmup = concurrency as u64;
    suite.results.pin_identities = proxy
        .admin
        .and_then(|admin| metric(admin, "pinproxy_identities_created_total"));
    Ok(())
}

/// One new cookie per request, so one new identity each, in a fresh
/// pinproxy.
fn identities(suite: &mut Suite) -> Result<()> {
    let ticks = procfs::ticks_per_second() as f64;
    let proxy = suite.start_pinproxy("pinproxy-identities", None)?;
    let mut filler = spawn_filler(suite, &proxy, IDENTITY_CONCURRENCY, 1, false)?;
    let warm = fill(&mut filler, 2 * IDENTITY_CONCURRENCY as u64)?;
    thread::sleep(Duration::from_millis(500));
    let before = proxy.proc.sample()?;
    let fds_before = procfs::open_fds(proxy.proc.pid())?;
    let report = fill(&mut filler, suite.config.identity_count)?;
    thread::sleep(Duration::from_millis(500));
    let after = proxy.proc.sample()?;
    let fds_after = procfs::open_fds(proxy.proc.pid())?;
    let row = IdentityRow {
        identities: report.pins,
        rss_growth: after.rss_bytes.saturating_sub(before.rss_bytes),
        fds_growth: fds_after.saturating_sub(fds_before),
        per_sec: report.pins as f64 / report.secs.max(1e-9),
        cpu_us_per_identity: after.cpu_us_since(&before, ticks) / report.pins.max(1) as f64,
        failed: report.failed + warm.failed,
    };
    suite.progress.say(format!(
        "{} identities: RSS +{:.1} MiB ({:.1} KiB each), {} more descriptors",
        row.identities,
        row.rss_growth as f64 / 1048576.0,
        row.rss_growth as f64 / row.identities.max(1) as f64 / 1024.0,
        row.fds_growth
    ));
    let first_error = report.first_error.or(warm.first_error);
    note_failed(suite, "identities", row.failed, first_error);
    suite.results.identities.push(row);
    filler.finish(Duration::from_secs(10));
    Ok(())
}

/// Rounds of identity churn.
const CHURN_ROUNDS: usize = 2;

/// What the churn's pinproxy runs with: identities retired after a second
/// unused and forgotten a second later, swept every second, and upstream
/// connections (with the lanes holding them) closed after two idle seconds,
/// so that a round is gone a few seconds after its last request.
const CHURN_CONFIG: &str = "[identities]\nidle_timeout = \"1s\"\nremember_retired = \"1s\"\n\
     sweep_interval = \"1s\"\n\n[timeouts]\npool_idle = \"2s\"\n";

/// Longest wait for a round's identities to be forgotten.
const FORGET_WAIT: Duration = Duration::from_secs(60);

/// Past the churn's pool idle time, for its last upstream connections and
/// lanes to go (they are swept once a second).
const LANES_GONE: Duration = Duration::from_secs(4);

/// What pinproxy keeps of identities once they are gone: rounds of new
/// identities, each founded by a client of its own (a new connection and a
/// `User-Agent`, so a fingerprint, of its own), as a fleet's new browser
/// profiles found them, then retired and forgotten. The live heap after each round, over the
/// baseline, is what the forgotten identities left behind. Needs the heap
/// counter and the admin endpoint; left out with a note without them.
fn churn(suite: &mut Suite) -> Result<()> {
    let options = PinproxyOptions {
        config: Some(CHURN_CONFIG.into()),
        ..PinproxyOptions::default()
    };
    let (proxy, heap) = start_counted(suite, "pinproxy-churn", &options)?;
    let (Some(heap), Some(admin)) = (heap, proxy.admin) else {
        suite.results.notes.push(
            "identity churn not measured: it needs the heap counter and the admin endpoint".into(),
        );
        return Ok(());
    };
    let mut filler = spawn_filler_with(suite, &proxy, IDENTITY_CONCURRENCY, 1, false, true)?;
    // A first round of identities, forgotten before the baseline: the maps
    // holding them have grown to a round's size, and stay so.
    let count = suite.config.identity_count;
    let warm = fill(&mut filler, count)?;
    note_failed(
        suite,
        "identity churn warm-up",
        warm.failed,
        warm.first_error,
    );
    wait_forgotten(admin)?;
    thread::sleep(LANES_GONE);
    let base = heap.settled()?;
    for round in 1..=CHURN_ROUNDS {
        let report = fill(&mut filler, count)?;
        let founded = heap.settled()?;
        wait_forgotten(admin)?;
        thread::sleep(LANES_GONE);
        let gone = heap.settled()?;
        let over = |heap: i64| heap.saturating_sub(base);
        let row = ChurnRow {
            round,
            identities: report.pins,
            heap_founded: over(founded),
            heap_forgotten: over(gone),
            failed: report.failed,
        };
        suite.progress.say(format!(
            "identity churn round {round}: {} identities, heap +{:.1} MiB founded, +{:.1} MiB once forgotten",
            row.identities,
            row.heap_founded as f64 / 1048576.0,
            row.heap_forgotten as f64 / 1048576.0,
        ));
        note_failed(suite, "identity churn", report.failed, report.first_error);
        suite.results.churn.push(row);
    }
    filler.finish(Duration::from_secs(10));
    Ok(())
}

/// Waits until pinproxy holds no identity, retired ones included (its
/// admin `/identities?all=1` lists none), for at most [`FORGET_WAIT`].
fn wait_forgotten(admin: SocketAddr) -> Result<()> {
    let started = std::time::Instant::now();
    while started.elapsed() < FORGET_WAIT {
        if admin_get(admin, "/identities?all=1").is_some_and(|body| body.trim() == "[]") {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(250));
    }
    Err(anyhow!(
        "pinproxy still held identities {} s after the churn round",
        FORGET_WAIT.as_secs()
    ))
}

/// Starts `pinbench pins` against `proxy` with `concurrency` connections.
fn spawn_filler(
    suite: &Suite,
    proxy: &Server,
    concurrency: usize,
    per_request: usize,
    anchor: bool,
) -> Result<Proc> {
    spawn_filler_with(suite, proxy, concurrency, per_request, anchor, false)
}

/// [`spawn_filler`], each request from a client of its own (a new
/// connection and a `User-Agent` of its own) when `fresh_clients`.
fn spawn_filler_with(
    suite: &Suite,
    proxy: &Server,
    concurrency: usize,
    per_request: usize,
    anchor: bool,
    fresh_clients: bool,
) -> Result<Proc> {
    let plan = FillerPlan {
        concurrency,
        per_request,
        anchor,
        limit_secs: 300.0,
        tag: format!("p{}x{per_request}", std::process::id()),
        fresh_clients,
    };
    suite.spawn_filler(&suite.origin, proxy, &plan)
}

/// Notes the requests of `what` that failed, with the first error.
fn note_failed(suite: &mut Suite, what: &str, failed: u64, first_error: Option<String>) {
    if failed > 0 {
        suite.results.notes.push(format!(
            "{what}: {failed} requests failed; first error: {}",
            first_error.unwrap_or_default()
        ));
    }
}

/// A metric from pinproxy's admin `/metrics` (summed over its label sets), if it has it.
fn metric(admin: SocketAddr, name: &str) -> Option<u64> {
    admin_metric(admin, name, &[])
}

/// A metric from pinproxy's admin `/metrics`, summed over the label sets
/// that contain every one of `labels` (e.g. `op="pin"`), if it has any.
pub(crate) fn admin_metric(admin: SocketAddr, name: &str, labels: &[&str]) -> Option<u64> {
    let text = admin_get(admin, "/metrics")?;
    // The sum over the metric's label sets (`name{...} v` or `name v`).
    let values: Vec<f64> = text
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let value = match rest.strip_prefix('{') {
                Some(labelled) => {
                    let (set, value) = labelled.split_once("} ")?;
                    if !labels.iter().all(|label| set.contains(label)) {
                        return None;
                    }
                    value
                }
                None if labels.is_empty() => rest.strip_prefix(' ')?,
                None => return None,
            };
            value.trim().parse::<f64>().ok()
        })
        .collect();
    (!values.is_empty()).then(|| values.iter().sum::<f64>() as u64)
}

/// The body of pinproxy's admin `path` (`Connection: close`, so the
/// response ends with the connection; the admin endpoint answers with a
/// length, not chunks), if it answers 200.
fn admin_get(admin: SocketAddr, path: &str) -> Option<String> {
    use std::io::Read as _;
    let mut stream = TcpStream::connect_timeout(&admin, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_owned())
}

/// The pin rows against the per-pin goal.
fn goals(results: &Results) -> Vec<Goal> {
    let cells: Vec<(String, f64)> = results
        .pins
        .iter()
        .filter(|p| p.pins > 0)
        .map(|p| (group(p.pins), p.bytes_per_pin()))
        .collect();
    let counted = results.pins.iter().any(|p| p.heap_growth.is_some());
    vec![Goal::over(
        format!(
            "< {GOAL_PIN_BYTES} bytes per live pin at 10k, 100k and 1M pins ({})",
            if counted {
                "live heap bytes, counted by the allocator"
            } else {
                "RSS growth: the heap was not counted in this run"
            }
        ),
        &cells,
        |cell, v| format!("{cell} pins: {v:.0} B"),
        |v| v < GOAL_PIN_BYTES,
    )]
}

/// ` (**N requests failed**)` after a row's first cell, when some did.
fn failed_note(failed: u64) -> String {
    if failed > 0 {
        format!(" (**{failed} requests failed**)")
    } else {
        String::new()
    }
}

/// The pin table and, when measured, the identity table.
fn render(results: &Results, out: &mut String) {
    let _ = writeln!(out, "### Pins\n");
    let s = &results.settings;
    let _ = writeln!(
        out,
        "One fresh pinproxy, filled cumulatively through its proxy port: {} kept-alive \
         connections send requests carrying {} new tracked cookies each, so every cookie \
         becomes a pin. Each connection also sends its own *anchor* cookie, so its pins all \
         join one identity: the figures are the pins alone ({} identities in all{}). Growth \
         is over a baseline taken after a warm-up of two requests per connection carrying \
         only its anchor cookie (so every connection, its identity and that identity's \
         upstream connection exist, with {} pins, one per connection), so it covers all live \
         pins and the doublings of the tables holding them; pinproxy runs its default pin \
         store. *heap* is the growth of pinproxy's live heap bytes, counted by \
         `libpinbench-heap.so` (bench/heapcount) preloaded into it: every malloc and free \
         passes through it, so the figure is exact where RSS moves by whole pages and \
         arenas. Each heap reading is the least of 30 reads 100 ms apart, since the durable \
         store's background commit holds megabytes of buffers for a moment after a fill. The \
         goal is held to the heap figure when it was counted.\n",
        s.pin_concurrency,
        s.pins_per_request,
        s.pin_concurrency,
        match results.pin_identities {
            Some(n) => format!(", pinproxy counted {n}"),
            None => String::new(),
        },
        group(results.pin_warmup),
    );
    let _ = writeln!(
        out,
        "| live pins | RSS growth | RSS bytes per pin | heap growth | heap bytes per pin | pins/s while filling | pinproxy CPU µs per pin |"
    );
    let _ = writeln!(out, "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for p in &results.pins {
        let _ = writeln!(
            out,
            "| {}{} | {} | {:.0} | {} | {} | {:.0} | {:.1} |",
            group(p.pins),
            failed_note(p.failed),
            mib(p.rss_growth),
            p.rss_bytes_per_pin(),
            p.heap_growth.map_or("–".into(), mib),
            p.heap_bytes_per_pin()
                .map_or("–".into(), |b| format!("{b:.0}")),
            p.pins_per_sec,
            p.cpu_us_per_pin,
        );
    }
    let _ = writeln!(out);

    if !results.identities.is_empty() {
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
        for r in &results.identities {
            let _ = writeln!(
                out,
                "| {}{} | {} | {:.1} KiB | {} | {:.0} | {:.0} |",
                group(r.identities),
                failed_note(r.failed),
                mib(r.rss_growth),
                per(r.rss_growth, 0, r.identities) / 1024.0,
                group(r.fds_growth),
                r.per_sec,
                r.cpu_us_per_identity,
            );
        }
        let _ = writeln!(out);
    }

    if !results.churn.is_empty() {
        render_churn(&results.churn, out);
    }
}

/// The identity churn table.
fn render_churn(rows: &[ChurnRow], out: &mut String) {
    let _ = writeln!(out, "### Identities once they are gone\n");
    let _ = writeln!(
        out,
        "Scrapers commonly give each identity a `User-Agent` of its own, so each founds a \
         fingerprint of its own, which pinproxy keeps with the identity (with the ClientHello \
         of the connection that founded it). A fresh pinproxy (`{}`) with the heap counter \
         gets rounds of {} new identities, one request each, each from a client of its own \
         (a new connection and a `User-Agent` of its own); then they are retired, forgotten, \
         and their upstream connections closed. *Kept* is the live heap over a baseline \
         taken after a first round went the same way (so the maps holding a round's \
         identities have grown once): what forgotten identities leave behind. Memory that \
         follows the identities alive keeps the same figure after every round, so its growth \
         per identity is about 0 B; memory that grows with every identity ever made grows \
         with each round.\n",
        CHURN_CONFIG.replace('\n', " ").trim(),
        group(rows.first().map_or(0, |r| r.identities)),
    );
    let _ = writeln!(
        out,
        "| round | identities | heap once founded | kept once forgotten | kept growth per identity of the round |"
    );
    let _ = writeln!(out, "| ---: | ---: | ---: | ---: | ---: |");
    let mut kept_before = 0i64;
    for row in rows {
        let growth = row.heap_forgotten.saturating_sub(kept_before);
        kept_before = row.heap_forgotten;
        let signed_mib = |bytes: i64| {
            let sign = if bytes < 0 { "−" } else { "+" };
            format!("{sign}{}", mib(bytes.unsigned_abs()))
        };
        let _ = writeln!(
            out,
            "| {}{} | {} | {} | {} | {:.0} B |",
            row.round,
            failed_note(row.failed),
            group(row.identities),
            signed_mib(row.heap_founded),
            signed_mib(row.heap_forgotten),
            growth as f64 / row.identities.max(1) as f64,
        );
    }
    let _ = writeln!(out);
}
