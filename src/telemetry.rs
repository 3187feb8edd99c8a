//! Logging set-up. The filter comes from `RUST_LOG` (same syntax as
//! `tracing-subscriber`'s targets filter, e.g. `pinproxy=debug,info`),
//! defaulting to `info`.
//!
//! What is logged never includes a raw cookie value or an exit credential:
//! cookies appear as `name#hash8`, exits by id and redacted URL.

use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// Installs the global subscriber (logs to stderr). Returns an error text
/// when `RUST_LOG` cannot be parsed; logging then stays at `info`.
pub fn init() -> Option<String> {
    let (filter, problem) = match std::env::var("RUST_LOG") {
        Ok(spec) if !spec.trim().is_empty() => match spec.parse::<Targets>() {
            Ok(targets) => (targets, None),
            Err(e) => (
                default_filter(),
                Some(format!("ignoring RUST_LOG={spec:?}: {e}")),
            ),
        },
        _ => (default_filter(), None),
    };
    let _ = tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
        )
        .with(filter)
        .try_init();
    problem
}

fn default_filter() -> Targets {
    Targets::new().with_default(tracing::Level::INFO)
}
