//! `pinbench`: the tools of pinproxy's benchmark suite. `pinbench suite`
//! runs everything (see bench/README.md); the other subcommands are its
//! parts, usable on their own.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use clap::{Args, Parser, Subcommand};
use pinproxy_bench::client::{Target, Via};
use pinproxy_bench::load::{ConnMode, LoadSpec};
use pinproxy_bench::origin::OriginOptions;
use pinproxy_bench::pins::PinSpec;
use pinproxy_bench::suite::SuiteConfig;
use pinproxy_bench::tunnels::TunnelSpec;
use pinproxy_bench::{exit, load, mint, origin, pins, relay, suite, tls, tunnels};
use rustls::ClientConfig;

/// Benchmark tools for pinproxy. Everything talks to loopback only.
#[derive(Debug, Parser)]
#[command(name = "pinbench")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run the whole suite and write BENCHMARKS.md. A flag given twice takes
    /// its last value, so `bench/run.sh --out other.md` overrides run.sh's.
    #[command(args_override_self = true)]
    Suite(Box<SuiteArgs>),
    /// Serve HTTPS with a fresh CA; prints `READY ADDR`.
    Origin(OriginArgs),
    /// A minimal CONNECT exit proxy; prints `READY ADDR`.
    Exit(ExitArgs),
    /// Generate load; prints one JSON result.
    Load(LoadArgs),
    /// Hold idle tunnels through a proxy (driven over stdin/stdout).
    Tunnels(TunnelArgs),
    /// Create pins through a proxy (driven over stdin/stdout).
    Pins(PinArgs),
    /// Time leaf minting in-process with pinproxy's library; prints JSON.
    Mint(MintArgs),
    /// Time CONNECT + TLS handshakes through a proxy, new versus cached host; prints JSON.
    Handshakes(HandshakeArgs),
    /// Relay TCP to a server counting the client's round trips; prints
    /// `READY ADDR`, and the totals as JSON on each `stats` line of stdin.
    Relay(RelayArgs),
}

#[derive(Debug, Args)]
struct SuiteArgs {
    /// The pinproxy binary.
    #[arg(long)]
    pinproxy: PathBuf,
    /// mitmdump, when installed.
    #[arg(long)]
    mitmdump: Option<PathBuf>,
    /// Why mitmproxy could not be installed (reported in place of (e)).
    #[arg(long)]
    mitmproxy_missing: Option<String>,
    /// The hudsucker peer binary (setup (f)), when built.
    #[arg(long)]
    peer: Option<PathBuf>,
    /// The peer's crate and version, for the report (e.g. "hudsucker 0.25.0").
    #[arg(long)]
    peer_label: Option<String>,
    /// Why the peer could not be built (reported in place of (f)).
    #[arg(long)]
    peer_missing: Option<String>,
    /// `libpinbench-heap.so` (bench/heapcount), preloaded into the pin
    /// phase's pinproxy to count its live heap bytes; without it, bytes per
    /// pin are RSS growth only.
    #[arg(long)]
    heap_counter: Option<PathBuf>,
    /// pinproxy's source tree, for --clean-build.
    #[arg(long)]
    source_dir: Option<PathBuf>,
    /// The report to write.
    #[arg(long)]
    out: PathBuf,
    /// Raw results (JSON) to write too.
    #[arg(long)]
    raw_out: Option<PathBuf>,
    /// pinproxy revision, for the report.
    #[arg(long, default_value = "unknown")]
    revision: String,
    /// Scratch directory (a temporary one by default); child PIDs are
    /// recorded in its `pids` file.
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Seconds spent installing and building, for the report.
    #[arg(long)]
    setup_secs: Option<f64>,
    /// Interleaved rounds: five, since the rounds' own ratios spread by
    /// 10-30% on a shared 2-core machine and a median of three follows one
    /// unlucky round.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Timed seconds per load run.
    #[arg(long, default_value_t = 1.5)]
    secs: f64,
    /// Request cap per load run.
    #[arg(long, default_value_t = 200_000)]
    max_requests: u64,
    /// Total request rate of the fixed-rate latency runs.
    #[arg(long, default_value_t = 1000.0)]
    fixed_rate: f64,
    /// Timed seconds per fixed-rate latency run: at 1,000 requests/s, 6 s
    /// puts 60 requests above the p99, where the throughput runs' 1.5 s put
    /// 15.
    #[arg(long, default_value_t = 6.0)]
    fixed_rate_secs: f64,
    /// Idle tunnel counts, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    tunnels: Vec<usize>,
    /// Cumulative pin counts, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "10000,100000,1000000")]
    pins: Vec<u64>,
    /// Tracked cookies per request when filling pins.
    #[arg(long, default_value_t = 64)]
    pins_per_request: usize,
    /// Connections used when filling pins (pins are committed to disk in
    /// groups, so more concurrent requests fill faster).
    #[arg(long, default_value_t = 256)]
    pin_concurrency: usize,
    /// New hosts timed for leaf minting.
    #[arg(long, default_value_t = 200)]
    mint_count: usize,
    /// New identities (one pin each) for the identity measurement.
    #[arg(long, default_value_t = 2000)]
    identities: u64,
    /// Phases to run, comma-separated (throughput, callgrind, http2,
    /// upstream, tunnels, pins, stores, mint, fleet); the report leaves the
    /// others empty. For quick looks while tuning.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "throughput,callgrind,http2,upstream,tunnels,pins,stores,mint,fleet"
    )]
    phases: Vec<String>,
    /// Pins per concurrent `pinproxy store bench` run.
    #[arg(long, default_value_t = 50_000)]
    store_pins: u64,
    /// Pins the embedded store is filled with for its scale row (0: skip).
    #[arg(long, default_value_t = 1_000_000)]
    store_scale_pins: u64,
    /// Where callgrind's output and pinproxy's per-request profile go
    /// [default: the scratch directory].
    #[arg(long)]
    callgrind_dir: Option<PathBuf>,
    /// Requests of the longer callgrind run per proxy (the shorter sends a third).
    #[arg(long, default_value_t = 6000)]
    callgrind_requests: u64,
    /// Only these rows of the callgrind phase, comma-separated keys
    /// (pinproxy, pinproxy-cookies, hudsucker, ...) [default: every row].
    /// For quick before/after counts while tuning.
    #[arg(long, value_delimiter = ',')]
    callgrind_rows: Vec<String>,
    /// Identities founded per fingerprint mode to measure memory per
    /// upstream connection.
    #[arg(long, default_value_t = 1000)]
    upstream_conns: u64,
    /// Also time a clean `cargo build --release` of pinproxy into an empty
    /// target directory (about 10 minutes on 2 cores; needs --source-dir).
    #[arg(long)]
    clean_build: bool,
    /// Most pinproxy replicas sharing one Redis in the fleet phase.
    #[arg(long, default_value_t = 4)]
    fleet_replicas: usize,
    /// Synthetic identities (4 pins each) written into a scratch Redis
    /// database for its memory at scale (0: skip).
    #[arg(long, default_value_t = 1_000_000)]
    redis_identities: u64,
}

#[derive(Debug, Args)]
struct OriginArgs {
    /// Listen address.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Where to write the origin's CA certificate (PEM).
    #[arg(long)]
    ca_out: PathBuf,
    /// Response body size.
    #[arg(long, default_value_t = 1024)]
    body_bytes: usize,
    /// Close every connection after its response (`Connection: close`), so
    /// a proxy in front can never reuse an upstream connection.
    #[arg(long)]
    close: bool,
    /// Record TLS handshake times (TCP accept to handshake done); a
    /// `handshakes` line on stdin prints them as JSON and starts afresh.
    #[arg(long)]
    handshake_stats: bool,
    /// Refuse TLS session resumption (no session cache, no tickets): every
    /// handshake is a full one, whichever client makes it.
    #[arg(long)]
    no_resumption: bool,
    /// Offer h2 as well as HTTP/1.1 (a client offering h2 gets it).
    #[arg(long)]
    http2: bool,
}

#[derive(Debug, Args)]
struct ExitArgs {
    /// Listen address.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Source address of outgoing connections (e.g. 127.0.0.2) [default: the kernel's choice].
    #[arg(long)]
    source: Option<IpAddr>,
}

/// The origin and how to reach it.
#[derive(Debug, Args)]
struct TargetArgs {
    /// Origin host name (CONNECT, SNI and Host).
    #[arg(long, default_value = "localhost")]
    target_host: String,
    /// Origin port.
    #[arg(long)]
    target_port: u16,
    /// Address dialled when going direct [default: 127.0.0.1:PORT].
    #[arg(long)]
    connect_addr: Option<SocketAddr>,
    /// HTTP proxy to go through with CONNECT.
    #[arg(long)]
    proxy: Option<SocketAddr>,
    /// CA certificate file to trust (repeatable).
    #[arg(long, required = true)]
    ca: Vec<PathBuf>,
    /// Path to request.
    #[arg(long, default_value = "/1k")]
    path: String,
}

impl TargetArgs {
    /// Checks that the proxy and the origin are loopback addresses, and
    /// loads the CA certificates to trust.
    fn client_tls(&self) -> Result<Arc<ClientConfig>> {
        self.client_tls_of(false)
    }

    /// As [`TargetArgs::client_tls`], offering h2 alone with `http2`.
    fn client_tls_of(&self, http2: bool) -> Result<Arc<ClientConfig>> {
        ensure_loopback(&[self.proxy, Some(self.target().addr)])?;
        tls::client_config(&self.ca, http2)
    }

    fn via(&self) -> Via {
        self.proxy.map_or(Via::Direct, Via::Proxy)
    }

    fn target(&self) -> Target {
        Target {
            host: self.target_host.clone(),
            port: self.target_port,
            addr: self
                .connect_addr
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], self.target_port))),
        }
    }
}

#[derive(Debug, Args)]
struct LoadArgs {
    #[command(flatten)]
    target: TargetArgs,
    /// Concurrent clients.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Connection reuse.
    #[arg(long, value_enum, default_value = "keep-alive")]
    mode: ConnMode,
    /// Most timed requests.
    #[arg(long, default_value_t = 100_000)]
    requests: u64,
    /// Most seconds of timed load.
    #[arg(long, default_value_t = 2.0)]
    secs: f64,
    /// Send tracked cookies (values prefixed with this tag).
    #[arg(long)]
    cookies: Option<String>,
    /// With --cookies: the same cookie header with each tracked name one
    /// letter off, so that nothing is tracked.
    #[arg(long, requires = "cookies")]
    untracked_cookies: bool,
    /// With --cookies: a browser's header, with 17 more cookies nobody
    /// tracks (20 pairs, about 700 bytes).
    #[arg(long, requires = "cookies")]
    browser_cookies: bool,
    /// With --cookies: each pair in a `Cookie` field of its own, as a
    /// browser sends its cookies over HTTP/2 (cookie crumbs).
    #[arg(long, requires = "cookies")]
    cookie_crumbs: bool,
    /// Each client connection's CONNECT names a session key of its own
    /// (`X-Pinproxy-Session: TAGwNNNN`), which every request inside carries.
    #[arg(long, value_name = "TAG", requires = "proxy")]
    session_keys: Option<String>,
    /// Pace to this many requests/s in total (open loop).
    #[arg(long)]
    rate: Option<f64>,
    /// Expected body size; others count as errors.
    #[arg(long)]
    expect_body: Option<usize>,
    /// Per-request timeout, seconds.
    #[arg(long, default_value_t = 10.0)]
    timeout: f64,
    /// Offer h2 alone in TLS, and speak HTTP/2 where it is negotiated
    /// (each worker still sends one request at a time on its connection).
    #[arg(long)]
    http2: bool,
    /// With --http2: this many workers share each connection, a stream
    /// each, as a browser multiplexes a page's requests.
    #[arg(long, default_value_t = 1, requires = "http2")]
    streams: usize,
}

#[derive(Debug, Args)]
struct TunnelArgs {
    #[command(flatten)]
    target: TargetArgs,
    /// Tunnels to open.
    #[arg(long)]
    count: usize,
    /// Tunnels opened at once.
    #[arg(long, default_value_t = 64)]
    parallel: usize,
    /// Longest time to hold them, seconds.
    #[arg(long, default_value_t = 300)]
    hold_secs: u64,
}

#[derive(Debug, Args)]
struct PinArgs {
    #[command(flatten)]
    target: TargetArgs,
    /// Kept-alive connections.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// New tracked cookies per request.
    #[arg(long, default_value_t = 64)]
    per_request: usize,
    /// Longest time one fill may take, seconds (a fill of more pins than
    /// fit in it measures the rate over that time).
    #[arg(long, default_value_t = 300.0)]
    fill_limit_secs: f64,
    /// Prefix making cookie values unique to this run.
    #[arg(long, default_value = "pinbench")]
    tag: String,
    /// Send each worker's anchor cookie along, so its pins join one identity.
    #[arg(long)]
    anchor: bool,
    /// Send each request as a client of its own: a new connection and a
    /// `User-Agent` of its own, so that each identity it founds (without
    /// `--anchor`) has a fingerprint of its own, as a fleet's new browser
    /// profiles do.
    #[arg(long)]
    fresh_clients: bool,
}

#[derive(Debug, Args)]
struct MintArgs {
    /// New hosts to mint.
    #[arg(long, default_value_t = 200)]
    count: usize,
    /// Cached look-ups timed after each new host.
    #[arg(long, default_value_t = 20)]
    cached_per_new: usize,
}

#[derive(Debug, Args)]
struct RelayArgs {
    /// Listen address.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// The server relayed to.
    #[arg(long)]
    to: SocketAddr,
}

#[derive(Debug, Args)]
struct HandshakeArgs {
    /// The proxy.
    #[arg(long)]
    proxy: SocketAddr,
    /// The proxy's CA certificate.
    #[arg(long)]
    ca: PathBuf,
    /// New hosts (and as many cached handshakes).
    #[arg(long, default_value_t = 200)]
    count: usize,
}

/// Binds a listener with a deep accept queue: tokio's `TcpListener::bind`
/// leaves it at 128, which a burst of 256 new connections overflows (each
/// overflow costs the client a 1 s SYN retransmission).
fn listen(addr: SocketAddr) -> Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    Ok(socket.listen(4096)?)
}

/// Listens on `addr`, prints `READY ADDR` (the address actually bound, for
/// port 0) and runs `serve` on the listener until the process ends.
fn serve_ready<F: Future<Output = ()>>(
    addr: SocketAddr,
    serve: impl FnOnce(tokio::net::TcpListener) -> F,
) -> Result<()> {
    runtime()?.block_on(async move {
        let listener = listen(addr)?;
        println!("READY {}", listener.local_addr()?);
        serve(listener).await;
        Ok(())
    })
}

/// A multi-threaded tokio runtime for one tool.
fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// Every address the tools are given must be loopback.
fn ensure_loopback(addrs: &[Option<SocketAddr>]) -> Result<()> {
    for addr in addrs.iter().flatten() {
        anyhow::ensure!(
            addr.ip().is_loopback(),
            "{addr} is not a loopback address; pinbench only talks to loopback"
        );
    }
    Ok(())
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Suite(a) => suite::run(SuiteConfig {
            pinproxy: a.pinproxy,
            mitmdump: a.mitmdump,
            mitmproxy_missing: a.mitmproxy_missing,
            peer: a.peer,
            peer_label: a.peer_label,
            peer_missing: a.peer_missing,
            heap_counter: a.heap_counter,
            source_dir: a.source_dir,
            out: a.out,
            raw_out: a.raw_out,
            work_dir: a.work_dir,
            setup_secs: a.setup_secs,
            revision: a.revision,
            rounds: a.rounds.max(1),
            secs: a.secs,
            max_requests: a.max_requests,
            fixed_rate: a.fixed_rate,
            fixed_rate_secs: a.fixed_rate_secs,
            tunnel_counts: a.tunnels,
            pin_levels: a.pins,
            pins_per_request: a.pins_per_request,
            pin_concurrency: a.pin_concurrency,
            mint_count: a.mint_count,
            identity_count: a.identities,
            phases: a.phases,
            store_pins: a.store_pins,
            store_scale_pins: a.store_scale_pins,
            callgrind_dir: a.callgrind_dir,
            callgrind_requests: a.callgrind_requests,
            callgrind_rows: a.callgrind_rows,
            upstream_conns: a.upstream_conns,
            clean_build: a.clean_build,
            fleet_replicas: a.fleet_replicas,
            redis_identities: a.redis_identities,
        }),
        Cmd::Origin(a) => {
            ensure_loopback(&[Some(a.listen)])?;
            let config = tls::origin_server_config(&a.ca_out, !a.no_resumption, a.http2)?;
            let body = Bytes::from(vec![b'x'; a.body_bytes]);
            let options = OriginOptions {
                close: a.close,
                handshakes: a.handshake_stats.then(Default::default),
            };
            serve_ready(a.listen, |listener| async move {
                if let Some(handshakes) = options.handshakes.clone() {
                    tokio::spawn(handshakes.report_on_stdin());
                }
                origin::serve(listener, config, body, options).await
            })
        }
        Cmd::Exit(a) => {
            ensure_loopback(&[Some(a.listen)])?;
            if let Some(source) = a.source {
                anyhow::ensure!(source.is_loopback(), "{source} is not a loopback address");
            }
            serve_ready(a.listen, |listener| exit::serve(listener, a.source))
        }
        Cmd::Load(a) => {
            let t = &a.target;
            let tls = t.client_tls_of(a.http2)?;
            let spec = LoadSpec {
                via: t.via(),
                target: t.target(),
                path: t.path.clone(),
                concurrency: a.concurrency.max(1),
                mode: a.mode,
                max_requests: a.requests,
                max_duration: Duration::from_secs_f64(a.secs),
                request_timeout: Duration::from_secs_f64(a.timeout),
                cookie_tag: a.cookies,
                untracked_cookies: a.untracked_cookies,
                browser_cookies: a.browser_cookies,
                cookie_crumbs: a.cookie_crumbs,
                session_tag: a.session_keys.clone(),
                rate: a.rate,
                expect_body: a.expect_body,
                streams: a.streams.max(1),
            };
            let result = runtime()?.block_on(load::run(spec, tls))?;
            println!("{}", serde_json::to_string(&result)?);
            Ok(())
        }
        Cmd::Tunnels(a) => {
            let t = &a.target;
            let tls = t.client_tls()?;
            let spec = TunnelSpec {
                via: t.via(),
                target: t.target(),
                path: t.path.clone(),
                count: a.count,
                parallel: a.parallel,
                hold: Duration::from_secs(a.hold_secs),
            };
            runtime()?.block_on(tunnels::run(spec, tls))
        }
        Cmd::Pins(a) => {
            let t = &a.target;
            let tls = t.client_tls()?;
            let spec = PinSpec {
                via: t.via(),
                target: t.target(),
                path: t.path.clone(),
                concurrency: a.concurrency.max(1),
                per_request: a.per_request,
                fill_limit: Duration::from_secs_f64(a.fill_limit_secs.max(0.0)),
                tag: a.tag,
                anchor: a.anchor,
                fresh_clients: a.fresh_clients,
            };
            runtime()?.block_on(pins::run(spec, tls))
        }
        Cmd::Mint(a) => {
            let report = runtime()?.block_on(mint::library(a.count, a.cached_per_new))?;
            println!("{}", serde_json::to_string(&report)?);
            Ok(())
        }
        Cmd::Relay(a) => {
            ensure_loopback(&[Some(a.listen), Some(a.to)])?;
            let counters = Arc::new(relay::Counters::default());
            serve_ready(a.listen, |listener| async move {
                tokio::spawn(counters.clone().report_on_stdin());
                relay::serve(listener, a.to, counters).await
            })
        }
        Cmd::Handshakes(a) => {
            ensure_loopback(&[Some(a.proxy)])?;
            let tls = tls::client_config(std::slice::from_ref(&a.ca), false)
                .context("loading the proxy's CA")?;
            let report = runtime()?.block_on(mint::handshakes(a.proxy, tls, a.count))?;
            println!("{}", serde_json::to_string(&report)?);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn default_phases_are_the_suite_s_phases_in_order() {
        let cli = Cli::parse_from(["pinbench", "suite", "--pinproxy", "p", "--out", "o"]);
        let Cmd::Suite(args) = cli.command else {
            panic!("not the suite");
        };
        let keys: Vec<&str> = suite::PHASES.iter().map(|p| p.key).collect();
        assert_eq!(args.phases, keys);
    }
}
