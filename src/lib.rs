//! pinproxy: a MITM forward proxy that pins every anti-bot session cookie to
//! the exit that earned it.
//!
//! The modules are listed in the order a request meets them:
//! listener → mitm → pipeline → target → cookies / session_key →
//! fingerprint → identity / affinity → exits → egress → upstream → capture.
//! [`daemon`] assembles them; [`admin`] and [`metrics`] show what they do.
#![forbid(unsafe_code)]

pub mod listener;
pub mod mitm;
pub mod pipeline;
pub mod target;
pub mod cookies;
pub mod session_key;
pub mod fingerprint;
pub mod identity;
pub mod affinity;
pub mod exits;
pub mod egress;
pub mod upstream;
pub mod capture;
pub mod upgrade;
pub mod passthrough;

pub mod admin;
pub mod body;
pub mod cli;
pub mod clock;
pub mod config;
pub mod daemon;
pub mod error;
pub mod metrics;
pub mod telemetry;

mod fsutil;
mod rewind;

pub use config::Config;
pub use daemon::{Daemon, StartError};
