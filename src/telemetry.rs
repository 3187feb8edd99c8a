//! Logging set-up. The filter comes from `RUST_LOG` (same syntax as
//! `tracing-subscriber`'s targets filter, e.g. `pinproxy=debug,info`),
//! defaulting to `info`. Lines go to stderr as text or, with
//! `--log-format json` (`log.format = "json"`), as one JSON object per line
//! with the event's fields at the top level.
//!
//! The access log is the target [`ACCESS_TARGET`] at `info`: one line per
//! request (see `proxy::access`). `--access-log off` (`log.access = false`)
//! turns that target off in the filter, so a disabled access line costs a
//! cached callsite check and nothing else.
//!
//! What is logged never includes a raw cookie value or an exit credential:
//! cookies appear as `name#hash8`, exits by id and redacted URL.

pub mod access_line;
mod fields;
pub mod line_writer;
pub mod now_and_then;
mod timestamp;

use serde::Deserialize;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::Layer;

pub use access_line::AccessLine;
use line_writer::{LineGuard, LineWriter};

/// The target of access lines.
pub const ACCESS_TARGET: &str = "pinproxy::access";

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines (coloured on a terminal).
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;

    fn from_str(text: &str) -> Result<LogFormat, String> {
        match text {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("log format {other:?}: expected text or json")),
        }
    }
}

/// Keeps the log writer's thread alive; dropping it writes the lines still
/// buffered. Hold it until the process ends.
#[must_use = "dropping the guard stops the log writer"]
pub struct LogGuard(#[allow(dead_code)] Option<LineGuard>);

impl std::fmt::Debug for LogGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LogGuard")
    }
}

/// Installs the global subscriber (logs to stderr, written in batches by a
/// thread of its own: [`line_writer`]) writing `format`, with the access
/// log on or off. Returns the writer's guard, and an error text when
/// `RUST_LOG` cannot be parsed; logging then stays at `info`.
pub fn init(format: LogFormat, access: bool) -> (LogGuard, Option<String>) {
    let (writer, guard) = match LineWriter::start(std::io::stderr()) {
        Ok((writer, guard)) => (writer, Some(guard)),
        Err(e) => {
            eprintln!("pinproxy: no log writer thread ({e}): writing log lines directly");
            (LineWriter::direct(), None)
        }
    };
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
    let filter = if access {
        filter
    } else {
        filter.with_target(ACCESS_TARGET, LevelFilter::OFF)
    };
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let text = (format == LogFormat::Text).then(|| text_layer(writer.clone(), ansi));
    let json = (format == LogFormat::Json).then(|| json_layer(writer.clone()));
    let installed = tracing_subscriber::registry()
        .with(text)
        .with(json)
        .with(filter)
        .try_init();
    if installed.is_ok() {
        access_line::install(writer, format, ansi);
    }
    (LogGuard(guard), problem)
}

/// The text layer writing to `writer`, with colours when `ansi`. Access
/// lines written directly (see [`access_line`]) are held to what it writes.
fn text_layer<S, W>(writer: W, ansi: bool) -> impl Layer<S>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    tracing_subscriber::fmt::layer()
        .fmt_fields(fields::LineFields)
        .with_timer(timestamp::LineTime)
        .with_writer(writer)
        .with_ansi(ansi)
}

/// The JSON layer writing to `writer`, an object per line with the event's
/// fields at the top level. Access lines written directly are held to what
/// it writes.
fn json_layer<S, W>(writer: W) -> impl Layer<S>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    tracing_subscriber::fmt::layer()
        .json()
        .with_timer(timestamp::LineTime)
        .flatten_event(true)
        .with_current_span(false)
        .with_span_list(false)
        .with_writer(writer)
}

fn default_filter() -> Targets {
    Targets::new().with_default(tracing::Level::INFO)
}
