//! The fleet phase, chapter 4 of the report: pinproxy replicas sharing one
//! Redis (`--store redis://...`), as a fleet of sidecars would.
//!
//! For 1 to `fleet_replicas` replicas (each step on a fresh Redis database,
//! every replica through the bench exit): first every replica is loaded with
//! new identities (one request with one new tracked cookie each, so one new
//! pin and one new identity per request), then with pin hits (keep-alive
//! clients whose cookies were pinned by their first request). Each step
//! records the rates per replica, and Redis's own CPU time, commands and
//! `used_memory` over it, so the cost on the store side of one new identity
//! and one hit is known. Then one scratch database is filled to
//! `redis_identities` synthetic identities with `pinproxy store bench` for
//! Redis's memory at that scale. The report turns those costs into a model
//! for 10 to 100 replicas and Redis Cluster.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::Command;
use std::thread;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use serde::{Deserialize, Serialize};

use super::pins::admin_metric;
use super::procs::{find_program, path_str, run_bounded, Proc};
use super::servers::{fill, run_load, start_ready, FillerPlan, LoadPlan, PinproxyOptions, Server};
use super::stores::start_redis;
use super::{Phase, Suite};
use crate::load::LoadResult;
use crate::pins::FillReport;
use crate::procfs::{self, ProcSample};
use crate::relay::RelayStats;
use crate::report::{group, Goal, Results};
use crate::stats::median;

/// The fleet phase; it opens chapter 4.
pub const PHASE: Phase = Phase {
    key: "fleet",
    name: "fleet on one Redis",
    chapter: Some("4. Scale past one machine"),
    run,
    goals,
    render,
};

/// Client connections per replica, in both loads.
const PER_REPLICA_CONCURRENCY: usize = 16;
/// Pins per synthetic identity in `pinproxy store bench`.
const STORE_BENCH_PINS_PER_IDENTITY: u64 = 4;
/// Writers of the memory fill.
const MEMORY_FILL_WRITERS: usize = 64;
/// The Redis database of the round-trip count (the steps use 1 to 8, the
/// memory fill 15).
const ROUND_TRIP_DB: u32 = 9;
/// Replica counts the model is written for.
const MODEL_REPLICAS: [u64; 3] = [10, 30, 100];
/// Per-replica rates the model is written for (requests/s).
const MODEL_RATES: [f64; 2] = [100.0, 1000.0];
/// Round trips to Redis for all of a request's new pins (issue 14).
const GOAL_TRIPS_PER_IDENTITY: f64 = 1.0;
/// The store operations that write a new identity and its pins, each one
/// round trip to Redis (`pinproxy_store_op_seconds` counts them).
const FOUNDING_OPS: [&str; 6] = [
    "found-identity",
    "create",
    "pin",
    "pin-all",
    "discard",
    "record-egress",
];
/// Round trips per operation a goal tolerates above its figure: a
/// background command (a reconnect, a periodic check) now and then over the
/// count's hundreds of requests, not one per request.
const ROUND_TRIP_SLACK: f64 = 0.02;

/// One step: `replicas` pinproxy replicas on one Redis database.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FleetStep {
    /// Replicas.
    pub replicas: usize,
    /// New identities per second, per replica.
    pub identities_per_sec: Vec<f64>,
    /// Redis CPU per new identity, microseconds.
    pub redis_us_per_identity: Option<f64>,
    /// Redis commands per new identity.
    pub commands_per_identity: Option<f64>,
    /// Redis `used_memory` growth per new identity, bytes.
    pub bytes_per_identity: Option<f64>,
    /// pinproxy CPU per new identity (mean over replicas), microseconds.
    pub pinproxy_us_per_identity: Option<f64>,
    /// Pin-hit requests per second, per replica.
    pub hits_per_sec: Vec<f64>,
    /// Redis CPU per hit, microseconds.
    pub redis_us_per_hit: Option<f64>,
    /// Redis commands per hit.
    pub commands_per_hit: Option<f64>,
    /// pinproxy CPU per hit (mean over replicas), microseconds.
    pub pinproxy_us_per_hit: Option<f64>,
    /// Requests that failed in the step.
    pub errors: u64,
}

/// Redis's memory at scale.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RedisMemory {
    /// Synthetic identities written (`store bench`, 4 pins each).
    pub identities: u64,
    /// Pins written.
    pub pins: u64,
    /// `used_memory` growth over the fill, bytes.
    pub used_memory_growth: u64,
    /// `used_memory` at the end, bytes.
    pub used_memory: u64,
    /// Pins per second of the fill.
    pub fill_pins_per_sec: f64,
}

/// What the phase adds to the results.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FleetReport {
    /// `redis-server --version`.
    pub redis: String,
    /// Client connections per replica.
    pub concurrency: usize,
    /// One step per replica count.
    pub steps: Vec<FleetStep>,
    /// Redis's memory at scale, when measured.
    pub memory: Option<RedisMemory>,
    /// Round trips to Redis per operation, one request at a time.
    pub round_trips: Option<RoundTrips>,
}

/// Round trips between one replica and Redis per operation, counted on the
/// wire by a relay with one request in flight (concurrent requests share
/// round trips on pinproxy's multiplexed connection, so this is what one
/// request waits for at most).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RoundTrips {
    /// New identities founded.
    pub identities: u64,
    /// Round trips per new identity, all of them (the lookup, the writes,
    /// the use recorded off the request path).
    pub per_identity: f64,
    /// Of those, the round trips that wrote the identity and its pins
    /// (pinproxy's store operations, counted by its metrics).
    #[serde(default)]
    pub writes_per_identity: Option<f64>,
    /// Pin hits.
    pub hits: u64,
    /// Round trips per pin hit, all of them on the wire (with the uses
    /// written off the request path, coalesced per identity, and the
    /// replica's periodic generation check).
    pub per_hit: f64,
    /// Of those, lookups that went to Redis, per hit: pinproxy's lookups
    /// less those its hit cache answered (counted by its metrics).
    #[serde(default)]
    pub lookups_per_hit: Option<f64>,
    /// Bytes to Redis per hit.
    pub bytes_up_per_hit: f64,
    /// Bytes from Redis per hit.
    pub bytes_down_per_hit: f64,
}

/// The Redis the phase runs on, and how to ask it for `INFO`.
struct Redis {
    server: Server,
    cli: Option<PathBuf>,
}

impl Redis {
    /// `INFO` as a map of its `key:value` lines; empty without redis-cli.
    fn info(&self) -> HashMap<String, String> {
        let Some(cli) = &self.cli else {
            return HashMap::new();
        };
        let mut cmd = Command::new(cli);
        cmd.args(["-p", &self.server.addr.port().to_string(), "INFO", "all"]);
        run_bounded(&mut cmd, Duration::from_secs(10))
            .map(|text| {
                text.lines()
                    .filter_map(|l| l.trim().split_once(':'))
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The store URL of database `db`.
    fn url(&self, db: u32) -> String {
        format!("redis://127.0.0.1:{}/{db}", self.server.addr.port())
    }
}

/// Counters read before and after a load, on Redis's side.
struct RedisMark {
    cpu: ProcSample,
    commands: Option<u64>,
    used_memory: Option<u64>,
}

impl RedisMark {
    fn now(redis: &Redis) -> Result<RedisMark> {
        let info = redis.info();
        let number = |k: &str| info.get(k).and_then(|v| v.trim().parse().ok());
        Ok(RedisMark {
            cpu: redis.server.proc.sample()?,
            commands: number("total_commands_processed"),
            used_memory: number("used_memory"),
        })
    }

    /// Redis CPU µs, commands and memory bytes since `earlier`, per one of
    /// `n` operations.
    fn per(&self, earlier: &RedisMark, n: u64) -> (Option<f64>, Option<f64>, Option<f64>) {
        if n == 0 {
            return (None, None, None);
        }
        let ticks = procfs::ticks_per_second() as f64;
        let n = n as f64;
        let diff = |a: Option<u64>, b: Option<u64>| Some(a?.saturating_sub(b?) as f64 / n);
        (
            Some(self.cpu.cpu_us_since(&earlier.cpu, ticks) / n),
            diff(self.commands, earlier.commands),
            diff(self.used_memory, earlier.used_memory),
        )
    }
}

/// Runs the phase: one step per replica count, then Redis's memory at scale.
fn run(suite: &mut Suite) -> Result<()> {
    let Some(program) = find_program("redis-server") else {
        let note = "redis-server not found: no fleet chapter".to_owned();
        suite.progress.say(&note);
        suite.results.notes.push(note);
        return Ok(());
    };
    let version = run_bounded(
        Command::new(&program).arg("--version"),
        Duration::from_secs(10),
    )
    // "Redis server v=7.0.15 sha=... malloc=... bits=64 build=...": the name
    // and version are enough.
    .map(|v| {
        v.split(" sha=")
            .next()
            .unwrap_or_default()
            .trim()
            .to_owned()
    })
    .unwrap_or_default();
    let redis = Redis {
        server: start_redis(suite, &program)?,
        cli: find_program("redis-cli"),
    };
    if redis.cli.is_none() {
        suite
            .results
            .notes
            .push("redis-cli not found: the fleet chapter has no Redis commands or memory".into());
    }
    let mut report = FleetReport {
        redis: version,
        concurrency: PER_REPLICA_CONCURRENCY,
        ..FleetReport::default()
    };
    for replicas in 1..=suite.config.fleet_replicas.clamp(1, 8) {
        match step(suite, &redis, replicas) {
            Ok(step) => report.steps.push(step),
            Err(e) => {
                let note = format!("fleet step with {replicas} replicas failed: {e:#}");
                suite.progress.say(&note);
                suite.results.notes.push(note);
                break;
            }
        }
    }
    match round_trips(suite, &redis) {
        Ok(rt) => report.round_trips = Some(rt),
        Err(e) => {
            let note = format!("Redis round trips per request: {e:#}");
            suite.progress.say(&note);
            suite.results.notes.push(note);
        }
    }
    if suite.config.redis_identities > 0 {
        match memory(suite, &redis) {
            Ok(m) => report.memory = Some(m),
            Err(e) => {
                let note = format!("Redis memory at scale: {e:#}");
                suite.progress.say(&note);
                suite.results.notes.push(note);
            }
        }
    }
    suite.results.fleet = Some(report);
    Ok(())
}

/// One step: `replicas` replicas on a fresh database, loaded with new
/// identities, then with pin hits.
fn step(suite: &Suite, redis: &Redis, replicas: usize) -> Result<FleetStep> {
    let db = u32::try_from(replicas)?;
    let mut proxies = Vec::new();
    for i in 0..replicas {
        let options = PinproxyOptions {
            store: Some(redis.url(db)),
            ..PinproxyOptions::default()
        };
        proxies.push(suite.start_pinproxy_with(&format!("fleet{replicas}-replica{i}"), options)?);
    }
    let ticks = procfs::ticks_per_second() as f64;
    let secs = suite.config.secs;
    let mut step = FleetStep {
        replicas,
        ..FleetStep::default()
    };

    // New identities: every request founds one.
    let mut fillers: Vec<Proc> = Vec::new();
    for (i, proxy) in proxies.iter().enumerate() {
        let plan = FillerPlan {
            concurrency: PER_REPLICA_CONCURRENCY,
            per_request: 1,
            anchor: false,
            limit_secs: secs,
            tag: format!("f{}r{replicas}i{i}", std::process::id()),
            fresh_clients: false,
        };
        let mut filler = suite.spawn_filler(&suite.origin, proxy, &plan)?;
        // Connections, leaves and the runtime first.
        let warm = fill(&mut filler, 2 * PER_REPLICA_CONCURRENCY as u64)?;
        step.errors += warm.failed;
        fillers.push(filler);
    }
    let redis_before = RedisMark::now(redis)?;
    let cpu_before = samples(&proxies)?;
    // Far more than fit in the time limit: each fill runs for `secs`.
    for filler in &mut fillers {
        filler.send("fill 100000000")?;
    }
    let mut founded = 0;
    for filler in &mut fillers {
        let report: FillReport = filler.next_json(Duration::from_secs_f64(secs + 60.0))?;
        step.errors += report.failed;
        founded += report.pins;
        step.identities_per_sec
            .push(report.pins as f64 / report.secs.max(1e-9));
    }
    let cpu_after = samples(&proxies)?;
    let redis_after = RedisMark::now(redis)?;
    for filler in fillers {
        filler.finish(Duration::from_secs(10));
    }
    (
        step.redis_us_per_identity,
        step.commands_per_identity,
        step.bytes_per_identity,
    ) = redis_after.per(&redis_before, founded);
    step.pinproxy_us_per_identity = mean_cpu(&cpu_before, &cpu_after, ticks, founded);

    // Pin hits: each client's cookies are pinned by its warm-up request,
    // every timed request is a hit.
    let redis_before = RedisMark::now(redis)?;
    let cpu_before = samples(&proxies)?;
    let results: Vec<Result<LoadResult>> = thread::scope(|scope| {
        let handles: Vec<_> = proxies
            .iter()
            .enumerate()
            .map(|(i, proxy)| {
                let tag = format!("h{}r{replicas}i{i}", std::process::id());
                let cmd = proxy.ca().and_then(|ca| {
                    suite.load_command(&LoadPlan {
                        proxy: Some((proxy.addr, ca)),
                        concurrency: PER_REPLICA_CONCURRENCY,
                        secs,
                        cookie_tag: Some(&tag),
                        ..LoadPlan::new(&suite.origin, suite.config.max_requests)
                    })
                });
                scope.spawn(move || run_load(cmd?))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow!("a load thread panicked")))
            })
            .collect()
    });
    let cpu_after = samples(&proxies)?;
    let redis_after = RedisMark::now(redis)?;
    let mut hits = 0;
    for result in results {
        let result = result?;
        step.errors += result.errors;
        hits += result.ok + result.warmup_ok;
        step.hits_per_sec.push(result.rps);
    }
    (step.redis_us_per_hit, step.commands_per_hit, _) = redis_after.per(&redis_before, hits);
    step.pinproxy_us_per_hit = mean_cpu(&cpu_before, &cpu_after, ticks, hits);
    suite.progress.say(format!(
        "fleet of {replicas}: {:.0} new identities/s, {:.0} hits/s in total; Redis {} µs and \
         {} commands per new identity, {} µs and {} commands per hit",
        step.identities_per_sec.iter().sum::<f64>(),
        step.hits_per_sec.iter().sum::<f64>(),
        show(step.redis_us_per_identity, 1),
        show(step.commands_per_identity, 1),
        show(step.redis_us_per_hit, 1),
        show(step.commands_per_hit, 2),
    ));
    Ok(step)
}

/// One replica whose Redis connection goes through `pinbench relay`, one
/// request at a time: round trips per new identity, then per pin hit.
fn round_trips(suite: &Suite, redis: &Redis) -> Result<RoundTrips> {
    let mut relay = start_ready(
        "redis relay",
        Command::new(&suite.exe).args(["relay", "--to", &redis.server.addr.to_string()]),
        true,
        Duration::from_secs(20),
    )?;
    let options = PinproxyOptions {
        store: Some(format!("redis://{}/{ROUND_TRIP_DB}", relay.addr)),
        ..PinproxyOptions::default()
    };
    let proxy = suite.start_pinproxy_with("fleet-round-trips", options)?;
    let secs = suite.config.secs;
    let plan = FillerPlan {
        concurrency: 1,
        per_request: 1,
        anchor: false,
        limit_secs: secs,
        tag: format!("t{}", std::process::id()),
        fresh_clients: false,
    };
    let mut filler = suite.spawn_filler(&suite.origin, &proxy, &plan)?;
    let warm = fill(&mut filler, 2)?;
    let founding_writes = || -> Option<u64> {
        let admin = proxy.admin?;
        let counts = FOUNDING_OPS.iter().map(|op| {
            let label = format!("op=\"{op}\"");
            admin_metric(admin, "pinproxy_store_op_seconds_count", &[&label]).unwrap_or(0)
        });
        Some(counts.sum())
    };
    let writes_before = founding_writes();
    let before = relay_stats(&mut relay)?;
    let founded = fill(&mut filler, 100_000_000)?;
    let after = relay_stats(&mut relay)?;
    let writes_after = founding_writes();
    filler.finish(Duration::from_secs(10));
    anyhow::ensure!(
        founded.pins > 0 && warm.failed + founded.failed == 0,
        "founding identities failed: {}",
        founded.first_error.or(warm.first_error).unwrap_or_default()
    );
    let per_identity =
        after.round_trips.saturating_sub(before.round_trips) as f64 / founded.pins as f64;

    let tag = format!("th{}", std::process::id());
    let ca = proxy.ca()?;
    let cmd = suite.load_command(&LoadPlan {
        proxy: Some((proxy.addr, ca)),
        concurrency: 1,
        secs,
        cookie_tag: Some(&tag),
        ..LoadPlan::new(&suite.origin, suite.config.max_requests)
    })?;
    // Lookups sent to Redis: pinproxy's lookups (one credential each here)
    // less the credentials its hit cache answered.
    let asked_redis = || -> Option<u64> {
        let admin = proxy.admin?;
        let lookups = admin_metric(admin, "pinproxy_store_op_seconds_count", &["op=\"lookup\""])?;
        let cached = admin_metric(admin, "pinproxy_store_cache_hits_total", &[]).unwrap_or(0);
        Some(lookups.saturating_sub(cached))
    };
    let asked_before = asked_redis();
    let before = relay_stats(&mut relay)?;
    let result = run_load(cmd)?;
    let after = relay_stats(&mut relay)?;
    let asked_after = asked_redis();
    anyhow::ensure!(result.ok > 0, "no pin hit succeeded");
    // The warm-up request founded the client's identity: take its share out.
    let hits = result.ok as f64;
    let trips = after.round_trips.saturating_sub(before.round_trips) as f64
        - result.warmup_ok as f64 * per_identity;
    let writes_per_identity = match (writes_before, writes_after) {
        (Some(before), Some(after)) => {
            Some(after.saturating_sub(before) as f64 / founded.pins as f64)
        }
        _ => None,
    };
    let rt = RoundTrips {
        identities: founded.pins,
        per_identity,
        writes_per_identity,
        hits: result.ok,
        per_hit: trips.max(0.0) / hits,
        lookups_per_hit: match (asked_before, asked_after) {
            (Some(before), Some(after)) => Some(after.saturating_sub(before) as f64 / hits),
            _ => None,
        },
        bytes_up_per_hit: after.bytes_up.saturating_sub(before.bytes_up) as f64 / hits,
        bytes_down_per_hit: after.bytes_down.saturating_sub(before.bytes_down) as f64 / hits,
    };
    suite.progress.say(format!(
        "one request at a time: {:.2} Redis round trips per new identity ({} writing it and its \
         pins), {:.3} per pin hit ({} of them lookups)",
        rt.per_identity,
        show(rt.writes_per_identity, 2),
        rt.per_hit,
        show(rt.lookups_per_hit, 3)
    ));
    Ok(rt)
}

/// The relay's totals so far.
fn relay_stats(relay: &mut Server) -> Result<RelayStats> {
    relay.proc.send("stats")?;
    relay.proc.next_json(Duration::from_secs(10))
}

/// `v` with `digits` decimals, or `–`.
fn show(v: Option<f64>, digits: usize) -> String {
    v.map_or("–".into(), |v| format!("{v:.digits$}"))
}

/// The counters of every replica.
fn samples(proxies: &[Server]) -> Result<Vec<ProcSample>> {
    proxies.iter().map(|p| p.proc.sample()).collect()
}

/// pinproxy CPU per operation over all replicas, microseconds.
fn mean_cpu(before: &[ProcSample], after: &[ProcSample], ticks: f64, n: u64) -> Option<f64> {
    let us: f64 = after
        .iter()
        .zip(before)
        .map(|(a, b)| a.cpu_us_since(b, ticks))
        .sum();
    (n > 0).then(|| us / n as f64)
}

/// Fills a scratch database with `redis_identities` synthetic identities
/// (`pinproxy store bench`) and reads Redis's memory growth.
fn memory(suite: &Suite, redis: &Redis) -> Result<RedisMemory> {
    let identities = suite.config.redis_identities;
    let pins = identities * STORE_BENCH_PINS_PER_IDENTITY;
    suite.progress.say(format!(
        "filling a scratch Redis database with {} identities ({} pins, store bench)",
        group(identities),
        group(pins)
    ));
    let before = RedisMark::now(redis)?;
    let data = suite.dir.join("fleet-memory-data");
    let mut cmd = Command::new(&suite.config.pinproxy);
    cmd.args(["store", "--data-dir", path_str(&data)?])
        .args(["--store", &redis.url(15)])
        .args(["bench", "--pins", &pins.to_string()])
        .args(["--concurrency", &MEMORY_FILL_WRITERS.to_string()]);
    let output = run_bounded(&mut cmd, Duration::from_secs(1800))?;
    let bench: serde_json::Value = serde_json::from_str(output.trim())
        .with_context(|| format!("store bench output: {output}"))?;
    let after = RedisMark::now(redis)?;
    let used_memory = after
        .used_memory
        .ok_or_else(|| anyhow!("no used_memory from INFO (redis-cli missing?)"))?;
    let m = RedisMemory {
        identities,
        pins: bench["pins"].as_u64().unwrap_or(pins),
        used_memory_growth: used_memory.saturating_sub(before.used_memory.unwrap_or(0)),
        used_memory,
        fill_pins_per_sec: bench["pins_per_sec"].as_f64().unwrap_or(0.0),
    };
    suite.progress.say(format!(
        "Redis used_memory +{:.0} MB for {} identities ({:.0} B each)",
        m.used_memory_growth as f64 / 1e6,
        group(identities),
        m.used_memory_growth as f64 / identities.max(1) as f64
    ));
    Ok(m)
}

/// The Redis store's goals from issue 14, from the round trips counted on
/// the wire: one round trip for all of a request's new pins, none for a pin
/// hit the local cache may answer (every hit in this count may: the same
/// client repeats the same cookies on one replica, with nothing retired).
fn goals(results: &Results) -> Vec<Goal> {
    let rt = results.fleet.as_ref().and_then(|f| f.round_trips.as_ref());
    let cell = |f: fn(&RoundTrips) -> f64| -> Vec<(String, f64)> {
        rt.map(|rt| ("one request at a time".to_owned(), f(rt)))
            .into_iter()
            .collect()
    };
    vec![
        Goal::over(
            format!(
                "Redis store: ≤ {GOAL_TRIPS_PER_IDENTITY} round trip per request for all of its \
                 new pins"
            ),
            &cell(|rt| rt.writes_per_identity.unwrap_or(rt.per_identity)),
            |cell, v| format!("{cell}: {v:.2} writing a new identity and all its pins"),
            |v| v <= GOAL_TRIPS_PER_IDENTITY + ROUND_TRIP_SLACK,
        ),
        Goal::over(
            "Redis store: pin hits the local cache may answer cost no round trip".to_owned(),
            &cell(|rt| rt.lookups_per_hit.unwrap_or(rt.per_hit)),
            |cell, v| format!("{cell}: {v:.3} lookups sent to Redis per pin hit"),
            |v| v <= ROUND_TRIP_SLACK,
        ),
    ]
}

/// `, extrapolated linearly from N` when fewer than a million identities
/// were measured.
fn extrapolated(m: &RedisMemory) -> String {
    if m.identities < 1_000_000 {
        format!(
            ", extrapolated linearly from the {} measured",
            group(m.identities)
        )
    } else {
        String::new()
    }
}

/// Median of `f` over the steps.
fn over_steps(report: &FleetReport, f: impl Fn(&FleetStep) -> Option<f64>) -> Option<f64> {
    let v: Vec<f64> = report.steps.iter().filter_map(f).collect();
    median(&v)
}

/// The chapter: the steps, memory, and the model.
fn render(results: &Results, out: &mut String) {
    let Some(report) = &results.fleet else {
        let _ = writeln!(out, "Not measured in this run.\n");
        return;
    };
    let s = &results.settings;
    let _ = writeln!(
        out,
        "1 to {} pinproxy replicas share one local `redis-server` ({}, no persistence) with \
         `--store redis://...`, each through the bench exit, each step on a fresh database. \
         Every replica gets {} client connections of its own: first **new identities** (one \
         request with one new tracked cookie each: a new pin and a new identity per request), \
         then **pin hits** (keep-alive clients whose cookies their first request pinned), \
         {:.1} s each. *Redis µs* is redis-server's own CPU time per operation and *commands* \
         its `total_commands_processed` per operation (a pipeline of several commands is one \
         round trip). All replicas, their clients, the exit, the origin and Redis share this \
         machine's {} cores, so rates per replica fall as replicas are added because the \
         machine is full, not because Redis is: read the per-operation costs.\n",
        report.steps.len(),
        report.redis,
        report.concurrency,
        s.secs,
        results.machine.cores
    );
    let _ = writeln!(
        out,
        "| replicas | new identities/s per replica | in total | Redis µs per new identity | commands per new identity | hits/s per replica | in total | Redis µs per hit | commands per hit | pinproxy µs per hit |"
    );
    let _ = writeln!(
        out,
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for step in &report.steps {
        let per = |v: &[f64]| {
            v.iter()
                .map(|x| format!("{x:.0}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let _ = writeln!(
            out,
            "| {} | {} | {:.0} | {} | {} | {} | {:.0} | {} | {} | {} |",
            step.replicas,
            per(&step.identities_per_sec),
            step.identities_per_sec.iter().sum::<f64>(),
            show(step.redis_us_per_identity, 1),
            show(step.commands_per_identity, 1),
            per(&step.hits_per_sec),
            step.hits_per_sec.iter().sum::<f64>(),
            show(step.redis_us_per_hit, 1),
            show(step.commands_per_hit, 2),
            show(step.pinproxy_us_per_hit, 0),
        );
    }
    let errors: u64 = report.steps.iter().map(|s| s.errors).sum();
    let _ = writeln!(out, "\n{} requests failed over all steps.\n", group(errors));

    let real = over_steps(report, |s| s.bytes_per_identity);
    if report.memory.is_some() || real.is_some() {
        let _ = writeln!(out, "### Redis memory\n");
    }
    if let Some(m) = &report.memory {
        let _ = writeln!(
            out,
            "`pinproxy store bench` wrote {} synthetic identities ({} pins, {} per identity) into \
             a scratch database at {} pins/s: Redis `used_memory` grew by {:.0} MB, {:.0} bytes \
             per identity with its pins ({:.1} GB per million identities{}; `INFO memory` \
             counts the allocator's bytes, so this is exact, not an RSS reading).",
            group(m.identities),
            group(m.pins),
            STORE_BENCH_PINS_PER_IDENTITY,
            group(m.fill_pins_per_sec as u64),
            m.used_memory_growth as f64 / 1e6,
            m.used_memory_growth as f64 / m.identities.max(1) as f64,
            m.used_memory_growth as f64 / m.identities.max(1) as f64 * 1e6 / 1e9,
            extrapolated(m),
        );
    }
    if let Some(real) = real {
        let _ = writeln!(
            out,
            "Identities founded through pinproxy in the steps above (one pin each, with their \
             client's recorded TLS and HTTP/2 fingerprint) cost {real:.0} bytes each in \
             `used_memory`."
        );
    }
    let _ = writeln!(out);
    model(report, out);
}

/// The model for 10 to 100 replicas and Redis Cluster, from the measured
/// per-operation costs.
fn model(report: &FleetReport, out: &mut String) {
    let hit = over_steps(report, |s| s.redis_us_per_hit);
    let new = over_steps(report, |s| s.redis_us_per_identity);
    let proxy_hit = over_steps(report, |s| s.pinproxy_us_per_hit);
    let cmds_hit = over_steps(report, |s| s.commands_per_hit);
    let cmds_new = over_steps(report, |s| s.commands_per_identity);
    let (Some(hit), Some(new)) = (hit, new) else {
        return;
    };
    let _ = writeln!(out, "### A model for 10 to 100 replicas\n");
    // Hits the replicas' local caches answer send Redis no command; what
    // Redis's CPU then shows per hit is its own housekeeping spread over them.
    let cached = cmds_hit.is_some_and(|c| c <= ROUND_TRIP_SLACK);
    let hits = if cached {
        format!(
            "Pin hits reach it only when a replica's local cache may not answer: here {} \
             commands per hit, so its {hit:.2} µs of CPU per hit is its own housekeeping spread \
             over them, and hits do not load it. It serves at most about {} new identities/s \
             ({new:.1} µs each)",
            show(cmds_hit, 2),
            group((1e6 / new) as u64),
        )
    } else {
        format!(
            "It serves at most about {} pin hits/s ({hit:.1} µs of its CPU each) or {} new \
             identities/s ({new:.1} µs each)",
            group((1e6 / hit) as u64),
            group((1e6 / new) as u64),
        )
    };
    let replicas = match proxy_hit {
        Some(p) if !cached => format!(
            " A replica spends {p:.0} µs of its own CPU per hit, so one replica core busy with \
             hits keeps {:.1}% of Redis's core busy: Redis saturates at about {:.0} such \
             replica cores.",
            100.0 * hit / p,
            p / hit
        ),
        _ => String::new(),
    };
    let _ = writeln!(
        out,
        "Redis executes commands on one thread, whatever the number of replicas. {hits}.\
         {replicas} The share of that one core a fleet uses:\n"
    );
    let mut header = String::from("| replicas |");
    let mut rule = String::from("| ---: |");
    for rate in MODEL_RATES {
        let _ = write!(header, " {rate:.0} hits/s each |");
        rule.push_str(" ---: |");
    }
    for rate in MODEL_RATES {
        let _ = write!(header, " {rate:.0} new identities/s each |");
        rule.push_str(" ---: |");
    }
    let _ = writeln!(out, "{header}\n{rule}");
    for n in MODEL_REPLICAS {
        let mut row = format!("| {n} |");
        for (cost, is_hit) in [(hit, true), (new, false)] {
            for rate in MODEL_RATES {
                let share = n as f64 * rate * cost / 1e6;
                let cell = if is_hit && cached {
                    " ~0% (local cache) |".to_owned()
                } else if share >= 1.0 {
                    format!(" **{:.0}%** (saturated) |", share * 100.0)
                } else {
                    format!(" {:.0}% |", share * 100.0)
                };
                row.push_str(&cell);
            }
        }
        let _ = writeln!(out, "{row}");
    }
    let trips = match &report.round_trips {
        Some(rt) => format!(
            "{:.3} network round trips to Redis ({} of them lookups; the rest are uses written \
             off the request path, coalesced per identity, and the replica's periodic check; \
             {:.0} bytes up, {:.0} down), a new identity \
             {:.1} round trips in all ({} of them writing the identity and all its pins; the \
             others are the lookup that finds its credentials unknown and its use, written off \
             the request path)",
            rt.per_hit,
            show(rt.lookups_per_hit, 3),
            rt.bytes_up_per_hit,
            rt.bytes_down_per_hit,
            rt.per_identity,
            show(rt.writes_per_identity, 2)
        ),
        None => "round trips not measured".into(),
    };
    let _ = writeln!(
        out,
        "\n- **Round trips**: one request at a time, a pin hit costs {trips} (counted on the \
         wire by a relay between the replica and Redis); Redis executes {} commands per hit and \
         {} per new identity, counting those inside its scripts. Each round trip on the \
         request's path adds the network's round-trip time (0.1–0.5 ms within a datacenter) to \
         the request{}; concurrent requests share round trips on pinproxy's one multiplexed \
         connection.",
        show(cmds_hit, 1),
        show(cmds_new, 1),
        match &report.round_trips {
            Some(rt) if rt.lookups_per_hit.unwrap_or(rt.per_hit) <= ROUND_TRIP_SLACK => {
                ": pin hits are answered by the replica's local cache, so only new pins (and \
                 whatever the cache may not answer) pay it, and Redis's load from hits above \
                 is what the cache leaves over"
            }
            Some(_) => ": every pin hit pays it, as pinproxy asks Redis on each hit",
            None => "",
        }
    );
    let memory = report
        .memory
        .as_ref()
        .filter(|m| m.identities > 0)
        .map_or(String::new(), |m| {
            format!(
                " (a million identities take {:.1} GB of Redis memory{})",
                m.used_memory_growth as f64 / m.identities as f64 * 1e6 / 1e9,
                extrapolated(m)
            )
        });
    let _ = writeln!(
        out,
        "- **Where it saturates first**: Redis's command thread, at the figures above. Memory \
         binds much later{memory}, and the network too (about a kilobyte per hit, both ways \
         together)."
    );
    let _ = writeln!(
        out,
        "- **Redis Cluster** does not move that limit: pinproxy writes every key of a namespace \
         under one hash tag (`{{NS}}`), so the atomic scripts stay in one slot, and one slot \
         lives on one primary. A cluster gives the namespace failover and shares its nodes with \
         other data; one namespace is still served by one Redis thread. What spreads load over \
         a cluster's primaries is several namespaces (`store.namespace`), each a fleet of its \
         own whose replicas never share identities: their tags hash to different slots.\n"
    );
}
