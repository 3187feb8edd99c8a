//! The `pinproxy` binary: parse the command line, load the configuration,
//! run. Everything else lives in the library.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser as _;

use pinproxy::affinity::{bench, transfer, PinStore as _};
use pinproxy::cli::{CaAction, CaArgs, Cli, Command, PinsArgs, RunArgs, StoreAction, StoreArgs};
use pinproxy::daemon::{self, Daemon};

/// How long in-flight requests get to finish on SIGINT/SIGTERM.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(args),
        Command::Ca(args) => ca(args),
        Command::Pins(args) => pins(args),
        Command::Store(args) => store(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pinproxy: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    if let Some(problem) = pinproxy::telemetry::init() {
        tracing::warn!("{problem}");
    }
    let config = args.config()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let daemon = Daemon::start(&config).await?;
        eprintln!(
            "pinproxy listening on {addr}\n  trust the CA: {ca}\n  try: curl -x http://{addr} --cacert {ca} https://example.com/",
            addr = daemon.local_addr(),
            ca = daemon.ca_cert_path().display()
        );
        wait_for_signal().await?;
        tracing::info!("shutting down");
        daemon.shutdown(SHUTDOWN_GRACE).await;
        Ok(())
    })
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => result.context("cannot watch SIGINT")?,
        _ = term.recv() => {}
    }
    Ok(())
}

fn pins(args: PinsArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let views = runtime.block_on(pinproxy::admin::fetch_identities(args.admin, args.all))?;
    if args.json {
        for view in &views {
            println!("{}", serde_json::to_string(view)?);
        }
    } else {
        let now = pinproxy::clock::Clock::system().now_ms();
        print!("{}", pinproxy::admin::render_table(&views, now));
    }
    Ok(())
}

fn store(args: StoreArgs) -> anyhow::Result<()> {
    let config = args.common.load()?;
    // Multi-threaded like the daemon, so `store bench` measures what it sees.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let (store, hasher) = daemon::open_store_for_tools(&config).await?;
        let key_id = hasher.key_id();
        let outcome = match args.action {
            StoreAction::Stats => {
                let counts = store.count().await?;
                let deaths = store.exit_deaths().await?;
                println!("store: {}", describe(&store));
                println!("pin-hashing key id: {key_id}");
                println!("pins: {}", counts.pins);
                println!(
                    "identities: {} ({} retired)",
                    counts.identities, counts.retired
                );
                for (exit, at) in deaths {
                    println!("exit {exit} last died at {at} (unix ms)");
                }
                Ok(())
            }
            StoreAction::Export { file } => {
                let moved = match file {
                    Some(path) => {
                        let mut out = std::io::BufWriter::new(
                            std::fs::File::create(&path)
                                .with_context(|| format!("cannot create {}", path.display()))?,
                        );
                        let moved = transfer::export(&store, &key_id, &mut out).await?;
                        std::io::Write::flush(&mut out)?;
                        moved
                    }
                    None => {
                        transfer::export(&store, &key_id, &mut std::io::stdout().lock()).await?
                    }
                };
                eprintln!(
                    "exported {} identities, {} pins",
                    moved.identities, moved.pins
                );
                Ok(())
            }
            StoreAction::Import { file } => {
                let input = std::io::BufReader::new(
                    std::fs::File::open(&file)
                        .with_context(|| format!("cannot open {}", file.display()))?,
                );
                let moved = transfer::import(&store, &key_id, input).await?;
                eprintln!(
                    "imported {} identities, {} pins ({} pins kept the store's existing identity)",
                    moved.identities, moved.pins, moved.conflicts
                );
                Ok::<(), anyhow::Error>(())
            }
            StoreAction::Bench { pins, concurrency } => {
                let plan = bench::Plan { pins, concurrency };
                let store = std::sync::Arc::new(store);
                let report = bench::run(store.clone(), plan).await;
                // Flushed before the numbers are printed: what was measured
                // is on disk.
                store.close().await;
                let report = report?;
                println!("{}", serde_json::to_string(&report)?);
                eprintln!(
                    "{}: {} pins at concurrency {}: {:.0} pins/s, pin-if-absent p50 {:.1} µs, p99 {:.1} µs",
                    describe(&store),
                    report.pins,
                    report.concurrency,
                    report.pins_per_sec,
                    report.p50_us,
                    report.p99_us
                );
                return Ok(());
            }
        };
        store.close().await;
        outcome
    })
}

fn describe(store: &pinproxy::affinity::Store) -> String {
    use pinproxy::affinity::Store;
    match store {
        Store::Memory(_) => "memory".into(),
        Store::Durable(durable) => {
            let size = std::fs::metadata(durable.path())
                .map(|m| m.len())
                .unwrap_or(0);
            format!(
                "embedded ({}, {:.1} MB)",
                durable.path().display(),
                size as f64 / 1e6
            )
        }
        Store::Redis(redis) => format!("redis ({redis:?})"),
    }
}

fn ca(args: CaArgs) -> anyhow::Result<()> {
    let config = args.common.load()?;
    let data_dir = config.resolved_data_dir()?;
    let ca = daemon::prepare_data_dir(&data_dir)?;
    let ca_path = pinproxy::mitm::ca::CertificateAuthority::cert_path(&data_dir);
    if let Some(CaAction::Install { nssdb }) = args.action {
        let installed = pinproxy::mitm::nssdb::install(&ca_path, ca.cert_der(), &nssdb)?;
        println!(
            "{verb} {db}: trusted {ca} as \"{nick}\" for TLS servers",
            verb = if installed.created {
                "created"
            } else {
                "updated"
            },
            db = installed.database,
            ca = ca_path.display(),
            nick = installed.nickname,
        );
        return Ok(());
    }
    if args.pem {
        print!("{}", ca.cert_pem());
    } else {
        println!("{}", ca_path.display());
    }
    Ok(())
}
