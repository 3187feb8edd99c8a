//! Shared vocabulary: who is at fault when something fails, and how errors
//! are read.
//!
//! Every error type that crosses a module boundary says whose fault it is
//! ([`Fault`]) on the type itself, through [`Blame`]; the answer to the
//! client (status code, `X-Pinproxy-Error`, advice) and the metric label
//! follow from that one decision.

/// Who caused a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The client sent something pinproxy cannot or will not forward.
    Client,
    /// The exit failed.
    Exit,
    /// The origin failed.
    Origin,
    /// The pin store failed.
    Store,
    /// pinproxy itself failed (a bug, or a resource it could not get).
    Internal,
}

impl Fault {
    /// A short, stable label (logs, metrics).
    pub fn label(self) -> &'static str {
        match self {
            Fault::Client => "client",
            Fault::Exit => "exit",
            Fault::Origin => "origin",
            Fault::Store => "store",
            Fault::Internal => "internal",
        }
    }
}

/// An error that knows whose fault it is.
pub trait Blame {
    /// Who is at fault.
    fn fault(&self) -> Fault;
}

/// The causes of an error, outermost first, joined by `": "`.
pub fn causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let next = cause.to_string();
        if !text.ends_with(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = cause.source();
    }
    text
}

/// Whether an error is only a peer going away (EOF, reset, close_notify
/// missing): worth a debug line, not a warning.
pub fn is_benign_disconnect(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = current {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::*;
            if matches!(
                io.kind(),
                UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe | NotConnected
            ) {
                return true;
            }
        }
        if let Some(h) = e.downcast_ref::<hyper::Error>() {
            if h.is_incomplete_message() || h.is_canceled() || h.is_closed() {
                return true;
            }
        }
        current = e.source();
    }
    false
}
