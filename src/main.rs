//! The `pinproxy` binary: parse the command line, load the configuration,
//! run. Everything else lives in the library.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser as _;

use pinproxy::cli::{CaArgs, Cli, Command, PinsArgs, RunArgs};
use pinproxy::daemon::{self, Daemon};

/// How long in-flight requests get to finish on SIGINT/SIGTERM.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(args),
        Command::Ca(args) => ca(args),
        Command::Pins(args) => pins(args),
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

fn ca(args: CaArgs) -> anyhow::Result<()> {
    let config = args.common.load()?;
    let data_dir = config.resolved_data_dir()?;
    let ca = daemon::prepare_data_dir(&data_dir)?;
    if args.pem {
        print!("{}", ca.cert_pem());
    } else {
        println!(
            "{}",
            pinproxy::mitm::ca::CertificateAuthority::cert_path(&data_dir).display()
        );
    }
    Ok(())
}
