//! pinproxy: a MITM forward proxy that pins every anti-bot session cookie to
//! the exit that earned it.
//!
//! The modules, in the order a request meets them (upper layers use lower
//! ones, never the reverse):
//!
//! ```text
//! front (listener, tunnel, passthrough) → mitm (CA, leaves)
//!   → proxy (the phase list: target, credentials, fingerprint, egress, send, capture)
//!     → routing (router, lifecycle) → store (memory, durable, redis)
//!     → exits (spec, health, rotation) → upstream (dial/*, egress_ip, tls/*, pools)
//! shared vocabulary: net, credential, identity, fingerprint, fault, clock, body, metrics
//! ```
//!
//! [`daemon`] assembles them; [`admin`] shows what they do; [`cli`] and
//! [`config`] are how a user drives them.
#![deny(unsafe_code)]
// The docs are for people working on pinproxy, read with
// `--document-private-items`: a public item's doc may link to a private one.
#![allow(rustdoc::private_intra_doc_links)]

pub mod front;
pub mod mitm;
pub mod proxy;
pub mod routing;
pub mod store;
pub mod exits;
pub mod upstream;

pub mod body;
pub mod clock;
pub mod credential;
pub mod fault;
pub mod fingerprint;
pub mod identity;
pub mod metrics;
pub mod net;
pub mod telemetry;

pub mod admin;
pub mod cli;
pub mod config;
pub mod daemon;

mod fsutil;
pub mod heap_trim;

/// Entry points for the fuzz targets and property tests; not an API.
#[doc(hidden)]
pub mod fuzzing;

pub use config::Config;
pub use daemon::{Daemon, StartError};
