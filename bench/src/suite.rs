//! The orchestrator behind `bench/run.sh`, as an ordered list of phases.
//!
//! [`run`] starts the test origin and the exit as child processes on
//! loopback, then runs each phase selected with `--phases`, in the order of
//! [`PHASES`]: a phase starts what it measures (fresh pinproxy instances,
//! mitmproxy, redis-server, the load generator and the probes, all child
//! processes), samples them from `/proc` and adds its figures to the
//! [`Results`]. A phase that fails leaves a note and the next one runs.
//! Last, the results are written as `BENCHMARKS.md` (see [`crate::report`]),
//! in which every phase renders its own section.
//!
//! Every child is owned by a [`Proc`] that kills it (by its PID) when
//! dropped, so an error anywhere still leaves nothing running.

pub mod callgrind;
pub mod fleet;
pub mod http2;
mod machine;
pub mod mint;
pub mod pins;
mod procs;
mod servers;
pub mod stores;
pub mod throughput;
pub mod tunnels;
pub mod upstream;

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result};

pub use self::procs::Proc;
use self::servers::{start_origin, start_tool, Server};
use crate::report::{Goal, Results, RunSettings};

/// What to run and where to write.
#[derive(Debug, Clone)]
pub struct SuiteConfig {
    /// The pinproxy binary (release build).
    pub pinproxy: PathBuf,
    /// `mitmdump`, when installed.
    pub mitmdump: Option<PathBuf>,
    /// Why mitmproxy is missing, when it is.
    pub mitmproxy_missing: Option<String>,
    /// The hudsucker peer (setup (f)), when it was built.
    pub peer: Option<PathBuf>,
    /// The peer's name and version for the report (`hudsucker 0.25.0`).
    pub peer_label: Option<String>,
    /// Why the peer is missing, when it is.
    pub peer_missing: Option<String>,
    /// The heap-counting preload library (bench/heapcount), when built.
    pub heap_counter: Option<PathBuf>,
    /// pinproxy's source tree (for the clean build).
    pub source_dir: Option<PathBuf>,
    /// Where `BENCHMARKS.md` goes.
    pub out: PathBuf,
    /// Where the raw results (JSON) go.
    pub raw_out: Option<PathBuf>,
    /// Scratch directory (data dirs, logs); a temporary one when `None`.
    /// The PIDs of long-running children are appended to `pids` in it, so a
    /// wrapper can end them if this process is killed.
    pub work_dir: Option<PathBuf>,
    /// Seconds spent installing and building before the suite started.
    pub setup_secs: Option<f64>,
    /// pinproxy revision, for the report.
    pub revision: String,
    /// Interleaved rounds.
    pub rounds: usize,
    /// Timed seconds per load run.
    pub secs: f64,
    /// Request cap per load run.
    pub max_requests: u64,
    /// Total rate of the fixed-rate latency runs.
    pub fixed_rate: f64,
    /// Timed seconds per fixed-rate latency run.
    pub fixed_rate_secs: f64,
    /// Idle tunnel counts.
    pub tunnel_counts: Vec<usize>,
    /// Cumulative pin counts.
    pub pin_levels: Vec<u64>,
    /// Tracked cookies per request when filling pins.
    pub pins_per_request: usize,
    /// Connections used when filling pins.
    pub pin_concurrency: usize,
    /// New hosts timed for leaf minting.
    pub mint_count: usize,
    /// New identities created (one pin each) for the identity row.
    pub identity_count: u64,
    /// Which phases run (keys of [`PHASES`]).
    pub phases: Vec<String>,
    /// Pins per concurrent `store bench` run (single-writer runs write a
    /// tenth of it).
    pub store_pins: u64,
    /// Pins the embedded store is filled with for the scale row (0: skip).
    pub store_scale_pins: u64,
    /// Where callgrind's output and pinproxy's per-request profile go (the
    /// scratch directory's `callgrind/` when `None`).
    pub callgrind_dir: Option<PathBuf>,
    /// Requests of the longer callgrind run (the shorter has a third).
    pub callgrind_requests: u64,
    /// The callgrind rows counted (their keys; every row when empty).
    pub callgrind_rows: Vec<String>,
    /// Identities founded to measure memory per upstream connection.
    pub upstream_conns: u64,
    /// Time a clean `cargo build --release` of pinproxy (about 10 minutes).
    pub clean_build: bool,
    /// Most pinproxy replicas on one Redis in the fleet phase.
    pub fleet_replicas: usize,
    /// Synthetic identities written into Redis for its memory at scale (0: skip).
    pub redis_identities: u64,
}

/// Body size served by the origin.
pub const BODY_BYTES: usize = 1024;

/// One phase of the suite: how it runs and what it adds to the report.
pub struct Phase {
    /// Its name in `--phases`.
    pub key: &'static str,
    /// Its name in the progress, in notes and in the report's measuring time.
    pub name: &'static str,
    /// The numbered chapter of the report its section opens, if it opens one.
    pub chapter: Option<&'static str>,
    /// Measures, adding its figures (and notes) to the suite's results.
    run: fn(&mut Suite) -> Result<()>,
    /// Its rows of the report's goal table.
    pub goals: fn(&Results) -> Vec<Goal>,
    /// Writes its section of the report.
    pub render: fn(&Results, &mut String),
}

/// The phases, in the order they run and appear in the report.
pub const PHASES: [Phase; 9] = [
    throughput::PHASE,
    callgrind::PHASE,
    http2::PHASE,
    upstream::PHASE,
    tunnels::PHASE,
    pins::PHASE,
    stores::PHASE,
    mint::PHASE,
    fleet::PHASE,
];

/// Progress on stderr.
struct Progress {
    start: Instant,
}

impl Progress {
    /// Prints `message` with the seconds since the suite started.
    fn say(&self, message: impl AsRef<str>) {
        eprintln!(
            "[{:>5.0}s] {}",
            self.start.elapsed().as_secs_f64(),
            message.as_ref()
        );
    }
}

/// What every phase works with: the configuration, the scratch directory,
/// the origin and exit shared by all phases, and the results so far.
struct Suite {
    config: SuiteConfig,
    /// `pinproxy run` takes `--admin`.
    pinproxy_has_admin: bool,
    /// This binary: the origin, the exit, the load generator and the
    /// probes are its subcommands.
    exe: PathBuf,
    /// Scratch directory: data directories, configuration files, logs and
    /// the PID file.
    dir: PathBuf,
    /// Removes the scratch directory at the end when it is a temporary one.
    _temp: Option<tempfile::TempDir>,
    origin: Server,
    exit: Server,
    progress: Progress,
    results: Results,
}

/// Runs the whole suite and writes the report.
pub fn run(config: SuiteConfig) -> Result<()> {
    let progress = Progress {
        start: Instant::now(),
    };
    let exe = std::env::current_exe()?;
    let (dir, temp) = match &config.work_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)?;
            (dir.clone(), None)
        }
        None => {
            let temp = tempfile::Builder::new().prefix("pinbench-").tempdir()?;
            (temp.path().to_owned(), Some(temp))
        }
    };
    procs::record_pids_in(dir.join("pids"));
    let origin = start_origin(
        &exe,
        "origin",
        dir.join("origin-ca.pem"),
        &["--body-bytes", &BODY_BYTES.to_string()],
    )?;
    let exit = start_tool(&exe, "exit", &["exit", "--listen", "127.0.0.1:0"])?;
    progress.say(format!("origin on {}, exit on {}", origin.addr, exit.addr));
    let machine = machine::facts(&config)?;
    let settings = RunSettings {
        rounds: config.rounds,
        secs: config.secs,
        max_requests: config.max_requests,
        body_bytes: BODY_BYTES,
        fixed_rate: config.fixed_rate,
        fixed_rate_secs: Some(config.fixed_rate_secs),
        fixed_rate_concurrency: throughput::FIXED_RATE_CONCURRENCY,
        pins_per_request: config.pins_per_request,
        pin_concurrency: config.pin_concurrency,
    };
    let pinproxy_has_admin = Command::new(&config.pinproxy)
        .args(["run", "--help"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("--admin"))
        .unwrap_or(false);
    let mut suite = Suite {
        config,
        pinproxy_has_admin,
        exe,
        dir,
        _temp: temp,
        origin,
        exit,
        progress,
        results: Results {
            machine,
            settings,
            ..Results::default()
        },
    };

    for phase in &PHASES {
        if !suite.config.phases.iter().any(|p| p == phase.key) {
            continue;
        }
        let started = Instant::now();
        if let Err(e) = (phase.run)(&mut suite) {
            let note = format!("phase {} failed: {e:#}", phase.name);
            suite.progress.say(&note);
            suite.results.notes.push(note);
        }
        suite
            .results
            .phases
            .push((phase.name.to_owned(), started.elapsed().as_secs_f64()));
    }
    suite.results.setup_secs = suite.config.setup_secs;
    suite.write()
}

impl Suite {
    /// Writes the report, carrying over the history rows of the one it
    /// replaces, and the raw results when asked to.
    fn write(&self) -> Result<()> {
        let previous = std::fs::read_to_string(&self.config.out).ok();
        let text = self.results.render(previous.as_deref());
        std::fs::write(&self.config.out, text)
            .with_context(|| format!("writing {}", self.config.out.display()))?;
        if let Some(raw) = &self.config.raw_out {
            if let Some(parent) = raw.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(raw, serde_json::to_string_pretty(&self.results)?)?;
        }
        self.progress
            .say(format!("wrote {}", self.config.out.display()));
        Ok(())
    }
}
