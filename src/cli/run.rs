//! `pinproxy run`: start the daemon with the configuration the flags and
//! the file describe, and stop it on SIGINT/SIGTERM.

use std::time::Duration;

use anyhow::Context as _;

use super::RunArgs;
use crate::daemon::Daemon;

/// How long in-flight requests get to finish on SIGINT/SIGTERM.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Runs `pinproxy run` until a signal stops it.
pub fn run(args: RunArgs) -> anyhow::Result<()> {
    if let Some(problem) = crate::telemetry::init() {
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
