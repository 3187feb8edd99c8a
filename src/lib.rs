//! pinproxy: a MITM forward proxy that pins every anti-bot session cookie to
//! the exit that earned it.
//!
//! The modules are listed in the order a request meets them:
//! listener → mitm → pipeline → target → cookies → affinity → exits →
//! egress → upstream → capture. [`daemon`] assembles them.
#![forbid(unsafe_code)]

pub mod affinity;
pub mod capture;
pub mod cookies;
pub mod egress;
pub mod exits;
pub mod listener;
pub mod mitm;
pub mod pipeline;
pub mod target;
pub mod upstream;

pub mod body;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod error;
pub mod telemetry;

mod fsutil;
mod rewind;

pub use config::Config;
pub use daemon::{Daemon, StartError};
