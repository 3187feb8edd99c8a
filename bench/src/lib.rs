//! The pinproxy benchmark suite.
//!
//! Everything runs on loopback: a TLS test origin ([`origin`]), a minimal
//! CONNECT exit ([`exit`]), a load generator that can go through an HTTP
//! proxy with CONNECT ([`load`]), probes for idle tunnels ([`tunnels`]),
//! pins ([`pins`]) and leaf minting ([`mint`]), and the orchestrator
//! ([`suite`]) that runs them side by side against pinproxy and mitmproxy
//! and writes `BENCHMARKS.md` ([`report`]).
#![forbid(unsafe_code)]

pub mod client;
pub mod exit;
pub mod load;
pub mod mint;
pub mod origin;
pub mod pins;
pub mod procfs;
pub mod report;
pub mod stats;
pub mod suite;
pub mod tls;
pub mod tunnels;
