//! The multi-threaded runtime `pinproxy run` and the tools run on.
//!
//! Its worker count is tokio's default, one per CPU the process may use (a
//! container's CPU quota counts), unless [`WORKER_THREADS_VAR`] says
//! otherwise. tokio reads that variable itself and panics on a value it
//! cannot parse (an empty one included), so it is read and checked here
//! first: a bad value is an error that names it and says what to do.
//!
//! Fewer workers than CPUs can pay on a machine whose cores are also busy
//! with other work, a sidecar beside its browsers for instance (README,
//! *Operating it*).

use std::ffi::OsStr;

use anyhow::Context as _;
use tokio::runtime::Runtime;

/// The environment variable that sets the number of worker threads (tokio's
/// own name for it).
pub const WORKER_THREADS_VAR: &str = "TOKIO_WORKER_THREADS";

/// A value of [`WORKER_THREADS_VAR`] that is not a worker count.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{WORKER_THREADS_VAR} must be a number of worker threads, 1 or more, not {value:?}; \
     unset it for one worker per CPU"
)]
pub struct WorkerThreadsError {
    /// The value as set (lossily decoded).
    pub value: String,
}

/// The worker count `value` (the variable's value, if set) asks for: `None`
/// leaves tokio's default.
pub fn worker_threads(value: Option<&OsStr>) -> Result<Option<usize>, WorkerThreadsError> {
    let Some(value) = value else {
        return Ok(None);
    };
    value
        .to_str()
        .and_then(|text| text.trim().parse::<usize>().ok())
        .filter(|count| *count > 0)
        .map(Some)
        .ok_or_else(|| WorkerThreadsError {
            value: value.to_string_lossy().into_owned(),
        })
}

/// A multi-threaded runtime with its I/O and time drivers, sized as the
/// module documentation says.
pub fn multi_thread() -> anyhow::Result<Runtime> {
    let workers = worker_threads(std::env::var_os(WORKER_THREADS_VAR).as_deref())?;
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(workers) = workers {
        builder.worker_threads(workers);
    }
    builder
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_count_is_a_positive_number() {
        assert_eq!(worker_threads(None), Ok(None));
        assert_eq!(worker_threads(Some(OsStr::new("1"))), Ok(Some(1)));
        assert_eq!(worker_threads(Some(OsStr::new(" 4\n"))), Ok(Some(4)));
        for bad in ["", "0", "-1", "two", "1.5", "99999999999999999999999"] {
            let error = worker_threads(Some(OsStr::new(bad))).unwrap_err();
            assert_eq!(error.value, bad);
            let message = error.to_string();
            assert!(
                message.contains("TOKIO_WORKER_THREADS") && message.contains("unset it"),
                "{message}"
            );
        }
    }

    #[cfg(unix)]
    #[test]
    fn a_value_that_is_not_text_is_refused_not_guessed() {
        use std::os::unix::ffi::OsStrExt as _;
        let error = worker_threads(Some(OsStr::from_bytes(b"2\xff"))).unwrap_err();
        assert_eq!(error.value, "2\u{fffd}");
    }
}
