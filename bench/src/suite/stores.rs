//! The pin store phase (in the report's scale chapter):
//! `pinproxy store bench` against an empty store of each kind (memory, the
//! embedded durable store, and a throwaway local `redis-server` when there
//! is one, also with a replica and `store.wait_replicas = 1`, which is what
//! `WAIT` costs a new pin) with 1 and 64 writers; then the embedded store filled to scale,
//! opened by `pinproxy store stats` and by a daemon, next to a daemon on an
//! empty store.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::procs::{find_program, free_addr, path_str, run_bounded};
use super::servers::{start_server, Server};
use super::{Phase, Suite};
use crate::report::{group, mib, Goal, Results};

/// The pin store phase.
pub const PHASE: Phase = Phase {
    key: "stores",
    name: "pin stores",
    chapter: None,
    run,
    goals,
    render,
};

/// RSS of the daemon with the embedded store at a million pins, bytes.
const GOAL_STORE_RSS_BYTES: f64 = 300e6;

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

/// Runs the phase: `store bench` per store kind and writer count, then the
/// embedded store at scale (unless its pin count is 0).
fn run(suite: &mut Suite) -> Result<()> {
    let redis = match find_program("redis-server") {
        Some(program) => Some(start_redis(suite, &program)?),
        None => {
            suite
                .results
                .notes
                .push("redis-server not found: no Redis row in the pin store table".into());
            None
        }
    };
    let mut kinds: Vec<(&str, Option<String>)> =
        vec![("memory", Some("memory".into())), ("embedded", None)];
    let mut replica = None;
    if let Some(redis) = &redis {
        let port = redis.addr.port();
        kinds.push(("redis", Some(format!("redis://127.0.0.1:{port}"))));
        match start_replica(suite, redis) {
            Ok(started) => {
                replica = Some(started);
                kinds.push((REDIS_WAIT, Some(format!("redis://127.0.0.1:{port}"))));
            }
            Err(e) => suite
                .results
                .notes
                .push(format!("no Redis replica, so no WAIT row: {e:#}")),
        }
    }
    let mut runs = 0;
    for (kind, store) in kinds {
        for concurrency in [1, 64] {
            runs += 1;
            let pins = if concurrency == 1 {
                (suite.config.store_pins / 10).max(1)
            } else {
                suite.config.store_pins
            };
            // A scratch store per run: a Redis database of its own, an
            // empty data directory for the others.
            let store = store.as_ref().map(|url| match kind {
                "redis" | REDIS_WAIT => format!("{url}/{runs}"),
                _ => url.clone(),
            });
            let data = suite.dir.join(format!("store-bench-{runs}"));
            let row = store_bench(suite, kind, store.as_deref(), &data, pins, concurrency)?;
            suite.progress.say(format!(
                "{kind} store, {concurrency} writers: {:.0} pins/s, p50 {:.1} µs, p99 {:.1} µs",
                row.pins_per_sec, row.p50_us, row.p99_us
            ));
            suite.results.stores.push(row);
        }
    }
    drop(replica);
    drop(redis);
    if suite.config.store_scale_pins > 0 {
        store_scale(suite)?;
    }
    Ok(())
}

/// One `pinproxy store bench` run.
fn store_bench(
    suite: &Suite,
    kind: &str,
    store: Option<&str>,
    data: &Path,
    pins: u64,
    concurrency: usize,
) -> Result<StoreRow> {
    let mut cmd = Command::new(&suite.config.pinproxy);
    cmd.args(["store", "--data-dir", path_str(data)?]);
    if let Some(store) = store {
        cmd.args(["--store", store]);
    }
    if kind == REDIS_WAIT {
        std::fs::create_dir_all(data)?;
        let config = data.join("wait.toml");
        std::fs::write(
            &config,
            "[store]\nwait_replicas = 1\nwait_timeout = \"2s\"\n",
        )?;
        cmd.args(["--config", path_str(&config)?]);
    }
    cmd.args(["bench", "--pins", &pins.to_string()])
        .args(["--concurrency", &concurrency.to_string()]);
    let output = run_bounded(&mut cmd, Duration::from_secs(300))?;
    let report: serde_json::Value = serde_json::from_str(output.trim())
        .with_context(|| format!("store bench output: {output}"))?;
    let number = |field: &str| report[field].as_f64().unwrap_or(0.0);
    Ok(StoreRow {
        store: kind.to_owned(),
        concurrency,
        pins: number("pins") as u64,
        pins_per_sec: number("pins_per_sec"),
        p50_us: number("p50_us"),
        p99_us: number("p99_us"),
        max_us: number("max_us"),
    })
}

/// Fills an embedded store to `store_scale_pins`, then times opening it
/// and measures a daemon running on it.
fn store_scale(suite: &mut Suite) -> Result<()> {
    let pins = suite.config.store_scale_pins;
    // `start_pinproxy` names its data directory after the instance.
    let data = suite.dir.join("pinproxy-store-scale-data");
    let fill = store_bench(suite, "embedded", None, &data, pins, 256)?;
    let file_bytes = std::fs::metadata(data.join("pins.redb"))
        .map(|m| m.len())
        .unwrap_or(0);
    let started = Instant::now();
    let mut stats = Command::new(&suite.config.pinproxy);
    stats.args(["store", "--data-dir", path_str(&data)?, "stats"]);
    let counts = run_bounded(&mut stats, Duration::from_secs(120))?;
    let open_secs = started.elapsed().as_secs_f64();
    let identities = counts
        .lines()
        .find_map(|l| l.strip_prefix("identities: "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);

    let empty = suite.start_pinproxy("pinproxy-store-empty", None)?;
    thread::sleep(Duration::from_millis(500));
    let empty_rss_bytes = empty.proc.sample()?.rss_bytes;
    drop(empty);
    let started = Instant::now();
    let daemon = suite.start_pinproxy("pinproxy-store-scale", None)?;
    let start_secs = started.elapsed().as_secs_f64();
    thread::sleep(Duration::from_millis(500));
    let rss_bytes = daemon.proc.sample()?.rss_bytes;
    drop(daemon);
    suite.progress.say(format!(
        "embedded store at {} pins: file {:.0} MB, open {open_secs:.2} s, start-up \
         {start_secs:.2} s, daemon RSS {:.0} MB",
        group(fill.pins),
        file_bytes as f64 / 1e6,
        rss_bytes as f64 / 1e6
    ));
    suite.results.store_scale = Some(StoreScale {
        pins: fill.pins,
        identities,
        fill_pins_per_sec: fill.pins_per_sec,
        file_bytes,
        open_secs,
        start_secs,
        rss_bytes,
        empty_rss_bytes,
    });
    Ok(())
}

/// The store row of Redis with `store.wait_replicas = 1`.
const REDIS_WAIT: &str = "redis + WAIT 1";

/// Starts a replica of `primary` and waits (bounded) until it is in sync,
/// asking the primary with `redis-cli`.
fn start_replica(suite: &Suite, primary: &Server) -> Result<Server> {
    let program = find_program("redis-server").context("redis-server")?;
    let cli = find_program("redis-cli").context("redis-cli not found")?;
    let addr = free_addr()?;
    let mut cmd = Command::new(program);
    cmd.args(["--bind", "127.0.0.1", "--port", &addr.port().to_string()])
        .args(["--save", "", "--appendonly", "no"])
        .args(["--dir", path_str(&suite.dir)?])
        .args(["--dbfilename", "replica.rdb"])
        .args(["--replicaof", "127.0.0.1", &primary.addr.port().to_string()]);
    let log = suite.dir.join("redis-replica.log");
    let replica = start_server(
        "redis-replica",
        &mut cmd,
        addr,
        &log,
        Duration::from_secs(20),
        None,
    )?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut info = Command::new(&cli);
        info.args([
            "-p",
            &primary.addr.port().to_string(),
            "INFO",
            "replication",
        ]);
        let text = run_bounded(&mut info, Duration::from_secs(5))?;
        if text.contains("state=online") {
            return Ok(replica);
        }
        if Instant::now() > deadline {
            anyhow::bail!("the replica did not come online within 20 s");
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// Starts a throwaway `redis-server` (no persistence) on a free port.
pub(super) fn start_redis(suite: &Suite, program: &Path) -> Result<Server> {
    let addr = free_addr()?;
    let mut cmd = Command::new(program);
    cmd.args(["--bind", "127.0.0.1", "--port", &addr.port().to_string()])
        .args(["--save", "", "--appendonly", "no"])
        .args(["--dir", path_str(&suite.dir)?]);
    let log = suite.dir.join("redis.log");
    start_server(
        "redis-server",
        &mut cmd,
        addr,
        &log,
        Duration::from_secs(20),
        None,
    )
}

/// The daemon's RSS at scale against its goal.
fn goals(results: &Results) -> Vec<Goal> {
    let cells: Vec<(String, f64)> = results
        .store_scale
        .iter()
        .map(|s| (group(s.pins), s.rss_bytes as f64))
        .collect();
    vec![Goal::over(
        format!(
            "< {} MB daemon RSS with 1,000,000 pins (embedded store)",
            GOAL_STORE_RSS_BYTES / 1e6
        ),
        &cells,
        |cell, v| format!("{cell} pins: {:.0} MB", v / 1e6),
        |v| v < GOAL_STORE_RSS_BYTES,
    )]
}

/// The `store bench` table and the scale table, when measured.
fn render(results: &Results, out: &mut String) {
    if results.stores.is_empty() && results.store_scale.is_none() {
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
         trip and the script, not a disk; `redis + WAIT 1` adds a local replica and \
         `store.wait_replicas = 1`, so each new pin also waits for the replica's \
         acknowledgement.\n"
    );
    if !results.stores.is_empty() {
        let _ = writeln!(
            out,
            "| store | writers | pins | pins/s | p50 µs | p99 µs | max µs |"
        );
        let _ = writeln!(out, "| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
        for s in &results.stores {
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
    if let Some(s) = &results.store_scale {
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
