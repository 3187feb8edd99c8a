//! `pinproxy run`: start the daemon with the configuration the flags and
//! the file describe, and operate it with signals:
//!
//! - SIGHUP re-reads the `--config` file and applies it with the same
//!   flags on top (flags still win), as `POST /reload` on the admin
//!   endpoint does; a configuration that does not validate is refused
//!   whole and logged, the one in force stays;
//! - SIGTERM or SIGINT stops gracefully: no new connections, in-flight
//!   requests get `timeouts.shutdown` to finish, background store writes
//!   are flushed, then the process exits 0;
//! - a second SIGTERM or SIGINT during that wait exits at once, with status
//!   143 (SIGTERM) or 130 (SIGINT), as a shell reports a process the signal
//!   ended. What decided routing is already durable; only request counts
//!   and last-use times written lazily can be lost.

use std::sync::Arc;

use anyhow::Context as _;
use tokio::signal::unix::{signal, Signal, SignalKind};

use super::RunArgs;
use crate::daemon::Daemon;

/// Runs `pinproxy run` until a signal stops it.
pub fn run(args: RunArgs) -> anyhow::Result<()> {
    let config = args.config().map_err(flatten)?;
    let (_log, problem) = crate::telemetry::init(config.log.format, config.log.access);
    if let Some(problem) = problem {
        tracing::warn!("{problem}");
    }
    if std::env::args().skip(1).any(|arg| holds_password(&arg)) {
        tracing::warn!(
            "a URL on the command line holds a password (an --exit or --store value): every local \
             user can read it (ps, /proc/PID/cmdline); put it in the config file, readable by its \
             owner alone, or in PINPROXY_STORE"
        );
    }
    let runtime = super::runtime::multi_thread()?;
    runtime.block_on(async {
        // Watched from before the daemon starts, so no signal is missed.
        let mut signals = Signals::watch()?;
        let daemon = Daemon::start(&config).await.map_err(flatten)?;
        let args = Arc::new(args);
        daemon.set_config_source(Arc::new(move || {
            args.config().map_err(|e| crate::fault::causes(&e))
        }));
        // The addresses actually bound (a port of 0 is chosen by the system).
        let admin = daemon.admin_addr().map_or_else(String::new, |admin| {
            format!("\n  admin: http://{admin}/ (live page, /metrics, /readyz)")
        });
        eprintln!(
            "pinproxy listening on {addr}{admin}\n  trust the CA: {ca}\n  try: curl -x http://{addr} --cacert {ca} https://example.com/",
            addr = daemon.local_addr(),
            ca = daemon.ca_cert_path().display()
        );
        let first = loop {
            tokio::select! {
                _ = signals.hangup.recv() => {
                    tracing::info!("SIGHUP: reloading the configuration");
                    // Success and refusal are both logged by the reload.
                    let _ = daemon.reload().await;
                }
                stop = stop_signal(&mut signals.terminate, &mut signals.interrupt) => break stop,
            }
        };
        let grace = daemon.shutdown_grace();
        tracing::info!(
            signal = first.name(),
            grace = ?grace,
            "shutting down: no new connections; in-flight requests may finish (a second signal exits at once)"
        );
        tokio::select! {
            () = daemon.shutdown(grace) => {
                tracing::info!("stopped");
                Ok(())
            }
            again = stop_signal(&mut signals.terminate, &mut signals.interrupt) => {
                tracing::warn!(signal = again.name(), "second signal: exiting at once");
                std::process::exit(again.exit_code());
            }
        }
    })
}

/// A start-up error as one line: each cause once (a cause a message
/// already ends with is not repeated).
fn flatten(error: impl std::error::Error) -> anyhow::Error {
    anyhow::anyhow!(crate::fault::causes(&error))
}

/// The signals `pinproxy run` acts on.
struct Signals {
    hangup: Signal,
    terminate: Signal,
    interrupt: Signal,
}

/// Which stop signal arrived.
#[derive(Clone, Copy)]
enum Stop {
    Terminate,
    Interrupt,
}

impl Stop {
    fn name(self) -> &'static str {
        match self {
            Stop::Terminate => "SIGTERM",
            Stop::Interrupt => "SIGINT",
        }
    }

    /// 128 + the signal's number, as shells report it.
    fn exit_code(self) -> i32 {
        match self {
            Stop::Terminate => 143,
            Stop::Interrupt => 130,
        }
    }
}

impl Signals {
    fn watch() -> anyhow::Result<Signals> {
        Ok(Signals {
            hangup: signal(SignalKind::hangup()).context("cannot watch SIGHUP")?,
            terminate: signal(SignalKind::terminate()).context("cannot watch SIGTERM")?,
            interrupt: signal(SignalKind::interrupt()).context("cannot watch SIGINT")?,
        })
    }
}

/// The next SIGTERM or SIGINT.
async fn stop_signal(terminate: &mut Signal, interrupt: &mut Signal) -> Stop {
    tokio::select! {
        _ = terminate.recv() => Stop::Terminate,
        _ = interrupt.recv() => Stop::Interrupt,
    }
}

/// Whether a command-line argument holds a URL with a password
/// (`scheme://user:password@host`, or `ID=` before it, or no scheme).
fn holds_password(arg: &str) -> bool {
    let after_scheme = arg.split_once("://").map_or(arg, |(_, rest)| rest);
    let authority = after_scheme.split(['/', '?', '#']).next().unwrap_or("");
    authority
        .rsplit_once('@')
        .is_some_and(|(userinfo, _)| userinfo.contains(':'))
}

#[cfg(test)]
mod password_tests {
    use super::holds_password;

    #[test]
    fn passwords_in_command_line_urls_are_seen() {
        for yes in [
            "http://user:pw@gate.example:7000",
            "res1=http://user:pw@gate.example:7000",
            "redis://:secret@redis.internal:6379/0",
            "user:pw@gate.example:7000",
        ] {
            assert!(holds_password(yes), "{yes}");
        }
        for no in [
            "http://gate.example:7000",
            "http://user@gate.example:7000",
            "redis://redis.internal:6379/0",
            "--exit",
            "127.0.0.1:8080",
            "http://gate.example/a:b@c",
        ] {
            assert!(!holds_password(no), "{no}");
        }
    }
}
