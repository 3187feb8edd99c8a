//! The pinproxy benchmark suite.
//!
//! Everything runs on loopback. The building blocks: a TLS test origin
//! ([`origin`]), a minimal CONNECT exit ([`exit`]), a load generator that
//! can go through an HTTP proxy with CONNECT ([`load`], on [`client`] and
//! [`tls`]), probes for idle tunnels ([`tunnels`]), pins ([`pins`]) and
//! leaf minting ([`mint`]), a round-trip-counting TCP relay ([`relay`]), and
//! readings from `/proc` ([`procfs`]) with the statistics over them
//! ([`stats`]). The orchestrator ([`suite`]) runs them
//! phase by phase against pinproxy and mitmproxy, each phase in its own
//! module with its section of `BENCHMARKS.md`, which [`report`] assembles.
#![forbid(unsafe_code)]

pub mod client;
pub mod exit;
pub mod load;
pub mod mint;
pub mod origin;
pub mod pins;
pub mod procfs;
pub mod relay;
pub mod report;
pub mod stats;
pub mod suite;
pub mod tls;
pub mod tunnels;
